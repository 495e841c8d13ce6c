"""Wallaroo SDK: a Python API over the engine (`Wallaroo`), the `wallaroo` command line, the official-weights
downloader and a client for running our workflows on a remote ComfyUI.

    from wallaroo_sdk import Wallaroo
    wal = Wallaroo.load("tiny")
    image = wal.generate("a red circle on the left")[0]

Importing this package stays light (no torch): names are imported on first use, and the engine only when a
model is loaded.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Wallaroo": "sdk", "CancelToken": "sdk", "Cancelled": "sdk", "Progress": "sdk", "to_pil": "sdk",
    "save_png": "sdk", "read_png_metadata": "sdk",
    "ComfyClient": "remote", "ComfyError": "remote", "WorkflowResult": "remote",
    "download_official": "download", "DownloadError": "download",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .download import DownloadError, download_official
    from .remote import ComfyClient, ComfyError, WorkflowResult
    from .sdk import CancelToken, Cancelled, Progress, Wallaroo, read_png_metadata, save_png, to_pil


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wallaroo_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
