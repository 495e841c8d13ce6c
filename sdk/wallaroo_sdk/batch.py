"""Batch jobs: one JSONL line per request, one result per line, resumable, and robust to bad lines.

A line is a JSON object (for `generate`, a bare JSON string is the prompt):

    generate    {"prompt": "...", "size": "512x512", "seed": 1, "cfg": 3, "n": 1, "id": "cat"}
    edit        {"image": "in/cat.png", "instruction": "make it blue", "seed": 1}
    understand  {"image": "in/cat.png", "question": "What colour is it?"}

Optional per-line fields: id, seed, n, cfg, size (generate), temperature, top_k, top_p, max_new_tokens
(understand); anything not given comes from the command's flags. Relative image paths are relative to the JSONL
file. Results are named by the line's id, else its line number (`00007.png`, `00007_0.png`... with n > 1,
`00007.txt` for answers); `results.jsonl` in the output folder records each finished line, its request and its
files. A rerun skips every line whose recorded request is unchanged and whose files still exist, so an
interrupted job continues where it stopped. A line that fails is reported (stderr and `errors.jsonl`), the
others still run, and nothing already written is touched.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

COMMON_FIELDS = {"id", "seed", "temperature", "top_k", "top_p"}
TASK_FIELDS = {
    "generate": COMMON_FIELDS | {"prompt", "size", "cfg", "n"},
    "edit": COMMON_FIELDS | {"image", "instruction", "cfg", "n"},
    "understand": COMMON_FIELDS | {"image", "question", "max_new_tokens"},
}
TEXT_FIELD = {"generate": "prompt", "edit": "instruction", "understand": "question"}
ALIASES = {"edit": {"prompt": "instruction"}, "understand": {"prompt": "question"}}
NUMBER_FIELDS = {"cfg", "temperature", "top_p"}
INT_FIELDS = {"n", "top_k", "max_new_tokens"}


class LineError(ValueError):
    """A JSONL line that cannot be run as written."""


@dataclass
class BatchSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[dict] = field(default_factory=list)


def parse_line(task: str, raw: str, base: Path) -> dict[str, Any]:
    """One JSONL line -> its request fields (checked types, aliases applied, image path made absolute)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LineError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(value, str) and task == "generate":
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise LineError(f"expected a JSON object, got {type(value).__name__}")
    fields = dict(value)
    for alias, name in ALIASES.get(task, {}).items():
        if alias in fields:
            if name in fields:
                raise LineError(f"give {name!r} or {alias!r}, not both")
            fields[name] = fields.pop(alias)
    unknown = sorted(set(fields) - TASK_FIELDS[task])
    if unknown:
        raise LineError(f"unknown field(s) {', '.join(map(repr, unknown))}; {task} lines take "
                        f"{', '.join(sorted(TASK_FIELDS[task]))}")
    text = TEXT_FIELD[task]
    if not isinstance(fields.get(text), str) or not fields[text].strip():
        raise LineError(f"{text!r} is missing or empty")
    if task == "edit" and "image" not in fields:
        raise LineError("'image' is missing")
    if "image" in fields:
        if not isinstance(fields["image"], str) or not fields["image"]:
            raise LineError("'image' must be a file path")
        fields["image"] = str((base / Path(fields["image"]).expanduser()))
    for name in NUMBER_FIELDS & set(fields):
        if isinstance(fields[name], bool) or not isinstance(fields[name], (int, float)) or not math.isfinite(fields[name]):
            raise LineError(f"{name!r} must be a number, got {fields[name]!r}")
    for name in (INT_FIELDS | {"seed"}) & set(fields):
        ok = isinstance(fields[name], int) and not isinstance(fields[name], bool)
        if not ok and not (name == "seed" and fields[name] is None):
            raise LineError(f"{name!r} must be an integer, got {fields[name]!r}")
    if "size" in fields:
        size = fields["size"]
        if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
            fields["size"] = f"{size[0]}x{size[1]}"
        elif not isinstance(size, str):
            raise LineError(f"'size' must be \"HxW\" or [h, w], got {size!r}")
    if "id" in fields:
        ident = str(fields["id"]) if isinstance(fields["id"], (str, int)) and not isinstance(fields["id"], bool) else ""
        if not ID_PATTERN.fullmatch(ident):
            raise LineError(f"'id' must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                            f"got {fields['id']!r}")
        fields["id"] = ident
    return fields


def _load_results(path: Path) -> dict[str, dict]:
    """id -> latest record; a torn last line (a crash mid-write) is ignored."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            records[rec["id"]] = rec
    return records


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, OSError)):
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_batch(task: str, jsonl: Path, out_dir: Path, defaults: dict[str, Any], model: Callable[[], Any], *,
              model_id: str, quiet: bool = False, report: Callable[[str], None] | None = None) -> BatchSummary:
    """Run every line of `jsonl` through `model()` (a loaded `Wallaroo`, asked for only when a line needs it).

    `defaults` holds the command's flags (seed, cfg, size, ...) under the line field names; `model_id` identifies
    the model so that changing it redoes the lines. `report(message)` receives one line per failed line.
    """
    from .sdk import save_png  # light: PIL and numpy only

    say = report or (lambda _m: None)
    try:
        raw_lines = jsonl.read_bytes().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(2, "prompts file not found", str(jsonl)) from None
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; batch results go into a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    records = _load_results(results_path)
    base = jsonl.resolve().parent
    numbered = [(i + 1, line) for i, line in enumerate(raw_lines) if line.strip()]
    summary = BatchSummary(total=len(numbered))
    seen: set[str] = set()
    bar = tqdm(numbered, desc=task, unit="line", disable=True if quiet else None)

    def fail(lineno: int, key: str | None, message: str) -> None:
        summary.failed += 1
        summary.errors.append({"line": lineno, "id": key, "error": message})
        say(f"{jsonl}:{lineno}: {message}")

    for lineno, raw in bar:
        key = None
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LineError("not UTF-8 text") from None
            fields = parse_line(task, text, base)
            key = fields.pop("id", None) or f"{lineno:05d}"
            if key in seen:
                raise LineError(f"id {key!r} is used by an earlier line")
            seen.add(key)
            request = {**defaults, **fields, "model": model_id}
            done = records.get(key)
            if done and done.get("request") == request and all((out_dir / f).is_file() for f in done.get("files", [])):
                summary.skipped += 1
                continue
            t0 = time.perf_counter()
            files, answer = _run_line(task, request, key, out_dir, model(), save_png)
            record = {"id": key, "line": lineno, "request": request, "files": files,
                      "seconds": round(time.perf_counter() - t0, 3)}
            if answer is not None:
                record["answer"] = answer
            with open(results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.done += 1
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a bad line must not stop the batch
            fail(lineno, key, _one_line(exc))
    bar.close()

    errors_path = out_dir / ERRORS_FILE
    if summary.errors:
        _write_text(errors_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in summary.errors))
    else:
        errors_path.unlink(missing_ok=True)
    return summary


def _run_line(task: str, request: dict[str, Any], key: str, out_dir: Path, wal, save_png) -> tuple[list[str], str | None]:
    knobs = {k: request[k] for k in ("seed", "temperature", "top_k", "top_p") if k in request}
    if task == "understand":
        answer = wal.understand(request.get("image"), request["question"],
                                max_new_tokens=request.get("max_new_tokens"), **knobs)
        name = f"{key}.txt"
        _write_text(out_dir / name, answer + "\n")
        return [name], answer
    knobs.update({k: request[k] for k in ("cfg", "n") if k in request})
    if task == "generate":
        images = wal.generate(request["prompt"], size=request.get("size"), **knobs)
    else:
        images = wal.edit(request["image"], request["instruction"], **knobs)
    names = [f"{key}.png"] if len(images) == 1 else [f"{key}_{i}.png" for i in range(len(images))]
    for image, name in zip(images, names):
        save_png(image, out_dir / name, {**image.info.get("wallaroo", {}), "batch_id": key})
    return names, None
