"""ComfyUI nodes for Wallaroo: load a model, understand, generate and edit images.

Classic node contract (NODE_CLASS_MAPPINGS, INPUT_TYPES, RETURN_TYPES, FUNCTION), so every ComfyUI version
loads the pack and tests can run the nodes without ComfyUI. The nodes only convert ComfyUI values (IMAGE
tensors [B, H, W, C] float32 in 0..1, strings, numbers) to what `Pipeline` takes and back; the optional
ComfyUI integration (model folders, device, memory, progress, cancel) lives in `comfy_bridge`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import comfy_bridge as bridge
from .engine import images as engine_images
from .engine.decode import Cancelled
from .engine.pipeline import MAX_IMAGES_PER_CALL, Pipeline

CATEGORY = "Wallaroo"
MODEL_TYPE = "WALLAROO_MODEL"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
DEFAULT = "use the model's default (its config.json) when negative"


@dataclass(frozen=True)
class WallarooModelRef:
    """What a WALLAROO_MODEL link carries: which model, in which dtype, on which device. The weights stay in
    the shared cache (so ComfyUI can free them); `pipeline()` loads them again when needed."""

    label: str
    model: str
    dtype: str
    device: str
    attention: str

    def pipeline(self) -> Pipeline:
        return bridge.acquire(self.model, self.dtype, self.device, self.attention)

    def __str__(self) -> str:
        return f"Wallaroo model {self.label} ({self.dtype}, {self.device}, attention {self.attention})"


# --- conversions -----------------------------------------------------------------------------------------


def image_batch_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, C] (or [H, W, C]) float in 0..1 -> RGB / L / RGBA PIL images."""
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(f"expected a ComfyUI IMAGE tensor [batch, height, width, channels], got "
                         f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    if images.dim() == 3:
        images = images[None]
    channels = images.shape[-1]
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if channels not in modes or images.shape[0] == 0:
        raise ValueError(f"expected an IMAGE with 1, 3 or 4 channels last and at least one image, got shape "
                         f"{tuple(images.shape)}")
    pixels = (images.detach().float().cpu().nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a[..., 0] if channels == 1 else a, modes[channels]) for a in pixels]


def pil_to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> ComfyUI IMAGE [B, H, W, 3] float32 in 0..1."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def _knob(value: float | int, cast: type):
    """Negative knob values mean 'the model's default' (None for the pipeline)."""
    return None if value is None or value < 0 else cast(value)


def _seed_input(tooltip: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True, "tooltip": tooltip})


def _image_knobs(kind: str) -> dict:
    return {
        "cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                          "tooltip": f"Classifier-free guidance scale (1 = none, higher follows the text more "
                                     f"closely); {DEFAULT}."}),
        "temperature": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 5.0, "step": 0.05, "round": 0.01,
                                  "tooltip": f"Sampling temperature of the image codes (0 = always the most likely "
                                             f"code); {DEFAULT}."}),
        "top_k": ("INT", {"default": -1, "min": -1, "max": 1_000_000,
                          "tooltip": f"Sample only among the k most likely codes (0 = no limit); {DEFAULT}."}),
        "top_p": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                            "tooltip": f"Sample only within this much probability mass (1 = no limit; must be above "
                                       f"0); {DEFAULT}."}),
        "seed": _seed_input(f"Random seed; the same seed and inputs {kind} the same images."),
    }


def _image_run(run):
    """Run an image task; a cancel becomes ComfyUI's interrupt."""
    try:
        return run()
    except Cancelled as exc:
        raise bridge.interrupted(exc) from None


# --- nodes -----------------------------------------------------------------------------------------------


class WallarooModelLoader:
    DESCRIPTION = ("Loads a Wallaroo model (Qwen2.5-VL + LlamaGen VQ) into the shared model cache: the same model "
                   "asked for by several loaders, graphs or the Python SDK is loaded once. 'tiny' is the small model "
                   "bundled with the pack; converted models go in ComfyUI/models/wallaroo/<name>/.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for the Wallaroo Understand, Generate and Edit nodes.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (list(bridge.model_choices()), {
                "default": "tiny",
                "tooltip": "'tiny' is bundled with the pack; other entries are model folders (config.json, "
                           "tokenizer.json, safetensors from `wallaroo convert`) found in ComfyUI/models/wallaroo/."}),
            "dtype": (["auto", "fp32", "bf16", "fp16"], {
                "default": "auto",
                "tooltip": "Weight precision. auto: bf16 on GPUs that support it, else fp16; fp32 on the CPU."}),
            "device": (["auto", "cpu", "cuda"], {
                "default": "auto",
                "tooltip": "auto: the device ComfyUI uses (the CPU when ComfyUI runs with --cpu)."}),
            "attention": (["auto", "sdpa", "xformers"], {
                "default": "auto",
                "tooltip": "Attention kernel. auto: xformers on CUDA when installed, else PyTorch SDPA."}),
        }}

    def load(self, model: str, dtype: str, device: str, attention: str):
        ref = WallarooModelRef(label=model, model=bridge.resolve_model(model), dtype=dtype,
                               device=bridge.resolve_device(device), attention=attention)
        ref.pipeline()  # load now: a wrong folder or wrong weights is reported on this node
        return (ref,)


