"""Model folders and conversion from the official release: exact round trips, shards, dtypes, and clear errors."""
from __future__ import annotations

import json
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer

from official_release import Release, make_release, official_state_dict, vq_state_dict
from wallaroo_nodes.engine import pipeline as pipeline_module
from wallaroo_nodes.engine.attention import AttentionBackendError
from wallaroo_nodes.engine.config import ConfigError
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.pipeline import Pipeline
from wallaroo_nodes.engine.protocol import build_understand
from wallaroo_nodes.engine.text import TextTokenizer, TokenizerError
from wallaroo_nodes.engine.weights import (INDEX_FILE, WeightsError, _official_name, add_wallaroo_tokens,
                                           convert_official, load_model, save_model)

TOLERANCE = 1e-5
ROWS = 2  # image runs decode only the first rows: enough to compare codes, cheap on two shared cores


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    return make_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "wallaroo"
    lines: list[str] = []
    convert_official(release.checkpoint, release.vq, release.qwen_dir, out, dtype="fp32", progress=lines.append)
    assert any(str(release.checkpoint) in line for line in lines), lines
    return out


@pytest.fixture(scope="module")
def folder(release, tmp_path_factory) -> Path:
    """A pristine model folder in two or more shards; tests corrupt copies of it."""
    out = tmp_path_factory.mktemp("saved") / "model"
    save_model(release.model, out, release.tokenizer_json, shard_bytes=4 << 20)
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _rewrite_shard(folder: Path, holding: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite the shard that holds tensor `holding` through `edit`, keeping the index in step."""
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"][holding]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    kept = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"] = {**kept, **{k: shard.name for k in tensors}}
    index_path.write_text(json.dumps(index))
    return shard


def _assert_same_weights(model: WallarooModel, source: WallarooModel) -> None:
    ours, theirs = model.state_dict(), source.state_dict()
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"tensors differ after the round trip: {different[:5]}"


# --- names -----------------------------------------------------------------------------------------

def test_official_names_follow_the_reference_layout(release):
    # Backbone under `wallaroo.` (old and new transformers layouts), heads at top level with "adpater".
    assert _official_name("wallaroo.model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert _official_name("wallaroo.model.language_model.norm.weight") == "model.norm.weight"
    assert _official_name("wallaroo.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert _official_name("wallaroo.model.visual.merger.ln_q.weight") == "visual.merger.ln_q.weight"
    assert _official_name("wallaroo.lm_head.weight") == "lm_head.weight"
    assert _official_name("gen_input_adpater.0.weight") == "gen_input_adapter.0.weight"
    assert _official_name("edit_input_adpater.2.bias") == "edit_input_adapter.2.bias"
    assert _official_name("gen_image_head.2.weight") == "gen_image_head.2.weight"
    assert _official_name("pixel_adapter.0.weight") == "pixel_adapter.0.weight"
    assert _official_name("module.edit_image_head.0.bias") == "edit_image_head.0.bias"
    # Unprefixed backbone names are not the official layout.
    assert _official_name("model.norm.weight") is None
    assert _official_name("lm_head.weight") is None
    mapped = {_official_name(k) for k in official_state_dict(release.model)}
    assert mapped == {k for k in release.model.state_dict() if not k.startswith("vq.")}


# --- conversion: exact round trip -------------------------------------------------------------------

def _short_image_runs(monkeypatch) -> list[torch.Tensor]:
    """Make the pipeline decode only the first ROWS rows of each image and record the codes."""
    real = pipeline_module.decode_image_codes
    codes: list[torch.Tensor] = []

    def short(model, prep, *, rows, **kwargs):
        out = real(model, prep, rows=min(rows, ROWS), **kwargs)
        codes.append(out)
        return out

    monkeypatch.setattr(pipeline_module, "decode_image_codes", short)
    return codes


def _picture(h: int, w: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def test_conversion_reproduces_the_source_model(release, converted, monkeypatch):
    model, tok = load_model(converted, dtype="fp32", device="cpu")
    cfg = model.cfg
    for part in ("llm", "vision", "vq", "protocol", "sampling", "tokens", "has_edit"):
        assert getattr(cfg, part) == getattr(release.config, part), part
    assert cfg.name == release.config.name and cfg.weights_dtype == "float32"
    assert (converted / "tokenizer.json").read_text() == release.tokenizer_json.read_text()
    assert model.dtype == torch.float32 and not model.training
    _assert_same_weights(model, release.model)

    source = Pipeline(release.model, TextTokenizer(release.tokenizer_json, release.config.tokens))
    loaded = Pipeline(model, tok)

    # Understanding: logits over an image + question prompt, then a greedy answer.
    picture = _picture(60, 90, seed=1)
    logits = []
    for pipe in (source, loaded):
        feats, grid = pipe._vision(picture)
        prompt = build_understand(pipe.tokenizer, pipe.config, "What is in the picture?", grid)
        with torch.no_grad():
            prep = pipe._prepare([prompt], [feats], [None])
            logits.append(pipe.model.lm_head(pipe.model(prep.embeds, prep.position_ids, prep.valid)))
    assert (logits[0] - logits[1]).abs().max().item() <= TOLERANCE
    answers = [p.understand(picture, "What is in the picture?", max_new_tokens=6, temperature=0) for p in (source, loaded)]
    assert answers[0] == answers[1]

    # Generation and editing: greedy codes and their decoded pixels. Generation is guided as by default; the
    # edit runs unguided because the VQ encoder at full size is the slowest step here on CPU.
    codes = _short_image_runs(monkeypatch)
    generated = [p.generate("a red circle on the left", size=(352, 704), temperature=0) for p in (source, loaded)]
    edited = [p.edit(_picture(70, 140, seed=2), "make it blue", cfg=1.0, temperature=0) for p in (source, loaded)]
    assert len(codes) == 4 and all(c.shape == (1, ROWS, 704 // 16) for c in codes)
    assert torch.equal(codes[0], codes[1]), "generated codes differ"
    assert torch.equal(codes[2], codes[3]), "edited codes differ"
    assert generated[0][0].tobytes() == generated[1][0].tobytes()
    assert edited[0][0].tobytes() == edited[1][0].tobytes()


def test_bf16_conversion_and_load_dtypes(release, tmp_path):
    out = convert_official(release.checkpoint, release.vq, release.qwen_dir, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["weights_dtype"] == "bfloat16"
    index = json.loads((out / INDEX_FILE).read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    source = release.model.state_dict()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model, _ = load_model(out, dtype=name, device="cpu")
        assert {p.dtype for p in model.state_dict().values()} == {dtype}, name
        if dtype == torch.float32:
            # bf16 -> fp32 is exact, so the loaded weights are the source rounded once to bf16.
            got = model.state_dict()
            assert all(torch.equal(got[k], source[k].to(torch.bfloat16).float()) for k in source)


def test_vq_training_args_and_legacy_format_are_accepted(release, tmp_path):
    # LlamaGen's training scripts also store their argparse.Namespace under "args"; old torch.save files
    # are not zip archives (and cannot be memory-mapped).
    import argparse

    vq = tmp_path / "vq_with_args.pt"
    torch.save({"model": vq_state_dict(release.model), "steps": 100,
                "args": argparse.Namespace(image_size=256, vq_model="VQ-16")}, vq,
               _use_new_zipfile_serialization=False)
    out = convert_official(release.checkpoint, vq, release.qwen_dir, tmp_path / "out", dtype="fp32")
    model, _ = load_model(out, dtype="fp32", device="cpu")
    _assert_same_weights(model, release.model)


# --- shards ------------------------------------------------------------------------------------------

def test_small_shards_round_trip(release, tmp_path):
    out = save_model(release.model, tmp_path / "sharded", release.tokenizer_json, shard_bytes=1 << 20)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert sorted(set(index["weight_map"].values())) == shards
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert set(index["weight_map"]) == set(release.model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in release.model.state_dict().values())
    model, _ = load_model(out, dtype="fp32", device="cpu")
    _assert_same_weights(model, release.model)


# --- bad model folders ---------------------------------------------------------------------------------

def test_missing_config(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    (bad / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: no such config file"):
        load_model(bad, device="cpu")


def test_missing_shard(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError) as err:
        load_model(bad, device="cpu")
    assert shard.name in str(err.value) and "missing" in str(err.value)


def test_truncated_shard(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightsError) as err:
        load_model(bad, device="cpu")
    assert shard.name in str(err.value) and "truncated" in str(err.value)


def test_wrong_shape(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    name = "gen_image_head.2.weight"
    shape = list(load_file(bad / json.loads((bad / INDEX_FILE).read_text())["weight_map"][name])[name].shape)
    shard = _rewrite_shard(bad, name, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(WeightsError) as err:
        load_model(bad, device="cpu")
    msg = str(err.value)
    assert shard.name in msg and repr(name) in msg
    assert str([shape[0] - 1, shape[1]]) in msg and str(shape) in msg


def test_missing_tensor(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    name = "model.norm.weight"
    _rewrite_shard(bad, name, lambda t: t.pop(name))
    with pytest.raises(WeightsError) as err:
        load_model(bad, device="cpu")
    assert str(bad) in str(err.value) and repr(name) in str(err.value) and "missing" in str(err.value)


def test_unexpected_tensor(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    shard = _rewrite_shard(bad, "lm_head.weight", lambda t: t.update({"extra_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(WeightsError) as err:
        load_model(bad, device="cpu")
    assert shard.name in str(err.value) and "'extra_head.weight'" in str(err.value)


def test_tokenizer_disagreeing_with_config(folder, release, tmp_path):
    bad = _copy(folder, tmp_path)
    # A tokenizer with one more token before Wallaroo's: every added id shifts by one.
    tok = Tokenizer.from_file(str(release.qwen_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken("<|something_else|>", normalized=False)])
    tok.save(str(tmp_path / "other.json"))
    add_wallaroo_tokens(tmp_path / "other.json", bad / "tokenizer.json")
    with pytest.raises(TokenizerError) as err:
        load_model(bad, device="cpu")
    msg = str(err.value)
    assert "tokenizer.json" in msg and "'<|generate_start|>'" in msg and "config.json" in msg


def test_attention_dtype_and_device_errors(folder):
    with pytest.raises(AttentionBackendError, match=r"attention='sdpa'"):
        load_model(folder, device="cpu", attention="xformers")
    with pytest.raises(AttentionBackendError, match=r"unknown attention backend 'flash'"):
        load_model(folder, device="cpu", attention="flash")
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; choose auto, fp32, bf16 or fp16"):
        load_model(folder, dtype="int8", device="cpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'"):
        load_model(folder, device="gpu0")
    with pytest.raises(WeightsError, match="model folder not found"):
        load_model(folder.parent / "nowhere", device="cpu")


# --- bad conversion inputs -------------------------------------------------------------------------------

class _WritesMarker:
    """Unpickling this would create a file; a weights-only load must refuse before that happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_text_file_is_not_a_checkpoint(release, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    with pytest.raises(WeightsError) as err:
        convert_official(text, release.vq, release.qwen_dir, tmp_path / "out")
    assert str(text) in str(err.value) and "not a PyTorch checkpoint" in str(err.value)
    assert "check the path" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_unsafe_pickle_is_refused_not_run(release, tmp_path, writer):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "checkpoint.ckpt"
    payload = {"state_dict": OrderedDict(x=_WritesMarker(marker))}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(WeightsError) as err:
        convert_official(evil, release.vq, release.qwen_dir, tmp_path / "out")
    assert not marker.exists(), "the pickle was executed"
    msg = str(err.value)
    assert str(evil) in msg and "refused" in msg and "\n" not in msg


def _checkpoint_with(release: Release, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    state = official_state_dict(release.model)
    edit(state)
    path = tmp_path / "checkpoint.ckpt"
    torch.save({"state_dict": state}, path)
    return path


def test_checkpoint_missing_a_head_tensor(release, tmp_path):
    path = _checkpoint_with(release, tmp_path, lambda s: s.pop("edit_input_adpater.2.bias"))
    with pytest.raises(WeightsError, match=r"checkpoint\.ckpt: tensor 'edit_input_adapter\.2\.bias' missing"):
        convert_official(path, release.vq, release.qwen_dir, tmp_path / "out")


def test_checkpoint_with_unknown_entries(release, tmp_path):
    path = _checkpoint_with(release, tmp_path, lambda s: s.update({"wallaroo.extra.weight": torch.zeros(1)}))
    with pytest.raises(WeightsError, match=r"checkpoint\.ckpt: unexpected tensor 'extra\.weight'"):
        convert_official(path, release.vq, release.qwen_dir, tmp_path / "out")
    path = _checkpoint_with(release, tmp_path, lambda s: s.update({"model.norm.weight": torch.zeros(1)}))
    with pytest.raises(WeightsError, match=r"checkpoint\.ckpt: unexpected entry 'model\.norm\.weight'"):
        convert_official(path, release.vq, release.qwen_dir, tmp_path / "out")


def test_checkpoint_shape_disagreeing_with_qwen_config(release, tmp_path):
    name = "wallaroo.model.layers.0.mlp.up_proj.weight"
    path = _checkpoint_with(release, tmp_path, lambda s: s.update({name: s[name][:-2].clone()}))
    shape = list(release.model.state_dict()["model.layers.0.mlp.up_proj.weight"].shape)
    with pytest.raises(WeightsError) as err:
        convert_official(path, release.vq, release.qwen_dir, tmp_path / "out")
    msg = str(err.value)
    assert str(path) in msg and "'model.layers.0.mlp.up_proj.weight'" in msg
    assert str([shape[0] - 2, shape[1]]) in msg and str(shape) in msg and "config.json" in msg


def test_qwen_folder_problems(release, tmp_path):
    qwen = Path(shutil.copytree(release.qwen_dir, tmp_path / "qwen"))
    (qwen / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match=r"tokenizer\.json: missing; pass the Qwen2\.5-VL-7B-Instruct folder"):
        convert_official(release.checkpoint, release.vq, qwen, tmp_path / "out")
    shutil.copy(release.qwen_dir / "tokenizer.json", qwen / "tokenizer.json")
    (qwen / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        convert_official(release.checkpoint, release.vq, qwen, tmp_path / "out")
    (qwen / "config.json").write_text(json.dumps({"vision_config": {}}))
    with pytest.raises(ConfigError, match=r"config\.json: Qwen2\.5-VL config\.json lacks 'vocab_size'"):
        convert_official(release.checkpoint, release.vq, qwen, tmp_path / "out")


def test_vq_checkpoint_problems(release, tmp_path):
    vq = tmp_path / "vq.pt"
    state = vq_state_dict(release.model)
    state.pop("quantize.embedding.weight")
    torch.save({"model": state}, vq)
    with pytest.raises(WeightsError, match=r"vq\.pt: no tensor 'quantize\.embedding\.weight'; not a LlamaGen VQ"):
        convert_official(release.checkpoint, vq, release.qwen_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown dtype 'int4'"):
        convert_official(release.checkpoint, release.vq, release.qwen_dir, tmp_path / "out", dtype="int4")
