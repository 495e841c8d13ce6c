"""Attention backends: torch SDPA (default everywhere) and xformers (optional, CUDA only).

`auto` picks xformers when it is importable and the tensors live on CUDA, SDPA otherwise. A backend that is
forced but unavailable is an error, never a silent fallback, so benchmarks measure what they claim.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "xformers")
_FOLD_MAX_QUERIES = 16  # grouped-query folding for at most this many queries (decode steps, not prompts)
# Training on a CPU (gradients wanted) takes `_explicit_attention` instead of SDPA; bench/train_step.py turns this
# off to time both.
EXPLICIT_TRAINING_ATTENTION = True


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here."""


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    """True when `xformers.ops.memory_efficient_attention` imports."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build raising anything at import
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn a backend setting into the backend that will run, or raise naming the fix."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if name == "xformers":
        if not xformers_available():
            raise AttentionBackendError(
                "attention backend 'xformers' was requested but xformers is not installed; "
                "install it with `pip install .[xformers]` or use attention='sdpa'")
        if device.type != "cuda":
            raise AttentionBackendError(
                f"attention backend 'xformers' needs a CUDA device, the model is on {device.type}; "
                "use attention='sdpa' or 'auto'")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              backend: str = "sdpa") -> torch.Tensor:
    """Multi-head attention with grouped KV heads.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); mask: (B, 1, Lq, Lk), boolean (True = may attend) or additive
    float (0 / -inf) in q's dtype, or None. Returns (B, H, Lq, D).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if backend == "xformers":
        import xformers.ops as xops

        groups = heads // kv_heads
        b, _, lq, d = q.shape
        lk = k.shape[2]
        # xformers wants (B, L, Hkv, G, D) for grouped attention.
        qx = q.transpose(1, 2).reshape(b, lq, kv_heads, groups, d)
        kx = k.transpose(1, 2)[:, :, :, None, :].expand(b, lk, kv_heads, groups, d)
        vx = v.transpose(1, 2)[:, :, :, None, :].expand(b, lk, kv_heads, groups, d)
        bias = None
        if mask is not None:
            # The bias must be 8-aligned in memory on its last axis: allocate padded, then slice.
            padded = (lk + 7) // 8 * 8
            store = torch.zeros(b, kv_heads, groups, lq, padded, dtype=q.dtype, device=q.device)
            bias = store[..., :lk]
            if mask.dtype == torch.bool:
                bias.masked_fill_(~mask[:, :, None, :, :].expand(b, kv_heads, groups, lq, lk), float("-inf"))
            else:
                bias.copy_(mask[:, :, None, :, :].expand(b, kv_heads, groups, lq, lk))
        out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias)
        return out.reshape(b, lq, heads, d).transpose(1, 2)
    lq = q.shape[2]
    if EXPLICIT_TRAINING_ATTENTION and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
        return _explicit_attention(q, k, v, mask)
    if kv_heads != heads and lq <= _FOLD_MAX_QUERIES:
        # Few queries (decode steps): fold each KV head's group of query heads into the query axis, so keys and
        # values are read in place instead of being copied once per query head. Query g * lq + j of a KV head
        # is query j of the group's head g, so a per-query mask repeats along the group.
        b, _, _, d = q.shape
        groups = heads // kv_heads
        if mask is not None and mask.shape[2] != 1:
            mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).flatten(2, 3)
        out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, groups * lq, d), k, v, attn_mask=mask)
        return out.reshape(b, heads, lq, d)
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention as two matmuls and a softmax, for training on a CPU: same shapes and masks as `attention`.

    Under bf16 autocast, CPU SDPA's math path (what runs with a mask) took 2-3x as long forward and backward as
    these three ops do in bf16 (4 layers, 32 x 236 tokens: about a fifth of a stage-4 step). Each KV head's group
    of query heads is folded into the query axis, so keys and values are not copied per head.
    """
    b, heads, lq, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scores = (q.reshape(b, kv_heads, groups * lq, d) @ k.transpose(-1, -2)) * d ** -0.5
    scores = scores.view(b, kv_heads, groups, lq, lk)
    if mask is not None:
        mask = mask[:, :, None]  # (B, 1, 1, Lq, Lk): the same for every head of a group
        if mask.dtype == torch.bool:
            # The lowest finite value, not -inf: a row with every key masked averages instead of turning NaN
            # and spreading through the keys of every later layer.
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = scores.softmax(-1).view(b, kv_heads, groups * lq, lk)
    return (probs.to(v.dtype) @ v).view(b, heads, lq, d)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     backend: str = "sdpa") -> torch.Tensor:
    """Attention restricted to independent segments of a packed sequence (vision windows, images).

    q, k, v: (N, H, D); cu_seqlens: (S+1,) cumulative segment boundaries starting at 0. Returns (N, H, D).
    """
    bounds = cu_seqlens.tolist()
    if backend == "xformers":
        import xformers.ops as xops
        from xformers.ops import fmha

        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        bias = fmha.BlockDiagonalMask.from_seqlens(lengths)
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    # Batch segments of equal length into one SDPA call each: no N x N mask, no per-segment Python loop.
    by_length: dict[int, list[int]] = {}
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            by_length.setdefault(e - s, []).append(s)
    heads, dim = q.shape[1], q.shape[2]
    if len(by_length) == 1:
        (length, starts), = by_length.items()
        if len(starts) * length == q.shape[0]:
            # Contiguous equal segments: a pure reshape.
            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(len(starts), length, heads, dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(split(q), split(k), split(v))
            return out.transpose(1, 2).reshape(q.shape)
    out = torch.zeros_like(q)
    for length, starts in by_length.items():
        index = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).flatten()

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index).view(len(starts), length, heads, dim).transpose(1, 2)
        seg = F.scaled_dot_product_attention(gather(q), gather(k), gather(v))
        out = out.index_copy(0, index, seg.transpose(1, 2).reshape(-1, heads, dim))
    return out
