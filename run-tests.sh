#!/usr/bin/env bash
# Set up .venv with the test extras, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh test

# The Gradio demo's browser test drives Debian's Chromium at /usr/bin/chromium (never a browser Playwright
# downloads). Install it when missing and possible; otherwise the test is skipped with the reason set here.
if [ ! -x /usr/bin/chromium ] && [ -z "${WALLAROO_CHROMIUM_STATUS:-}" ]; then
  mkdir -p test-artifacts
  log=test-artifacts/chromium-install.log
  if [ "$(id -u)" != 0 ]; then
    export WALLAROO_CHROMIUM_STATUS="not running as root, so \`apt-get install -y chromium\` was not tried"
  elif ! command -v apt-get >/dev/null 2>&1; then
    export WALLAROO_CHROMIUM_STATUS="apt-get is not available on this system"
  else
    echo "Installing Chromium for the browser test: apt-get install -y chromium (log: $log)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y chromium >"$log" 2>&1 \
        || { apt-get update && apt-get install -y chromium; } >>"$log" 2>&1; then
      # A small CJK font so Chinese prompts are legible in the screenshots; optional.
      apt-get install -y fonts-wqy-microhei >>"$log" 2>&1 || true
    else
      export WALLAROO_CHROMIUM_STATUS="\`apt-get install -y chromium\` failed (see $log)"
    fi
  fi
fi

exec .venv/bin/python -m pytest "$@"
