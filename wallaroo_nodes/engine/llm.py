"""The Qwen2 decoder used by Qwen2.5-VL: GQA attention with biases on q/k/v, RMSNorm, SwiGLU, M-RoPE.

Parameter names follow the official checkpoint (`model.*` and `lm_head`) so conversion is a prefix map.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import LLMConfig
from .kv_cache import KVCache
from .rope import apply_rotary


_FUSED_RMS_NORM = getattr(F, "rms_norm", None)  # torch >= 2.4: one call instead of six (same arithmetic)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm: statistics in float32, normalised value cast back to the input dtype, then scaled."""
    dtype = x.dtype
    if _FUSED_RMS_NORM is not None and dtype == torch.float32 and weight.dtype == torch.float32:
        # One call with the weight: same arithmetic, half the time of norm-then-scale for a decode step's rows.
        return _FUSED_RMS_NORM(x, (x.shape[-1],), weight, eps)
    xf = x if dtype == torch.float32 else x.float()
    if _FUSED_RMS_NORM is not None:
        xf = _FUSED_RMS_NORM(xf, (xf.shape[-1],), eps=eps)
    else:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf if dtype == torch.float32 else xf.to(dtype))


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled in the input dtype (as Qwen2 does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int, backend: str, query_from: int = 0) -> torch.Tensor:
        """Attention output for rows `query_from:` of x (B, n, D), every row serving as a key and value."""
        b, n, _ = x.shape
        xq = x[:, query_from:]
        m = xq.shape[1]
        q = self.q_proj(xq).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos[:, query_from:], sin[:, query_from:]), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        out = attention(q, k, v, None if mask is None else mask[:, :, query_from:], backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, m, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.mlp = FeedForward(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int, backend: str, query_from: int = 0) -> torch.Tensor:
        """The layer's output for rows `query_from:` of x (B, n, D); all rows are attended."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, backend, query_from)
        x = x[:, query_from:] + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """Token embeddings, decoder layers and the final norm (the checkpoint's `model.*`)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, backend: str = "sdpa", last_layer_from: int = 0) -> torch.Tensor:
        """Run embeddings x (B, n, D) through all layers; with a cache, keys of earlier steps are attended.

        With `last_layer_from` > 0 the last layer computes only rows from there on (and so does the result,
        (B, n - last_layer_from, D)): in training the rows before the first target feed no loss from there.
        """
        if last_layer_from and cache is not None:
            raise ValueError("last_layer_from is for uncached training passes; a cache needs every row")
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, backend, last_layer_from if i == last else 0)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)
