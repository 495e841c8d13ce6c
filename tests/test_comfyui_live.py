"""The node pack inside a real ComfyUI server: the shipped API workflows posted to /prompt, results fetched.

Needs COMFYUI_DIR: a ComfyUI checkout whose requirements are installed, in its own venv (COMFYUI_PYTHON, else
$COMFYUI_DIR/.venv/bin/python or $COMFYUI_DIR/venv/bin/python, else this interpreter). The pack needs nothing
beyond ComfyUI's own requirements (torch, numpy, pillow, safetensors, tokenizers, tqdm); ComfyUI 0.3.64 itself
imports `requests`, which its requirements.txt lacks. Once, by hand:

    git clone https://github.com/comfyanonymous/ComfyUI /path/to/ComfyUI && cd /path/to/ComfyUI
    python -m venv .venv && .venv/bin/pip install torch torchvision
    .venv/bin/pip install -r requirements.txt requests   # torchaudio may fail: only audio nodes need it

then, from this repository: COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python -m pytest -q tests/test_comfyui_live.py

The test links this checkout into $COMFYUI_DIR/custom_nodes under a temporary name, starts `main.py --cpu` on
127.0.0.1 (a free port) with input/output/temp/user folders of its own and only this pack among the custom
nodes, runs the workflows, checks progress and previews over /ws, "Unload models" through /free, errors, the
template browser and (where Chromium and playwright are installed) the UI-format files in ComfyUI's own front
end; then it stops the server and removes the link. Without the bundled tiny model installed it serves a
random-weights model folder through an extra_model_paths.yaml (so results are checked for size and format,
not content).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="COMFYUI_DIR is not set: point it at a ComfyUI checkout with its requirements installed "
                            "to run the node pack inside a real ComfyUI server")

requests = pytest.importorskip("requests")

STARTUP_TIMEOUT = 600  # seconds: ComfyUI imports torch and every built-in node first
RUN_TIMEOUT = 300
NAMES = ["understand", "generate", "edit", "chain"]


def comfyui_python(comfy_dir: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for venv in (".venv", "venv"):
        candidate = comfy_dir / venv / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ComfyUI process with this pack linked in; `url`, `log()`, `post_prompt`, `wait`."""

    def __init__(self, tmp: Path):
        self.comfy_dir = Path(COMFYUI_DIR).resolve()
        assert (self.comfy_dir / "main.py").is_file(), f"{self.comfy_dir} is not a ComfyUI checkout (no main.py)"
        self.tmp = tmp
        self.module = f"comfyui-wallaroo-livetest-{os.getpid()}"
        self.link = self.comfy_dir / "custom_nodes" / self.module
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self.model = "tiny"

    def _flags(self) -> list[str]:
        known = (self.comfy_dir / "comfy" / "cli_args.py").read_text(encoding="utf-8")
        dirs = {name: self.tmp / name for name in ("input", "output", "temp", "user")}
        for d in dirs.values():
            d.mkdir(exist_ok=True)
        flags = ["--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                 "--input-directory", str(dirs["input"]), "--output-directory", str(dirs["output"]),
                 "--temp-directory", str(dirs["temp"])]
        optional = {  # flags that older ComfyUI versions lack: passed only when this checkout knows them
            "--user-directory": [str(dirs["user"])],
            "--database-url": [f"sqlite:///{self.tmp / 'comfyui.db'}"],
            "--disable-all-custom-nodes": [],  # load only this pack (other installed packs stay out of the test)
            "--whitelist-custom-nodes": [self.module],
            "--disable-api-nodes": [],
        }
        for flag, values in optional.items():
            if f'"{flag}"' in known:
                flags += [flag, *values]
        if "tiny" not in self._bundled():
            sys.path.insert(0, str(ROOT / "tests"))
            from helpers import make_model_folder

            folder = make_model_folder(self.tmp / "wallaroo-models")
            self.model = folder.name
            config = self.tmp / "extra_model_paths.yaml"
            config.write_text(f"wallaroo_live_test:\n  base_path: {self.tmp}\n  wallaroo: wallaroo-models\n",
                              encoding="utf-8")
            flags += ["--extra-model-paths-config", str(config)]
        return flags

    @staticmethod
    def _bundled() -> list[str]:
        models = ROOT / "wallaroo_nodes" / "models"
        return [p.name for p in models.iterdir() if (p / "config.json").is_file()] if models.is_dir() else []

    def start(self) -> None:
        assert not self.link.exists() and not self.link.is_symlink(), f"{self.link} already exists"
        flags = self._flags()
        self.link.symlink_to(ROOT, target_is_directory=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("WALLAROO_MODEL_PATHS", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([comfyui_python(self.comfy_dir), "main.py", *flags], cwd=self.comfy_dir,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        deadline = time.time() + STARTUP_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=30)
        finally:
            if self.link.is_symlink():
                self.link.unlink()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def post_prompt(self, workflow: dict) -> str:
        reply = requests.post(self.url + "/prompt", json={"prompt": workflow, "client_id": uuid.uuid4().hex},
                              timeout=30)
        assert reply.ok, f"/prompt refused the workflow: {reply.status_code} {reply.text[:3000]}"
        return reply.json()["prompt_id"]

    def wait(self, prompt_id: str) -> dict:
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            history = requests.get(f"{self.url}/history/{prompt_id}", timeout=10).json()
            if prompt_id in history:  # entered once the prompt has finished, well or not
                return history[prompt_id]
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI died while running a prompt:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish within {RUN_TIMEOUT}s:\n{self.log()[-4000:]}")

    def run(self, workflow: dict) -> dict:
        entry = self.wait(self.post_prompt(workflow))
        assert entry["status"]["status_str"] == "success", \
            f"workflow failed: {json.dumps(entry['status'], indent=1)[:4000]}\n{self.log()[-3000:]}"
        return entry

    def images(self, entry: dict, node_id: str) -> list[Image.Image]:
        out = []
        for ref in entry["outputs"][node_id]["images"]:
            reply = requests.get(self.url + "/view", params={"filename": ref["filename"], "subfolder": ref["subfolder"],
                                                             "type": ref["type"]}, timeout=30)
            assert reply.ok, f"/view {ref}: {reply.status_code}"
            out.append(Image.open(io.BytesIO(reply.content)).convert("RGB"))
        return out


class MiniWebSocket:
    """Just enough of a WebSocket client (RFC 6455) to listen to ComfyUI's /ws messages: no extra package."""

    def __init__(self, url: str, path: str):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._chunk()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head[:200]

    def _chunk(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the WebSocket")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._chunk()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> str | bytes:
        """The next text (str) or binary (bytes) message; control frames are skipped."""
        while True:
            b1, b2 = self._read(2)
            length = b2 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b2 & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b1 & 0x0F
            if opcode == 1:
                return payload.decode("utf-8")
            if opcode == 2:
                return payload
            if opcode == 8:
                raise EOFError("the server closed the WebSocket")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("comfyui-live"))
    try:
        srv.start()
        example = Image.new("RGB", (64, 48), (250, 250, 250))
        example.paste((220, 30, 30), (20, 12, 44, 36))
        buf = io.BytesIO()
        example.save(buf, format="PNG")
        reply = requests.post(srv.url + "/upload/image", files={"image": ("wallaroo_example.png", buf.getvalue(),
                                                                          "image/png")},
                              data={"type": "input", "overwrite": "true"}, timeout=30)
        assert reply.ok, reply.text
        yield srv
    finally:
        srv.stop()
    assert not srv.link.exists(), "the custom_nodes link was left behind"


def workflow(server: Server, name: str) -> dict:
    wf = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
    for node in wf.values():
        if node["class_type"] == "WallarooModelLoader":
            node["inputs"]["model"] = server.model
    return wf


def object_info(server: Server, node: str) -> dict:
    return requests.get(f"{server.url}/object_info/{node}", timeout=30).json()[node]


def default_size(server: Server) -> tuple[int, int]:
    if server.model == "tiny":
        config = ROOT / "wallaroo_nodes" / "models" / "tiny" / "config.json"
    else:
        config = server.tmp / "wallaroo-models" / server.model / "config.json"
    h, w = json.loads(config.read_text(encoding="utf-8"))["protocol"]["default_size"]
    return h, w


def test_pack_is_loaded_with_its_nodes_folder_and_front_end(server):
    log = server.log()
    assert not re.search(r"IMPORT FAILED\)?:? .*" + re.escape(server.module), log), log[-3000:]
    assert re.search(r"seconds: .*" + re.escape(server.module), log), "the pack is not in ComfyUI's import list"
    for node in ("WallarooModelLoader", "WallarooUnderstand", "WallarooGenerate", "WallarooEdit"):
        info = object_info(server, node)
        assert info["category"] == "Wallaroo" and info["description"]
    models = object_info(server, "WallarooModelLoader")["input"]["required"]["model"][0]
    assert models[0] == "tiny" and server.model in models
    extensions = requests.get(server.url + "/extensions", timeout=30).json()
    script = next(e for e in extensions if e.endswith("/wallaroo.js"))
    assert requests.get(server.url + script, timeout=30).ok
    assert "Unable to parse pyproject.toml" not in log


def test_template_browser_offers_the_ui_workflows(server):
    templates = requests.get(server.url + "/workflow_templates", timeout=30).json()
    assert sorted(templates[server.module]) == sorted(NAMES)
    for name in NAMES:
        reply = requests.get(f"{server.url}/api/workflow_templates/{server.module}/{name}.json", timeout=30)
        assert reply.ok, name
        assert reply.json() == json.loads((ROOT / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))


def test_generate_workflow(server):
    wf = workflow(server, "generate")
    entry = server.run(wf)
    images = server.images(entry, "3")
    h, w = default_size(server)
    assert len(images) == wf["2"]["inputs"]["batch_size"]
    assert all(im.size == (w, h) for im in images)


def test_generate_reports_progress_per_row_with_a_preview(server):
    client = uuid.uuid4().hex
    ws = MiniWebSocket(server.url, f"/ws?clientId={client}")
    try:
        wf = workflow(server, "generate")
        wf["2"]["inputs"]["seed"] = 123456789  # not run before, so not answered from ComfyUI's cache
        reply = requests.post(server.url + "/prompt", json={"prompt": wf, "client_id": client}, timeout=30)
        assert reply.ok, reply.text
        prompt_id = reply.json()["prompt_id"]
        progress, previews, deadline = [], [], time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            message = ws.recv()
            if isinstance(message, bytes):
                event, image_type = struct.unpack(">II", message[:8])
                if event == 1:  # PREVIEW_IMAGE: image type (1 = JPEG), then the encoded image
                    previews.append((image_type, Image.open(io.BytesIO(message[8:]))))
                continue
            data = json.loads(message)
            if data["type"] == "progress" and data["data"].get("node") == "2":
                progress.append((data["data"]["value"], data["data"]["max"]))
            if data["type"] in ("execution_success", "execution_error") and data["data"]["prompt_id"] == prompt_id:
                assert data["type"] == "execution_success", data
                break
    finally:
        ws.close()
    h, _ = default_size(server)
    config = (ROOT / "wallaroo_nodes/models/tiny/config.json" if server.model == "tiny"
              else server.tmp / "wallaroo-models" / server.model / "config.json")
    ch_mult = json.loads(config.read_text(encoding="utf-8"))["vq"]["ch_mult"]
    rows = h // 2 ** (len(ch_mult) - 1)
    assert progress == [(r, rows) for r in range(1, rows + 1)]
    assert len(previews) == rows and all(kind == 1 and im.format == "JPEG" for kind, im in previews)


def test_understand_workflow_shows_the_answer(server):
    entry = server.run(workflow(server, "understand"))
    answers = entry["outputs"]["3"]["text"]
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_edit_workflow(server):
    entry = server.run(workflow(server, "edit"))
    (image,) = server.images(entry, "4")
    if server.model == "tiny":
        sizes = json.loads((ROOT / "wallaroo_nodes/models/tiny/config.json").read_text())["protocol"]["sizes"]
    else:
        sizes = json.loads((server.tmp / "wallaroo-models" / server.model / "config.json").read_text())["protocol"][
            "sizes"]
    aspect = 48 / 64  # the uploaded example picture
    h, w = min(sizes, key=lambda s: abs(round(s[0] / s[1], 2) - aspect))
    assert image.size == (w, h)


def test_chain_workflow(server):
    entry = server.run(workflow(server, "chain"))
    (edited,) = server.images(entry, "6")
    (generated,) = server.images(entry, "7")
    assert edited.mode == generated.mode == "RGB"
    assert isinstance(entry["outputs"]["3"]["text"][0], str)


def test_free_releases_the_model_and_a_rerun_reloads_it_with_the_same_result(server):
    wf = workflow(server, "generate")
    first = [np.asarray(im) for im in server.images(server.run(wf), "3")]
    loads = server.log().count("Wallaroo: loaded")
    reply = requests.post(server.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
    assert reply.ok
    deadline = time.time() + 60
    while "Wallaroo: released" not in server.log() and time.time() < deadline:
        time.sleep(0.5)
    assert "Wallaroo: released" in server.log(), server.log()[-3000:]
    again = [np.asarray(im) for im in server.images(server.run(wf), "3")]
    assert server.log().count("Wallaroo: loaded") == loads + 1
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # same seed, same images, after a reload


def test_a_node_error_is_reported_with_what_to_fix(server):
    wf = workflow(server, "understand")
    wf["3"]["inputs"]["question"] = "   "
    entry = server.wait(server.post_prompt(wf))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "the question is empty" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "WallarooUnderstand"


CHROMIUM = Path(os.environ.get("WALLAROO_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts" / "comfyui"


def test_ui_workflows_load_in_the_front_end_as_the_api_workflows(server):
    """Each UI-format file, loaded into ComfyUI's own front end (headless Chromium), has every node type
    registered and converts (graphToPrompt) to exactly its API-format file; the Understand node carries the
    answer box of web/wallaroo.js, which stays out of the prompt."""
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extra)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith((server.url, "data:", "blob:"))
                       else r.abort())
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph", timeout=120_000)
            page.wait_for_function("() => 'WallarooUnderstand' in LiteGraph.registered_node_types", timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "start.png"))
            page.keyboard.press("Escape")  # the first-run template dialog (screenshots only)
            for name in NAMES:
                ui = json.loads((ROOT / "workflows" / "ui" / f"{name}.json").read_text(encoding="utf-8"))
                result = page.evaluate("""async (graph) => {
                    const app = window.comfyAPI.app.app;
                    await app.loadGraphData(graph, true, true, null);
                    const nodes = app.graph._nodes ?? app.graph.nodes;
                    const unknown = nodes.filter((n) => !(n.type in LiteGraph.registered_node_types)).map((n) => n.type);
                    const understand = nodes.find((n) => n.type === 'WallarooUnderstand');
                    const prompt = await app.graphToPrompt();
                    return {unknown, output: prompt.output,
                            answerBox: understand ? !!understand.widgets?.find((w) => w.name === 'answer') : null};
                }""", ui)
                page.wait_for_timeout(300)
                page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
                assert result["unknown"] == [], f"{name}: node types unknown to the front end: {result['unknown']}"
                api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
                got = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in result["output"].items()}
                want = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}
                assert got == want, f"{name}: the front end turns the UI file into a different prompt"
                if result["answerBox"] is not None:
                    assert result["answerBox"], f"{name}: the Understand node has no answer box (web/wallaroo.js)"
            # Queue the understand workflow from the page: the answer appears in the node's box.
            ui = json.loads((ROOT / "workflows" / "ui" / "understand.json").read_text(encoding="utf-8"))
            before = set(requests.get(server.url + "/history", timeout=30).json())
            page.evaluate("""async ([graph, model]) => {
                const app = window.comfyAPI.app.app;
                await app.loadGraphData(graph, true, true, null);
                const nodes = app.graph._nodes ?? app.graph.nodes;
                nodes.find((n) => n.type === 'WallarooModelLoader').widgets.find((w) => w.name === 'model').value = model;
                nodes.find((n) => n.type === 'WallarooUnderstand').widgets.find((w) => w.name === 'answer').value = '(pending)';
                await app.queuePrompt(0, 1);
            }""", [ui, server.model])
            deadline, entry = time.time() + RUN_TIMEOUT, None
            while entry is None and time.time() < deadline:
                fresh = {k: v for k, v in requests.get(server.url + "/history", timeout=30).json().items()
                         if k not in before}
                entry = next(iter(fresh.values()), None)
                time.sleep(0.5)
            assert entry is not None and entry["status"]["status_str"] == "success", entry
            (answer,) = entry["outputs"]["3"]["text"]
            page.wait_for_function("""(answer) => {
                const nodes = window.comfyAPI.app.app.graph._nodes ?? window.comfyAPI.app.app.graph.nodes;
                return nodes.find((n) => n.type === 'WallarooUnderstand').widgets.find((w) => w.name === 'answer')
                    .value === answer;
            }""", arg=answer, timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "understand-answered.png"))
        finally:
            browser.close()
    ours = [e for e in errors if "wallaroo" in e.lower()]
    assert not ours, ours
