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

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per run); on CPU the peak of
the process's resident set sampled every 0.5 ms in a thread, minus the resident set before the
run (an approximation, reported as such).

Usage: ``python benchmarks/bench_saliency.py [--layers 4 --d-model 256 --seq 256 --batch 4]``;
writes ``benchmarks/results/saliency_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time

import torch

from dpc_lens import flows as F
from dpc_lens.model import as_adapter, frozen_for_saliency, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency, target_nll
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakMemory:
    """Peak extra memory during the block (CUDA allocator, or sampled RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss()
            self._stop = False
            self._max = self.base

            def sample():
                while not self._stop:
                    self._max = max(self._max, _rss())
                    time.sleep(0.0005)

            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._t.join()
            self._max = max(self._max, _rss())
            self.peak = self._max - self.base
        return False


def make_batch(adapter, batch: int, seq: int, n_soft: int, seed: int = 0) -> tuple[PromptBatch, SoftPrompt]:
    g = torch.Generator().manual_seed(seed)
    vocab = adapter.embedding_weight.shape[0]
    soft = SoftPrompt(torch.randn(n_soft, adapter.d_model, generator=g) * 0.02)
    seqs, lays = [], []
    q = seq // 3
    for b in range(batch):
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
    runners = {"plain": run_plain, "dpc_lens": run_dpc_lens, "naive": run_naive}
    for fn in runners.values():  # warm-up
        fn(adapter, batch)
    times = {k: [] for k in runners}
    mems = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            with PeakMemory(device) as pm:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(adapter, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
            mems[name].append(pm.peak)
    med_t = {k: statistics.median(v) for k, v in times.items()}
    med_m = {k: statistics.median(v) for k, v in mems.items()}
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
        "median_peak_extra_bytes": med_m,
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "sampled RSS peak minus RSS before (approximate)",
        "ratios_vs_plain": {
            "time_dpc_lens": med_t["dpc_lens"] / med_t["plain"],
            "time_naive": med_t["naive"] / med_t["plain"],
            "memory_dpc_lens": med_m["dpc_lens"] / med_m["plain"] if med_m["plain"] > 0 else None,
            "memory_naive": med_m["naive"] / med_m["plain"] if med_m["plain"] > 0 else None,
        },
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
