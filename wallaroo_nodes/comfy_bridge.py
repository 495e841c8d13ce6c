"""Optional ComfyUI integration for the Wallaroo nodes; without ComfyUI every piece quietly does nothing.

ComfyUI is detected by its modules being imported already (this module never imports them first, so
importing it elsewhere has no ComfyUI side effects). Inside ComfyUI:

- model folders are found under `ComfyUI/models/wallaroo/<name>/` (and any `wallaroo:` entry of
  extra_model_paths.yaml) through `folder_paths`; outside, under the folders named by WALLAROO_MODEL_PATHS;
- device "auto" is ComfyUI's device, so `--cpu` runs on the CPU;
- each model in the shared cache is entered in ComfyUI's list of loaded models, so "Unload models",
  `POST /free` and other models' loads release it (the next run loads it again), and the cache's own
  LRU budget is lifted unless WALLAROO_CACHE_BUDGET_GB asks for one;
- image runs advance ComfyUI's progress bar per decoded row with a preview of the rows so far, and
  ComfyUI's cancel stops a run between rows (raised as ComfyUI's InterruptProcessingException).
"""
from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from types import ModuleType
from typing import Callable

from PIL import Image

from .engine.cache import DEFAULT_MODEL, SHARED_CACHE, bundled_models
from .engine.decode import Cancelled
from .engine.pipeline import Pipeline, RowProgress
from .engine.weights import WeightsError

log = logging.getLogger("wallaroo")

FOLDER_KEY = "wallaroo"            # folder_paths name, and the models/ sub-folder
PATHS_ENV = "WALLAROO_MODEL_PATHS"  # extra model search folders (os.pathsep-separated), inside ComfyUI or not

# --- is ComfyUI here? ---------------------------------------------------------------------------------


def _comfy(name: str) -> ModuleType | None:
    """A ComfyUI module, only when running inside ComfyUI (its model management already imported)."""
    if "comfy.model_management" not in sys.modules:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # an old or unusual ComfyUI: that piece of integration is skipped
        log.debug("Wallaroo: ComfyUI module %s unavailable", name, exc_info=True)
        return None


def in_comfyui() -> bool:
    return "comfy.model_management" in sys.modules


def setup() -> None:
    """Called once when ComfyUI imports the pack: register the model folder, lift the cache budget."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        folder_paths.add_model_folder_path(FOLDER_KEY, os.path.join(folder_paths.models_dir, FOLDER_KEY))
    if in_comfyui() and not os.environ.get("WALLAROO_CACHE_BUDGET_GB"):
        # ComfyUI decides when memory is needed elsewhere; a second policy would only fight it.
        SHARED_CACHE.budget_bytes = sys.maxsize


# --- model choices --------------------------------------------------------------------------------------


def model_search_paths() -> list[Path]:
    """Folders whose sub-folders are model folders: ComfyUI's `wallaroo` paths, then WALLAROO_MODEL_PATHS."""
    paths: list[Path] = []
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        try:
            paths += [Path(p) for p in folder_paths.get_folder_paths(FOLDER_KEY)]
        except Exception:
            log.debug("Wallaroo: no '%s' entry in folder_paths", FOLDER_KEY, exc_info=True)
    paths += [Path(p) for p in os.environ.get(PATHS_ENV, "").split(os.pathsep) if p.strip()]
    return paths


def model_choices() -> dict[str, str]:
    """Combo label -> model spec for the cache: bundled names first ('tiny' always, even before it is
    installed, so saved workflows stay valid), then each folder holding a config.json."""
    choices: dict[str, str] = {DEFAULT_MODEL: DEFAULT_MODEL}
    for name in bundled_models():
        choices.setdefault(name, name)
    seen: set[Path] = set()
    for base in model_search_paths():
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if (p / "config.json").is_file()):
            real = folder.resolve()
            if real in seen:
                continue
            seen.add(real)
            label = folder.name if folder.name not in choices else str(folder)
            choices[label] = str(real)
    return choices


def resolve_model(label: str) -> str:
    """The cache spec of a combo label, or an error that says where models go."""
    choices = model_choices()
    if label not in choices:
        where = " or ".join(str(p) for p in model_search_paths()) or f"ComfyUI/models/{FOLDER_KEY}/"
        raise WeightsError(
            f"Wallaroo model {label!r} not found; available: {', '.join(choices)}. Put a converted model folder "
            f"(config.json, tokenizer.json, *.safetensors; see `wallaroo convert`) in a folder of its own under "
            f"{where}, then refresh the model list.")
    spec = choices[label]
    if spec == label and label not in bundled_models():
        raise WeightsError(
            f"the bundled Wallaroo model {label!r} is missing from this installation "
            f"(wallaroo_nodes/models/{label}/); reinstall the node pack, or choose a model folder placed under "
            f"ComfyUI/models/{FOLDER_KEY}/<name>/")
    return spec


