"""The papers' analyses on the real test bed (SmolLM2-135M-Instruct + its tuned soft prompt).

Inputs, each made by a resumable run (one torch thread each)::

    dpc-lens demo --testbed real --limit 100 --out benchmarks/results/dpc_real_analysis --plots
        # DPC records with per-layer flows of 100 test questions, and the standard figures
    python benchmarks/evidence_table.py --testbed real --no-variants --random-draws 3
        # 600 test questions: accumulation / deep-flow-change / deep soft->rationale per question
    python benchmarks/analysis_real.py flows --start 100 --stop 200   # and 200..300
        # per-layer flows of more test questions (PT generation + one saliency pass each)
    python benchmarks/analysis_real.py heads --n 24
        # IAP pairs with per-head flows for a good and a bad prompt (iap_real/heads/)
    python benchmarks/analysis_real.py instance
        # one fired test instance: full saliency map and DPC layer x head maps (figures only)
    python benchmarks/analysis_real.py report
        # benchmarks/results/analysis_real.json + the real-model figures in docs/figures/

What ``report`` measures:

* per-layer soft->question, soft->rationale and question->rationale (DPC Fig. 3 / SPEC 3): mean
  and its bootstrap interval per layer, the peak layer of each flow, and whether soft->question
  is strongest in the shallow layers (the DPC paper reports layers 2-10 of its 32-layer models);
* the accumulation x deep-flow-change contingency (DPC Fig. 5 left) over the 600 evidence
  questions;
* deep soft->rationale flow for PT-correct vs PT-wrong answers (DPC Fig. 5 middle), with a
  bootstrap interval of the difference of means;
* IAP's three flows per layer x head for a good ("Let's think step by step.") and a bad
  ("Don't think. Just feel.") prompt, with the layer-set means IAP scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

from dpc_lens.iap import PromptPool, run_iap
from dpc_lens.model import as_adapter, load_model
from dpc_lens.tasks import get_task
from dpc_lens.testbed.real import artefacts, real_data_dir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evidence_iap_real import run_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FIGURES = os.path.join(HERE, "..", "docs", "figures")
DPC_RUN = os.path.join(RESULTS, "dpc_real_analysis")
HEADS = os.path.join(RESULTS, "iap_real", "heads")
GOOD, BAD = "Let's think step by step.", "Don't think. Just feel."


def _boot_mean(x: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    g = np.random.default_rng(seed)
    idx = g.integers(0, len(x), size=(n, len(x)))
    m = np.sort(x[idx].mean(1))
    return [float(m[int(0.025 * n)]), float(m[int(0.975 * n) - 1])]


def cmd_heads(n: int, progress: bool) -> None:
    """Per-head flows (a second saliency pass per pair) for the good and the bad prompt on the
    first ``n`` test questions, with the evidence run's other pair settings."""
    from dataclasses import replace

    exs = get_task("arith").load(os.path.join(real_data_dir(), "test.jsonl"))[:n]
    model = load_model("smollm2")
    cfg = replace(run_config(), per_head=True)
    run_iap(model, exs, get_task("arith"), PromptPool([GOOD, BAD]), cfg, out_dir=HEADS, resume=True,
            progress=progress)


def cmd_instance() -> None:
    """One test instance whose trigger fired, on the real model: its full saliency map over the
    shallow layers with the located soft column (``saliency_heatmap.png``) and the DPC flows per
    layer x head (``head_maps.png``)."""
    from dpc_lens import PromptBatch, SaliencyConfig, SegmentLayout, compute_saliency
    from dpc_lens.dpc import DPCConfig, analyse, dynamic_trigger, read_dpc_records
    from dpc_lens.plotting import plot_head_maps, plot_saliency_heatmap, save
    from dpc_lens.soft_prompt import SoftPrompt

    art = artefacts()
    recs = read_dpc_records(os.path.join(DPC_RUN, "records.jsonl"))
    rec = next(r for r in recs if r.trigger and r.trigger.get("fired"))
    model = load_model(art["model"])
    adapter = as_adapter(model)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    cfg = DPCConfig.load(art["config"])
    a = analyse(model, soft, [rec.question], cfg, progress=False)[0]
    decision = dynamic_trigger(a.inputs, cfg.detector)
    ids = list(a.prompt_ids) + list(a.generation.token_ids)
    n_prompt = len(a.prompt_ids)
    layout = SegmentLayout({"question": (0, n_prompt), "rationale": (n_prompt, len(ids))}, len(ids))
    batch = PromptBatch.build(adapter, [ids], [layout], soft)
    full = compute_saliency(model, batch, SaliencyConfig(loss_segments=("rationale",), keep_full=True))
    save(plot_saliency_heatmap(full, 0, layers=decision.shallow_layers, marked=decision),
         os.path.join(FIGURES, "saliency_heatmap.png"))
    heads = compute_saliency(model, batch, SaliencyConfig(loss_segments=("rationale",), per_head=True))
    save(plot_head_maps(heads), os.path.join(FIGURES, "head_maps.png"))
    with open(os.path.join(RESULTS, "analysis_real_instance.json"), "w", encoding="utf-8") as fh:
        json.dump({"id": rec.id, "question": rec.question, "rationale": a.generation.text,
                   "reason": decision.reason, "located": list(decision.accumulation.top_indices),
                   "shallow_layers": list(decision.shallow_layers)}, fh, indent=1)


