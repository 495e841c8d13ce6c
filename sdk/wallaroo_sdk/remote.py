"""Run API-format ComfyUI workflows (ours in workflows/, or any other) on a running ComfyUI server.

    from wallaroo_sdk import ComfyClient
    client = ComfyClient("http://127.0.0.1:8188")
    result = client.run_workflow("generate", {"prompt": "a red circle", "seed": 3})
    result.images[0].save("out.png")

Plain HTTP with `requests` (no websocket): `POST /upload/image` for inputs, `POST /prompt` to queue, polling
`/history/{id}` and `/queue` to follow progress, `GET /view` for the images. Inputs are set by node id, node
title, node class or bare input name (see `set_inputs`), so the client works on any API-format workflow.
A rejected workflow raises `ComfyError` whose message lists every node error ComfyUI reported.
"""
from __future__ import annotations

import copy
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import requests
from PIL import Image

from .sdk import Cancelled, CancelLike, _cancel_check, _png_bytes, to_pil

__all__ = ["ComfyClient", "ComfyError", "WorkflowResult", "QueueStatus", "load_workflow", "set_inputs",
           "format_node_errors", "WORKFLOWS_DIR"]

WORKFLOWS_ENV = "WALLAROO_WORKFLOWS"
WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows" / "api"  # API format; workflows/ui is for drag-and-drop
IMAGE_KEYS = ("images", "gifs", "animated")  # output lists of {filename, subfolder, type}


class ComfyError(RuntimeError):
    """ComfyUI could not be reached, rejected a workflow, or failed while running it."""


@dataclass
class QueueStatus:
    """What polling learned about a queued prompt."""

    prompt_id: str
    state: str                   # "pending", "running" or "done"
    position: int | None = None  # place in the pending queue (0 = next), while pending
    elapsed: float = 0.0


@dataclass
class WorkflowResult:
    """A finished prompt's outputs: images (PIL, in node order) and texts, also grouped by output node."""

    prompt_id: str
    images: list[Image.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    by_node: dict[str, dict[str, list]] = field(default_factory=dict)
    history: dict = field(default_factory=dict)


# --- workflows ----------------------------------------------------------------------------------------

def _workflow_dirs() -> list[Path]:
    env = os.environ.get(WORKFLOWS_ENV)
    return ([Path(env)] if env else []) + [WORKFLOWS_DIR]


def load_workflow(workflow: str | os.PathLike | Mapping) -> dict:
    """An API-format workflow from a dict, a file path, or a name in workflows/api/ ("generate" finds
    `generate.json`)."""
    if isinstance(workflow, Mapping):
        data = copy.deepcopy(dict(workflow))
        where = "the workflow"
    else:
        path = _find_workflow(workflow)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable JSON workflow ({exc})") from None
        where = str(path)
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"{where}: a UI-format workflow; export it with 'Save (API Format)' (or use the *_api.json "
                         "file) to run it remotely")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data.get("prompt"):
        data = data["prompt"]  # a saved POST /prompt body
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs", {}), dict) for n in data.values()):
        raise ValueError(f"{where}: not an API-format workflow (expected {{node_id: {{class_type, inputs}}}})")
    return data


def _find_workflow(name: str | os.PathLike) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    text = str(name)
    stem = text[:-5] if text.endswith(".json") else text
    names = [text, f"{stem}_api.json", f"wallaroo_{stem}_api.json", f"{stem}.json", f"wallaroo_{stem}.json"]
    for folder in _workflow_dirs():
        for candidate in names:
            if (folder / candidate).is_file():
                return folder / candidate
    known = sorted({p.name for d in _workflow_dirs() if d.is_dir() for p in d.glob("*.json")})
    raise ValueError(f"workflow {text!r} not found (give a path, or one of: {', '.join(known) or 'none found'})")


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _title(node: dict) -> str | None:
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def _select(workflow: dict, selector: str) -> list[str]:
    if selector in workflow:
        return [selector]
    by_title = [nid for nid, n in workflow.items() if _title(n) == selector]
    return by_title or [nid for nid, n in workflow.items() if n.get("class_type") == selector]


