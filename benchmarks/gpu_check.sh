#!/usr/bin/env bash
# The GPU checks of the model backends in one short command, one table (see benchmarks/gpu_check.py):
# HF vs TransformerLens backend, bf16 vs float32 metrics and speed, a two-device map when two GPUs are visible.
#   benchmarks/gpu_check.sh             # on a machine with one or more GPUs
#   benchmarks/gpu_check.sh --dry-run   # the same rows on the CPU with a tiny model (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
