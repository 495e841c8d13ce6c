"""The native decode step (`kernels/decode_step.c`): built with the system C compiler on first use, called
through ctypes, used by the decode loops on x86-64 CPUs with AVX2 and FMA for fp32 models.

Why: a tiny model's decode step on the CPU is ~140 small PyTorch operations plus matrix products for 1-2
rows, which BLAS runs far below what the core can stream. The C step does the same arithmetic in one call
(see the C file). Results equal the PyTorch step's to fp32 rounding (additions run in another order).

`kernel` choices, as the pipeline and decode loops take them: "auto" (native where it applies and builds,
else PyTorch), "native" (required: a clear error where it cannot run), "torch" (always PyTorch). A Pipeline
made without one (every front door) takes $WALLAROO_DECODE_KERNEL, else "auto".
The shared library is cached under $WALLAROO_CACHE (default ~/.cache/wallaroo) by a hash of the source and
flags, so a process builds it at most once per machine (about a second).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

KERNELS = ("auto", "native", "torch")
MAX_ROWS = 8  # batch x new positions per step; the C step's register tiles are built for a few rows
_SOURCE = Path(__file__).with_name("kernels") / "decode_step.c"
_FLAGS = ["-O3", "-std=c11", "-mavx2", "-mfma", "-fPIC", "-shared"]


class NativeKernelError(RuntimeError):
    """The native decode step was required (kernel='native') but cannot run here."""


def _cache_dir() -> Path:
    root = os.environ.get("WALLAROO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wallaroo")
    return Path(root) / "kernels"


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable: str | None = None


def _build() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeKernelError(f"the native decode step is written for x86-64 (AVX2); this is {platform.machine()}")
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"decode_step-{digest}.so"
    if not target.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            raise NativeKernelError("no C compiler found (cc, gcc or clang; or set CC) to build the native "
                                    "decode step; install one or use kernel='torch'")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build to a private name, then rename: concurrent processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise NativeKernelError(f"building the native decode step with {compiler} failed:\n"
                                        f"{done.stderr.strip()[-2000:]}\nuse kernel='torch' to decode without it")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    if not lib.wl_cpu_supported():
        raise NativeKernelError("this CPU lacks AVX2/FMA, which the native decode step needs; use kernel='torch'")
    lib.wl_scratch_floats.restype = ctypes.c_int64
    lib.wl_scratch_floats.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    lib.wl_step.restype = ctypes.c_int
    lib.wl_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def library() -> ctypes.CDLL:
    """The loaded native library, built on first use; raises NativeKernelError when it cannot be."""
    global _library, _unavailable
    with _lock:
        if _library is None and _unavailable is None:
            try:
                _library = _build()
            except (NativeKernelError, OSError) as err:
                _unavailable = str(err)
        if _library is None:
            raise NativeKernelError(_unavailable)
        return _library


def available() -> bool:
    """Whether the native step builds and runs on this machine."""
    try:
        library()
        return True
    except NativeKernelError:
        return False


KERNEL_ENV = "WALLAROO_DECODE_KERNEL"  # the default for every front door (ComfyUI, SDK, CLI, demo): auto if unset


def check_kernel(kernel: str | None) -> str:
    """Validate a kernel choice (None: $WALLAROO_DECODE_KERNEL or auto); 'native' fails here, early, when it
    cannot run."""
    if kernel is None:
        kernel = os.environ.get(KERNEL_ENV) or "auto"
        if kernel not in KERNELS:
            raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "native":
        library()
    return kernel


class _Model(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int32), ("heads", ctypes.c_int32), ("kv_heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("intermediate", ctypes.c_int32), ("layers", ctypes.c_int32),
                ("eps", ctypes.c_float)] + [
        (name, ctypes.c_void_p) for name in ("input_norm", "qkv_panels", "qkv_bias", "o_panels", "post_norm",
                                             "gate_up_panels", "down_panels", "final_norm")]


def _panels(w_t: torch.Tensor) -> torch.Tensor:
    """(K, N) -> (N / 16, K, 16): each 16-column panel contiguous, so a product streams the matrix once."""
    k, n = w_t.shape
    return w_t.reshape(k, n // 16, 16).transpose(0, 1).contiguous()


class NativeLLM:
    """The LLM's decode weights laid out for the C step (panels), with the struct pointing at them."""

    def __init__(self, weights):
        lib = library()
        layers = weights.layers
        keep: list[torch.Tensor] = []

        def ptrs(tensors: list[torch.Tensor]) -> ctypes.Array:
            keep.extend(tensors)
            return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(torch.float32).contiguous()

        self._arrays = dict(
            input_norm=ptrs([f32(l.input_norm.weight) for l in layers]),
            qkv_panels=ptrs([_panels(l.qkv_t) for l in layers]),
            qkv_bias=ptrs([f32(l.qkv_b) for l in layers]),
            o_panels=ptrs([_panels(l.o_t) for l in layers]),
            post_norm=ptrs([f32(l.post_norm.weight) for l in layers]),
            gate_up_panels=ptrs([_panels(l.gate_up_t) for l in layers]),
            down_panels=ptrs([_panels(l.down_t) for l in layers]))
        final = f32(weights.final_norm.weight)
        keep.append(final)
        self._keep = keep
        self.struct = _Model(weights.layers[0].qkv_t.shape[0], weights.num_heads, weights.num_kv_heads,
                             weights.head_dim, weights.intermediate, len(layers), weights.eps,
                             *[ctypes.cast(a, ctypes.c_void_p) for a in self._arrays.values()], final.data_ptr())
        self.dim = self.struct.dim
        self.lib = lib

    def scratch_floats(self, rows: int, max_len: int) -> int:
        return int(self.lib.wl_scratch_floats(ctypes.byref(self.struct), rows, max_len))


