"""`wallaroo download` end to end against a real HTTP server on loopback that behaves like the Hugging Face hub.

The fake hub serves a synthetic official release (tests/official_release.py) at the hub's URLs
(`/{repo}/resolve/{revision}/{filename}`): small files as regular git files (ETag = git blob sha1), large ones
as LFS files (a 302 to a CDN path, with X-Linked-ETag = sha256 and X-Linked-Size), HEAD and Range requests,
and the model-info API. Faults: a connection cut in the middle of a file, and corrupted bytes.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

from helpers import one_line_error, run_cli
from official_release import make_release
from wallaroo_nodes.engine.weights import load_model
from wallaroo_sdk.download import OFFICIAL_FILES, DownloadError, HubFile, download_official

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".ckpt", ".pt")


class FakeHub:
    """A threaded HTTP server with the hub's download protocol; `log` records (method, path, Range header)."""

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # (repo, filename) -> content
        self.cut: set[str] = set()        # file names whose next full GET is cut off halfway (then served fine)
        self.corrupt: set[str] = set()    # file names served with one byte flipped
        self.ignore_range = False
        self.log: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: str, filename: str, content: bytes) -> None:
        self.files[(repo, filename)] = content

    def body_requests(self, filename: str) -> list[str | None]:
        """Range headers of the GETs that carried `filename`'s bytes."""
        sha = {hashlib.sha256(c).hexdigest(): f for (_, f), c in self.files.items()}
        out = []
        for method, path, rng in self.log:
            if method != "GET":
                continue
            name = sha.get(path.rsplit("/", 1)[-1]) if path.startswith("/cdn/") else path.rsplit("/", 1)[-1]
            if name == filename and ("/resolve/" in path and not filename.endswith(LFS_SUFFIXES) or path.startswith("/cdn/")):
                out.append(rng)
        return out

    # --- protocol ---------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.log.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            repo = f"{parts[2]}/{parts[3]}"
            names = [f for (r, f) in self.files if r == repo]
            if not names:
                return self.send(h, 404, b'{"error": "Repository not found"}', head)
            return self.send(h, 200, json.dumps({"id": repo, "sha": COMMIT, "siblings": [
                {"rfilename": n} for n in names + ["README.md", ".gitattributes"]]}).encode(), head)
        if parts[0] == "cdn" and len(parts) == 2:
            match = [(r, f) for (r, f), c in self.files.items() if hashlib.sha256(c).hexdigest() == parts[1]]
            if not match:
                return self.send(h, 404, b"no such blob", head)
            return self.serve_file(h, match[0][1], self.files[match[0]], head, {})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
            content = self.files.get((repo, filename))
            if content is None:
                return self.send(h, 404, b"Entry not found", head, {"X-Error-Code": "EntryNotFound"})
            if filename.endswith(LFS_SUFFIXES):  # LFS: metadata here, bytes from the CDN
                sha = hashlib.sha256(content).hexdigest()
                return self.send(h, 302, b"", head, {
                    "Location": f"/cdn/{sha}", "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(content)),
                    "ETag": f'"{sha}"', "X-Repo-Commit": COMMIT})
            git = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
            return self.serve_file(h, filename, content, head, {"ETag": f'"{git}"', "X-Repo-Commit": COMMIT})
        return self.send(h, 404, b"not found", head)

    def send(self, h, status: int, body: bytes, head: bool, headers: dict | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def serve_file(self, h, filename: str, content: bytes, head: bool, headers: dict) -> None:
        if filename in self.corrupt and not head:
            content = bytearray(content)
            content[len(content) // 3] ^= 0xFF
            content = bytes(content)
        size, start = len(content), 0
        rng = h.headers.get("Range")
        status = 200
        if rng and not head and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= size:
                return self.send(h, 416, b"", head, {"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{size - 1}/{size}"}
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(size - start))
        h.end_headers()
        if head:
            return
        if filename in self.cut and start == 0:
            self.cut.discard(filename)
            h.wfile.write(content[:size // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(content[start:])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("release"))


def _serve_release(hub: FakeHub, release, checkpoint_name: str = "checkpoint.ckpt") -> None:
    repos = {f.role: f.repo for f in OFFICIAL_FILES}
    hub.add(repos["checkpoint"], checkpoint_name, release.checkpoint.read_bytes())
    hub.add(repos["vq"], "vq_ds16_t2i.pt", release.vq.read_bytes())
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        hub.add(repos["qwen"], name, (release.qwen_dir / name).read_bytes())
    hub.add(repos["qwen"], "tokenizer_config.json", json.dumps({"model_max_length": 131072}).encode())


@pytest.fixture
def hub(release):
    server = FakeHub()
    _serve_release(server, release)
    yield server
    server.close()


def _assert_same_model(folder: Path, release) -> None:
    model, _ = load_model(folder, dtype="fp32", device="cpu")
    ours, theirs = model.state_dict(), release.model.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_download_and_convert_end_to_end(hub, release, tmp_path, capsys):
    out = tmp_path / "dl"
    code, stdout, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", out, "--dtype", "fp32", "--quiet")
    assert code == 0, err
    model_dir = Path(stdout.strip().splitlines()[-1])
    assert model_dir == (out / "model").resolve()
    _assert_same_model(model_dir, release)
    src = out / "sources"
    assert (src / "wallaroo/checkpoint.ckpt").read_bytes() == release.checkpoint.read_bytes()
    assert (src / "llamagen/vq_ds16_t2i.pt").read_bytes() == release.vq.read_bytes()
    assert sorted(p.name for p in (src / "Qwen2.5-VL-7B-Instruct").iterdir()) == [
        "config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert not list(out.rglob("*.part"))
    state = json.loads((out / "download.json").read_text())
    rec = state["files"]["sources/llamagen/vq_ds16_t2i.pt"]
    assert rec["sha256"] == hashlib.sha256(release.vq.read_bytes()).hexdigest() and rec["commit"] == COMMIT
    assert rec["repo"] == "peizesun/llamagen_t2i" and rec["size"] == release.vq.stat().st_size
    # HEAD first (metadata), then the bytes; LFS bytes come from the CDN redirect.
    assert ("HEAD", "/peizesun/llamagen_t2i/resolve/main/vq_ds16_t2i.pt", None) in hub.log
    assert hub.body_requests("vq_ds16_t2i.pt") == [None]

    # A rerun downloads nothing and does not convert again.
    hub.log.clear()
    code, stdout, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", out, "--dtype", "fp32", "--quiet")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(model_dir)
    assert "already converted" in stdout
    assert all(method == "HEAD" for method, _, _ in hub.log)


def test_interrupted_transfer_resumes_on_the_next_run(hub, release, tmp_path, capsys):
    out = tmp_path / "dl"
    hub.cut.add("checkpoint.ckpt")
    code, stdout, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", out, "--retries", "0",
                                "--no-convert", "--quiet")
    assert code == 1
    one_line_error(err, "checkpoint.ckpt", "interrupted", "run the command again to resume")
    part = out / "sources/wallaroo/checkpoint.ckpt.part"
    size = release.checkpoint.stat().st_size
    assert part.is_file() and part.stat().st_size == size // 2
    assert not (out / "sources/wallaroo/checkpoint.ckpt").exists() and not (out / "model").exists()

    code, stdout, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", out, "--dtype", "fp32", "--quiet")
    assert code == 0, err
    assert hub.body_requests("checkpoint.ckpt") == [None, f"bytes={size // 2}-"]
    assert "resuming at byte" in stdout
    assert not part.exists()
    _assert_same_model(out / "model", release)


def test_interrupted_transfer_resumes_within_one_run(hub, release, tmp_path, capsys):
    hub.cut.add("vq_ds16_t2i.pt")
    code, _, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", tmp_path / "dl", "--dtype", "fp32",
                           "--quiet")
    assert code == 0, err
    size = release.vq.stat().st_size
    assert hub.body_requests("vq_ds16_t2i.pt") == [None, f"bytes={size // 2}-"]
    _assert_same_model(tmp_path / "dl" / "model", release)


def test_server_ignoring_range_restarts_the_file(hub, release, tmp_path, capsys):
    hub.cut.add("checkpoint.ckpt")
    hub.ignore_range = True
    code, _, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", tmp_path / "dl", "--no-convert",
                           "--quiet")
    assert code == 0, err
    got = (tmp_path / "dl/sources/wallaroo/checkpoint.ckpt").read_bytes()
    assert got == release.checkpoint.read_bytes()


@pytest.mark.parametrize("name, check", [("vq_ds16_t2i.pt", "sha256"), ("config.json", "git sha1")])
def test_corrupted_file_is_rejected(hub, release, tmp_path, capsys, name, check):
    out = tmp_path / "dl"
    hub.corrupt.add(name)
    code, stdout, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", out, "--quiet")
    assert code == 1
    one_line_error(err, name, "checksum mismatch", check, "removed")
    assert not list(out.rglob(name)) and not list(out.rglob(name + ".part"))
    assert not (out / "model").exists()
    # Files verified before the bad one are kept, and not fetched again once the hub serves good bytes.
    kept = json.loads((out / "download.json").read_text())["files"]
    assert "sources/wallaroo/checkpoint.ckpt" in kept
    hub.corrupt.clear()
    hub.log.clear()
    code, _, err = run_cli(capsys, "download", "--endpoint", hub.url, "--out", out, "--dtype", "fp32", "--quiet")
    assert code == 0, err
    assert hub.body_requests("checkpoint.ckpt") == [] and hub.body_requests(name) == [None]
    _assert_same_model(out / "model", release)


def test_checkpoint_under_another_name_is_found(release, tmp_path, capsys):
    server = FakeHub()
    try:
        _serve_release(server, release, checkpoint_name="wallaroo_7b_stage4.ckpt")
        code, stdout, err = run_cli(capsys, "download", "--endpoint", server.url, "--out", tmp_path / "dl",
                                    "--no-convert", "--quiet")
        assert code == 0, err
        assert "using wallaroo_7b_stage4.ckpt" in stdout
        assert (tmp_path / "dl/sources/wallaroo/wallaroo_7b_stage4.ckpt").is_file()
        assert stdout.strip().splitlines()[-1] == str((tmp_path / "dl/sources").resolve())
    finally:
        server.close()


def test_endpoint_from_the_environment_and_missing_files(hub, tmp_path, capsys, monkeypatch):
    del hub.files[("Qwen/Qwen2.5-VL-7B-Instruct", "tokenizer_config.json")]
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    code, _, err = run_cli(capsys, "download", "--out", tmp_path / "dl", "--quiet")
    assert code == 1
    one_line_error(err, f"{hub.url}/Qwen/Qwen2.5-VL-7B-Instruct/resolve/main/tokenizer_config.json", "404")


def test_unreachable_endpoint(tmp_path, capsys):
    server = FakeHub()
    url = server.url
    server.close()  # nothing listens there any more
    code, out, err = run_cli(capsys, "download", "--endpoint", url, "--out", tmp_path / "dl", "--quiet",
                             "--retries", "0", "--timeout", "5")
    assert code == 1
    one_line_error(err, url, "connection failed")


def test_manifest_pins_are_checked(hub, release, tmp_path):
    files = tuple(replace(f, sha256="0" * 64) if f.role == "vq" else f for f in OFFICIAL_FILES)
    with pytest.raises(DownloadError, match="differs from the manifest"):
        download_official(tmp_path / "dl", endpoint=hub.url, files=files, convert=False, quiet=True)
    files = tuple(replace(f, size=123) if f.role == "vq" else f for f in OFFICIAL_FILES)
    with pytest.raises(DownloadError, match="manifest pins 123"):
        download_official(tmp_path / "dl", endpoint=hub.url, files=files, convert=False, quiet=True)
    good = hashlib.sha256(release.vq.read_bytes()).hexdigest()
    files = tuple(replace(f, sha256=good, size=release.vq.stat().st_size) if f.role == "vq" else f
                  for f in OFFICIAL_FILES)
    result = download_official(tmp_path / "dl", endpoint=hub.url, files=files, convert=False, quiet=True)
    assert result.vq.read_bytes() == release.vq.read_bytes() and result.model is None


def test_manifest_names_the_official_sources():
    by_role = {}
    for f in OFFICIAL_FILES:
        by_role.setdefault(f.role, []).append(f)
        assert isinstance(f, HubFile) and f.revision == "main"
    assert [(f.repo, f.filename) for f in by_role["checkpoint"]] == [("jiezhueval/Wallaroo", "checkpoint.ckpt")]
    assert [(f.repo, f.filename) for f in by_role["vq"]] == [("peizesun/llamagen_t2i", "vq_ds16_t2i.pt")]
    assert {f.filename for f in by_role["qwen"]} == {"config.json", "tokenizer.json", "tokenizer_config.json",
                                                     "preprocessor_config.json"}
    assert {f.repo for f in by_role["qwen"]} == {"Qwen/Qwen2.5-VL-7B-Instruct"}