def cmd_flows(start: int, stop: int) -> None:
    """Per-layer DPC flows of the PT generation for test questions ``start:stop`` (generation +
    one saliency pass each, no corrupted regeneration), appended to
    ``analysis_flows/<start>-<stop>.jsonl``; the PT verdict is checked against the evidence run's."""
    from dpc_lens.dpc import DPCConfig, analyse
    from dpc_lens.evaluation import grade
    from dpc_lens.soft_prompt import SoftPrompt

    art = artefacts()
    task = get_task(art["task"])
    exs = task.load(art["test"])[start:stop]
    model = load_model(art["model"])
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    cfg = DPCConfig.load(art["config"])
    ev = {}
    for line in open(os.path.join(RESULTS, "evidence_real.json.records.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        ev[r["id"]] = r
    out = os.path.join(RESULTS, "analysis_flows", f"{start}-{stop}.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for a, e in zip(analyse(model, soft, [e.question for e in exs], cfg), exs, strict=True):
            _, correct = grade(task, a.generation.text, e)
            if correct != ev[e.id]["pt"]:
                raise SystemExit(f"{e.id}: PT verdict {correct} differs from the evidence run's")
            flows = {k: [float(x) for x in v] for k, v in a.flows.items()}
            fh.write(json.dumps({"id": e.id, "pt_correct": correct, "flows": flows}) + "\n")


def _flows_300() -> list[dict]:
    """``{id, pt_correct, flows}`` of every test question with flows: the 100-question DPC run's
    records, then the ``flows`` parts (later questions)."""
    from dpc_lens.dpc import read_dpc_records

    rows = [{"id": r.id, "pt_correct": r.pt.correct, "flows": dict(r.flows)}
            for r in read_dpc_records(os.path.join(DPC_RUN, "records.jsonl")) if not r.skipped and r.flows]
    d = os.path.join(RESULTS, "analysis_flows")
    seen = {r["id"] for r in rows}
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        for line in open(os.path.join(d, name), encoding="utf-8"):
            r = json.loads(line)
            if r["id"] not in seen and r["flows"]:
                rows.append(r)
                seen.add(r["id"])
    return rows


def _share_correct_vs_wrong(rows: list[dict], layers: list[int]) -> dict:
    """Share of soft->rationale among the three DPC flows per layer, averaged over ``layers``,
    PT-correct vs PT-wrong."""
    names = ("soft->question", "soft->rationale", "question->rationale")
    vals = {True: [], False: []}
    for r in rows:
        f = np.array([r["flows"][n] for n in names], dtype=np.float64)[:, layers]
        vals[bool(r["pt_correct"])].append(float(np.nanmean(f[1] / f.sum(0))))
    return _two_groups(np.array(vals[True]), np.array(vals[False]))


class _Flows:
    """A record-like holder of per-layer flows (what :func:`_per_layer` reads)."""

    def __init__(self, flows):
        self.flows = flows


def _per_layer(records) -> dict:
    names = ("soft->question", "soft->rationale", "question->rationale")
    rs = [r for r in records if r.flows]
    out: dict = {"n": len(rs)}
    for name in names:
        v = np.array([r.flows[name] for r in rs], dtype=np.float64)  # [instance, layer]
        mean = v.mean(0)
        n_layers = v.shape[1]
        third = max(1, n_layers // 3)
        out[name] = {
            "mean_per_layer": mean.tolist(),
            "ci95_per_layer": [_boot_mean(v[:, layer]) for layer in range(n_layers)],
            "peak_layer": int(mean.argmax()),
            "shallow_third_mean": float(mean[:third].mean()),
            "middle_third_mean": float(mean[third:2 * third].mean()),
            "deep_third_mean": float(mean[2 * third:].mean()),
            "layers_2_10_share": float(mean[2:11].sum() / mean.sum()),
            "top3_layers": [int(x) for x in np.argsort(-mean)[:3]],
        }
    return out


def _correct_vs_wrong(evidence_records: list[dict]) -> dict:
    ok = np.array([r["deep_soft_to_rationale"] for r in evidence_records if r["pt"]
                   and r.get("deep_soft_to_rationale") is not None])
    bad = np.array([r["deep_soft_to_rationale"] for r in evidence_records if not r["pt"]
                    and r.get("deep_soft_to_rationale") is not None])
    return _two_groups(ok, bad)


def _two_groups(ok: np.ndarray, bad: np.ndarray) -> dict:
    """Means and medians of the PT-correct and PT-wrong groups, and a bootstrap 95% interval of
    the difference of means (each group resampled on its own, 2000 times)."""
    g = np.random.default_rng(0)
    diffs = np.sort([g.choice(bad, len(bad)).mean() - g.choice(ok, len(ok)).mean() for _ in range(2000)])
    return {"pt_correct": {"n": len(ok), "mean": float(ok.mean()), "median": float(np.median(ok))},
            "pt_wrong": {"n": len(bad), "mean": float(bad.mean()), "median": float(np.median(bad))},
            "wrong_minus_correct_mean": float(bad.mean() - ok.mean()),
            "ci95": [float(diffs[50]), float(diffs[1949])]}


def _dpc_vs_controls(evidence_records: list[dict]) -> dict:
    """Paired-bootstrap intervals of DPC against the two corruption controls on the same
    questions: corrupt the located token always, and corrupt random tokens (per question, the
    mean over the draws)."""
    from dpc_lens.evaluation import paired_bootstrap

    dpc = [float(r["rows"]["DPC, calibrated trigger"]) for r in evidence_records]
    out = {}
    for name, xs in (("always", [float(r["always"]) for r in evidence_records]),
                     ("random", [sum(map(float, r["random"])) / len(r["random"]) for r in evidence_records]),
                     ("pt", [float(r["pt"]) for r in evidence_records])):
        d, lo, hi = paired_bootstrap(dpc, xs)
        out[f"dpc_minus_{name}"] = {"diff": d, "ci95": [lo, hi]}
    fired = [r for r in evidence_records if r["fired"]["DPC, calibrated trigger"]]
    out["fired"] = {"n": len(fired), "wrong_to_right": sum(1 for r in fired if not r["pt"]
                                                          and r["rows"]["DPC, calibrated trigger"]),
                    "right_to_wrong": sum(1 for r in fired if r["pt"]
                                          and not r["rows"]["DPC, calibrated trigger"])}
    return out


def _head_maps() -> dict:
    """Mean per-head flows of each prompt over the questions, from the heads run's pairs."""
    pairs = [json.loads(line) for line in open(os.path.join(HEADS, "pairs.jsonl"), encoding="utf-8")]
    out = {}
    for prompt in (GOOD, BAD):
        ps = [p for p in pairs if p["prompt"] == prompt and p.get("flows_per_head")]
        maps = {f: np.mean([p["flows_per_head"][f] for p in ps], axis=0) for f in ps[0]["flows_per_head"]}
        out[prompt] = {"n": len(ps), "accuracy_on_these": float(np.mean([p["correct"] for p in ps])),
                       "maps": {f: m.tolist() for f, m in maps.items()},
                       "flow_means": {f: float(np.mean([p["flow_means"][f] for p in ps]))
                                      for f in ps[0]["flow_means"]},
                       "peak": {f: [int(i) for i in np.unravel_index(np.argmax(m), m.shape)]
                                for f, m in maps.items()}}
    return out


def _plot_iap_heads(heads: dict, path: str) -> None:
    from dpc_lens.plotting import save
    from dpc_lens.plotting._figure import _figure

    flows = list(heads[GOOD]["maps"])
    fig, axes = _figure(2, len(flows), (4.2 * len(flows), 7.2), squeeze=False)
    for row, prompt in enumerate((GOOD, BAD)):
        for col, f in enumerate(flows):
            ax = axes[row][col]
            m = np.array(heads[prompt]["maps"][f])
            im = ax.imshow(m, aspect="auto", cmap="magma", interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.85, format="%.2g")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{f}\n{prompt!r} (n={heads[prompt]['n']})", fontsize=8)
    fig.suptitle("IAP flows per layer x head on SmolLM2-135M-Instruct, good vs bad prompt", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def cmd_report() -> dict:
    from dpc_lens.dpc import read_dpc_records

    recs = [r for r in read_dpc_records(os.path.join(DPC_RUN, "records.jsonl")) if not r.skipped]
    ev = json.load(open(os.path.join(RESULTS, "evidence_real.json"), encoding="utf-8"))
    ev_recs = [json.loads(line) for line in open(os.path.join(RESULTS, "evidence_real.json.records.jsonl"),
                                                 encoding="utf-8")]
    report = {
        "what": ("the DPC and IAP papers' analyses on SmolLM2-135M-Instruct (30 layers) + its tuned "
                 "soft prompt"),
        "per_layer_flows": {"source": "benchmarks/results/dpc_real_analysis (first 100 test questions)",
                            **_per_layer(recs)},
        "contingency_fig5": {"source": f"evidence_real.json, n = {ev['n']}", **ev["contingency_fig5"]},
        "dpc_vs_controls": {"source": f"evidence_real.json records, n = {len(ev_recs)}",
                            **_dpc_vs_controls(ev_recs)},
        "deep_soft_to_rationale_correct_vs_wrong": {
            "source": f"evidence_real.json records, layers {ev['deep_soft_to_rationale_flow']['layers']}",
            **_correct_vs_wrong(ev_recs)},
    }
    from dpc_lens.plotting.dpc import correct_wrong_data

    for kind in ("raw", "proportion"):
        d = correct_wrong_data(recs, proportions=kind == "proportion")
        report[f"deep_soft_to_rationale_correct_vs_wrong_{kind}_100"] = {
            "source": f"dpc_real_analysis records (n = {len(recs)}), layers {list(d['layers'])}, "
                      + ("share of soft->rationale among the three DPC flows per layer"
                         if kind == "proportion" else "mean saliency"),
            **_two_groups(d["correct"], d["wrong"])}
    rows = _flows_300()
    if len(rows) > len(recs):
        layers = list(correct_wrong_data(recs, proportions=True)["layers"])
        check = _share_correct_vs_wrong(rows[:len(recs)], layers)
        lib = report["deep_soft_to_rationale_correct_vs_wrong_proportion_100"]
        assert abs(check["pt_wrong"]["mean"] - lib["pt_wrong"]["mean"]) < 1e-12, "two routes disagree"
        report[f"deep_soft_to_rationale_correct_vs_wrong_proportion_{len(rows)}"] = {
            "source": (f"first {len(rows)} test questions (dpc_real_analysis + analysis_flows), "
                       f"layers {layers}"),
            **_share_correct_vs_wrong(rows, layers)}
        report["per_layer_flows_all"] = {"source": f"first {len(rows)} test questions",
                                         **_per_layer([_Flows(r["flows"]) for r in rows])}
    if os.path.exists(os.path.join(HEADS, "pairs.jsonl")):
        heads = _head_maps()
        report["iap_head_maps"] = {"source": "benchmarks/results/iap_real/heads", **heads}
        _plot_iap_heads(heads, os.path.join(FIGURES, "iap_head_maps.png"))
    for name in ("flow_curves.png", "flow_curves_raw.png", "correct_vs_wrong.png", "contingency.png",
                 "before_after.png"):
        src = os.path.join(DPC_RUN, "figures", name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(FIGURES, name))
    trig = sorted(f for f in os.listdir(os.path.join(DPC_RUN, "figures")) if f.startswith("trigger_"))
    if trig:
        shutil.copy(os.path.join(DPC_RUN, "figures", trig[0]), os.path.join(FIGURES, "trigger_example.png"))
    with open(os.path.join(RESULTS, "analysis_real.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    pl = report["per_layer_flows"]
    for f in ("soft->question", "soft->rationale", "question->rationale"):
        d = pl[f]
        print(f"{f}: peak layer {d['peak_layer']} (top3 {d['top3_layers']}); thirds "
              f"{d['shallow_third_mean']:.3g} / {d['middle_third_mean']:.3g} / {d['deep_third_mean']:.3g}; "
              f"layers 2-10 hold {100 * d['layers_2_10_share']:.0f}%")
    for k in ("deep_soft_to_rationale_correct_vs_wrong", "deep_soft_to_rationale_correct_vs_wrong_raw_100",
              "deep_soft_to_rationale_correct_vs_wrong_proportion_100", "dpc_vs_controls"):
        print(k, json.dumps({x: y for x, y in report[k].items() if x != "source"}))
    return report


def main(argv=None) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fl = sub.add_parser("flows")
    fl.add_argument("--start", type=int, required=True)
    fl.add_argument("--stop", type=int, required=True)
    h = sub.add_parser("heads")
    h.add_argument("--n", type=int, default=24)
    h.add_argument("--no-progress", action="store_true")
    sub.add_parser("instance")
    sub.add_parser("report")
    a = ap.parse_args(argv)
    if a.cmd == "heads":
        cmd_heads(a.n, not a.no_progress)
    elif a.cmd == "flows":
        cmd_flows(a.start, a.stop)
    elif a.cmd == "instance":
        cmd_instance()
    else:
        cmd_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
