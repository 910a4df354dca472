"""IAP on the real test bed: SmolLM2-135M-Instruct (no soft prompt) with the 10 zero-shot CoT
prompts of ``dpc_lens/data/real/iap_pool.json``; standardiser and lam/tau/m calibrated on dev,
every strategy evaluated on test.

Every (question, prompt) pair costs one generation and one saliency pass (~2 CPU-s on SmolLM2),
so the pairs are computed in slices that can run side by side, one torch thread each, and are
resumable::

    python benchmarks/evidence_iap_real.py pairs --split dev  --start 0   --stop 100
    python benchmarks/evidence_iap_real.py pairs --split test --start 0   --stop 200
    python benchmarks/evidence_iap_real.py pairs --split test --start 200 --stop 300
    python benchmarks/evidence_iap_real.py finish --dev 100 --test 300

``pairs`` writes ``benchmarks/results/iap_real/parts/<split>-<start>-<stop>/pairs.jsonl``;
``finish`` gathers the parts into ``iap_real/{dev,test}/pairs.jsonl`` (every pair is then
reused, nothing is generated twice), calibrates on dev (:func:`dpc_lens.iap.calibrate_iap`),
evaluates on test (:func:`dpc_lens.iap.run_iap` with the dev standardiser) and writes
``benchmarks/results/evidence_iap_real.json``: every single prompt, plain majority vote,
IAP-ss, IAP-mv (with generations and backward passes per question) and the oracle, each with
a paired-bootstrap 95% interval of its difference against the zero-shot CoT baseline
("Let's think step by step.") and against the single prompt that was best on dev, and
``score_diagnostics``, ``degenerate`` and ``warnings`` as :func:`dpc_lens.iap.run_iap`'s
summary gives them (:mod:`dpc_lens.iap.diagnostics`: within-question and pooled AUC of each
standardised flow and of the calibrated score, with bootstrap intervals over questions; what the
calibrated config reduces to), and the same for dev.

The committed ``iap_real/{dev,test}/pairs.jsonl.gz`` hold every pair (rationale, per-layer
flows, verdict); ``gunzip`` them in place and ``finish`` re-evaluates without generating
anything (``resume`` reuses every pair; the ``parts`` directory is not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

import torch

from dpc_lens.generation import GenerationConfig
from dpc_lens.iap import IAPRunConfig, PromptPool, calibrate_iap, run_iap
from dpc_lens.iap.diagnostics import paired_differences
from dpc_lens.model import load_model
from dpc_lens.tasks import get_task
from dpc_lens.testbed.real import BUILD, real_data_dir

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.join(RESULTS, "iap_real")
BASELINE = "Let's think step by step."


def run_config() -> IAPRunConfig:
    """The pairs' settings: greedy, the build's answer length, the model's chat template (its
    own system turn, no extra BOS, as the DPC test bed), the prompt on its own line after the
    question's answer instruction; default layer sets (question->prompt layers [0, 1/3),
    rationale flows over the deep third)."""
    gen = GenerationConfig(max_new_tokens=BUILD["max_new_tokens"], batch_size=BUILD["batch_size"])
    return IAPRunConfig(generation=gen, add_bos=False, chat_template="auto", separator="\n",
                        saliency_batch_size=BUILD["batch_size"])


def _examples(split: str):
    return get_task("arith").load(os.path.join(real_data_dir(), f"{split}.jsonl"))


def _pool() -> PromptPool:
    return PromptPool.from_file(os.path.join(real_data_dir(), "iap_pool.json"))


def cmd_pairs(split: str, start: int, stop: int, progress: bool) -> None:
    exs = _examples(split)[start:stop]
    model = load_model("smollm2")
    t0 = time.perf_counter()
    out = os.path.join(ROOT, "parts", f"{split}-{start}-{stop}")
    _, summary = run_iap(model, exs, get_task("arith"), _pool(), run_config(), out_dir=out, resume=True,
                         progress=progress)
    print(json.dumps({"part": out, "n": len(exs), "wall_s": round(time.perf_counter() - t0, 1),
                      "this_run": summary["this_run"]}), flush=True)


def _gather(split: str) -> None:
    """Concatenate the parts' pairs of ``split`` into ``ROOT/<split>/pairs.jsonl`` (resume then
    reuses every one of them; duplicates are dropped by the reader). Without parts (a fresh
    clone), the existing ``pairs.jsonl`` is used as it is."""
    parts_dir = os.path.join(ROOT, "parts")
    if not os.path.isdir(parts_dir) and os.path.exists(os.path.join(ROOT, split, "pairs.jsonl")):
        return
    parts = sorted(d for d in os.listdir(parts_dir) if d.startswith(split + "-"))
    dst = os.path.join(ROOT, split)
    os.makedirs(dst, exist_ok=True)
    settings = None
    with open(os.path.join(dst, "pairs.jsonl"), "w", encoding="utf-8") as out:
        for p in parts:
            d = os.path.join(ROOT, "parts", p)
            with open(os.path.join(d, "pair_settings.json"), encoding="utf-8") as fh:
                s = json.load(fh)
            if settings is not None and s != settings:
                raise SystemExit(f"{d} was made with other pair settings than the other parts")
            settings = s
            with open(os.path.join(d, "pairs.jsonl"), encoding="utf-8") as fh:
                shutil.copyfileobj(fh, out)
    if settings is None:
        raise SystemExit(f"no part of {split} under {ROOT}/parts: run the `pairs` command first")
    shutil.copy(os.path.join(ROOT, "parts", parts[0], "pair_settings.json"), dst)


def cmd_finish(n_dev: int, n_test: int, progress: bool) -> dict:
    t0 = time.perf_counter()
    for split in ("dev", "test"):
        _gather(split)
    task, pool, cfg = get_task("arith"), _pool(), run_config()
    dev, test = _examples("dev")[:n_dev], _examples("test")[:n_test]
    model = load_model("smollm2")
    fit = calibrate_iap(model, dev, task, pool, cfg, out_dir=os.path.join(ROOT, "dev"), resume=True,
                        progress=progress)
    _, summary = run_iap(model, test, task, pool, fit.config, calibration=fit,
                         out_dir=os.path.join(ROOT, "test"), resume=True, progress=progress)
    with open(os.path.join(ROOT, "test", "questions.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    texts = [p.text for p in pool]
    cal = fit.calibration
    refs_used = summary["reference_prompts"]  # the library's: the first prompt, the best on dev
    best_dev = refs_used["best_single"]
    if refs_used["first"] != BASELINE or refs_used["best_single_chosen_on"] != "dev":
        raise SystemExit(f"unexpected reference prompts {refs_used}: the pool must start with {BASELINE!r}")
    # IAP-ss, IAP-mv, majority and the oracle: the library's own paired differences (run_iap's
    # summary); each single prompt through the same function, on the same questions
    singles = {f"single: {t}": [r["correct"][k] for r in rows] for k, t in enumerate(texts)}
    refs = {"vs_first_prompt": singles[f"single: {BASELINE}"],
            "vs_best_single": singles[f"single: {best_dev}"]}
    diffs = {**paired_differences(singles, refs), **{
        name: summary["paired_differences"][key] for name, key in
        (("majority vote", "majority"), ("IAP-ss", "iap_ss"), ("IAP-mv", "iap_mv"),
         ("oracle (some prompt right)", "oracle"))}}
    acc = summary["accuracy"]
    accuracy = {**{f"single: {t}": acc["single"][t] for t in texts}, "majority vote": acc["majority"],
                "IAP-ss": acc["iap_ss"], "IAP-mv": acc["iap_mv"], "oracle (some prompt right)": acc["oracle"]}
    cost = summary["cost_per_question"]
    table = []
    for name, a in accuracy.items():
        row = {"method": name, "accuracy": a,
               "vs_cot": diffs[name]["vs_first_prompt"], "vs_best_dev_single": diffs[name]["vs_best_single"]}
        key = {"majority vote": "majority", "IAP-ss": "iap_ss", "IAP-mv": "iap_mv"}.get(name, "single")
        if not name.startswith("oracle"):
            row["generations_per_question"] = cost[key]["generations"]
            row["backward_passes_per_question"] = cost[key]["backward_passes"]
        table.append(row)
    result = {
        "what": ("IAP on SmolLM2-135M-Instruct (no soft prompt), the 10 zero-shot CoT prompts of "
                 "dpc_lens/data/real/iap_pool.json after each question; standardiser and lam/tau/m "
                 "calibrated on the first n_dev dev questions, evaluated on the first n_test test "
                 "questions of dpc_lens/data/real"),
        "n_dev": len(dev), "n_test": len(test),
        "run_config": run_config().to_dict(),
        "chosen": {"iap_ss": cal.best_ss, "iap_mv": cal.best_mv},
        "dev": {"baselines": cal.baselines, "best_single_prompt": best_dev},
        "table": table,
        "score_diagnostics": summary["score_diagnostics"],
        "degenerate": summary["degenerate"],
        "warnings": summary["warnings"],
        "dev_score_diagnostics": cal.score_diagnostics,
        "dev_degenerate": cal.degenerate,
        "mean_prompts_tried_ss": summary["mean_prompts_tried_ss"],
        "iap_ss_fallback_rate": summary["iap_ss_fallback_rate"],
        "kv_cache_used": summary["kv_cache_used"],
        "baselines_for_intervals": {"vs_cot": BASELINE, "vs_best_dev_single": best_dev},
        "bootstrap": "paired, 2000 resamples of the test questions, 95% percentile interval",
        "device": "cpu", "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "finish_wall_s": round(time.perf_counter() - t0, 1),
    }
    with open(os.path.join(RESULTS, "evidence_iap_real.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    """The README's table and the score diagnostics, from the evidence JSON alone."""
    def ci(v):
        return f"{100 * v['diff']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]"

    best = result["baselines_for_intervals"]["vs_best_dev_single"]
    lines = [f"IAP on SmolLM2-135M-Instruct, n = {result['n_test']} test questions "
             f"(calibrated on {result['n_dev']} dev)", "",
             f"| method | accuracy | vs 'Let's think step by step.' [95% CI] | vs {best!r} (best on dev) "
             "[95% CI] | gens / bwd per question |",
             "|---|---|---|---|---|"]
    for r in result["table"]:
        cost = (f"{r['generations_per_question']:.2f} / {r['backward_passes_per_question']:.2f}"
                if "generations_per_question" in r else "-")
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f} | {ci(r['vs_cot'])} | "
                     f"{ci(r['vs_best_dev_single'])} | {cost} |")
    for split, key in (("test", "score_diagnostics"), ("dev", "dev_score_diagnostics")):
        lines += ["", f"Within-question / pooled AUC on {split} [95% CI over questions]:", "",
                  "| score | within-question AUC | (right, wrong) pairs | pooled AUC |", "|---|---|---|---|"]
        for name, d in (result.get(key) or {}).items():
            w, p = d["within_question_ci95"], d["pooled_ci95"]
            lines.append(f"| {name} | {d['within_question_auc']:.3f} [{w[0]:.3f}, {w[1]:.3f}] | "
                         f"{d['within_question_pairs']} | {d['pooled_auc']:.3f} [{p[0]:.3f}, {p[1]:.3f}] |")
    lines.append("")
    for split, key in (("test", "degenerate"), ("dev", "dev_degenerate")):
        for line in (result.get(key) or {}).values():
            lines.append(f"- degenerate ({split}): {line}")
    for line in result.get("warnings") or ():
        lines.append(f"- warning: {line}")
    return "\n".join(lines)


def main(argv=None) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pairs")
    p.add_argument("--split", choices=["dev", "test"], required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, required=True)
    f = sub.add_parser("finish")
    f.add_argument("--dev", type=int, default=100)
    f.add_argument("--test", type=int, default=300)
    for s in (p, f):
        s.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "pairs":
        cmd_pairs(a.split, a.start, a.stop, not a.no_progress)
    else:
        cmd_finish(a.dev, a.test, not a.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
