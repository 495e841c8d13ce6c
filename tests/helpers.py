"""Shared test fixtures: a small Qwen-like tokenizer and tiny model configs built from scratch."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from wallaroo_nodes.engine.config import LLMConfig, ProtocolConfig, SamplingDefaults, VisionConfig, VQConfig, WallarooConfig
from wallaroo_nodes.engine.weights import add_wallaroo_tokens
from wallaroo_nodes.train.tokenizer import train_byte_level_bpe

CORPUS = [
    "You are a helpful assistant.",
    'Generate an image with resolution 512x512 based on the prompt: "a red circle on the left"',
    'Edit the input image based on the text prompt: "make it blue", and generate a new image with a resolution of 32x48.',
    "What shape is in the picture? A small green triangle in the centre, on a white background.",
    "生成一幅图像，分辨率为512x512，基于文本提示：“左边有一个红色的圆形”",
    "根据输入图片，并结合文本提示：“把它变成蓝色”，对图片进行编辑，生成一幅48x32的图像",
    "图片里是什么形状？白色背景上中间有一个绿色的小三角形。",
]
TEST_SIZES = [(32, 32), (32, 48), (48, 32)]


def make_qwen_like_tokenizer(path: Path) -> Path:
    """A byte-level BPE trained on a small bilingual corpus, with Qwen2.5-VL's special tokens appended
    after the learned vocabulary (as in the real tokenizer). Deterministic."""
    return train_byte_level_bpe(CORPUS * 4, 400, path)


def tiny_config(tokens: dict[str, int], vocab_size: int = 512, has_edit: bool = True) -> WallarooConfig:
    """A few-layer Wallaroo whose every part is exercised (GQA, M-RoPE sections, windows, full-attention block)."""
    cfg = WallarooConfig(
        name="test-tiny",
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, mrope_section=(2, 3, 3), rope_theta=10000.0),
        vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                            fullatt_block_indexes=(1,), min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64,
                            edit_min_pixels=28 * 28 * 4, edit_max_pixels=28 * 28 * 16),
        vq=VQConfig(codebook_size=64, codebook_embed_dim=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                    z_channels=32, norm_groups=8),
        protocol=ProtocolConfig(sizes=list(TEST_SIZES), default_size=(32, 32)),
        sampling=SamplingDefaults(generate_cfg=2.0, generate_top_k=0, edit_cfg=2.0, edit_top_k=0),
        tokens=tokens, has_edit=has_edit, weights_dtype="float32")
    cfg.validate()
    return cfg


def make_tokenizer_and_config(tmp: Path, sides=(32, 48), has_edit: bool = True) -> tuple[Path, WallarooConfig]:
    """tokenizer.json with Wallaroo tokens added the way `wallaroo convert` adds them, and a tiny config."""
    base = make_qwen_like_tokenizer(tmp / "qwen_tokenizer.json")
    table = add_wallaroo_tokens(base, tmp / "tokenizer.json", indicator_sides=sides)
    return tmp / "tokenizer.json", tiny_config(table, has_edit=has_edit)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Deterministic random weights with non-trivial norms and biases (so every parameter matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5 * 3)
    return model


def make_model_folder(tmp: Path, seed: int = 0) -> Path:
    """A complete model folder (config, safetensors, tokenizer) of a random-weights tiny model.

    Stands in for the bundled trained model where a test needs any working folder; such tests assert
    types, shapes and ranges, not content.
    """
    from wallaroo_nodes.engine.model import WallarooModel
    from wallaroo_nodes.engine.weights import save_model

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    tok_path, cfg = make_tokenizer_and_config(tmp)
    torch.manual_seed(seed)
    model = randomize_(WallarooModel(cfg), seed=seed, scale=0.7).eval()
    return save_model(model, tmp / "model", tok_path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the `wallaroo` CLI in-process; returns (exit code, stdout, stderr)."""
    from wallaroo_sdk.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> str:
    """Assert stderr is one `wallaroo: error:` line (no traceback) naming every needle; return it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wallaroo: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
