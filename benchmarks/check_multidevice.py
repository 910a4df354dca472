"""GPU check: a model split over devices gives the saliency of the single-device model.

Needs CUDA. With two or more GPUs the layers are split over cuda:0 and cuda:1; with one GPU,
over cuda:0 and the CPU. A small random Llama (8 layers, d_model 256, GQA) in float32 and in
bfloat16 (fp32 accumulation of the saliency product); compares every reduction with the model
loaded on cuda:0 alone, in the normal and the lean mode, and the greedy tokens. Writes
``benchmarks/results/multidevice_<gpu>.json`` and exits non-zero on a mismatch.

Usage: ``python benchmarks/check_multidevice.py``
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from dpc_lens.generation import GenerationConfig, generate
from dpc_lens.model import load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model

PIECES = [[("question", "ann has 3 apples and bob"), ("rationale", " gives 2 more . how many")],
          [("question", "the cat"), ("rationale", " has 3 pens and 2 books")]]


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA; nothing checked")
        return 2
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    n = 8
    d = save_tiny_hf_model("llama", tempfile.mkdtemp(), seed=4, n_layers=n, d_model=256, n_heads=8,
                           n_kv_heads=4, n_ctx=512)
    dm = {"model.embed_tokens": "cuda:0", "model.rotary_emb": "cuda:0", "model.norm": second,
          "lm_head": second, **{f"model.layers.{i}": ("cuda:0" if i < n // 2 else second) for i in range(n)}}
    rows, ok = [], True
    for dtype in ("float32", "bfloat16"):
        one = load_model(d, device="cuda:0", dtype=dtype)
        two = load_model(d, device_map=dm, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        soft = SoftPrompt((torch.randn(3, 256, generator=g) * 0.3).to(getattr(torch, dtype)))
        cfg = dict(keep_full=True, column_targets=("rationale",), row_sources=("question",))
        for memory in ("normal", "lean"):
            a = compute_saliency(one, PromptBatch.from_pieces(one, PIECES, soft), SaliencyConfig(**cfg))
            b = compute_saliency(two, PromptBatch.from_pieces(two, PIECES, soft),
                                 SaliencyConfig(memory=memory, **cfg))
            err = float((a.full.float().cpu() - b.full.float().cpu()).abs().max() / a.full.abs().max())
            tol = 1e-5 if dtype == "float32" else 2e-2
            rows.append({"dtype": dtype, "memory": memory, "max_rel_err": err, "tol": tol,
                         "result_device": str(b.full.device)})
            ok &= err <= tol
        gc = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
        same = generate(one, [[5, 6, 7], [8, 9]], None, gc, progress=False) == \
            generate(two, [[5, 6, 7], [8, 9]], None, gc, progress=False)
        rows.append({"dtype": dtype, "greedy_tokens_equal": same})
        ok &= same
    out = {"gpu": torch.cuda.get_device_name(0), "devices": ["cuda:0", second], "rows": rows, "ok": ok}
    path = os.path.join(os.path.dirname(__file__), "results",
                        f"multidevice_{torch.cuda.get_device_name(0).replace(' ', '_')}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
