"""Benchmark: DPC wall time against vanilla prompt-tuned generation on the same questions.

In one process, alternating, on the same questions: ``vanilla`` = greedy generation with the soft
prompt; ``dpc`` = :func:`dpc_lens.run_dpc` without baselines (PT generation + one saliency pass +
regeneration of the triggered questions). Target from the issue: ``dpc / vanilla <= 1 + trigger
rate + 0.35`` (one generation, a forward/backward costing at most 0.35 generations, and one more
generation per triggered question).

Runs on the shipped reasoner and soft prompt when they exist, else on a tiny random model.
Usage: ``python benchmarks/bench_dpc.py [--n 64 --repeats 3]``; writes
``benchmarks/results/dpc_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from dataclasses import replace

import torch
import transformers

from dpc_lens.dpc import DPCConfig, run_dpc
from dpc_lens.generation import encode_prompts, generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import get_task, load_examples
from dpc_lens.testbed import shipped_artefacts


def _instrument_phases() -> dict[str, float]:
    """Accumulate process CPU time per DPC phase by wrapping the functions the pipeline calls:
    generation (the prompt-tuned answers), saliency (the teacher-forced pass and its reductions),
    detection (the Dynamic Trigger) and regeneration (generation with per-question corrupted
    soft prompts); the rest of run_dpc is reported as ``other``."""
    from dpc_lens.dpc import pipeline

    spent: dict[str, float] = {}

    def timed(name_of, fn):
        def wrapper(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                name = name_of(args)
                spent[name] = spent.get(name, 0.0) + time.process_time() - t0
        return wrapper

    pipeline.generate = timed(lambda a: "regeneration" if isinstance(a[2], (list, tuple)) else "generation",
                              pipeline.generate)
    pipeline.measure_flows = timed(lambda a: "saliency", pipeline.measure_flows)
    pipeline.dynamic_trigger = timed(lambda a: "detection", pipeline.dynamic_trigger)
    return spent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--testbed", choices=("reasoner", "real"), default="reasoner",
                    help="the shipped 0.62 M reasoner (default) or SmolLM2-135M-Instruct + its soft prompt")
    args = ap.parse_args(argv)
    if args.testbed == "real":
        from dpc_lens.testbed.real import artefacts

        art = artefacts()
    else:
        art = shipped_artefacts()
    if art is None:
        raise SystemExit(f"the {args.testbed} test bed is not available")
    model = load_model(art["model"])
    adapter = as_adapter(model)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    task = get_task("arith")
    exs = load_examples(art["test"], task)[: args.n]
    cfg = DPCConfig.load(art["config"]) if os.path.exists(art["config"]) else DPCConfig()
    cfg = replace(cfg, baselines=())
    texts = [cfg.template.format(question=e.question) for e in exs]
    prompts = encode_prompts(adapter, texts, add_bos=cfg.add_bos)
    torch.set_num_threads(1)
    phases = _instrument_phases()
    times: dict[str, list[float]] = {"vanilla": [], "dpc": []}
    phase_runs: list[dict[str, float]] = []
    trigger = None
    rng = random.Random(0)
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        order = ["vanilla", "dpc"]
        rng.shuffle(order)
        for which in order:
            phases.clear()
            t0 = time.process_time()
            if which == "vanilla":
                generate(adapter, prompts, soft, cfg.generation, progress=False)
            else:
                _, summary = run_dpc(adapter, soft, exs, task, cfg, progress=False)
                trigger = summary["trigger_rate"]
            times[which].append(time.process_time() - t0)
            if which == "dpc":
                spent = dict(phases)
                spent["other"] = times["dpc"][-1] - sum(spent.values())
                phase_runs.append(spent)
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["dpc"] / med["vanilla"]
    result = {
        "benchmark": "dpc_vs_vanilla_generation",
        "device": (str(adapter.device) if adapter.device.type != "cuda"
                   else torch.cuda.get_device_name(adapter.device)),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()},
        "testbed": args.testbed,
        "model": {"n_layers": adapter.n_layers, "d_model": adapter.d_model, "n_heads": adapter.n_heads},
        "n_questions": len(exs), "repeats": args.repeats, "batch_size": cfg.generation.batch_size,
        "max_new_tokens": cfg.generation.max_new_tokens,
        "median_seconds": med, "time_measure": "process CPU time, 1 thread, shuffled rounds",
        "ratio_per_round": [d / v for d, v in zip(times["dpc"], times["vanilla"])],
        "dpc_phases_median_seconds": {k: statistics.median(r.get(k, 0.0) for r in phase_runs)
                                      for k in ("generation", "saliency", "detection", "regeneration",
                                                "other")},
        "load_avg": {"min": min(loads), "max": max(loads)}, "trigger_rate": trigger,
        "ratio_dpc_over_vanilla": ratio, "target_ratio": 1 + trigger + 0.35,
        "meets_target": ratio <= 1 + trigger + 0.35,
    }
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.testbed == "reasoner" else "_real"
    path = os.path.join(args.out, f"dpc_{adapter.device.type}{suffix}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result[k] for k in ("median_seconds", "trigger_rate", "ratio_dpc_over_vanilla",
                                             "target_ratio", "meets_target")}, indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
