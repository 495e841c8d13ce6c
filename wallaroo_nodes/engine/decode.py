"""Decoding loops: image codes row by row (with CFG in one batch) and streamed text.

Per step the loops do the minimum: one forward of the new token(s) against a preallocated KV cache, a head
on the last position only, and sampling. Everything a step needs is prepared before the loop: the cache,
the rotary tables of every decode position, the input buffers (the end-of-line embedding already in place),
the fed-code embedding table, packed weights (`step.decode_weights`). A step writes the sampled code's
embedding into its buffer and runs `step.forward_step`: no host synchronisation in the image loop, no
concatenation, no mask construction (a single query's padding mask is a view of the cache's validity row).

With `compiled=` (a `compiled.CompiledDecoder`) the steps run through torch.compile (CUDA graphs on GPU)
over persistent static buffers instead; the prefill and everything around the step stay the same.

Callers get a callback after each image row and a cancel check between rows; a cancelled run raises
`Cancelled` and leaves the model untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from . import native
from .kv_cache import KVCache
from .model import WallarooModel
from .sampling import SamplingParams, guide, sample
from .step import DecodeWeights, decode_weights, forward_step

if TYPE_CHECKING:
    from .compiled import CompiledDecoder


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


class _EagerSteps:
    """Decode steps on a per-run KVCache: the default path."""

    def __init__(self, model: WallarooModel, weights: DecodeWeights, batch: int, max_len: int):
        self.cache = _new_cache(model, batch, max_len)
        self.weights = weights
        self.backend = model.attention_backend

    def prefill(self, model: WallarooModel, prep: PreparedBatch) -> torch.Tensor:
        return _prefill(model, prep, self.cache)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Feed x (B, n, D) at the next n positions (rotary cos / signed sin (B, n, hd)); last hidden (B, D)."""
        n = x.shape[1]
        self.cache.reserve(n)
        return forward_step(self.weights, x, cos, sin, self.cache.mask(n), self.cache, self.backend)

    def close(self) -> None:
        pass


class _NativeSteps(_EagerSteps):
    """Decode steps through the native C step (`native.py`) over the same per-run KVCache and prefill."""

    def __init__(self, model: WallarooModel, weights: DecodeWeights, batch: int, max_len: int):
        super().__init__(model, weights, batch, max_len)
        self.run = native.NativeRun(native.native_llm(weights), self.cache, batch, max_len)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        start = self.cache.length
        self.cache.reserve(n)
        hidden = self.run.step(x, cos, sin, start)
        self.cache.advance(n)
        return hidden


def _steps(model: WallarooModel, weights: DecodeWeights, batch: int, max_len: int,
           compiled: CompiledDecoder | None, kernel: str = "auto"):
    if compiled is not None:
        return compiled.steps(model, weights, batch, max_len)
    if kernel != "torch":
        reason = native.unavailable_reason(weights, batch)
        if reason is None:
            return _NativeSteps(model, weights, batch, max_len)
        if kernel == "native":
            raise native.NativeKernelError(f"kernel='native' cannot decode this: {reason}")
    return _EagerSteps(model, weights, batch, max_len)


def _next_positions(prep: PreparedBatch) -> torch.Tensor:
    # The last prompt token is text, so its three axes agree; continue from its maximum.
    return prep.position_ids[:, :, -1].amax(0) + 1


