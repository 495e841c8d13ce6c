"""The Gradio demo: its endpoints through gradio_client against a live server on loopback, its limits, queue,
concurrency and Stop, its command line and hosting entry points.

A random-weights tiny model stands in for the bundled one, so results are checked for kind and shape (text,
images of the right sizes, gallery length), never for content.
"""
from __future__ import annotations

import contextlib
import html
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (in the test extra)")
from gradio_client import Client, handle_file  # noqa: E402

from helpers import make_model_folder  # noqa: E402

from gradio_demo.app import (EXAMPLE_SCENES, EXAMPLES_DIR, EDIT_EXAMPLES, GENERATE_EXAMPLES,  # noqa: E402
                             UNDERSTAND_EXAMPLES, InputRejected, Limits, WallarooDemo, build_demo, launch_options)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(EXAMPLES_DIR / "shapes-4.png")        # 64 x 64 -> edited at 32 x 32
WIDE_EXAMPLE = str(EXAMPLES_DIR / "shapes-9.png")   # 80 wide x 48 high -> edited at 32 x 48 (h x w)
# gradio's own use of pandas warns under pandas 3; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting'"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
PROMPT = "A large red circle on the left, on a white background."
# Small limits so that over-limit inputs are cheap to make.
LIMITS = Limits(max_image_pixels=512 * 512, max_file_bytes=200_000, max_prompt_chars=200, max_images=3,
                queue_size=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(demo: gr.Blocks, limits: Limits) -> str:
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                **launch_options(limits))
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("gradio-model"))


@pytest.fixture(scope="module")
def server(model_folder):
    demo = build_demo(model_folder, limits=LIMITS)
    url = start(demo, LIMITS)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server[1], verbose=False)


def text(status_html: str) -> str:
    """The sentence of a status line (which also holds a progress bar)."""
    return html.unescape(re.sub(r"<[^>]+>", "", status_html)).strip()


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


class SlowRows:
    """Wraps a pipeline so each image row is followed by a pause (after it is reported): a run then lasts
    long enough to be stopped part-way, and rows are seen one by one."""

    def __init__(self, pipe, delay: float):
        self.pipe, self.delay = pipe, delay

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _slow(self, on_row):
        def slow(progress):
            on_row(progress)
            time.sleep(self.delay)
        return slow

    def generate(self, *args, on_row=None, **kw):
        return self.pipe.generate(*args, on_row=self._slow(on_row), **kw)

    def edit(self, *args, on_row=None, **kw):
        return self.pipe.edit(*args, on_row=self._slow(on_row), **kw)


@contextlib.contextmanager
def slow_rows(handlers: WallarooDemo, delay: float):
    original = handlers.pipe
    handlers.pipe = SlowRows(original, delay)
    try:
        yield
    finally:
        handlers.pipe = original


# --- the three endpoints over HTTP ---------------------------------------------------------------------
def test_understand_returns_text(client):
    answer = client.predict(handle_file(EXAMPLE), "Describe the image.", api_name="/understand")
    assert isinstance(answer, str)


def test_understand_streams_text(client):
    job = client.submit(handle_file(EXAMPLE), "图中有几个物体？", api_name="/understand")
    final = job.result(timeout=120)
    outputs = job.outputs()
    assert outputs and all(isinstance(o, str) for o in outputs)
    assert final == outputs[-1]


def test_generate_returns_a_gallery_of_the_requested_size_and_count(client):
    gallery, status = client.predict(PROMPT, "48x32", 2.0, 0, 2, api_name="/generate")
    assert len(gallery) == 2
    assert [image_size(item["image"]) for item in gallery] == [(32, 48), (32, 48)]  # PIL: (width, height)
    assert text(status).startswith("Done")


def test_generate_chinese_prompt(client):
    gallery, _ = client.predict("一个红色的大圆形在左边，背景是白色。", "32x48", 1.0, 7, 1, api_name="/generate")
    assert [image_size(item["image"]) for item in gallery] == [(48, 32)]


