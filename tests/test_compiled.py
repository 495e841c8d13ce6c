"""The opt-in compiled decode path (`Pipeline(..., compile=True)`) gives the plain path's tokens for a seed.

Runs the tiny test model on the CPU through torch.compile (inductor's C++ backend): generation and editing
with CFG (one compiled graph for a single fed position and one for a row's last code plus its end-of-line
token, at batch 2), understanding (batch 1), and the unpacked-weights graph that GPUs use. CUDA graphs are
not exercised here (no GPU in CI): bench/gpu_check.sh compares compiled and plain codes on a GPU.
Skipped, with the reason, where torch.compile cannot work.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_tokenizer_and_config, randomize_
from wallaroo_nodes.engine import pipeline as pipeline_module
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.pipeline import Pipeline
from wallaroo_nodes.engine.text import TextTokenizer

PROMPT = "a red circle on the left"


def _why_not_compile() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile needs torch >= 2.0"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++/clang++), none is on PATH"
    return None


pytestmark = pytest.mark.skipif(_why_not_compile() is not None, reason=str(_why_not_compile()))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    import torch._inductor.config as inductor_config

    old_threads, old_torch_threads = inductor_config.compile_threads, torch.get_num_threads()
    inductor_config.compile_threads = 1  # the CPU is shared; one compile worker
    torch.set_num_threads(1)
    tok_path, cfg = make_tokenizer_and_config(tmp_path_factory.mktemp("compiled"))
    tok = TextTokenizer(tok_path, cfg.tokens)
    model = randomize_(WallarooModel(cfg), seed=3, scale=0.7).eval().requires_grad_(False)
    try:
        compiled = Pipeline(model, tok, compile=True)
    except Exception as exc:  # an unusable torch.compile is a skip, not a failure of this project
        pytest.skip(f"torch.compile is unusable here: {exc}")
    yield Pipeline(model, tok), compiled
    inductor_config.compile_threads = old_threads
    torch.set_num_threads(old_torch_threads)


@pytest.fixture
def recorded(monkeypatch):
    runs = []
    real = pipeline_module.decode_image_codes

    def wrapper(*args, **kwargs):
        runs.append((kwargs.get("compiled") is not None, real(*args, **kwargs).clone()))
        return runs[-1][1]

    monkeypatch.setattr(pipeline_module, "decode_image_codes", wrapper)
    return runs


def _source() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8))


def test_options():
    model = WallarooModel.__new__(WallarooModel)  # never used: the options are checked first
    with pytest.raises(ValueError, match="compile must be"):
        Pipeline(model, None, compile="yes")


def test_auto_is_plain_on_cpu(pipes):
    plain, _ = pipes
    assert not plain.compiled
    assert not Pipeline(plain.model, plain.tokenizer, compile="auto").compiled


def test_generate_and_edit_same_codes(pipes, recorded):
    plain, compiled = pipes
    assert compiled.compiled
    for pipe in (plain, compiled):
        pipe.generate(PROMPT, size=(48, 32), cfg=2.0, temperature=1.0, seed=5, n=2)
        pipe.generate(PROMPT, size=(48, 32), cfg=2.0, temperature=0, seed=0)
        pipe.edit(_source(), "make it blue", cfg=2.0, temperature=1.0, seed=9)
    assert [flag for flag, _ in recorded] == [False] * 3 + [True] * 3
    for (_, a), (_, b) in zip(recorded[:3], recorded[3:]):
        assert torch.equal(a, b)
    assert len(set(recorded[0][1].flatten().tolist())) > 2  # sampled codes are not all one value
    # A second compiled run (another size, same buffer bucket) reuses what was compiled and still agrees.
    plain_img = plain.generate(PROMPT, size=(32, 48), cfg=2.0, seed=1)
    compiled_img = compiled.generate(PROMPT, size=(32, 48), cfg=2.0, seed=1)
    assert torch.equal(recorded[-2][1], recorded[-1][1])
    assert np.array_equal(np.asarray(plain_img[0]), np.asarray(compiled_img[0]))


def test_understand_same_tokens(pipes):
    plain, compiled = pipes
    image = _source()
    for temperature in (0, 1.0):
        a = plain.understand(image, "What shape is in the picture?", max_new_tokens=12, temperature=temperature,
                             seed=4)
        b = compiled.understand(image, "What shape is in the picture?", max_new_tokens=12, temperature=temperature,
                                seed=4)
        assert a == b


def test_unpacked_weights_compile_too(pipes, recorded):
    """On GPUs the compiled step reads the model's own (unpacked) parameters: that graph agrees as well."""
    from wallaroo_nodes.engine.step import decode_weights

    plain, compiled = pipes
    decode_weights(plain.model, pack=False)
    try:
        for pipe in (plain, compiled):
            pipe.generate(PROMPT, size=(48, 32), cfg=2.0, temperature=1.0, seed=6)
        assert not decode_weights(plain.model).packed
        assert torch.equal(recorded[0][1], recorded[1][1])
    finally:
        decode_weights(plain.model, pack=True)