def _describe(workflow: dict, nid: str) -> str:
    node = workflow.get(nid, {})
    title = _title(node)
    cls = node.get("class_type", "?")
    return f"node {nid} {title!r} ({cls})" if title and title != cls else f"node {nid} ({cls})"


def set_inputs(workflow: dict, inputs: Mapping[str, Any]) -> dict:
    """Set literal inputs in place and return the workflow. Keys: "NODE.input" where NODE is a node id, a node
    title or a class name matching exactly one node; or a bare "input" that exactly one node has as a literal
    (not a link)."""
    for key, value in inputs.items():
        selector, _, name = key.rpartition(".")
        if selector:
            nodes = _select(workflow, selector)
            if not nodes:
                raise ValueError(f"input {key!r}: no node with id, title or class {selector!r}")
            if len(nodes) > 1:
                raise ValueError(f"input {key!r}: {selector!r} matches several nodes "
                                 f"({', '.join(_describe(workflow, n) for n in nodes)}); use a node id")
            workflow[nodes[0]].setdefault("inputs", {})[name] = value
            continue
        owners = [nid for nid, n in workflow.items() if name in n.get("inputs", {}) and not _is_link(n["inputs"][name])]
        if len(owners) != 1:
            if owners:
                raise ValueError(f"input {name!r} is ambiguous: " + ", ".join(
                    f"{nid}.{name} ({_describe(workflow, nid)})" for nid in owners) + "; use NODE.input")
            available = sorted({k for n in workflow.values() for k, v in n.get("inputs", {}).items() if not _is_link(v)})
            raise ValueError(f"no node has a literal input {name!r} (inputs: {', '.join(available) or 'none'})")
        workflow[owners[0]]["inputs"][name] = value
    return workflow


def format_node_errors(body: Any, workflow: dict | None = None) -> str:
    """ComfyUI's /prompt error answer as readable lines: the overall error, then one line per node error."""
    if not isinstance(body, dict):
        return str(body)
    workflow = workflow or {}
    err = body.get("error")
    if isinstance(err, dict):
        head = err.get("message") or err.get("type") or "error"
        if err.get("details"):
            head += f": {err['details']}"
    else:
        head = str(err) if err else "error"
    lines = [head]
    for nid, node_err in (body.get("node_errors") or {}).items():
        cls = node_err.get("class_type") if isinstance(node_err, dict) else None
        where = _describe(workflow, nid) if nid in workflow else f"node {nid} ({cls or '?'})"
        for e in (node_err.get("errors") or [] if isinstance(node_err, dict) else []):
            text = e.get("message", "error")
            if e.get("details"):
                text += f": {e['details']}"
            name = (e.get("extra_info") or {}).get("input_name")
            if name and f"{name}:" not in text:
                text = f"input {name!r}: {text}"
            lines.append(f"  {where}: {text}")
    return "\n".join(lines)


# --- the client ---------------------------------------------------------------------------------------

