"""Benchmark P4: throughput of generation and of the saliency pass at batch 1, 4 and 16.

On the shipped reasoner with its soft prompt and test questions (greedy, the shipped DPC
config's generation settings), in one process, batch sizes interleaved in shuffled rounds;
examples per CPU-second at one thread (CPU) or per second (GPU). Target: batch 16 >= 1.5x
batch 1 per example on CPU, >= 6x on a GPU.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_throughput.py [--n 32 --repeats 3]``;
writes ``benchmarks/results/throughput_<device>.json``.
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

from dpc_lens.dpc import DPCConfig
from dpc_lens.generation import encode_prompts, generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import get_task, load_examples
from dpc_lens.testbed import shipped_artefacts


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="questions per measurement (default 32)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    art = shipped_artefacts()
    if art is None:
        raise SystemExit("needs the shipped reasoner, soft prompt and test set")
    model = load_model(art["model"])
    adapter = as_adapter(model)
    device = adapter.device
    if device.type == "cpu":
        torch.set_num_threads(1)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    task = get_task("arith")
    exs = load_examples(art["test"], task)[: args.n]
    cfg = DPCConfig.load(art["config"])
    prompts = encode_prompts(adapter, [cfg.template.format(question=e.question) for e in exs],
                             add_bos=cfg.add_bos)
    gens = generate(adapter, prompts, soft, cfg.generation, progress=False)
    seqs, lays = [], []
    for p, g in zip(prompts, gens):
        ids = list(p) + list(g.token_ids)
        lays.append(SegmentLayout({"question": (0, len(p)), "rationale": (len(p), len(ids))}, len(ids)))
        seqs.append(ids)
    sal_cfg = SaliencyConfig(flow_segments=("soft", "question", "rationale"), loss_segments=("rationale",),
                             column_targets=("question", "rationale"), row_sources=("soft",))

    def run_generation(bs: int) -> None:
        generate(adapter, prompts, soft, replace(cfg.generation, batch_size=bs), progress=False)

    def run_saliency(bs: int) -> None:
        for s in range(0, len(seqs), bs):
            batch = PromptBatch.build(adapter, seqs[s:s + bs], lays[s:s + bs], soft)
            compute_saliency(adapter, batch, sal_cfg)

    work = {"generation": run_generation, "saliency": run_saliency}
    for fn in work.values():  # warm-up
        fn(args.batches[-1])
    times: dict[tuple[str, int], list[float]] = {(w, b): [] for w in work for b in args.batches}
    rng = random.Random(0)
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        keys = list(times)
        rng.shuffle(keys)
        for w, b in keys:
            t0 = _clock(device)
            work[w](b)
            times[(w, b)].append(_clock(device) - t0)
        loads.append(os.getloadavg()[0])
    rows = []
    for w in work:
        base = statistics.median(times[(w, args.batches[0])])
        for b in args.batches:
            med = statistics.median(times[(w, b)])
            rows.append({"work": w, "batch": b, "examples": len(exs), "median_seconds": med,
                         "examples_per_second": len(exs) / med, "speedup_vs_batch_1": base / med})
    result = {
        "benchmark": "throughput",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()},
        "model": {"n_layers": adapter.n_layers, "d_model": adapter.d_model, "n_heads": adapter.n_heads},
        "time_measure": "cuda wall time" if device.type == "cuda" else "process CPU time, 1 thread",
        "max_new_tokens": cfg.generation.max_new_tokens, "repeats": args.repeats,
        "load_avg": {"min": min(loads), "max": max(loads)}, "rows": rows,
        "target_speedup_batch_16": 6.0 if device.type == "cuda" else 1.5,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"throughput_{device.type}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    for r in rows:
        print(f"{r['work']:<10} batch {r['batch']:>2}: {r['examples_per_second']:.1f} ex/s "
              f"({r['speedup_vs_batch_1']:.2f}x batch 1)")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
