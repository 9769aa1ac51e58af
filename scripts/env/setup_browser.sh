#!/usr/bin/env bash
# The browser for tests/test_frontend.py only (the demo needs none): Debian's chromium (as root,
# only where /usr/bin/chromium is missing; TAV_CHROMIUM names another) and playwright-core in
# .cache/node (git-ignored). Never `npx playwright install`: its browser download may be unreachable.
# A failure only warns: the other tests still run and test_frontend.py fails saying what is missing.
set -uo pipefail
cd "$(dirname "$0")/../.."
PLAYWRIGHT_CORE_VERSION=1.65.1
STAMP=".cache/node/.tav-browser-v1-$PLAYWRIGHT_CORE_VERSION"
warn() { echo "setup_browser: $*; tests/test_frontend.py will fail" >&2; exit 0; }

if [ -z "${TAV_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup_browser: installing Debian chromium (about 400 MB)" >&2
    apt-get update -q >/dev/null || warn "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
      || warn "apt-get install chromium failed"
  else
    warn "/usr/bin/chromium is missing; install Debian's chromium (apt-get install chromium) as root"
  fi
fi
if [ ! -f "$STAMP" ] || [ ! -f .cache/node/node_modules/playwright-core/package.json ]; then
  command -v npm >/dev/null || warn "npm (Node.js >= 20) is missing"
  mkdir -p .cache/node
  npm install --prefix .cache/node --no-audit --no-fund --loglevel=error \
    "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null || warn "npm install playwright-core failed"
  touch "$STAMP"
fi
