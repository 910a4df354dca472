"""Benchmark: the saliency pass against a plain frozen forward+backward and the naive route.

All three run in one process on the same batch, alternating, several repeats each; the figures
are ratios against the plain forward+backward (these machines are noisy, absolute times are not
comparable across runs):

* ``plain``    — forward over the embeddings + ``autograd.grad`` of the same NLL loss w.r.t.
  the input embeddings, weights frozen: the floor any saliency method must pay.
* ``dpc_lens`` — :func:`dpc_lens.compute_saliency` with the DPC reductions (segment flows, soft
  columns, rationale rows), reduced inside the gradient hooks.
* ``naive``    — what ``run_with_cache(incl_bwd=True)`` does: keep every layer's full pattern and
  gradient (``retain_grad``), then compute ``A * G`` and the same reductions afterwards.

* ``lean``     — the same with ``SaliencyConfig(memory="lean")`` (blocks recomputed during the
  backward).

Time is the process CPU time of each pass at one thread (wall time at two threads on a shared
2-core machine swung 0.66-1.16 for the same ratio), runners interleaved in shuffled rounds;
the ratios are reported per round with their spread, and the load average is recorded.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per run). On CPU this script
reports none: a process that already ran a pass keeps its freed pages (glibc), so sampled RSS
after a warm-up sees nothing; the honest CPU figures (fresh process per point, high-water mark
reset after the warm-up) come from ``benchmarks/bench_memory.py``.

Usage: ``python benchmarks/bench_saliency.py [--layers 4 --d-model 256 --seq 256 --batch 4]``;
writes ``benchmarks/results/saliency_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from dpc_lens import flows as F
from dpc_lens.model import as_adapter, frozen_for_saliency, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency, target_nll
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model


def make_batch(adapter, batch: int, seq: int, n_soft: int, seed: int = 0) -> tuple[PromptBatch, SoftPrompt]:
    g = torch.Generator().manual_seed(seed)
    vocab = adapter.embedding_weight.shape[0]
    soft = SoftPrompt(torch.randn(n_soft, adapter.d_model, generator=g) * 0.02)
    seqs, lays = [], []
    q = seq // 3
    for _ in range(batch):
        n = seq - n_soft
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        lays.append(SegmentLayout({"question": (0, q), "rationale": (q, n)}, n))
        seqs.append(ids)
    return PromptBatch.build(adapter, seqs, lays, soft), soft


def run_plain(adapter, batch):
    with frozen_for_saliency(adapter.model), torch.enable_grad():
        emb = batch.embeds.detach().requires_grad_(True)
        logits = adapter.forward_embeds(emb, batch.attention_mask, batch.position_ids)
        loss = target_nll(logits, batch, ("rationale",)).sum()
        torch.autograd.grad(loss, emb)


CFG = SaliencyConfig(loss_segments=("rationale",), flow_segments=("soft", "question", "rationale"),
                     column_targets=("question", "rationale"), row_sources=("soft",))


def run_dpc_lens(adapter, batch):
    return compute_saliency(adapter, batch, CFG)


def run_lean(adapter, batch):
    return compute_saliency(adapter, batch, replace(CFG, memory="lean"))


def run_naive(adapter, batch):
    pats = {}

    def keep(t, hook):
        t.retain_grad()
        pats[hook.name] = t

    names = [f"blocks.{l}.attn.hook_pattern" for l in range(adapter.n_layers)]
    with frozen_for_saliency(adapter.model), torch.enable_grad():
        emb = batch.embeds.detach().requires_grad_(True)
        with adapter.hooks(fwd_hooks=[(n, keep) for n in names]):
            logits = adapter.forward_embeds(emb, batch.attention_mask, batch.position_ids)
            loss = target_nll(logits, batch, ("rationale",)).sum()
            loss.backward()
    masks = batch.segment_masks(["soft", "question", "rationale"])
    tm, sm = batch.union_mask(["question", "rationale"]), batch.union_mask(["soft"])
    out = []
    for n in names:
        I = F.saliency_map(pats[n].detach(), pats[n].grad)
        out.append((F.segment_flow_sums(I, masks), F.column_scores(I, tm), F.row_scores(I, sm)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--soft", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = save_tiny_hf_model(args.arch, tempfile.mkdtemp(), n_layers=args.layers, d_model=args.d_model,
                           n_heads=args.heads, n_kv_heads=max(1, args.heads // 2), n_ctx=max(512, args.seq))
    model = load_model(d, device=str(device))
    adapter = as_adapter(model)
    batch, _ = make_batch(adapter, args.batch, args.seq, args.soft)
    runners = {"plain": run_plain, "dpc_lens": run_dpc_lens, "naive": run_naive, "lean": run_lean}
    if device.type == "cpu":
        torch.set_num_threads(1)
    for fn in runners.values():  # warm-up
        fn(adapter, batch)
    times: dict[str, list[float]] = {k: [] for k in runners}
    mems: dict[str, list[int]] = {k: [] for k in runners}
    rng = random.Random(0)
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        order = list(runners.items())
        rng.shuffle(order)
        for name, fn in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                fn(adapter, batch)
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
                mems[name].append(torch.cuda.max_memory_allocated() - base)
            else:
                t0 = time.process_time()
                fn(adapter, batch)
                times[name].append(time.process_time() - t0)
        loads.append(os.getloadavg()[0])
    med_t = {k: statistics.median(v) for k, v in times.items()}
    med_m = {k: statistics.median(v) for k, v in mems.items()} if device.type == "cuda" else None
    per_round = {k: [a / b for a, b in zip(times[k], times["plain"])] for k in runners if k != "plain"}
    result = {
        "benchmark": "saliency",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "model": {"arch": args.arch, "n_layers": args.layers, "d_model": args.d_model,
                  "n_heads": args.heads, "n_kv_heads": max(1, args.heads // 2)},
        "batch": args.batch, "seq_len": args.seq, "n_soft": args.soft, "repeats": args.repeats,
        "median_seconds": med_t,
        "time_measure": "cuda wall time" if device.type == "cuda" else "process CPU time, 1 thread",
        "load_avg": {"min": min(loads), "max": max(loads)},
        "median_peak_extra_bytes": med_m,
        "memory_method": ("cuda max_memory_allocated" if device.type == "cuda" else
                          "not measured here: see memory_cpu.json from bench_memory.py"),
        "ratios_vs_plain": {
            **{f"time_{k}": statistics.median(v) for k, v in per_round.items()},
            **({f"memory_{k}": med_m[k] / med_m["plain"] for k in runners if k != "plain"}
               if med_m and med_m["plain"] > 0 else {}),
        },
        "time_ratio_spread": {k: [round(min(v), 3), round(max(v), 3)] for k, v in per_round.items()},
        "targets": {"time": 1.15, "memory": 1.10},
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"saliency_{device.type}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result["ratios_vs_plain"], indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