def test_generate_streams_rows_with_undecoded_rows_grey(server, client):
    with slow_rows(server[0].wallaroo, 0.5):  # the handler shows only the newest row when rows come faster
        job = client.submit(PROMPT, "48x32", 2.0, 3, 1, api_name="/generate")
        job.result(timeout=120)
    outputs = job.outputs()
    statuses = [text(status) for _, status in outputs]
    assert statuses[:2] == ["Decoding 1 image of 48 × 32: row 1 of 3…",
                            "Decoding 1 image of 48 × 32: row 2 of 3…"]
    assert statuses[-1].startswith("Done")
    with Image.open(outputs[0][0][0]["image"]) as first:
        pixels = np.asarray(first.convert("RGB"))
    assert pixels.shape == (48, 32, 3)
    assert (pixels[16:] == 128).all(), "rows not decoded yet are grey in the preview"


def test_edit_returns_before_and_after_at_the_output_size(client):
    (before, after), status = client.predict(handle_file(WIDE_EXAMPLE), "Turn the square on the left into a "
                                             "triangle.", 2.0, 0, api_name="/edit")
    assert image_size(before) == image_size(after) == (48, 32)
    assert text(status).startswith("Done")


def test_only_the_three_endpoints_are_public(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/understand", "/generate", "/edit"}


# --- limits ------------------------------------------------------------------------------------------
def refused(client, *args, api_name: str) -> str:
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)


def test_over_limit_inputs_are_refused_with_a_message(client, tmp_path):
    assert "201 characters long" in refused(client, "x" * 201, "48x32", 2.0, 0, 1, api_name="/generate")
    assert "at most 200" in refused(client, handle_file(EXAMPLE), "y" * 300, 2.0, 0, api_name="/edit")
    assert "maximum value 3" in refused(client, PROMPT, "48x32", 2.0, 0, 4, api_name="/generate")
    assert "empty" in refused(client, "   ", "48x32", 2.0, 0, 1, api_name="/generate")
    assert "not in the list of choices" in refused(client, PROMPT, "64x64", 2.0, 0, 1, api_name="/generate")

    big = tmp_path / "big.png"
    Image.new("RGB", (600, 500), "white").save(big)  # small file, too many pixels
    message = refused(client, handle_file(str(big)), "Describe the image.", api_name="/understand")
    assert "600 × 500 pixels" in message and "megapixels" in message

    heavy = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(heavy)  # few pixels, big file
    assert heavy.stat().st_size > LIMITS.max_file_bytes
    message = refused(client, handle_file(str(heavy)), "Make it blue.", 2.0, 0, api_name="/edit")
    assert "MB" in message and "accepts files up to 0.2 MB" in message

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert "not an image" in refused(client, handle_file(str(junk)), "What?", api_name="/understand")


def test_limits_at_the_function_level(model_folder):
    demo = WallarooDemo(model_folder, limits=LIMITS)
    assert demo.check_text("  hi  ", "prompt") == "hi"
    with pytest.raises(InputRejected, match="201 characters"):
        demo.check_text("z" * 201, "prompt")
    with pytest.raises(InputRejected, match="from 1 to 3"):
        demo.check_count(0)
    with pytest.raises(InputRejected, match="from 1 to 3"):
        demo.check_count(2.5)
    with pytest.raises(InputRejected, match="No image"):
        demo.load_image(None)
    with pytest.raises(InputRejected, match="megapixels"):
        demo.load_image(Image.new("RGB", (513, 512)))
    assert demo.load_image(EXAMPLE).size == (64, 64)
    with pytest.raises(ValueError, match="positive integer"):
        Limits(max_images=0)


# --- queue, concurrency, stop ------------------------------------------------------------------------
def test_a_picture_served_to_many_requests_at_once_is_always_whole():
    """Two requests showing the same picture at once (the shared "before" of edits of one example) each get
    a complete PNG: Gradio's own in-place save let a reader see an empty file (CI failure of stop 31)."""
    picture = Image.new("RGB", (32, 32), (int(time.time_ns()) % 256, 40, 200))  # new content, new cache path
    barrier = threading.Barrier(8)
    sizes, errors = [], []

    def serve_and_read():
        barrier.wait()
        try:
            for _ in range(20):
                with Image.open(WallarooDemo._served(picture)) as im:
                    im.load()  # every byte, not just the header
                    sizes.append(im.size)
        except Exception as exc:  # collected: an assert in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=serve_and_read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sizes == [(32, 32)] * 160


