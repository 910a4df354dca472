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
import statistics
import time
from dataclasses import replace

import torch

from dpc_lens.demo import shipped_artefacts
from dpc_lens.dpc import DPCConfig, run_dpc
from dpc_lens.generation import encode_prompts, generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import get_task, load_examples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    art = shipped_artefacts()
    if art is None:
        raise SystemExit("needs the shipped reasoner, soft prompt and test set in dpc_lens/data")
    model = load_model(art["model"])
    adapter = as_adapter(model)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    task = get_task("arith")
    exs = load_examples(art["test"], task)[: args.n]
    cfg = DPCConfig.load(art["config"]) if os.path.exists(art["config"]) else DPCConfig()
    cfg = replace(cfg, baselines=())
    prompts = encode_prompts(adapter, [cfg.template.format(question=e.question) for e in exs], add_bos=cfg.add_bos)
    times = {"vanilla": [], "dpc": []}
    trigger = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        generate(adapter, prompts, soft, cfg.generation, progress=False)
        times["vanilla"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, summary = run_dpc(adapter, soft, exs, task, cfg, progress=False)
        times["dpc"].append(time.perf_counter() - t0)
        trigger = summary["trigger_rate"]
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["dpc"] / med["vanilla"]
    result = {
        "benchmark": "dpc_vs_vanilla_generation",
        "device": str(adapter.device) if adapter.device.type != "cuda" else torch.cuda.get_device_name(adapter.device),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "model": {"n_layers": adapter.n_layers, "d_model": adapter.d_model, "n_heads": adapter.n_heads},
        "n_questions": len(exs), "repeats": args.repeats, "batch_size": cfg.generation.batch_size,
        "max_new_tokens": cfg.generation.max_new_tokens,
        "median_seconds": med, "trigger_rate": trigger,
        "ratio_dpc_over_vanilla": ratio, "target_ratio": 1 + trigger + 0.35,
        "meets_target": ratio <= 1 + trigger + 0.35,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"dpc_{adapter.device.type}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result[k] for k in ("median_seconds", "trigger_rate", "ratio_dpc_over_vanilla",
                                             "target_ratio", "meets_target")}, indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
