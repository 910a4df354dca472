"""One GPU check for issue 21 (run by ``benchmarks/gpu_check.sh``; ``--dry-run`` runs every step on
CPU with tiny sizes so the script is known to work before a GPU is available).

1. Correctness of every memory mode (normal, lean, blockwise) on the device, in float32 and
   bfloat16, against a float64 reference of the same random weights (normal mode, float64): the
   largest |difference| per layer over that layer's largest |entry| (flow sums, row totals and
   the full map), for a Llama shape with grouped-query attention and a Gemma 3 shape with
   sliding and global layers.
2. P1 and P4 on a 1B-class random-weight Llama shape (16 layers, d 2048, 32 heads / 8 kv,
   MLP 8192, vocabulary 128,256) in bfloat16: saliency pass time / plain forward+backward for
   every mode (median of 3 after a warm-up, CUDA-synchronised wall time), and the per-example
   speed-up of batch 16 over batch 1.
3. The longest T for a 7B-shaped random-weight stack (d 4096, 32 heads, MLP 11008, vocabulary
   32,000) in bfloat16, blockwise: measured with 1 and 2 layers at doubling T; the per-layer
   cost is ``peak(2 layers) - peak(1 layer)`` at the same T, and a 32-layer model is predicted as
   ``peak(1 layer) + 31 x per-layer``; the longest T whose prediction fits in 90% of the device's
   memory is reported, with every measured point.

Writes ``benchmarks/results/gpu_check_<device>.json`` (``gpu_check_dryrun_cpu.json`` with
``--dry-run``), after each step, with the device named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dpc_lens.checkpoints import boot_in_memory  # noqa: E402
from dpc_lens.model import as_adapter, frozen_for_saliency  # noqa: E402
from dpc_lens.saliency import SaliencyConfig, compute_saliency  # noqa: E402
from dpc_lens.segments import PromptBatch, SegmentLayout  # noqa: E402
from dpc_lens.testing import tiny_tokenizer  # noqa: E402


def _hf(kind: str, dims: dict, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**dims)
        cfg.architectures = ["Gemma3ForCausalLM"]
        cfg._attn_implementation = "eager"
        return tf.Gemma3ForCausalLM(cfg)
    cfg = tf.LlamaConfig(**dims)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg._attn_implementation = "eager"
    return tf.LlamaForCausalLM(cfg)


def _bridge(hf, tok, device, dtype):
    model = boot_in_memory(hf.to(dtype), tok, device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batch(model, B: int, T: int, seed: int = 0) -> PromptBatch:
    adapter = as_adapter(model)
    vocab = int(adapter.embedding_weight.shape[0])
    g = torch.Generator().manual_seed(seed)
    k = max(2, min(64, T // 4))
    rows = [torch.randint(4, min(vocab, 30000), (T,), generator=g).tolist() for _ in range(B)]
    lays = [SegmentLayout({"question": (0, T - k), "rationale": (T - k, T)}, T) for _ in range(B)]
    return PromptBatch.build(adapter, rows, lays, None)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_correctness(device: str, tiny: bool) -> list[dict]:
    tok = tiny_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = 32 if tiny else 256
    shapes = {
        "llama-gqa": ("llama", dict(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d,
                                    num_hidden_layers=2 if tiny else 4, num_attention_heads=4 if tiny else 8,
                                    num_key_value_heads=2, max_position_embeddings=4096, **ids)),
        "gemma3-sliding": ("gemma3", dict(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=d // 4, sliding_window=8 if tiny else 64,
                                          layer_types=["sliding_attention", "full_attention",
                                                       "sliding_attention"],
                                          query_pre_attn_scalar=d // 4, max_position_embeddings=4096, **ids)),
    }
    T = 24 if tiny else 512
    out = []
    for name, (kind, dims) in shapes.items():
        hf = _hf(kind, dims)
        ref_model = _bridge(hf, tok, device, torch.float64)
        batch64 = _batch(ref_model, 1, T)
        cfg = dict(keep_full=True, row_sources=("question",), loss_segments=("rationale",))
        ref = compute_saliency(ref_model, batch64, SaliencyConfig(memory="normal", **cfg))
        del ref_model
        for dtype in (torch.float32, torch.bfloat16):
            model = _bridge(_hf(kind, dims), tok, device, dtype)
            batch = _batch(model, 1, T)
            for mode in ("normal", "lean", "blockwise"):
                row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "mode": mode, "T": T}
                try:
                    res = compute_saliency(model, batch, SaliencyConfig(memory=mode, **cfg))
                    for key in ("flow_sums", "row_totals", "full"):
                        a, b = getattr(ref, key).double().cpu(), getattr(res, key).double().cpu()
                        row[key] = max(float((a[l] - b[l]).abs().max() / a[l].abs().max())
                                       for l in range(a.shape[0]))
                except Exception as exc:  # recorded, the check goes on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(json.dumps(row), flush=True)
                out.append(row)
            del model
    return out


def _time(fn, device, reps=3) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def step_p1_p4(device: str, tiny: bool) -> dict:
    tok = tiny_tokenizer()
    dims = (dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if tiny else
            dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True))
    dims.update(max_position_embeddings=8192, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    dtype = torch.float32 if tiny else torch.bfloat16
    model = _bridge(_hf("llama", dims), tok, device, dtype)
    adapter = as_adapter(model)
    B, T = (2, 32) if tiny else (4, 1024)
    batch = _batch(model, B, T)

    def plain(b=batch):
        with frozen_for_saliency(model), torch.enable_grad():
            emb = b.embeds.detach().requires_grad_(True)
            logits = adapter.forward_embeds(emb, b.attention_mask, b.position_ids)
            logits[:, -64:].float().logsumexp(-1).sum().backward(inputs=[emb])

    def sal(mode, b=batch):
        return lambda: compute_saliency(model, b, SaliencyConfig(memory=mode, loss_segments=("rationale",),
                                                                 flow_segments=("question", "rationale")))

    res: dict = {"shape": dims, "dtype": str(dtype), "batch": B, "T": T}
    base = _time(plain, device)
    res["plain_s"] = base
    res["P1_ratio_vs_plain"] = {m: _time(sal(m), device) / base for m in ("normal", "lean", "blockwise")}
    one, many = _batch(model, 1, T), _batch(model, 16 if not tiny else 4, T)
    t1 = _time(sal("normal", one), device)
    t16 = _time(sal("normal", many), device)
    res["P4_per_example_speedup"] = (t1 * many.batch_size) / t16
    print(json.dumps(res), flush=True)
    return res


def _peak(device, fn) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    import resource

    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU dry run: not meaningful


def step_7b(device: str, tiny: bool, budget_s: float) -> dict:
    tok = tiny_tokenizer()
    base = (dict(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_attention_heads=4,
                 num_key_value_heads=4) if tiny else
            dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32))
    dtype = torch.float32 if tiny else torch.bfloat16
    total = torch.cuda.get_device_properties(0).total_memory if device.startswith("cuda") else 1 << 30
    Ts = [32, 64] if tiny else [8192, 16384, 32768, 65536, 131072]
    t_end = time.time() + budget_s
    rows, models = [], {}
    oom = (torch.cuda.OutOfMemoryError,) if device.startswith("cuda") else (MemoryError,)
    cfg = SaliencyConfig(memory="blockwise", loss_segments=("rationale",),
                         flow_segments=("question", "rationale"))
    for L in (1, 2):
        dims = dict(base, num_hidden_layers=L, max_position_embeddings=max(Ts) + 64,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
        models[L] = _bridge(_hf("llama", dims), tok, device, dtype)
    for T in Ts:
        peaks = {}
        for L in (1, 2):
            if time.time() > t_end:
                rows.append({"T": T, "layers": L, "not_run": "time budget spent"})
                continue
            batch = _batch(models[L], 1, T)
            t0 = time.perf_counter()
            try:
                peaks[L] = _peak(device, lambda m=models[L], b=batch, c=cfg: compute_saliency(m, b, c))
                rows.append({"T": T, "layers": L, "peak_bytes": peaks[L],
                             "seconds": round(time.perf_counter() - t0, 2)})
            except oom:
                rows.append({"T": T, "layers": L, "oom": True})
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
        if 1 in peaks and 2 in peaks:
            per_layer = peaks[2] - peaks[1]
            rows.append({"T": T, "per_layer_bytes": per_layer,
                         "predicted_32_layers_bytes": peaks[1] + 31 * per_layer,
                         "fits_90pct": peaks[1] + 31 * per_layer <= 0.9 * total})
    fitting = [r["T"] for r in rows if r.get("fits_90pct")]
    return {"shape": base, "dtype": str(dtype), "device_total_bytes": total, "rows": rows,
            "longest_T_predicted_to_fit_32_layers": max(fitting) if fitting else None,
            "method": "peak allocated (torch.cuda.max_memory_allocated) of one blockwise pass with 1 and "
                      "2 layers at the same T; per-layer = difference; 32 layers = 1-layer peak + 31 x "
                      "per-layer; fits when <= 90% of the device memory"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (checks the script works)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--budget-7b-s", type=float, default=150.0)
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    path = os.path.join(args.out, "gpu_check_dryrun_cpu.json" if args.dry_run else
                        f"gpu_check_{name.replace(' ', '_')}.json")
    os.makedirs(args.out, exist_ok=True)
    from importlib import metadata

    result: dict = {"device": name, "dry_run": args.dry_run, "platform": platform.platform(),
                    "versions": {p: metadata.version(p)
                                 for p in ("torch", "transformers", "transformer-lens")}}
    t0 = time.time()
    for key, fn in (("correctness", lambda: step_correctness(device, args.dry_run)),
                    ("p1_p4_1b", lambda: step_p1_p4(device, args.dry_run)),
                    ("longest_T_7b", lambda: step_7b(device, args.dry_run, args.budget_7b_s))):
        s0 = time.time()
        try:
            result[key] = fn()
        except Exception:
            result[key] = {"error": traceback.format_exc()[-1500:]}
        result[key + "_seconds"] = round(time.time() - s0, 1)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    result["total_seconds"] = round(time.time() - t0, 1)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(f"written {path} ({result['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
