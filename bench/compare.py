"""Decoding speed, ours against a transformers baseline, in one process on the same weights.

    python -m bench --config tiny --threads 1                   # CPU, the bundled tiny model's architecture
    python -m bench --model wallaroo_nodes/models/tiny          # a converted model folder
    python -m bench --config 7b --device cuda --dtype bf16 --size 512x512 --compile both --new-tokens 256

For each task (generate with CFG, generate without CFG, edit, understand) every engine runs the same public
`Pipeline` call with the same seed; only the decoding loop differs:

  ours           wallaroo_nodes.engine.decode (static KV cache, heads on the last position, batched CFG)
  ours-compiled  the same loop with its decode step through torch.compile (CUDA graphs on GPU): --compile
  ours-torch-step  the same loop with the PyTorch decode step where "ours" uses the native C step
                 (wallaroo_nodes/engine/native.py): --kernel both
  transformers   Qwen2_5_VLForConditionalGeneration sharing our tensors, called per position the way the
                 reference calls it (DynamicCache, output_hidden_states=True): bench/hf_baseline.py

Columns:
  steps     sequence positions decoded: image codes plus end-of-line tokens (1,055 for 512x512), or answer
            tokens after the first; the same count for every engine
  steps/s   steps / decode seconds (after the prefill)
  s/image   wall seconds per image (or per answer): prompt preparation, prefill, decode and VQ decode;
            "~" marks an estimate where --steps/--baseline-steps capped the decode (the rest extrapolated)
  rss MB    peak resident memory during the run (the high-water mark is reset before each run on Linux)
  vram MB   peak torch.cuda allocated memory during the run (CUDA only)
  codes     whether the engine produced exactly ours' codes/tokens for the same seed
Seconds are the best of --repeats runs (or their median: --stat median) after an untimed warm-up (every task
and engine at least once; on the CPU repeated for --warmup seconds); engines alternate run by run, so that a
change of load on the machine hits all of them.
The last line is `speedup generate+cfg vs transformers baseline: N.NNx` (ratio of steps/s).
"""
from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wallaroo_nodes import bench as engine_bench
from wallaroo_nodes.engine import decode as decode_module
from wallaroo_nodes.engine import native
from wallaroo_nodes.engine.step import decode_weights
from wallaroo_nodes.engine import images
from wallaroo_nodes.engine import pipeline as pipeline_module
from wallaroo_nodes.engine.attention import BACKENDS
from wallaroo_nodes.engine.decode import Cancelled
from wallaroo_nodes.engine.pipeline import Pipeline
from wallaroo_nodes.engine.weights import load_model, pick_device, pick_dtype

TASKS = ("generate", "generate-nocfg", "edit", "understand")
CONFIGS = ("tiny", "tiny-test", "mid", "7b")
BASELINE = "transformers"
SPEEDUP_LINE = "speedup generate+cfg vs transformers baseline: "


# --- memory -------------------------------------------------------------------------------------------

def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_mb() is not None
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    hwm = _vm_hwm_mb()
    return hwm if hwm is not None else engine_bench.peak_rss_mb()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- engines ------------------------------------------------------------------------------------------

class Engine:
    """One decoding implementation behind the Pipeline: `image` and `text` have the engine decode signatures."""

    name = "?"

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe

    def image(self, model, prep, **kw):
        return decode_module.decode_image_codes(model, prep, **kw)

    def text(self, model, prep, **kw):
        return decode_module.decode_text(model, prep, **kw)


class Ours(Engine):
    name = "ours"


class OursCompiled(Engine):
    name = "ours-compiled"


class OursTorchStep(Engine):
    name = "ours-torch-step"


class Transformers(Engine):
    name = BASELINE

    def __init__(self, pipe: Pipeline, hf):
        super().__init__(pipe)
        self.hf = hf

    def image(self, model, prep, **kw):
        from . import hf_baseline

        return hf_baseline.decode_image_codes(self.hf, model, prep, **kw)

    def text(self, model, prep, **kw):
        from . import hf_baseline

        return hf_baseline.decode_text(self.hf, model, prep, **kw)


# --- one measured run -----------------------------------------------------------------------------------

@dataclass
class Run:
    engine: str
    task: str
    shape: str
    batch: int
    steps: int
    prepare: float
    prefill: float
    decode: float
    vq: float | None
    total: float
    per_item: float
    estimated: bool
    rss_mb: float | None
    vram_mb: float | None
    output: list = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.decode if self.decode > 0 else float("nan")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


