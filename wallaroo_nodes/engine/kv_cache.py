"""Static key/value cache: buffers allocated once per run and written in place, never reallocated."""
from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V buffers (B, Hkv, max_len, D) plus a key-validity mask for left padding."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # valid[b, j]: key j of row b is a real token (False for left padding).
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.length = 0
        self.max_len = max_len

    def reserve(self, n: int, valid: torch.Tensor | None = None) -> None:
        """Declare the next n positions (before a forward); valid (B, n) marks padding among them."""
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length} + {n} > {self.max_len} positions")
        if valid is not None:
            self.valid[:, self.length:self.length + n] = valid
            self.has_padding = self.has_padding or not bool(valid.all())

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, Hkv, n, D) for a layer and return all keys/values so far."""
        n = k.shape[2]
        end = self.length + n
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Commit n positions after every layer has written them."""
        self.length += n

    def mask(self, n: int) -> torch.Tensor | None:
        """Boolean attention mask (B, 1, n, length + n) for the next n queries, or None when plain causal
        attention over everything is exact (single query, no padding)."""
        end = self.length + n
        if n == 1 and not self.has_padding:
            return None
        causal = torch.ones(n, end, dtype=torch.bool, device=self.valid.device).tril(diagonal=self.length)
        return causal[None, None] & self.valid[:, None, None, :end]
