#!/usr/bin/env bash
# Create (or reuse) .venv with torch and this package. Usage: scripts/setup-venv.sh [extras, e.g. test]
# torch is installed first and explicitly so no dependency resolution can pull a multi-GB CUDA build;
# set WALLAROO_TORCH to choose another spec (e.g. "torch==2.14.1" or a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "${WALLAROO_TORCH:-torch==2.13.0}"
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
stamp=".venv/.installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet -e "$target"
  touch "$stamp"
fi