class _Clock:
    """Timestamps of the decode loop (start, end of the prefill, end) and of the VQ decode.

    `wall` is elapsed time; `cpu` is this thread's CPU time (with --threads 1 all of the work on a CPU), which
    leaves out the time other processes hold the cores: on a shared, loaded machine it is the steadier measure.
    """

    source = time.perf_counter

    def __init__(self, device: torch.device):
        self.device = device
        self.loop_start = self.prefill_end = self.loop_end = None
        self.vq = None

    def now(self) -> float:
        _sync(self.device)
        return self.source()


@contextmanager
def _patched(obj, name: str, value):
    real = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield real
    finally:
        setattr(obj, name, real)


@contextmanager
def _instrument(engine: Engine, clock: _Clock, cap_rows: int | None, outputs: list):
    """Route the Pipeline's decode loops through `engine`, timing the loop, its prefill and the VQ decode."""
    pipe = engine.pipe

    def on_prefill():
        if clock.prefill_end is None:
            clock.prefill_end = clock.now()

    def timed_prefill(*args, **kwargs):
        out = real_prefill(*args, **kwargs)
        on_prefill()
        return out

    def image_loop(model, prep, **kw):
        rows_done = []
        user_row = kw.pop("on_row", None)

        def on_row(done, codes):
            rows_done.append(done)
            if user_row is not None:
                user_row(done, codes)

        kw["on_row"] = on_row
        if cap_rows is not None:
            kw["should_cancel"] = lambda: len(rows_done) >= cap_rows
        if isinstance(engine, Transformers):
            kw["on_prefill"] = on_prefill
        clock.loop_start = clock.now()
        try:
            codes = engine.image(model, prep, **kw)
        except Cancelled:
            # Capped: decode a full grid of codes anyway so that the VQ decode is timed at its real size.
            codes = torch.zeros(prep.embeds.shape[0] // (2 if kw["cfg_scale"] != 1.0 else 1), kw["rows"],
                                kw["cols"], dtype=torch.long, device=prep.embeds.device)
        clock.loop_end = clock.now()
        clock.rows_done = len(rows_done)
        outputs.append(codes.cpu())
        return codes

    def text_loop(model, prep, **kw):
        kw["stop_ids"] = set()  # exactly --new-tokens tokens, whatever the weights say
        if isinstance(engine, Transformers):
            kw["on_prefill"] = on_prefill
        clock.loop_start = clock.now()
        for tid in engine.text(model, prep, **kw):
            outputs.append(tid)
            yield tid
        clock.loop_end = clock.now()

    def timed_vq(codes):
        t = clock.now()
        out = real_vq(codes)
        clock.vq = clock.now() - t
        return out

    with _patched(decode_module, "_prefill", timed_prefill) as real_prefill, \
            _patched(pipeline_module, "decode_image_codes", image_loop), \
            _patched(pipeline_module, "decode_text", text_loop), \
            _patched(pipe, "_decode_codes", timed_vq) as real_vq:
        yield


