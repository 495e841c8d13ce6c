"""The `wallaroo` command: understand, generate and edit images (one at a time or in resumable JSONL batches),
download and convert the official release, evaluate shapes-world models, and describe model folders.

Each subcommand is one `add_<name>` function (its arguments) and one `cmd_<name>` function (its work).
Errors print one line, `wallaroo: error: <message>`, and no traceback. Exit codes: 0 success; 2 bad input or
usage (bad files, bad values, unsupported sizes); 1 a runtime failure (a failed download, a batch with failed
lines, a model error); 130 interrupted. `info` reads only config.json and the safetensors headers, so it neither
imports torch nor loads weights; no command imports torch before it needs a model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__

PROG = "wallaroo"
MODEL_ENV = "WALLAROO_MODEL"
DEBUG_ENV = "WALLAROO_DEBUG"  # set to 1 to get tracebacks of unexpected errors
EXIT_ERROR = 2    # bad input or usage
EXIT_FAILURE = 1  # the work itself failed
# Model-folder file names (the safetensors sharding convention; see wallaroo_nodes/engine/weights.py).
CONFIG_FILE, INDEX_FILE, SINGLE_FILE = "config.json", "model.safetensors.index.json", "model.safetensors"
# Parameter groups reported by `info`, by name prefix; the first match wins.
PARTS = (("llm", ("model.", "lm_head.")), ("vision", ("visual.",)), ("vq", ("vq.",)),
         ("generate_heads", ("gen_",)), ("edit_heads", ("edit_", "pixel_adapter.")))
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# --- convert ----------------------------------------------------------------------------------------

def add_convert(sub: argparse._SubParsersAction) -> None:
    """The `convert` subcommand's arguments."""
    p = sub.add_parser("convert", help="convert the official Wallaroo release into a model folder",
                       description="Convert the official checkpoint.ckpt, LlamaGen's vq_ds16_t2i.pt and the "
                                   "Qwen2.5-VL-7B-Instruct folder (config.json, tokenizer.json) into a model "
                                   "folder of safetensors shards. Pickles are read with weights_only=True.")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="FILE", help="official checkpoint.ckpt")
    p.add_argument("--vq", required=True, type=Path, metavar="FILE", help="LlamaGen vq_ds16_t2i.pt")
    p.add_argument("--qwen", required=True, type=Path, metavar="DIR",
                   help="Qwen2.5-VL-7B-Instruct folder with config.json and tokenizer.json")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="model folder to write")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the saved weights (default: bf16, as released)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """Run the conversion, printing each step; the last line is the model folder."""
    from wallaroo_nodes.engine.weights import convert_official

    out = convert_official(args.checkpoint, args.vq, args.qwen, args.out, dtype=args.dtype,
                           progress=lambda msg: print(msg, flush=True))
    print(out.resolve())
    return 0


# --- info -------------------------------------------------------------------------------------------