def test_concurrent_requests_all_complete_one_engine_run_at_a_time(server):
    demo, url = server
    clients = [Client(url, verbose=False) for _ in range(3)]
    before = len(demo.wallaroo.runs)
    jobs = []
    for i, c in enumerate(clients):
        jobs.append(("generate", c.submit(PROMPT, "32x48", 2.0, i, 2, api_name="/generate")))
        jobs.append(("edit", c.submit(handle_file(EXAMPLE), "背景改为黄色。", 2.0, i, api_name="/edit")))
    jobs.append(("understand", clients[0].submit(handle_file(EXAMPLE), "What colour is the background?",
                                                 api_name="/understand")))
    for kind, job in jobs:
        result = job.result(timeout=300)
        if kind == "generate":
            assert [image_size(item["image"]) for item in result[0]] == [(48, 32)] * 2
        elif kind == "edit":
            assert [image_size(p) for p in result[0]] == [(32, 32)] * 2
        else:
            assert isinstance(result, str)
    runs = list(demo.wallaroo.runs)[before:]
    assert len(runs) == len(jobs) and all(r.status == "done" for r in runs)
    spans = sorted((r.started, r.started + r.seconds) for r in runs)
    assert all(end <= nxt_start + 1e-3 for (_, end), (nxt_start, _) in zip(spans, spans[1:])), \
        "engine runs overlapped: more than one worker on the model"


def test_queue_is_bounded(model_folder):
    limits = Limits(queue_size=1)
    demo = build_demo(model_folder, limits=limits)
    url = start(demo, limits)
    handlers = demo.wallaroo
    try:
        c = Client(url, verbose=False)
        handlers.lock.acquire()  # the model is busy: the first request runs (waiting on it), the next waits
        try:
            running = c.submit(PROMPT, "32x32", 2.0, 0, 1, api_name="/generate")
            deadline = time.monotonic() + 60
            while not any(r.task == "generate" for r in handlers.runs):
                assert time.monotonic() < deadline, "the first request never started"
                time.sleep(0.05)
            waiting = c.submit(PROMPT, "32x32", 2.0, 1, 1, api_name="/generate")
            while waiting.status().code.name != "IN_QUEUE":
                assert time.monotonic() < deadline, f"second request is {waiting.status().code}"
                time.sleep(0.05)
            with pytest.raises(Exception, match="[Qq]ueue is full"):
                c.predict(PROMPT, "32x32", 2.0, 2, 1, api_name="/generate")
        finally:
            handlers.lock.release()
        assert len(running.result(timeout=120)[0]) == 1
        assert len(waiting.result(timeout=120)[0]) == 1
    finally:
        demo.close()


def test_stop_ends_the_engine_run_within_a_row(model_folder):
    """The tab's Stop button handler sets the session's cancel flag: the engine stops at the next row, and
    the handler reports where."""
    demo = WallarooDemo(model_folder, limits=LIMITS)
    demo.pipe = SlowRows(demo.pipe, delay=1.0)
    outputs = demo.generate(PROMPT, "48x32", 2.0, 0, 1)
    first_images, first_status = next(outputs)
    assert text(first_status).endswith("row 1 of 3…") and 'value="1"' in first_status
    assert image_size(first_images[0]) == (32, 48)
    report = demo.stop_and_report("generate")  # no request: the "local" session
    assert text(report) == "Stopped after row 1 of 3." and 'value="1"' in report
    rest = list(outputs)
    record = demo.runs[-1]
    assert record.ended.is_set()
    assert record.status == "cancelled" and record.rows_done == 1 and record.rows_total == 3
    assert text(rest[-1][1]) == "Stopped after row 1 of 3."
    assert image_size(rest[-1][0][0]) == (32, 48), "the last preview stays on screen"
    assert demo.stop("generate") == [], "a finished run leaves no cancel flag behind"
    # The lock is free again and the next run completes.
    images, status = list(demo.generate(PROMPT, "32x32", 2.0, 0, 1))[-1]
    assert text(status).startswith("Done") and image_size(images[0]) == (32, 32)


