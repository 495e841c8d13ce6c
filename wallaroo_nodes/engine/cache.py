"""The shared model cache: one loaded copy per (folder, dtype, device, attention) in the process.

ComfyUI nodes, the SDK and the Gradio demo all ask this cache, so the same model requested from several
places is loaded once. Outside ComfyUI it is an LRU bounded by a memory budget; ComfyUI's integration (in
the node pack) calls `release` when ComfyUI frees memory.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .pipeline import Pipeline
from .weights import WeightsError, load_model, pick_device, pick_dtype

BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "tiny"


def bundled_models() -> dict[str, Path]:
    """Model folders shipped inside the package, by name."""
    if not BUNDLED_MODELS.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_MODELS.iterdir()) if (p / "config.json").is_file()}


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A bundled model name ('tiny') or a model folder path -> the folder, or an error listing the options."""
    name = DEFAULT_MODEL if model in (None, "") else model
    bundled = bundled_models()
    if isinstance(name, str) and name in bundled:
        return bundled[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path}: not a Wallaroo model folder (no config.json); convert official weights "
                               "with `wallaroo convert`")
        return path.resolve()
    options = ", ".join(repr(k) for k in bundled) or "none bundled"
    raise WeightsError(f"model {str(name)!r} not found: give a model folder path or a bundled model name ({options})")


@dataclass
class _Entry:
    pipeline: Pipeline
    nbytes: int


def _model_bytes(pipe: Pipeline) -> int:
    return sum(t.numel() * t.element_size() for t in pipe.model.state_dict().values())


class ModelCache:
    """Thread-safe LRU of loaded pipelines, evicting least recently used models beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int | None = None):
        env = os.environ.get("WALLAROO_CACHE_BUDGET_GB")
        self.budget_bytes = budget_bytes if budget_bytes is not None else (
            int(float(env) * 2 ** 30) if env else 48 * 2 ** 30)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # how many times a model was actually read from disk (tests, diagnostics)

    @staticmethod
    def key(model: str | os.PathLike | None, dtype: str | torch.dtype | None = "auto",
            device: str | torch.device | None = "auto", attention: str = "auto") -> tuple:
        """The identity of a loaded model: resolved folder, concrete dtype and device, attention setting."""
        folder = resolve_model(model)
        dev = pick_device(device)
        return (str(folder), str(pick_dtype(dtype, dev)), str(dev), attention)

    def get(self, model: str | os.PathLike | None = None, dtype: str | torch.dtype | None = "auto",
            device: str | torch.device | None = "auto", attention: str = "auto") -> Pipeline:
        """The cached pipeline for these settings, loading it (and evicting others) if needed."""
        key = self.key(model, dtype, device, attention)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry.pipeline
            folder, dt, dev, att = key
            model_obj, tokenizer = load_model(folder, dtype=getattr(torch, dt.removeprefix("torch.")), device=dev,
                                              attention=att)
            pipe = Pipeline(model_obj, tokenizer)
            self.loads += 1
            self._entries[key] = _Entry(pipe, _model_bytes(pipe))
            self._evict(keep=key)
            return pipe

    def _evict(self, keep: tuple) -> None:
        while sum(e.nbytes for e in self._entries.values()) > self.budget_bytes and len(self._entries) > 1:
            oldest = next(k for k in self._entries if k != keep)
            self._drop(oldest)

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        device = entry.pipeline.model.device
        del entry
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self, model: str | os.PathLike | None = None) -> int:
        """Unload one model (all its variants) or, with no argument, everything; returns how many were unloaded."""
        with self._lock:
            if model is None:
                keys = list(self._entries)
            else:
                folder = str(resolve_model(model))
                keys = [k for k in self._entries if k[0] == folder]
            for k in keys:
                self._drop(k)
            return len(keys)

    def release_key(self, key: tuple) -> bool:
        """Unload the one variant loaded under `key` (as given by `key()`); False when it was not loaded."""
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def loaded(self) -> list[tuple]:
        """Keys of the models currently in memory, least recently used first."""
        with self._lock:
            return list(self._entries)

    def loaded_bytes(self) -> int:
        """Bytes of weights held by the cache."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())


SHARED_CACHE = ModelCache()
