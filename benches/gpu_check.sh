#!/usr/bin/env bash
# The GPU check (benches/gpu_check.py): every CUDA path end to end, step times and peak memory, < 5 min on a GPU.
#   bash benches/gpu_check.sh              # on a CUDA machine: writes runs/gpu/check.{json,md}
#   bash benches/gpu_check.sh --dry-run    # anywhere: the same code paths on the CPU at tiny sizes, no timings
set -euo pipefail
cd "$(dirname "$0")/.."
out="${GPU_CHECK_OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python benches/gpu_check.py --json "$out/check.json" --markdown "$out/check.md" "$@"
