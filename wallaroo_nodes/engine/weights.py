"""Model folders: writing, strict loading, and conversion from the official Wallaroo release.

A model folder holds `config.json` (architecture, token table, sizes, templates, sampling defaults),
`model-XXXXX-of-YYYYY.safetensors` shards with `model.safetensors.index.json` (or one `model.safetensors`),
and `tokenizer.json`. Loading builds the model on the meta device, memory-maps the shards, checks every
tensor name and shape against the model, and only then materialises weights in the requested dtype/device.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attention import resolve_backend
from .config import ConfigError, LLMConfig, VisionConfig, VQConfig, WallarooConfig
from .model import WallarooModel
from .text import TextTokenizer

CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILE = (
    "config.json", "model.safetensors.index.json", "model.safetensors", "tokenizer.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

# Tokens Wallaroo adds after the Qwen2.5-VL tokenizer's own, in the reference's order.
WALLAROO_ADDED_TOKENS = ("<|generate_start|>", "<|generate_end|>", "<|pixel_start|>", "<|pixel_end|>",
                         "<|end_of_line>|", "<|generate_image_pad|>")
OFFICIAL_INDICATOR_SIDES = (352, 640, 384, 672, 704, 416, 608, 576, 448, 480, 544, 512)
QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>")


class WeightsError(ValueError):
    """A weights file is missing, truncated, or does not match the model; the message names file and tensor."""


# --- writing ------------------------------------------------------------------------------------

def save_model_folder(out_dir: str | Path, config: WallarooConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                      tokenizer_json: str | Path, shard_bytes: int = 2 << 30,
                      dtype: torch.dtype | None = None) -> Path:
    """Write config, sharded safetensors with an index, and tokenizer.json; tensors may be a lazy stream."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    weight_map: dict[str, int] = {}
    total = 0
    # Shards are filled in order; a shard is written as soon as the next one starts, to bound memory.
    written: list[Path] = []

    def flush(shard: dict[str, torch.Tensor], index: int) -> None:
        path = out / f"model-{index + 1:05d}.tmp.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append(path)

    for name, tensor in tensors:
        if name in weight_map:
            raise WeightsError(f"tensor {name!r} given twice")
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush(shards[-1], len(shards) - 1)
            shards[-1] = {}
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
        weight_map[name] = len(shards) - 1
        total += nbytes
    flush(shards[-1], len(shards) - 1)
    count = len(written)
    for old in list(out.glob("model-*-of-*.safetensors")) + [out / SINGLE_FILE]:
        if old.exists():
            old.unlink()
    names = []
    for i, path in enumerate(written):
        final = out / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        path.rename(final)
        names.append(final.name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config.save(out / CONFIG_FILE)
    tok_src = Path(tokenizer_json)
    if tok_src.resolve() != (out / TOKENIZER_FILE).resolve():
        (out / TOKENIZER_FILE).write_bytes(tok_src.read_bytes())
    return out


def save_model(model: WallarooModel, out_dir: str | Path, tokenizer_json: str | Path,
               shard_bytes: int = 2 << 30) -> Path:
    """Save a live model as a model folder."""
    cfg = replace(model.cfg, weights_dtype=str(model.dtype).removeprefix("torch."))
    return save_model_folder(out_dir, cfg, model.state_dict().items(), tokenizer_json, shard_bytes)


# --- reading ------------------------------------------------------------------------------------

def _shard_files(folder: Path) -> dict[str, list[str]]:
    """file name -> tensor names, from the index or the single file."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index_path}: not a valid safetensors index ({exc})") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        return files
    if (folder / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}
    raise WeightsError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE}; is this a Wallaroo model folder? "
                       "Convert official weights with `wallaroo convert`.")


def read_tensors(folder: str | Path, expected: dict[str, tuple[torch.Size, torch.dtype]],
                 dtype: torch.dtype | None, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Read every expected tensor (memory-mapped), checking names and shapes, cast to dtype on device."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for file, listed in _shard_files(folder).items():
        path = folder / file
        if not path.is_file():
            raise WeightsError(f"{path}: shard listed in {INDEX_FILE} is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                for name in listed:
                    if name not in keys:
                        raise WeightsError(f"{path}: index lists tensor {name!r} but the file lacks it")
                for name in keys:
                    if name in where:
                        raise WeightsError(f"{path}: tensor {name!r} also appears in {where[name]}")
                    where[name] = file
                    if name not in expected:
                        raise WeightsError(f"{path}: unexpected tensor {name!r}; these weights do not belong "
                                           f"to this model config")
                    shape, model_dtype = expected[name]
                    got = tuple(f.get_slice(name).get_shape())
                    if got != tuple(shape):
                        raise WeightsError(f"{path}: tensor {name!r} has shape {list(got)}, the config expects "
                                           f"{list(shape)}; weights and config.json disagree")
                    t = f.get_tensor(name)
                    target = dtype if (dtype is not None and t.is_floating_point()) else (
                        model_dtype if t.is_floating_point() else t.dtype)
                    out[name] = t.to(device=device, dtype=target)
        except SafetensorError as exc:
            raise WeightsError(f"{path}: unreadable safetensors file, truncated or corrupt ({exc})") from None
    missing = sorted(set(expected) - set(out))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{folder}: tensor {missing[0]!r}{more} missing from the weights")
    return out


def pick_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu; anything else is checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use device='cpu' or 'auto'")
    return device


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a bf16-capable GPU, fp16 on other GPUs, fp32 on CPU (faster there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, fp32, bf16 or fp16")
    return DTYPES[dtype]


def load_model(folder: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = "auto",
               attention: str = "auto") -> tuple[WallarooModel, TextTokenizer]:
    """Load a model folder: strict name/shape checks, weights cast to dtype on device, eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: model folder not found")
    cfg = WallarooConfig.load(folder / CONFIG_FILE)
    tokenizer = TextTokenizer(folder / TOKENIZER_FILE, cfg.tokens)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    backend = resolve_backend(attention, dev)
    with torch.device("meta"):
        model = WallarooModel(cfg)
    expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    tensors = read_tensors(folder, expected, dt, dev)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.set_attention_backend(backend)
    model.eval().requires_grad_(False)
    return model, tokenizer


# --- conversion from the official release --------------------------------------------------------

def _official_name(name: str) -> str | None:
    """Map a name from the official checkpoint to ours; None for names inference does not use."""
    name = name.removeprefix("module.")
    if not name.startswith("wallaroo.") and not re.match(r"(gen|edit)_|pixel_adapter", name):
        return None if name.startswith("wallaroo") else name
    name = name.removeprefix("wallaroo.")
    # Newer transformers nest the backbone differently; accept both layouts.
    name = re.sub(r"^model\.language_model\.", "model.", name)
    name = re.sub(r"^model\.visual\.", "visual.", name)
    return name.replace("_adpater", "_adapter")


def config_from_qwen(qwen_config: dict, preprocessor: dict | None = None) -> tuple[LLMConfig, VisionConfig]:
    """LLM and vision sizes from a Qwen2.5-VL config.json (old flat or newer nested layout)."""
    text = qwen_config.get("text_config") or qwen_config
    vision = qwen_config.get("vision_config") or {}
    rope = text.get("rope_scaling") or text.get("rope_parameters") or qwen_config.get("rope_scaling") or {}
    try:
        llm = LLMConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=text.get("rope_theta", rope.get("rope_theta", 1e6)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))))
        vis = VisionConfig(
            depth=vision["depth"], hidden_size=vision["hidden_size"], num_heads=vision["num_heads"],
            intermediate_size=vision["intermediate_size"],
            out_hidden_size=vision.get("out_hidden_size", llm.hidden_size),
            in_channels=vision.get("in_chans", vision.get("in_channels", 3)),
            patch_size=vision.get("patch_size", 14), temporal_patch_size=vision.get("temporal_patch_size", 2),
            spatial_merge_size=vision.get("spatial_merge_size", 2), window_size=vision.get("window_size", 112),
            fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))))
    except KeyError as exc:
        raise ConfigError(f"Qwen2.5-VL config.json lacks {exc}") from None
    if preprocessor:
        vis = replace(vis, min_pixels=preprocessor.get("min_pixels", vis.min_pixels),
                      max_pixels=min(preprocessor.get("max_pixels", vis.max_pixels), vis.max_pixels),
                      image_mean=tuple(preprocessor.get("image_mean", vis.image_mean)),
                      image_std=tuple(preprocessor.get("image_std", vis.image_std)))
    return llm, vis


