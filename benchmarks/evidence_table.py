"""The evidence table: does DPC beat vanilla prompt tuning on a test bed?

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

Usage: ``python benchmarks/evidence_table.py [--testbed reasoner|real] [--limit N]``: the
shipped reasoner test bed (``dpc_lens/data``, writes ``benchmarks/results/evidence_arith.json``)
or the real one, SmolLM2-135M-Instruct with its tuned adapter (``dpc_lens.real_testbed``, writes
``benchmarks/results/evidence_real.json``); prints a Markdown table. Questions are processed in
chunks whose per-question outcomes are appended to ``<out>.records.jsonl`` as they finish, so a
killed run continues where it stopped (``--fresh`` starts over); the JSON is rewritten after
every chunk with ``n`` the questions done so far.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from dpc_lens.dpc import (
    DPCConfig,
    analyse,
    dynamic_trigger,
    encode_questions,
    random_rows_for,
    resolve_layers,
)
from dpc_lens.evaluation import grade, paired_bootstrap
from dpc_lens.generation import generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.patching import corrupt_soft_prompt
from dpc_lens.runs import read_records
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import get_task, load_examples
from dpc_lens.testbed import shipped_artefacts
from dpc_lens.testbed.demo import DEMO_RANDOM_DRAWS


def _artefacts(testbed: str) -> dict[str, str]:
    if testbed == "real":
        from dpc_lens.real_testbed import artefacts

        art = artefacts()
        if art is None:
            raise SystemExit("the real test bed is not built: python -m dpc_lens.real_testbed build")
        return art
    art = shipped_artefacts()
    if art is None:
        raise SystemExit("the shipped reasoner / soft prompt / test set are missing from dpc_lens/data")
    return dict(art, task="arith")


def _question_records(adapter, soft, task, exs, cfg, variants, draws):
    """Every row's outcome for each question of ``exs`` (one chunk), as JSON-safe records."""
    prompts = encode_questions(adapter, [e.question for e in exs], cfg)
    pt_gen = generate(adapter, prompts, soft, cfg.generation, desc="PT")
    base_gen = generate(adapter, prompts, None, cfg.generation, desc="base")
    analyses = analyse(adapter, soft, [e.question for e in exs], cfg, generations=pt_gen)
    pt = [grade(task, g.text, e)[1] for g, e in zip(pt_gen, exs)]
    base = [grade(task, g.text, e)[1] for g, e in zip(base_gen, exs)]
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

    recs = [{"id": e.id, "base": b, "pt": p, "rows": {}, "fired": {}, "source": e.meta.get("source")}
            for e, b, p in zip(exs, base, pt)]
    main_decs = None
    for name, det in variants.items():
        decs = [dynamic_trigger(a.inputs, det) if a.inputs is not None else None for a in analyses]
        rows = [list(d.corrupt_indices) if d is not None and d.fired else [] for d in decs]
        for rec, ok, d in zip(recs, corrupted_correct(rows), decs):
            rec["rows"][name] = ok
            rec["fired"][name] = bool(d is not None and d.fired)
        if main_decs is None:
            main_decs = decs
    k = cfg.detector.top_k
    located = [list(d.accumulation.top_indices) if d is not None else [] for d in main_decs]
    for rec, ok in zip(recs, corrupted_correct([r[:k] for r in located])):
        rec["always"] = ok
    per_draw = [corrupted_correct([random_rows_for(e.id, soft.n_tokens, k, cfg.seed + j) for e in exs])
                for j in range(draws)]
    deep = resolve_layers(cfg.detector.deep_layers, adapter.n_layers)
    for i, (rec, d, a) in enumerate(zip(recs, main_decs, analyses)):
        rec["random"] = [v[i] for v in per_draw]
        rec["located"] = located[i]
        rec["accumulation_present"] = None if d is None else bool(d.accumulation_present)
        rec["flow_triggered"] = None if d is None else bool(d.flow_triggered)
        rec["deep_soft_to_rationale"] = (statistics.fmean(a.flows["soft->rationale"][layer] for layer in deep)
                                         if a.flows else None)
    return recs, len(memo)


