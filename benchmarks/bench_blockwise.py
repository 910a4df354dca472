"""Benchmark the blockwise saliency mode (issue 21): time against a plain SDPA forward+backward,
and peak memory against T for plain, normal, lean and blockwise, on GPT-2-small-shaped random
weights (12 layers, d 768, 12 heads, vocabulary 50,257; positions extended to 16,448).

Modes, one pass each (batch 1, ``T - 64`` question tokens then 64 rationale tokens, loss = mean
NLL of the rationale, logits unembedded at the scored positions only where the model allows):

* ``sdpa``: the Hugging Face model itself with ``attn_implementation="sdpa"`` (torch's fused
  attention), forward + backward to the input embeddings: the floor a saliency pass is held to;
* ``plain``: the same forward + backward through the TransformerBridge (eager attention);
* ``normal`` / ``lean`` / ``blockwise``: ``compute_saliency`` in that memory mode (segment flows
  question/rationale).

Each point runs in a FRESH process (see bench_memory.py: warm-up at T = 64, then the high-water
mark is reset and the pass's peak extra RSS is ``VmHWM - VmRSS_before``), at one thread, T
ascending so the largest points come last. A point estimated not to fit in the available memory
is recorded as skipped; one that runs past ``--point-timeout`` is recorded as timed out.
The blockwise CPU time is fitted as ``a + b T + c T^2`` (least squares) and printed.
``--alloc mmap`` (the default) runs the points with ``MALLOC_MMAP_THRESHOLD_=65536`` so the
high-water mark is the pass's own peak: the memory figures. ``--alloc default`` runs them with
glibc's own thresholds, as a user does: the time figures and ratios (under mmap every
block-sized tensor is a fresh mapping the kernel zeroes, which inflates the blockwise time).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_blockwise.py [--seq 512 1024 ...]
[--modes sdpa blockwise ...] [--point-timeout 1800]``; writes
``benchmarks/results/blockwise_<device>.json`` after every point.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_memory import _status  # noqa: E402  (the high-water mark, read the same way)

SHAPE = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
N_POS = 16384 + 64
N_TARGET = 64


def _checkpoint(root: str) -> str:
    import torch
    import transformers as tf

    from dpc_lens.testing import tiny_tokenizer

    path = os.path.join(root, "gpt2-small-16k")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.GPT2Config(n_positions=N_POS, **SHAPE))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _point(mode: str, T: int, root: str, block_size: int | None) -> dict:
    import torch

    torch.set_num_threads(1)
    from dpc_lens.model import as_adapter, frozen_for_saliency, load_model
    from dpc_lens.saliency import SaliencyConfig, compute_saliency
    from dpc_lens.segments import PromptBatch, SegmentLayout

    path = _checkpoint(root)
    model = load_model(path, device="cpu")
    adapter = as_adapter(model)
    hf_sdpa = None
    if mode == "sdpa":
        import transformers as tf

        hf_sdpa = tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        for p in hf_sdpa.parameters():
            p.requires_grad_(False)

    def batch_of(n: int) -> PromptBatch:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(4, 30000, (n,), generator=g).tolist()
        k = min(N_TARGET, n // 2)
        lay = SegmentLayout({"question": (0, n - k), "rationale": (n - k, n)}, n)
        return PromptBatch.build(adapter, [ids], [lay], None)

    def scored(batch: PromptBatch):
        tm = batch.union_mask(("rationale",))
        tm[:, 0] = 0
        return (tm[:, 1:] > 0).any(0).nonzero().flatten()

    def run(batch: PromptBatch) -> None:
        if mode in ("sdpa", "plain"):
            keep = scored(batch)
            with torch.enable_grad():
                emb = batch.embeds.detach().requires_grad_(True)
                if mode == "sdpa":
                    logits = hf_sdpa(inputs_embeds=emb, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids, logits_to_keep=keep).logits
                else:
                    with frozen_for_saliency(model):
                        try:
                            logits = adapter.forward_embeds(emb, batch.attention_mask, batch.position_ids,
                                                            logits_at=keep)
                        except TypeError:  # an adapter without logits_at: every position
                            logits = adapter.forward_embeds(emb, batch.attention_mask, batch.position_ids)
                if logits.shape[1] != len(keep):
                    logits = logits[:, keep]
                # the mean NLL of the rationale: token t scored by the logits at t - 1
                targets = batch.token_ids[0, keep + 1]
                logp = torch.log_softmax(logits[0].float(), -1)
                loss = -logp.gather(-1, targets[:, None]).mean()
                torch.autograd.grad(loss, emb)
        else:
            if mode == "blockwise_keep":  # no per-block checkpointing: SDPA's activations
                from dpc_lens.saliency import blockwise as bw

                bw._CHECKPOINT_BLOCKS = False
            compute_saliency(model, batch, SaliencyConfig(
                memory=mode.split("_")[0], loss_segments=("rationale",),
                flow_segments=("question", "rationale"),
                block_size=block_size if mode.startswith("blockwise") else None))

    run(batch_of(64))
    batch = batch_of(T)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    c0, w0 = time.process_time(), time.perf_counter()
    run(batch)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    peak = _status("VmHWM") - before
    from dpc_lens.saliency.blockwise import checkpoint_blocks, default_block_size

    return {"mode": mode, "T": T, "batch": 1, "peak_extra_bytes": int(peak),
            "peak_extra_gib": round(peak / 2**30, 3), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "block_size": (block_size or default_block_size(adapter, batch, _available()))
            if mode.startswith("blockwise") else None,
            "checkpoint_blocks": (checkpoint_blocks(adapter, batch, _available())
                                  if mode.startswith("blockwise") else None)}


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _need(mode: str, T: int) -> int:
    """Rough peak estimate used only to skip points that cannot fit."""
    L, H, d = SHAPE["n_layer"], SHAPE["n_head"], SHAPE["n_embd"]
    # activations kept for the backward (~0.75 MB per token measured at T = 512); blockwise
    # checkpoints every block, so it keeps the residual stream and one block's
    linear = (20 * L if mode != "blockwise" else 20 + L) * T * d * 4
    per_layer = {"normal": 3 * L, "plain": 2 * L, "lean": 3}.get(mode, 0) * H * T * T * 4
    mask = T * T * 4 if mode != "sdpa" else 0  # the eager [1, 1, T, T] float mask
    return linear + per_layer + mask


def fit(rows: list[dict]) -> dict | None:
    """Least squares ``cpu_s = a + b T + c T^2`` over the rows given."""
    pts = [(r["T"], r["cpu_s"]) for r in rows if "cpu_s" in r]
    if len(pts) < 3:
        return None
    import numpy as np

    Ts = np.array([p[0] for p in pts], dtype=float)
    ys = np.array([p[1] for p in pts], dtype=float)
    X = np.stack([np.ones_like(Ts), Ts, Ts**2], 1)
    coef, *_ = np.linalg.lstsq(X, ys, rcond=None)
    pred = X @ coef
    return {"a_s": float(coef[0]), "b_s_per_token": float(coef[1]), "c_s_per_token2": float(coef[2]),
            "max_rel_residual": float(np.max(np.abs(pred - ys) / ys)),
            "formula": f"cpu_s ~= {coef[0]:.3g} + {coef[1]:.3g} T + {coef[2]:.3g} T^2"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--modes", nargs="+", default=["sdpa", "plain", "normal", "lean", "blockwise"])
    ap.add_argument("--time-modes", nargs="+", default=["sdpa", "blockwise"],
                    help="modes run at every T (others only while they fit)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--point-timeout", type=float, default=1800.0)
    ap.add_argument("--deadline", type=float, default=None,
                    help="unix time after which no point runs and a running one is killed")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "dpc_lens_bench_models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--alloc", choices=("mmap", "default"), default="mmap",
                    help="mmap (default): glibc maps every allocation over 64 KiB and returns it when "
                         "freed, so the high-water mark is the pass's own peak (the memory figures); "
                         "default: glibc's own thresholds, as a user runs (the time figures: under "
                         "mmap every block-sized tensor is a fresh mapping whose pages the kernel "
                         "zeroes, which cost the blockwise pass 24.6 s instead of 14.7 s at T = 2048)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the existing JSON whose (mode, T) this run does not measure")
    ap.add_argument("--point", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(_point(args.point[0], int(args.point[1]), args.root, args.block_size)))
        return 0
    import torch

    _checkpoint(args.root)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "blockwise_cpu.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.path.dirname(HERE))
    if args.alloc == "mmap":  # every allocation over 64 KiB its own mapping, returned when freed
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    from importlib import metadata

    result = {
        "what": "blockwise saliency: CPU time vs a plain SDPA forward+backward, and peak extra memory "
                "vs T for sdpa/plain/normal/lean/blockwise; batch 1, fresh process per point, 1 thread",
        "model": dict(SHAPE, n_positions=N_POS, weights="random (seed 0)"), "n_target_tokens": N_TARGET,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "note": "2 cores shared with other processes"},
        "device": "cpu", "torch": torch.__version__,
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "transformer-lens")},
        "threads": 1, "rows": [], "ratios_blockwise_vs_sdpa": {}, "cost_fit_blockwise": None,
        "allocators": "each row's 'allocator': 'mmap' rows (MALLOC_MMAP_THRESHOLD_=65536) give the "
                      "peak memory, 'default' rows (glibc's own thresholds) the time ratios; rows "
                      "without the key were measured under mmap",
    }
    if args.merge and os.path.exists(path):
        with open(path) as fh:
            redo = {(m, t, args.alloc) for m in args.modes for t in args.seq}
            result["rows"] = [r for r in json.load(fh)["rows"]
                              if (r["mode"], r["T"], r.get("allocator", "mmap")) not in redo]
    for T in args.seq:
        for mode in args.modes:
            row: dict = {"mode": mode, "T": T, "allocator": args.alloc,
                         "load_avg": round(os.getloadavg()[0], 2), "measured": time.strftime("%Y-%m-%d")}
            need, avail = _need(mode, T), _available()
            if need > 0.85 * avail:
                row["skipped"] = (f"estimated {need / 2**30:.1f} GiB > 85% of available "
                                  f"{avail / 2**30:.1f} GiB")
            elif args.deadline and args.deadline - time.time() < 30:
                row["not_run"] = "the run's deadline (--deadline) had passed"
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--root", args.root, "--point", mode,
                       str(T)]
                if args.block_size:
                    cmd += ["--block-size", str(args.block_size)]
                try:
                    limit = args.point_timeout
                    if args.deadline:
                        limit = min(limit, args.deadline - time.time())
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
                    if out.returncode != 0:
                        row["error"] = (out.stderr.strip().splitlines() or ["?"])[-1][:300]
                    else:
                        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                except subprocess.TimeoutExpired:
                    row["timed_out"] = f"did not finish within {limit:.0f} s (killed)"
            row["load_avg_after"] = round(os.getloadavg()[0], 2)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            # time ratios from the default-allocator rows (as a user runs); memory from mmap rows
            by = {(r["mode"], r["T"]): r for r in result["rows"]
                  if "cpu_s" in r and r.get("allocator") == "default"}
            result["ratios_blockwise_vs_sdpa"] = {
                str(t): round(by[("blockwise", t)]["cpu_s"] / by[("sdpa", t)]["cpu_s"], 3)
                for (m, t) in by if m == "blockwise" and ("sdpa", t) in by}
            result["ratios_blockwise_keep_vs_sdpa"] = {
                str(t): round(by[("blockwise_keep", t)]["cpu_s"] / by[("sdpa", t)]["cpu_s"], 3)
                for (m, t) in by if m == "blockwise_keep" and ("sdpa", t) in by}
            result["cost_fit_blockwise"] = fit([r for (m, _), r in by.items() if m == "blockwise"])
            with open(path, "w") as fh:
                json.dump(result, fh, indent=2)
    print("blockwise / sdpa CPU time:", result["ratios_blockwise_vs_sdpa"])
    print("blockwise without block checkpointing / sdpa:", result["ratios_blockwise_keep_vs_sdpa"])
    if result["cost_fit_blockwise"]:
        print("blockwise cost curve:", result["cost_fit_blockwise"]["formula"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
