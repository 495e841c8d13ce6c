"""LlamaGen VQ image tokenizer: conv encoder, l2-normalised codebook quantiser, conv decoder.

Parameter names match LlamaGen's `VQModel` state dict so official checkpoints load unchanged (the
`quantize.codebook_used` training buffer is not kept; the weight converter drops it).
Images are channels-first in [-1, 1]; code grids are [B, h, w] with h = H / downsample.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VQConfig

GN_EPS = 1e-6
COMMIT_BETA = 0.25


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the tokenizer's eps."""
    return nn.GroupNorm(groups, channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in every released model
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 conv projections."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head of width C; SDPA's default scale is C**-0.5.
        q, k, v = (proj(n).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with right/bottom zero padding (halves odd-free sides exactly)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, attention after each (lowest resolution only), then resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: bool, groups: int):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(n_blocks if attn else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


def mid_blocks(ch: int, groups: int) -> nn.ModuleList:
    """Res, attention, res at the lowest resolution (indices 0, 1, 2 in the state dict)."""
    return nn.ModuleList([ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)])


class Encoder(nn.Module):
    """Image [B, in_ch, H, W] -> latent [B, z_channels, H/ds, W/ds]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            level = Level(in_ch, out_ch, cfg.num_res_blocks, attn=i == last, groups=g)
            if i != last:
                level.downsample = Downsample(out_ch)
            self.conv_blocks.append(level)
            in_ch = out_ch
        self.mid = mid_blocks(in_ch, g)
        self.norm_out = group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, 3, h*ds, w*ds]; levels run from lowest resolution up."""

    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = mid_blocks(in_ch, g)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(widths))):
            # The decoder has one more res block per level than the encoder.
            level = Level(in_ch, widths[i], cfg.num_res_blocks + 1, attn=i == last, groups=g)
            if i != 0:
                level.upsample = Upsample(widths[i])
            self.conv_blocks.append(level)
            in_ch = widths[i]
        self.norm_out = group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Holds the codebook (`quantize.embedding.weight`); codes are looked up by cosine similarity."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        if not self.embedding.weight.is_meta:
            # Skipped on the meta device (weights about to be loaded): there, normalize's first call
            # imports torch's reference decompositions and costs seconds.
            with torch.no_grad():
                self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def normalized(self) -> torch.Tensor:
        """The codebook with unit-norm rows, [codebook_size, dim]."""
        return F.normalize(self.embedding.weight, dim=-1)


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer for inference (and light training of tiny test models)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg.codebook_size, cfg.codebook_embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return self.cfg.downsample

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> unit-norm, unquantised latents [B, h, w, C]."""
        # In the weights' own dtype even inside a caller's autocast (bf16 training): the codes are targets.
        with torch.autocast(x.device.type, enabled=False):
            return self._encode_features(x)

    def _encode_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.cell_local:
            z = self.quant_conv(self.encoder(x))
            return F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        b, c, height, width = x.shape
        ds = self.downsample
        h, w = height // ds, width // ds
        # [B, 3, h*ds, w*ds] -> [B*h*w, 3, ds, ds]: every cell becomes its own 1x1-latent image.
        cells = x.reshape(b, c, h, ds, w, ds).permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, c, ds, ds)
        if torch.is_grad_enabled():
            z = self.quant_conv(self.encoder(cells))
        else:
            # A cell's latent depends on its pixels alone, and flat backgrounds repeat the same few cells: encode
            # each distinct cell once (about a fifth of a training batch's cells; a sixth of an edit step).
            distinct, where = torch.unique(cells.flatten(1), dim=0, return_inverse=True)
            z = self.quant_conv(self.encoder(distinct.view(-1, c, ds, ds)))[where]
        return F.normalize(z.reshape(b, h, w, -1), dim=-1)

    def quantize_features(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, h, w, C] -> nearest codebook ids [B, h, w] (by l2 distance of unit vectors)."""
        # Distances in fp32, autocast or not: in bf16 near-ties round together and flip codes.
        with torch.autocast(z.device.type, enabled=False):
            flat = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1)
            emb = self.quantize.normalized().float()
            dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2.0 * flat @ emb.t()
        return dist.argmin(dim=1).reshape(z.shape[:-1])

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, H/ds, W/ds]."""
        return self.quantize_features(self.encode_features(x))

    def codebook_entries(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of any shape [...] -> unit-norm codebook vectors [..., C]."""
        return self.quantize.normalized()[codes]

    def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, C, h, w] -> images [B, 3, h*ds, w*ds], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> images [B, 3, h*ds, w*ds], roughly in [-1, 1] (not clamped)."""
        return self.decode_features(self.codebook_entries(codes).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Reconstruct images; returns (recon, codes, (vq_loss, commit_loss)) with a straight-through code path."""
        z = self.encode_features(x)
        codes = self.quantize_features(z.detach())
        z_q = self.codebook_entries(codes)
        vq_loss = F.mse_loss(z_q, z.detach())
        commit_loss = COMMIT_BETA * F.mse_loss(z_q.detach(), z)
        # Straight-through: forward uses z_q, gradients flow to the encoder as if it were z.
        z_st = z + (z_q - z).detach()
        recon = self.decode_features(z_st.permute(0, 3, 1, 2))
        return recon, codes, (vq_loss, commit_loss)
