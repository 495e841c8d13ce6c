"""The Wallaroo Gradio demo: understand, generate and edit images in the browser.

`build_demo(model)` returns a queued `gr.Blocks` over one model from the shared engine cache; `python -m
gradio_demo` launches it locally and the repository's `app.py` is the entry point a hosting service (a Hugging
Face Space) runs. Everything model-related goes through `wallaroo_nodes.engine` exactly as the other front
doors do; this module only converts between Gradio values and the engine's PIL images and strings.

How a request runs:

* Gradio's queue admits at most one event per loaded model at a time (all three tabs share one concurrency
  id) and holds at most `Limits.queue_size` waiting events; further visitors are told the queue is full.
* The engine call runs in a worker thread that also holds the model's lock, so even a run that is being
  stopped finishes its current row before the next one starts. Rows (or text pieces) come back through a
  queue; the handler yields a partly decoded preview after each row and reports progress.
* Stop sets the run's cancel flag (the engine checks it between rows and raises `Cancelled`), and Gradio
  cancels the event; a client that cancels its job (`/cancel`) closes the handler, which sets the same flag.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import io
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image, ImageOps, UnidentifiedImageError

from wallaroo_nodes.engine import images
from wallaroo_nodes.engine.cache import DEFAULT_MODEL, SHARED_CACHE, resolve_model
from wallaroo_nodes.engine.decode import Cancelled
from wallaroo_nodes.engine.pipeline import Pipeline, RowProgress

__all__ = ["Limits", "InputRejected", "WallarooDemo", "build_demo", "launch_options", "EXAMPLE_SCENES",
           "write_example_images"]

log = logging.getLogger("gradio_demo")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
MODEL_ENV = "WALLAROO_MODEL"

# Example input images: shapes-world scenes rendered at their canvas size (`write_example_images` re-creates
# them; a test checks that the files match).
EXAMPLE_SCENES = {"shapes-4.png": 4, "shapes-9.png": 9, "shapes-17.png": 17}

# Prompts in the form the shapes world describes its scenes, so the bundled tiny model knows them.
GENERATE_EXAMPLES = [  # (prompt, (height, width) it was drawn at)
    ("A large red circle on the left, on a white background.", (64, 64)),
    ("一个红色的大圆形在左边，背景是白色。", (64, 64)),
    ("A large purple square on the left and a small orange circle in the centre, on a white background.", (48, 80)),
    ("一个黄色的小三角形在中间，背景是蓝色。", (80, 48)),
]
UNDERSTAND_EXAMPLES = [
    ("shapes-4.png", "Describe the image."),
    ("shapes-4.png", "图中有几个物体？"),
    ("shapes-9.png", "What is the colour of the large shape on the left?"),
    ("shapes-17.png", "背景是什么颜色？"),
]
EDIT_EXAMPLES = [
    ("shapes-4.png", "Make the square on the left yellow."),
    ("shapes-4.png", "背景改为黄色。"),
    ("shapes-9.png", "Turn the square on the left into a triangle."),
    ("shapes-17.png", "去掉中间的正方形。"),
]

# Pixel art stays crisp when the browser scales a small image up.
CSS = """
.wallaroo-pixels img { image-rendering: pixelated; }
.wallaroo-status { display: flex; flex-direction: column; gap: 6px; padding: 4px 2px; min-height: 2.5em; }
.wallaroo-status progress { width: 100%; height: 10px; accent-color: var(--color-accent); }
"""


class InputRejected(ValueError):
    """An input is over a limit or unusable; the message is shown to the visitor as it is."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many requests may wait."""

    max_image_pixels: int = 4096 * 4096
    max_file_bytes: int = 10 * 2 ** 20
    max_prompt_chars: int = 500
    max_images: int = 4
    max_new_tokens: int = 256
    queue_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_file_bytes", "max_prompt_chars", "max_images", "max_new_tokens",
                     "queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


