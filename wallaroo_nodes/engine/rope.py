"""Rotary position embeddings: M-RoPE for the LLM (3 position axes) and the position ids themselves.

Qwen2.5-VL gives every token three position ids (temporal, height, width). Text tokens use the same value
on all three axes; vision-tower image tokens use their grid coordinates offset by the running position.
The rotary frequencies of a head are split into three sections, each driven by one axis.
"""
from __future__ import annotations

from typing import Sequence

import torch


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard RoPE inverse frequencies, head_dim // 2 of them, float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def mrope_axis_of_frequency(mrope_section: Sequence[int], device: torch.device | str | None = None,
                            interleaved: bool = False) -> torch.Tensor:
    """For each frequency index, which position axis (0=t, 1=h, 2=w) drives it.

    Sectioned (Qwen2.5-VL): t takes the first mrope_section[0] indices, h the next, w the last, lowest
    frequencies. Interleaved (Qwen3-VL): index j goes to h when j % 3 == 1 and j < 3 * sections[1], to w when
    j % 3 == 2 and j < 3 * sections[2], else to t, so every axis gets high and low frequencies.
    """
    if not interleaved:
        return torch.cat([torch.full((n,), axis, dtype=torch.long, device=device)
                          for axis, n in enumerate(mrope_section)])
    axis = torch.zeros(sum(mrope_section), dtype=torch.long, device=device)
    for a in (1, 2):
        axis[a:3 * mrope_section[a]:3] = a
    return axis


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, axis_of_freq: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, L, head_dim) for position ids (3, B, L)."""
    # Pick, for each frequency, the position on its own axis: (B, L, head_dim/2).
    pos = position_ids.permute(1, 2, 0).to(torch.float32)  # (B, L, 3)
    pos_per_freq = pos[..., axis_of_freq]
    freqs = pos_per_freq * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last axis halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, D) by cos/sin (B, L, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def text_position_ids(valid: torch.Tensor) -> torch.Tensor:
    """Position ids (3, B, L) for text-only rows; valid (B, L) marks non-padding tokens.

    Padding gets position 1, as in the reference; it is masked out of attention anyway.
    """
    pos = valid.long().cumsum(-1) - 1
    pos = pos.masked_fill(~valid.bool(), 1)
    return pos[None].expand(3, -1, -1).clone()


def multimodal_position_ids(ids: Sequence[int], grids: Sequence[tuple[int, int, int]], vision_start_id: int,
                            merge: int, start: int = 0) -> torch.Tensor:
    """M-RoPE position ids (3, L) for one unpadded row.

    Each `vision_start_id` token is followed by one image's t*(h/merge)*(w/merge) vision tokens (grids in
    order, patch units). Like the Wallaroo reference (which locates images by their vision-start token, so
    the pixel block of an edit prompt stays text-like), image tokens take their (t, h, w) grid coordinate
    plus the running offset, and the text after an image resumes at the image's largest position + 1.
    """
    # Built from runs (a text run, then an image block) rather than token by token: a training step lays out
    # dozens of these rows, and per-token tensor writes were a tenth of its data time.
    pieces: list[torch.Tensor] = []
    next_pos, i, image = start, 0, 0
    n = len(ids)
    starts = [j for j, t in enumerate(ids) if t == vision_start_id]
    for j in starts:
        if image == len(grids):
            break
        if j < i:  # a vision start inside an earlier image's block is one of its tokens
            continue
        text_run = j + 1 - i  # the text up to and including the vision-start token
        pieces.append(torch.arange(next_pos, next_pos + text_run).expand(3, -1))
        next_pos += text_run
        t, h, w = grids[image]
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        if j + 1 + count > n:
            raise ValueError(f"image {image} needs {count} tokens after its vision start, the prompt has {n - j - 1}")
        tt = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw).reshape(-1)
        hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).reshape(-1)
        ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).reshape(-1)
        block = torch.stack([tt, hh, ww]) + next_pos
        pieces.append(block)
        next_pos = int(block.max()) + 1
        i = j + 1 + count
        image += 1
    if image != len(grids):
        raise ValueError(f"prompt has {image} vision-start tokens but {len(grids)} images were given")
    pieces.append(torch.arange(next_pos, next_pos + n - i).expand(3, -1))
    return torch.cat(pieces, dim=1)