def test_stop_while_waiting_for_the_model(model_folder):
    demo = WallarooDemo(model_folder, limits=LIMITS)
    results: list = []
    with demo.lock:  # another run holds the model
        worker = threading.Thread(target=lambda: results.extend(demo.generate(PROMPT, "32x32", 2.0, 0, 1)))
        worker.start()
        deadline = time.monotonic() + 30
        while not demo.runs:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert text(demo.stop_and_report("generate", wait=0.1)) == "Stopped before it started."
    worker.join(timeout=30)
    record = demo.runs[-1]
    assert record.status == "cancelled" and record.rows_done == 0
    assert len(results) == 1 and text(results[0][1]) == "Stopped before the first row."


def test_stop_only_touches_its_own_session_and_task(model_folder):
    demo = WallarooDemo(model_folder, limits=LIMITS)
    demo.pipe = SlowRows(demo.pipe, delay=0.2)

    class Request:
        session_hash = "visitor-a"

    outputs = demo.edit(EXAMPLE, "Make the square on the left yellow.", 2.0, 0, request=Request())
    next(outputs)
    assert demo.stop("generate", Request()) == []
    other = type("Other", (), {"session_hash": "visitor-b"})()
    assert demo.stop("edit", other) == []
    (before, after), status = list(outputs)[-1]
    assert text(status).startswith("Done") and image_size(before) == image_size(after) == (32, 32)


def test_client_cancel_stops_the_engine(server):
    """gradio_client's job.cancel() closes the handler; the engine stops before the last row."""
    demo, url = server
    handlers = demo.wallaroo
    with slow_rows(handlers, 1.0):
        c = Client(url, verbose=False)
        job = c.submit(PROMPT, "48x32", 2.0, 0, 1, api_name="/generate")
        deadline = time.monotonic() + 60
        while not job.outputs():
            assert time.monotonic() < deadline, "no row arrived"
            time.sleep(0.02)
        job.cancel()
        record = next(r for r in reversed(handlers.runs) if r.task == "generate")
        assert record.ended.wait(timeout=60), "the engine did not stop"
        assert record.status == "cancelled"
        assert record.rows_done < record.rows_total == 3
    # The model is free for the next visitor.
    gallery, status = Client(url, verbose=False).predict(PROMPT, "32x32", 2.0, 0, 1, api_name="/generate")
    assert len(gallery) == 1 and text(status).startswith("Done")


# --- examples, entry points, hosting -----------------------------------------------------------------
def test_example_images_are_the_rendered_shapes_scenes(tmp_path):
    from gradio_demo.app import write_example_images

    for path in write_example_images(tmp_path):
        shipped = EXAMPLES_DIR / path.name
        assert shipped.is_file(), f"{shipped} missing: run write_example_images()"
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shipped)))
    used = {f for f, _ in UNDERSTAND_EXAMPLES + EDIT_EXAMPLES}
    assert used <= set(EXAMPLE_SCENES)
    assert all(p.strip() for p, _ in GENERATE_EXAMPLES)


def test_examples_run_on_the_model(model_folder):
    demo = WallarooDemo(model_folder, limits=LIMITS)
    for name, question in UNDERSTAND_EXAMPLES[:2]:
        assert isinstance(list(demo.understand(str(EXAMPLES_DIR / name), question))[-1], str)
    for prompt, _ in GENERATE_EXAMPLES[:2]:
        images, status = list(demo.generate(prompt, None, None, 0, 1))[-1]
        assert text(status).startswith("Done") and len(images) == 1
    for name, instruction in EDIT_EXAMPLES[:2]:
        (before, after), status = list(demo.edit(str(EXAMPLES_DIR / name), instruction, None, 0))[-1]
        assert text(status).startswith("Done") and image_size(before) == image_size(after)


def test_model_comes_from_the_environment(model_folder, monkeypatch):
    monkeypatch.setenv("WALLAROO_MODEL", str(model_folder))
    demo = WallarooDemo()
    assert demo.model_name == str(model_folder)
    monkeypatch.setenv("WALLAROO_MODEL", str(model_folder.parent / "missing"))
    with pytest.raises(ValueError, match="not found"):
        WallarooDemo()


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode("utf-8", "replace")
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def run_server(cmd: list[str], cwd: Path, env_extra: dict[str, str], url: str) -> str:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **env_extra}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page = wait_for_http(url, proc)
        c = Client(url, verbose=False)
        gallery, status = c.predict(PROMPT, "32x32", 2.0, 0, 1, api_name="/generate")
        assert len(gallery) == 1 and text(status).startswith("Done")
        return page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(proc.stdout.read())


