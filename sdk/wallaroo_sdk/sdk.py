"""`Wallaroo`: understand, generate and edit images from Python, over the same engine and model cache as the
ComfyUI nodes.

    from wallaroo_sdk import Wallaroo
    wal = Wallaroo.load("tiny")                       # or a converted model folder
    images = wal.generate("a red circle on the left", seed=1)

Images go in as PIL images, numpy arrays (H x W [x C], uint8 or float in [0, 1]) or file paths, and come out
as PIL images. Every returned image carries the settings that made it in `image.info["wallaroo"]`, and
`save_png` writes them into the PNG's text chunks. Sampling knobs left at None take the model's own defaults
(its config.json: the paper's settings for the official model, tuned ones for the bundled tiny model).
"""
from __future__ import annotations

import io
import json
import os
import random
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from . import __version__

if TYPE_CHECKING:  # the engine imports torch; keep `import wallaroo_sdk` light
    from wallaroo_nodes.engine.config import WallarooConfig
    from wallaroo_nodes.engine.pipeline import Pipeline

__all__ = ["Wallaroo", "CancelToken", "Cancelled", "Progress", "ImageLike", "to_pil", "save_png",
           "read_png_metadata", "METADATA_KEY"]

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]
"""A PIL image, a numpy array (H x W, H x W x 1/3/4 or 1 x H x W x C; uint8, uint16, bool or float in [0, 1])
or the path of an image file."""

METADATA_KEY = "wallaroo"  # image.info key and PNG text chunk holding the JSON settings
SEED_RANGE = 2 ** 31


class Cancelled(Exception):
    """Raised by a call whose cancel token was set; partial results are discarded."""


def _engine_cancelled() -> type[BaseException]:
    from wallaroo_nodes.engine.decode import Cancelled as EngineCancelled

    return EngineCancelled


class CancelToken:
    """Set it from any thread (a UI button, a signal handler) to stop a running call between image rows or
    text tokens; the call then raises `Cancelled`. Reusable after `reset()`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask running calls that were given this token to stop."""
        self._event.set()

    def reset(self) -> None:
        """Clear the request so the token can be used again."""
        self._event.clear()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:  # the engine's should_cancel form
        return self._event.is_set()

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"


CancelLike = Union[CancelToken, threading.Event, Callable[[], bool], None]


def _cancel_check(cancel: CancelLike) -> Callable[[], bool] | None:
    if cancel is None:
        return None
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise TypeError(f"cancel must be a CancelToken, a threading.Event or a callable, got {type(cancel).__name__}")


@dataclass
class Progress:
    """Where a running call is: image rows decoded (generate, edit) or text pieces produced (understand)."""

    task: str
    done: int
    total: int
    _preview: Callable[[], list[Image.Image]] | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def preview(self) -> list[Image.Image]:
        """The images decoded so far, undecoded rows grey (empty for understanding)."""
        return self._preview() if self._preview is not None else []


ProgressCallback = Callable[[Progress], None]


# --- images in and out --------------------------------------------------------------------------------

def _input_error(message: str) -> ValueError:
    from wallaroo_nodes.engine.images import ImageInputError  # a ValueError; one error type for callers

    return ImageInputError(message)


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image from a PIL image, numpy array (or array-like such as a CPU tensor) or file path.

    Paths are read fully (so a truncated file fails here, naming the file) and EXIF rotation is applied.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image))
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor, without importing torch
        image = image.detach().cpu().numpy()
    try:
        array = np.asarray(image)
    except Exception:
        raise _input_error(f"expected an image (PIL image, numpy array or file path), got {type(image).__name__}") from None
    if array.dtype == object or array.ndim == 0:
        raise _input_error(f"expected an image (PIL image, numpy array or file path), got {type(image).__name__}")
    return _array_to_pil(array)


