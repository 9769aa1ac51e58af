#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU (<= 8 min): tuning 24 frames x 512^2 (bf16/fp16,
# checkpointing on/off, 500 steps extrapolated, peak VRAM), invert 50 + sample 50 (cfg), attention
# backends; one table; then the dynamic VRAM check (dynamic_vram_check.py, a few minutes more). --dry-run:
# the same code on the CPU at tiny sizes (what CI runs). Other arguments go to
# scripts/benchmarks/benchmark_gpu.py (--frames, --size, --steps, --precisions, --json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "${TAV_VENV:-.venv}/bin/python" ]; then PY=${TAV_VENV:-.venv}/bin/python; else PY=python3; fi
fi
"$PY" scripts/benchmarks/benchmark_gpu.py "$@"
# Dynamic VRAM (ComfyUI 0.28+ on NVIDIA): the pack on a ModelPatcherDynamic model against the classic patcher;
# says SKIPPED where this ComfyUI or machine has none (e.g. TAV_COMFYUI=0.33.0 TAV_VENV=.venv-0.33.0 runs it).
case " $* " in
  *" --dry-run "*) ;;  # the CPU has no dynamic VRAM (the check's own --dry-run keeps it working)
  *) "$PY" scripts/benchmarks/dynamic_vram_check.py ;;
esac
# SDXL that fits a 24 GB card (issue 26): one tune of full-size random SDXL at 16 x 1024^2 with the compact
# setting (temporal_width 128, query_rank 16, recompute_all): peak VRAM next to the CPU prediction (docs/real-size.md).
case " $* " in
  *" --dry-run "*) ;;  # full-size SDXL on a CPU needs GBs and minutes
  *) "$PY" scripts/benchmarks/benchmark_sdxl_fit.py --device cuda --parts params measure --families sdxl \
       --settings compact+recompute --sizes 16x128 ;;
esac
# Real size (issue 25): full SD1.5 (random weights, scripts/models/full_size.py) at 24 and 8 frames x 512^2,
# this pack and the official code (fp16 autocast), one tune step and one guided call each, measured at
# the target itself: the GPU figures next to the CPU predictions in docs/real-size.md.
case " $* " in
  *" --dry-run "*) ;;  # full-size SD1.5 at 512^2 on a CPU takes hours per step
  *) "$PY" scripts/benchmarks/benchmark_real_size.py --device cuda --autocast fp16 --target 24x64 8x64 ;;
esac