def _folder_of(spec: str) -> Path | None:
    bundled = bundled_models()
    if spec in bundled:
        return bundled[spec]
    return Path(spec) if Path(spec).is_absolute() else None


def size_choices() -> list[str]:
    """'default' then every output size (HxW) of the models on offer (unreadable configs are skipped here;
    loading such a model reports why)."""
    from .engine.config import WallarooConfig

    sizes: set[tuple[int, int]] = set()
    for spec in model_choices().values():
        folder = _folder_of(spec)
        try:
            cfg = WallarooConfig.load(folder / "config.json") if folder is not None else None
        except Exception:
            cfg = None
        if cfg is not None:
            sizes.update((int(h), int(w)) for h, w in cfg.protocol.sizes)
    return ["default"] + [f"{h}x{w}" for h, w in sorted(sizes, key=lambda s: (s[0] * s[1], s))]


# --- device ---------------------------------------------------------------------------------------------


def resolve_device(choice: str) -> str:
    """'auto' -> ComfyUI's device inside ComfyUI (honours --cpu), else the engine's choice; 'cuda' -> the
    CUDA device ComfyUI uses, when it uses one."""
    mm = _comfy("comfy.model_management")
    if choice in ("auto", None, ""):
        return str(mm.get_torch_device()) if mm is not None else "auto"
    if choice == "cuda" and mm is not None:
        dev = mm.get_torch_device()
        if getattr(dev, "type", None) == "cuda":
            return str(dev)
    return choice


# --- ComfyUI memory management ---------------------------------------------------------------------------


