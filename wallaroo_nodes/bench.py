"""Throughput benchmark of the engine: `python -m wallaroo_nodes.bench --config tiny-test` (prints a table).

Measures, per task (generate with and without CFG, edit, understand):
  prepare  seconds before the LLM prefill (prompt building, vision tower, VQ encoder, embeddings)
  prefill  seconds of the LLM prefill over the prompt batch
  steps/s  decode forwards per second after the prefill (one forward = one image code, or one text token)
  s/item   wall seconds per image (or per answer), VQ decode included; "~" marks an estimate when --steps
           capped the decode (the remaining steps are extrapolated at the measured rate)
  vq       seconds of the VQ decode of the finished codes
  rss      process peak resident memory so far (getrusage; monotonic across tasks)
  gpu      torch.cuda.max_memory_allocated during the task (CUDA only)

Models: `--model PATH` (a converted model folder) or `--config NAME` with random weights. The random 7B is
built on the meta device and materialised with `to_empty` on the target device in the requested dtype, so it
never occupies CPU RAM; it only makes sense on a GPU. Timings synchronise CUDA around every measured span.
Only the engine's own dependencies are used.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .engine import decode as decode_module
from .engine import images
from .engine.attention import BACKENDS, resolve_backend
from .engine.config import (LLMConfig, ProtocolConfig, SamplingDefaults, VisionConfig, VQConfig,
                            WallarooConfig)
from .engine.decode import Cancelled, decode_text
from .engine.model import WallarooModel
from .engine.pipeline import Pipeline
from .engine.protocol import build_understand
from .engine.sampling import SamplingParams
from .engine.text import TextTokenizer
from .engine.weights import (OFFICIAL_INDICATOR_SIDES, add_wallaroo_tokens, load_model, pick_device,
                             pick_dtype)

TASKS = ("generate", "generate-nocfg", "edit", "understand")
CONFIGS = ("tiny-test", "tiny", "mid", "7b")
PROMPT = "a red circle on the left and a blue square on the right, white background"
EDIT = "make the circle green"
QUESTION = "Describe this image in detail."

_CORPUS = [
    "You are a helpful assistant.",
    'Generate an image with resolution 512x512 based on the prompt: "a red circle on the left"',
    'Edit the input image based on the text prompt: "make it blue", and generate a new image with a resolution of 512x512.',
    "What shape is in the picture? A small green triangle in the centre, on a white background.",
    "Describe this image in detail. The picture shows a red circle on the left and a blue square on the right.",
    "生成一幅图像，分辨率为512x512，基于文本提示：“左边有一个红色的圆形”",
    "根据输入图片，并结合文本提示：“把它变成蓝色”，对图片进行编辑，生成一幅512x512的图像",
]


# --- models with random weights ------------------------------------------------------------------

def _tokenizer(folder: Path, sides) -> tuple[Path, dict[str, int]]:
    """A small byte-level BPE with Qwen's special tokens and Wallaroo's added tokens (stand-in tokenizer)."""
    from .train.tokenizer import train_byte_level_bpe

    base = train_byte_level_bpe(_CORPUS * 4, 600, folder / "base_tokenizer.json")
    table = add_wallaroo_tokens(base, folder / "tokenizer.json", indicator_sides=sides)
    return folder / "tokenizer.json", table


def random_config(name: str, tokens: dict[str, int]) -> WallarooConfig:
    """A named config; the tokens table comes from the stand-in tokenizer."""
    if name == "tiny-test":  # as tests/helpers.py tiny_config
        cfg = WallarooConfig(
            name="bench-tiny-test",
            llm=LLMConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, mrope_section=(2, 3, 3), rope_theta=10000.0),
            vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                                fullatt_block_indexes=(1,), min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64,
                                edit_min_pixels=28 * 28 * 4, edit_max_pixels=28 * 28 * 16),
            vq=VQConfig(codebook_size=64, codebook_embed_dim=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                        z_channels=32, norm_groups=8),
            protocol=ProtocolConfig(sizes=[(32, 32), (32, 48), (48, 32)], default_size=(32, 32)),
            sampling=SamplingDefaults(generate_cfg=2.0, generate_top_k=0, edit_cfg=2.0, edit_top_k=0),
            tokens=tokens, weights_dtype="float32")
    elif name == "tiny":  # the bundled trained tiny model's architecture (wallaroo_nodes/train/recipe.py)
        from .engine.cache import bundled_models
        from .train.recipe import tiny_model_config

        # The bundle's own vocabulary (its tokenizer, rounded up to a multiple of 64 by the recipe), read from
        # its config so a retrained bundle needs no edit here.
        vocab = WallarooConfig.load(bundled_models()["tiny"] / "config.json").llm.vocab_size
        cfg = replace(tiny_model_config(tokens, vocab), name="bench-tiny")
    elif name == "mid":  # a CPU-sized model with the official protocol, sizes and codebook
        cfg = WallarooConfig(
            name="bench-mid",
            llm=LLMConfig(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                          num_kv_heads=2, mrope_section=(8, 12, 12)),
            vision=VisionConfig(depth=4, hidden_size=256, num_heads=4, intermediate_size=512, out_hidden_size=512,
                                fullatt_block_indexes=(3,)),
            vq=VQConfig(ch=32, num_res_blocks=1, z_channels=64, norm_groups=16),
            tokens=tokens, weights_dtype="float32")
    elif name == "7b":  # the official architecture
        cfg = WallarooConfig(name="bench-7b", tokens=tokens)
    else:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    cfg.validate()
    return cfg


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """In-place random weights that keep activations O(1): norms 1, biases 0, weights N(0, 1/fan_in)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" and p.dim() == 1:  # RMSNorm / GroupNorm / LayerNorm scales
            p.fill_(1.0)
        elif leaf == "bias":
            p.zero_()
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
    cb = model.vq.quantize.embedding.weight
    cb.copy_(torch.nn.functional.normalize(cb.float(), dim=-1).to(cb.dtype))
    return model


