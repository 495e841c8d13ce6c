"""Hosting entry point for the Wallaroo Gradio demo (a Hugging Face Space runs `python app.py` here).

The model is $WALLAROO_MODEL (a model folder, or a bundled model name), else the bundled "tiny". The address
comes from Gradio's own variables ($GRADIO_SERVER_NAME, $GRADIO_SERVER_PORT), which hosts such as Spaces set.
The engine and the demo are imported from this checkout, not from an installed package: a Space installs its
requirements before it copies the repository in (see gradio_demo/README.md). Locally, prefer
`python -m gradio_demo`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradio_demo.app import build_demo, launch_options  # noqa: E402

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_options())
