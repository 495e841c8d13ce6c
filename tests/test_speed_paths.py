"""The pieces of the fast decode path, each against its plain counterpart, and the speed benchmark's plumbing.

* `sample` draws exactly what `torch.multinomial` draws for the same generator (without its host sync).
* Grouped-query folding in `attention` equals repeating the KV heads; a single query's cache mask is a view.
* Training on a CPU takes the explicit attention path, with SDPA's values and gradients.
* `decode_weights` packs on the CPU, is cached, and is rebuilt when a weight changes in place; packed and
  unpacked steps decode the same codes.
* `python -m bench` runs both engines on the tiny test config, finds the transformers baseline decoding the
  same codes as ours, ends with the speedup line, and says clearly when transformers is missing.
"""
from __future__ import annotations

import copy
import gc
import re
import weakref

import pytest
import torch
import torch.nn.functional as F

from helpers import make_tokenizer_and_config, randomize_
from wallaroo_nodes.engine import pipeline as pipeline_module
from wallaroo_nodes.engine.attention import attention
from wallaroo_nodes.engine.kv_cache import KVCache
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.pipeline import Pipeline
from wallaroo_nodes.engine.sampling import SamplingParams, filter_logits, sample
from wallaroo_nodes.engine.step import decode_weights
from wallaroo_nodes.engine.text import TextTokenizer


@pytest.mark.parametrize("params", [SamplingParams(1.0, 0, 1.0), SamplingParams(0.7, 20, 1.0),
                                    SamplingParams(1.3, 0, 0.8), SamplingParams(1.0, 5, 0.9)])
def test_sample_draws_what_multinomial_draws(params):
    for seed in range(20):
        logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(seed)) * 3
        g_ours, g_torch = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(4):
            ours = sample(logits, params, g_ours)
            scaled = logits / params.temperature if params.temperature != 1.0 else logits
            probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
            assert torch.equal(ours, torch.multinomial(probs, 1, generator=g_torch).squeeze(-1))


@pytest.mark.parametrize("lq", [1, 2, 3])
@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_grouped_query_fold_equals_repeated_heads(lq, kind):
    g = torch.Generator().manual_seed(lq)
    q, k, v = (torch.randn(2, 8, lq, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g),
               torch.randn(2, 2, 20, 16, generator=g))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :3] = False
    mask = torch.ones(lq, 20, dtype=torch.bool).tril(20 - lq)[None, None] & valid[:, None, None]
    if kind == "none":
        mask = None
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask)
    if kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert torch.allclose(attention(q, k, v, mask), ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_training_attention_equals_sdpa_with_gradients(kind, monkeypatch):
    # With gradients wanted on a CPU, `attention` takes the explicit matmul-softmax path (faster than SDPA's math
    # kernel under bf16 autocast); values and gradients must be SDPA's.
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 8, 20, 16, generator=g).requires_grad_(), torch.randn(2, 2, 20, 16, generator=g)
               .requires_grad_(), torch.randn(2, 2, 20, 16, generator=g).requires_grad_())
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, -4:] = False  # right padding, as training batches have
    causal = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]
    mask = (causal & valid[:, None, None]) | torch.eye(20, dtype=torch.bool)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                         attn_mask=None if kind == "none" else mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    if kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    import wallaroo_nodes.engine.attention as attention_module

    def no_sdpa(*args, **kwargs):
        raise AssertionError("training attention on a CPU should not call SDPA")
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", no_sdpa)
    out = attention(q, k, v, None if kind == "none" else mask)
    monkeypatch.undo()
    assert torch.allclose(out, ref, atol=1e-6)
    for ours, theirs in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), ref_grads):
        assert torch.allclose(ours, theirs, atol=1e-4)


