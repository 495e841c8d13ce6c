"""The `wallaroo` command line: info (text, JSON, subprocess), convert, and one-line errors with exit code 2."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tokenizer_and_config, one_line_error, randomize_, run_cli
from official_release import make_release
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.weights import load_model, save_model
from wallaroo_sdk import __version__
from wallaroo_sdk.cli import part_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model folder saved from the tiny test model, in several shards, and the model itself."""
    tmp = tmp_path_factory.mktemp("cli")
    tok, cfg = make_tokenizer_and_config(tmp)
    model = randomize_(WallarooModel(cfg), seed=5)
    folder = save_model(model, tmp / "model", tok, shard_bytes=1 << 20)
    return folder, model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("release"))


def _expected_parameters(model: WallarooModel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, t in model.state_dict().items():
        counts[part_of(name)] = counts.get(part_of(name), 0) + t.numel()
    return counts


def test_info_json(tiny, capsys):
    folder, model = tiny
    code, out, err = run_cli(capsys, "info", "--model", folder, "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    cfg = model.cfg
    assert info["name"] == "test-tiny" and info["path"] == str(folder.resolve())
    params = info.pop("parameters")
    total = params.pop("total")
    assert {k: v for k, v in params.items() if v} == _expected_parameters(model)
    assert set(params) == {"llm", "vision", "vq", "generate_heads", "edit_heads"}
    assert total == sum(t.numel() for t in model.state_dict().values())
    assert info["llm"]["num_layers"] == cfg.llm.num_layers and info["vision"]["depth"] == cfg.vision.depth
    assert info["vq"]["codebook_size"] == cfg.vq.codebook_size and info["vq"]["downsample"] == 16
    assert info["weights"]["dtype"] == "float32" and info["weights"]["file_dtypes"] == ["float32"]
    assert info["weights"]["files"] == len(list(folder.glob("model-*.safetensors"))) >= 2
    assert info["sizes"] == ["32x32", "32x48", "48x32"] and info["default_size"] == "32x32"
    assert info["tokens"] == cfg.tokens
    assert info["sampling"] == dataclasses.asdict(cfg.sampling)
    assert info["has_edit"] is True


def test_info_text(tiny, capsys):
    folder, model = tiny
    code, out, _ = run_cli(capsys, "info", "--model", folder)
    assert code == 0
    assert out.startswith("model       test-tiny")
    assert "sizes (HxW) 32x32 32x48 48x32  (default 32x32)" in out
    total = sum(t.numel() for t in model.state_dict().values())
    assert f"total {total:,}" in out
    assert f"<|generate_start|>{' ' * 7}{model.cfg.tokens['<|generate_start|>']}" in out
    assert "generate_cfg" in out and "float32" in out


def test_info_uses_the_environment_variable(tiny, capsys, monkeypatch):
    monkeypatch.setenv("WALLAROO_MODEL", str(tiny[0]))
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0 and json.loads(out)["name"] == "test-tiny"


def test_info_without_a_model(tmp_path, capsys, monkeypatch):
    from wallaroo_nodes.engine import cache

    monkeypatch.delenv("WALLAROO_MODEL", raising=False)
    monkeypatch.setattr(cache, "BUNDLED_MODELS", tmp_path / "no-bundled-models")
    code, out, err = run_cli(capsys, "info")
    assert code == 2 and out == ""
    one_line_error(err, "'tiny' not found", "model folder path")


def test_info_as_a_real_subprocess(tiny, tmp_path):
    folder, _ = tiny
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk")])}
    proc = subprocess.run([sys.executable, "-m", "wallaroo_sdk.cli", "info", "--model", str(folder), "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "test-tiny"
    # `info` reads headers only: it must not even import torch.
    probe = ("import sys; from wallaroo_sdk.cli import main; main(['info', '--model', sys.argv[1]]); "
             "assert 'torch' not in sys.modules, 'info imported torch'")
    proc = subprocess.run([sys.executable, "-c", probe, str(folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"wallaroo {__version__}"
    code, out, _ = run_cli(capsys, "info", "--help")
    assert code == 0 and "--model PATH" in out and "--json" in out


def test_convert(release, tmp_path, capsys):
    out_dir = tmp_path / "converted"
    code, out, err = run_cli(capsys, "convert", "--checkpoint", release.checkpoint, "--vq", release.vq,
                             "--qwen", release.qwen_dir, "--out", out_dir, "--dtype", "fp32")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1] == str(out_dir.resolve())
    assert any(str(release.checkpoint) in line for line in lines[:-1])
    assert any(str(release.vq) in line for line in lines[:-1])
    model, _ = load_model(out_dir, dtype="fp32", device="cpu")
    ours, theirs = model.state_dict(), release.model.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The default dtype is the release's bf16.
    code, _, err = run_cli(capsys, "convert", "--checkpoint", release.checkpoint, "--vq", release.vq,
                           "--qwen", release.qwen_dir, "--out", tmp_path / "bf16")
    assert code == 0, err
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["weights_dtype"] == "bfloat16"


def test_errors_are_one_line_with_exit_code_2(tiny, tmp_path, capsys):
    folder, _ = tiny
    missing = tmp_path / "nowhere"
    code, out, err = run_cli(capsys, "info", "--model", missing)
    assert code == 2 and out == ""
    one_line_error(err, str(missing), "not found")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "info", "--model", empty)
    assert code == 2
    one_line_error(err, str(empty / "config.json"))

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    code, _, err = run_cli(capsys, "info", "--model", broken)
    assert code == 2
    one_line_error(err, str(shard), "truncated")

    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint\n")
    code, _, err = run_cli(capsys, "convert", "--checkpoint", text, "--vq", text, "--qwen", tmp_path, "--out",
                           tmp_path / "out")
    assert code == 2
    one_line_error(err, str(tmp_path / "config.json"), "missing")


def test_convert_errors(release, tmp_path, capsys):
    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint\n")
    code, _, err = run_cli(capsys, "convert", "--checkpoint", text, "--vq", release.vq, "--qwen", release.qwen_dir,
                           "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(text), "not a PyTorch checkpoint")

    code, _, err = run_cli(capsys, "convert", "--checkpoint", tmp_path / "absent.ckpt", "--vq", release.vq,
                           "--qwen", release.qwen_dir, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(tmp_path / "absent.ckpt"), "not found")

    # Usage errors come from argparse: exit 2 with its usage message, no traceback.
    code, _, err = run_cli(capsys, "convert", "--checkpoint", release.checkpoint, "--vq", release.vq,
                           "--qwen", release.qwen_dir, "--out", tmp_path / "out", "--dtype", "int8")
    assert code == 2 and "invalid choice: 'int8'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "convert", "--vq", release.vq)
    assert code == 2 and "the following arguments are required: --checkpoint" in err
