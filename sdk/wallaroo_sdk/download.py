"""Download the official release from the Hugging Face hub over plain HTTP, then convert it.

Files come from `{endpoint}/{repo}/resolve/{revision}/{filename}` (endpoint: $HF_ENDPOINT, default
https://huggingface.co; a token in $HF_TOKEN is sent when set). Each file is fetched into `<name>.part` and
resumed with an HTTP Range request after an interruption (automatically up to `retries` times, and on the next
run). A finished file must have the expected size and checksum before it is renamed into place:

* sha256 for files stored in LFS: the hub announces it in `X-Linked-ETag` (or `ETag`), and the manifest below
  pins it where known;
* the git blob sha1 for small regular files, which the hub sends as their `ETag`.

A file that fails its check is deleted (never kept, never converted) and the run fails. What was verified is
recorded in `download.json` so a rerun skips it without re-reading gigabytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urljoin

import requests
from tqdm import tqdm

ENDPOINT_ENV = "HF_ENDPOINT"
TOKEN_ENV = "HF_TOKEN"
DEFAULT_ENDPOINT = "https://huggingface.co"
STATE_FILE = "download.json"
CHUNK = 1 << 20
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


class DownloadError(RuntimeError):
    """A file could not be fetched or failed its size/checksum check; the message says which and why."""


@dataclass(frozen=True)
class HubFile:
    """One file of the official release on the hub, and where it goes under the download folder."""

    role: str                  # "checkpoint", "vq" or "qwen"
    repo: str
    filename: str
    dest: str                  # path relative to the download folder
    revision: str = "main"
    size: int | None = None    # None: unknown here, taken from the server (Content-Length / X-Linked-Size)
    sha256: str | None = None  # None: unknown here, taken from the server's ETag (X-Linked-ETag for LFS files)


QWEN_DIR = "Qwen2.5-VL-7B-Instruct"

# The one place that says what the official release is. Sources: the Wallaroo README (JiePKU/Wallaroo @ 3092d8b:
# "Download the Wallaroo 7B" -> huggingface.co/jiezhueval/Wallaroo; "LLamaGen Tokenizer" ->
# huggingface.co/peizesun/llamagen_t2i/resolve/main/vq_ds16_t2i.pt) and the Qwen2.5-VL-7B-Instruct model card.
# The checkpoint's file name is the one the reference scripts load (scripts/evaluate/test_ar_*.sh:
# .../checkpoint.ckpt); if the hub repo names it otherwise, the repo's file list is asked for its one
# checkpoint-like file (see `find_checkpoint`). Sizes and checksums are not pinned here (unknown: each is taken
# from the server's ETag / X-Linked-ETag and checked against the bytes received).
OFFICIAL_FILES: tuple[HubFile, ...] = (
    HubFile("checkpoint", "jiezhueval/Wallaroo", "checkpoint.ckpt", "wallaroo/checkpoint.ckpt"),
    HubFile("vq", "peizesun/llamagen_t2i", "vq_ds16_t2i.pt", "llamagen/vq_ds16_t2i.pt"),
    HubFile("qwen", "Qwen/Qwen2.5-VL-7B-Instruct", "config.json", f"{QWEN_DIR}/config.json"),
    HubFile("qwen", "Qwen/Qwen2.5-VL-7B-Instruct", "tokenizer.json", f"{QWEN_DIR}/tokenizer.json"),
    HubFile("qwen", "Qwen/Qwen2.5-VL-7B-Instruct", "tokenizer_config.json", f"{QWEN_DIR}/tokenizer_config.json"),
    HubFile("qwen", "Qwen/Qwen2.5-VL-7B-Instruct", "preprocessor_config.json",
            f"{QWEN_DIR}/preprocessor_config.json"),
)


def endpoint_from_env(endpoint: str | None = None) -> str:
    """The hub endpoint: the argument, else $HF_ENDPOINT, else https://huggingface.co (no trailing slash)."""
    return (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")


def file_url(endpoint: str, repo: str, revision: str, filename: str) -> str:
    """The hub's download URL of one file."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"


@dataclass
class RemoteFile:
    """What a HEAD request says about a file."""

    url: str
    size: int | None
    etag: str | None
    commit: str | None


@dataclass
class FileRecord:
    """A verified file on disk (kept in download.json)."""

    repo: str
    filename: str
    revision: str
    commit: str | None
    size: int
    sha256: str
    mtime_ns: int


def _normalize_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


def git_blob_sha1(path: Path) -> str:
    """`git hash-object` of a file: the hub's ETag of a regular (non-LFS) file."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class Downloader:
    """Resumable, verified downloads from a hub endpoint into a folder."""

    def __init__(self, out_dir: str | os.PathLike, endpoint: str | None = None, token: str | None = None,
                 retries: int = 3, timeout: float = 30.0, quiet: bool = False,
                 log: Callable[[str], None] | None = None):
        self.out = Path(out_dir)
        self.endpoint = endpoint_from_env(endpoint)
        self.retries = max(0, int(retries))
        self.timeout = timeout
        self.quiet = quiet
        self.backoff = 0.5  # seconds before the first retry, doubling
        self.log = log or (lambda _msg: None)
        self.session = requests.Session()
        # Byte ranges and sizes must refer to the file itself, never to a compressed transfer.
        self.session.headers.update({"Accept-Encoding": "identity", "User-Agent": "wallaroo-sdk"})
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.state_path = self.out / STATE_FILE
        self.state = self._load_state()

    # --- state ------------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
            return state if isinstance(state, dict) and isinstance(state.get("files"), dict) else {"files": {}}
        except (OSError, ValueError):
            return {"files": {}}

    def _save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_path)

    # --- HTTP -------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, **kw) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise DownloadError(f"{url}: {self._reason(exc)}") from None

    @staticmethod
    def _reason(exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        if isinstance(exc, requests.ConnectionError):
            return f"connection failed ({text[:200]})"
        if isinstance(exc, requests.Timeout):
            return "timed out"
        return text[:300] or type(exc).__name__

    @staticmethod
    def _status_error(url: str, r: requests.Response) -> DownloadError:
        if r.status_code in (401, 403):
            return DownloadError(f"{url}: access denied (HTTP {r.status_code}); if the repository is gated or "
                                 f"private, accept its terms on the hub and set ${TOKEN_ENV}")
        if r.status_code == 404:
            return DownloadError(f"{url}: not found on the hub (HTTP 404)")
        return DownloadError(f"{url}: HTTP {r.status_code} {r.reason or ''}".rstrip())

    def head(self, url: str) -> RemoteFile:
        """Size, ETag and commit of a file, following the hub's same-host redirects but not its CDN redirect
        (whose response carries X-Linked-Size / X-Linked-ETag for LFS files)."""
        current = url
        for _ in range(10):
            r = self._request("HEAD", current, allow_redirects=False)
            linked = r.headers.get("X-Linked-Etag") or r.headers.get("X-Linked-ETag")
            if r.is_redirect and not linked:
                location = r.headers.get("Location", "")
                current = urljoin(current, location)
                continue
            if r.status_code >= 400:
                raise self._status_error(url, r)
            size = r.headers.get("X-Linked-Size") or (None if r.is_redirect else r.headers.get("Content-Length"))
            return RemoteFile(url, int(size) if size and size.isdigit() else None,
                              _normalize_etag(linked or r.headers.get("ETag")), r.headers.get("X-Repo-Commit"))
        raise DownloadError(f"{url}: too many redirects")

    def list_repo(self, repo: str, revision: str) -> list[str]:
        """File names in a hub repo (the hub's model-info API)."""
        url = f"{self.endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"
        r = self._request("GET", url)
        if r.status_code >= 400:
            raise self._status_error(url, r)
        try:
            return [s["rfilename"] for s in r.json().get("siblings", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DownloadError(f"{url}: unexpected answer, not the hub's model-info JSON") from None

    # --- one file ---------------------------------------------------------------------------------
    def fetch(self, spec: HubFile) -> Path:
        """Download one file (or reuse a verified copy) and return its path."""
        dest = self.out / spec.dest
        url = file_url(self.endpoint, spec.repo, spec.revision, spec.filename)
        remote = self.head(url)
        size = self._expected_size(spec, remote)
        sha256, sha1 = self._expected_hashes(spec, remote)
        recorded = self.state["files"].get(spec.dest)
        if recorded and dest.is_file() and self._still_valid(recorded, dest, size, sha256):
            self.log(f"{spec.dest}: already downloaded and verified")
            return dest
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._transfer(url, part, size, spec.dest)
        got_size = part.stat().st_size
        if size is not None and got_size != size:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{spec.dest}: received {got_size} bytes, expected {size}; the partial file was "
                                "removed, run the command again")
        self.log(f"{spec.dest}: verifying")
        digest = sha256_file(part)
        if sha256 is not None and digest != sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{spec.dest}: checksum mismatch (sha256 {digest}, expected {sha256}); the corrupt "
                                "file was removed, run the command again")
        if sha1 is not None and git_blob_sha1(part) != sha1:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{spec.dest}: checksum mismatch (git sha1 differs from the hub's ETag {sha1}); "
                                "the corrupt file was removed, run the command again")
        if sha256 is None and sha1 is None:
            self.log(f"{spec.dest}: the server gave no checksum; only the size was checked")
        os.replace(part, dest)
        self.state["files"][spec.dest] = asdict(FileRecord(spec.repo, spec.filename, spec.revision, remote.commit,
                                                           got_size, digest, dest.stat().st_mtime_ns))
        self._save_state()
        return dest

    @staticmethod
    def _expected_size(spec: HubFile, remote: RemoteFile) -> int | None:
        if spec.size is not None and remote.size is not None and spec.size != remote.size:
            raise DownloadError(f"{remote.url}: the hub reports {remote.size} bytes but the manifest pins "
                                f"{spec.size}; the file on the hub changed")
        return spec.size if spec.size is not None else remote.size

    @staticmethod
    def _expected_hashes(spec: HubFile, remote: RemoteFile) -> tuple[str | None, str | None]:
        etag = (remote.etag or "").lower()
        server256 = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
        server1 = etag if re.fullmatch(r"[0-9a-f]{40}", etag) else None
        if spec.sha256 is not None:
            if server256 is not None and server256 != spec.sha256.lower():
                raise DownloadError(f"{remote.url}: the hub's sha256 {server256} differs from the manifest's "
                                    f"{spec.sha256}; the file on the hub changed")
            return spec.sha256.lower(), None
        return server256, server1

    @staticmethod
    def _still_valid(recorded: dict, dest: Path, size: int | None, sha256: str | None) -> bool:
        st = dest.stat()
        return (recorded.get("size") == st.st_size and recorded.get("mtime_ns") == st.st_mtime_ns
                and (size is None or size == st.st_size) and (sha256 is None or sha256 == recorded.get("sha256")))

    def _transfer(self, url: str, part: Path, size: int | None, label: str) -> None:
        """Fill `part` with the file's bytes, resuming from what it already holds."""
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        if size is not None and have == size:
            return
        bar = tqdm(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False,
                   disable=True if self.quiet else None)
        try:
            for attempt in range(self.retries + 1):
                have = part.stat().st_size if part.exists() else 0
                if have:
                    self.log(f"{label}: resuming at byte {have}")
                try:
                    if self._get(url, part, have, bar):
                        return
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError) as exc:
                    if attempt == self.retries:
                        got = part.stat().st_size if part.exists() else 0
                        of = f" of {size}" if size is not None else ""
                        raise DownloadError(f"{label}: transfer interrupted after {got}{of} bytes "
                                            f"({self._reason(exc)}); run the command again to resume") from None
                    time.sleep(min(self.backoff * 2.0 ** attempt, 10.0))
        finally:
            bar.close()

    def _get(self, url: str, part: Path, have: int, bar: tqdm) -> bool:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            r = self.session.get(url, headers=headers, stream=True, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout):
            raise  # retried by the caller
        except requests.RequestException as exc:
            raise DownloadError(f"{url}: {self._reason(exc)}") from None
        with r:
            if r.status_code == 416 and have:  # nothing left past `have`: the part is already complete
                return True
            if r.status_code >= 400:
                raise self._status_error(url, r)
            mode = "ab"
            if have and r.status_code == 206:
                start = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                if not start or int(start[1]) != have:
                    raise DownloadError(f"{url}: the server answered a resume request with the wrong range "
                                        f"({r.headers.get('Content-Range')!r})")
            elif have:  # the server ignored the Range header: start again
                mode = "wb"
                bar.reset(total=bar.total)
            with open(part, mode) as f:
                for block in _blocks(r):
                    f.write(block)
                    bar.update(len(block))
        return True

    # --- discovery --------------------------------------------------------------------------------
    def find_checkpoint(self, spec: HubFile) -> HubFile:
        """`spec`, or, when its file is missing from the hub, the repo's one checkpoint-like file."""
        try:
            self.head(file_url(self.endpoint, spec.repo, spec.revision, spec.filename))
            return spec
        except DownloadError as exc:
            if "HTTP 404" not in str(exc):
                raise
        names = self.list_repo(spec.repo, spec.revision)
        found = [n for n in names if n.lower().endswith(CHECKPOINT_SUFFIXES)]
        if len(found) != 1:
            listing = ", ".join(found) or "none"
            raise DownloadError(f"{spec.repo}: no {spec.filename} on the hub and {len(found)} checkpoint-like "
                                f"files ({listing}); pass the file name with --checkpoint-file")
        self.log(f"{spec.repo}: using {found[0]} (no {spec.filename} in the repo)")
        return replace(spec, filename=found[0], dest=str(Path(spec.dest).with_name(Path(found[0]).name)))


