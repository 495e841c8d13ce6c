#!/usr/bin/env bash
# Set up .venv (CPU torch, this package, the demo extra), then launch the Gradio demo on the bundled tiny
# model at http://127.0.0.1:7860. Extra arguments go to `python -m gradio_demo` (e.g. --model PATH --port N).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh demo
exec .venv/bin/python -m gradio_demo "$@"
