#!/usr/bin/env bash
# Idempotent: builds .venv with CPU torch, ComfyUI's runtime deps and the pack's deps,
# then fetches a ComfyUI 0.3.75 source tree into .cache/comfyui (unless COMFYUI_PATH is set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TAV_VENV:-.venv}
STAMP="$VENV/.tav-setup-v1"

if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip "$@"; }
  # torch first and pinned: an unpinned torch requirement would pull the multi-GB CUDA build.
  pip install -q --disable-pip-version-check "torch==${TAV_TORCH_VERSION:-2.13.0}"
  TORCH_PIN="torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
  pip install -q --disable-pip-version-check "$TORCH_PIN" -r scripts/requirements-dev.txt
  # torchvision on PyPI is a CUDA build; its fake-op registrations fail on CPU torch at import.
  # Register them only when torchvision's compiled ops exist (transforms keep working).
  "$VENV/bin/python" scripts/fix_torchvision.py
  touch "$STAMP"
fi

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f .cache/comfyui/main.py ]; then
  "$VENV/bin/python" scripts/comfy_runtime.py bootstrap
fi