def build_random(name: str, device: torch.device, dtype: torch.dtype, attention: str,
                 workdir: Path) -> tuple[WallarooModel, TextTokenizer]:
    sides = {"tiny-test": (32, 48), "tiny": (48, 64, 80)}.get(name, OFFICIAL_INDICATOR_SIDES)
    tok_path, tokens = _tokenizer(workdir, sides)
    cfg = random_config(name, tokens)
    with torch.device("meta"):
        model = WallarooModel(cfg)
    # Cast on meta (free), then allocate directly on the device in that dtype.
    model = model.to(dtype).to_empty(device=device)
    random_init_(model)
    model.set_attention_backend(resolve_backend(attention, device))
    model.eval().requires_grad_(False)
    return model, TextTokenizer(tok_path, cfg.tokens)


# --- measuring -------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KiB on Linux


@dataclass
class Result:
    task: str
    shape: str
    batch: int
    prepare: float
    prefill: float
    steps: int
    decode: float
    per_item: float
    estimated: bool
    vq: float | None
    rss_mb: float | None
    gpu_mb: float | None

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.decode if self.decode > 0 else float("nan")


class Probe:
    """Timestamps of the prefill (wrapping decode._prefill) with CUDA synchronisation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prefill_start = self.prefill_end = None

    @contextmanager
    def installed(self):
        real = decode_module._prefill

        def timed(*args, **kwargs):
            _sync(self.device)
            self.prefill_start = time.perf_counter()
            out = real(*args, **kwargs)
            _sync(self.device)
            self.prefill_end = time.perf_counter()
            return out

        decode_module._prefill = timed
        try:
            yield self
        finally:
            decode_module._prefill = real


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def source_image(size: tuple[int, int]) -> Image.Image:
    """A deterministic picture of exactly the target size (so the edit keeps that size)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x + y) % 256)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def bench_image(pipe: Pipeline, task: str, size: tuple[int, int], steps_cap: int | None, n: int,
                seed: int) -> Result:
    device = pipe.model.device
    ds = pipe.config.vq.downsample
    rows, cols = size[0] // ds, size[1] // ds
    total_steps = rows * cols - 1  # forwards after the prefill (nothing is fed after the last code)
    cap_rows = rows if steps_cap is None else max(1, min(rows, math.ceil(steps_cap / cols)))
    if task == "edit":
        batch = n * (2 if pipe.config.sampling.edit_cfg != 1.0 else 1)
    else:
        cfg = None if task == "generate" else 1.0
        batch = n * (2 if (pipe.config.sampling.generate_cfg if cfg is None else cfg) != 1.0 else 1)
    row_times: list[float] = []

    def on_row(progress) -> None:
        _sync(device)
        row_times.append(time.perf_counter())

    def should_cancel() -> bool:
        return len(row_times) >= cap_rows

    probe = Probe(device)
    _reset_gpu_peak(device)
    vq_time = None
    with probe.installed(), _vq_timer(pipe) as vq:
        _sync(device)
        t0 = time.perf_counter()
        try:
            if task == "edit":
                pipe.edit(source_image(size), EDIT, seed=seed, n=n, on_row=on_row, should_cancel=should_cancel)
            else:
                pipe.generate(PROMPT, size=size, cfg=cfg, seed=seed, n=n, on_row=on_row,
                              should_cancel=should_cancel)
            finished = True
        except Cancelled:
            finished = False
        _sync(device)
        t_end = time.perf_counter()
        vq_time = vq.seconds
    if not finished:
        # The decode stopped early: time the VQ decode of a full grid on its own.
        codes = torch.zeros(n, rows, cols, dtype=torch.long, device=device)
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            pipe.model.vq.decode_codes(codes)
        _sync(device)
        vq_time = time.perf_counter() - t
    done_rows = len(row_times)
    steps = done_rows * cols - (1 if finished else 0)
    decode = row_times[-1] - probe.prefill_end
    prepare = probe.prefill_start - t0
    prefill = probe.prefill_end - probe.prefill_start
    if finished:
        wall = t_end - t0
    else:
        wall = prepare + prefill + decode * total_steps / max(1, steps) + (vq_time or 0.0)
    return Result(task, f"{size[0]}x{size[1]} n={n}", batch, prepare, prefill, steps, decode, wall / n,
                  not finished, vq_time, peak_rss_mb(), _gpu_peak(device))


