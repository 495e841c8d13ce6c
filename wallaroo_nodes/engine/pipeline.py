"""`Pipeline`: user-level understand / generate / edit over one loaded model.

Front doors (ComfyUI nodes, SDK, CLI, Gradio) convert their own types to PIL images and strings, call these
methods, and convert back. Prompt building, embedding assembly, decoding and VQ decoding all happen here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image

from . import images, native
from .config import WallarooConfig
from .decode import CancelCheck, Cancelled, PreparedBatch, decode_image_codes, decode_text
from .model import WallarooModel
from .protocol import Batch, Prompt, batch_prompts, build_edit, build_generate, build_understand
from .sampling import SamplingParams
from .text import StreamDecoder, TextTokenizer, language_of

__all__ = ["Pipeline", "RowProgress", "Cancelled"]

MAX_IMAGES_PER_CALL = 64


@dataclass
class RowProgress:
    """Progress of an image run after one decoded row; `preview()` renders the rows so far."""

    rows_done: int
    rows_total: int
    _preview: Callable[[], list[Image.Image]]

    def preview(self) -> list[Image.Image]:
        """The partly decoded images (undecoded rows are grey)."""
        return self._preview()


RowCallback = Callable[[RowProgress], None]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        g.manual_seed(seed % (2 ** 64))
    return g


class Pipeline:
    """Understand, generate and edit with one Wallaroo model."""

    def __init__(self, model: WallarooModel, tokenizer: TextTokenizer, *, compile: bool | str = False,
                 compile_mode: str | None = None, kernel: str | None = None):
        """`compile`: False (default) decodes eagerly; True routes decode steps through torch.compile (CUDA
        graphs on GPU, see `compiled.py`); "auto" does so on CUDA only. `compile_mode` overrides the
        torch.compile mode (default: reduce-overhead on CUDA, default on CPU). `kernel` picks the eager decode
        step: "auto" (the native C step for fp32 CPU models where it builds, else PyTorch), "native", "torch"
        (see `native.py`); None takes $WALLAROO_DECODE_KERNEL, else "auto"."""
        self.model = model
        self.tokenizer = tokenizer
        self.kernel = native.check_kernel(kernel)
        if compile not in (False, True, "auto"):
            raise ValueError(f"compile must be False, True or 'auto', got {compile!r}")
        use = compile is True or (compile == "auto" and model.device.type == "cuda")
        self._compiled = None
        if use:
            from .compiled import CompiledDecoder

            self._compiled = CompiledDecoder(model, compile_mode)

    @property
    def compiled(self) -> bool:
        """Whether decode steps go through the compiled path."""
        return self._compiled is not None

    @property
    def config(self) -> WallarooConfig:
        return self.model.cfg

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Supported output sizes (height, width)."""
        return list(self.config.protocol.sizes)

    # --- shared pieces ------------------------------------------------------------------------
    def _prepare(self, prompts: list[Prompt], vision: list[torch.Tensor | None],
                 pixels: list[torch.Tensor | None]) -> PreparedBatch:
        """Embed ids and write vision / pixel features into their slots."""
        batch: Batch = batch_prompts(prompts, self.config.token_id("<|endoftext|>"))
        dev = self.model.device
        embeds = self.model.embed_tokens(batch.ids.to(dev)).clone()
        for row, (p, v, px) in enumerate(zip(prompts, vision, pixels)):
            off = batch.offsets[row]
            if p.vision_slots:
                embeds[row, [off + s for s in p.vision_slots]] = v
            if p.pixel_slots:
                embeds[row, [off + s for s in p.pixel_slots]] = px
        return PreparedBatch(embeds, batch.position_ids.to(dev), batch.valid.to(dev))

    def _vision(self, image: Image.Image, min_pixels: int | None = None,
                max_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        patches, grid = images.vision_inputs(image, self.config.vision, min_pixels, max_pixels)
        dev = self.model.device
        feats = self.model.vision_embeddings(patches.to(dev), torch.tensor([grid], device=dev))
        return feats, grid

    def _decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        with torch.inference_mode():
            pixels = self.model.vq.decode_codes(codes)
        return images.vq_output_to_pil(pixels.float())

    def _image_run(self, kind: str, prep: PreparedBatch, size: tuple[int, int], cfg: float,
                   params: SamplingParams, seed: int | None, on_row: RowCallback | None,
                   should_cancel: CancelCheck | None, source_codes: torch.Tensor | None = None) -> list[Image.Image]:
        ds = self.config.vq.downsample
        rows, cols = size[0] // ds, size[1] // ds

        def row_done(done: int, codes: torch.Tensor) -> None:
            if on_row is None:
                return

            def preview() -> list[Image.Image]:
                grey = codes.new_zeros(codes.shape[0], rows, cols)
                partial = self._decode_codes(torch.cat([codes, grey[:, done:]], dim=1))
                out = []
                for im in partial:
                    im = im.copy()
                    im.paste((128, 128, 128), (0, done * ds, size[1], size[0])) if done < rows else None
                    out.append(im)
                return out

            on_row(RowProgress(done, rows, preview))

        extra = {} if source_codes is None else {"source_codes": source_codes}  # old-signature wrappers keep working
        codes = decode_image_codes(self.model, prep, rows=rows, cols=cols, kind=kind, cfg_scale=cfg, params=params,
                                   generator=_generator(seed, self.model.device), on_row=row_done,
                                   should_cancel=should_cancel, **self._decode_options(), **extra)
        return self._decode_codes(codes)

    def _decode_options(self) -> dict:
        # Only pass `compiled` / `kernel` when set, so wrappers of the decode functions with the old signature still work.
        options = {} if self._compiled is None else {"compiled": self._compiled}
        if self.kernel != "auto":
            options["kernel"] = self.kernel
        return options

    def _params(self, kind: str, temperature: float | None, top_k: int | None, top_p: float | None) -> SamplingParams:
        d = self.config.sampling
        p = SamplingParams(
            temperature=getattr(d, f"{kind}_temperature") if temperature is None else float(temperature),
            top_k=getattr(d, f"{kind}_top_k") if top_k is None else int(top_k),
            top_p=getattr(d, f"{kind}_top_p") if top_p is None else float(top_p))
        p.validate()
        return p

    @staticmethod
    def _check_n(n: int) -> None:
        if not isinstance(n, int) or not 1 <= n <= MAX_IMAGES_PER_CALL:
            raise ValueError(f"n (images per prompt) must be an integer in 1..{MAX_IMAGES_PER_CALL}, got {n!r}")

    # --- the three tasks ----------------------------------------------------------------------
    def understand_stream(self, image: Image.Image | None, question: str, *, max_new_tokens: int | None = None,
                          temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                          seed: int | None = 0, should_cancel: CancelCheck | None = None) -> Iterator[str]:
        """Yield the answer to a question about an image as text pieces, as they are produced."""
        if not question or not question.strip():
            raise ValueError("the question is empty; ask something about the image")
        params = self._params("understand", temperature, top_k, top_p)
        limit = self.config.sampling.understand_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        vision, grid = (None, None)
        if image is not None:
            vision, grid = self._vision(images.load_rgb(image))
        prompt = build_understand(self.tokenizer, self.config, question, grid)
        prep = self._prepare([prompt], [vision], [None])
        stops = {self.config.token_id("<|im_end|>"), self.config.token_id("<|endoftext|>")}
        stream = StreamDecoder(self.tokenizer)
        for tid in decode_text(self.model, prep, max_new_tokens=limit, params=params,
                               generator=_generator(seed, self.model.device), stop_ids=stops,
                               should_cancel=should_cancel, **self._decode_options()):
            piece = stream.push(tid)
            if piece:
                yield piece
        tail = stream.flush()
        if tail:
            yield tail

    def understand(self, image: Image.Image | None, question: str, **kwargs) -> str:
        """The whole answer to a question about an image."""
        return "".join(self.understand_stream(image, question, **kwargs)).strip()

    def generate(self, prompt: str, *, size: tuple[int, int] | str | None = None, cfg: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 0, n: int = 1, on_row: RowCallback | None = None,
                 should_cancel: CancelCheck | None = None) -> list[Image.Image]:
        """n images for a text prompt (English or Chinese) at a supported (height, width) size."""
        return self.generate_many([prompt], size=size, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, n=n, on_row=on_row, should_cancel=should_cancel)

    def generate_many(self, prompts: list[str], *, size: tuple[int, int] | str | None = None,
                      cfg: float | None = None, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = 0, n: int = 1,
                      on_row: RowCallback | None = None, should_cancel: CancelCheck | None = None) -> list[Image.Image]:
        """n images for each of several prompts of one size, decoded as one batch (prompt-major order)."""
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of text prompts")
        size = images.check_size(size or self.config.protocol.default_size, self.sizes)
        self._check_n(n)
        if len(prompts) * n > MAX_IMAGES_PER_CALL:
            raise ValueError(f"at most {MAX_IMAGES_PER_CALL} images per call; got {len(prompts)} prompts x n={n}")
        scale = self.config.sampling.generate_cfg if cfg is None else float(cfg)
        params = self._params("generate", temperature, top_k, top_p)
        batch = [build_generate(self.tokenizer, self.config, p, size) for p in prompts for _ in range(n)]
        if scale != 1.0:
            batch += [build_generate(self.tokenizer, self.config, "", size, lang=language_of(p))
                      for p in prompts for _ in range(n)]
        prep = self._prepare(batch, [None] * len(batch), [None] * len(batch))
        return self._image_run("generate", prep, size, scale, params, seed, on_row, should_cancel)

    def edit(self, image: Image.Image, instruction: str, *, cfg: float | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = 0, n: int = 1, on_row: RowCallback | None = None,
             should_cancel: CancelCheck | None = None) -> list[Image.Image]:
        """n edited versions of an image, at the supported size closest to its aspect ratio."""
        return self.edit_many([image], [instruction], cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, n=n, on_row=on_row, should_cancel=should_cancel)

    def edit_many(self, sources: list[Image.Image], instructions: list[str], *, cfg: float | None = None,
                  temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = 0, n: int = 1, on_row: RowCallback | None = None,
                  should_cancel: CancelCheck | None = None) -> list[Image.Image]:
        """n edits of each (image, instruction) pair, decoded as one batch; all images must map to one size."""
        if len(sources) != len(instructions) or not sources:
            raise ValueError("edit_many needs as many instructions as images, at least one")
        for text in instructions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("the edit instruction is empty; say what to change")
        self._check_n(n)
        if len(sources) * n > MAX_IMAGES_PER_CALL:
            raise ValueError(f"at most {MAX_IMAGES_PER_CALL} images per call; got {len(sources)} images x n={n}")
        loaded = [images.load_rgb(im) for im in sources]
        sizes = {images.closest_size(im.height, im.width, self.sizes) for im in loaded}
        if len(sizes) != 1:
            raise ValueError(f"edit_many needs images that map to one output size; these map to {sorted(sizes)}")
        size = sizes.pop()
        scale = self.config.sampling.edit_cfg if cfg is None else float(cfg)
        params = self._params("edit", temperature, top_k, top_p)
        v = self.config.vision
        rows = [(src, text) for src, text in zip(loaded, instructions)]
        if scale != 1.0:
            # The unconditional branch: no instruction, and a black image of the same size (as the reference)
            # or, for models trained so, the source itself (ProtocolConfig.edit_uncond_keeps_source).
            keep = self.config.protocol.edit_uncond_keeps_source
            rows += [(src if keep else Image.new("RGB", src.size, (0, 0, 0)), "") for src in loaded]
        langs = [language_of(t) for t in instructions] * (2 if scale != 1.0 else 1)
        prompts, vision, pixels, source_codes = [], [], [], []
        copy = self.config.edit_copy_source
        for (src, text), lang in zip(rows, langs):
            feats, grid = self._vision(src, v.edit_min_pixels, v.edit_max_pixels)
            vq_pixels = images.vq_input(src, size).to(self.model.device)
            with torch.inference_mode():
                # One VQ encode serves both the pixel block and, with the copy gate, the source's codes.
                z = self.model.vq.encode_features(vq_pixels.to(self.model.vq_dtype))
                px = self.model.pixel_embeddings_from_latents(z)[0]
                if copy:
                    source_codes += [self.model.vq.quantize_features(z).flatten()] * n
            p = build_edit(self.tokenizer, self.config, text, size, grid, lang=lang)
            prompts += [p] * n
            vision += [feats] * n
            pixels += [px] * n
        prep = self._prepare(prompts, vision, pixels)
        return self._image_run("edit", prep, size, scale, params, seed, on_row, should_cancel,
                               torch.stack(source_codes) if copy else None)
