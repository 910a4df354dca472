"""Benchmark: dpc_lens's batched greedy decoding against Hugging Face's own cached ``generate``.

Same model (the shipped reasoner; a plain ``AutoModelForCausalLM`` loaded from the same
directory for Hugging Face), same prompts, same batches (16, left-padded), same tokens (checked);
process CPU time at one thread, the three runners interleaved in shuffled rounds:

* ``dpc_lens``        — :func:`dpc_lens.generate` as users call it (decodes on the wrapped
  Hugging Face modules when that is bitwise exact and no hook is registered);
* ``dpc_lens_bridge`` — the same with a no-op hook registered, so every step runs through the
  TransformerLens bridge's components (what any hooked decoding pays);
* ``hf``              — ``model.generate(do_sample=False)``.

Target (issue "Scale"): dpc_lens / hf <= 1.15. Writes ``benchmarks/results/decode_<device>.json``.
Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_decode.py [--n 64 --max-new-tokens 48]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import torch
import transformers

from dpc_lens.generation import GenerationConfig, encode_prompts, generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.tasks import get_task, load_examples
from dpc_lens.testbed import shipped_artefacts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    art = shipped_artefacts()
    model = load_model(art["model"], device="cpu")
    adapter = as_adapter(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(art["model"], attn_implementation="eager").eval()
    task = get_task("arith")
    ids = encode_prompts(adapter, [e.question for e in load_examples(art["test"], task)[: args.n]])
    eos, pad = adapter.tokenizer.eos_token_id, adapter.pad_token_id()
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    # the same batches for everyone: dpc_lens batches greedy rows by length, so sort up front
    ids = sorted(ids, key=len)

    def ours():
        return [g.token_ids for g in generate(model, ids, None, cfg, progress=False)]

    def ours_bridge():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: None)]):
            return ours()

    def theirs():
        out = []
        for s in range(0, len(ids), args.batch_size):
            b = ids[s:s + args.batch_size]
            L = max(map(len, b))
            x = torch.tensor([[pad] * (L - len(r)) + r for r in b])
            m = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in b])
            with torch.no_grad():
                o = hf.generate(input_ids=x, attention_mask=m, max_new_tokens=args.max_new_tokens,
                                do_sample=False, pad_token_id=pad, eos_token_id=eos)
            for row in o[:, L:].tolist():
                row = row + [eos]
                out.append(tuple(row[: row.index(eos)]))
        return out

    runners = {"dpc_lens": ours, "dpc_lens_bridge": ours_bridge, "hf": theirs}
    tokens = {k: f() for k, f in runners.items()}  # also the warm-up
    same = tokens["dpc_lens"] == tokens["hf"] == tokens["dpc_lens_bridge"]
    times: dict[str, list[float]] = {k: [] for k in runners}
    rng = random.Random(0)
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        order = list(runners)
        rng.shuffle(order)
        for k in order:
            t0 = time.process_time()
            runners[k]()
            times[k].append(time.process_time() - t0)
        loads.append(os.getloadavg()[0])
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["hf"]))
             for k in ("dpc_lens", "dpc_lens_bridge")}
    result = {
        "benchmark": "decode_vs_hf_generate", "device": "cpu",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()},
        "model": {"n_layers": adapter.n_layers, "d_model": adapter.d_model, "n_heads": adapter.n_heads},
        "n_prompts": len(ids), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "same_tokens": same, "median_cpu_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_vs_hf_generate": ratio,
        "ratio_spread": {k: [min(a / b for a, b in zip(times[k], times["hf"])),
                             max(a / b for a, b in zip(times[k], times["hf"]))] for k in ratio},
        "target": 1.15, "load_avg": {"min": min(loads), "max": max(loads)},
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode_cpu.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    shown = ("same_tokens", "ratio_vs_hf_generate", "ratio_spread")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    print(f"written {path}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