@contextmanager
def _vq_timer(pipe: Pipeline):
    """Time Pipeline._decode_codes (the final VQ decode; previews are not requested here)."""

    class Box:
        seconds = None

    box = Box()
    real = pipe._decode_codes
    device = pipe.model.device

    def timed(codes):
        _sync(device)
        t = time.perf_counter()
        out = real(codes)
        _sync(device)
        box.seconds = time.perf_counter() - t
        return out

    pipe._decode_codes = timed
    try:
        yield box
    finally:
        del pipe._decode_codes


def bench_understand(pipe: Pipeline, size: tuple[int, int], new_tokens: int, seed: int) -> Result:
    """Answer exactly new_tokens tokens (no stop token) about an image of `size`."""
    device = pipe.model.device
    probe = Probe(device)
    _reset_gpu_peak(device)
    with probe.installed():
        _sync(device)
        t0 = time.perf_counter()
        feats, grid = pipe._vision(source_image(size))
        prompt = build_understand(pipe.tokenizer, pipe.config, QUESTION, grid)
        prep = pipe._prepare([prompt], [feats], [None])
        g = torch.Generator(device=device).manual_seed(seed)
        params = SamplingParams(temperature=pipe.config.sampling.understand_temperature,
                                top_k=pipe.config.sampling.understand_top_k,
                                top_p=pipe.config.sampling.understand_top_p)
        count = sum(1 for _ in decode_text(pipe.model, prep, max_new_tokens=new_tokens, params=params,
                                           generator=g, stop_ids=set()))
        _sync(device)
        t_end = time.perf_counter()
    steps = count - 1  # the first token comes from the prefill
    return Result("understand", f"{len(prompt)}+{count} tok", 1, probe.prefill_start - t0,
                  probe.prefill_end - probe.prefill_start, steps, t_end - probe.prefill_end, t_end - t0, False,
                  None, peak_rss_mb(), _gpu_peak(device))


