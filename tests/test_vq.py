"""VQ tokenizer: official state-dict layout, quantiser maths, shapes, trainability and low-precision decode."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from wallaroo_nodes.engine.config import VQConfig
from wallaroo_nodes.engine.vq import VQModel

TINY = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                z_channels=32, norm_groups=8)

# Total parameters of LlamaGen's VQ-16 (FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py,
# `VQ_16()` with default ModelArgs), counted by instantiating it once; the codebook_used buffer is not a parameter.
LLAMAGEN_VQ16_PARAMS = 71_883_403


def _res(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    out = {
        f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
        f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
        f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
        f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,),
    }
    if cin != cout:
        out[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)
        out[f"{prefix}.nin_shortcut.bias"] = (cout,)
    return out


def _attn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        out[f"{prefix}.{name}.weight"] = (c, c, 1, 1)
        out[f"{prefix}.{name}.bias"] = (c,)
    return out


def _conv(prefix: str, cout: int, cin: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)}


def _norm(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


# LlamaGen's layout for TINY, written out by hand from its Encoder/Decoder/VectorQuantizer.
EXPECTED_TINY = {
    **_conv("encoder.conv_in", 32, 3, 3),
    **_res("encoder.conv_blocks.0.res.0", 32, 32),
    **_conv("encoder.conv_blocks.0.downsample.conv", 32, 32, 3),
    **_res("encoder.conv_blocks.1.res.0", 32, 64),
    **_attn("encoder.conv_blocks.1.attn.0", 64),
    **_res("encoder.mid.0", 64, 64),
    **_attn("encoder.mid.1", 64),
    **_res("encoder.mid.2", 64, 64),
    **_norm("encoder.norm_out", 64),
    **_conv("encoder.conv_out", 32, 64, 3),
    **_conv("quant_conv", 8, 32, 1),
    "quantize.embedding.weight": (64, 8),
    **_conv("post_quant_conv", 32, 8, 1),
    **_conv("decoder.conv_in", 64, 32, 3),
    **_res("decoder.mid.0", 64, 64),
    **_attn("decoder.mid.1", 64),
    **_res("decoder.mid.2", 64, 64),
    **_res("decoder.conv_blocks.0.res.0", 64, 64),
    **_res("decoder.conv_blocks.0.res.1", 64, 64),
    **_attn("decoder.conv_blocks.0.attn.0", 64),
    **_attn("decoder.conv_blocks.0.attn.1", 64),
    **_conv("decoder.conv_blocks.0.upsample.conv", 64, 64, 3),
    **_res("decoder.conv_blocks.1.res.0", 64, 32),
    **_res("decoder.conv_blocks.1.res.1", 32, 32),
    **_norm("decoder.norm_out", 32),
    **_conv("decoder.conv_out", 3, 32, 3),
}


@pytest.fixture(scope="module")
def tiny() -> VQModel:
    torch.manual_seed(0)
    return VQModel(TINY).eval()


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def test_state_dict_matches_llamagen_layout(tiny: VQModel) -> None:
    got = {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    assert sorted(set(got) - set(EXPECTED_TINY)) == []
    assert sorted(set(EXPECTED_TINY) - set(got)) == []
    assert {k: s for k, s in got.items() if EXPECTED_TINY[k] != s} == {}
    assert list(tiny.buffers()) == []  # no codebook_used buffer


def test_group_norm_settings(tiny: VQModel) -> None:
    norms = [m for m in tiny.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 and m.eps == 1e-6 for m in norms)


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):
        model = VQModel(VQConfig())
    assert model.downsample == 16
    assert sum(p.numel() for p in model.parameters()) == LLAMAGEN_VQ16_PARAMS
    assert model.state_dict()["quantize.embedding.weight"].shape == (16384, 8)


def test_encode_features_unit_norm(tiny: VQModel) -> None:
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        z = tiny.encode_features(x)
    assert z.shape == (2, 8, 12, 8)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2, 8, 12), atol=1e-5, rtol=0)
    codes = tiny.encode(x)
    assert codes.dtype == torch.long and codes.shape == (2, 8, 12)
    assert torch.equal(codes, tiny.quantize_features(z))


def test_quantize_features_is_nearest_cosine(tiny: VQModel) -> None:
    torch.manual_seed(1)
    z = torch.randn(2, 3, 5, 8) * 3  # not normalised: the quantiser must normalise itself
    codes = tiny.quantize_features(z)
    weight = tiny.quantize.embedding.weight.detach()
    flat = z.reshape(-1, 8)
    expected = []
    for vec in flat:
        cos = [float(F.cosine_similarity(vec, row, dim=0)) for row in weight]
        expected.append(max(range(len(cos)), key=cos.__getitem__))
    assert codes.shape == (2, 3, 5)
    assert codes.flatten().tolist() == expected


def test_codebook_entries_are_normalised_rows() -> None:
    torch.manual_seed(2)
    model = VQModel(TINY)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 5)  # checkpoint rows need not be unit length
    codes = torch.randint(0, 64, (2, 3, 4))
    with torch.no_grad():
        entries = model.codebook_entries(codes)
    assert entries.shape == (2, 3, 4, 8)
    torch.testing.assert_close(entries.norm(dim=-1), torch.ones(2, 3, 4), atol=1e-6, rtol=0)
    rows = model.quantize.embedding.weight.detach()[codes]
    torch.testing.assert_close(entries * rows.norm(dim=-1, keepdim=True), rows)


def test_decode_non_square_grid(tiny: VQModel) -> None:
    codes = torch.randint(0, 64, (2, 3, 5))
    with torch.no_grad():
        img = tiny.decode_codes(codes)
        via_features = tiny.decode_features(tiny.codebook_entries(codes).permute(0, 3, 1, 2))
    assert img.shape == (2, 3, 6, 10)
    torch.testing.assert_close(img, via_features)


def test_training_lowers_reconstruction_loss() -> None:
    torch.manual_seed(3)
    model = VQModel(TINY)
    x = _smooth_images(4, 16, seed=4)

    def recon_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.mse_loss(model.decode_codes(model.encode(x)), x).item()

    before = recon_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(25):
        recon, codes, (vq_loss, commit_loss) = model(x)
        loss = F.mse_loss(recon, x) + vq_loss + commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert codes.shape == (4, 8, 8)
    # Straight-through and the codebook losses reach both the encoder and the codebook.
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    after = recon_loss()
    assert after < 0.7 * before, (before, after)


def test_bf16_decode_close_to_fp32() -> None:
    torch.manual_seed(5)
    model = VQModel(TINY).eval()
    codes = torch.randint(0, 64, (1, 4, 6))
    with torch.no_grad():
        ref = model.decode_codes(codes)
        model.to(torch.bfloat16)
        low = model.decode_codes(codes)
        feats = model.encode_features(torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16))
    assert low.dtype == torch.bfloat16 and feats.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item() + 1e-3, err


def test_cell_local_encoding_gives_a_cell_its_code_from_its_own_pixels_only() -> None:
    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                   z_channels=64, norm_groups=8, cell_local=True)
    local = VQModel(cfg).eval()
    glob = VQModel(replace(cfg, cell_local=False)).eval()
    glob.load_state_dict(local.state_dict())  # same weights and names: only the encoding differs
    flat = torch.full((1, 3, 32, 48), 0.3)
    busy = flat.clone()
    busy[:, :, 8:24, 24:40] = torch.rand(3, 16, 16) * 2 - 1  # an "object" in four cells
    with torch.no_grad():
        z_flat, z_busy = local.encode_features(flat), local.encode_features(busy)
        g_flat, g_busy = glob.encode_features(flat), glob.encode_features(busy)
        # Cell (0, 0) is identical in both images; so is its latent, but only when encoded locally.
        torch.testing.assert_close(z_flat[0, 0, 0], z_busy[0, 0, 0])
        assert not torch.allclose(g_flat[0, 0, 0], g_busy[0, 0, 0])
        # Each cell is encoded exactly as if it were an 8x8 image of its own.
        cell = busy[:, :, 8:16, 24:32]
        torch.testing.assert_close(local.encode_features(cell)[0, 0, 0], z_busy[0, 1, 3])
        # Every flat cell of one colour shares a code, and the decoder still sees the whole grid.
        codes = local.encode(flat)
        assert codes.unique().numel() == 1
        assert local.decode_codes(codes).shape == (1, 3, 32, 48)


def test_cell_local_encoding_without_grad_encodes_each_distinct_cell_once() -> None:
    """Inference and the stages' frozen VQ encode repeated cells once; latents match encoding every cell."""
    torch.manual_seed(1)
    cfg = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                   z_channels=64, norm_groups=8, cell_local=True)
    vq = VQModel(cfg).eval()
    images = torch.full((2, 3, 32, 48), -0.5)
    images[1] = 0.25
    images[0, :, 8:24, 24:40] = torch.rand(3, 16, 16) * 2 - 1
    seen = []
    vq.encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        dedup = vq.encode_features(images)
    with torch.enable_grad():
        every = vq.encode_features(images).detach()
    assert seen == [2 + 4, 2 * 4 * 6]  # two flat colours and four object cells, then all 48 cells
    torch.testing.assert_close(dedup, every)
