#!/usr/bin/env bash
# Set up .venv with the test extras, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh test
exec .venv/bin/python -m pytest "$@"