def _summarise(recs, cfg, variants, draws, n_layers, meta):
    pt = [r["pt"] for r in recs]
    base = [r["base"] for r in recs]
    n = len(recs)
    table = []

    def add(name, vec, note="", **extra):
        diff, lo, hi = paired_bootstrap(vec, pt)
        table.append({"method": name, "accuracy": sum(vec) / n, "diff_vs_pt": diff,
                      "ci95": [lo, hi], "note": note, **extra})

    add("base (no soft prompt)", base)
    add("vanilla PT", pt)
    for i, name in enumerate(variants):
        add(name, [r["rows"][name] for r in recs], "config from dpc_config.json" if i == 0 else "",
            trigger_rate=sum(r["fired"][name] for r in recs) / n)
    k = cfg.detector.top_k
    add(f"corrupt every instance (top-{k})", [r["always"] for r in recs])
    # the random row as `dpc-lens demo` reports it: seeded draws per question (random_rows_for,
    # seeds seed .. seed+draws-1), the mean accuracy over the draws with its spread
    per_draw = [sum(r["random"][j] for r in recs) / n for j in range(draws)]
    add(f"random corruption ({k} token, mean of {draws} draws)",
        [sum(r["random"]) / draws for r in recs],
        random_draws={"n": draws, "accuracy": per_draw,
                      "std": statistics.stdev(per_draw) if draws > 1 else None,
                      "min": min(per_draw), "max": max(per_draw)})
    add("oracle (best of base / PT)", [a or b for a, b in zip(base, pt)])

    cont = {"accum_change": 0, "accum_no_change": 0, "no_accum_change": 0, "no_accum_no_change": 0}
    for r in recs:
        if r["accumulation_present"] is not None:
            key = ("accum" if r["accumulation_present"] else "no_accum") + (
                "_change" if r["flow_triggered"] else "_no_change")
            cont[key] += 1
    n_acc = cont["accum_change"] + cont["accum_no_change"]
    n_no = cont["no_accum_change"] + cont["no_accum_no_change"]
    cont.update(n=n_acc + n_no, p_change_given_accum=cont["accum_change"] / n_acc if n_acc else None,
                p_change_given_no_accum=cont["no_accum_change"] / n_no if n_no else None)
    tops = [r["located"][0] for r in recs if r["located"]]
    top_pos = max(set(tops), key=tops.count) if tops else None
    right = [r["deep_soft_to_rationale"] for r in recs if r["deep_soft_to_rationale"] is not None and r["pt"]]
    wrong = [r["deep_soft_to_rationale"] for r in recs
             if r["deep_soft_to_rationale"] is not None and not r["pt"]]
    by_source = {}
    for s in sorted({r.get("source") for r in recs if r.get("source")}):
        sub = [r for r in recs if r.get("source") == s]
        by_source[s] = {"n": len(sub), "base": sum(r["base"] for r in sub) / len(sub),
                        "pt": sum(r["pt"] for r in sub) / len(sub),
                        "dpc": sum(r["rows"][next(iter(variants))] for r in sub) / len(sub)}
    return {
        "n": n,
        "ceiling_right_without_prompt_wrong_with": sum(1 for a, b in zip(base, pt) if a and not b),
        "pt_only_right": sum(1 for a, b in zip(base, pt) if b and not a),
        "table": table,
        "located_token": {"most_common_position": top_pos,
                          "share_at_that_position": tops.count(top_pos) / len(tops) if tops else None},
        "contingency_fig5": cont,
        "deep_soft_to_rationale_flow": {
            "layers": resolve_layers(cfg.detector.deep_layers, n_layers),
            "pt_correct": {"n": len(right), "mean": statistics.fmean(right) if right else None,
                           "median": statistics.median(right) if right else None},
            "pt_wrong": {"n": len(wrong), "mean": statistics.fmean(wrong) if wrong else None,
                         "median": statistics.median(wrong) if wrong else None},
        },
        **({"by_source": by_source} if by_source else {}),
        "config": cfg.to_dict(),
        **meta,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--testbed", choices=("reasoner", "real"), default="reasoner",
                    help="reasoner: the shipped 0.62M model; real: SmolLM2 + its tuned adapter")
    ap.add_argument("--limit", type=int, default=None, help="first N test questions (default: all)")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/evidence_arith.json (reasoner) or evidence_real.json")
    ap.add_argument("--random-draws", type=int, default=DEMO_RANDOM_DRAWS)
    ap.add_argument("--no-variants", action="store_true",
                    help="only the calibrated trigger (skip the raw/normalised x k=1,2,3 rows)")
    ap.add_argument("--chunk", type=int, default=50, help="questions per chunk (default 50)")
    ap.add_argument("--fresh", action="store_true", help="discard the records of an earlier run")
    args = ap.parse_args(argv)
    name = "evidence_arith.json" if args.testbed == "reasoner" else "evidence_real.json"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", name)
    art = _artefacts(args.testbed)
    t0 = time.perf_counter()
    model = load_model(art["model"])
    adapter = as_adapter(model)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    task = get_task(art["task"])
    exs = load_examples(art["test"], task)[: args.limit]
    cfg = DPCConfig.load(art["config"]) if os.path.exists(art["config"]) else DPCConfig()
    variants = {"DPC, calibrated trigger": cfg.detector}
    if not args.no_variants:
        for stat in ("normalized", "raw"):
            for k in (1, 2, 3):
                det = replace(cfg.detector, statistic=stat, top_k=k)
                if det != cfg.detector:
                    variants[f"DPC {stat}, k={k}"] = det
    settings = {"testbed": args.testbed, "config": cfg.to_dict(), "variants": list(variants),
                "random_draws": args.random_draws, "soft_prompt": os.path.abspath(art["soft_prompt"]),
                "test": os.path.abspath(art["test"])}
    rec_path, set_path = out + ".records.jsonl", out + ".run.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if args.fresh:
        for p in (rec_path, set_path):
            if os.path.exists(p):
                os.remove(p)
    if os.path.exists(set_path):
        with open(set_path) as fh:
            if json.load(fh) != settings:
                raise SystemExit(f"{rec_path} holds a run with other settings; pass --fresh to start over")
    with open(set_path, "w") as fh:
        json.dump(settings, fh, indent=2)
    done = {r["id"]: r for r in read_records(rec_path)}  # a torn last line is redone
    n_corrupted = 0
    todo = [e for e in exs if e.id not in done]
    result = None
    for s in range(0, max(len(todo), 1), args.chunk):
        part = todo[s:s + args.chunk]
        if part:
            recs, nc = _question_records(adapter, soft, task, part, cfg, variants, args.random_draws)
            n_corrupted += nc
            with open(rec_path, "a") as fh:
                for r in recs:
                    fh.write(json.dumps(r) + "\n")
                    done[r["id"]] = r
        ordered = [done[e.id] for e in exs if e.id in done]
        result = _summarise(ordered, cfg, variants, args.random_draws, adapter.n_layers, {
            "testbed": args.testbed, "model": art["model"], "soft_prompt": art["soft_prompt"],
            "n_requested": len(exs), "corrupted_generations_this_process": n_corrupted,
            "wall_time_s_this_process": time.perf_counter() - t0, "device": str(adapter.device),
            "torch_threads": torch.get_num_threads()})
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"{len(ordered)}/{len(exs)} questions done, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"n = {result['n']}; ceiling = {result['ceiling_right_without_prompt_wrong_with']}; "
          f"PT-only = {result['pt_only_right']}")
    print("| method | accuracy | Δ vs PT | 95% CI |\n|---|---|---|---|")
    for r in result["table"]:
        print(f"| {r['method']} | {100 * r['accuracy']:.1f} | {100 * r['diff_vs_pt']:+.1f} | "
              f"[{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] |")
    print(json.dumps({k: result[k] for k in ("contingency_fig5", "deep_soft_to_rationale_flow")}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
