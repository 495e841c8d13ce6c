"""Wallaroo in the browser: a Gradio app over the engine (understand, generate, edit).

    python -m gradio_demo [--model PATH_OR_NAME] [--host 127.0.0.1] [--port 7860]

or, from Python, `build_demo(model)` -> a queued `gr.Blocks` and `launch_options()` for `launch()`. The names
are imported on first use so that `import gradio_demo` stays light.
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_demo", "launch_options", "Limits", "InputRejected", "WallarooDemo"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'gradio_demo' has no attribute {name!r}")
