"""Model folders: writing, strict loading, and conversion from the official Wallaroo release.

A model folder holds `config.json` (architecture, token table, sizes, templates, sampling defaults),
`model-XXXXX-of-YYYYY.safetensors` shards with `model.safetensors.index.json` (or one `model.safetensors`),
and `tokenizer.json`. Loading builds the model on the meta device, memory-maps the shards, checks every
tensor name and shape against the model, and only then materialises weights in the requested dtype/device.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
import pickle
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attention import resolve_backend
from .config import ConfigError, LLMConfig, VisionConfig, VQConfig, WallarooConfig
from .model import WallarooModel
from .text import TextTokenizer, TokenizerError

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


_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
                 "xavier_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def skip_parameter_init() -> Iterator[None]:
    """Make torch.nn.init a no-op while building a model whose weights are about to be loaded.

    On the meta device the first initialiser call imports torch's reference decompositions (seconds of
    startup for every CLI call); the values would be overwritten anyway.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


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
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
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
    with torch.device("meta"), skip_parameter_init():
        model = WallarooModel(cfg)
    expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    tensors = read_tensors(folder, expected, dt, dev)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.set_attention_backend(backend)
    model.eval().requires_grad_(False)
    return model, tokenizer


# --- conversion from the official release --------------------------------------------------------

_OFFICIAL_HEAD = re.compile(r"(gen_image_head|edit_image_head|pixel_adapter|(gen|edit)_input_(adpater|adapter))\.")


def _official_name(name: str) -> str | None:
    """Map a name from the official checkpoint to ours; None for a name that belongs to no known part.

    The reference's outer `Wallaroo` module holds the backbone as `self.wallaroo` (a Qwen2.5-VL
    ForConditionalGeneration: `model.*`, `visual.*`, `lm_head.weight`) and the heads as its own attributes, so
    backbone names carry a `wallaroo.` prefix and head names (with the `adpater` misspelling) do not.
    """
    name = name.removeprefix("module.")  # a DDP/DeepSpeed wrapper's prefix, should a checkpoint keep one
    if name.startswith("wallaroo."):
        name = name[len("wallaroo."):]
        # Newer transformers nest the backbone as model.language_model.* / model.visual.*; accept both layouts.
        name = re.sub(r"^model\.language_model\.", "model.", name)
        return re.sub(r"^model\.visual\.", "visual.", name)
    if not _OFFICIAL_HEAD.match(name):
        return None
    return re.sub(r"^(gen|edit)_input_adpater\.", r"\1_input_adapter.", name)


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

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{tokenizer_json}: cannot read tokenizer ({exc})") from None
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