def test_python_m_gradio_demo_serves_the_app(model_folder):
    port = free_port()
    page = run_server([sys.executable, "-m", "gradio_demo", "--model", str(model_folder), "--port", str(port)],
                      ROOT, {}, f"http://127.0.0.1:{port}/")
    assert "Wallaroo" in page


def test_an_exported_space_runs_as_a_space_would(model_folder, tmp_path):
    """`python -m gradio_demo.space DEST` writes a Space; run it the way a Space does: `python app.py` in that
    folder, the address in Gradio's variables, the model in WALLAROO_MODEL, nothing of this checkout on the
    path. (The folder's app.py is the repository's root app.py.)"""
    from gradio_demo.space import main as export_main

    dest = tmp_path / "space"
    assert export_main([str(dest)]) == 0
    readme = (dest / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert f"sdk_version: {gr.__version__}" in readme
    assert (dest / "app.py").read_bytes() == (ROOT / "app.py").read_bytes()
    assert (dest / "requirements.txt").read_bytes() == (ROOT / "gradio_demo" / "requirements.txt").read_bytes()
    assert "*.safetensors filter=lfs" in (dest / ".gitattributes").read_text()
    assert (dest / "wallaroo_nodes" / "engine" / "pipeline.py").is_file()
    assert (dest / "gradio_demo" / "examples" / "shapes-4.png").is_file()
    assert not list(dest.rglob("__pycache__"))
    assert export_main([str(dest)]) == 2, "refuses to overwrite a non-empty folder"

    port = free_port()
    env = {"WALLAROO_MODEL": str(model_folder), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "PYTHONPATH": ""}
    run_server([sys.executable, "app.py"], dest, env, f"http://127.0.0.1:{port}/")


def test_hosting_requirements_install_dependencies_not_the_checkout():
    """A Space installs requirements.txt before the repository is copied in, so it cannot name `.` or `-e .`;
    it must cover the engine's own dependencies instead."""
    import tomllib

    lines = [ln.split("#")[0].strip() for ln in (ROOT / "gradio_demo" / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("-")]
    assert not any(r in (".", "-e .") or r.startswith(("./", "-e")) for r in lines if r)
    names = {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for r in reqs}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"]}
    assert deps <= names and "gradio" in names


def test_building_the_demo_writes_nothing_into_the_package(server):
    assert not list((ROOT / "gradio_demo").glob("*.pyi")), "a Gradio component subclass wrote a stub file"


def test_demo_closes_cleanly(model_folder):
    demo = build_demo(model_folder, limits=LIMITS)
    url = start(demo, LIMITS)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
    demo.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    assert threading.active_count() < 200



# --- the bundled tiny model behind every tab ------------------------------------------------------------
@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent / "wallaroo_nodes/models/tiny/config.json").is_file(),
                    reason="bundled model wallaroo_nodes/models/tiny is absent")
def test_every_tab_on_the_bundled_tiny_model():
    demo = build_demo("tiny", limits=LIMITS)
    url = start(demo, LIMITS)
    try:
        c = Client(url, verbose=False)
        answer = c.predict(handle_file(EXAMPLE), "What colour is the background?", api_name="/understand")
        assert isinstance(answer, str) and answer.strip()
        gallery, status = c.predict("A large red circle on the left on a white background.", "48x80", 1.5, 0, 2,
                                    api_name="/generate")
        assert [image_size(item["image"]) for item in gallery] == [(80, 48), (80, 48)]  # PIL: (width, height)
        assert text(status).startswith("Done")
        (before, after), status = c.predict(handle_file(WIDE_EXAMPLE), "Make the background black.", 1.5, 0,
                                            api_name="/edit")
        assert image_size(before) == image_size(after) == (80, 48)  # the 48 x 80 example keeps its size
        assert text(status).startswith("Done")
    finally:
        demo.close()
