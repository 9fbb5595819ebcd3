#!/usr/bin/env bash
# The GPU checks in one short command (see benchmarks/gpu_check.py and benchmarks/memory_scale.py):
# 1. one table: HF vs TransformerLens backend, bf16 vs float32 metrics and speed, a two-device map when two GPUs
#    are visible;
# 2. memory against tokens: peak device and host memory of one evaluation of a GPT-2-small-shaped model at 32k and
#    1M tokens, each in a fresh process (the CPU cannot run 1M tokens of this model in reasonable time).
#   benchmarks/gpu_check.sh             # on a machine with one or more GPUs
#   benchmarks/gpu_check.sh --dry-run   # the same steps on the CPU with tiny models (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" benchmarks/gpu_check.py "$@"
if [[ " $* " == *" --dry-run "* ]]; then
  "$PYTHON" benchmarks/memory_scale.py --subject tiny --n-tokens 1024,4096 --batch-size 16 --device cpu
else
  "$PYTHON" benchmarks/memory_scale.py --subject gpt2-shaped --n-tokens 32768,1048576 --batch-size 32 --device cuda
fi
