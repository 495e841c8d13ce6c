"""Configuration dataclasses for every part of a Wallaroo model, and their `config.json` form.

A model folder's `config.json` is the single source of truth: architecture sizes, the token table
(special token name -> id), the supported output sizes, prompt templates and sampling defaults.
Code never hard-codes token ids, sizes or templates; it reads them from here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json is missing, malformed, or inconsistent."""


@dataclass
class LLMConfig:
    """Qwen2-style decoder (the Qwen2.5-VL language model)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # M-RoPE: rotary frequency pairs given to the temporal, height and width axes (sum = head_dim / 2).
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    # False: Qwen2.5-VL's layout, the sections in order (t the highest frequencies, w the lowest). True:
    # Qwen3-VL's interleaved layout (t, h, w, t, h, w, ...), which gives the width axis high frequencies too.
    mrope_interleaved: bool = False
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ConfigError when the sizes cannot form a model."""
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"llm.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"llm.num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(f"llm.mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}")


@dataclass
class VisionConfig:
    """Qwen2.5-VL NaViT vision tower and its image preprocessing."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # Pixel budgets for understanding (Qwen2.5-VL processor defaults) and for the edit source image
    # (the reference edit script's smaller budget).
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    edit_min_pixels: int = 12544
    edit_max_pixels: int = 188160
    # Side of a learned table of absolute patch positions sampled at each patch's place as a fraction of
    # its image (Qwen3-VL's pos_embed idea). 0 = none, as in Qwen2.5-VL. The tiny model needs it: its
    # 2-D rotary positions are relative, so on a flat background no token could tell where in the frame it
    # sits, and M-RoPE gives the LLM's columns almost no angle (docs/tiny_model_runs.md, the eighth run).
    abs_position_grid: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def image_factor(self) -> int:
        """Image sides are resized to multiples of this (one LLM token per factor x factor pixels)."""
        return self.patch_size * self.spatial_merge_size

    def validate(self) -> None:
        """Raise ConfigError when the sizes cannot form a vision tower."""
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError("vision.window_size must be a multiple of patch_size * spatial_merge_size")
        if self.abs_position_grid < 0 or self.abs_position_grid == 1:
            raise ConfigError(f"vision.abs_position_grid must be 0 (none) or >= 2, got {self.abs_position_grid}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision.fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")


@dataclass
class VQConfig:
    """LlamaGen VQ image tokenizer (encoder, l2-normalised quantiser, decoder)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    norm_groups: int = 32
    in_channels: int = 3
    # Encode each ds x ds cell on its own (the decoder still sees the whole grid). Off for LlamaGen's
    # checkpoints; the tiny model uses it so a flat cell always gets the same code, whatever is around it.
    cell_local: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        """Raise ConfigError when the sizes cannot form a VQ model."""
        widths = {self.ch * m for m in self.ch_mult} | {self.z_channels}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ConfigError(f"vq widths {bad} are not divisible by norm_groups {self.norm_groups}")


@dataclass
class SamplingDefaults:
    """Default sampling knobs; every front door takes its defaults from here."""

    generate_cfg: float = 3.0
    generate_temperature: float = 1.0
    generate_top_k: int = 1000
    generate_top_p: float = 1.0
    edit_cfg: float = 3.0
    edit_temperature: float = 1.0
    edit_top_k: int = 1000
    edit_top_p: float = 1.0
    understand_temperature: float = 0.0  # 0 means greedy
    understand_top_p: float = 1.0
    understand_top_k: int = 0
    understand_max_new_tokens: int = 256


