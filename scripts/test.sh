#!/usr/bin/env bash
# The test command (README, CI): build the environment(s) if needed, then run every test on every
# ComfyUI there is to test. A user's own ComfyUI (COMFYUI_PATH, or the ComfyUI whose custom_nodes
# holds this pack) is the one tested. Otherwise: the bundled 0.3.75 (in .venv) and every newer
# runtime found in ../shared/runtimes (0.33.0, in .venv-0.33.0). TAV_COMFYUI="0.33.0" picks runtimes.
# Fails if any run fails or runs no test. Extra arguments go to pytest: scripts/test.sh -k frame_attention
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/env/setup_browser.sh

# "own" (the user's ComfyUI), else the bundled runtimes available here (TAV_COMFYUI narrows them).
read -r -a RUNTIMES <<<"$(${PYTHON:-python3} scripts/env/comfy_runtime.py runtimes)"

failed=()
for runtime in "${RUNTIMES[@]}"; do
  if [ "$runtime" = own ] || [ "$runtime" = 0.3.75 ]; then venv=${TAV_VENV:-.venv}; else venv=.venv-$runtime; fi
  [ "$runtime" = own ] || export TAV_COMFYUI=$runtime
  echo "=== ComfyUI $runtime (environment $venv) ===" >&2
  start=$SECONDS
  TAV_VENV=$venv scripts/env/setup.sh
  echo "setup: $((SECONDS - start)) s" >&2
  start=$SECONDS
  # pytest exits 5 when it collected nothing; tests/conftest.py also fails a run in which no test passed.
  "$venv/bin/python" -m pytest "$@" || failed+=("$runtime")
  echo "=== ComfyUI $runtime: tests $((SECONDS - start)) s ===" >&2
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED on ComfyUI ${failed[*]}" >&2
  exit 1
fi
echo "All tests passed on ComfyUI ${RUNTIMES[*]}" >&2