def _open_path(path: Path) -> Image.Image:
    if not path.exists():
        raise _input_error(f"{path}: image file not found")
    if path.is_dir():
        raise _input_error(f"{path}: is a folder, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            out = ImageOps.exif_transpose(im)
            if out is im:
                out = im.copy()
    except UnidentifiedImageError:
        raise _input_error(f"{path}: not a readable image (unknown or unsupported format)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise _input_error(f"{path}: the image data could not be decoded ({exc})") from None
    return out


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise _input_error(f"an image array must be H x W, H x W x 1/3/4 or 1 x H x W x C; got shape {list(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise _input_error(f"the image array is empty (shape {list(a.shape)})")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        finite = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0  # [0, 1] floats, else already 0..255
        a = np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        wide = a.astype(np.int64)
        a = (np.clip(wide, 0, 65535) // 257 if wide.max(initial=0) > 255 else np.clip(wide, 0, 255)).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise _input_error(f"unsupported image array dtype {a.dtype}")
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(a), mode)


def _png_text(metadata: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    full = {k: v for k, v in metadata.items() if v is not None}
    for key in ("prompt", "instruction", "question", "seed", "model", "task"):
        if key in full:
            info.add_text(key, str(full[key]))
    settings = {k: v for k, v in full.items() if k not in ("prompt", "instruction", "question", "seed", "model", "task")}
    info.add_text("settings", json.dumps(settings, ensure_ascii=False, sort_keys=True))
    info.add_text(METADATA_KEY, json.dumps(full, ensure_ascii=False, sort_keys=True))
    info.add_text("Software", f"wallaroo {__version__}")
    return info


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write a PNG with the settings in its text chunks (prompt, seed, model, settings, and all as JSON under
    "wallaroo"); `metadata` defaults to `image.info["wallaroo"]`. Written to a temporary file and renamed, so an
    existing file is replaced only by a complete one."""
    path = Path(path)
    meta = metadata if metadata is not None else image.info.get(METADATA_KEY) or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=_png_text(meta))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a Wallaroo PNG was made with (its "wallaroo" text chunk); {} for other images."""
    with Image.open(path) as im:
        raw = getattr(im, "text", {}).get(METADATA_KEY) or im.info.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_text(image.info.get(METADATA_KEY) or {}))
    return buf.getvalue()


# --- the model ----------------------------------------------------------------------------------------

class Wallaroo:
    """One Wallaroo model, loaded once through the shared model cache (the ComfyUI nodes use the same cache,
    so loading a model the nodes already hold costs nothing)."""

    def __init__(self, pipeline: Pipeline, path: str | os.PathLike | None = None):
        self.pipeline = pipeline
        self.path = Path(path) if path is not None else None

    @classmethod
    def load(cls, model: str | os.PathLike | None = "tiny", *, device: str = "auto", dtype: str = "auto",
             attention: str = "auto") -> "Wallaroo":
        """Load a bundled model by name ("tiny") or a converted model folder.

        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N". dtype: "auto" (bf16/fp16 on GPU, fp32
        on CPU), "fp32", "bf16", "fp16". attention: "auto", "sdpa" or "xformers".
        """
        from wallaroo_nodes.engine.cache import SHARED_CACHE, resolve_model

        folder = resolve_model(model)
        return cls(SHARED_CACHE.get(folder, dtype=dtype, device=device, attention=attention), folder)

    # --- facts about the model --------------------------------------------------------------------
    @property
    def config(self) -> WallarooConfig:
        return self.pipeline.config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Supported output sizes as (height, width)."""
        return self.pipeline.sizes

    @property
    def default_size(self) -> tuple[int, int]:
        return tuple(self.config.protocol.default_size)

    @property
    def device(self) -> str:
        return str(self.pipeline.model.device)

    @property
    def dtype(self) -> str:
        return str(self.pipeline.model.dtype).removeprefix("torch.")

    @property
    def can_edit(self) -> bool:
        return bool(self.config.has_edit)

    def __repr__(self) -> str:
        return f"Wallaroo({self.name!r}, path={str(self.path)!r}, device={self.device!r}, dtype={self.dtype!r})"

    # --- understanding ----------------------------------------------------------------------------
    def understand(self, image: ImageLike | None, question: str, *, max_new_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                   seed: int | None = 0, progress: ProgressCallback | None = None,
                   cancel: CancelLike = None) -> str:
        """Answer a question about an image (or, with image=None, a text-only question). Greedy by default."""
        return "".join(self.understand_stream(image, question, max_new_tokens=max_new_tokens, temperature=temperature,
                                              top_p=top_p, top_k=top_k, seed=seed, progress=progress,
                                              cancel=cancel)).strip()

    def understand_stream(self, image: ImageLike | None, question: str, *, max_new_tokens: int | None = None,
                          temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                          seed: int | None = 0, progress: ProgressCallback | None = None,
                          cancel: CancelLike = None) -> Iterator[str]:
        """Like `understand`, but yield the answer in pieces as they are produced. Inputs are checked now, before
        the first piece is asked for."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty; ask something about the image")
        pil = None
        if image is not None:
            from wallaroo_nodes.engine.images import load_rgb

            pil = load_rgb(to_pil(image))
        check = _cancel_check(cancel)
        limit = self.config.sampling.understand_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        stream = self.pipeline.understand_stream(pil, question, max_new_tokens=limit, temperature=temperature,
                                                 top_p=top_p, top_k=top_k, seed=self._seed(seed), should_cancel=check)
        return self._follow(stream, limit, progress, check)

    def _follow(self, stream: Iterator[str], limit: int, progress: ProgressCallback | None,
                check: Callable[[], bool] | None) -> Iterator[str]:
        engine_cancelled = _engine_cancelled()
        done = 0
        try:
            for piece in stream:
                done += 1
                if progress is not None:
                    progress(Progress("understand", min(done, limit), limit))
                yield piece
                if check is not None and check():
                    raise Cancelled(f"cancelled after {done} pieces of text")
        except engine_cancelled as exc:
            raise Cancelled(str(exc)) from None
        finally:
            stream.close()

    # --- generation and editing -------------------------------------------------------------------
    def generate(self, prompt: str, *, size: tuple[int, int] | str | None = None, cfg: float | None = None,
                 seed: int | None = 0, n: int = 1, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, progress: ProgressCallback | None = None,
                 cancel: CancelLike = None) -> list[Image.Image]:
        """n images for a text prompt (English or Chinese).

        size: (height, width) or "HxW" from `sizes` (default: the model's default size). cfg: guidance scale
        (1 = none). seed: None draws a random seed (recorded in each image's metadata). The n images of one call
        are decoded as one batch from one seed.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
        from wallaroo_nodes.engine.images import check_size

        hw = check_size(size or self.default_size, self.sizes)
        seed = self._seed(seed)
        images = self._run("generate", lambda on_row, check: self.pipeline.generate(
            prompt, size=hw, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, n=n,
            on_row=on_row, should_cancel=check), progress, cancel)
        return self._tag(images, "generate", {"prompt": prompt}, hw, cfg, temperature, top_k, top_p, seed, n)

    def edit(self, image: ImageLike, instruction: str, *, cfg: float | None = None, seed: int | None = 0,
             n: int = 1, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             progress: ProgressCallback | None = None, cancel: CancelLike = None) -> list[Image.Image]:
        """n edited versions of an image, at the supported size closest to its aspect ratio."""
        if not self.can_edit:
            raise ValueError(f"model {self.name!r} has no editing heads; use a model that can edit")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("the edit instruction is empty; say what to change")
        source = to_pil(image)
        from wallaroo_nodes.engine.images import closest_size, load_rgb

        rgb = load_rgb(source)
        hw = closest_size(rgb.height, rgb.width, self.sizes)
        seed = self._seed(seed)
        images = self._run("edit", lambda on_row, check: self.pipeline.edit(
            rgb, instruction, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, n=n,
            on_row=on_row, should_cancel=check), progress, cancel)
        extra = {"instruction": instruction}
        if isinstance(image, (str, os.PathLike)):
            extra["source"] = str(image)
        return self._tag(images, "edit", extra, hw, cfg, temperature, top_k, top_p, seed, n)

    def _run(self, task: str, call: Callable, progress: ProgressCallback | None,
             cancel: CancelLike) -> list[Image.Image]:
        check = _cancel_check(cancel)
        on_row = None
        if progress is not None:
            def on_row(rp) -> None:
                progress(Progress(task, rp.rows_done, rp.rows_total, rp.preview))
        if check is not None and check():
            raise Cancelled("cancelled before starting")
        try:
            return call(on_row, check)
        except _engine_cancelled() as exc:
            raise Cancelled(str(exc)) from None

    def _tag(self, images: list[Image.Image], task: str, text: dict[str, str], size: tuple[int, int],
             cfg: float | None, temperature: float | None, top_k: int | None, top_p: float | None, seed: int,
             n: int) -> list[Image.Image]:
        d = self.config.sampling
        meta = {"task": task, **text, "model": self.name, "model_path": str(self.path) if self.path else None,
                "seed": seed, "n": n, "size": f"{size[0]}x{size[1]}",
                "cfg": float(getattr(d, f"{task}_cfg") if cfg is None else cfg),
                "temperature": float(getattr(d, f"{task}_temperature") if temperature is None else temperature),
                "top_k": int(getattr(d, f"{task}_top_k") if top_k is None else top_k),
                "top_p": float(getattr(d, f"{task}_top_p") if top_p is None else top_p),
                "version": __version__}
        for i, im in enumerate(images):
            im.info[METADATA_KEY] = {**meta, "index": i}
        return images

    @staticmethod
    def _seed(seed: int | None) -> int:
        if seed is None:
            return random.SystemRandom().randrange(SEED_RANGE)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        return int(seed)

    # --- saving -----------------------------------------------------------------------------------
    @staticmethod
    def save(image: Image.Image, path: str | os.PathLike, **extra: Any) -> Path:
        """Save an output image as PNG with its settings (plus `extra`) in the text chunks."""
        meta = dict(image.info.get(METADATA_KEY) or {})
        meta.update(extra)
        return save_png(image, path, meta)
