"""A synthetic official Wallaroo release in the exact on-disk layout, at tiny sizes.

The layout was confirmed in the reference (JiePKU/Wallaroo @ 3092d8b):
* `checkpoint.ckpt`: `torch.save({"epoch", "global_step", "state_dict"})` from the training scripts
  (examples/wallaroo/ar_wallaroo_7/train_stage4_omini.py). The outer `Wallaroo` module
  (wallaroo/models/wallaroo/modeling_wallaroo.py) holds the backbone as `self.wallaroo`, a
  Qwen2_5_VLForConditionalGeneration whose (old-transformers) state dict is `model.*`, `visual.*`,
  `lm_head.weight`; so backbone names are `wallaroo.model.*` / `wallaroo.visual.*` / `wallaroo.lm_head.weight`,
  while the heads are attributes of `Wallaroo` itself: `gen_image_head.*`, `gen_input_adpater.*`,
  `edit_image_head.*`, `edit_input_adpater.*`, `pixel_adapter.*` (the misspelling is in the names).
  The rotary `inv_freq` buffers are non-persistent, so they are not in the checkpoint.
* `vq_ds16_t2i.pt`: `torch.save({"model": LlamaGen VQModel state dict})`, including the
  `quantize.codebook_used` buffer (65536 entries) that inference ignores.
* The Qwen2.5-VL-7B-Instruct folder: `config.json` in the old flat layout, `preprocessor_config.json`,
  and a `tokenizer.json` without Wallaroo's added tokens.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from helpers import make_qwen_like_tokenizer, make_tokenizer_and_config, randomize_
from wallaroo_nodes.engine.config import VisionConfig, VQConfig, WallarooConfig
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.weights import add_wallaroo_tokens

CODEBOOK_USED = 65536


@dataclass
class Release:
    """Paths of a synthetic release and the model it was written from."""

    root: Path
    checkpoint: Path
    vq: Path
    qwen_dir: Path
    model: WallarooModel          # the source model, fp32, eval mode
    config: WallarooConfig        # what conversion must produce (apart from name and weights_dtype)
    tokenizer_json: Path          # the Qwen tokenizer with Wallaroo's tokens, as conversion must produce


def release_config(tmp: Path, tokens: dict[str, int]) -> WallarooConfig:
    """The tiny test architecture with everything else as conversion sets it for an official release."""
    _, tiny = make_tokenizer_and_config(tmp)
    defaults = VisionConfig()
    vision = replace(tiny.vision, min_pixels=56 * 56, max_pixels=28 * 28 * 64,
                     edit_min_pixels=defaults.edit_min_pixels, edit_max_pixels=defaults.edit_max_pixels)
    # LlamaGen's GroupNorm always has 32 groups, so the tiny VQ keeps every width a multiple of 32.
    vq = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                  z_channels=32, norm_groups=32)
    cfg = WallarooConfig(name=f"wallaroo-{tiny.llm.hidden_size}", llm=tiny.llm, vision=vision, vq=vq, tokens=tokens,
                         has_edit=True, weights_dtype="float32")
    cfg.validate()
    return cfg


def official_state_dict(model: WallarooModel) -> OrderedDict[str, torch.Tensor]:
    """Our parameter names -> the official checkpoint's (VQ excluded; it ships separately)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, t in model.state_dict().items():
        if name.startswith("vq."):
            continue
        if name.startswith(("model.", "visual.", "lm_head.")):
            out["wallaroo." + name] = t.clone()
        else:
            out[name.replace("_input_adapter.", "_input_adpater.")] = t.clone()
    return out


def vq_state_dict(model: WallarooModel) -> OrderedDict[str, torch.Tensor]:
    """The LlamaGen VQ state dict as `vq_ds16_t2i.pt` holds it, training buffer included."""
    out = OrderedDict((k[len("vq."):], t.clone()) for k, t in model.state_dict().items() if k.startswith("vq."))
    out["quantize.codebook_used"] = torch.zeros(CODEBOOK_USED)
    return out


def qwen_config_json(cfg: WallarooConfig) -> dict:
    """A Qwen2.5-VL config.json in the old flat layout (as shipped with Qwen2.5-VL-7B-Instruct)."""
    llm, v, t = cfg.llm, cfg.vision, cfg.tokens
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": t["<|endoftext|>"], "eos_token_id": t["<|im_end|>"],
        "vision_start_token_id": t["<|vision_start|>"], "vision_end_token_id": t["<|vision_end|>"],
        "image_token_id": t["<|image_pad|>"], "video_token_id": t["<|video_pad|>"],
        "hidden_act": "silu", "hidden_size": llm.hidden_size, "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size, "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_hidden_layers": llm.num_layers, "num_key_value_heads": llm.num_kv_heads,
        "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta, "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
        "use_cache": True, "use_sliding_window": False,
        "vision_config": {
            "depth": v.depth, "hidden_act": "silu", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_chans": v.in_channels,
            "out_hidden_size": v.out_hidden_size, "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size, "spatial_patch_size": v.patch_size,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": 2, "temporal_patch_size": v.temporal_patch_size},
        "rope_scaling": {"type": "mrope", "mrope_section": list(llm.mrope_section)},
        "vocab_size": llm.vocab_size,
    }


def preprocessor_json(cfg: WallarooConfig) -> dict:
    """Qwen2.5-VL's preprocessor_config.json with the test's pixel budget."""
    v = cfg.vision
    return {"min_pixels": v.min_pixels, "max_pixels": v.max_pixels, "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
            "image_mean": list(v.image_mean), "image_std": list(v.image_std),
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def make_release(root: Path, seed: int = 3) -> Release:
    """Write checkpoint.ckpt, vq_ds16_t2i.pt and a Qwen folder for a random tiny Wallaroo."""
    root.mkdir(parents=True, exist_ok=True)
    qwen = root / "Qwen2.5-VL-7B-Instruct"
    qwen.mkdir(exist_ok=True)
    base = make_qwen_like_tokenizer(qwen / "tokenizer.json")
    tokenizer_json = root / "expected_tokenizer.json"
    tokens = add_wallaroo_tokens(base, tokenizer_json)
    (root / "tiny").mkdir(exist_ok=True)
    cfg = release_config(root / "tiny", tokens)
    model = randomize_(WallarooModel(cfg), seed=seed).eval().requires_grad_(False)
    (qwen / "config.json").write_text(json.dumps(qwen_config_json(cfg), indent=2))
    (qwen / "preprocessor_config.json").write_text(json.dumps(preprocessor_json(cfg), indent=2))
    checkpoint, vq = root / "checkpoint.ckpt", root / "vq_ds16_t2i.pt"
    torch.save({"epoch": 1, "global_step": 1000, "state_dict": official_state_dict(model)}, checkpoint)
    torch.save({"model": vq_state_dict(model)}, vq)
    return Release(root, checkpoint, vq, qwen, model, cfg, tokenizer_json)
