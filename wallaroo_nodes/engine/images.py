"""Image preprocessing: any PIL image -> 8-bit RGB -> vision-tower patches or VQ input, and VQ output -> PIL.

`vision_inputs` reproduces transformers' Qwen2-VL image processor (PIL backend) value for value: bicubic
resize to a multiple of patch_size * merge_size, rescale by 1/255, normalise, repeat the frame over the
temporal patch, and flatten patches in merge-block order. `vq_input` mirrors the reference edit script's
torchvision Resize + CenterCrop + ToTensor + Normalize(0.5, 0.5).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .config import VisionConfig

# Qwen2-VL refuses images whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageInputError(ValueError):
    """An image cannot be used as model input; the message says why."""


class UnsupportedSizeError(ValueError):
    """A requested output size is not in the model's supported-size table."""


def load_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (transparency composited onto white)."""
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"expected a PIL image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageInputError(f"image has zero size ({width}x{height} pixels)")
    try:
        image.load()
    except (OSError, ValueError) as exc:  # truncated or corrupt file data
        raise ImageInputError(f"image data could not be decoded: {exc}") from exc

    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        # Pillow's own conversion clips these to 0..255 (a 16-bit photo turns white); scale instead.
        gray = _high_depth_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray).convert("RGB")
    if mode == "LAB":
        raise ImageInputError("LAB images have no reliable RGB conversion in Pillow; convert the image to RGB first")

    bands = image.getbands()
    has_alpha = "A" in bands or "a" in bands or image.info.get("transparency") is not None
    try:
        if not has_alpha:
            return image.convert("RGB")
        if mode == "La":  # premultiplied grey + alpha: Pillow converts it only via RGBa
            grey, alpha = image.split()
            image = Image.merge("RGBa", (grey, grey, grey, alpha))
        # Composite onto white: transparent pixels' colour values are arbitrary (often black), and white is
        # what the image looks like on a page; transformers' Qwen processor does the same, so features match.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"cannot convert an image of mode {mode!r} to RGB: {exc}") from exc


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer or float grey values to uint8 without clipping away the range."""
    a = values.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        scaled = a * (255.0 / 65535.0)
    elif mode == "I":
        # A 32-bit container with no declared range: Pillow uses it for 16-bit PNG/TIFF data and for
        # convert("I") of 8-bit images, so pick the range the values fit; anything else is stretched.
        lo, hi = a.min(), a.max()
        if lo >= 0 and hi <= 255:
            scaled = a
        elif lo >= 0 and hi <= 65535:
            scaled = a * (255.0 / 65535.0)
        else:
            scaled = _stretch(a, lo, hi)
    else:  # "F": unit range is the float-image convention, 0..255 the result of convert("F") of 8-bit data
        finite = np.isfinite(a)
        if not finite.any():
            raise ImageInputError("float image has no finite pixel values")
        lo, hi = a[finite].min(), a[finite].max()
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        if lo >= 0 and hi <= 1:
            scaled = a * 255.0
        elif lo >= 0 and hi <= 255:
            scaled = a
        else:
            scaled = _stretch(a, lo, hi)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:  # a flat image: keep its value where it is representable
        return np.clip(a, 0, 255)
    return (a - lo) * (255.0 / (hi - lo))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w): multiples of factor, aspect kept, area within [min_pixels, max_pixels] (Qwen2-VL rule)."""
    if height < 1 or width < 1:
        raise ImageInputError(f"image has zero size ({width}x{height} pixels)")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageInputError(
            f"image is {width}x{height} pixels, an aspect ratio of {ratio:.1f}:1; the vision tower accepts at most "
            f"{MAX_ASPECT_RATIO}:1, so crop or pad the image first")
    # Sides below one factor round up to one factor (Qwen raised here): any image of at least 1x1 works.
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    # Rounding up can overshoot a tight budget; the maximum bounds memory, so it wins.
    while h * w > max_pixels and max(h, w) > factor:
        if h >= w:
            h -= factor
        else:
            w -= factor
    return h, w


def vision_inputs(image: Image.Image, cfg: VisionConfig, min_pixels: int | None = None,
                  max_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flat float32 patches (N, C*T*P*P) of one image for the vision tower, and its (t, h, w) patch grid."""
    if cfg.in_channels != 3:
        raise ValueError(f"images are RGB but the vision tower expects {cfg.in_channels} channels")
    rgb = load_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, cfg.image_factor,
                                 cfg.min_pixels if min_pixels is None else min_pixels,
                                 cfg.max_pixels if max_pixels is None else max_pixels)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)

    # Rescale in float64 then round to float32, then normalise in float32: the processor's exact arithmetic.
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float64) * (1 / 255)).to(torch.float32)
    pixels = pixels.permute(2, 0, 1)  # (C, H, W)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None]
    pixels = (pixels - mean) / std

    p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    # (C, H, W) -> (block row, block col, row in block, col in block, C, P, P): merge blocks are contiguous.
    x = pixels.reshape(3, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    # A still image is a clip of identical frames for the temporal patch.
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, t, -1, -1)
    patches = x.reshape(grid_h * grid_w, 3 * t * p * p).contiguous()
    return patches, (1, grid_h, grid_w)


