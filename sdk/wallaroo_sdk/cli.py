"""The `wallaroo` command: convert the official release into a model folder, and describe model folders.

Each subcommand is one `add_<name>` function (its arguments) and one `cmd_<name>` function (its work).
Expected problems (bad files, bad values) print one line, `wallaroo: error: <message>`, and exit with 2.
`info` reads only config.json and the safetensors headers, so it neither imports torch nor loads weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__

PROG = "wallaroo"
MODEL_ENV = "WALLAROO_MODEL"
EXIT_ERROR = 2
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
        f"rope theta {llm['rope_theta']:g}, M-RoPE sections {list(llm['mrope_section'])}",
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


# --- entry point --------------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_convert, add_info)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="Wallaroo: understand, generate and edit images "
                                                            "with one model.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _is_expected(exc: BaseException) -> bool:
    # WeightsError, ConfigError and TokenizerError are ValueErrors; the attention error is checked by name of
    # its module so that commands which never import torch need not import it here.
    if isinstance(exc, (ValueError, OSError)):
        return True
    attention = sys.modules.get("wallaroo_nodes.engine.attention")
    return attention is not None and isinstance(exc, attention.AttentionBackendError)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 expected error or usage error)."""
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
        if not _is_expected(exc):
            raise
        print(f"{PROG}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