def test_training_attention_keeps_a_fully_masked_row_finite():
    # A query that may see no key (not made by the training mask, which lets each position see itself) must not
    # turn NaN: its keys feed every later layer.
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[0, 0, 0] = False
    out = attention(q, k, v, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def test_single_query_mask_is_a_view():
    cache = KVCache(1, 2, 2, 10, 4, torch.float32, "cpu")
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    cache.reserve(4, valid)
    cache.advance(4)
    cache.reserve(1)
    m = cache.mask(1)
    assert m.shape == (2, 1, 1, 5) and m._base is not None  # a slice of the cache's own buffer
    assert torch.equal(torch.isfinite(m[:, 0, 0]), torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1))
    plain = KVCache(1, 1, 2, 10, 4, torch.float32, "cpu")
    plain.reserve(3, torch.ones(1, 3, dtype=torch.bool))
    plain.advance(3)
    assert plain.mask(1) is None


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tok_path, cfg = make_tokenizer_and_config(tmp_path_factory.mktemp("speed"))
    model = randomize_(WallarooModel(cfg), seed=3, scale=0.7).eval().requires_grad_(False)
    return Pipeline(model, TextTokenizer(tok_path, cfg.tokens))


def test_decode_weights_cached_and_rebuilt(pipe):
    model = pipe.model
    keys, modules = set(model.state_dict()), {name for name, _ in model.named_modules()}
    w = decode_weights(model)
    assert w.packed and decode_weights(model) is w
    layer = model.model.layers[0].self_attn
    assert torch.equal(w.layers[0].qkv_t[:, :layer.q_proj.out_features], layer.q_proj.weight.t())
    with torch.no_grad():
        layer.q_proj.weight.mul_(1.0)  # an in-place write, even one that changes nothing, bumps the version
    rebuilt = decode_weights(model)
    assert rebuilt is not w and decode_weights(model) is rebuilt
    # Kept outside the model: no new parameters, buffers or submodules, and copies are unaffected.
    assert set(model.state_dict()) == keys and {name for name, _ in model.named_modules()} == modules
    copy.deepcopy(model)


def test_decode_weights_do_not_keep_a_model_alive(tmp_path):
    _, cfg = make_tokenizer_and_config(tmp_path)
    model = randomize_(WallarooModel(cfg)).eval()
    decode_weights(model).code_table("generate")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the cache holds the model weakly and its entry holds no reference back