def add_wallaroo_tokens(tokenizer_json: str | Path, out_path: str | Path,
                        indicator_sides: Iterable[int] = OFFICIAL_INDICATOR_SIDES,
                        indicator_format: str = "<indicator:{}>") -> dict[str, int]:
    """Append Wallaroo's tokens to a Qwen tokenizer in the reference order; return the token table."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    for name in QWEN_TOKENS[:6]:
        if tok.token_to_id(name) is None:
            raise WeightsError(f"{tokenizer_json}: not a Qwen2.5-VL tokenizer (no {name!r} token)")
    new = list(WALLAROO_ADDED_TOKENS) + [indicator_format.format(s) for s in indicator_sides]
    # Non-special added tokens, as the reference's `tokenizer.add_tokens` makes them.
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False) for t in new
                    if tok.token_to_id(t) is None])
    tok.save(str(out_path))
    table = {name: tok.token_to_id(name) for name in QWEN_TOKENS + tuple(new)}
    return {k: v for k, v in table.items() if v is not None}


def convert_official(checkpoint: str | Path, vq_checkpoint: str | Path, qwen_dir: str | Path, out_dir: str | Path,
                     dtype: str = "bf16", progress: Callable[[str], None] | None = None) -> Path:
    """Official `checkpoint.ckpt` + LlamaGen `vq_ds16_t2i.pt` + Qwen2.5-VL tokenizer/config -> model folder."""
    checkpoint, vq_checkpoint, qwen_dir, out = Path(checkpoint), Path(vq_checkpoint), Path(qwen_dir), Path(out_dir)
    say = progress or (lambda _msg: None)
    for path, what in ((checkpoint, "Wallaroo checkpoint"), (vq_checkpoint, "LlamaGen VQ checkpoint")):
        if not path.is_file():
            raise WeightsError(f"{path}: {what} not found")
    for name in ("config.json", TOKENIZER_FILE):
        if not (qwen_dir / name).is_file():
            raise WeightsError(f"{qwen_dir / name}: missing; pass the Qwen2.5-VL-7B-Instruct folder "
                               "(config.json and tokenizer.json)")
    qwen_cfg = json.loads((qwen_dir / "config.json").read_text())
    pre_path = qwen_dir / "preprocessor_config.json"
    llm, vision = config_from_qwen(qwen_cfg, json.loads(pre_path.read_text()) if pre_path.is_file() else None)

    say(f"reading {checkpoint}")
    state = _torch_load(checkpoint)
    state = state.get("state_dict", state)
    say(f"reading {vq_checkpoint}")
    vq_state = _torch_load(vq_checkpoint)
    vq_state = vq_state.get("model", vq_state)

    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        ours = _official_name(name)
        if ours is not None and isinstance(t, torch.Tensor):
            tensors[ours] = t
    for name, t in vq_state.items():
        if name.endswith("codebook_used") or not isinstance(t, torch.Tensor):
            continue  # a training statistic, unused at inference
        tensors["vq." + name] = t
    if "vq.quantize.embedding.weight" not in tensors:
        raise WeightsError(f"{vq_checkpoint}: no tensor 'quantize.embedding.weight'; not a LlamaGen VQ checkpoint")
    codebook = tensors["vq.quantize.embedding.weight"]
    vq = VQConfig(codebook_size=codebook.shape[0], codebook_embed_dim=codebook.shape[1])
    out.mkdir(parents=True, exist_ok=True)
    token_table = add_wallaroo_tokens(qwen_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    cfg = WallarooConfig(name="wallaroo-7b" if llm.hidden_size == 3584 else f"wallaroo-{llm.hidden_size}",
                         llm=llm, vision=vision, vq=vq, tokens=token_table,
                         has_edit=any(k.startswith("edit_image_head.") for k in tensors),
                         weights_dtype=str(DTYPES[dtype]).removeprefix("torch."))
    cfg.validate()
    # Check names and shapes before writing anything large.
    with torch.device("meta"):
        expected = {k: v.shape for k, v in WallarooModel(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise WeightsError(f"{checkpoint}: tensor {missing[0]!r} missing ({len(missing)} in all)")
    if unexpected:
        raise WeightsError(f"{checkpoint}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            source = vq_checkpoint if k.startswith("vq.") else checkpoint
            raise WeightsError(f"{source}: tensor {k!r} has shape {list(tensors[k].shape)}, expected {list(shape)} "
                               f"from {qwen_dir / 'config.json'}")
    say(f"writing {out}")
    save_model_folder(out, cfg, ((k, tensors[k]) for k in expected), out / TOKENIZER_FILE, dtype=DTYPES[dtype])
    return out


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals: all mean "not a usable checkpoint"
        raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint with weights_only=True ({exc})") from None
