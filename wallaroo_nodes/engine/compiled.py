"""Opt-in compiled decode steps: `torch.compile` over static shapes, CUDA graphs on GPU.

`Pipeline(model, tokenizer, compile=True)` (or "auto": compiled on CUDA only) routes every decode step
through one compiled function instead of `step.forward_step` in eager mode. The prefill, the heads, guidance
and sampling stay eager and unchanged, so for the same seed the tokens are those of the plain path (up to
floating-point rounding of fused kernels; on the CPU in float32 they are identical in the tests).

For CUDA graphs every input must keep its shape and address from step to step, so the compiled step:

* attends over persistent K/V buffers of a fixed capacity (the needed length rounded up to a bucket, kept
  between runs so that a graph recorded once is replayed by later runs), with a mask built in the graph
  from the buffers' validity row and the write positions;
* writes the new keys/values with `index_copy_` at positions given as a tensor, so no Python integer
  that changes per step reaches the graph (one graph for a single fed position, one for a row's last code
  plus its end-of-line token, per batch size and capacity).

The first steps of a new shape compile (tens of seconds on a GPU, more on a CPU); later runs reuse it.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from .kv_cache import KVCache
from .step import DecodeWeights, forward_step

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_KEEP_BUFFERS = 2  # persistent static caches kept per decoder (least recently used ones are dropped)


class CompileUnavailable(RuntimeError):
    """torch.compile cannot run here (old torch, no C++ compiler for the CPU backend, ...)."""


def _bucket(length: int, device: torch.device) -> int:
    if device.type == "cuda":
        # Attention over unused capacity is nearly free on a GPU; few buckets mean few recorded graphs.
        return max(1024, 1 << (length - 1).bit_length())
    return -(-length // 256) * 256


class _StaticKV:
    """Persistent K/V buffers of one (batch, capacity), and the key positions 0..capacity-1."""

    def __init__(self, model, batch: int, capacity: int):
        c = model.cfg.llm
        shape = (batch, c.num_kv_heads, capacity, c.head_dim)
        dev = model.device
        self.k = [torch.zeros(shape, dtype=model.dtype, device=dev) for _ in range(c.num_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=dev) for _ in range(c.num_layers)]
        self.valid = torch.ones(batch, capacity, dtype=torch.bool, device=dev)
        self.keys = torch.arange(capacity, device=dev)
        self.positions = torch.arange(capacity, device=dev)  # write positions are slices of this (not a graph input)
        self.capacity = capacity
        self.busy = False  # held by a run in progress (concurrent runs get buffers of their own)
        for t in self.k + self.v + [self.valid, self.keys]:
            torch._dynamo.mark_static_address(t)

    def clear(self) -> None:
        # Unused capacity is masked, but stale NaN/inf from an earlier run would still poison the softmax.
        for t in self.k + self.v:
            t.zero_()


class _StaticWriter:
    """The `cache` of `forward_step` inside the compiled graph: writes at tensor positions, attends to all."""

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor], positions: torch.Tensor):
        self.ks, self.vs, self.positions = ks, vs, positions

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ks[layer].index_copy_(2, self.positions, k)
        self.vs[layer].index_copy_(2, self.positions, v)
        return self.ks[layer], self.vs[layer]

    def advance(self, n: int) -> None:
        pass


def _static_step(weights: DecodeWeights, ks: list[torch.Tensor], vs: list[torch.Tensor], valid: torch.Tensor,
                 keys: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 backend: str) -> torch.Tensor:
    # Query j (at cache position positions[j]) sees valid keys at or before its own position.
    mask = valid[:, None, None, :] & (keys[None, :] <= positions[:, None])[None, None]
    return forward_step(weights, x, cos, sin, mask, _StaticWriter(ks, vs, positions), backend)


class CompiledDecoder:
    """Compiled decode steps for one model; create it once (per Pipeline) and reuse it across runs."""

    def __init__(self, model, mode: str | None = None):
        if not hasattr(torch, "compile"):
            raise CompileUnavailable("compiled decoding needs torch >= 2.0 (torch.compile)")
        self.device = model.device
        cuda = self.device.type == "cuda"
        if mode is None:
            mode = "reduce-overhead" if cuda else "default"
        if mode not in MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.cudagraphs = cuda and mode in ("reduce-overhead", "max-autotune")
        # Graphs: {1 position, row end} x batch sizes x capacities; the default limit (8) is easily reached.
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        self._fn = torch.compile(_static_step, mode=mode, fullgraph=True, dynamic=False)
        self._buffers: OrderedDict[tuple, _StaticKV] = OrderedDict()
        self._static_weights: weakref.WeakSet = weakref.WeakSet()  # DecodeWeights already marked static

    def _static_kv(self, model, batch: int, max_len: int) -> _StaticKV:
        capacity = _bucket(max_len, model.device)
        key = (batch, capacity, model.dtype, model.device)
        kv = self._buffers.get(key)
        if kv is not None and kv.busy:
            # Another run (another thread) holds them: this one gets private buffers (and its own graphs).
            kv = _StaticKV(model, batch, capacity)
        elif kv is None:
            while len(self._buffers) >= _KEEP_BUFFERS:
                self._buffers.popitem(last=False)
            kv = self._buffers[key] = _StaticKV(model, batch, capacity)
        else:
            self._buffers.move_to_end(key)
        kv.clear()
        kv.busy = True
        return kv

    def steps(self, model, weights: DecodeWeights, batch: int, max_len: int) -> "_CompiledSteps":
        """Prefill/step object of one run (the `decode._EagerSteps` interface)."""
        if self.cudagraphs and weights not in self._static_weights:
            # Weights keep their addresses: CUDA graphs read them in place instead of copying them per replay.
            for t in list(weights.parameters()) + list(weights.buffers()):
                torch._dynamo.mark_static_address(t)
            self._static_weights.add(weights)
        return _CompiledSteps(self, model, weights, self._static_kv(model, batch, max_len), max_len)


class _CompiledSteps:
    def __init__(self, owner: CompiledDecoder, model, weights: DecodeWeights, kv: _StaticKV, max_len: int):
        c = model.cfg.llm
        self.owner, self.weights, self.kv = owner, weights, kv
        self.backend = "sdpa"  # in the graph (xformers is not traceable); the eager prefill keeps the model's
        # The prefill runs eagerly through this cache view of the static buffers.
        self.cache = KVCache(c.num_layers, kv.valid.shape[0], c.num_kv_heads, max_len, c.head_dim, model.dtype,
                             model.device, buffers=(kv.k, kv.v, kv.valid))

    def prefill(self, model, prep) -> torch.Tensor:
        from . import decode  # late: decode imports this module's type only

        return decode._prefill(model, prep, self.cache)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        start = self.cache.length
        self.cache.reserve(n)
        kv = self.kv
        if self.owner.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            hidden = self.owner._fn(self.weights, kv.k, kv.v, kv.valid, kv.keys, x, cos, sin,
                                    kv.positions.narrow(0, start, n), self.backend)
        except Exception as exc:
            if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise CompileUnavailable(f"compiled decoding failed here ({type(exc).__name__}: {exc}); "
                                         "use the plain path (compile=False)") from exc
            raise
        self.cache.advance(n)
        return hidden

    def close(self) -> None:
        """The run is over: its static buffers may serve the next run."""
        self.kv.busy = False
