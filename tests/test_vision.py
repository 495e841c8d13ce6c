"""Vision tower: official parameter names, and output parity with transformers' Qwen2.5-VL vision model."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from wallaroo_nodes.engine import vision as vision_module
from wallaroo_nodes.engine.config import VisionConfig
from wallaroo_nodes.engine.vision import VisionTower, rotary_positions, window_order

TINY = VisionConfig(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48,
                    window_size=112, fullatt_block_indexes=(1, 3))


def _official_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the `wallaroo.visual.*` tensors of the official checkpoint, prefix stripped."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    merged = d * cfg.spatial_merge_size ** 2
    shapes = {"patch_embed.proj.weight": (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)}
    for b in range(cfg.depth):
        p = f"blocks.{b}"
        shapes |= {
            f"{p}.norm1.weight": (d,), f"{p}.norm2.weight": (d,),
            f"{p}.attn.qkv.weight": (3 * d, d), f"{p}.attn.qkv.bias": (3 * d,),
            f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
            f"{p}.mlp.gate_proj.weight": (i, d), f"{p}.mlp.gate_proj.bias": (i,),
            f"{p}.mlp.up_proj.weight": (i, d), f"{p}.mlp.up_proj.bias": (i,),
            f"{p}.mlp.down_proj.weight": (d, i), f"{p}.mlp.down_proj.bias": (d,),
        }
    shapes |= {"merger.ln_q.weight": (d,), "merger.mlp.0.weight": (merged, merged), "merger.mlp.0.bias": (merged,),
               "merger.mlp.2.weight": (cfg.out_hidden_size, merged), "merger.mlp.2.bias": (cfg.out_hidden_size,)}
    return shapes


def test_state_dict_matches_official_layout_at_full_size():
    cfg = VisionConfig()  # the 7B tower: 32 blocks of width 1280
    with torch.device("meta"):
        tower = VisionTower(cfg)
    got = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert got == _official_shapes(cfg)
    assert got["merger.mlp.2.weight"] == (3584, 5120)
    assert sum(v.numel() for v in tower.parameters()) == 676_550_144


@functools.lru_cache(maxsize=None)  # built once per attention implementation; tests only read it
def _hf_tower(attn: str):
    cfg = TINY
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    hf_cfg = Qwen2_5_VLVisionConfig(
        depth=cfg.depth, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        out_hidden_size=cfg.out_hidden_size, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size, spatial_merge_size=cfg.spatial_merge_size,
        window_size=cfg.window_size, fullatt_block_indexes=list(cfg.fullatt_block_indexes), hidden_act="silu",
        rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta})
    hf_cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).float().eval()
    # Random values everywhere (norm weights and biases too) so every parameter influences the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name else 0.08
            p.copy_((1.0 if scale == 0.2 else 0.0) + scale * torch.randn_like(p))
    return model


def _load_from_hf(hf_model, cfg: VisionConfig) -> VisionTower:
    hf_state = hf_model.state_dict()
    # transformers 5 keeps the official names for the vision tower, so the map is the identity.
    assert set(hf_state) == set(_official_shapes(cfg))
    tower = VisionTower(cfg).eval()
    tower.load_state_dict(hf_state, strict=True)
    return tower


def _hf_features(hf_model, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = hf_model(patches, grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("grids", [
    [(1, 20, 34)],  # non-square, 10x17 merged tokens: 3x5 windows of 4x4, clipped at two edges
    [(1, 20, 34), (1, 8, 12), (2, 4, 18)],  # several images in one call, one with two frames
], ids=["one-image", "three-images"])
def test_parity_with_transformers(attn, grids):
    hf_model = _hf_tower(attn)
    tower = _load_from_hf(hf_model, TINY)
    torch.manual_seed(1)
    grid = torch.tensor(grids, dtype=torch.long)
    n = int(grid.prod(dim=1).sum())
    patch_dim = TINY.in_channels * TINY.temporal_patch_size * TINY.patch_size ** 2
    patches = torch.randn(n, patch_dim)
    with torch.no_grad():
        ours = tower(patches, grid)
        ref = _hf_features(hf_model, patches, grid)
    assert ours.shape == (n // 4, TINY.out_hidden_size)
    assert ref.shape == ours.shape
    assert ref.abs().max() > 0.1  # a real signal, not an all-zero pair
    assert (ours - ref).abs().max().item() <= 1e-4


def test_windows_and_full_attention_both_matter():
    """Each attention layout changes the output, so the parity test above constrains both."""
    hf_model = _hf_tower("sdpa")
    tower = _load_from_hf(hf_model, TINY)
    torch.manual_seed(2)
    grid = torch.tensor([[1, 20, 34]])
    patches = torch.randn(680, 1176)
    with torch.no_grad():
        base = tower(patches, grid)
        tower.full_attention_blocks = frozenset(range(TINY.depth))
        all_full = tower(patches, grid)
        tower.full_attention_blocks = frozenset()
        all_window = tower(patches, grid)
    assert (base - all_full).abs().max() > 1e-3
    assert (base - all_window).abs().max() > 1e-3


def test_rotary_positions_follow_merge_blocks():
    pos = rotary_positions([(1, 4, 6)], merge=2)
    # First 2x2 block is rows 0-1 x cols 0-1, then the block to its right.
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert pos.shape == (24, 2)
    assert pos[-1].tolist() == [3, 5]


def test_window_order_clips_edge_windows():
    # 1 x 10 x 6 patches -> 5 x 3 merged tokens; windows of 2 merged tokens: rows (2, 2, 1) x cols (2, 1).
    order, cu = window_order([(1, 10, 6)], merge=2, window=2)
    assert order.tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 9, 10, 8, 11, 12, 13, 14]
    assert (torch.diff(cu) // 4).tolist() == [4, 2, 4, 2, 2, 1]
    assert cu.dtype == torch.int32 and cu[-1].item() == 60


def test_backend_setting_reaches_attention(monkeypatch):
    seen = []
    real = vision_module.varlen_attention

    def spy(q, k, v, cu_seqlens, backend):
        seen.append(backend)
        return real(q, k, v, cu_seqlens, "sdpa")

    monkeypatch.setattr(vision_module, "varlen_attention", spy)
    tower = VisionTower(TINY)
    tower.attention_backend = "xformers"
    with torch.no_grad():
        tower(torch.randn(16, 1176), torch.tensor([[1, 4, 4]]))
    assert seen == ["xformers"] * TINY.depth


def test_rejects_inconsistent_inputs():
    tower = VisionTower(TINY)
    with pytest.raises(ValueError, match="describes 16 patches but pixel_patches has 12"):
        tower(torch.randn(12, 1176), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        tower(torch.randn(15, 1176), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match=r"shape \(N, 1176\)"):
        tower(torch.randn(16, 100), torch.tensor([[1, 4, 4]]))


def test_bfloat16_tower_tracks_float32():
    hf_model = _hf_tower("sdpa")
    tower = _load_from_hf(hf_model, TINY)
    torch.manual_seed(3)
    grid = torch.tensor([[1, 8, 12]])
    patches = torch.randn(96, 1176)
    with torch.no_grad():
        ref = tower(patches, grid)
        low = tower.to(torch.bfloat16)(patches, grid)  # float32 patches are cast by the patch embedding
    assert low.dtype == torch.bfloat16
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.03


def test_official_tower_has_no_absolute_position_table():
    """Qwen2.5-VL has none; the table exists only where a config asks for it (the tiny model)."""
    assert VisionConfig().abs_position_grid == 0
    assert not hasattr(VisionTower(TINY), "pos_embed")
    with_table = VisionTower(dataclasses.replace(TINY, abs_position_grid=4))
    assert tuple(with_table.state_dict()["pos_embed.weight"].shape) == (16, TINY.hidden_size)


def test_absolute_positions_sample_the_table_by_fraction_of_the_image():
    table = vision_module.AbsolutePositionEmbedding(dataclasses.replace(TINY, abs_position_grid=3))
    with torch.no_grad():
        table.weight.copy_(torch.arange(9, dtype=torch.float32)[:, None].expand(9, TINY.hidden_size))
    for rows, cols in ((4, 6), (8, 8), (2, 10)):
        pos = rotary_positions([(1, rows, cols)], merge=2)
        got = table(pos, torch.tensor([[rows, cols]]).expand(len(pos), 2))[:, 0]
        by_place = {tuple(p): v for p, v in zip(pos.tolist(), got.tolist())}
        # Corners are the table's corners at every resolution; in between is bilinear (row-major 3x3 table).
        assert by_place[(0, 0)] == 0 and by_place[(0, cols - 1)] == 2
        assert by_place[(rows - 1, 0)] == 6 and by_place[(rows - 1, cols - 1)] == 8
        expected = (torch.tensor([r for r, c in pos.tolist()]) / (rows - 1) * 2 * 3
                    + torch.tensor([c for r, c in pos.tolist()]) / (cols - 1) * 2)
        assert torch.allclose(got, expected, atol=1e-5)


def test_absolute_positions_tell_apart_tokens_a_relative_tower_cannot():
    """On a flat image every token of a rotary-only tower is the same; the table makes them differ."""
    cfg = dataclasses.replace(TINY, abs_position_grid=4)
    torch.manual_seed(0)
    tower = VisionTower(cfg)
    flat = torch.ones(64, 1176)
    grid = torch.tensor([[1, 8, 8]])
    with torch.no_grad():
        plain = VisionTower(TINY)
        plain.load_state_dict({k: v for k, v in tower.state_dict().items() if k != "pos_embed.weight"})
        same = plain(flat, grid)
        tower.pos_embed.weight.normal_()
        differ = tower(flat, grid)
    assert (same - same[0]).abs().max() < 1e-5
    assert (differ - differ[0]).abs().amax(dim=1)[1:].min() > 1e-3


def test_position_table_gradient_is_the_same_every_time_on_two_threads():
    """Two runs of one training seed must give the same table: its gradient may not depend on thread timing."""
    cfg = dataclasses.replace(TINY, hidden_size=128, abs_position_grid=8)
    torch.manual_seed(0)
    table = vision_module.AbsolutePositionEmbedding(cfg)
    # Many patches of a few image sizes, as in a training batch, so many rows of the table get many adds.
    grids = [(1, 8, 8), (1, 6, 10), (1, 10, 6)] * 40
    pos = rotary_positions(grids, merge=2)
    sides = torch.cat([torch.tensor([[h, w]]).expand(h * w, 2) for _, h, w in grids])
    upstream = torch.randn(len(pos), cfg.hidden_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(20):
            table.weight.grad = None
            table(pos, sides).backward(upstream)
            grads.append(table.weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_config_rejects_a_one_cell_position_table():
    from wallaroo_nodes.engine.config import ConfigError
    with pytest.raises(ConfigError, match="abs_position_grid"):
        dataclasses.replace(TINY, abs_position_grid=1).validate()
