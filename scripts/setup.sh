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

# Browser for tests/test_frontend.py: Debian's chromium (as root, only where /usr/bin/chromium is
# missing; TAV_CHROMIUM names another) and playwright-core in .cache/node (git-ignored). Never
# `npx playwright install`: its browser download is unreachable here. A failure here only warns:
# the other tests still run and test_frontend.py fails saying what is missing. (Each step has its
# own `|| return 1`: set -e does not apply inside a function called as `f || ...`.)
PLAYWRIGHT_CORE_VERSION=1.65.1
BROWSER_STAMP=".cache/node/.tav-browser-v1-$PLAYWRIGHT_CORE_VERSION"
setup_browser() {
  if [ -z "${TAV_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing Debian chromium (about 400 MB)" >&2
      apt-get update -q >/dev/null || return 1
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null || return 1
    else
      echo "setup: /usr/bin/chromium is missing; install Debian's chromium (apt-get install chromium) as root" >&2
      return 1
    fi
  fi
  if [ ! -f "$BROWSER_STAMP" ] || [ ! -f .cache/node/node_modules/playwright-core/package.json ]; then
    command -v npm >/dev/null || { echo "setup: npm (Node.js >= 20) is missing" >&2; return 1; }
    mkdir -p .cache/node || return 1
    npm install --prefix .cache/node --no-audit --no-fund --loglevel=error \
      "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null || return 1
    touch "$BROWSER_STAMP"
  fi
}
setup_browser || echo "setup: WARNING: the browser for tests/test_frontend.py is not installed; that test will fail" >&2