def _blocks(r: requests.Response):
    """The body as it arrives. urllib3 2's read1 hands over every byte received before a connection breaks (so a
    resume starts exactly there); iter_content would drop the last partly filled block."""
    import urllib3

    read1 = getattr(r.raw, "read1", None)
    if read1 is None:
        yield from r.iter_content(64 * 1024)
        return
    try:
        while True:
            block = read1(CHUNK)
            if not block:
                return
            yield block
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.Timeout(str(exc)) from None
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError, OSError) as exc:
        raise requests.exceptions.ChunkedEncodingError(str(exc)) from None


@dataclass
class DownloadResult:
    """Where everything went."""

    folder: Path
    checkpoint: Path
    vq: Path
    qwen_dir: Path
    model: Path | None  # the converted model folder (None with convert=False)


def download_official(out_dir: str | os.PathLike, *, endpoint: str | None = None, token: str | None = None,
                      model_dir: str | os.PathLike | None = None, convert: bool = True, dtype: str = "bf16",
                      checkpoint_file: str | None = None, files: tuple[HubFile, ...] = OFFICIAL_FILES,
                      retries: int = 3, timeout: float = 30.0, quiet: bool = False,
                      log: Callable[[str], None] | None = None) -> DownloadResult:
    """Fetch the official checkpoint, LlamaGen VQ and Qwen2.5-VL tokenizer/config into `out_dir/sources`, verify
    them, and (by default) convert them into the model folder `model_dir` (default `out_dir/model`)."""
    out = Path(out_dir)
    say = log or (lambda _msg: None)
    dl = Downloader(out, endpoint=endpoint, token=token, retries=retries, timeout=timeout, quiet=quiet, log=say)
    specs = [replace(f, dest=f"sources/{f.dest}") for f in files]
    if checkpoint_file:
        specs = [replace(f, filename=checkpoint_file, dest=str(Path(f.dest).with_name(Path(checkpoint_file).name)))
                 if f.role == "checkpoint" else f for f in specs]
    specs = [dl.find_checkpoint(f) if f.role == "checkpoint" and not checkpoint_file else f for f in specs]
    paths: dict[str, list[Path]] = {}
    for spec in specs:
        say(f"fetching {spec.repo}/{spec.filename} from {dl.endpoint}")
        paths.setdefault(spec.role, []).append(dl.fetch(spec))
    checkpoint, vq = paths["checkpoint"][0], paths["vq"][0]
    qwen_dir = paths["qwen"][0].parent
    result = DownloadResult(out, checkpoint, vq, qwen_dir, None)
    if not convert:
        return result

    from wallaroo_nodes.engine.weights import convert_official

    target = Path(model_dir) if model_dir is not None else out / "model"
    sources = {k: v["sha256"] for k, v in sorted(dl.state["files"].items()) if k in {s.dest for s in specs}}
    done = dl.state.get("converted") or {}
    if (done.get("sources") == sources and done.get("dtype") == dtype and done.get("folder") == str(target.resolve())
            and (target / "config.json").is_file()):
        say(f"{target}: already converted from these files")
    else:
        convert_official(checkpoint, vq, qwen_dir, target, dtype=dtype, progress=say)
        dl.state["converted"] = {"sources": sources, "dtype": dtype, "folder": str(target.resolve())}
        dl._save_state()
    result.model = target
    return result
