"""The evidence table: does DPC beat vanilla prompt tuning on the shipped test bed?

One prompt-tuned generation and one saliency pass per test question are shared by every row;
each DPC variant only re-runs the (cheap) detector on the cached tensors and generates the
corrupted prompts it needs (each distinct ``(question, corrupted rows)`` pair once).

Rows: base model (no soft prompt), vanilla PT, DPC with the calibrated config, DPC variants
(raw vs normalised statistics, k = 1, 2, 3), corruption on every instance (the located top-k),
random corruption of the same number of tokens (mean over seeded draws, with its spread, as
the demo reports it), and the oracle (best of base / PT per
question). Each row reports accuracy and the paired-bootstrap 95% interval of its difference
against vanilla PT (same resampled questions for both, 2000 resamples). Also: the ceiling
(right without the prompt, wrong with it), the accumulation x deep-flow-change contingency
(the paper's Fig. 5), and the deep soft->rationale flow in correct vs wrong PT answers.

Usage: ``python benchmarks/evidence_table.py [--limit N]``; writes
``benchmarks/results/evidence_arith.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from dpc_lens.demo import DEMO_RANDOM_DRAWS, shipped_artefacts
from dpc_lens.dpc import accumulation_deepflow_contingency, dynamic_trigger, resolve_layers
from dpc_lens.dpc import DPCConfig, analyse, encode_questions, random_rows_for
from dpc_lens.evaluation import grade
from dpc_lens.generation import generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.patching import corrupt_soft_prompt
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import get_task, load_examples


def paired_bootstrap(a: list[bool], b: list[bool], n: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its 95% percentile interval over questions resampled with replacement."""
    x = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (n, len(x)), generator=g)
    means = x[idx].mean(1).sort().values
    return float(x.mean()), float(means[int(0.025 * n)]), float(means[int(0.975 * n) - 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "evidence_arith.json"))
    args = ap.parse_args(argv)
    art = shipped_artefacts()
    if art is None:
        raise SystemExit("the shipped reasoner / soft prompt / test set are missing from dpc_lens/data")
    t0 = time.perf_counter()
    model = load_model(art["model"])
    adapter = as_adapter(model)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    task = get_task("arith")
    exs = load_examples(art["test"], task)[: args.limit]
    cfg = DPCConfig.load(art["config"]) if os.path.exists(art["config"]) else DPCConfig()
    prompts = encode_questions(adapter, [e.question for e in exs], cfg)

    def correct(gens):
        return [grade(task, g.text, e)[1] for g, e in zip(gens, exs)]

    pt_gen = generate(adapter, prompts, soft, cfg.generation, desc="PT")
    base_gen = generate(adapter, prompts, None, cfg.generation, desc="base")
    analyses = analyse(adapter, soft, [e.question for e in exs], cfg, generations=pt_gen)
    pt, base = correct(pt_gen), correct(base_gen)
    memo: dict[tuple[int, tuple[int, ...]], bool] = {}

    def corrupted_correct(rows_per_ex: list[list[int]]) -> list[bool]:
        need = [(i, tuple(r)) for i, r in enumerate(rows_per_ex) if r and (i, tuple(r)) not in memo]
        if need:
            gens = generate(adapter, [prompts[i] for i, _ in need],
                            [corrupt_soft_prompt(soft, list(r), cfg.corruption) for _, r in need],
                            cfg.generation, desc="corrupted")
            for (i, r), g in zip(need, gens):
                memo[(i, r)] = grade(task, g.text, exs[i])[1]
        return [memo[(i, tuple(r))] if r else pt[i] for i, r in enumerate(rows_per_ex)]

    def dpc_row(det):
        decs = [dynamic_trigger(a.inputs, det) if a.inputs is not None else None for a in analyses]
        rows = [list(d.corrupt_indices) if d is not None and d.fired else [] for d in decs]
        located = [list(d.accumulation.top_indices) if d is not None else [] for d in decs]
        return corrupted_correct(rows), decs, located

    table = []

    def add(name, vec, note="", **extra):
        diff, lo, hi = paired_bootstrap(vec, pt)
        table.append({"method": name, "accuracy": sum(vec) / len(vec), "diff_vs_pt": diff,
                      "ci95": [lo, hi], "note": note, **extra})

    add("base (no soft prompt)", base)
    add("vanilla PT", pt)
    main_vec, main_decs, located = dpc_row(cfg.detector)
    add("DPC, calibrated trigger", main_vec, "config from dpc_config.json",
        trigger_rate=sum(bool(d and d.fired) for d in main_decs) / len(exs))
    for stat in ("normalized", "raw"):
        for k in (1, 2, 3):
            det = replace(cfg.detector, statistic=stat, top_k=k)
            if det == cfg.detector:
                continue
            vec, decs, _ = dpc_row(det)
            add(f"DPC {stat}, k={k}", vec, trigger_rate=sum(bool(d and d.fired) for d in decs) / len(exs))
    k = cfg.detector.top_k
    add(f"corrupt every instance (top-{k})", corrupted_correct([r[:k] for r in located]))
    # the random row as `dpc-lens demo` reports it: DEMO_RANDOM_DRAWS seeded draws per question
    # (random_rows_for, seeds seed .. seed+n-1), the mean accuracy over the draws with its spread
    draws = [corrupted_correct([random_rows_for(e.id, soft.n_tokens, k, cfg.seed + j) for e in exs])
             for j in range(DEMO_RANDOM_DRAWS)]
    per_draw = [sum(v) / len(v) for v in draws]
    per_question = [sum(v[i] for v in draws) / len(draws) for i in range(len(exs))]
    add(f"random corruption ({k} token, mean of {len(draws)} draws)", per_question,
        random_draws={"n": len(draws), "accuracy": per_draw, "std": statistics.stdev(per_draw),
                      "min": min(per_draw), "max": max(per_draw)})
    add("oracle (best of base / PT)", [a or b for a, b in zip(base, pt)])

    decs = [d for d in main_decs if d is not None]
    n_layers = adapter.n_layers
    deep = resolve_layers(cfg.detector.deep_layers, n_layers)
    deep_flow = [statistics.fmean(a.flows["soft->rationale"][layer] for layer in deep) if a.flows else None
                 for a in analyses]
    right = [f for f, c in zip(deep_flow, pt) if f is not None and c]
    wrong = [f for f, c in zip(deep_flow, pt) if f is not None and not c]
    result = {
        "n": len(exs),
        "ceiling_right_without_prompt_wrong_with": sum(1 for a, b in zip(base, pt) if a and not b),
        "pt_only_right": sum(1 for a, b in zip(base, pt) if b and not a),
        "table": table,
        "contingency_fig5": accumulation_deepflow_contingency(decs),
        "deep_soft_to_rationale_flow": {
            "layers": deep,
            "pt_correct": {"n": len(right), "mean": statistics.fmean(right) if right else None,
                           "median": statistics.median(right) if right else None},
            "pt_wrong": {"n": len(wrong), "mean": statistics.fmean(wrong) if wrong else None,
                         "median": statistics.median(wrong) if wrong else None},
        },
        "config": cfg.to_dict(),
        "corrupted_generations": len(memo),
        "wall_time_s": time.perf_counter() - t0,
        "device": str(adapter.device),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"n = {result['n']}; ceiling = {result['ceiling_right_without_prompt_wrong_with']}; "
          f"PT-only = {result['pt_only_right']}")
    print("| method | accuracy | Δ vs PT | 95% CI |\n|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | {100 * r['accuracy']:.1f} | {100 * r['diff_vs_pt']:+.1f} | "
              f"[{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] |")
    print(json.dumps({k: result[k] for k in ("contingency_fig5", "deep_soft_to_rationale_flow")}, indent=1))
    print(f"written {args.out} in {result['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