@torch.inference_mode()
def decode_image_codes(model: WallarooModel, prep: PreparedBatch, *, rows: int, cols: int, kind: str,
                       cfg_scale: float, params: SamplingParams, generator: torch.Generator | None,
                       on_row: RowCallback | None = None, should_cancel: CancelCheck | None = None,
                       compiled: CompiledDecoder | None = None, kernel: str = "auto",
                       source_codes: torch.Tensor | None = None) -> torch.Tensor:
    """Sample a rows x cols grid of VQ codes for each conditional row.

    With guidance (cfg_scale != 1) the batch holds n conditional rows then n unconditional rows; otherwise
    it holds n conditional rows. The sequence is row 0 codes, EOL, row 1 codes, EOL, ... (no EOL after the
    last row). `source_codes` (B, rows * cols), for models with `edit_copy_source`: the edit source's code of
    each cell, which the copy gate scores at that cell. Returns (n, rows, cols) int64.
    """
    guided = cfg_scale != 1.0
    total, prompt_len, dim = prep.embeds.shape
    n = total // 2 if guided else total
    device = prep.embeds.device
    weights = decode_weights(model)
    head, table = weights.image_head(kind), weights.code_table(kind)
    eol_id = model.cfg.token_id("<|end_of_line>|")
    # Fed after the prompt: every code but the last, and an end-of-line token after every row but the last.
    fed = rows * cols + rows - 2
    cos, sin = model.text_rope(_next_positions(prep), max(fed, 1))  # sin: signed (see text_rope)
    # Input buffers: one code, or a row's last code followed by the end-of-line token (already in place).
    one = torch.empty(total, 1, dim, dtype=model.dtype, device=device)
    two = torch.empty(total, 2, dim, dtype=model.dtype, device=device)
    two[:, 1] = model.embed_tokens(torch.tensor([eol_id], device=device))
    if source_codes is not None and source_codes.shape != (total, rows * cols):
        raise ValueError(f"source_codes must be {(total, rows * cols)}, got {tuple(source_codes.shape)}")
    groups = total // n  # the code of conditional row i is fed to row i of each group (CFG: both branches)
    one_code, two_code = one[:, 0].unflatten(0, (groups, n)), two[:, 0].unflatten(0, (groups, n))
    codes = torch.empty(n, rows, cols, dtype=torch.long, device=device)
    steps = _steps(model, weights, total, prompt_len + fed, compiled, kernel)

    try:
        hidden = steps.prefill(model, prep)
        t = 0
        for r in range(rows):
            for c in range(cols):
                logits = head(hidden).float()
                if source_codes is not None:
                    logits = model.add_source_copy(logits, hidden, source_codes[:, r * cols + c])
                if guided:
                    logits = guide(logits[:n], logits[n:], cfg_scale)
                code = sample(logits, params, generator)
                codes[:, r, c] = code
                if r == rows - 1 and c == cols - 1:
                    break
                if c == cols - 1:
                    # The row's last code and the end-of-line token go in together: nothing is sampled between.
                    two_code.copy_(table.index_select(0, code))
                    hidden = steps.step(two, cos.narrow(1, t, 2), sin.narrow(1, t, 2))
                    t += 2
                else:
                    one_code.copy_(table.index_select(0, code))
                    hidden = steps.step(one, cos.narrow(1, t, 1), sin.narrow(1, t, 1))
                    t += 1
            if on_row is not None:
                on_row(r + 1, codes[:, :r + 1])
            if should_cancel is not None and r < rows - 1 and should_cancel():
                raise Cancelled(f"cancelled after {r + 1} of {rows} rows")
    finally:
        steps.close()
    return codes


@torch.inference_mode()
def decode_text(model: WallarooModel, prep: PreparedBatch, *, max_new_tokens: int, params: SamplingParams,
                generator: torch.Generator | None, stop_ids: set[int],
                should_cancel: CancelCheck | None = None, compiled: CompiledDecoder | None = None,
                kernel: str = "auto") -> Iterator[int]:
    """Yield answer token ids of a one-row prompt until a stop id (not yielded) or max_new_tokens."""
    if prep.embeds.shape[0] != 1:
        raise ValueError("decode_text answers one prompt at a time")
    _, prompt_len, dim = prep.embeds.shape
    weights = decode_weights(model)
    fed = max_new_tokens - 1
    cos, sin = model.text_rope(_next_positions(prep), max(fed, 1))  # sin: signed (see text_rope)
    one = torch.empty(1, 1, dim, dtype=model.dtype, device=prep.embeds.device)
    table = model.model.embed_tokens.weight
    steps = _steps(model, weights, 1, prompt_len + fed, compiled, kernel)
    try:
        hidden = steps.prefill(model, prep)
        for i in range(max_new_tokens):
            token = sample(model.lm_head(hidden).float(), params, generator)
            tid = int(token)  # streaming needs the id now: one synchronisation per token
            if tid in stop_ids:
                return
            yield tid
            if i == max_new_tokens - 1:
                return
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled after {i + 1} tokens")
            torch.index_select(table, 0, token, out=one[:, 0])
            hidden = steps.step(one, cos.narrow(1, i, 1), sin.narrow(1, i, 1))
    finally:
        steps.close()
