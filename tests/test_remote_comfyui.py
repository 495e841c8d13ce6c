"""`wallaroo_sdk.remote.ComfyClient`: ComfyUI's HTTP protocol against a real loopback server that imitates
ComfyUI (/upload/image, /prompt with node_errors, /queue, /history, /view, /interrupt), asserting the requests it
received; and, when COMFYUI_DIR names a ComfyUI checkout, our workflows/ on a real ComfyUI."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

from wallaroo_sdk import CancelToken, Cancelled, ComfyClient, ComfyError
from wallaroo_sdk.remote import QueueStatus, format_node_errors, load_workflow, set_inputs

ROOT = Path(__file__).resolve().parent.parent
KNOWN = {"LoadImage", "WallarooModelLoader", "WallarooGenerate", "WallarooEdit", "WallarooUnderstand", "SaveImage",
         "PreviewAny"}
SIZES = ["64x64", "48x80", "80x48"]


def workflow() -> dict:
    """An API-format graph: model loader -> generate -> save, and load image -> understand -> show text."""
    return {
        "1": {"class_type": "WallarooModelLoader", "inputs": {"model": "tiny"}, "_meta": {"title": "Wallaroo Model"}},
        "2": {"class_type": "WallarooGenerate", "_meta": {"title": "Generate"},
              "inputs": {"model": ["1", 0], "prompt": "a red circle", "size": "64x64", "seed": 0, "cfg": 1.5}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "wallaroo"},
              "_meta": {"title": "Save Image"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Load Image"}},
        "5": {"class_type": "WallarooUnderstand", "_meta": {"title": "Understand"},
              "inputs": {"model": ["1", 0], "image": ["4", 0], "question": "What shape?", "seed": 0}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}, "_meta": {"title": "Answer"}},
    }


class FakeComfy:
    """Just enough of ComfyUI's server: validation errors like ComfyUI's, a queue that runs one prompt at a time
    (pending, then running, then in the history), SaveImage/PreviewAny outputs, execution errors."""

    def __init__(self, run_seconds: float = 0.15):
        self.run_seconds = run_seconds
        self.requests: list[tuple[str, str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.outputs: dict[str, bytes] = {}
        self.prompts: dict[str, dict] = {}
        self.pending: list[str] = []
        self.running: str | None = None
        self.history: dict[str, dict] = {}
        self.interrupted: list[str] = []
        self.lock = threading.Lock()
        self.counter = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.get(self)

            def do_POST(self):
                fake.post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.worker = threading.Thread(target=self.work, daemon=True)
        self.stop = False
        self.worker.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.stop = True
        self.server.shutdown()
        self.server.server_close()

    # --- HTTP -------------------------------------------------------------------------------------
    def reply(self, h, status: int, body, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def get(self, h) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.requests.append(("GET", url.path, query))
        if url.path == "/system_stats":
            return self.reply(h, 200, {"system": {"comfyui_version": "fake"}, "devices": []})
        if url.path == "/queue":
            with self.lock:
                running = [[0, self.running, self.prompts[self.running], {}, []]] if self.running else []
                pending = [[i + 1, pid, self.prompts[pid], {}, []] for i, pid in enumerate(self.pending)]
            return self.reply(h, 200, {"queue_running": running, "queue_pending": pending})
        if url.path.startswith("/history/"):
            pid = url.path.removeprefix("/history/")
            with self.lock:
                return self.reply(h, 200, {pid: self.history[pid]} if pid in self.history else {})
        if url.path == "/view":
            data = self.outputs.get(query.get("filename", "")) if query.get("type") == "output" else None
            return self.reply(h, 200, data, "image/png") if data else self.reply(h, 404, b"", "text/plain")
        return self.reply(h, 404, {"error": "not found"})

    def post(self, h) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        path = urlparse(h.path).path
        if path == "/upload/image":
            msg = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + h.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            fields, image = {}, None
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name == "image":
                    image = (part.get_filename(), part.get_payload(decode=True))
                else:
                    fields[name] = part.get_content().strip()
            self.requests.append(("POST", path, {"filename": image and image[0], **fields}))
            if image is None:
                return self.reply(h, 400, b"no image", "text/plain")
            self.uploads[image[0]] = image[1]
            return self.reply(h, 200, {"name": image[0], "subfolder": fields.get("subfolder", ""), "type": "input"})
        payload = json.loads(body or b"{}")
        self.requests.append(("POST", path, payload))
        if path == "/interrupt":
            self.interrupted.append(payload.get("prompt_id"))
            return self.reply(h, 200, {})
        if path == "/queue":
            with self.lock:
                for pid in payload.get("delete", []):
                    if pid in self.pending:
                        self.pending.remove(pid)
            return self.reply(h, 200, {})
        if path == "/prompt":
            return self.queue_prompt(h, payload)
        return self.reply(h, 404, {"error": "not found"})

    def queue_prompt(self, h, payload: dict) -> None:
        graph = payload.get("prompt")
        unknown = [n["class_type"] for n in graph.values() if n["class_type"] not in KNOWN]
        if unknown:
            return self.reply(h, 400, {"error": {"type": "invalid_prompt", "message": "Cannot execute because a node "
                                                 f"is missing the class_type property.: Node ID '#{unknown[0]}'",
                                                 "details": "", "extra_info": {}}, "node_errors": {}})
        node_errors = {}
        for nid, node in graph.items():
            size = node["inputs"].get("size")
            if node["class_type"] == "WallarooGenerate" and size not in SIZES:
                node_errors[nid] = {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                "details": f"size: '{size}' not in {SIZES}",
                                                "extra_info": {"input_name": "size"}}],
                                    "dependent_outputs": ["3"], "class_type": node["class_type"]}
            seed = node["inputs"].get("seed")
            if isinstance(seed, int) and seed < 0:
                node_errors[nid] = {"errors": [{"type": "value_smaller_than_min",
                                                "message": "Value -1 smaller than min of 0",
                                                "details": "seed", "extra_info": {"input_name": "seed"}}],
                                    "dependent_outputs": [], "class_type": node["class_type"]}
        if node_errors:
            return self.reply(h, 400, {"error": {"type": "prompt_outputs_failed_validation",
                                                 "message": "Prompt outputs failed validation", "details": "",
                                                 "extra_info": {}}, "node_errors": node_errors})
        with self.lock:
            self.counter += 1
            pid = f"prompt-{self.counter}"
            self.prompts[pid] = graph
            self.pending.append(pid)
        return self.reply(h, 200, {"prompt_id": pid, "number": self.counter, "node_errors": {}})

    # --- execution ----------------------------------------------------------------------------------
    def work(self) -> None:
        while not self.stop:
            with self.lock:
                if self.running is None and self.pending:
                    self.running = self.pending.pop(0)
                pid = self.running
            if pid is None:
                time.sleep(0.01)
                continue
            time.sleep(self.run_seconds)
            entry = self.execute(pid)
            with self.lock:
                self.history[pid] = entry
                self.running = None

    def execute(self, pid: str) -> dict:
        graph = self.prompts[pid]
        messages = [["execution_start", {"prompt_id": pid}]]
        if pid in self.interrupted:
            messages.append(["execution_interrupted", {"prompt_id": pid, "node_id": "2", "node_type": "x"}])
            return {"prompt": [0, pid, graph, {}, []], "outputs": {},
                    "status": {"status_str": "error", "completed": False, "messages": messages}}
        for nid, node in graph.items():
            if node["inputs"].get("prompt") == "FAIL":
                messages.append(["execution_error", {
                    "prompt_id": pid, "node_id": nid, "node_type": node["class_type"], "exception_type": "ValueError",
                    "exception_message": "the prompt is cursed\n", "traceback": ["..."]}])
                return {"prompt": [0, pid, graph, {}, []], "outputs": {},
                        "status": {"status_str": "error", "completed": False, "messages": messages}}
        outputs = {}
        for nid, node in graph.items():
            if node["class_type"] == "SaveImage":
                name = f"wallaroo_{len(self.outputs) + 1:05d}_.png"
                buf = io.BytesIO()
                Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format="PNG")
                self.outputs[name] = buf.getvalue()
                outputs[nid] = {"images": [{"filename": name, "subfolder": "", "type": "output"}]}
            if node["class_type"] == "PreviewAny":
                outputs[nid] = {"text": ["a red circle"]}
        messages.append(["execution_success", {"prompt_id": pid}])
        return {"prompt": [0, pid, graph, {}, list(outputs)], "outputs": outputs,
                "status": {"status_str": "success", "completed": True, "messages": messages}}


@pytest.fixture
def comfy():
    server = FakeComfy()
    yield server
    server.close()


def test_run_workflow_end_to_end(comfy, tmp_path):
    path = tmp_path / "wallaroo_generate_api.json"
    path.write_text(json.dumps(workflow()))
    picture = Image.new("RGB", (20, 10), (200, 0, 0))
    client = ComfyClient(comfy.url, poll_interval=0.02)
    seen: list[QueueStatus] = []
    result = client.run_workflow(path, {"prompt": "a blue square", "Generate.seed": 42, "2.size": "48x80",
                                        "Load Image.image": picture, "WallarooUnderstand.question": "Colour?"},
                                 on_progress=seen.append)
    assert len(result.images) == 1 and isinstance(result.images[0], Image.Image)
    assert result.images[0].size == (64, 48)
    assert result.texts == ["a red circle"] and set(result.by_node) == {"3", "6"}
    assert result.by_node["6"]["texts"] == ["a red circle"] and result.prompt_id == "prompt-1"
    assert [s.state for s in seen][-1] == "done" and "running" in [s.state for s in seen]

    upload = next(r for r in comfy.requests if r[1] == "/upload/image")
    assert upload[2]["type"] == "input" and upload[2]["overwrite"] == "true" and upload[2]["filename"].endswith(".png")
    uploaded = Image.open(io.BytesIO(comfy.uploads[upload[2]["filename"]]))
    assert uploaded.size == (20, 10)
    sent = next(r for r in comfy.requests if r[1] == "/prompt")[2]
    assert sent["client_id"] == client.client_id
    graph = sent["prompt"]
    assert graph["2"]["inputs"] == {"model": ["1", 0], "prompt": "a blue square", "size": "48x80", "seed": 42,
                                    "cfg": 1.5}
    assert graph["4"]["inputs"]["image"] == upload[2]["filename"]
    assert graph["5"]["inputs"]["question"] == "Colour?"
    assert ("GET", "/history/prompt-1", {}) in comfy.requests
    view = next(r for r in comfy.requests if r[1] == "/view")
    assert view[2] == {"filename": "wallaroo_00001_.png", "subfolder": "", "type": "output"}


def test_queue_position_and_upload_forms(comfy, tmp_path):
    comfy.run_seconds = 0.3
    client = ComfyClient(comfy.url, poll_interval=0.02)
    first = client.queue(workflow())
    second = client.queue(workflow(), {"Generate.seed": 3})
    states: list[QueueStatus] = []
    client.wait(second, states.append)
    assert states[0].state == "pending" and states[0].position in (0, 1)  # 1 if the first has not started yet
    positions = [s.position for s in states if s.state == "pending"]
    assert positions == sorted(positions, reverse=True)
    assert [s.state for s in states][-2:] == ["running", "done"]
    assert client.history(first)["status"]["status_str"] == "success"

    png = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(png)
    assert client.upload_image(png) == "in.png"
    assert comfy.uploads["in.png"] == png.read_bytes()  # PNG files go up unchanged
    jpg = tmp_path / "photo.jpg"
    Image.new("RGB", (4, 4)).save(jpg)
    assert client.upload_image(jpg) == "photo.png"
    assert client.upload_image(np.zeros((3, 5, 3), np.uint8), "arr.png", subfolder="wallaroo") == "wallaroo/arr.png"
    assert Image.open(io.BytesIO(comfy.uploads["arr.png"])).size == (5, 3)


def test_node_errors_are_readable(comfy):
    client = ComfyClient(comfy.url, poll_interval=0.02)
    with pytest.raises(ComfyError) as err:
        client.queue(workflow(), {"Generate.size": "7x7", "5.seed": -1})
    text = str(err.value)
    assert text.splitlines()[0] == "ComfyUI rejected the workflow: Prompt outputs failed validation"
    assert "  node 2 'Generate' (WallarooGenerate): Value not in list: size: '7x7' not in ['64x64'" in text
    assert "  node 5 'Understand' (WallarooUnderstand): input 'seed': Value -1 smaller than min of 0: seed" in text
    bad = workflow()
    bad["7"] = {"class_type": "NotInstalledNode", "inputs": {}}
    with pytest.raises(ComfyError, match="Cannot execute because a node is missing"):
        client.queue(bad)
    assert not comfy.prompts  # nothing was queued


def test_execution_errors_and_cancel(comfy):
    client = ComfyClient(comfy.url, poll_interval=0.02)
    with pytest.raises(ComfyError, match=r"node 2 \(WallarooGenerate\): ValueError: the prompt is cursed"):
        client.run_workflow(workflow(), {"prompt": "FAIL"})
    comfy.run_seconds = 1.0
    token = CancelToken()
    blocker = client.queue(workflow())
    waiting = client.queue(workflow())

    def cancel_when_pending(status: QueueStatus) -> None:
        if status.state == "pending":
            token.cancel()

    with pytest.raises(Cancelled):
        client.wait(waiting, cancel_when_pending, cancel=token)
    assert ("POST", "/queue", {"delete": [waiting]}) in comfy.requests and waiting not in comfy.pending
    token.reset()

    def cancel_when_running(status: QueueStatus) -> None:
        if status.state == "running":
            token.cancel()

    with pytest.raises(Cancelled):
        client.wait(blocker, cancel_when_running, cancel=token)
    assert ("POST", "/interrupt", {"prompt_id": blocker}) in comfy.requests
    with pytest.raises(ComfyError, match="did not finish within"):
        client.wait(client.queue(workflow()), timeout=0.05)


def test_unreachable_server_and_bad_workflows(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ComfyClient(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(ComfyError, match=f"cannot reach ComfyUI at http://127.0.0.1:{port}"):
        client.system_stats()
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(ValueError, match="UI-format workflow"):
        load_workflow(ui)
    with pytest.raises(ValueError, match="workflow 'no-such' not found"):
        load_workflow("no-such")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an API-format workflow"):
        load_workflow(tmp_path / "junk.json")
    assert load_workflow({"prompt": workflow()}) == workflow()  # a saved /prompt body


def test_set_inputs_lookup():
    wf = workflow()
    set_inputs(wf, {"prompt": "p", "Generate.cfg": 2.0, "WallarooModelLoader.model": "other", "4.image": "x.png"})
    assert wf["2"]["inputs"]["prompt"] == "p" and wf["2"]["inputs"]["cfg"] == 2.0
    assert wf["1"]["inputs"]["model"] == "other" and wf["4"]["inputs"]["image"] == "x.png"
    with pytest.raises(ValueError, match=r"input 'seed' is ambiguous: 2.seed .*5.seed"):
        set_inputs(wf, {"seed": 1})
    set_inputs(wf, {"model": "tiny"})  # the loader's is the one literal "model" (the others are links)
    assert wf["1"]["inputs"]["model"] == "tiny" and wf["2"]["inputs"]["model"] == ["1", 0]
    with pytest.raises(ValueError, match="no node has a literal input 'steps'"):
        set_inputs(wf, {"steps": 20})
    wf["8"] = {"class_type": "WallarooGenerate", "inputs": {"seed": 0}}
    with pytest.raises(ValueError, match="'WallarooGenerate' matches several nodes"):
        set_inputs(wf, {"WallarooGenerate.seed": 1})
    with pytest.raises(ValueError, match="no node with id, title or class 'Nope'"):
        set_inputs(wf, {"Nope.seed": 1})


def test_format_node_errors_tolerates_odd_bodies():
    assert format_node_errors("plain text") == "plain text"
    assert format_node_errors({"error": "boom", "node_errors": {"9": {"errors": [{"message": "bad"}]}}}) == \
        "boom\n  node 9 (?): bad"


def test_our_api_workflows_load():
    files = sorted((ROOT / "workflows" / "api").glob("*.json"))
    if not files:
        pytest.skip("no API-format workflows in workflows/api/")
    for path in files:
        graph = load_workflow(path)
        assert all("class_type" in node for node in graph.values()), path


# --- a real ComfyUI -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_comfy(tmp_path_factory):
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("COMFYUI_DIR is not set")
    if not sorted((ROOT / "workflows" / "api").glob("*.json")):
        pytest.skip("no API-format workflows in workflows/api/")
    if not (ROOT / "wallaroo_nodes" / "models" / "tiny" / "config.json").is_file():
        pytest.skip("the bundled tiny model is not in wallaroo_nodes/models/tiny yet")
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-wallaroo").symlink_to(ROOT, target_is_directory=True)
    extra = base / "extra_model_paths.yaml"
    extra.write_text(f"wallaroo_test:\n  base_path: {base}\n  custom_nodes: custom_nodes\n")
    port = _free_port()
    # ComfyUI runs in its own environment: COMFYUI_PYTHON, else its .venv or venv, else this interpreter.
    candidates = [Path(comfy_dir) / ".venv/bin/python", Path(comfy_dir) / "venv/bin/python"]
    python = os.environ.get("COMFYUI_PYTHON") or next((str(c) for c in candidates if c.is_file()), sys.executable)
    log = open(base / "comfyui.log", "w")
    proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--extra-model-paths-config", str(extra), "--output-directory", str(base / "output"),
                             "--input-directory", str(base / "input"), "--disable-auto-launch"],
                            cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT)
    client = ComfyClient(f"http://127.0.0.1:{port}", poll_interval=0.2)
    deadline = time.monotonic() + 180
    while True:
        try:
            client.system_stats()
            break
        except ComfyError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"ComfyUI did not start; see {base / 'comfyui.log'}")
            time.sleep(1)
    yield client
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_our_workflows_on_a_real_comfyui(real_comfy):
    picture = Image.new("RGB", (64, 64), (255, 255, 255))
    ran = 0
    for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        graph = load_workflow(path)
        inputs = {}
        for nid, node in graph.items():
            if node["class_type"] == "LoadImage":
                inputs[f"{nid}.image"] = picture
        result = real_comfy.run_workflow(path, inputs, timeout=600)
        assert result.images or result.texts, path
        assert all(isinstance(im, Image.Image) for im in result.images)
        assert all(isinstance(t, str) for t in result.texts)
        ran += 1
    assert ran
