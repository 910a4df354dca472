"""The real test bed: SmolLM2-135M-Instruct with a soft prompt tuned by dpc_lens, in DPC's regime.

DPC can only help where the soft prompt *hurts* some questions the model solves without it
(SPEC section 3: the ceiling). On SmolLM2 a prompt tuned on dpc_lens's arithmetic word problems
is the capability (base 12% -> PT 49%, 3 questions lost), so this test bed mixes in questions
the base model already solves about half of: reasoning-gym ``basic_arithmetic`` (2 terms,
``+``/``-``, up to 2 digits, no parentheses or negation, non-negative answers), next to dpc_lens
``arith`` word problems of 1-2 steps. Every question ends with :data:`BUILD`'s short answer
instruction (the "think step by step" one makes SmolLM2 ramble: 16% vs 47% on the same gym
questions, 3 s vs 0.4 s per answer).

The soft prompt (20 tokens, text init, lr 3e-2, batch 8, 80 steps) is tuned on arith alone,
through the chat template with the gold rationale + ``<|im_end|>`` as target. On gym questions
alone it leaves accuracy where it was but changes which questions are right (~20% each way);
on arith it is the capability (8% -> 33%). dev/test are therefore 90% gym + 10% arith: base and
PT close, flips both ways (``pilots.json`` has the numbers behind the choice, ``regime.json``
the shipped ones).

``python -m dpc_lens.testbed.real build`` (the rebuild command) tunes the soft prompt, writes
the dev/test splits (JSONL, so runs repeat without the generators), measures the regime (base,
PT, flips each way, ceiling, oracle) on dev, calibrates DPC on dev, and (stage ``test``) measures
the regime on test; ``probe`` / ``probe-pt`` measure candidate parts; ``regime-from-records``
fills the test regime from an evidence run's records (``benchmarks/evidence_table.py --testbed
real``) instead of generating the same answers twice. Deterministic given the seeds in
:data:`BUILD`; artefacts go to ``dpc_lens/data/real/``, and a stage whose outputs exist is
skipped (delete them to redo it).

Every question, whatever its source, is scored with the ``arith`` task (GSM8K numeric
extraction and comparison): all gold answers are non-negative integers, and reasoning-gym's
``basic_arithmetic`` scorer accepts the same number (tested). Each example keeps its source in
``meta["source"]`` (``"gym:basic_arithmetic"`` or ``"arith"``) and reasoning-gym's entry in
``meta["gym"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = ["BUILD", "IAP_POOL", "gym_part", "arith_part", "make_real_mixture", "probe", "probe_pt", "regime",
           "build", "real_data_dir", "artefacts", "DEMO_LIMIT", "EVIDENCE",
           "regime_from_records"]

#: everything the build depends on (seeds included); changing it changes the artefacts
BUILD: dict[str, Any] = {
    "gym_config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                   "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False},
    "arith_steps": [1, 2],
    # appended after a blank line to every question (None: the bare question)
    "instruction": "Answer with a line of the form 'The answer is <answer>.'",
    "max_new_tokens": 96,
    "batch_size": 8,
    # the soft prompt: tuned on arith word problems only (the gym questions are the ones the
    # base model solves and the prompt was never tuned for), chat template, target = gold
    # rationale + <|im_end|>
    "train": {"n": 2000, "seed": 0, "gym_share": 0.0, "dev_loss_n": 24},
    "prompt_tuning": {"n_tokens": 20, "init": "text",
                      "init_text": "Solve the problem. Write each step as an equation, "
                                   "then say: The answer is the number.",
                      "lr": 3e-2, "batch_size": 8, "steps": 80, "eval_every": 20,
                      "patience": None, "seed": 0, "add_bos": False, "add_eos": True,
                      "target_template": "{rationale}"},
    # dev/test: mostly gym (base = PT there, flips both ways), some arith (where the prompt
    # helps); chosen on the pilot numbers in pilots.json
    "dev": {"n": 150, "seed": 1, "gym_share": 0.9},
    "test": {"n": 600, "seed": 2, "gym_share": 0.9},
    # DPC calibration grid, kept small: every distinct located set costs a generation (with
    # top_k 1-2 and both sink modes, 448 corrupted generations for 150 dev questions, ~30 min on
    # the shared CPU). Soft column 0 is the attention sink (the soft prompt opens the sequence),
    # so it is excluded from the located tokens.
    "calibration_grid": {"top_k": [1], "shallow_layers": ["shallow"],
                         "deep_layers": ["deep", [0.5, 1.0], [0.75, 1.0]],
                         "sink": ["exclude"]},
}

#: questions ``dpc-lens demo`` runs on the real test bed unless ``--limit`` says otherwise: sized
#: to finish in about 10 minutes on 2 CPU cores, the first conversion of the GGUF file included
DEMO_LIMIT = 40

#: where the full committed evidence on the real test bed is
EVIDENCE = ("benchmarks/results/evidence_real.json (README: 'The real test bed'); regime numbers "
            "in dpc_lens/data/real/regime.json")

#: zero-shot chain-of-thought trigger prompts for IAP (appended after the question)
IAP_POOL: tuple[str, ...] = (
    "Let's think step by step.",                       # Kojima et al., 2022
    "Don't think. Just feel.",                         # the IAP paper's bad prompt
    # Zhou et al., 2023 (APE):
    "Let's work this out in a step by step way to be sure we have the right answer.",
    "Take a deep breath and work on this problem step-by-step.",  # Yang et al., 2023 (OPRO)
    "Let's solve this problem by splitting it into steps.",       # Kojima et al.'s list
    "Just give the answer.",
    "Let's be concise and answer directly.",
    "Answer quickly without explaining.",
)


_UNSET: Any = object()


def _with_instruction(question: str, instruction: str | None) -> str:
    return f"{question.strip()}\n\n{instruction}" if instruction else question.strip()


def gym_part(n: int, seed: int, config: dict | None = None, instruction: str | None = _UNSET) -> list:
    """``n`` reasoning-gym ``basic_arithmetic`` questions with non-negative integer answers.

    Draws ``4 n`` entries with ``seed`` and keeps the first ``n`` whose answer is a
    non-negative integer (deterministic). Rationale: ``"<expression> = <answer>. The answer is
    <answer>."`` (the data set has no worked solution; this is the arith task's style).
    """
    from ..tasks.base import Example
    from ..tasks.gym import GymTask

    cfg = dict(BUILD["gym_config"] if config is None else config)
    instr = BUILD["instruction"] if instruction is _UNSET else instruction
    task = GymTask("basic_arithmetic", instruction=None)
    out = []
    for ex in task.generate(4 * n, seed, **cfg):
        try:
            value = int(ex.answer)
        except ValueError:
            continue
        if value < 0:
            continue
        expr = ex.meta["gym"]["metadata"].get("expression", "").strip()
        rationale = f"{expr} = {value}. The answer is {value}." if expr else f"The answer is {value}."
        out.append(Example(id=ex.id, question=_with_instruction(ex.question, instr), answer=str(value),
                           rationale=rationale, meta=dict(ex.meta, source="gym:basic_arithmetic")))
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} of {4 * n} basic_arithmetic draws have answers >= 0")


def arith_part(n: int, seed: int, steps: Sequence[int] | None = None,
               instruction: str | None = _UNSET) -> list:
    """``n`` dpc_lens ``arith`` word problems of 1-2 steps (train templates, standard phrasing),
    with the answer instruction appended like the reasoning-gym questions."""
    from ..tasks.arith import generate_examples
    from ..tasks.base import Example

    lo, hi = steps or BUILD["arith_steps"]
    instr = BUILD["instruction"] if instruction is _UNSET else instruction
    exs = generate_examples(n, seed=seed, steps=(lo, hi), split="real", id_prefix=f"arith-{seed}")
    return [Example(id=e.id, question=_with_instruction(e.question, instr),
                    answer=e.answer, rationale=e.rationale, meta=dict(e.meta, source="arith"))
            for e in exs]


def make_real_mixture(name: str, n: int, seed: int, gym_share: float = 0.5) -> list:
    """``n`` questions, ``round(n * gym_share)`` from :func:`gym_part`, the rest from
    :func:`arith_part`, each part seeded from ``(name, seed)``, shuffled with a seeded shuffle;
    ids ``f"{name}-{seed}-{i}"`` (the source id is kept in ``meta["source_id"]``)."""
    from ..tasks.base import Example

    n_gym = round(n * gym_share)
    s_gym = (seed * 1_000_003 + zlib.crc32(f"{name}/gym".encode())) % (2**31)
    s_ar = (seed * 1_000_003 + zlib.crc32(f"{name}/arith".encode())) % (2**31)
    parts = (gym_part(n_gym, s_gym) if n_gym else []) + (arith_part(n - n_gym, s_ar) if n > n_gym else [])
    random.Random(seed * 7919 + zlib.crc32(name.encode())).shuffle(parts)
    return [Example(id=f"{name}-{seed}-{i}", question=e.question, answer=e.answer,
                    rationale=e.rationale, meta=dict(e.meta, source_id=e.id))
            for i, e in enumerate(parts)]


def _generation_config():
    from ..generation import GenerationConfig

    return GenerationConfig(max_new_tokens=BUILD["max_new_tokens"], batch_size=BUILD["batch_size"])


def _template(model: Any) -> str:
    from ..model import as_adapter
    from ..tasks.gym import chat_prompt_template

    return chat_prompt_template(as_adapter(model).tokenizer)


def _evaluate(model: Any, soft: Any, examples: Sequence, *, progress: bool | None = None):
    """Accuracy of ``examples`` with ``soft`` (``None``: the base model) under the test bed's
    prompt layout: ``[soft] chat_template(question)``, no extra BOS (the template opens with
    ``<|im_start|>``, SmolLM2's BOS)."""
    from ..prompt_tuning import evaluate_accuracy
    from ..tasks import get_task

    return evaluate_accuracy(model, soft, examples, get_task("arith"), _generation_config(),
                             add_bos=False, template=_template(model), progress=progress)


def probe(n: int = 50, *, out: str | None = None, progress: bool | None = None) -> dict:
    """Base zero-shot accuracy of each candidate part on ``n`` questions (seed 12345)."""
    from ..model import load_model

    model = load_model("smollm2")
    from ..tasks.gym import ANSWER_INSTRUCTION

    short = BUILD["instruction"]
    one_digit = dict(BUILD["gym_config"], max_digits=1)
    cands = {
        "gym +- 2 terms <=2 digits, bare": lambda: gym_part(n, 12345, instruction=None),
        "gym +- 2 terms 1 digit, think-step-by-step instruction":
            lambda: gym_part(n, 12345, one_digit, instruction=ANSWER_INSTRUCTION),
        "gym +- 2 terms <=2 digits, short instruction": lambda: gym_part(n, 12345, instruction=short),
        "arith 1-2 steps, bare": lambda: arith_part(n, 12345, instruction=None),
        "arith 1-2 steps, short instruction": lambda: arith_part(n, 12345, instruction=short),
    }
    result: dict[str, Any] = {}
    for name, make in cands.items():
        t0 = time.perf_counter()
        res = _evaluate(model, None, make(), progress=progress)
        result[name] = {"n": n, "accuracy": res.accuracy,
                        "answered": sum(p is not None for p in res.predictions) / n,
                        "seconds": round(time.perf_counter() - t0, 1),
                        "example": res.texts[0][:300]}
        print(name, json.dumps(result[name]), flush=True)
        if out:
            with open(out, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
    return result


def probe_pt(n: int = 60, *, out: str | None = None, progress: bool | None = None) -> dict:
    """Base and PT answers (the built adapter) of candidate gym parts on ``n`` questions each
    (seed 54321): which part, mixed with arith, puts base and PT close with flips both ways."""
    from ..model import load_model
    from ..soft_prompt import SoftPrompt

    model = load_model("smollm2")
    soft = SoftPrompt.from_peft(os.path.join(real_data_dir(), "soft_prompt"))
    cands = {f"gym +- 2 terms <={d} digit(s)": dict(BUILD["gym_config"], max_digits=d) for d in (1, 2)}
    result: dict[str, Any] = {}
    for name, cfg in cands.items():
        exs = gym_part(n, 54321, cfg)
        base = _evaluate(model, None, exs, progress=progress).correct
        pt = _evaluate(model, soft, exs, progress=progress).correct
        result[name] = regime(list(base), list(pt))
        print(name, json.dumps(result[name]), flush=True)
        if out:
            _write_json(out, result)
    return result


def regime(base_correct: Sequence[bool], pt_correct: Sequence[bool],
           sources: Sequence[str] | None = None) -> dict:
    """The regime numbers of one split: base, PT, flips each way, ceiling and oracle."""
    n = len(base_correct)
    lost = sum(1 for b, p in zip(base_correct, pt_correct) if b and not p)
    gained = sum(1 for b, p in zip(base_correct, pt_correct) if p and not b)
    out: dict[str, Any] = {
        "n": n,
        "base": sum(base_correct) / n,
        "pt": sum(pt_correct) / n,
        "right_without_prompt_wrong_with": lost,
        "wrong_without_prompt_right_with": gained,
        "flip_rate_lost": lost / n,
        "flip_rate_gained": gained / n,
        "ceiling": lost,
        "oracle": sum(1 for b, p in zip(base_correct, pt_correct) if b or p) / n,
    }
    if sources is not None:
        out["by_source"] = {}
        for s in sorted(set(sources)):
            idx = [i for i, x in enumerate(sources) if x == s]
            out["by_source"][s] = {
                "n": len(idx),
                "base": sum(base_correct[i] for i in idx) / len(idx),
                "pt": sum(pt_correct[i] for i in idx) / len(idx),
                "lost": sum(1 for i in idx if base_correct[i] and not pt_correct[i]),
                "gained": sum(1 for i in idx if pt_correct[i] and not base_correct[i]),
            }
    return out


def real_data_dir() -> str:
    """Where the real test bed's artefacts live (``dpc_lens/data/real``)."""
    from . import data_dir

    return os.path.join(data_dir(), "real")


def artefacts(out_dir: str | None = None) -> dict[str, str] | None:
    """Paths of the real test bed (``model`` is the ``load_model`` name ``"smollm2"``), in the
    shape of :func:`dpc_lens.demo.shipped_artefacts`; None when the adapter or test split is
    missing."""
    d = out_dir or real_data_dir()
    paths = {"model": "smollm2", "soft_prompt": os.path.join(d, "soft_prompt"),
             "test": os.path.join(d, "test.jsonl"), "dev": os.path.join(d, "dev.jsonl"),
             "config": os.path.join(d, "dpc_config.json"), "task": "arith",
             "regime": os.path.join(d, "regime.json")}
    if os.path.exists(os.path.join(paths["soft_prompt"], "adapter_config.json")) \
            and os.path.exists(paths["test"]):
        return paths
    return None


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def _specs(values: Sequence) -> tuple:
    """Layer specs from JSON (lists become the tuples the layer grammar reads)."""
    return tuple(x if isinstance(x, str) else tuple(x) for x in values)


def _split(name: str) -> list:
    spec = BUILD[name]
    return make_real_mixture(name, spec["n"], spec["seed"], spec["gym_share"])


def _correctness(model: Any, soft: Any, examples: Sequence, path: str, *, progress: bool) -> list[bool]:
    """Graded answers of ``examples`` (``soft`` None: base), cached as JSONL at ``path`` and
    resumed from it (one line per finished batch of questions)."""
    from ..prompt_tuning import evaluate_accuracy  # noqa: F401  (same grading as _evaluate)
    from ..runs import read_records

    done: dict[str, dict] = {rec["id"]: rec for rec in read_records(path)}
    todo = [e for e in examples if e.id not in done]
    chunk = 4 * BUILD["batch_size"]
    for s in range(0, len(todo), chunk):
        part = todo[s:s + chunk]
        res = _evaluate(model, soft, part, progress=progress)
        with open(path, "a", encoding="utf-8") as fh:
            for e, t, p, c in zip(part, res.texts, res.predictions, res.correct):
                rec = {"id": e.id, "source": e.meta.get("source"), "answer": p, "gold": e.answer,
                       "correct": bool(c), "text": t}
                done[e.id] = rec
                fh.write(json.dumps(rec) + "\n")
        print(f"  {os.path.basename(path)}: {len(done)}/{len(examples)}", flush=True)
    return [bool(done[e.id]["correct"]) for e in examples]


def build(out_dir: str | None = None, *, stages: Sequence[str] = ("pt", "splits", "dev", "calibrate", "test"),
          progress: bool | None = None) -> dict:
    """Run the build stages in order; each writes its artefacts into ``out_dir`` and a stage whose
    outputs exist is not redone (delete them to rebuild). Returns ``regime.json``'s content.

    Stages: ``pt`` (tune the soft prompt -> ``soft_prompt/``), ``splits`` (``dev.jsonl``,
    ``test.jsonl``), ``dev`` / ``test`` (base and PT answers -> ``answers_<split>_{base,pt}.jsonl``
    and the regime numbers in ``regime.json``), ``calibrate`` (DPC calibrated on dev ->
    ``dpc_config.json`` + ``calibration.json``). ``iap_pool.json`` is always written.
    """
    from ..model import load_model
    from ..soft_prompt import SoftPrompt
    from ..tasks import get_task
    from ..tasks.io import write_jsonl

    d = out_dir or real_data_dir()
    os.makedirs(d, exist_ok=True)
    _write_json(os.path.join(d, "iap_pool.json"), list(IAP_POOL))
    regime_path = os.path.join(d, "regime.json")
    report: dict[str, Any] = {}
    if os.path.exists(regime_path):
        with open(regime_path, encoding="utf-8") as fh:
            report = json.load(fh)
    report["build"] = BUILD
    timings = report.setdefault("timings_s", {})
    t_load = time.perf_counter()
    model = load_model("smollm2")
    timings["load_model"] = round(time.perf_counter() - t_load, 1)
    template = _template(model)
    sp_dir = os.path.join(d, "soft_prompt")

    if "pt" in stages and not os.path.exists(os.path.join(sp_dir, "adapter_config.json")):
        from ..prompt_tuning import PromptTuningConfig, train_soft_prompt

        t0 = time.perf_counter()
        tr = BUILD["train"]
        train = make_real_mixture("train", tr["n"], tr["seed"], tr["gym_share"])
        dev_loss = make_real_mixture("train_dev", tr["dev_loss_n"], tr["seed"] + 100, tr["gym_share"])
        cfg = PromptTuningConfig(template=template, **BUILD["prompt_tuning"])
        res = train_soft_prompt(model, train, cfg, dev_examples=dev_loss, progress=progress)
        res.save_adapter(sp_dir, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
        timings["prompt_tuning"] = round(time.perf_counter() - t0, 1)
        report["prompt_tuning"] = {"best_step": res.best_step, "best_dev_loss": res.best_dev_loss,
                                   "steps_done": res.steps_done}
        _write_json(regime_path, report)
    soft = SoftPrompt.from_peft(sp_dir) if os.path.exists(sp_dir) else None

    paths = {s: os.path.join(d, f"{s}.jsonl") for s in ("dev", "test")}
    if "splits" in stages:
        for s, p in paths.items():
            if not os.path.exists(p):
                write_jsonl(p, _split(s))
    for s in ("dev", "test"):
        if s not in stages or not os.path.exists(paths[s]) or soft is None:
            continue
        t0 = time.perf_counter()
        exs = get_task("arith").load(paths[s])
        base = _correctness(model, None, exs, os.path.join(d, f"answers_{s}_base.jsonl"), progress=progress)
        pt = _correctness(model, soft, exs, os.path.join(d, f"answers_{s}_pt.jsonl"), progress=progress)
        report[s] = regime(base, pt, [e.meta.get("source", "?") for e in exs])
        timings[f"regime_{s}"] = round(time.perf_counter() - t0, 1)
        _write_json(regime_path, report)
        print(s, json.dumps(report[s]), flush=True)
        if s == "dev" and "calibrate" in stages and soft is not None \
                and not os.path.exists(os.path.join(d, "dpc_config.json")):
            from ..dpc import CalibrationGrid, DPCConfig, calibrate_dpc

            t0 = time.perf_counter()
            g = BUILD["calibration_grid"]
            grid = CalibrationGrid(top_k=tuple(g["top_k"]), shallow_layers=_specs(g["shallow_layers"]),
                                   deep_layers=_specs(g["deep_layers"]), sink=tuple(g["sink"]))
            base_cfg = DPCConfig(template=template, add_bos=False, generation=_generation_config(),
                                 baselines=("base", "always", "random"), random_draws=3)
            run_dir = os.path.join(d, "calibration_run")  # resumable progress, removed once saved
            cal = calibrate_dpc(model, soft, exs, get_task("arith"), base_cfg, grid, progress=progress,
                                out_dir=run_dir, resume=True)
            cal.save(d)
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            timings["calibrate"] = round(time.perf_counter() - t0, 1)
            report["calibration"] = {k: cal.to_dict()[k] for k in (
                "best_point", "best_accuracy", "pt_accuracy", "corruption_oracle_accuracy",
                "best_trigger_rate", "n_generations")}
            _write_json(regime_path, report)
    return report


def regime_from_records(records_path: str, split: str = "test", out_dir: str | None = None) -> dict:
    """Fill ``regime.json[split]`` from the per-question records of an evidence run
    (``benchmarks/evidence_table.py --testbed real`` writes ``<out>.records.jsonl`` with the
    base and PT verdicts of every question, from the same prompts and decoding), instead of
    generating both answers a second time. Only the split's questions are counted, in order."""
    from ..tasks import get_task

    d = out_dir or real_data_dir()
    exs = get_task("arith").load(os.path.join(d, f"{split}.jsonl"))
    from ..runs import read_records

    recs: dict[str, dict] = {r["id"]: r for r in read_records(records_path)}
    done = [e for e in exs if e.id in recs]
    if not done:
        raise RuntimeError(f"{records_path} has no question of {split}.jsonl")
    out = regime([recs[e.id]["base"] for e in done], [recs[e.id]["pt"] for e in done],
                 [e.meta.get("source", "?") for e in done])
    out["from"] = f"{os.path.basename(records_path)}: the first {len(done)} of {len(exs)} questions"
    path = os.path.join(d, "regime.json")
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    report[split] = out
    _write_json(path, report)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpc_lens.testbed.real", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="base zero-shot accuracy of the candidate parts")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("probe-pt", help="base and PT on candidate gym parts (needs the adapter)")
    q.add_argument("--n", type=int, default=60)
    q.add_argument("--out", default=None)
    q.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("regime-from-records", help="regime.json's test numbers from evidence records")
    r.add_argument("records")
    r.add_argument("--split", default="test")
    b = sub.add_parser("build", help="tune, write splits, measure the regime, calibrate DPC")
    b.add_argument("--out-dir", default=None, help="default: dpc_lens/data/real")
    b.add_argument("--stages", default="pt,splits,dev,calibrate,test",
                   help="comma-separated subset of pt,splits,dev,calibrate,test")
    b.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        probe(args.n, out=args.out, progress=not args.no_progress)
    elif args.cmd == "probe-pt":
        probe_pt(args.n, out=args.out, progress=not args.no_progress)
    elif args.cmd == "regime-from-records":
        print(json.dumps(regime_from_records(args.records, args.split), indent=2))
    else:
        out = build(args.out_dir, stages=[x.strip() for x in args.stages.split(",") if x.strip()],
                    progress=not args.no_progress)
        print(json.dumps({k: out.get(k) for k in ("dev", "test", "calibration", "timings_s")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
