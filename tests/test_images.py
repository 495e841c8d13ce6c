"""Image preprocessing: mode conversion, Qwen2-VL resize rule, processor parity, VQ input/output, size checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from wallaroo_nodes.engine.config import ProtocolConfig, VisionConfig
from wallaroo_nodes.engine.images import (ImageInputError, UnsupportedSizeError, check_size, closest_size, load_rgb,
                                          smart_resize, vision_inputs, vq_input, vq_output_to_pil)

CFG = VisionConfig()
SIZES = ProtocolConfig().sizes


def _noise(width: int, height: int, seed: int = 0, channels: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _px(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------- load_rgb

def test_load_rgb_grey_and_bilevel():
    assert _px(load_rgb(Image.new("L", (3, 2), 77))).tolist() == [[[77, 77, 77]] * 3] * 2
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert _px(load_rgb(bilevel)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_load_rgb_16_bit_is_scaled_not_clipped(mode):
    values = np.array([[0, 257, 25700, 65535]], dtype=np.uint16)
    if mode == "I;16":
        image = Image.fromarray(values)
    else:
        image = Image.frombytes(mode, (4, 1), values.astype(">u2").tobytes())
    assert image.mode == mode
    out = _px(load_rgb(image))
    assert out[..., 0].tolist() == [[0, 1, 100, 255]]
    assert (out[..., 0] == out[..., 2]).all()


def test_load_rgb_32_bit_integer():
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert sixteen.mode == "I"
    assert _px(load_rgb(sixteen))[..., 1].tolist() == [[0, 128, 255]]
    eight = Image.new("L", (2, 1), 200).convert("I")  # 8-bit values in the 32-bit container stay as they are
    assert _px(load_rgb(eight))[..., 0].tolist() == [[200, 200]]
    wide = Image.fromarray(np.array([[-1000, 0, 99000]], dtype=np.int32))  # no known range: stretched
    assert _px(load_rgb(wide))[..., 0].tolist() == [[0, 3, 255]]


def test_load_rgb_float():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert _px(load_rgb(unit))[..., 0].tolist() == [[0, 128, 255]]
    hdr = Image.fromarray(np.array([[-2.0, 0.0, 6.0, np.nan]], dtype=np.float32))
    assert _px(load_rgb(hdr))[..., 0].tolist() == [[0, 64, 255, 0]]


def test_load_rgb_palette_with_transparency():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    assert _px(load_rgb(image)).tolist() == [[[255, 255, 255], [200, 10, 20]]]
    image.info.pop("transparency")
    assert _px(load_rgb(image)).tolist() == [[[0, 0, 0], [200, 10, 20]]]


def test_load_rgb_alpha_composites_onto_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    assert _px(load_rgb(rgba)).tolist() == [[[255, 255, 255], [255, 0, 0], [127, 127, 127]]]
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    assert _px(load_rgb(la)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_load_rgb_cmyk_and_ycbcr():
    assert _px(load_rgb(Image.new("CMYK", (1, 1), (255, 0, 0, 0)))).tolist() == [[[0, 255, 255]]]
    assert _px(load_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 255)))).tolist() == [[[0, 0, 0]]]
    assert _px(load_rgb(Image.new("YCbCr", (1, 1), (255, 128, 128)))).tolist() == [[[255, 255, 255]]]


def test_load_rgb_returns_rgb_unchanged():
    image = _noise(5, 4)
    assert np.array_equal(np.asarray(load_rgb(image)), np.asarray(image))


def test_load_rgb_rejects_unusable_images():
    with pytest.raises(ImageInputError, match="zero size"):
        load_rgb(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageInputError, match="expected a PIL image, got ndarray"):
        load_rgb(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageInputError, match="LAB"):
        load_rgb(Image.new("LAB", (2, 2)))
    assert issubclass(ImageInputError, ValueError)


# ---------------------------------------------------------------- smart_resize

def test_smart_resize_tiny_images_are_upscaled():
    assert smart_resize(1, 1, 28, CFG.min_pixels, CFG.max_pixels) == (56, 56)
    assert smart_resize(5, 300, 28, CFG.min_pixels, CFG.max_pixels) == (28, 308)
    assert smart_resize(300, 5, 28, CFG.min_pixels, CFG.max_pixels) == (308, 28)
    assert smart_resize(1, 200, 28, CFG.min_pixels, CFG.max_pixels) == (28, 196)  # exactly the ratio limit


def test_smart_resize_huge_image_fits_budget():
    h, w = smart_resize(10000, 8000, 28, CFG.min_pixels, CFG.max_pixels)
    assert (h, w) == (1120, 896)
    assert h * w <= CFG.max_pixels
    h, w = smart_resize(10000, 8000, 28, CFG.edit_min_pixels, CFG.edit_max_pixels)
    assert h % 28 == 0 and w % 28 == 0 and CFG.edit_min_pixels <= h * w <= CFG.edit_max_pixels
    assert abs(h / w - 1.25) < 0.1


def test_smart_resize_tight_budget_never_exceeds_max():
    h, w = smart_resize(10, 1900, 28, 28 * 28 * 4, 28 * 28 * 20)
    assert h * w <= 28 * 28 * 20 and h % 28 == 0 and w % 28 == 0


def test_smart_resize_aspect_ratio_error_names_ratio_and_limit():
    with pytest.raises(ImageInputError, match=r"250\.0:1.*at most 200:1"):
        smart_resize(4, 1000, 28, CFG.min_pixels, CFG.max_pixels)


def test_smart_resize_agrees_with_transformers_for_ordinary_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    # Sides of 15+ pixels: from there both round to at least one factor (below, transformers drops the side to
    # zero and rescales the whole image to min_pixels; we keep the aspect ratio instead).
    rng = np.random.default_rng(3)
    for height, width in rng.integers(15, 4000, size=(300, 2)).tolist():
        if max(height, width) / min(height, width) > 50:
            continue
        for lo, hi in ((CFG.min_pixels, CFG.max_pixels), (CFG.edit_min_pixels, CFG.edit_max_pixels)):
            assert smart_resize(height, width, 28, lo, hi) == hf_smart_resize(height, width, 28, lo, hi)


# ---------------------------------------------------------------- vision_inputs vs transformers

@pytest.mark.parametrize("width,height,max_pixels", [
    (224, 224, None),          # square, already a multiple of 28
    (640, 180, None),          # wide
    (100, 700, None),          # tall
    (333, 517, None),          # sides not multiples of 28
    (30, 40, None),            # tiny, above 1x1 but under min_pixels: scaled up
    (1000, 800, 28 * 28 * 64),  # over the budget: scaled down
])
def test_vision_inputs_match_transformers_processor(width, height, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    limit = CFG.max_pixels if max_pixels is None else max_pixels
    processor = Qwen2VLImageProcessorPil(min_pixels=CFG.min_pixels, max_pixels=limit, image_mean=list(CFG.image_mean),
                                         image_std=list(CFG.image_std), patch_size=CFG.patch_size,
                                         temporal_patch_size=CFG.temporal_patch_size, merge_size=CFG.spatial_merge_size)
    image = _noise(width, height, seed=width)
    ref = processor(images=[image], return_tensors="np")
    patches, grid = vision_inputs(image, CFG, max_pixels=max_pixels)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert patches.dtype == torch.float32
    assert patches.shape == ref["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
    assert np.abs(patches.numpy() - ref["pixel_values"]).max() <= 1e-5


def test_vision_inputs_rgba_matches_transformers_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _noise(90, 60, seed=7, channels=4)
    assert image.mode == "RGBA"
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    patches, grid = vision_inputs(image, CFG)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert np.abs(patches.numpy() - ref["pixel_values"]).max() <= 1e-5


def test_vision_inputs_patch_layout():
    # A horizontal ramp: every pixel value encodes its column, so the flat layout is checkable by hand.
    cols = np.tile(np.arange(56, dtype=np.uint8)[None, :, None], (56, 1, 3))
    patches, grid = vision_inputs(Image.fromarray(cols), CFG)
    assert grid == (1, 4, 4)
    raw = patches.view(16, 3, 2, 14, 14) * torch.tensor(CFG.image_std)[:, None, None, None] \
        + torch.tensor(CFG.image_mean)[:, None, None, None]
    first_col = (raw[:, 0, 0, 0, 0] * 255).round().long().tolist()
    # Patches 0-3 are the top-left 2x2 block (cols 0, 14, 0, 14), then the block to its right (28, 42, ...).
    assert first_col[:8] == [0, 14, 0, 14, 28, 42, 28, 42]
    assert torch.equal(raw[:, :, 0], raw[:, :, 1])  # both temporal copies are the same frame


def test_vision_inputs_uses_config_budget_by_default():
    _, grid = vision_inputs(_noise(2000, 1500), CFG)
    assert grid[1] * grid[2] * 14 * 14 <= CFG.max_pixels
    _, small = vision_inputs(_noise(2000, 1500), CFG, min_pixels=CFG.edit_min_pixels, max_pixels=CFG.edit_max_pixels)
    assert small[1] * small[2] * 14 * 14 <= CFG.edit_max_pixels < grid[1] * grid[2] * 14 * 14


# ---------------------------------------------------------------- closest_size

@pytest.mark.parametrize("height,width,expected", [
    (512, 512, (512, 512)),
    (1000, 2000, (352, 704)),
    (2000, 1000, (704, 352)),
    (720, 1280, (384, 672)),    # 16:9 landscape, 0.5625
    (1200, 900, (576, 448)),    # 4:3 portrait, 1.333
    (1066, 1000, (544, 480)),   # 1.066: nearer 1.13 than 1.0 by the reference's 2-decimal labels
    (5000, 100, (704, 352)),    # beyond the table: the extreme entry
])
def test_closest_size(height, width, expected):
    assert closest_size(height, width, SIZES) == expected


# ---------------------------------------------------------------- vq_input / vq_output_to_pil

def test_vq_input_wide_image_to_square():
    # 300 x 200: left 50 px red, middle 200 px green, right 50 px blue. Covering 512x512 scales by 2.56 and the
    # centre crop keeps exactly the green part.
    a = np.zeros((200, 300, 3), dtype=np.uint8)
    a[:, :50, 0] = 255
    a[:, 50:250, 1] = 255
    a[:, 250:, 2] = 255
    x = vq_input(Image.fromarray(a), (512, 512))
    assert x.shape == (1, 3, 512, 512) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    centre = x[0, :, 100:400, 20:492]
    assert torch.allclose(centre, torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.05)


def test_vq_input_matches_resize_and_centre_crop():
    image = _noise(200, 300, seed=11)  # tall source, wide target
    x = vq_input(image, (352, 704))
    assert x.shape == (1, 3, 352, 704)
    # Cover: width 200 -> 704 (x3.52), height 300 -> 1056; crop rows 352..704.
    expected = np.asarray(image.resize((704, 1056), Image.Resampling.BICUBIC))[352:704]
    expected = torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (x[0] - expected).abs().max() <= 1e-6
    assert x.min() < -0.9 and x.max() > 0.9


def test_vq_output_round_trip():
    image = _noise(704, 352, seed=5)
    x = vq_input(image, (352, 704))
    (back,) = vq_output_to_pil(x)
    assert back.mode == "RGB" and back.size == (704, 352)
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_vq_output_clamps_and_uses_plus_128():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    images = vq_output_to_pil(x)
    assert len(images) == 2
    assert np.asarray(images[1])[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="B, 3, H, W"):
        vq_output_to_pil(torch.zeros(3, 4, 4))


# ---------------------------------------------------------------- check_size

def test_check_size_accepts_tuples_and_strings():
    assert check_size((512, 512), SIZES) == (512, 512)
    assert check_size("352x704", SIZES) == (352, 704)
    assert check_size(" 704 x 352 ", SIZES) == (704, 352)
    assert check_size([384, 672], SIZES) == (384, 672)


@pytest.mark.parametrize("bad", [(500, 500), "500x500", "512", "axb", (512, 512, 3), (512.0, 512.0)])
def test_check_size_error_lists_supported_sizes(bad):
    with pytest.raises(UnsupportedSizeError) as info:
        check_size(bad, SIZES)
    message = str(info.value)
    assert "height x width" in message
    assert all(f"{h}x{w}" in message for h, w in SIZES)
    assert isinstance(info.value, ValueError)


def test_sizes_table_is_consistent_with_closest_size():
    # Every supported size maps to itself, so a source already at a supported aspect keeps it.
    for h, w in SIZES:
        assert closest_size(h * 3, w * 3, SIZES) == (h, w)
    assert math.isclose(SIZES[0][0] / SIZES[0][1], 0.5)
