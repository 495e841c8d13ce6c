"""The Qwen2.5-VL vision tower: patch embedding, windowed ViT blocks with 2-D rotary positions, 2x2 merger.

Input is the flat patch list made by `images.vision_inputs` (patches of each image in merge-block order:
every run of spatial_merge_size**2 consecutive patches is one 2x2 block that becomes one LLM token).
Parameter names equal the official checkpoint's after stripping `wallaroo.visual.`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import varlen_attention
from .config import VisionConfig
from .llm import RMSNorm  # the same Qwen2 RMSNorm serves both towers


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over (frames, rows, cols) of one patch: a linear map of the flat patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # A flat patch is laid out (C, T, P, P), the same order as the conv weight, so a matmul is exact and
        # avoids slow Conv3d kernels for thousands of 1x1x1-output convolutions.
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class AbsolutePositionEmbedding(nn.Module):
    """A learned grid x grid table of features, bilinearly sampled where each patch sits in its image."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.grid = cfg.abs_position_grid
        # About the size of a patch embedding, so where a token sits is as loud as what it shows from step 0.
        self.weight = nn.Parameter(torch.randn(self.grid * self.grid, cfg.hidden_size) * 0.5)

    def forward(self, positions: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
        """Features (N, hidden) for patch (row, col) positions (N, 2) of images with (rows, cols) sides (N, 2)."""
        # Fractions of the image, not patch indices: "left third" means the same at every resolution.
        last = (sides - 1).clamp(min=1).to(torch.float32)
        coords = positions.to(torch.float32) / last * (self.grid - 1)
        low = coords.floor().clamp(max=self.grid - 2).long()
        frac = coords - low
        (r0, c0), (fr, fc) = low.unbind(-1), frac[:, :, None].unbind(1)
        w = self.weight.float()  # interpolate in float32 whatever the weights' dtype; the caller casts

        def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            # index_select, not w[...]: the same gather forward, but its gradient adds rows in a fixed order, where
            # indexing's adds them with atomics across threads, so two runs of one seed parted by ~1e-7 here.
            return w.index_select(0, r * self.grid + c)  # r, c: (N,) from the (N, 2) positions
        top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
        bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
        return top * (1 - fr) + bottom * fr


class VisionMLP(nn.Module):
    """SiLU-gated MLP with biases."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) over the two halves of the last axis."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention inside segments (windows or whole frames) of a packed sequence."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                backend: str) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotate in float32 so bf16 weights give the same angles as the reference.
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, backend)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                backend: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, backend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenate each 2x2 block of normed patch features and project to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x)
        return self.mlp(x.reshape(-1, self.mlp[0].in_features))


def rotary_positions(grid: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, col) of every patch, in merge-block order, as a LongTensor (N, 2)."""
    out = []
    for t, h, w in grid:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        # Raster over merge blocks, then raster inside each block: the order patches arrive in.
        rows = rows.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_order(grid: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of merged tokens grouped by attention window, and the windows' cumulative patch counts.

    Windows tile each frame's merged grid from the top-left in `window` x `window` tiles (clipped at the
    right and bottom edges); tokens within a window stay in raster order. Returns (order over merged
    tokens (M,), cu_seqlens over patches (windows+1,) int32).
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grid:
        mh, mw = h // merge, w // merge
        nh, nw = -(-mh // window), -(-mw // window)
        index = torch.arange(offset, offset + t * mh * mw).reshape(t, mh, mw)
        # Pad to whole windows with -1, cut into tiles, then drop the padding.
        index = F.pad(index, (0, nw * window - mw, 0, nh * window - mh), value=-1)
        tiles = index.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        valid = tiles >= 0
        orders.append(tiles[valid])
        lengths.append(valid.sum(dim=1))
        offset += t * mh * mw
    seqlens = torch.cat(lengths) * merge * merge
    cu = F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
    return torch.cat(orders), cu


def frame_seqlens(grid: list[tuple[int, int, int]]) -> torch.Tensor:
    """Cumulative patch counts of every frame of every image (full attention never crosses frames)."""
    seqlens = torch.tensor([h * w for t, h, w in grid for _ in range(t)], dtype=torch.int64)
    return F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)


class VisionTower(nn.Module):
    """Qwen2.5-VL NaViT: flat patches of one or more images -> one feature per 2x2 patch block."""

    attention_backend: str = "sdpa"

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.attention_backend = "sdpa"
        self.patch_embed = PatchEmbed(cfg)
        if cfg.abs_position_grid:
            self.pos_embed = AbsolutePositionEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.full_attention_blocks = frozenset(cfg.fullatt_block_indexes)

    def rotary(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, head_dim) for (row, col) positions: row angles then col angles, each half repeated."""
        # Computed on the fly in float32: a buffer would be cast to bf16 with the weights and lose precision.
        rot_dim = self.cfg.head_dim // 2
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim)
        angles = positions.to(device=device, dtype=torch.float32)[:, :, None] * inv_freq  # (N, 2, head_dim/4)
        angles = angles.flatten(1)  # (N, head_dim/2): rows' frequencies, then cols'
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Features (N // merge**2, out_hidden_size) of the images described by grid_thw (num_images, 3)."""
        cfg = self.cfg
        merge = cfg.spatial_merge_size
        unit = merge * merge
        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        self._check_inputs(pixel_patches, grid)
        device = pixel_patches.device

        x = self.patch_embed(pixel_patches)
        positions = rotary_positions(grid, merge)
        if self.cfg.abs_position_grid:
            sides = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid]).to(device)
            x = x + self.pos_embed(positions.to(device), sides).to(x.dtype)
        cos, sin = self.rotary(positions, device)

        # Gather tokens window by window, moving whole merge blocks so the merger still sees 2x2 groups.
        order, cu_window = window_order(grid, merge, cfg.window_size // (cfg.patch_size * merge))
        order = order.to(device)
        x = x.view(-1, unit, x.shape[-1])[order].view(-1, x.shape[-1])
        cos = cos.view(-1, unit, cos.shape[-1])[order].view(-1, cos.shape[-1])
        sin = sin.view(-1, unit, sin.shape[-1])[order].view(-1, sin.shape[-1])
        cu_full = frame_seqlens(grid)

        for i, block in enumerate(self.blocks):
            cu = cu_full if i in self.full_attention_blocks else cu_window
            x = block(x, cos, sin, cu, self.attention_backend)

        x = self.merger(x)
        # Undo the window grouping: output row j belongs to merged token order[j].
        out = torch.empty_like(x)
        out[order] = x
        return out

    def _check_inputs(self, pixel_patches: torch.Tensor, grid: list[tuple[int, int, int]]) -> None:
        cfg = self.cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        if pixel_patches.dim() != 2 or pixel_patches.shape[1] != patch_dim:
            raise ValueError(f"pixel_patches must have shape (N, {patch_dim}), got {tuple(pixel_patches.shape)}")
        for t, h, w in grid:
            if t < 1 or h < 1 or w < 1 or h % cfg.spatial_merge_size or w % cfg.spatial_merge_size:
                raise ValueError(f"grid (t={t}, h={h}, w={w}) must be positive with h and w multiples of "
                                 f"spatial_merge_size {cfg.spatial_merge_size}")
        total = sum(t * h * w for t, h, w in grid)
        if total != pixel_patches.shape[0]:
            raise ValueError(f"grid_thw describes {total} patches but pixel_patches has {pixel_patches.shape[0]}")
