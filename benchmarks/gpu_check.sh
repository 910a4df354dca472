#!/usr/bin/env bash
# One GPU check for issue 21 (blockwise saliency), under 8 minutes on one H200:
#   1. every memory mode (normal, lean, blockwise) on CUDA in fp32 and bf16 vs float64 references
#   2. P1 (saliency / plain fwd+bwd per mode) and P4 (batch 16 vs 1) on a 1B-class random Llama
#   3. the longest T for a 7B-shaped random stack in bf16 (1 and 2 layers, per-layer extrapolation)
# JSON: benchmarks/results/gpu_check_<device>.json. Dry run on CPU with tiny sizes:
#   benchmarks/gpu_check.sh --dry-run     (writes benchmarks/results/gpu_check_dryrun_cpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1
# hard cap below the 8-minute budget; the JSON is written after each step, so a cut run keeps
# what it measured
exec timeout 460 "$PY" benchmarks/gpu_check.py "$@"