class WallarooUnderstand:
    DESCRIPTION = ("Answers a question about each image of the batch (English or Chinese). The answers are shown on "
                   "the node and output as a list of strings, one per image.")
    CATEGORY = CATEGORY
    FUNCTION = "understand"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("One answer per input image.",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL_TYPE, {"tooltip": "A model from Wallaroo Model Loader."}),
            "image": ("IMAGE", {"tooltip": "The images to ask about; each image of the batch is answered."}),
            "question": ("STRING", {"multiline": True, "default": "Describe the image.",
                                    "tooltip": "The question, in English or Chinese."}),
            "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 8192,
                                       "tooltip": "The longest answer, in tokens."}),
            "temperature": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 5.0, "step": 0.05, "round": 0.01,
                                      "tooltip": f"0 = greedy (always the most likely word); {DEFAULT}."}),
            "top_p": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                "tooltip": f"Nucleus sampling mass (1 = no limit); {DEFAULT}."}),
            "seed": _seed_input("Random seed for sampled (temperature > 0) answers."),
        }}

    def understand(self, model: WallarooModelRef, image: torch.Tensor, question: str, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int):
        pipe = model.pipeline()
        pictures = image_batch_to_pil(image)
        progress = bridge.Progress(len(pictures) * max_new_tokens)
        answers = []
        for i, picture in enumerate(pictures):
            pieces: list[str] = []
            try:
                for piece in pipe.understand_stream(picture, question, max_new_tokens=max_new_tokens,
                                                    temperature=_knob(temperature, float), top_p=_knob(top_p, float),
                                                    seed=seed, should_cancel=progress.should_cancel):
                    pieces.append(piece)
                    progress.step(i * max_new_tokens + min(len(pieces), max_new_tokens))
            except Cancelled as exc:
                raise bridge.interrupted(exc) from None
            answers.append("".join(pieces).strip())
            progress.step((i + 1) * max_new_tokens)
        return {"ui": {"text": answers}, "result": (answers,)}


class WallarooGenerate:
    DESCRIPTION = ("Generates images from a text prompt (English or Chinese), row by row; the progress bar shows the "
                   "rows decoded so far.")
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("batch_size images of the chosen size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL_TYPE, {"tooltip": "A model from Wallaroo Model Loader."}),
            "prompt": ("STRING", {"multiline": True, "default": "A large red circle in the centre on a white background.",
                                  "tooltip": "What to draw, in English or Chinese."}),
            "size": (bridge.size_choices(), {
                "default": "default",
                "tooltip": "Output height x width: one of the sizes the model was trained for ('default': the model's "
                           "default size)."}),
            **_image_knobs("give"),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_IMAGES_PER_CALL,
                                   "tooltip": "How many images to generate (decoded together)."}),
        }}

    def generate(self, model: WallarooModelRef, prompt: str, size: str, cfg: float, temperature: float, top_k: int,
                 top_p: float, seed: int, batch_size: int):
        pipe = model.pipeline()
        height, width = engine_images.check_size(pipe.config.protocol.default_size if size == "default" else size,
                                                 pipe.sizes)
        progress = bridge.Progress(height // pipe.config.vq.downsample)
        out = _image_run(lambda: pipe.generate(
            prompt, size=(height, width), cfg=_knob(cfg, float), temperature=_knob(temperature, float),
            top_k=_knob(top_k, int), top_p=_knob(top_p, float), seed=seed, n=batch_size, on_row=progress.on_row(),
            should_cancel=progress.should_cancel))
        return (pil_to_image_batch(out),)


class WallarooEdit:
    DESCRIPTION = ("Edits each image of the batch as the instruction says (English or Chinese). The output has the "
                   "model's supported size closest to the input's aspect ratio.")
    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("One edited image per input image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL_TYPE, {"tooltip": "A model from Wallaroo Model Loader."}),
            "image": ("IMAGE", {"tooltip": "The images to edit; each image of the batch is edited."}),
            "instruction": ("STRING", {"multiline": True, "default": "Make the background blue.",
                                       "tooltip": "What to change, in English or Chinese."}),
            **_image_knobs("make"),
        }}

    def edit(self, model: WallarooModelRef, image: torch.Tensor, instruction: str, cfg: float, temperature: float,
             top_k: int, top_p: float, seed: int):
        pipe = model.pipeline()
        sources = image_batch_to_pil(image)
        height, _ = engine_images.closest_size(sources[0].height, sources[0].width, pipe.sizes)
        rows = height // pipe.config.vq.downsample
        chunks = [sources[i:i + MAX_IMAGES_PER_CALL] for i in range(0, len(sources), MAX_IMAGES_PER_CALL)]
        progress = bridge.Progress(rows * len(chunks))
        out: list[Image.Image] = []
        for c, chunk in enumerate(chunks):
            out += _image_run(lambda: pipe.edit_many(
                chunk, [instruction] * len(chunk), cfg=_knob(cfg, float), temperature=_knob(temperature, float),
                top_k=_knob(top_k, int), top_p=_knob(top_p, float), seed=(seed + c) % (SEED_MAX + 1),
                on_row=progress.on_row(c * rows), should_cancel=progress.should_cancel))
        return (pil_to_image_batch(out),)


NODE_CLASS_MAPPINGS = {
    "WallarooModelLoader": WallarooModelLoader,
    "WallarooUnderstand": WallarooUnderstand,
    "WallarooGenerate": WallarooGenerate,
    "WallarooEdit": WallarooEdit,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "WallarooModelLoader": "Wallaroo Model Loader",
    "WallarooUnderstand": "Wallaroo Understand",
    "WallarooGenerate": "Wallaroo Generate",
    "WallarooEdit": "Wallaroo Edit",
}
