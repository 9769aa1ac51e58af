#!/usr/bin/env bash
# The test command (README, CI): build the environment if needed, then run every test.
# Extra arguments go to pytest, e.g. scripts/test.sh -k frame_attention
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
