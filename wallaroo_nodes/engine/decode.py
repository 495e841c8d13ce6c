"""Decoding loops: image codes row by row (with CFG in one batch) and streamed text.

Per step the loops do the minimum: one forward of the new token(s) against a preallocated KV cache, a head
on the last position only, and sampling. Callers get a callback after each image row and a cancel check
between rows; a cancelled run raises `Cancelled` and leaves the model untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .kv_cache import KVCache
from .model import WallarooModel
from .sampling import SamplingParams, guide, sample


class Cancelled(Exception):
    """The caller asked the run to stop; partial results were discarded."""


RowCallback = Callable[[int, torch.Tensor], None]  # (rows done, codes so far (n, rows_done, cols))
CancelCheck = Callable[[], bool]


@dataclass
class PreparedBatch:
    """Model-ready prompt rows: embeddings with image features in place, positions, padding mask."""

    embeds: torch.Tensor        # (B, L, D)
    position_ids: torch.Tensor  # (3, B, L)
    valid: torch.Tensor         # (B, L) bool


def _new_cache(model: WallarooModel, batch: int, max_len: int) -> KVCache:
    c = model.cfg.llm
    return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, model.dtype, model.device)


def _prefill(model: WallarooModel, prep: PreparedBatch, cache: KVCache) -> torch.Tensor:
    n = prep.embeds.shape[1]
    cache.reserve(n, prep.valid)
    mask = cache.mask(n)
    hidden = model.forward_hidden(prep.embeds, prep.position_ids, mask, cache)
    return hidden[:, -1]


def _step(model: WallarooModel, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed (B, n, D) at text-like positions (B, n); return the last hidden state (B, D)."""
    n = embeds.shape[1]
    cache.reserve(n)
    mask = cache.mask(n)
    hidden = model.forward_hidden(embeds, positions[None].expand(3, -1, -1), mask, cache)
    return hidden[:, -1]


def _next_positions(prep: PreparedBatch) -> torch.Tensor:
    # The last prompt token is text, so its three axes agree; continue from its maximum.
    return prep.position_ids[:, :, -1].amax(0) + 1


@torch.inference_mode()
def decode_image_codes(model: WallarooModel, prep: PreparedBatch, *, rows: int, cols: int, kind: str,
                       cfg_scale: float, params: SamplingParams, generator: torch.Generator | None,
                       on_row: RowCallback | None = None, should_cancel: CancelCheck | None = None) -> torch.Tensor:
    """Sample a rows x cols grid of VQ codes for each conditional row.

    With guidance (cfg_scale != 1) the batch holds n conditional rows then n unconditional rows; otherwise
    it holds n conditional rows. The sequence is row 0 codes, EOL, row 1 codes, EOL, ... (no EOL after the
    last row). Returns (n, rows, cols) int64.
    """
    guided = cfg_scale != 1.0
    total = prep.embeds.shape[0]
    n = total // 2 if guided else total
    head, eol_id = model.image_head(kind), model.cfg.token_id("<|end_of_line>|")
    cache = _new_cache(model, total, prep.embeds.shape[1] + rows * cols + rows)
    positions = _next_positions(prep)
    codes = torch.empty(n, rows, cols, dtype=torch.long, device=model.device)
    eol_embed = model.embed_tokens(torch.full((total, 1), eol_id, device=model.device))

    hidden = _prefill(model, prep, cache)
    for r in range(rows):
        for c in range(cols):
            logits = head(hidden).float()
            if guided:
                logits = guide(logits[:n], logits[n:], cfg_scale)
            code = sample(logits, params, generator)
            codes[:, r, c] = code
            if r == rows - 1 and c == cols - 1:
                break
            fed = model.code_embeddings(code, kind)[:, None]
            if guided:
                fed = torch.cat([fed, fed])
            if c == cols - 1:
                # The row's last code and the end-of-line token go in together: nothing is sampled between.
                fed = torch.cat([fed, eol_embed], dim=1)
            step_pos = positions[:, None] + torch.arange(fed.shape[1], device=positions.device)
            hidden = _step(model, fed, step_pos, cache)
            positions = positions + fed.shape[1]
        if on_row is not None:
            on_row(r + 1, codes[:, :r + 1])
        if should_cancel is not None and r < rows - 1 and should_cancel():
            raise Cancelled(f"cancelled after {r + 1} of {rows} rows")
    return codes


@torch.inference_mode()
def decode_text(model: WallarooModel, prep: PreparedBatch, *, max_new_tokens: int, params: SamplingParams,
                generator: torch.Generator | None, stop_ids: set[int],
                should_cancel: CancelCheck | None = None) -> Iterator[int]:
    """Yield answer token ids of a one-row prompt until a stop id (not yielded) or max_new_tokens."""
    if prep.embeds.shape[0] != 1:
        raise ValueError("decode_text answers one prompt at a time")
    cache = _new_cache(model, 1, prep.embeds.shape[1] + max_new_tokens)
    positions = _next_positions(prep)
    hidden = _prefill(model, prep, cache)
    for i in range(max_new_tokens):
        token = sample(model.lm_head(hidden).float(), params, generator)
        tid = int(token)
        if tid in stop_ids:
            return
        yield tid
        if i == max_new_tokens - 1:
            return
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after {i + 1} tokens")
        hidden = _step(model, model.embed_tokens(token[:, None]), positions[:, None], cache)
        positions = positions + 1