def add_info(sub: argparse._SubParsersAction) -> None:
    """The `info` subcommand's arguments."""
    p = sub.add_parser("info", help="describe a model folder without loading its weights",
                       description="Print a model folder's name, sizes, parameter counts per part, weights "
                                   "dtype, supported image sizes, token table and sampling defaults.")
    p.add_argument("--model", metavar="PATH",
                   help=f"model folder or bundled model name (default: ${MODEL_ENV}, else the bundled default)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    """Print `model_info` as text or JSON."""
    info = model_info(resolve_model(args.model))
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_info(info))
    return 0


def resolve_model(model: str | None) -> Path:
    """The model folder: the argument, else $WALLAROO_MODEL, else the engine's default bundled model."""
    model = model or os.environ.get(MODEL_ENV) or None
    if model is not None and Path(model).expanduser().is_dir():
        return Path(model).expanduser()  # a plain folder needs no torch import
    from wallaroo_nodes.engine.cache import resolve_model as resolve_bundled  # bundled names, the default model

    return resolve_bundled(model)


def tensor_headers(folder: Path) -> dict[str, dict[str, Any]]:
    """name -> {"dtype", "shape", "file"} for every tensor, read from the safetensors headers only."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE}; is this a Wallaroo model folder? "
                         "Convert official weights with `wallaroo convert`.")
    out: dict[str, dict[str, Any]] = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            raise ValueError(f"{path}: shard listed in {INDEX_FILE} is missing")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"{path}: unreadable safetensors header, the file is truncated or corrupt")
            try:
                tensors = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
                end = max((int(meta["data_offsets"][1]) for meta in tensors.values()), default=0)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
                raise ValueError(f"{path}: unreadable safetensors header, the file is truncated or corrupt") from None
        if 8 + n + end > size:
            raise ValueError(f"{path}: the file is truncated ({size} bytes, its header describes {8 + n + end})")
        for name, meta in tensors.items():
            out[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "file": file}
    return out


def part_of(name: str) -> str:
    """The `info` parameter group of a tensor name."""
    return next((part for part, prefixes in PARTS if name.startswith(prefixes)), "other")


def model_info(folder: Path) -> dict[str, Any]:
    """Everything `wallaroo info` reports, from config.json and the safetensors headers (no weights loaded)."""
    from wallaroo_nodes.engine.config import WallarooConfig

    cfg = WallarooConfig.load(folder / CONFIG_FILE)
    headers = tensor_headers(folder)
    params = {part: 0 for part, _ in PARTS}
    for name, meta in headers.items():
        part = part_of(name)
        params[part] = params.get(part, 0) + math.prod(meta["shape"])
    params["total"] = sum(params.values())
    file_dtypes = sorted({SAFETENSORS_DTYPES.get(m["dtype"], m["dtype"]) for m in headers.values()})
    return {
        "name": cfg.name,
        "path": str(folder.resolve()),
        "llm": dataclasses.asdict(cfg.llm),
        "vision": dataclasses.asdict(cfg.vision),
        "vq": {**dataclasses.asdict(cfg.vq), "downsample": cfg.vq.downsample},
        "has_edit": cfg.has_edit,
        "parameters": params,
        "weights": {"dtype": cfg.weights_dtype, "file_dtypes": file_dtypes,
                    "files": len({m["file"] for m in headers.values()}),
                    "bytes": sum((folder / f).stat().st_size for f in {m["file"] for m in headers.values()})},
        "sizes": [f"{h}x{w}" for h, w in cfg.protocol.sizes],
        "default_size": "{}x{}".format(*cfg.protocol.default_size),
        "tokens": dict(cfg.tokens),
        "sampling": dataclasses.asdict(cfg.sampling),
    }


def format_info(info: dict[str, Any]) -> str:
    """`model_info` as aligned text."""
    llm, vis, vq, w = info["llm"], info["vision"], info["vq"], info["weights"]
    full = ", ".join(str(i) for i in vis["fullatt_block_indexes"]) or "none"
    lines = [
        f"model       {info['name']}  ({info['path']})",
        f"weights     {w['dtype']} (on disk: {', '.join(w['file_dtypes'])}), {w['files']} file(s), "
        f"{w['bytes'] / 1e9:.2f} GB",
        f"LLM         {llm['num_layers']} layers, hidden {llm['hidden_size']}, {llm['num_heads']} heads "
        f"({llm['num_kv_heads']} KV), MLP {llm['intermediate_size']}, vocab {llm['vocab_size']}, "
        f"rope theta {llm['rope_theta']:g}, M-RoPE sections {list(llm['mrope_section'])}"
        f"{' interleaved' if llm.get('mrope_interleaved') else ''}",
        f"vision      {vis['depth']} blocks, width {vis['hidden_size']}, {vis['num_heads']} heads, "
        f"MLP {vis['intermediate_size']}, patch {vis['patch_size']}, window {vis['window_size']} px, "
        f"full attention in blocks {full}",
        f"VQ          codebook {vq['codebook_size']} x {vq['codebook_embed_dim']}, ch {vq['ch']}, "
        f"ch_mult {list(vq['ch_mult'])}, z {vq['z_channels']}, downsample {vq['downsample']}",
        f"editing     {'yes' if info['has_edit'] else 'no'}",
        "parameters  " + ", ".join(f"{part} {n:,}" for part, n in info["parameters"].items()),
        f"sizes (HxW) {' '.join(info['sizes'])}  (default {info['default_size']})",
        "tokens",
        *(f"  {name:<24} {tid}" for name, tid in info["tokens"].items()),
        "sampling defaults",
        *(f"  {name:<26} {value}" for name, value in info["sampling"].items()),
    ]
    return "\n".join(lines)


# --- shared pieces of the model commands -------------------------------------------------------------

class UsageError(ValueError):
    """Arguments that do not fit together (exit code 2)."""


class Failed(Exception):
    """The work ran and failed; the message is printed as one line and the exit code is 1."""


SIZE_RE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def _size(text: str) -> str:
    match = SIZE_RE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW (height x width in pixels, e.g. 512x512), got {text!r}")
    return f"{int(match[1])}x{int(match[2])}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH",
                   help=f"model folder or bundled model name (default: ${MODEL_ENV}, else the bundled default)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype in memory (default: auto = bf16/fp16 on GPU, fp32 on CPU)")
    g.add_argument("--attention", default="auto", choices=("auto", "sdpa", "xformers"),
                   help="attention backend (default: auto)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status messages")


def _add_sampling_flags(p: argparse.ArgumentParser, image: bool) -> None:
    g = p.add_argument_group("sampling (defaults: the model's own, from its config.json)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0); -1 draws a random one")
    if image:
        g.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = none)")
        g.add_argument("--n", type=_positive_int, default=1, help="images per prompt, decoded as one batch (default: 1)")
    g.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = all)")


def _add_batch_flags(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                   help="batch mode: one JSON request per line; results go into --out DIR (see `docs/sdk.md`)")
    p.add_argument("--out", type=Path, metavar="PATH", help=out_help)


def _seed(args: argparse.Namespace) -> int | None:
    return None if args.seed == -1 else args.seed


def _knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags that were given, under the SDK's argument names."""
    names = ("cfg", "n", "temperature", "top_k", "top_p", "max_new_tokens")
    knobs = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    knobs["seed"] = _seed(args)
    return knobs


def _status(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr, only on a terminal and without --quiet."""
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def _model_folder_and_config(args: argparse.Namespace):
    """The model folder and its config, read without loading weights (so bad flags fail fast)."""
    from wallaroo_nodes.engine.config import WallarooConfig

    folder = resolve_model(args.model)
    return folder, WallarooConfig.load(folder / CONFIG_FILE)


def _load(args: argparse.Namespace, folder: Path):
    from .sdk import Wallaroo

    _status(args, f"loading {folder} ...")
    return Wallaroo.load(folder, device=args.device, dtype=args.dtype, attention=args.attention)


def _row_bar(args: argparse.Namespace, task: str):
    """A tqdm bar over decoded image rows and the SDK progress callback that drives it."""
    from tqdm import tqdm

    bar = tqdm(desc=task, unit="row", disable=True if args.quiet else None, leave=False)

    def progress(p) -> None:
        if bar.total != p.total:
            bar.reset(total=p.total)
        bar.n = p.done
        bar.refresh()

    return bar, progress


def _png_targets(out: Path, n: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: results are saved as PNG (with their settings in text chunks); "
                         "give a .png file name")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a .png file name (folders are for --prompts batches)")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def _check_mode(args: argparse.Namespace, positional: Sequence[str], names: str) -> bool:
    """True for batch mode; checks that single and batch arguments are not mixed."""
    given = [getattr(args, k) for k in positional]
    if args.prompts is not None:
        if any(v is not None for v in given):
            raise UsageError(f"give either {names} or --prompts FILE.jsonl, not both")
        if args.out is None:
            raise UsageError("--prompts needs --out DIR (the folder for the results)")
        if not args.prompts.is_file():
            raise UsageError(f"{args.prompts}: prompts file not found")
        return True
    if any(v is None for v in given):
        raise UsageError(f"give {names}, or --prompts FILE.jsonl for a batch")
    return False


def _run_batch(args: argparse.Namespace, task: str, defaults: dict[str, Any]) -> int:
    from tqdm import tqdm

    from .batch import ERRORS_FILE, run_batch

    folder, _cfg = _model_folder_and_config(args)
    loaded = []

    def model():
        if not loaded:
            loaded.append(_load(args, folder))
        return loaded[0]

    def report(message: str) -> None:
        tqdm.write(f"{PROG}: error: {message}", file=sys.stderr)

    given = {k: v for k, v in defaults.items() if v is not None or k == "seed"}  # seed None: a random one per line
    summary = run_batch(task, args.prompts, args.out, given, model,
                        model_id=str(Path(folder).resolve()), quiet=args.quiet, report=report)
    print(f"{task}: {summary.done} done, {summary.skipped} skipped (already done), {summary.failed} failed, "
          f"of {summary.total} lines; results in {args.out}")
    if summary.failed:
        raise Failed(f"{summary.failed} of {summary.total} lines failed; see {args.out / ERRORS_FILE}")
    return 0


# --- generate ---------------------------------------------------------------------------------------

def add_generate(sub: argparse._SubParsersAction) -> None:
    """The `generate` subcommand's arguments."""
    p = sub.add_parser("generate", help="generate images from a text prompt (or a JSONL batch of prompts)",
                       description="Generate images from an English or Chinese prompt and save them as PNGs whose "
                                   "text chunks hold the prompt, seed, model and settings. With --n N > 1, "
                                   "FILE.png becomes FILE_0.png ... FILE_{N-1}.png.")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the text prompt")
    _add_batch_flags(p, "the PNG to write (batch mode: the results folder)")
    p.add_argument("--size", type=_size, metavar="HxW", help="output size from the model's table (see `wallaroo info`)")
    _add_sampling_flags(p, image=True)
    _add_model_flags(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate one prompt's images, or run a batch."""
    if _check_mode(args, ["prompt"], "PROMPT"):
        return _run_batch(args, "generate", {**_knobs(args), "size": args.size})
    if args.out is None:
        raise UsageError("--out FILE.png is required")
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    targets = _png_targets(args.out, args.n)
    folder, cfg = _model_folder_and_config(args)
    from wallaroo_nodes.engine.images import check_size

    size = check_size(args.size or tuple(cfg.protocol.default_size), cfg.protocol.sizes)
    wal = _load(args, folder)
    bar, progress = _row_bar(args, "generate")
    with bar:
        images = wal.generate(args.prompt, size=size, progress=progress, **_knobs(args))
    return _save_all(images, targets)


def _save_all(images, targets: list[Path]) -> int:
    from .sdk import save_png

    for image, path in zip(images, targets):
        save_png(image, path)
        print(path)
    return 0


# --- edit -------------------------------------------------------------------------------------------

def add_edit(sub: argparse._SubParsersAction) -> None:
    """The `edit` subcommand's arguments."""
    p = sub.add_parser("edit", help="edit an image by an instruction (or a JSONL batch of edits)",
                       description="Edit an image following an English or Chinese instruction. The output has the "
                                   "supported size closest to the input's aspect ratio. PNG text chunks hold the "
                                   "instruction, seed, model and settings.")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="the image file to edit")
    p.add_argument("instruction", nargs="?", metavar="INSTRUCTION", help="what to change")
    _add_batch_flags(p, "the PNG to write (batch mode: the results folder)")
    _add_sampling_flags(p, image=True)
    _add_model_flags(p)
    p.set_defaults(func=cmd_edit)


def cmd_edit(args: argparse.Namespace) -> int:
    """Edit one image, or run a batch."""
    if _check_mode(args, ["image", "instruction"], "IMAGE and INSTRUCTION"):
        return _run_batch(args, "edit", _knobs(args))
    if args.out is None:
        raise UsageError("--out FILE.png is required")
    if not args.instruction.strip():
        raise UsageError("the edit instruction is empty; say what to change")
    targets = _png_targets(args.out, args.n)
    from .sdk import to_pil

    source = to_pil(args.image)  # a missing or unreadable image fails before the model loads
    folder, cfg = _model_folder_and_config(args)
    if not cfg.has_edit:
        raise ValueError(f"model {cfg.name!r} ({folder}) has no editing heads")
    wal = _load(args, folder)
    bar, progress = _row_bar(args, "edit")
    with bar:
        images = wal.edit(source, args.instruction, progress=progress, **_knobs(args))
    for im in images:
        im.info["wallaroo"]["source"] = str(args.image)
    return _save_all(images, targets)


# --- understand -------------------------------------------------------------------------------------

def add_understand(sub: argparse._SubParsersAction) -> None:
    """The `understand` subcommand's arguments."""
    p = sub.add_parser("understand", help="answer a question about an image (or a JSONL batch of questions)",
                       description="Answer a question about an image; the answer is printed as it is produced.")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="the image file")
    p.add_argument("question", nargs="?", metavar="QUESTION", help="the question")
    _add_batch_flags(p, "batch mode: the results folder (one NAME.txt per line, and results.jsonl)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="longest answer in tokens (default: the model's)")
    _add_sampling_flags(p, image=False)
    _add_model_flags(p)
    p.set_defaults(func=cmd_understand)


def cmd_understand(args: argparse.Namespace) -> int:
    """Stream one answer to stdout, or run a batch."""
    if _check_mode(args, ["image", "question"], "IMAGE and QUESTION"):
        return _run_batch(args, "understand", _knobs(args))
    if args.out is not None:
        raise UsageError("--out is for --prompts batches; a single answer is printed")
    if not args.question.strip():
        raise UsageError("the question is empty; ask something about the image")
    from .sdk import to_pil

    image = to_pil(args.image)
    folder, _cfg = _model_folder_and_config(args)
    wal = _load(args, folder)
    text = ""
    for piece in wal.understand_stream(image, args.question, **_knobs(args)):
        piece = piece.lstrip() if not text else piece
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# --- download ---------------------------------------------------------------------------------------

def add_download(sub: argparse._SubParsersAction) -> None:
    """The `download` subcommand's arguments."""
    from .download import DEFAULT_ENDPOINT, ENDPOINT_ENV, TOKEN_ENV

    p = sub.add_parser("download", help="download the official weights from the Hugging Face hub and convert them",
                       description="Fetch the official Wallaroo checkpoint, LlamaGen's vq_ds16_t2i.pt and the "
                                   "Qwen2.5-VL-7B-Instruct config/tokenizer files into OUT/sources (resumable, with "
                                   "size and checksum checks), then convert them into OUT/model. Rerunning resumes "
                                   "interrupted files and skips verified ones.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="download folder")
    p.add_argument("--endpoint", metavar="URL",
                   help=f"hub endpoint (default: ${ENDPOINT_ENV}, else {DEFAULT_ENDPOINT})")
    p.add_argument("--token", metavar="TOKEN", help=f"hub access token (default: ${TOKEN_ENV})")
    p.add_argument("--model-out", type=Path, metavar="DIR", help="converted model folder (default: OUT/model)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the converted weights (default: bf16, as released)")
    p.add_argument("--checkpoint-file", metavar="NAME",
                   help="the checkpoint's file name in the Wallaroo hub repo (default: checkpoint.ckpt, else the "
                        "repo's one checkpoint file)")
    p.add_argument("--no-convert", action="store_true", help="only download and verify")
    p.add_argument("--retries", type=int, default=3, help="resume attempts per file within one run (default: 3)")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default: 30)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    """Download, verify, convert; the last line printed is the model folder (or the sources folder)."""
    from .download import DownloadError, download_official

    try:
        result = download_official(args.out, endpoint=args.endpoint, token=args.token, model_dir=args.model_out,
                                   convert=not args.no_convert, dtype=args.dtype,
                                   checkpoint_file=args.checkpoint_file, retries=args.retries, timeout=args.timeout,
                                   quiet=args.quiet, log=lambda msg: print(msg, flush=True))
    except DownloadError as exc:
        raise Failed(str(exc)) from None
    print((result.model or result.folder / "sources").resolve())
    return 0


# --- eval -------------------------------------------------------------------------------------------

EVAL_TASKS = {"und": "und", "understand": "und", "understanding": "und", "gen": "gen", "generate": "gen",
              "generation": "gen", "edit": "edit", "editing": "edit"}


def _tasks(text: str) -> tuple[str, ...]:
    out = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        if name not in EVAL_TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {name!r}; choose from understand, generate, edit")
        out.append(EVAL_TASKS[name])
    if not out:
        raise argparse.ArgumentTypeError("no tasks given")
    return tuple(dict.fromkeys(out))


def add_eval(sub: argparse._SubParsersAction) -> None:
    """The `eval` subcommand's arguments."""
    p = sub.add_parser("eval", help="score a shapes-world model on held-out scenes",
                       description="Score understanding, generation and editing on held-out shapes-world scenes "
                                   "with the pixel analyser (wallaroo_nodes.eval). Meaningful for models trained "
                                   "on the shapes world, such as the bundled tiny model.")
    p.add_argument("--n", type=_positive_int, default=20, help="cases per task (default: 20)")
    p.add_argument("--tasks", type=_tasks, default=("und", "gen", "edit"), metavar="LIST",
                   help="comma-separated: understand, generate, edit (default: all)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    p.add_argument("--grid", type=Path, metavar="FILE", help="write a picture grid of samples (PNG)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--top-k", type=int, help="top-k (default: the model's)")
    p.add_argument("--temperature", type=float, help="temperature (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--require-bars", action="store_true", help="exit with 1 when any quality bar is missed")
    _add_model_flags(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the shapes-world evaluation and print a table."""
    folder, cfg = _model_folder_and_config(args)
    from wallaroo_nodes.shapes import CANVAS_SIZES

    needs_sizes = [t for t in args.tasks if t in ("gen", "edit")]
    missing = [f"{h}x{w}" for h, w in CANVAS_SIZES if (h, w) not in {tuple(s) for s in cfg.protocol.sizes}]
    if needs_sizes and missing:
        raise ValueError(f"model {cfg.name!r} cannot be scored on shapes-world generation or editing: it does not "
                         f"support the shapes-world canvas sizes {', '.join(missing)} (its sizes: "
                         f"{', '.join(f'{h}x{w}' for h, w in cfg.protocol.sizes)}); `wallaroo eval` is meant for "
                         "shapes-world models such as the bundled 'tiny'; use --tasks understand to score "
                         "understanding only")
    if "edit" in args.tasks and not cfg.has_edit:
        raise ValueError(f"model {cfg.name!r} has no editing heads; leave edit out of --tasks")
    for path in (args.json, args.grid):
        if path is not None and path.is_dir():
            raise UsageError(f"{path}: is a folder; give a file name")
    from tqdm import tqdm

    from wallaroo_nodes.eval import evaluate, save_grid

    wal = _load(args, folder)
    bars: dict[str, Any] = {}

    def progress(task: str, done: int, total: int) -> None:
        if task not in bars:
            bars[task] = tqdm(total=total, desc=task, unit="case", leave=False, disable=True if args.quiet else None)
        bars[task].n = done
        bars[task].refresh()

    try:
        report, samples = evaluate(wal.pipeline, n=args.n, cfg=args.cfg, top_k=args.top_k,
                                   temperature=args.temperature, seed=args.seed, tasks=args.tasks, progress=progress,
                                   keep_images=32 if args.grid else 0)
    finally:
        for bar in bars.values():
            bar.close()
    report["shapes_world_model"] = "shapes" in cfg.name
    print(format_eval(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(samples, str(args.grid))
    if args.require_bars and not all(b["pass"] for b in report.get("bars", {}).values()):
        raise Failed("quality bars missed: " + ", ".join(k for k, b in report["bars"].items() if not b["pass"]))
    return 0


def format_eval(report: dict[str, Any]) -> str:
    """The evaluation report as a table: headline metrics with their bars, then the breakdowns."""
    s = report["settings"]
    lines = [f"model {report['model']}: {report['cases_per_task']} cases per task, cfg {s['cfg']:g}, top_k {s['top_k']}, "
             f"temperature {s['temperature']:g}, seed {s['seed']} ({report['seconds']:g} s)"]
    if not report.get("shapes_world_model", True):
        lines.append("note: this model does not look like a shapes-world model; expect scores near zero")
    lines.append(f"{'metric':<28} {'value':>7} {'bar':>6}  pass")
    bars = report.get("bars", {})
    for section, keys in (("understanding", ("accuracy",)), ("generation", ("one_object", "two_objects", "overall")),
                          ("editing", ("success",))):
        if section not in report:
            continue
        for key in keys:
            name = f"{section}.{key}"
            bar = bars.get(name)
            lines.append(f"{name:<28} {report[section][key]:>7.3f} "
                         + (f"{bar['bar']:>6.2f}  {'yes' if bar['pass'] else 'NO'}" if bar else f"{'':>6}  -"))
        for key, values in report[section].items():
            if key.startswith("by_") and isinstance(values, dict):
                cells = "  ".join(f"{k} {v:.2f}" for k, v in values.items())
                lines.append(f"  {section} {key.replace('_', ' ')}: {cells}")
        balance = bars.get(f"{section}.balance")
        if balance:
            lines.append(f"{section + '.balance (max gap)':<28} {balance['value']:>7.3f} "
                         f"{balance['bar']:>6.2f}  {'yes' if balance['pass'] else 'NO'}")
    return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_understand, add_generate, add_edit, add_convert, add_download, add_eval, add_info)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="Wallaroo: understand, generate and edit images "
                                                            "with one model.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _exit_code(exc: BaseException) -> int | None:
    """2 for bad input, 1 for failed work, None for a bug (re-raised with $WALLAROO_DEBUG)."""
    if isinstance(exc, Failed):
        return EXIT_FAILURE
    mod = sys.modules.get("requests")
    if mod is not None and isinstance(exc, mod.RequestException):  # an OSError, but a network failure
        return EXIT_FAILURE
    # WeightsError, ConfigError, TokenizerError, ImageInputError, UnsupportedSizeError are ValueErrors; the
    # attention error (a bad --attention for this machine) is checked by its module, so that commands which
    # never import torch need not import it here.
    if isinstance(exc, (ValueError, OSError)):
        return EXIT_ERROR
    attention = sys.modules.get("wallaroo_nodes.engine.attention")
    if attention is not None and isinstance(exc, attention.AttentionBackendError):
        return EXIT_ERROR
    if isinstance(exc, RuntimeError) or type(exc).__name__ == "Cancelled":  # out of memory, download, remote
        return EXIT_FAILURE
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split())
    if _exit_code(exc) is None or (isinstance(exc, RuntimeError) and not _is_ours(exc)):
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("wallaroo_sdk", "wallaroo_nodes"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input or usage, 1 failed work)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error argparse already printed (2)
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = _exit_code(exc)
        if code is None and os.environ.get(DEBUG_ENV):
            raise
        print(f"{PROG}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_FAILURE if code is None else code


if __name__ == "__main__":
    sys.exit(main())