def applies(weights, batch: int, n_max: int = 2) -> str | None:
    """Why the native step cannot serve these decode weights and batch (None when it can)."""
    if not weights.packed:
        return "the decode weights are not packed (a GPU model, or too large to copy on the CPU)"
    t = weights.layers[0].qkv_t
    if t.dtype != torch.float32 or t.device.type != "cpu":
        return f"the native step needs float32 weights on the CPU, the model has {t.dtype} on {t.device.type}"
    if batch * n_max > MAX_ROWS:
        return f"batch {batch} x {n_max} new positions exceeds the native step's {MAX_ROWS} rows"
    dim, qkv, inter = t.shape[0], t.shape[1], weights.intermediate
    if weights.head_dim % 8 or dim % 16 or qkv % 16 or inter % 8:
        return "the model's widths are not multiples of the native step's 16-column panels"
    return None


def unavailable_reason(weights, batch: int) -> str | None:
    """Why the native step cannot decode this batch here: the model, the batch or the build (None: it can)."""
    reason = applies(weights, batch)
    if reason is None:
        try:
            library()
        except NativeKernelError as err:
            reason = str(err)
    return reason


def native_llm(weights) -> NativeLLM:
    """The NativeLLM of a DecodeWeights, built once (DecodeWeights itself is rebuilt when weights change)."""
    built = getattr(weights, "_native_llm", None)
    if built is None:
        built = NativeLLM(weights)
        weights._native_llm = built
    return built


class NativeRun:
    """One decode run's buffers for the C step: the KV cache's pointers, scratch memory and the output rows.
    The caller (`decode._NativeSteps`) keeps the cache's length, as every step kind does."""

    def __init__(self, llm: NativeLLM, cache, batch: int, max_len: int):
        if cache.k[0].dtype != torch.float32 or not cache.k[0].is_contiguous():
            raise NativeKernelError("the native step needs a contiguous float32 KV cache")
        self.llm, self._valid, self._max_len = llm, cache.valid, max_len
        self._k = (ctypes.c_void_p * len(cache.k))(*[t.data_ptr() for t in cache.k])
        self._v = (ctypes.c_void_p * len(cache.v))(*[t.data_ptr() for t in cache.v])
        self._scratch = torch.empty(llm.scratch_floats(batch * 2, max_len), dtype=torch.float32)
        self._out = torch.empty(batch, llm.dim, dtype=torch.float32)
        self._model = ctypes.byref(llm.struct)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        """Feed x (B, n, D) at positions start.. (rotary cos / signed sin (B, n, hd)); last hidden (B, D)."""
        b, n, _ = x.shape
        if not x.is_contiguous() or cos.stride(2) != 1 or cos.stride(1) != cos.shape[2] or cos.stride() != sin.stride():
            raise NativeKernelError("the native step needs contiguous inputs and rotary rows")
        rc = self.llm.lib.wl_step(self._model, x.data_ptr(), b, n, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                                  self._k, self._v, self._valid.data_ptr(), start, self._max_len,
                                  self._scratch.data_ptr(), self._out.data_ptr())
        if rc != 0:
            raise NativeKernelError(f"the native step rejected a batch of {b} x {n} positions at {start}")
        return self._out
