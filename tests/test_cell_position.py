"""Cell-position embeddings (engine/cell_position.py): absent from the official layout, laid out row-major, and
added identically by the training forward and the cached decoder to edits (and not to generation)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_tokenizer_and_config, randomize_
from wallaroo_nodes.engine import images
from wallaroo_nodes.engine import pipeline as pipeline_module
from wallaroo_nodes.engine.cell_position import CellPositionEmbedding
from wallaroo_nodes.engine.config import ConfigError, WallarooConfig
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.pipeline import Pipeline
from wallaroo_nodes.engine.protocol import build_edit, build_generate
from wallaroo_nodes.engine.text import TextTokenizer
from wallaroo_nodes.train.data import Example, collate
from wallaroo_nodes.train.recipe import TrainingModel

SIZE = (32, 48)  # 2 x 3 code cells with the test config's ds16 VQ


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok_path, cfg = make_tokenizer_and_config(tmp_path_factory.mktemp("cells"))
    return TextTokenizer(tok_path, cfg.tokens), cfg


def test_official_layout_has_no_cell_table(setup):
    _, cfg = setup
    assert WallarooConfig().cell_position_grid == 0
    names = [n for n, _ in WallarooModel(cfg).named_parameters()]
    assert not [n for n in names if n.startswith("cell_positions")]
    with_cells = WallarooModel(dataclasses.replace(cfg, cell_position_grid=3))
    assert {n for n, _ in with_cells.named_parameters() if n.startswith("cell_positions")} == {
        "cell_positions.rows", "cell_positions.cols"}


def test_config_rejects_a_negative_or_too_small_table(setup):
    _, cfg = setup
    with pytest.raises(ConfigError, match="cell_position_grid"):
        dataclasses.replace(cfg, cell_position_grid=-1).validate()
    # The test sizes reach 3 cells on a side (48 px / 16).
    with pytest.raises(ConfigError, match="cell_position_grid 2"):
        dataclasses.replace(cfg, cell_position_grid=2).validate()
    dataclasses.replace(cfg, cell_position_grid=3).validate()


def test_stream_order_is_row_major_and_oversize_grids_are_refused():
    table = CellPositionEmbedding(4, 5)
    stream = table.stream(2, 3)
    for k in range(6):
        assert torch.equal(stream[k], table.rows[k // 3] + table.cols[k % 3])
    with pytest.raises(ValueError, match="exceeds"):
        table.grid(5, 2)


def _decoded_codes(monkeypatch, pipe: Pipeline, run) -> torch.Tensor:
    got = []
    real = pipeline_module.decode_image_codes

    def wrapper(*args, **kwargs):
        codes = real(*args, **kwargs)
        got.append(codes.clone())
        return codes
    monkeypatch.setattr(pipeline_module, "decode_image_codes", wrapper)
    run()
    monkeypatch.setattr(pipeline_module, "decode_image_codes", real)
    return got[0][0]


def _teacher_forced_predictions(model: WallarooModel, example: Example, codes: torch.Tensor,
                                monkeypatch) -> torch.Tensor:
    """Argmax codes of the training forward fed `codes` (the VQ encode of the target replaced by them)."""
    batch = collate([example], model.cfg)
    monkeypatch.setattr(model.vq, "encode", lambda x: codes[None])
    seen = {}
    real_head = model.image_head

    def head(kind):
        inner = real_head(kind)
        return lambda h: seen.setdefault("logits", inner(h))
    monkeypatch.setattr(model, "image_head", head)
    with torch.no_grad():
        TrainingModel(model)(batch)
    monkeypatch.undo()
    return seen["logits"].argmax(-1).reshape(codes.shape)


@pytest.mark.parametrize("kind", ["generate", "edit"])
def test_training_forward_adds_the_cells_the_decoder_adds(setup, monkeypatch, kind):
    """Greedy decoding's codes are exactly what the training forward predicts when fed them, with the cells.
    For an edit, with the training forward's table switched off they are not, so both paths really use it;
    generation does not use the table at all."""
    tok, base = setup
    cfg = dataclasses.replace(base, cell_position_grid=3)
    model = randomize_(WallarooModel(cfg), seed=4, scale=0.7).eval()
    with torch.no_grad():  # loud cells, so that leaving them out must change some greedy choice
        model.cell_positions.rows.mul_(30)
        model.cell_positions.cols.mul_(30)
    pipe = Pipeline(model, tok)
    g = np.random.default_rng(1)
    source = Image.fromarray(g.integers(0, 256, (SIZE[0], SIZE[1], 3), dtype=np.uint8))
    if kind == "generate":
        codes = _decoded_codes(monkeypatch, pipe, lambda: pipe.generate("a red circle", size=SIZE, cfg=1.0, top_k=1))
        example = Example("generate", build_generate(tok, cfg, "a red circle", SIZE), target_image=source)
    else:
        codes = _decoded_codes(monkeypatch, pipe, lambda: pipe.edit(source, "make it blue", cfg=1.0, top_k=1))
        v = cfg.vision
        patches, grid = images.vision_inputs(source, v, v.edit_min_pixels, v.edit_max_pixels)
        example = Example("edit", build_edit(tok, cfg, "make it blue", SIZE, grid), target_image=source,
                          source_image=source, vision_grid=grid, vision_patches=patches,
                          pixel_source=images.vq_input(source, SIZE))
    assert codes.shape == (2, 3)
    assert torch.equal(_teacher_forced_predictions(model, example, codes, monkeypatch), codes)

    cells, model.cell_positions = model.cell_positions, None
    try:
        without = _teacher_forced_predictions(model, example, codes, monkeypatch)
    finally:
        model.cell_positions = cells
    if kind == "edit":
        assert not torch.equal(without, codes)
    else:
        assert torch.equal(without, codes)
        assert model.code_stream_cells(2, 3, "generate") is None


def test_transformers_baseline_refuses_a_model_with_cells(setup):
    pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")
    from bench.hf_baseline import BaselineUnavailable, build_hf_twin

    _, cfg = setup
    with pytest.raises(BaselineUnavailable, match="cell_position_grid"):
        build_hf_twin(WallarooModel(dataclasses.replace(cfg, cell_position_grid=3)))
