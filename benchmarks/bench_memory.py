"""Benchmark P5 (and P2 measured honestly): peak memory and time of one saliency pass against
sequence length, for a plain frozen forward+backward, the normal saliency mode and the lean mode
(every block recomputed during the backward), on a GPT-2-small shape and a SmolLM2-135M shape
with random weights (the real vocabularies: the logits are part of the bill).

Each point runs in a FRESH process (glibc keeps freed pages, so a process that already ran a
bigger pass shows nothing): build the model, one warm-up pass at T = 64, then reset the
high-water mark (``/proc/self/clear_refs``, ``VmHWM`` := ``VmRSS``), run the measured pass, and
report ``VmHWM - VmRSS_before`` as the pass's peak extra memory. ``MALLOC_MMAP_THRESHOLD_=65536``
makes large tensors go back to the kernel when freed. Time is the process CPU time of the pass
at one thread. On CUDA the same script uses ``torch.cuda.max_memory_allocated``.

A point whose estimated need exceeds the machine's available memory is not run and is recorded
as ``"skipped": "estimated ... > available ..."``.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--shapes gpt2-small smollm2-135m]
[--seq 512 1024 2048 4096] [--modes plain normal lean]``; writes
``benchmarks/results/memory_<device>.json`` after every point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "gpt2-small": dict(arch="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
    "smollm2-135m": dict(arch="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
}


def _checkpoint(shape: str, root: str) -> str:
    """A random checkpoint of ``shape`` saved once under ``root`` (reused by every point)."""
    import torch
    import transformers as tf

    from dpc_lens.testing import tiny_tokenizer

    path = os.path.join(root, shape)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_positions=8192 + 64, **spec)
    else:
        cfg = tf.LlamaConfig(max_position_embeddings=8192 + 64, tie_word_embeddings=True,
                             rope_theta=1e5, **spec)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _point(shape: str, mode: str, T: int, root: str) -> dict:
    """Run one measured pass in this (fresh) process."""
    import torch

    from dpc_lens.model import as_adapter, frozen_for_saliency, load_model
    from dpc_lens.saliency import SaliencyConfig, compute_saliency, normal_mode_bytes, target_nll
    from dpc_lens.segments import PromptBatch, SegmentLayout

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(_checkpoint(shape, root), device=device)
    adapter = as_adapter(model)
    vocab = int(adapter.embedding_weight.shape[0])

    def batch_of(n: int) -> PromptBatch:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(4, min(vocab, 30000), (n,), generator=g).tolist()
        half = n // 2
        lay = SegmentLayout({"question": (0, half), "rationale": (half, n)}, n)
        return PromptBatch.build(adapter, [ids], [lay], None)

    def run(batch: PromptBatch) -> None:
        if mode == "plain":
            with frozen_for_saliency(model), torch.enable_grad():
                emb = batch.embeds.detach().requires_grad_(True)
                logits = adapter.forward_embeds(emb, batch.attention_mask, batch.position_ids)
                loss = target_nll(logits, batch, ("rationale",)).sum()
                torch.autograd.grad(loss, emb)
        else:
            compute_saliency(model, batch, SaliencyConfig(memory=mode, loss_segments=("rationale",),
                                                          flow_segments=("question", "rationale")))

    run(batch_of(64))  # warm-up: allocator pools, kernels, lazy TL wiring
    batch = batch_of(T)
    est = normal_mode_bytes(adapter, batch)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current VmRSS
        before = _status("VmRSS")
    c0, w0 = time.process_time(), time.perf_counter()
    run(batch)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status("VmHWM") - before
    return {"shape": shape, "mode": mode, "T": T, "batch": 1, "device": device,
            "peak_extra_bytes": int(peak), "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "normal_mode_estimate_bytes": int(est), "n_layers": adapter.n_layers,
            "n_heads": adapter.n_heads, "d_model": adapter.d_model, "vocab": vocab}


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--seq", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    ap.add_argument("--modes", nargs="+", default=["plain", "normal", "lean"])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "dpc_lens_bench_models"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--point", nargs=3, metavar=("SHAPE", "MODE", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        shape, mode, T = args.point
        print(json.dumps(_point(shape, mode, int(T), args.root)))
        return 0

    import torch
    import transformer_lens  # noqa: F401

    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = os.path.join(args.out, f"memory_{device}.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from importlib import metadata

    result = {
        "what": "peak extra memory and CPU time of one pass (batch 1) against T; fresh process per point",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "transformer-lens")},
        "threads": 1, "rows": [],
    }
    for shape in args.shapes:
        _checkpoint(shape, args.root)
        for T in args.seq:
            for mode in args.modes:
                load = os.getloadavg()[0]
                row: dict = {"shape": shape, "mode": mode, "T": T, "load_avg": round(load, 2)}
                # the lean pass keeps about one layer's worth; plain/normal all layers' worth
                spec = SHAPES[shape]
                L = spec.get("n_layer", spec.get("num_hidden_layers"))
                H = spec.get("n_head", spec.get("num_attention_heads"))
                need = 3 * (1 if mode == "lean" else L) * H * T * T * 4 + 2 * T * spec["vocab_size"] * 4
                avail = _available()
                if device == "cpu" and need > 0.9 * avail:
                    row["skipped"] = f"estimated {need / 2**30:.1f} GiB > available {avail / 2**30:.1f} GiB"
                else:
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--root", args.root,
                                          "--point", shape, mode, str(T)], env=env, capture_output=True,
                                         text=True)
                    if out.returncode != 0:
                        row["error"] = (out.stderr.strip().splitlines() or ["?"])[-1][:300]
                    else:
                        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                row["load_avg_after"] = round(os.getloadavg()[0], 2)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                with open(path, "w") as fh:
                    json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