# --- output ----------------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v != v:  # NaN
        return "nan"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"


def table(results: list[Result]) -> str:
    head = ["task", "shape", "batch", "prepare s", "prefill s", "steps", "steps/s", "s/item", "vq s", "peak rss MB",
            "peak gpu MB"]
    rows = [[r.task, r.shape, str(r.batch), _fmt(r.prepare), _fmt(r.prefill), str(r.steps), _fmt(r.steps_per_s, 1),
             ("~" if r.estimated else "") + _fmt(r.per_item), _fmt(r.vq), _fmt(r.rss_mb, 0), _fmt(r.gpu_mb, 0)]
            for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().replace("×", "x").split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 512x512), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wallaroo_nodes.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a converted Wallaroo model folder")
    src.add_argument("--config", choices=CONFIGS, help="a named architecture with random weights")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    ap.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16 (default auto)")
    ap.add_argument("--attention", default="auto", choices=BACKENDS, help="attention backend (default auto)")
    ap.add_argument("--size", type=parse_size, help="output size HxW from the model's table (default: its default)")
    ap.add_argument("--steps", type=int, help="cap the image decode at about this many steps (whole rows)")
    ap.add_argument("--new-tokens", type=int, default=64, help="understand: answer length in tokens (default 64)")
    ap.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up pass of each task")
    args = ap.parse_args(argv)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.new_tokens < 1:
        ap.error("--new-tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model, tok = load_model(args.model, dtype=dtype, device=device, attention=args.attention)
            what = str(args.model)
        else:
            if args.config == "7b" and device.type != "cuda":
                print("warning: a random 7B on the CPU needs ~17-33 GB of RAM and is very slow", file=sys.stderr)
            model, tok = build_random(args.config, device, dtype, args.attention, Path(tmp))
            what = f"{args.config} (random weights)"
    _sync(device)
    load_s = time.perf_counter() - t
    pipe = Pipeline(model, tok)
    try:
        size = images.check_size(args.size, pipe.sizes) if args.size else tuple(pipe.config.protocol.default_size)
    except ValueError as exc:
        ap.error(str(exc))
    if "edit" in tasks and not pipe.config.has_edit:
        tasks.remove("edit")
        print("note: this model has no editing heads; skipping edit", file=sys.stderr)

    params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"model: {what}; {params / 1e6:.1f}M parameters; {dtype} on {device} ({gpu}); "
          f"attention {model.attention_backend}; load {load_s:.2f} s; torch {torch.__version__}")
    c = pipe.config
    print(f"llm: hidden {c.llm.hidden_size}, {c.llm.num_layers} layers, vocab {c.llm.vocab_size}; "
          f"size {size[0]}x{size[1]} ({size[0] // c.vq.downsample}x{size[1] // c.vq.downsample} codes); "
          f"cfg {c.sampling.generate_cfg}/{c.sampling.edit_cfg}; steps cap {args.steps}")

    results = []
    for task in tasks:
        if not args.no_warmup:  # kernels, allocator and autotuning warm up outside the timing
            if task == "understand":
                bench_understand(pipe, size, min(4, args.new_tokens), args.seed)
            else:
                bench_image(pipe, task, size, 1, 1, args.seed)
        if task == "understand":
            results.append(bench_understand(pipe, size, args.new_tokens, args.seed))
        else:
            results.append(bench_image(pipe, task, size, args.steps, args.n, args.seed))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
