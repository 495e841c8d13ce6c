"""The native C decode step (`engine/native.py`, `engine/kernels/decode_step.c`) against the PyTorch step.

* One step, for 1-4 rows, one or two new positions and left padding: the same hidden state and KV cache as
  `step.forward_step` to fp32 rounding.
* Whole decodes through the public Pipeline on the bundled tiny model: the same codes, images and answers
  for the same seed with kernel="native" and kernel="torch".
* Choosing: "auto" falls back to PyTorch where the native step does not apply or does not build (a broken
  compiler, in a fresh cache), "native" then fails with an error that names the reason and the fix.

Skipped, with the reason, where the native step cannot run (not x86-64 with AVX2/FMA, or no C compiler).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import make_tokenizer_and_config, randomize_
from wallaroo_nodes.engine import native
from wallaroo_nodes.engine.decode import PreparedBatch, _NativeSteps, _new_cache, _prefill
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.pipeline import Pipeline
from wallaroo_nodes.engine.step import decode_weights, forward_step
from wallaroo_nodes.engine.text import TextTokenizer
from wallaroo_nodes.engine.weights import load_model
from wallaroo_nodes.engine.cache import bundled_models

try:
    native.library()
    WHY_NOT = None
except native.NativeKernelError as exc:
    WHY_NOT = str(exc)
needs_native = pytest.mark.skipif(WHY_NOT is not None, reason=f"native decode step unavailable: {WHY_NOT}")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    _, cfg = make_tokenizer_and_config(tmp_path_factory.mktemp("native"))
    return randomize_(WallarooModel(cfg), seed=5, scale=0.7).eval().requires_grad_(False)


needs_tiny = pytest.mark.skipif("tiny" not in bundled_models(), reason="bundled model wallaroo_nodes/models/tiny is absent")


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model(bundled_models()["tiny"], dtype="float32", device="cpu")
    return Pipeline(model, tok, kernel="native"), Pipeline(model, tok, kernel="torch")


@needs_native
@pytest.mark.parametrize("batch", [1, 2, 4])
@torch.inference_mode()
def test_step_equals_torch_step(random_model, batch):
    model = random_model
    w = decode_weights(model)
    assert native.applies(w, batch) is None
    g = torch.Generator().manual_seed(batch)
    prompt_len, dim = 9, model.cfg.llm.hidden_size
    valid = torch.ones(batch, prompt_len, dtype=torch.bool)
    valid[-1, :3] = False  # the last row is left-padded
    prep = PreparedBatch(torch.randn(batch, prompt_len, dim, generator=g),
                         torch.arange(prompt_len).expand(3, batch, prompt_len).clone(), valid)
    steps = _NativeSteps(model, w, batch, prompt_len + 8)
    caches = [_new_cache(model, batch, prompt_len + 8), steps.cache]
    _prefill(model, prep, caches[0])
    steps.prefill(model, prep)
    cos, sin = model.text_rope(torch.full((batch,), prompt_len), 8)
    t = 0
    for n in (1, 2, 1, 2, 1):
        x = torch.randn(batch, n, dim, generator=g)
        caches[0].reserve(n)
        ref = forward_step(w, x, cos.narrow(1, t, n), sin.narrow(1, t, n), caches[0].mask(n), caches[0])
        got = steps.step(x, cos.narrow(1, t, n), sin.narrow(1, t, n))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        t += n
    assert caches[0].length == caches[1].length == prompt_len + t
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_native
@needs_tiny
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_tiny_model_generates_the_same_images(tiny, size):
    fast, plain = tiny
    for seed in range(3):
        a = fast.generate("a red circle on the left, blue background", size=size, seed=seed, n=2)
        b = plain.generate("a red circle on the left, blue background", size=size, seed=seed, n=2)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@needs_native
@needs_tiny
def test_tiny_model_edits_and_answers_the_same(tiny):
    fast, plain = tiny
    source = plain.generate("一个黄色的正方形在中间", seed=1)[0]
    for seed in range(2):
        a, b = fast.edit(source, "make the square red", seed=seed)[0], plain.edit(source, "make the square red", seed=seed)[0]
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for question in ("What colour is the object?", "Describe the image.", "图中有几个物体？"):
        answer = fast.understand(source, question)
        assert answer and answer == plain.understand(source, question)


def test_kernel_choice_is_checked(random_model, tmp_path, monkeypatch):
    tok_path, cfg = make_tokenizer_and_config(tmp_path)
    tok = TextTokenizer(tok_path, cfg.tokens)
    with pytest.raises(ValueError, match="kernel must be one of auto, native, torch"):
        Pipeline(random_model, tok, kernel="fast")
    monkeypatch.delenv(native.KERNEL_ENV, raising=False)
    assert Pipeline(random_model, tok).kernel == "auto"
    monkeypatch.setenv(native.KERNEL_ENV, "torch")  # the front doors' default, e.g. to rule the native step out
    assert Pipeline(random_model, tok).kernel == "torch"
    assert Pipeline(random_model, tok, kernel="auto").kernel == "auto"  # an explicit choice wins
    monkeypatch.setenv(native.KERNEL_ENV, "gpu")
    with pytest.raises(ValueError, match="WALLAROO_DECODE_KERNEL must be one of auto, native, torch; got 'gpu'"):
        Pipeline(random_model, tok)


@needs_native
@needs_tiny
def test_native_refuses_what_it_cannot_decode(tiny):
    fast, plain = tiny
    # 8 images with guidance: 16 rows of 2 positions, beyond the native step's tiles; auto falls back.
    with pytest.raises(native.NativeKernelError, match="exceeds the native step's 8 rows"):
        fast.generate("a red circle", seed=0, n=8)
    auto = Pipeline(plain.model, plain.tokenizer)
    assert len(auto.generate("a red circle", seed=0, n=8)) == 8


@needs_tiny
def test_broken_compiler_falls_back_or_fails_clearly(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from wallaroo_nodes.engine import native
        from wallaroo_nodes.engine.pipeline import Pipeline
        from wallaroo_nodes.engine.weights import load_model
        from wallaroo_nodes.engine.cache import bundled_models
        model, tok = load_model(bundled_models()["tiny"], dtype="float32", device="cpu")
        assert not native.available()
        image = Pipeline(model, tok).generate("a red circle", seed=0)[0]  # auto: PyTorch
        print("auto ok", image.size)
        try:
            Pipeline(model, tok, kernel="native")
        except native.NativeKernelError as exc:
            print("native error:", exc)
    """)
    env = dict(os.environ, CC="/bin/false", WALLAROO_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "auto ok (64, 64)" in done.stdout
    if WHY_NOT is None:  # where the library can be built at all, the failure is the compiler's
        assert "native error: building the native decode step with /bin/false failed" in done.stdout
        assert "use kernel='torch'" in done.stdout
    assert "Traceback" not in done.stdout