class ComfyModelEntry:
    """Stands for one cached pipeline in ComfyUI's list of loaded models (`comfy.model_management`).

    ComfyUI's loaded-model bookkeeping (LoadedModel, free_memory, unload_all_models) calls these methods.
    The weights cannot be partly offloaded, so an unload request releases the whole model from the shared
    cache. Only weak references are held, so a model released by anyone else is not kept alive here.
    """

    def __init__(self, key: tuple, pipe: Pipeline):
        self.key = key
        self._model = weakref.ref(pipe.model)
        self.load_device = pipe.model.device
        self.offload_device = pipe.model.device
        self.parent = None
        self.size = sum(t.numel() * t.element_size() for t in pipe.model.state_dict().values())

    @property
    def model(self):
        return self._model()

    def _alive(self) -> bool:
        return self._model() is not None and self.key in SHARED_CACHE.loaded()

    # sizes
    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.size if self._alive() else 0

    def current_loaded_device(self):
        return self.load_device

    def model_dtype(self):
        model = self._model()
        return model.dtype if model is not None else None

    # loading: the weights already sit on their device
    def model_patches_to(self, device) -> None:
        pass

    def model_patches_models(self) -> list:
        return []

    def partially_load(self, device, extra_memory=0, force_patch_weights=False) -> int:
        return 0

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_clone(self, other) -> bool:
        return other is self

    def clone_has_same_weights(self, other) -> bool:
        return other is self

    # unloading
    def partially_unload(self, device_to, memory_to_free=0) -> int:
        return 0  # all or nothing

    def detach(self, unpatch_all: bool = True) -> None:
        # ComfyUI detaches with unpatch_all=False only to re-register the same model; keep it then.
        if unpatch_all:
            self._detach_comfy_finalizers()
            _release(self.key, "ComfyUI freed memory")

    def _detach_comfy_finalizers(self) -> None:
        """ComfyUI's LoadedModel watches the weights with a finalizer that prunes its model list. Releasing the
        weights here frees them at once (nothing else holds them), which would fire that finalizer in the
        middle of ComfyUI's own unloading loop (it then pops an index that is gone). ComfyUI detaches the
        finalizer right after this call anyway; do it first."""
        mm = _comfy("comfy.model_management")
        for loaded in list(getattr(mm, "current_loaded_models", ())):
            try:
                if loaded.model is self and getattr(loaded, "model_finalizer", None) is not None:
                    loaded.model_finalizer.detach()
            except Exception:
                log.debug("Wallaroo: could not detach a ComfyUI finalizer", exc_info=True)

    def cleanup(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"ComfyModelEntry({self.key[0]!r}, {self.key[1]}, {self.key[2]})"


_entries: dict[tuple, ComfyModelEntry] = {}
_entries_lock = threading.RLock()


def _release(key: tuple, why: str) -> None:
    """Drop a model from the cache and make sure its memory is really returned before ComfyUI goes on."""
    with _entries_lock:
        entry = _entries.pop(key, None)
    weights = entry._model if entry is not None else (lambda: None)
    if SHARED_CACHE.release_key(key):
        if weights() is not None:  # held only by reference cycles now: collect them, or the memory stays taken
            gc.collect()
        log.info("Wallaroo: released %s (%s, %s): %s", Path(key[0]).name, key[1], key[2], why)


def _weights_bytes(folder: Path, dtype: str) -> int:
    """About how many bytes the weights take once loaded in `dtype` (for freeing room before a load)."""
    from .engine.config import WallarooConfig

    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    try:
        saved = WallarooConfig.load(folder / "config.json").weights_dtype
    except Exception:
        return stored
    width = {"float32": 4, "bfloat16": 2, "float16": 2}
    return stored * width.get(dtype.removeprefix("torch."), 4) // width.get(saved, 4)


def acquire(model: str, dtype: str = "auto", device: str = "auto", attention: str = "auto") -> Pipeline:
    """The pipeline from the shared cache (loading it if needed); inside ComfyUI, room is made first and the
    model is entered in ComfyUI's loaded-model list, as ComfyUI's own models are before each use."""
    key = SHARED_CACHE.key(model, dtype, device, attention)
    mm = _comfy("comfy.model_management")
    if mm is not None and key not in SHARED_CACHE.loaded():
        import torch

        dev = torch.device(key[2])
        if dev.type == "cuda" and dev.index is None:  # ComfyUI's devices carry an index; match them
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cpu":
            need = _weights_bytes(Path(key[0]), key[1])
            mm.free_memory(need * 1.1 + mm.minimum_inference_memory(), dev)
    fresh = key not in SHARED_CACHE.loaded()
    pipe = SHARED_CACHE.get(model, dtype, device, attention)
    if fresh:
        log.info("Wallaroo: loaded %s (%s, %s)", Path(key[0]).name, key[1], key[2])
    if mm is not None:
        with _entries_lock:
            entry = _entries.get(key)
            if entry is None or entry.model is not pipe.model:
                entry = _entries[key] = ComfyModelEntry(key, pipe)
        try:
            mm.load_models_gpu([entry], force_full_load=True)
        except TypeError:  # ComfyUI versions before force_full_load
            mm.load_models_gpu([entry])
    return pipe


def release_all() -> int:
    """Unload every Wallaroo model (ComfyUI's list is tidied by its own finalizers)."""
    with _entries_lock:
        _entries.clear()
    return SHARED_CACHE.release()


# --- progress, preview, cancel ------------------------------------------------------------------------


def _preview_grid(images: list[Image.Image], max_size: int) -> Image.Image:
    """The batch side by side (at most 4 a row) fit in max_size: small images are enlarged by a whole factor
    with nearest (crisp code blocks, where ComfyUI's own resize would blur them), large ones reduced."""
    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (128, 128, 128))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    scale = max(1, max_size // max(grid.size))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    if max(grid.size) > max_size:
        grid.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    return grid


class Progress:
    """ComfyUI's progress bar, preview and cancel check for one node run; inert outside ComfyUI.

    `rows(total)` gives the on_row callback of an image run; `step(done, total)` moves the bar for text;
    `should_cancel` is the engine's cancel check.
    """

    def __init__(self, total: int):
        utils = _comfy("comfy.utils")
        self.bar = utils.ProgressBar(total) if utils is not None and hasattr(utils, "ProgressBar") else None
        self.total = total
        self._mm = _comfy("comfy.model_management")
        args = getattr(_comfy("comfy.cli_args"), "args", None)
        self.preview_size = int(getattr(args, "preview_size", 512) or 512)

    def step(self, done: int, total: int | None = None, preview: Image.Image | None = None) -> None:
        if self.bar is None:
            return
        if total is not None:
            self.total = total
        self.bar.update_absolute(done, self.total, ("JPEG", preview, self.preview_size) if preview else None)

    def on_row(self, offset: int = 0) -> Callable[[RowProgress], None]:
        """An on_row callback for one image run whose rows count from `offset` on the bar."""

        def callback(p: RowProgress) -> None:
            if self.bar is None:
                return
            # A preview costs a VQ decode: make one only when someone (ComfyUI's server) listens.
            wanted = getattr(self.bar, "hook", None) is not None
            preview = _preview_grid(p.preview(), self.preview_size) if wanted else None
            self.step(offset + p.rows_done, None, preview)

        return callback

    def should_cancel(self) -> bool:
        return bool(self._mm is not None and self._mm.processing_interrupted())


def interrupted(exc: Cancelled) -> BaseException:
    """What to raise for a cancelled run: ComfyUI's interrupt inside ComfyUI (it shows no error then and
    resets its flag), the engine's Cancelled elsewhere."""
    mm = _comfy("comfy.model_management")
    if mm is None or not hasattr(mm, "InterruptProcessingException"):
        return exc
    try:
        mm.throw_exception_if_processing_interrupted()  # resets ComfyUI's flag and raises
    except mm.InterruptProcessingException as interrupt:
        return interrupt
    return mm.InterruptProcessingException()


__all__ = ["setup", "in_comfyui", "model_choices", "resolve_model", "size_choices", "resolve_device", "acquire",
           "release_all", "Progress", "interrupted", "ComfyModelEntry"]