def closest_size(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The supported (h, w) whose aspect ratio h/w is closest to the image's (first one on ties)."""
    if height < 1 or width < 1:
        raise ImageInputError(f"image has zero size ({width}x{height} pixels)")
    if not sizes:
        raise ValueError("the supported-size table is empty")
    aspect = height / width
    # The reference keys its table by h/w rounded to 2 decimals and compares against those labels; doing the
    # same picks the same size near the midpoints between two entries.
    best = min(sizes, key=lambda s: abs(round(s[0] / s[1], 2) - aspect))
    return int(best[0]), int(best[1])


def vq_input(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]: bicubic resize to cover (H, W) keeping aspect, then centre crop."""
    target_h, target_w = size
    rgb = load_rgb(image)
    width, height = rgb.size
    # The reference's torchvision Resize((h, w)) size rule, truncating the free side.
    if target_h / height > target_w / width:
        new_h, new_w = target_h, int(width * target_h / height)
    else:
        new_h, new_w = int(height * target_w / width), target_w
    # Float rounding must never leave the image smaller than the crop (torchvision would pad with black).
    new_h, new_w = max(new_h, target_h), max(new_w, target_w)
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # torchvision CenterCrop offsets: Python round, i.e. halves go to the even number.
    top = int(round((new_h - target_h) / 2.0))
    left = int(round((new_w - target_w) / 2.0))
    rgb = rgb.crop((left, top, left + target_w, top + target_h))
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).to(torch.float32).div(255)
    x = (x - 0.5) / 0.5  # = x / 127.5 - 1 in value; this order matches ToTensor + Normalize bit for bit
    return x[None]


def vq_output_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """VQ decoder output (B, 3, H, W) in about [-1, 1] -> list of RGB images."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    # +128 then truncation rounds to nearest (x/127.5 - 1 maps back to v + 0.5); the reference does this.
    x = x.detach().float().nan_to_num(0.0)
    pixels = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def check_size(size: tuple[int, int] | str, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Parse (h, w) or "HxW" and return it if supported, else raise UnsupportedSizeError listing the table."""
    parsed = _parse_size(size)
    table = [(int(h), int(w)) for h, w in sizes]
    if parsed is not None and parsed in table:
        return parsed
    listing = ", ".join(f"{h}x{w}" for h, w in table)
    raise UnsupportedSizeError(f"unsupported output size {size!r}; supported sizes (height x width): {listing}")


def _parse_size(size: object) -> tuple[int, int] | None:
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)
        return (int(match[1]), int(match[2])) if match else None
    if isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = size
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w)):
            return int(h), int(w)
    return None