class ComfyClient:
    """A ComfyUI server at `url` (e.g. http://127.0.0.1:8188)."""

    def __init__(self, url: str = "http://127.0.0.1:8188", *, timeout: float = 30.0, poll_interval: float = 0.5,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.client_id = uuid.uuid4().hex
        self.session = session or requests.Session()

    # --- HTTP -------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kw) -> requests.Response:
        try:
            return self.session.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise ComfyError(f"cannot reach ComfyUI at {self.url} ({' '.join(str(exc).split())[:200]})") from None

    def _json(self, method: str, path: str, **kw) -> Any:
        r = self._call(method, path, **kw)
        if r.status_code >= 400:
            raise ComfyError(f"ComfyUI {method} {path}: HTTP {r.status_code} {r.text[:300].strip()}")
        try:
            return r.json()
        except ValueError:
            raise ComfyError(f"ComfyUI {method} {path}: the answer is not JSON") from None

    def system_stats(self) -> dict:
        """The server's /system_stats (a cheap reachability check)."""
        return self._json("GET", "/system_stats")

    # --- steps --------------------------------------------------------------------------------------
    def upload_image(self, image, name: str | None = None, *, subfolder: str = "", overwrite: bool = True) -> str:
        """Upload an image (PIL, numpy array or file path) to ComfyUI's input folder; returns the value a
        LoadImage node takes ("name" or "subfolder/name")."""
        if isinstance(image, (str, os.PathLike)) and Path(image).suffix.lower() == ".png" and Path(image).is_file():
            data, default = Path(image).read_bytes(), Path(image).name
        else:
            data = _png_bytes(to_pil(image))
            default = Path(image).stem + ".png" if isinstance(image, (str, os.PathLike)) else f"wallaroo-{uuid.uuid4().hex[:12]}.png"
        name = name or default
        fields = {"type": "input", "overwrite": "true" if overwrite else "false"}
        if subfolder:
            fields["subfolder"] = subfolder
        body = self._json("POST", "/upload/image", files={"image": (name, data, "image/png")}, data=fields)
        stored = body.get("name") if isinstance(body, dict) else None
        if not stored:
            raise ComfyError(f"ComfyUI /upload/image: unexpected answer {body!r}")
        return f"{body['subfolder']}/{stored}" if body.get("subfolder") else stored

    def queue(self, workflow: str | os.PathLike | Mapping, overrides: Mapping[str, Any] | None = None) -> str:
        """Queue a workflow with inputs set (images in `overrides` are uploaded first); returns the prompt id.
        A rejected workflow raises ComfyError listing the node errors."""
        wf = load_workflow(workflow)
        values = {}
        for key, value in (overrides or {}).items():
            if isinstance(value, (Image.Image, np.ndarray, Path)):
                value = self.upload_image(value)
            values[key] = value
        set_inputs(wf, values)
        r = self._call("POST", "/prompt", json={"prompt": wf, "client_id": self.client_id})
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400 or not isinstance(body, dict) or "prompt_id" not in body:
            if isinstance(body, dict) and ("error" in body or "node_errors" in body):
                raise ComfyError("ComfyUI rejected the workflow: " + format_node_errors(body, wf))
            raise ComfyError(f"ComfyUI /prompt: HTTP {r.status_code} {r.text[:300].strip()}")
        return body["prompt_id"]

    def status(self, prompt_id: str) -> QueueStatus:
        """Where a prompt is: pending (with its queue position), running, or done (in the history)."""
        q = self._json("GET", "/queue")
        if any(_queue_id(item) == prompt_id for item in q.get("queue_running", [])):
            return QueueStatus(prompt_id, "running")
        pending = sorted(q.get("queue_pending", []), key=lambda item: item[0] if item else 0)
        for i, item in enumerate(pending):
            if _queue_id(item) == prompt_id:
                return QueueStatus(prompt_id, "pending", i)
        return QueueStatus(prompt_id, "done")

    def history(self, prompt_id: str) -> dict | None:
        """The prompt's history entry, or None while it has none."""
        body = self._json("GET", f"/history/{prompt_id}")
        return body.get(prompt_id) if isinstance(body, dict) else None

    def wait(self, prompt_id: str, on_progress: Callable[[QueueStatus], None] | None = None, *,
             timeout: float | None = None, cancel: CancelLike = None) -> dict:
        """Poll until the prompt finishes; returns its history entry. Execution errors raise ComfyError naming the
        node; a set cancel token interrupts (or dequeues) the prompt and raises Cancelled."""
        check = _cancel_check(cancel)
        start = time.monotonic()
        last = None
        while True:
            entry = self.history(prompt_id)
            if entry is not None and _finished(entry):
                _raise_for_status(entry, prompt_id)
                if on_progress is not None:
                    on_progress(QueueStatus(prompt_id, "done", None, time.monotonic() - start))
                return entry
            state = self.status(prompt_id)
            state.elapsed = time.monotonic() - start
            if state.state == "done" and entry is None:
                entry = self.history(prompt_id)  # it may have finished between the two requests
                if entry is None:
                    raise ComfyError(f"prompt {prompt_id} is neither queued nor in the history (was the server "
                                     "restarted or the history cleared?)")
                continue
            if on_progress is not None and (last is None or (state.state, state.position) != last):
                on_progress(state)
            last = (state.state, state.position)
            if check is not None and check():
                self.cancel(prompt_id, running=state.state == "running")
                raise Cancelled(f"prompt {prompt_id} cancelled")
            if timeout is not None and state.elapsed > timeout:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:g} s")
            time.sleep(self.poll_interval)

    def cancel(self, prompt_id: str, running: bool = True) -> None:
        """Interrupt the running prompt, or remove a pending one from the queue."""
        if running:
            self._call("POST", "/interrupt", json={"prompt_id": prompt_id})
        else:
            self._call("POST", "/queue", json={"delete": [prompt_id]})

    def fetch_image(self, ref: Mapping[str, str]) -> Image.Image:
        """An output image by its {filename, subfolder, type} reference."""
        params = {"filename": ref.get("filename", ""), "subfolder": ref.get("subfolder", ""),
                  "type": ref.get("type", "output")}
        r = self._call("GET", "/view", params=params)
        if r.status_code >= 400:
            raise ComfyError(f"ComfyUI /view {params['filename']}: HTTP {r.status_code}")
        try:
            with Image.open(io.BytesIO(r.content)) as im:
                im.load()
                return im.copy()
        except OSError:
            raise ComfyError(f"ComfyUI /view {params['filename']}: not an image") from None

    def results(self, prompt_id: str, entry: dict) -> WorkflowResult:
        """Images and texts of a finished prompt's history entry."""
        result = WorkflowResult(prompt_id, history=entry)
        outputs = entry.get("outputs") or {}
        for nid in sorted(outputs, key=_node_order):
            got: dict[str, list] = {"images": [], "texts": []}
            for key, values in (outputs[nid] or {}).items():
                if not isinstance(values, list):
                    continue
                if key in IMAGE_KEYS:
                    got["images"] += [self.fetch_image(v) for v in values if isinstance(v, dict) and "filename" in v]
                else:
                    got["texts"] += [v for v in values if isinstance(v, str)]
            result.by_node[nid] = got
            result.images += got["images"]
            result.texts += got["texts"]
        return result

    def run_workflow(self, workflow: str | os.PathLike | Mapping, inputs: Mapping[str, Any] | None = None, *,
                     on_progress: Callable[[QueueStatus], None] | None = None, timeout: float | None = None,
                     cancel: CancelLike = None) -> WorkflowResult:
        """Queue a workflow (a name from workflows/, a path or a dict) with `inputs`, wait, and fetch its outputs."""
        prompt_id = self.queue(workflow, inputs)
        entry = self.wait(prompt_id, on_progress, timeout=timeout, cancel=cancel)
        return self.results(prompt_id, entry)


def _queue_id(item: Any) -> str | None:
    return item[1] if isinstance(item, (list, tuple)) and len(item) > 1 else None


def _node_order(nid: str) -> tuple:
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def _finished(entry: dict) -> bool:
    status = entry.get("status")
    if not isinstance(status, dict):
        return bool(entry.get("outputs"))
    return bool(status.get("completed")) or status.get("status_str") in ("success", "error")


def _raise_for_status(entry: dict, prompt_id: str) -> None:
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return
    for kind, data in status.get("messages") or []:
        if kind == "execution_error" and isinstance(data, dict):
            node = data.get("node_id", "?")
            where = f"node {node} ({data.get('node_type', '?')})"
            exc = data.get("exception_type", "error")
            raise ComfyError(f"ComfyUI failed running prompt {prompt_id}: {where}: {exc}: "
                             f"{data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            raise Cancelled(f"prompt {prompt_id} was interrupted on the server")
    raise ComfyError(f"ComfyUI failed running prompt {prompt_id}")