@dataclass
class ProtocolConfig:
    """Prompt-level facts the model was trained with."""

    system_message: str = "You are a helpful assistant."
    # Per language, templates with {prompt}, {width}, {height} placeholders. The official defaults are
    # the first template of each list in the reference (wallaroo/datasets/constants.py): a protocol fact.
    generate_templates: dict[str, list[str]] = field(default_factory=lambda: {
        "en": ['Generate an image with resolution {width}x{height} based on the prompt: "{prompt}"'],
        "zh": ["生成一幅图像，分辨率为{width}x{height}，基于文本提示：“{prompt}”"],
    })
    edit_templates: dict[str, list[str]] = field(default_factory=lambda: {
        "en": ['Edit the input image based on the text prompt: "{prompt}", and generate a new image with a '
               'resolution of {width}x{height}.'],
        "zh": ["根据输入图片，并结合文本提示：“{prompt}”，对图片进行编辑，生成一幅{width}x{height}的图像"],
    })
    # Supported output sizes as (height, width), pixels.
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [
        (352, 704), (352, 672), (384, 672), (384, 640), (416, 608), (416, 576), (448, 576), (448, 544),
        (480, 544), (480, 512), (512, 512), (544, 480), (544, 448), (576, 448), (576, 416), (608, 416),
        (640, 384), (672, 384), (704, 352),
    ])
    default_size: tuple[int, int] = (512, 512)
    # Indicator token text per pixel side; the model config maps each to a token id.
    indicator_format: str = "<indicator:{}>"
    # The edit prompt puts the VQ pixel block before the vision block (reference: pixel_pad_left).
    pixel_block_first: bool = True
    # What an edit's unconditional (CFG) branch is. False: a black image and no instruction (the reference's).
    # True: the source image kept and only the instruction dropped, trained with the source itself as the
    # target, so guidance pushes away from returning the source unchanged.
    edit_uncond_keeps_source: bool = False
    # Where an edit's instruction sits. False: after both source blocks (the reference's order), so no source token
    # can see it. True (tiny model option): right after "user\n", before the blocks, so every source cell's hidden
    # state could know whether the instruction names it, and a drawn cell sits a fixed distance from its source
    # cell whatever the instruction's length. Looks-named edits did not gain; the seventy-first run's +0.05 editing
    # did not repeat on another seed (seventy-second run, +0.006), so the recipe keeps it off.
    edit_instruction_first: bool = False


# Token names the protocols need; each must be present in `WallarooConfig.tokens`.
REQUIRED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|generate_start|>", "<|generate_end|>", "<|pixel_start|>", "<|pixel_end|>", "<|end_of_line>|",
    "<|generate_image_pad|>",
)


@dataclass
class WallarooConfig:
    """Everything needed to build, prompt and sample a Wallaroo model."""

    name: str = "wallaroo-7b"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # Special token text -> id, including the size indicators.
    tokens: dict[str, int] = field(default_factory=dict)
    # Whether the edit heads/adapters exist (the official model has them).
    has_edit: bool = True
    # Tiny-model option, off for the official model: a learned gate on each edit step's hidden state adds a
    # score to the logit of the code the edit source has at that very cell (a copy path, as in
    # pointer-generator networks). Through the prompt's pixel block alone a small LLM must find "the same
    # cell in the source" at an offset that changes with the instruction's length; on flat backgrounds it did
    # not, and decoded edits dropped the objects they should have kept (docs/tiny_model_runs.md, thirteenth
    # run).
    edit_copy_source: bool = False
    # dtype the weights were saved in (informational; loading casts to the requested dtype).
    weights_dtype: str = "bfloat16"

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistency."""
        self.llm.validate()
        self.vision.validate()
        self.vq.validate()
        if self.vision.out_hidden_size != self.llm.hidden_size:
            raise ConfigError(f"vision.out_hidden_size {self.vision.out_hidden_size} != llm.hidden_size {self.llm.hidden_size}")
        if self.edit_copy_source and not self.has_edit:
            raise ConfigError("edit_copy_source needs has_edit (it feeds the editing head)")
        missing = [t for t in REQUIRED_TOKENS if t not in self.tokens]
        if missing:
            raise ConfigError(f"config tokens table lacks {missing}")
        for h, w in self.protocol.sizes:
            for side in (h, w):
                if side % self.vq.downsample:
                    raise ConfigError(f"size {h}x{w} is not a multiple of the VQ downsampling {self.vq.downsample}")
                name = self.protocol.indicator_format.format(side)
                if name not in self.tokens:
                    raise ConfigError(f"size {h}x{w} needs token {name!r}, absent from the config tokens table")
        for tid in self.tokens.values():
            if not 0 <= tid < self.llm.vocab_size:
                raise ConfigError(f"token id {tid} is outside the embedding table ({self.llm.vocab_size} rows)")

    def token_id(self, name: str) -> int:
        """Id of a special token, with an error that names it when the table lacks it."""
        try:
            return self.tokens[name]
        except KeyError:
            raise ConfigError(f"token {name!r} is not in this model's token table") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WallarooConfig":
        """Build from a parsed config.json, rejecting unknown keys so typos do not pass silently."""
        return _from_dict(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "WallarooConfig":
        """Read and validate a config.json."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        try:
            config = cls.from_dict(data)
            config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return config


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = {"LLMConfig": LLMConfig, "VisionConfig": VisionConfig, "VQConfig": VQConfig,
               "ProtocolConfig": ProtocolConfig, "SamplingDefaults": SamplingDefaults}.get(ftype)
        if sub is not None:
            value = _from_dict(sub, value, f"{where}.{name}")
        elif name in ("mrope_section", "fullatt_block_indexes", "image_mean", "image_std", "ch_mult", "default_size"):
            value = tuple(value)
        elif name == "sizes":
            value = [tuple(s) for s in value]
        kwargs[name] = value
    return cls(**kwargs)
