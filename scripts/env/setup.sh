#!/usr/bin/env bash
# Idempotent: the Python environment for one ComfyUI. Builds $TAV_VENV (default .venv) with CPU
# PyTorch, that ComfyUI's own requirements.txt and this pack's requirements, after fetching the
# ComfyUI: the user's own (COMFYUI_PATH, or the ComfyUI whose custom_nodes holds this pack) or the
# bundled runtime TAV_COMFYUI (default 0.3.75; see scripts/env/comfy_runtime.py). Prints nothing on success.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
VENV=${TAV_VENV:-.venv}
TORCH_VERSION=${TAV_TORCH_VERSION:-2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }

COMFY=$("$VENV/bin/python" scripts/env/comfy_runtime.py bootstrap)
STAMP="$VENV/.tav-setup-v2"
WANT="$COMFY $(cat "$COMFY/requirements.txt" requirements.txt scripts/env/requirements-dev.txt | cksum)"
[ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && exit 0

# PyTorch: an installed one is reused (e.g. TAV_VENV is ComfyUI's own environment). Otherwise a CPU
# build: PyPI's Linux torch pulls gigabytes of CUDA packages, so then the PyTorch CPU index is used.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2046  # the helper prints pip arguments (or nothing)
  pip install $("$VENV/bin/python" scripts/env/torch_index.py "torch==$TORCH_VERSION" torchvision) \
    "torch==$TORCH_VERSION" torchvision
fi
PINS=$("$VENV/bin/python" - <<'PYEOF'
from importlib import metadata
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PYEOF
)
# ComfyUI's own requirements with torch/torchvision held where they are. torchaudio is left out: no
# CPU build matches (the tests use a stand-in, see scripts/env/comfy_runtime.py); only audio nodes need it.
grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=~!;#]|$)' "$COMFY/requirements.txt" > "$VENV/comfyui-requirements.txt"
# shellcheck disable=SC2086
pip install $PINS -r "$VENV/comfyui-requirements.txt" -r requirements.txt -r scripts/env/requirements-dev.txt
# A CUDA torchvision wheel on CPU torch dies at import in its fake-op registrations: guard them.
"$VENV/bin/python" scripts/env/fix_torchvision.py
echo "$WANT" > "$STAMP"