def vq_config_from_state(state: dict[str, torch.Tensor], path: Path) -> VQConfig:
    """LlamaGen VQ sizes read from its tensor shapes (GroupNorm groups are LlamaGen's fixed 32)."""
    try:
        codebook, conv_in, quant_conv = (state[k] for k in (
            "quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight"))
    except KeyError as exc:
        raise WeightsError(f"{path}: no tensor {exc.args[0]!r}; not a LlamaGen VQ checkpoint") from None
    ch = conv_in.shape[0]
    widths: dict[int, int] = {}
    blocks: set[int] = set()
    for name, t in state.items():
        m = re.fullmatch(r"encoder\.conv_blocks\.(\d+)\.res\.(\d+)\.conv1\.weight", name)
        if m:
            level, block = int(m[1]), int(m[2])
            widths[level] = t.shape[0]  # every res block of a level outputs the level's width
            if level == 0:
                blocks.add(block)
    if not widths or sorted(widths) != list(range(len(widths))) or any(w % ch for w in widths.values()):
        raise WeightsError(f"{path}: encoder.conv_blocks.* tensors do not form a LlamaGen VQ encoder")
    return VQConfig(codebook_size=codebook.shape[0], codebook_embed_dim=codebook.shape[1], ch=ch,
                    ch_mult=tuple(widths[i] // ch for i in range(len(widths))), num_res_blocks=len(blocks),
                    z_channels=quant_conv.shape[1], in_channels=conv_in.shape[1])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def convert_official(checkpoint: str | Path, vq_checkpoint: str | Path, qwen_dir: str | Path, out_dir: str | Path,
                     dtype: str = "bf16", progress: Callable[[str], None] | None = None,
                     shard_bytes: int = 2 << 30) -> Path:
    """Official `checkpoint.ckpt` + LlamaGen `vq_ds16_t2i.pt` + Qwen2.5-VL tokenizer/config -> model folder."""
    checkpoint, vq_checkpoint, qwen_dir, out = Path(checkpoint), Path(vq_checkpoint), Path(qwen_dir), Path(out_dir)
    say = progress or (lambda _msg: None)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} for the converted weights; choose bf16, fp16 or fp32")
    for path, what in ((checkpoint, "Wallaroo checkpoint"), (vq_checkpoint, "LlamaGen VQ checkpoint")):
        if not path.is_file():
            raise WeightsError(f"{path}: {what} not found")
    for name in ("config.json", TOKENIZER_FILE):
        if not (qwen_dir / name).is_file():
            raise WeightsError(f"{qwen_dir / name}: missing; pass the Qwen2.5-VL-7B-Instruct folder "
                               "(config.json and tokenizer.json)")
    if out.exists() and not out.is_dir():
        raise WeightsError(f"{out}: exists and is not a folder; choose another output folder")
    qwen_path = qwen_dir / "config.json"
    pre_path = qwen_dir / "preprocessor_config.json"
    qwen_cfg, preprocessor = _read_json(qwen_path), (_read_json(pre_path) if pre_path.is_file() else None)
    try:
        llm, vision = config_from_qwen(qwen_cfg, preprocessor)
    except ConfigError as exc:
        raise ConfigError(f"{qwen_path}: {exc}") from None

    say(f"reading {checkpoint}")
    state = _torch_load(checkpoint, "state_dict")
    say(f"reading {vq_checkpoint}")
    vq_state = _torch_load(vq_checkpoint, "model")

    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        ours = _official_name(name)
        if ours is None or not isinstance(t, torch.Tensor):
            raise WeightsError(f"{checkpoint}: unexpected entry {name!r}; not an official Wallaroo checkpoint")
        tensors[ours] = t
    for name, t in vq_state.items():
        if name.endswith("codebook_used"):
            continue  # a training statistic, unused at inference
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{vq_checkpoint}: entry {name!r} is not a tensor; not a LlamaGen VQ checkpoint")
        tensors["vq." + name] = t
    vq = vq_config_from_state(vq_state, vq_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    token_table = add_wallaroo_tokens(qwen_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    cfg = WallarooConfig(name="wallaroo-7b" if llm.hidden_size == 3584 else f"wallaroo-{llm.hidden_size}",
                         llm=llm, vision=vision, vq=vq, tokens=token_table,
                         has_edit=any(k.startswith("edit_image_head.") for k in tensors),
                         weights_dtype=str(DTYPES[dtype]).removeprefix("torch."))
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{qwen_dir}: the Qwen config, tokenizer and VQ checkpoint do not fit together ({exc})") from None
    # Check names and shapes before writing anything large.
    with torch.device("meta"), skip_parameter_init():
        expected = {k: v.shape for k, v in WallarooModel(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))

    def source(name: str) -> Path:
        return vq_checkpoint if name.startswith("vq.") else checkpoint

    if missing:
        raise WeightsError(f"{source(missing[0])}: tensor {missing[0]!r} missing ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{source(unexpected[0])}: unexpected tensor {unexpected[0]!r} "
                           f"({len(unexpected)} unexpected in all)")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise WeightsError(f"{source(k)}: tensor {k!r} has shape {list(tensors[k].shape)}, expected {list(shape)} "
                               f"from {qwen_path} and the VQ checkpoint")
    say(f"checked {len(expected)} tensors; writing {dtype} safetensors to {out}")
    save_model_folder(out, cfg, ((k, tensors[k]) for k in expected), out / TOKENIZER_FILE, shard_bytes=shard_bytes,
                      dtype=DTYPES[dtype])
    return out


def _torch_load(path: Path, key: str) -> dict[str, object]:
    """The `key` dict of a torch.save checkpoint, read with weights_only=True (pickled code is refused)."""
    # Legacy (non-zip) torch.save files cannot be memory-mapped; both kinds are read with weights_only.
    is_zip = zipfile.is_zipfile(path)
    try:
        # LlamaGen's training scripts save their argparse.Namespace under "args"; that plain attribute holder
        # runs no code when unpickled, so it is the one class allowed beyond weights_only's defaults.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise WeightsError(f"{path}: refused to load: the pickle would call {refused[1]}, which weights_only=True "
                               "does not allow; only plain-tensor checkpoints are accepted") from None
        raise WeightsError(f"{path}: not a PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # zip, pickle and format errors all mean "not a usable checkpoint"
        # Errors from parsing a non-zip file are byte-level noise (e.g. KeyError: 105); only zip ones say more.
        detail = f" ({str(exc).splitlines()[0]})" if is_zip and str(exc) else ""
        raise WeightsError(f"{path}: not a PyTorch checkpoint written by torch.save{detail}; check the path") from None
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: holds no {key!r} dict of tensors; not the expected checkpoint")
    return obj