def test_packed_and_unpacked_steps_decode_the_same(pipe, monkeypatch):
    runs = []
    real = pipeline_module.decode_image_codes
    monkeypatch.setattr(pipeline_module, "decode_image_codes", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    answers = []
    for pack in (False, True):
        assert decode_weights(pipe.model, pack=pack).packed == pack
        pipe.generate("a red circle on the left", size=(48, 32), cfg=2.0, seed=2, n=2)
        answers.append(pipe.understand(None, "What shape is in the picture?", max_new_tokens=8, seed=1))
        assert decode_weights(pipe.model).packed == pack  # the decodes above used these weights
    assert torch.equal(runs[0], runs[1]) and answers[0] == answers[1]


# --- the benchmark ----------------------------------------------------------------------------------

BENCH_ARGS = ["--config", "tiny-test", "--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "4",
              "--size", "32x32"]


def test_bench_compares_with_transformers(capsys):
    pytest.importorskip("transformers", reason="transformers (test dependency) is not installed")
    from bench.compare import SPEEDUP_LINE, main

    assert main(BENCH_ARGS) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(re.escape(SPEEDUP_LINE) + r"\d+\.\d\dx", out[-1])
    rows = [line.split() for line in out if line.startswith(("generate", "edit", "understand"))
            and "transformers" in line.split()[1:2]]
    assert len(rows) == 4
    assert all(r[-1] == "same" for r in rows), "the baseline must decode exactly ours' codes for the same seed"


def test_training_step_bench_times_both_attention_paths(capsys):
    from bench.train_step import SPEEDUP_LINE, main
    from wallaroo_nodes.engine import attention as attention_module

    assert main(["--tasks", "generate,edit", "--batch-size", "2", "--repeats", "1", "--threads", "1"]) == 0
    assert attention_module.EXPLICIT_TRAINING_ATTENTION, "the bench must leave training on the explicit path"
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(re.escape(SPEEDUP_LINE) + r"\d+\.\d\dx", out[-1])
    rows = {line.split()[0]: line.split()[1:] for line in out if line.startswith(("generate", "edit"))}
    assert set(rows) == {"generate", "edit"}
    assert all(float(v) > 0 for row in rows.values() for v in row[1:3])
    with pytest.raises(SystemExit):
        main(["--tasks", "draw"])
    assert "unknown ['draw']" in capsys.readouterr().err


def test_batch_building_bench_times_the_recipes_steps(capsys):
    from bench.train_data import LAST_LINE, main

    assert main(["--steps", "2", "--stages", "0,4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(re.escape(LAST_LINE) + r"\d+\.\d", out[-1])
    rows = [line.split() for line in out[1:-1]]
    assert {r[0] for r in rows} == {"0-understanding-pretrain", "4-unified-finetune"}
    # Each stage's task rows count its two steps, and its "all" row adds them up.
    for name in ("0-understanding-pretrain", "4-unified-finetune"):
        own = [r for r in rows if r[0] == name]
        assert sum(int(r[2]) for r in own if r[1] != "all") == 2 == int(next(r for r in own if r[1] == "all")[2])
        assert all(float(r[3]) > 0 for r in own)
    with pytest.raises(SystemExit):
        main(["--stages", "5"])
    assert "indices run from 0 to 4" in capsys.readouterr().err


def test_bench_says_when_transformers_is_missing(capsys, monkeypatch):
    from bench import hf_baseline
    from bench.compare import SPEEDUP_LINE, main

    def missing():
        raise hf_baseline.BaselineUnavailable("no transformers; install it with " + hf_baseline.INSTALL_HINT)

    monkeypatch.setattr(hf_baseline, "require_transformers", missing)
    assert main(BENCH_ARGS + ["--tasks", "generate"]) == 1
    captured = capsys.readouterr()
    assert "pip install" in captured.err and "--no-baseline" in captured.err
    assert captured.out.strip().splitlines()[-1] == SPEEDUP_LINE + "n/a (transformers not installed)"


def test_transformers_baseline_names_what_the_tiny_model_adds(tmp_path):
    """The tiny model's vision position table and interleaved M-RoPE are not Qwen2.5-VL's: the baseline says so,
    rather than failing on the state dict or comparing against a model that rotates differently."""
    pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")
    import dataclasses

    from bench.hf_baseline import BaselineUnavailable, build_hf_twin

    _, cfg = make_tokenizer_and_config(tmp_path)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, abs_position_grid=4))
    with pytest.raises(BaselineUnavailable, match="abs_position_grid"):
        build_hf_twin(WallarooModel(cfg))
    _, cfg = make_tokenizer_and_config(tmp_path)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, mrope_interleaved=True))
    with pytest.raises(BaselineUnavailable, match="mrope_interleaved"):
        build_hf_twin(WallarooModel(cfg))


def test_transformers_baseline_decodes_the_copy_gate_like_ours(tmp_path, monkeypatch):
    """A model with the tiny model's edit copy gate edits to the same codes through the baseline's loop."""
    pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")
    import dataclasses

    import numpy as np
    from PIL import Image

    from bench import hf_baseline

    tok_path, cfg = make_tokenizer_and_config(tmp_path)
    model = randomize_(WallarooModel(dataclasses.replace(cfg, edit_copy_source=True)), seed=3, scale=0.7)
    model = model.eval().requires_grad_(False)
    model.edit_copy_gate.bias.fill_(3.0)
    pipe = Pipeline(model, TextTokenizer(tok_path, cfg.tokens))
    hf = hf_baseline.build_hf_twin(model)
    real = pipeline_module.decode_image_codes
    runs = {}

    def engine(name):
        def loop(m, prep, **kw):
            assert kw.get("source_codes") is not None, "the pipeline must hand the edit's source codes to the loop"
            runs[name] = real(m, prep, **kw) if name == "ours" else hf_baseline.decode_image_codes(hf, m, prep, **kw)
            return runs[name]
        return loop

    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8))
    for name in ("ours", "transformers"):
        monkeypatch.setattr(pipeline_module, "decode_image_codes", engine(name))
        pipe.edit(source, "make it blue", cfg=2.0, temperature=0)
    assert torch.equal(runs["ours"], runs["transformers"])
    # The copy must change these codes, or the comparison above proves nothing about it.
    model.edit_copy_gate.bias.fill_(0.0)
    monkeypatch.setattr(pipeline_module, "decode_image_codes", engine("ours"))
    pipe.edit(source, "make it blue", cfg=2.0, temperature=0)
    assert not torch.equal(runs["ours"], runs["transformers"])
