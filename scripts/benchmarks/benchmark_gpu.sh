#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU (<= 8 min): tuning 24 frames x 512^2 (bf16/fp16,
# checkpointing on/off, 500 steps extrapolated, peak VRAM), invert 50 + sample 50 (cfg), attention
# backends; one table. --dry-run: the same code on the CPU at tiny sizes (what CI runs). Other
# arguments go to scripts/benchmarks/benchmark_gpu.py (--frames, --size, --steps, --precisions, --json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "${TAV_VENV:-.venv}/bin/python" ]; then PY=${TAV_VENV:-.venv}/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/benchmarks/benchmark_gpu.py "$@"