def _reset_vram(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _vram_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def run_task(engine: Engine, task: str, size: tuple[int, int], *, n: int, cfg: float, new_tokens: int,
             seed: int, cap_steps: int | None) -> Run:
    """One call of the task through the Pipeline with `engine` decoding; returns its measurements."""
    pipe = engine.pipe
    device = pipe.model.device
    ds = pipe.config.vq.downsample
    rows, cols = size[0] // ds, size[1] // ds
    cap_rows = None
    if cap_steps is not None and task != "understand":
        cap_rows = max(1, min(rows, math.ceil(cap_steps / (cols + 1))))
    clock = _Clock(device)
    outputs: list = []
    image = engine_bench.source_image(size)
    _reset_vram(device)
    reset_peak_rss()
    with _instrument(engine, clock, cap_rows, outputs):
        t0 = clock.now()
        if task == "understand":
            text = "".join(pipe.understand_stream(image, engine_bench.QUESTION, max_new_tokens=new_tokens, seed=seed))
            del text
        elif task == "edit":
            pipe.edit(image, engine_bench.EDIT, cfg=cfg, seed=seed, n=n)
        else:
            pipe.generate(engine_bench.PROMPT, size=size, cfg=cfg if task == "generate" else 1.0, seed=seed, n=n)
        t_end = clock.now()
    rss, vram = peak_rss_mb(), _vram_mb(device)
    prepare = clock.loop_start - t0
    prefill = clock.prefill_end - clock.loop_start
    decode = clock.loop_end - clock.prefill_end
    total = t_end - t0
    if task == "understand":
        steps, items, batch, estimated = len(outputs) - 1, 1, 1, False
        shape = f"{new_tokens} tok"
    else:
        guided = (cfg if task != "generate-nocfg" else 1.0) != 1.0
        batch, items = n * (2 if guided else 1), n
        steps = rows * cols + rows - 1
        shape = f"{size[0]}x{size[1]} n={n}"
        estimated = clock.rows_done < rows
        if estimated:
            done = clock.rows_done * (cols + 1)
            extra = decode * (steps / done - 1)
            decode += extra
            total += extra
    return Run(engine.name, task, shape, batch, steps, prepare, prefill, decode, clock.vq, total, total / items,
               estimated, rss, vram, outputs)


def best_run(runs: list[Run], stat: str = "min") -> Run:
    """Per-field best (minimum) or median of repeated runs' seconds; peak memory: the maximum."""
    first = runs[0]
    pick = min if stat == "min" else statistics.median

    def med(attr):
        values = [getattr(r, attr) for r in runs]
        return None if any(v is None for v in values) else pick(values)

    def top(attr):
        values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
        return max(values) if values else None

    return Run(first.engine, first.task, first.shape, first.batch, first.steps, med("prepare"), med("prefill"),
               med("decode"), med("vq"), med("total"), med("per_item"), first.estimated, top("rss_mb"),
               top("vram_mb"), first.output)


# --- output ---------------------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v != v:
        return "nan"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def results_table(results: list[Run], reference: dict[str, list]) -> str:
    head = ["task", "engine", "shape", "batch", "steps", "steps/s", "s/image", "prefill s", "vq s", "rss MB",
            "vram MB", "codes"]
    rows = []
    for r in results:
        ref = reference.get(r.task)
        same = "-" if r.engine == "ours" or ref is None else ("same" if _same(ref, r.output) else "differ")
        rows.append([r.task, r.engine, r.shape, str(r.batch), str(r.steps), _fmt(r.steps_per_s, 1),
                     ("~" if r.estimated else "") + _fmt(r.per_item), _fmt(r.prefill), _fmt(r.vq),
                     _fmt(r.rss_mb, 0), _fmt(r.vram_mb, 0), same])
    return _table(head, rows)


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def ratio_table(results: list[Run], ours_name: str) -> tuple[str, float | None]:
    """ours/baseline per task; returns the table and the generate+cfg steps/s ratio."""
    by = {(r.engine, r.task): r for r in results}
    rows, speedup = [], None
    for task in TASKS:
        ours, base = by.get((ours_name, task)), by.get((BASELINE, task))
        if ours is None or base is None:
            continue
        steps_ratio = ours.steps_per_s / base.steps_per_s
        rows.append([task, ours_name, BASELINE, f"{steps_ratio:.2f}x", f"{base.per_item / ours.per_item:.2f}x"])
        if task == "generate":
            speedup = steps_ratio
    return _table(["task", "ours", "baseline", "steps/s ours/baseline", "s/image baseline/ours"], rows), speedup


# --- main -----------------------------------------------------------------------------------------------

def build(args, workdir: Path):
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.model is not None:
        model, tok = load_model(args.model, dtype=dtype, device=device, attention=args.attention)
        what = str(args.model)
    else:
        if args.config == "7b" and device.type != "cuda":
            print("warning: a random 7B on the CPU needs ~17-33 GB of RAM and is very slow", file=sys.stderr)
        model, tok = engine_bench.build_random(args.config, device, dtype, args.attention, workdir)
        what = f"{args.config} (random weights)"
    return model, tok, what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="a converted Wallaroo model folder")
    src.add_argument("--config", choices=CONFIGS, help="a named architecture with random weights (default tiny)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    ap.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--attention", default="sdpa", choices=BACKENDS, help="our attention backend (default sdpa, "
                    "the baseline's too)")
    ap.add_argument("--size", type=engine_bench.parse_size, help="image size HxW (default: the model's default)")
    ap.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    ap.add_argument("--cfg", type=float,
                    help="guidance scale of generate/edit (default: the model's; 2.0 if that is 1)")
    ap.add_argument("--new-tokens", type=int, default=48, help="understand: answer length in tokens (default 48)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine and task (default 3)")
    ap.add_argument("--stat", choices=("min", "median"), default="min",
                    help="how repeated runs combine: min (best of N, robust to other load on the machine; "
                         "default) or median")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off",
                    help="ours through the compiled decode step: off, on (instead of plain), both (default off)")
    ap.add_argument("--kernel", choices=("auto", "native", "torch", "both"), default="auto",
                    help="ours' eager decode step: auto (native C step where it applies, the default), native, "
                         "torch, or both (ours = native, plus ours-torch-step)")
    ap.add_argument("--compile-mode", help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    ap.add_argument("--steps", type=int, help="cap our image decodes at about this many steps (whole rows)")
    ap.add_argument("--baseline-steps", type=int,
                    help="cap the baseline's image decodes at about this many steps (whole rows; the rest is "
                         "extrapolated, marked ~)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall: elapsed seconds (default); cpu: the main thread's CPU seconds, steadier on a shared "
                         "machine (CPU runs with --threads 1 only)")
    ap.add_argument("--warmup", type=float, help="untimed warm-up: repeat all tasks until this many seconds have "
                    "passed (default 10 on CPU, 0 on GPU: one run of each task and engine either way)")
    ap.add_argument("--no-baseline", action="store_true", help="measure ours only (no transformers needed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.model is None and args.config is None:
        args.config = "tiny"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    for name in ("repeats", "n", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    _Clock.source = staticmethod(CLOCKS[args.clock])

    hf = None
    baseline_note = None  # why there is no baseline
    baseline_missing = False  # ... because transformers is not installed
    if not args.no_baseline:
        from .hf_baseline import BaselineUnavailable, require_transformers

        try:
            require_transformers()
        except BaselineUnavailable as exc:
            baseline_note, baseline_missing = str(exc), True
            print(f"error: {exc}\n(or run with --no-baseline to measure ours alone)", file=sys.stderr)

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, what = build(args, Path(tmp))
    device = model.device
    _sync(device)
    load_s = time.perf_counter() - t
    plain = Pipeline(model, tok, kernel="auto")  # explicit: $WALLAROO_DECODE_KERNEL must not change the engines
    try:
        size = images.check_size(args.size, plain.sizes) if args.size else tuple(plain.config.protocol.default_size)
    except ValueError as exc:
        ap.error(str(exc))
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        ap.error("--clock cpu measures one thread's CPU time: use it on the CPU with --threads 1")
    c = plain.config
    cfg = args.cfg if args.cfg is not None else (c.sampling.generate_cfg if c.sampling.generate_cfg != 1.0 else 2.0)
    if "edit" in tasks and not c.has_edit:
        tasks.remove("edit")
        print("note: this model has no editing heads; skipping edit", file=sys.stderr)

    engines: list[Engine] = []
    if args.compile in ("off", "both"):
        kernel = "native" if args.kernel == "both" else args.kernel
        try:
            engines.append(Ours(plain if kernel == "auto" else Pipeline(model, tok, kernel=kernel)))
        except native.NativeKernelError as exc:
            ap.error(str(exc))
        if args.kernel == "both":
            engines.append(OursTorchStep(Pipeline(model, tok, kernel="torch")))
    if args.compile in ("on", "both"):
        engines.append(OursCompiled(Pipeline(model, tok, compile=True, compile_mode=args.compile_mode)))
    if baseline_note is None and not args.no_baseline:
        from .hf_baseline import build_hf_twin

        try:
            hf = build_hf_twin(model)
            engines.append(Transformers(plain, hf))
        except Exception as exc:  # a transformers version this code does not know: measure ours anyway
            baseline_note = f"the transformers baseline could not be built: {type(exc).__name__}: {exc}"
            print(f"error: {baseline_note}", file=sys.stderr)

    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    versions = f"torch {torch.__version__}"
    if hf is not None:
        import transformers

        versions += f", transformers {transformers.__version__}"
    print(f"model: {what}; {params / 1e6:.1f}M parameters; {model.dtype} on {device} ({where}); "
          f"attention {model.attention_backend}; load {load_s:.2f} s; {versions}")
    why_not = native.unavailable_reason(decode_weights(model), 2 * args.n)
    print(f"ours' eager decode step (--kernel {args.kernel}): " + (
        "native C where it applies" if args.kernel in ("auto", "native", "both") and why_not is None
        else "PyTorch" + (f" (native not used: {why_not})" if args.kernel != "torch" and why_not else "")))
    print(f"llm: hidden {c.llm.hidden_size}, {c.llm.num_layers} layers, vocab {c.llm.vocab_size}; "
          f"size {size[0]}x{size[1]} ({size[0] // c.vq.downsample}x{size[1] // c.vq.downsample} codes); "
          f"cfg {cfg}; answer {args.new_tokens} tokens; {args.stat} of {args.repeats} runs, {args.clock} clock; "
          f"rss reset per run: {'yes' if reset_peak_rss() else 'no (process peak)'}", flush=True)

    common = dict(n=args.n, cfg=cfg, new_tokens=args.new_tokens, seed=args.seed)
    def cap_of(e: Engine) -> int | None:
        return args.baseline_steps if isinstance(e, Transformers) else args.steps

    failed: dict[str, str] = {}

    def attempt(e: Engine, task: str) -> Run | None:
        """One run; an engine that fails is reported and dropped, so that the others are still measured."""
        if e.name in failed:
            return None
        try:
            return run_task(e, task, size, cap_steps=cap_of(e), **common)
        except Exception as exc:
            failed[e.name] = f"{task}: {type(exc).__name__}: {exc}"
            print(f"error: {e.name} failed on {failed[e.name]}", file=sys.stderr, flush=True)
            return None

    # Untimed warm-up: every engine runs every task (kernels, allocator, compilation), and on the CPU the cycle
    # repeats until --warmup seconds have passed (the first seconds of a process run measurably slower there).
    warmup_s = args.warmup if args.warmup is not None else (0 if device.type == "cuda" else 10)
    warm_until = time.perf_counter() + warmup_s
    while True:
        for task in tasks:
            for e in engines:
                t = time.perf_counter()
                attempt(e, task)
                if device.type == "cuda":
                    print(f"  warm-up {task} {e.name}: {time.perf_counter() - t:.1f} s", flush=True)
        if time.perf_counter() >= warm_until:
            break

    results: list[Run] = []
    for task in tasks:
        runs: dict[str, list[Run]] = {e.name: [] for e in engines}
        for _ in range(args.repeats):  # engines interleaved, so that a load change hits all of them
            for e in engines:
                run = attempt(e, task)
                if run is not None:
                    runs[e.name].append(run)
        for e in engines:
            if runs[e.name]:
                best = best_run(runs[e.name], args.stat)
                results.append(best)
                print(f"  measured {task} {e.name}: {best.steps_per_s:.1f} steps/s, {'~' if best.estimated else ''}"
                      f"{best.per_item:.3f} s/image, rss {_fmt(best.rss_mb, 0)} MB, vram {_fmt(best.vram_mb, 0)} MB",
                      flush=True)
    if not results:
        print("error: no engine produced a measurement", file=sys.stderr)
        return 1
    engines = [e for e in engines if any(r.engine == e.name for r in results)]
    reference = {r.task: r.output for r in results if r.engine == engines[0].name}
    print(results_table(results, reference))
    compiled_engine = next((e for e in engines if isinstance(e, OursCompiled)), None)
    if compiled_engine is not None:
        from torch._dynamo.utils import counters

        print(f"compiled graphs: {counters['stats'].get('unique_graphs', 0)} "
              f"(mode {compiled_engine.pipe._compiled.mode})")
    for name, why in failed.items():
        print(f"failed: {name} ({why})")

    ours_names = [e.name for e in engines if not isinstance(e, Transformers)]
    if not any(isinstance(e, Transformers) for e in engines) or not ours_names:
        if baseline_missing:
            note = "n/a (transformers not installed)"
        elif baseline_note or BASELINE in failed:
            note = "n/a (the baseline failed)"
        elif args.no_baseline:
            note = "n/a (--no-baseline)"
        else:
            note = "n/a (an engine failed)"
        print(SPEEDUP_LINE + note)
        return 1 if (baseline_note or failed) else 0
    by = {(r.engine, r.task): r for r in results}
    best = ours_names[0]
    if len(ours_names) > 1 and ("generate" in tasks):
        best = max((n for n in ours_names if (n, "generate") in by), key=lambda n: by[(n, "generate")].steps_per_s,
                   default=ours_names[0])
    text, speedup = ratio_table(results, best)
    print(text)
    print(SPEEDUP_LINE + (f"{speedup:.2f}x" if speedup is not None else "n/a (generate not measured)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
