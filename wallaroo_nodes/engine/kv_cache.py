"""Static key/value cache: buffers allocated once per run and written in place, never reallocated."""
from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V buffers (B, Hkv, max_len, D) plus a key-validity mask for left padding.

    `buffers=(k, v, valid)` reuses existing buffers (the compiled decoder's persistent ones) instead of
    allocating; they must be at least max_len long.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str,
                 buffers: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None):
        if buffers is None:
            shape = (batch, kv_heads, max_len, head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            # valid[b, j]: key j of row b is a real token (False for left padding).
            self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        else:
            self.k, self.v, self.valid = buffers
            if self.valid.shape[1] < max_len:
                raise ValueError(f"KV buffers hold {self.valid.shape[1]} positions, {max_len} needed")
            self.valid.fill_(True)
        self._valid4 = self.valid[:, None, None, :]
        self._bias4: torch.Tensor | None = None
        self.dtype = self.k[0].dtype
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
            if self.has_padding:
                # Additive form of the validity row, (B, 1, 1, max_len): a single query's mask is a slice of
                # it (no allocation, and SDPA needs no bool-to-float conversion per layer and step).
                bias = torch.zeros(self.valid.shape, dtype=self.dtype, device=self.valid.device)
                self._bias4 = bias.masked_fill_(~self.valid, float("-inf"))[:, None, None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, Hkv, n, D) for a layer and return all keys/values so far."""
        n = k.shape[2]
        end = self.length + n
        kb, vb = self.k[layer], self.v[layer]
        kb.narrow(2, self.length, n).copy_(k)
        vb.narrow(2, self.length, n).copy_(v)
        return kb.narrow(2, 0, end), vb.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Commit n positions after every layer has written them."""
        self.length += n

    def mask(self, n: int) -> torch.Tensor | None:
        """Attention mask (B, 1, n, length + n) for the next n queries: boolean (True = may attend), or for a
        single query an additive float view (0 / -inf); None when plain causal attention over everything is
        exact (single query, no padding)."""
        end = self.length + n
        if n == 1:
            # One query sees every key so far: only padding needs masking, and that is a view.
            return self._bias4.narrow(3, 0, end) if self.has_padding else None
        causal = torch.ones(n, end, dtype=torch.bool, device=self.valid.device).tril(diagonal=self.length)
        return causal[None, None] & self._valid4.narrow(3, 0, end)