@dataclass
class RunRecord:
    """One engine run, for logs and tests: what ran, how far it got and how it ended."""

    task: str
    session: str
    status: str = "waiting"  # waiting -> running -> done | cancelled | error
    rows_done: int = 0
    rows_total: int = 0
    pieces: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ended: threading.Event = field(default_factory=threading.Event, repr=False)  # the engine call returned


def _megabytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f}".rstrip("0").rstrip(".") + " MB"


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f}".rstrip("0").rstrip(".") + " megapixels"


def _size_label(size: tuple[int, int]) -> str:
    h, w = size
    shape = "square" if h == w else ("landscape" if w > h else "portrait")
    return f"{h} × {w} ({shape})"


def _size_value(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def status_html(text: str, done: int | None = None, total: int | None = None) -> str:
    """The progress line of the Generate and Edit tabs: a bar (rows decoded) and a sentence."""
    bar = ""
    if total:
        bar = f'<progress max="{int(total)}" value="{int(done or 0)}"></progress>'
    return f'<div class="wallaroo-status">{bar}<span>{html.escape(text)}</span></div>'


def _stopped_html(record: RunRecord) -> str:
    if not record.rows_done:
        return status_html("Stopped before the first row.")
    return status_html(f"Stopped after row {record.rows_done} of {record.rows_total}.", record.rows_done,
                       record.rows_total)


def uploaded_image(**kwargs) -> gr.Image:
    """An image input whose upload reaches the handler as a file path without being decoded first, so that
    the handler checks file size and pixel count (and says which limit was hit) before reading any pixels.
    gr.Image itself opens every upload, and an unreadable file fails there with an internal message. (Only
    this instance's preprocess changes: subclassing a component makes Gradio write a .pyi next to this file.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    decode = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error("The image could not be read (try PNG or JPEG).", print_exception=False) from exc

    component.preprocess = preprocess
    return component


_MODEL_LOCKS: "weakref.WeakKeyDictionary[Pipeline, threading.Lock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(pipe: Pipeline) -> threading.Lock:
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(pipe)
        if lock is None:
            lock = _MODEL_LOCKS[pipe] = threading.Lock()
        return lock


class WallarooDemo:
    """The demo's handlers over one loaded model. `build()` lays them out as a Gradio app."""

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str = "auto", device: str = "auto",
                 attention: str = "auto", limits: Limits | None = None):
        name = model if model not in (None, "") else (os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
        self.model_name = str(name)
        self.limits = limits or Limits()
        self.folder = resolve_model(name)
        self.pipe: Pipeline = SHARED_CACHE.get(self.folder, dtype=dtype, device=device, attention=attention)
        # One engine run at a time per loaded model: Gradio's queue admits one event per model, and this lock
        # also covers the row a stopped run is still finishing (shared by every demo over the same pipeline).
        self.lock = _model_lock(self.pipe)
        self.concurrency_id = f"wallaroo-model:{self.folder}"
        self.runs: deque[RunRecord] = deque(maxlen=200)
        self._active: dict[tuple[str, str], dict[threading.Event, RunRecord]] = {}  # (session, task) -> runs
        self._active_lock = threading.Lock()

    # --- input checks -----------------------------------------------------------------------------
    def check_text(self, text: str | None, what: str) -> str:
        """A non-empty prompt within the length limit."""
        text = (text or "").strip()
        if not text:
            raise InputRejected(f"The {what} is empty: type something first.")
        limit = self.limits.max_prompt_chars
        if len(text) > limit:
            raise InputRejected(f"The {what} is {len(text)} characters long; this demo accepts at most {limit}.")
        return text

    def check_count(self, n: Any) -> int:
        limit = self.limits.max_images
        try:
            count = int(n)
        except (TypeError, ValueError):
            raise InputRejected(f"The number of images must be a whole number from 1 to {limit}.") from None
        if count != n or not 1 <= count <= limit:
            raise InputRejected(f"The number of images must be a whole number from 1 to {limit}; got {n}.")
        return count

    @staticmethod
    def check_seed(seed: Any) -> int:
        if seed is None or seed == "":
            return 0
        try:
            value = int(seed)
        except (TypeError, ValueError, OverflowError):
            raise InputRejected(f"The seed must be a whole number; got {seed!r}.") from None
        if value != seed and not isinstance(seed, str):
            raise InputRejected(f"The seed must be a whole number; got {seed!r}.")
        return value

    @staticmethod
    def check_cfg(cfg: Any, default: float) -> float:
        if cfg is None:
            return default
        try:
            value = float(cfg)
        except (TypeError, ValueError):
            raise InputRejected(f"The guidance scale must be a number; got {cfg!r}.") from None
        if not 1.0 <= value <= 20.0:
            raise InputRejected(f"The guidance scale must be between 1 and 20; got {cfg}.")
        return value

    def load_image(self, value: str | os.PathLike | Image.Image | None) -> Image.Image:
        """An uploaded image (a file path from Gradio, or a PIL image) within the file-size and pixel limits."""
        if value is None or value == "":
            raise InputRejected("No image: upload one (or pick an example) first.")
        max_pixels = self.limits.max_image_pixels
        if isinstance(value, Image.Image):
            image = value
        else:
            path = Path(value)
            try:
                nbytes = path.stat().st_size
            except OSError:
                raise InputRejected("The uploaded image could not be read; upload it again.") from None
            if nbytes > self.limits.max_file_bytes:
                raise InputRejected(f"The image file is {_megabytes(nbytes)}; this demo accepts files up to "
                                    f"{_megabytes(self.limits.max_file_bytes)}.")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    image = Image.open(path)  # reads the header only: the size is known before decoding
            except Image.DecompressionBombError:
                raise InputRejected(f"The image has far more pixels than this demo accepts (at most "
                                    f"{_megapixels(max_pixels)}); make it smaller.") from None
            except (UnidentifiedImageError, OSError, ValueError):
                raise InputRejected("The file is not an image this demo can read (try PNG or JPEG).") from None
        width, height = image.size
        if width * height > max_pixels:
            raise InputRejected(f"The image is {width} × {height} pixels ({_megapixels(width * height)}); this "
                                f"demo accepts images up to {_megapixels(max_pixels)}.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = ImageOps.exif_transpose(image)  # also decodes the pixels
                image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputRejected(f"The image data could not be decoded ({exc}).") from None
        return image

    # --- cancellation -----------------------------------------------------------------------------
    @staticmethod
    def _session(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "local"

    def _register(self, record: RunRecord, flag: threading.Event) -> None:
        with self._active_lock:
            self._active.setdefault((record.session, record.task), {})[flag] = record

    def _unregister(self, record: RunRecord, flag: threading.Event) -> None:
        key = (record.session, record.task)
        with self._active_lock:
            runs = self._active.get(key)
            if runs is not None:
                runs.pop(flag, None)
                if not runs:
                    del self._active[key]

    def stop(self, task: str, request: gr.Request | None = None) -> list[RunRecord]:
        """Ask this session's runs of one task to stop at the next row (or token); returns those runs."""
        with self._active_lock:
            runs = dict(self._active.get((self._session(request), task), {}))
        for flag in runs:
            flag.set()
        return list(runs.values())

    def stop_and_report(self, task: str, request: gr.Request | None = None, wait: float = 10.0) -> str:
        """The Stop button: stop the session's run, wait (a little) for the engine, and say where it stopped."""
        runs = self.stop(task, request)
        deadline = time.monotonic() + wait
        for record in runs:
            record.ended.wait(max(0.0, deadline - time.monotonic()))
        if not runs:
            return status_html("Stopped.")
        record = runs[-1]
        if not record.ended.is_set():
            if record.status == "waiting":  # for the model's lock: it will not start
                return status_html("Stopped before it started.")
            return status_html("Stopping after the current row…", record.rows_done, record.rows_total)
        if record.status == "done":
            return status_html("Finished before it could be stopped.", record.rows_done, record.rows_total)
        return _stopped_html(record)

    # --- running the engine -----------------------------------------------------------------------
    def _run(self, record: RunRecord, work: Callable[[Callable[[tuple], None], Callable[[], bool]], Any]
             ) -> Iterator[tuple[str, Any]]:
        """Run `work(emit, should_cancel)` in a worker thread holding the model lock; yield what it emits,
        then ("done", result). Closing this iterator early stops the engine at its next row or token."""
        cancel = threading.Event()
        self._register(record, cancel)
        self.runs.append(record)
        events: queue.SimpleQueue = queue.SimpleQueue()

        def target() -> None:
            try:
                with self.lock:
                    if cancel.is_set():
                        raise Cancelled("stopped before it started")
                    record.status, record.started = "running", time.monotonic()
                    result = work(events.put, cancel.is_set)
                record.status, record.seconds = "done", time.monotonic() - record.started
                events.put(("done", result))
            except BaseException as exc:  # handed to the handler's thread, which reports it
                record.status = "cancelled" if isinstance(exc, Cancelled) else "error"
                record.seconds = time.monotonic() - record.started
                events.put(("error", exc))
            finally:
                record.ended.set()

        thread = threading.Thread(target=target, name=f"wallaroo-demo-{record.task}", daemon=True)
        thread.start()
        held: list[tuple] = []
        try:
            while True:
                item = held.pop() if held else events.get()
                # A newer row supersedes a preview not yet shown (the handler may be slower than the engine).
                while item[0] in ("row", "text"):
                    try:
                        nxt = events.get_nowait()
                    except queue.Empty:
                        break
                    if item[0] == "text" and nxt[0] == "text":  # send text that piled up as one update
                        item = ("text", item[1] + nxt[1])
                    elif item[0] == "text":
                        held.append(nxt)
                        break
                    else:
                        item = nxt
                kind, payload = item
                if kind == "error":
                    raise payload
                yield item
                if kind == "done":
                    return
        finally:
            # Closed early (the visitor stopped, a client cancelled its job, the connection dropped) or over:
            # either way the engine must not go on; it stops at its next row or token.
            cancel.set()
            self._unregister(record, cancel)

    @staticmethod
    def _fail(exc: BaseException) -> gr.Error:
        if isinstance(exc, ValueError):  # input problems (InputRejected, engine ValueErrors): say what is wrong
            return gr.Error(str(exc), print_exception=False)
        log.exception("engine run failed", exc_info=exc)
        return gr.Error(f"The model failed ({type(exc).__name__}); try again or with other settings.")

    # --- the three handlers -----------------------------------------------------------------------
    def understand(self, image: str | Image.Image | None, question: str, request: gr.Request | None = None
                   ) -> Iterator[str]:
        """Stream the answer to a question about an image (the image is optional)."""
        try:
            question = self.check_text(question, "question")
            picture = self.load_image(image) if image not in (None, "") else None
        except InputRejected as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        limit = min(self.limits.max_new_tokens, self.pipe.config.sampling.understand_max_new_tokens)
        record = RunRecord("understand", self._session(request))

        def work(emit, should_cancel):
            for piece in self.pipe.understand_stream(picture, question, max_new_tokens=limit,
                                                     should_cancel=should_cancel):
                record.pieces += 1
                emit(("text", piece))

        answer = ""
        try:
            with contextlib.closing(self._run(record, work)) as stream:
                for kind, payload in stream:
                    if kind == "text":
                        answer += payload
                        yield answer
            yield answer.strip()
        except Cancelled:
            yield answer.strip()
        except Exception as exc:
            raise self._fail(exc) from None

    def generate(self, prompt: str, size: str | None, cfg: float | None, seed: Any, n: Any,
                 request: gr.Request | None = None, progress: gr.Progress = gr.Progress()
                 ) -> Iterator[tuple[list[str], str]]:
        """Yield (images so far, status) after each decoded row, then the finished images."""
        try:
            prompt = self.check_text(prompt, "prompt")
            count = self.check_count(n)
            seed = self.check_seed(seed)
            scale = self.check_cfg(cfg, self.pipe.config.sampling.generate_cfg)
            out_size = images.check_size(size or self.pipe.config.protocol.default_size, self.pipe.sizes)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        record = RunRecord("generate", self._session(request))

        def work(emit, should_cancel):
            return self.pipe.generate(prompt, size=out_size, cfg=scale, seed=seed, n=count,
                                      on_row=self._row_reporter(record, emit), should_cancel=should_cancel)

        what = f"{count} image{'s' if count > 1 else ''} of {out_size[0]} × {out_size[1]}"
        yield from self._image_stream(record, work, what, progress, lambda ims: [self._served(im) for im in ims])

    def edit(self, image: str | Image.Image | None, instruction: str, cfg: float | None, seed: Any,
             request: gr.Request | None = None, progress: gr.Progress = gr.Progress()
             ) -> Iterator[tuple[tuple[str, str], str]]:
        """Yield ((before, after so far), status) after each decoded row, then the finished edit."""
        try:
            instruction = self.check_text(instruction, "instruction")
            source = self.load_image(image)
            seed = self.check_seed(seed)
            scale = self.check_cfg(cfg, self.pipe.config.sampling.edit_cfg)
            rgb = images.load_rgb(source)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        out_h, out_w = images.closest_size(rgb.height, rgb.width, self.pipe.sizes)
        # "Before" is the source as the model sees it: covered and centre-cropped to the output size.
        before = ImageOps.fit(rgb, (out_w, out_h), Image.Resampling.BICUBIC)
        record = RunRecord("edit", self._session(request))

        def work(emit, should_cancel):
            return self.pipe.edit(rgb, instruction, cfg=scale, seed=seed, on_row=self._row_reporter(record, emit),
                                  should_cancel=should_cancel)

        yield from self._image_stream(record, work, f"an edit of {out_h} × {out_w}", progress,
                                      lambda ims: (self._served(before), self._served(ims[0])))

    @staticmethod
    def _served(image: Image.Image) -> str:
        """Write `image` as a PNG into Gradio's file cache, complete before its name appears; returns the path."""
        # Gradio's own PIL save writes in place at a path named by the content, so two requests that show the
        # same picture at once (a shared "before", a repeated seed) could serve a half-written or empty file.
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        folder = Path(get_upload_folder()) / hashlib.sha256(data).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "image.png"
        if not path.exists():
            staging = folder / f".image.{threading.get_ident()}.{time.monotonic_ns()}.png"
            staging.write_bytes(data)
            os.replace(staging, path)  # atomic: readers see no file or the whole file
        return str(path)

    @staticmethod
    def _row_reporter(record: RunRecord, emit: Callable[[tuple], None]) -> Callable[[RowProgress], None]:
        def on_row(p: RowProgress) -> None:
            record.rows_done, record.rows_total = p.rows_done, p.rows_total
            if p.rows_done < p.rows_total:  # the last row's image is the result itself
                emit(("row", p))
        return on_row

    def _image_stream(self, record: RunRecord, work, what: str, progress: gr.Progress,
                      shape: Callable[[list[Image.Image]], Any]) -> Iterator[tuple[Any, str]]:
        # gr.Progress shows while the event is pending (and reaches API clients); once previews stream, the
        # status component carries the bar.
        progress(0.0, desc=f"Waiting for the model to make {what}…")
        shown = None
        try:
            with contextlib.closing(self._run(record, work)) as stream:
                for kind, payload in stream:
                    if kind == "row":
                        p: RowProgress = payload
                        progress((p.rows_done, p.rows_total), desc="Decoding rows", unit="rows")
                        shown = shape(p.preview())  # rendered here, off the engine's thread
                        yield shown, status_html(f"Decoding {what}: row {p.rows_done} of {p.rows_total}…",
                                                 p.rows_done, p.rows_total)
                    elif kind == "done":
                        yield shape(payload), status_html(f"Done: {what} in {record.seconds:.1f} s.",
                                                          record.rows_total, record.rows_total)
        except Cancelled:
            yield (shown if shown is not None else gr.skip()), _stopped_html(record)
        except Exception as exc:
            raise self._fail(exc) from None

    # --- layout -----------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        """The three-tab app with its queue configured."""
        cfg_defaults = self.pipe.config.sampling
        sizes = self.pipe.sizes
        default_size = tuple(self.pipe.config.protocol.default_size)
        size_choices = [(_size_label(s), _size_value(s)) for s in sizes]
        ex = {name: str(EXAMPLES_DIR / name) for name in EXAMPLE_SCENES}
        lim = self.limits
        run_kw = dict(concurrency_limit=1, concurrency_id=self.concurrency_id, show_progress="full")

        # Uploads and every streamed preview are files in Gradio's cache: clear old ones on a long-running host.
        with gr.Blocks(title="Wallaroo", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
            gr.Markdown(
                "# Wallaroo\n"
                "One autoregressive model that understands, generates and edits images (Qwen2.5-VL backbone + "
                f"LlamaGen VQ). Running model: **{self.folder.name}**. Prompts may be English or Chinese.")
            with gr.Tabs():
                with gr.Tab("Understand", id="understand"):
                    with gr.Row():
                        with gr.Column():
                            u_image = uploaded_image(label="Image", height=280, sources=["upload", "clipboard"],
                                                     elem_classes="wallaroo-pixels", elem_id="understand-image")
                            u_question = gr.Textbox(label="Question", lines=2, max_length=lim.max_prompt_chars,
                                                    placeholder="What is in the picture? / 图中有什么？",
                                                    elem_id="understand-question")
                            with gr.Row():
                                u_run = gr.Button("Ask", variant="primary", elem_id="understand-run")
                                u_stop = gr.Button("Stop", variant="stop", elem_id="understand-stop")
                        with gr.Column():
                            u_answer = gr.Textbox(label="Answer", lines=6, interactive=False,
                                                  elem_id="understand-answer")
                    gr.Examples([[ex[f], q] for f, q in UNDERSTAND_EXAMPLES], inputs=[u_image, u_question],
                                cache_examples=False)

                with gr.Tab("Generate", id="generate"):
                    with gr.Row():
                        with gr.Column():
                            g_prompt = gr.Textbox(label="Prompt (English or Chinese)", lines=3,
                                                  max_length=lim.max_prompt_chars,
                                                  placeholder="A large red circle on the left, on a white "
                                                              "background.", elem_id="generate-prompt")
                            g_size = gr.Dropdown(size_choices, value=_size_value(default_size),
                                                 label="Size (height × width)")
                            with gr.Row():
                                g_cfg = gr.Slider(1.0, 20.0, value=float(cfg_defaults.generate_cfg), step=0.5,
                                                  label="Guidance (cfg)")
                                g_n = gr.Slider(1, lim.max_images, value=1, step=1, label="Number of images",
                                                elem_id="generate-count")
                            g_seed = gr.Number(value=0, precision=0, label="Seed (change it for other images)")
                            with gr.Row():
                                g_run = gr.Button("Generate", variant="primary", elem_id="generate-run")
                                g_stop = gr.Button("Stop", variant="stop", elem_id="generate-stop")
                        with gr.Column():
                            g_gallery = gr.Gallery(label="Images", format="png", columns=2, height=420,
                                                   object_fit="contain", elem_classes="wallaroo-pixels",
                                                   elem_id="generate-gallery")
                            g_status = gr.HTML(status_html("Ready."), label="Progress", elem_id="generate-status")
                    gen_examples = [[p, _size_value(s) if s in sizes else _size_value(default_size)]
                                    for p, s in GENERATE_EXAMPLES]
                    gr.Examples(gen_examples, inputs=[g_prompt, g_size], cache_examples=False)

                with gr.Tab("Edit", id="edit"):
                    with gr.Row():
                        with gr.Column():
                            e_image = uploaded_image(label="Image to edit", height=280,
                                                     sources=["upload", "clipboard"], elem_classes="wallaroo-pixels",
                                                     elem_id="edit-image")
                            e_instruction = gr.Textbox(label="Instruction (English or Chinese)", lines=2,
                                                       max_length=lim.max_prompt_chars,
                                                       placeholder="Make the square on the left yellow.",
                                                       elem_id="edit-instruction")
                            with gr.Row():
                                e_cfg = gr.Slider(1.0, 20.0, value=float(cfg_defaults.edit_cfg), step=0.5,
                                                  label="Guidance (cfg)")
                                e_seed = gr.Number(value=0, precision=0, label="Seed")
                            with gr.Row():
                                e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                                e_stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
                        with gr.Column():
                            e_result = gr.ImageSlider(label="Before / after", format="png", type="pil",
                                                      height=420, elem_classes="wallaroo-pixels",
                                                      elem_id="edit-result")
                            e_status = gr.HTML(status_html("Ready."), label="Progress", elem_id="edit-status")
                    gr.Examples([[ex[f], t] for f, t in EDIT_EXAMPLES], inputs=[e_image, e_instruction],
                                cache_examples=False)

            gr.Markdown(
                f"Limits: images up to {_megapixels(lim.max_image_pixels)} and {_megabytes(lim.max_file_bytes)}, "
                f"prompts up to {lim.max_prompt_chars} characters, up to {lim.max_images} images per request. "
                "Requests wait in line for the model; Stop ends a run after the current row.")

            u_event = u_run.click(self.understand, [u_image, u_question], u_answer, api_name="understand",
                                  show_progress_on=u_answer, **run_kw)
            g_event = g_run.click(self.generate, [g_prompt, g_size, g_cfg, g_seed, g_n], [g_gallery, g_status],
                                  api_name="generate", show_progress_on=g_status, **run_kw)
            e_event = e_run.click(self.edit, [e_image, e_instruction, e_cfg, e_seed], [e_result, e_status],
                                  api_name="edit", show_progress_on=e_status, **run_kw)

            def stopper(task: str):
                def stop(request: gr.Request) -> str:
                    return self.stop_and_report(task, request)

                def stop_quietly(request: gr.Request) -> None:
                    self.stop(task, request)
                return stop_quietly if task == "understand" else stop

            # Stop skips the queue; `cancels` also drops a request still waiting in line.
            for button, task, event, status in ((u_stop, "understand", u_event, None),
                                                (g_stop, "generate", g_event, g_status),
                                                (e_stop, "edit", e_event, e_status)):
                button.click(stopper(task), None, status, queue=False, cancels=[event], api_visibility="private")

        demo.queue(default_concurrency_limit=1, max_size=lim.queue_size)
        return demo


def build_demo(model: str | os.PathLike | None = None, *, limits: Limits | None = None, dtype: str = "auto",
               device: str = "auto", attention: str = "auto") -> gr.Blocks:
    """The demo app for a model folder or bundled model name (default: $WALLAROO_MODEL, else "tiny").

    The handlers object is available as `demo.wallaroo` (tests and embedding code use it)."""
    handlers = WallarooDemo(model, dtype=dtype, device=device, attention=attention, limits=limits)
    demo = handlers.build()
    demo.wallaroo = handlers
    return demo


def launch_options(limits: Limits | None = None) -> dict[str, Any]:
    """Keyword arguments for `demo.launch()` that the app needs wherever it runs (theme, CSS, upload cap)."""
    lim = limits or Limits()
    system = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Noto Sans", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return dict(
        # System fonts: no requests to font CDNs (which some visitors cannot reach).
        theme=gr.themes.Soft(font=system, font_mono=mono),
        css=CSS,
        # Gradio itself refuses uploads far beyond the limit; the handlers give the readable message.
        max_file_size=4 * lim.max_file_bytes,
        show_error=True,
    )


def write_example_images(dest: Path = EXAMPLES_DIR) -> list[Path]:
    """Render the shapes-world example scenes to PNG files (the files shipped in gradio_demo/examples/)."""
    from wallaroo_nodes.shapes import render, scene_from_seed

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, seed in EXAMPLE_SCENES.items():
        path = dest / name
        render(scene_from_seed(seed)).save(path, optimize=True)
        out.append(path)
    return out
