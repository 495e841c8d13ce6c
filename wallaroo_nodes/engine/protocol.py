"""The three prompt protocols as pure functions: inputs -> token ids, embedding slots and M-RoPE positions.

They reproduce the Wallaroo reference inference scripts (JiePKU/Wallaroo, scripts/evaluate/*.py):

* understand: Qwen chat, the image's vision tokens then the question in the user turn, assistant header.
* generate: system + user turn holding a size template around the prompt; after the user turn comes
  " <indicator:H><indicator:W>" and then "<|im_start|>assistant\\n<|generate_start|>". The unconditional
  (CFG) branch is the same with an empty prompt.
* edit: user turn = VQ pixel block (rows of pixel slots separated by end-of-line tokens) then the vision
  block, then the edit template and " <indicator:H><indicator:W>", closed by "<|im_end|>\\n"; then
  "<|generate_start|>" with no assistant header. The unconditional branch is a black image of the same
  size with an empty instruction. (`ProtocolConfig.edit_instruction_first`, a tiny-model option, moves the
  edit template before the two blocks.)

Documented choices where the reference is inconsistent:
* Generation indicators sit after the user turn, as in the published inference scripts (the training
  dataset put them inside it). `ProtocolConfig` keeps the table of templates; the first template of a
  language is used unless a caller picks another.
* Indicator tokens name pixel sides (<indicator:512>), the inference scripts' convention; the stage-4
  training script's row/column-count indicators are not used.
* Left padding stays masked during the whole decode (the reference masks it only in the prefill).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import WallarooConfig
from .rope import multimodal_position_ids
from .text import TextTokenizer, language_of

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
PIXEL_START, PIXEL_END, EOL = "<|pixel_start|>", "<|pixel_end|>", "<|end_of_line>|"
GENERATE_START = "<|generate_start|>"


@dataclass
class Prompt:
    """One prompt row: token ids, where image features go, and its M-RoPE positions."""

    ids: list[int]
    position_ids: torch.Tensor  # (3, L)
    vision_slots: list[int] = field(default_factory=list)  # indices receiving vision-tower features
    pixel_slots: list[int] = field(default_factory=list)   # indices receiving VQ pixel-adapter features
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # vision grid (t, h, w) in patches

    def __len__(self) -> int:
        return len(self.ids)


def _system(cfg: WallarooConfig) -> str:
    return f"{IM_START}system\n{cfg.protocol.system_message}{IM_END}\n"


def _vision_block(cfg: WallarooConfig, grid: tuple[int, int, int]) -> str:
    t, h, w = grid
    n = t * h * w // cfg.vision.spatial_merge_size ** 2
    return VISION_START + IMAGE_PAD * n + VISION_END


def _indicators(cfg: WallarooConfig, size: tuple[int, int]) -> str:
    fmt = cfg.protocol.indicator_format
    return " " + fmt.format(size[0]) + fmt.format(size[1])


def _template(templates: dict[str, list[str]], text: str, lang: str | None, index: int) -> str:
    lang = lang or language_of(text)
    if lang not in templates or not templates[lang]:
        raise ValueError(f"no prompt template for language {lang!r}; available: {sorted(templates)}")
    options = templates[lang]
    return options[index % len(options)]


def _finish(tok: TextTokenizer, cfg: WallarooConfig, text: str, grids: list[tuple[int, int, int]]) -> Prompt:
    ids = tok.encode(text)
    pad = cfg.token_id(IMAGE_PAD)
    vision_start, vision_end = cfg.token_id(VISION_START), cfg.token_id(VISION_END)
    pixel_start, pixel_end = cfg.tokens.get(PIXEL_START), cfg.tokens.get(PIXEL_END)
    vision_slots, pixel_slots = [], []
    region = None
    for i, t in enumerate(ids):
        if t == vision_start:
            region = "vision"
        elif t == pixel_start:
            region = "pixel"
        elif t in (vision_end, pixel_end):
            region = None
        elif t == pad:
            (vision_slots if region == "vision" else pixel_slots).append(i)
    expected = sum(g[0] * g[1] * g[2] for g in grids) // cfg.vision.spatial_merge_size ** 2
    if len(vision_slots) != expected:
        raise ValueError(f"prompt text produced {len(vision_slots)} vision slots, expected {expected}: "
                         "the user text must not contain vision marker tokens")
    positions = multimodal_position_ids(ids, grids, vision_start, cfg.vision.spatial_merge_size)
    return Prompt(ids, positions, vision_slots, pixel_slots, list(grids))


def _check_user_text(text: str, what: str, cfg: WallarooConfig) -> None:
    for name in cfg.tokens:
        if name in text:
            raise ValueError(f"the {what} contains the reserved token text {name!r}; remove it")


def build_understand(tok: TextTokenizer, cfg: WallarooConfig, question: str,
                     grid: tuple[int, int, int] | None) -> Prompt:
    """Chat prompt asking `question` about one image (vision grid in patches), or text-only if grid is None."""
    _check_user_text(question, "question", cfg)
    image = _vision_block(cfg, grid) if grid is not None else ""
    text = f"{_system(cfg)}{IM_START}user\n{image}{question}{IM_END}\n{IM_START}assistant\n"
    return _finish(tok, cfg, text, [grid] if grid is not None else [])


def follow_up_ids(tok: TextTokenizer, cfg: WallarooConfig, question: str) -> list[int]:
    """Ids that continue a chat after an answer's <|im_end|> with another user question, up to the next answer."""
    _check_user_text(question, "question", cfg)
    return tok.encode(f"\n{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n")


def build_generate(tok: TextTokenizer, cfg: WallarooConfig, prompt: str, size: tuple[int, int],
                   lang: str | None = None, template_index: int = 0) -> Prompt:
    """Text-to-image prompt for an (height, width) size; prompt "" gives the unconditional branch."""
    _check_user_text(prompt, "prompt", cfg)
    h, w = size
    template = _template(cfg.protocol.generate_templates, prompt, lang, template_index)
    user = template.format(prompt=prompt, width=w, height=h)
    text = (f"{_system(cfg)}{IM_START}user\n{user}{IM_END}\n{_indicators(cfg, size)}"
            f"{IM_START}assistant\n{GENERATE_START}")
    return _finish(tok, cfg, text, [])


def pixel_block(cfg: WallarooConfig, size: tuple[int, int]) -> str:
    """The VQ pixel block of an edit prompt: rows of pixel slots separated by end-of-line tokens."""
    ds = cfg.vq.downsample
    rows, cols = size[0] // ds, size[1] // ds
    return PIXEL_START + EOL.join([IMAGE_PAD * cols] * rows) + PIXEL_END


def build_edit(tok: TextTokenizer, cfg: WallarooConfig, instruction: str, size: tuple[int, int],
               grid: tuple[int, int, int], lang: str | None = None, template_index: int = 0) -> Prompt:
    """Image-editing prompt: target (height, width), the source's vision grid; "" gives the uncond branch."""
    _check_user_text(instruction, "instruction", cfg)
    h, w = size
    template = _template(cfg.protocol.edit_templates, instruction, lang, template_index)
    user_text = template.format(prompt=instruction, width=w, height=h)
    blocks = (pixel_block(cfg, size) + _vision_block(cfg, grid) if cfg.protocol.pixel_block_first
              else _vision_block(cfg, grid) + pixel_block(cfg, size))
    user = f"{user_text}{blocks}" if cfg.protocol.edit_instruction_first else f"{blocks}{user_text}"
    text = f"{_system(cfg)}{IM_START}user\n{user}{_indicators(cfg, size)}{IM_END}\n{GENERATE_START}"
    return _finish(tok, cfg, text, [grid])


@dataclass
class Batch:
    """Left-padded rows ready for the model."""

    ids: torch.Tensor           # (B, L)
    valid: torch.Tensor         # (B, L) bool, False on padding
    position_ids: torch.Tensor  # (3, B, L)
    offsets: list[int]          # left padding per row (add to a Prompt's slot indices)


def batch_prompts(prompts: list[Prompt], pad_id: int) -> Batch:
    """Left-pad prompts to one length (as the reference pads its unconditional branch)."""
    length = max(len(p) for p in prompts)
    b = len(prompts)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    valid = torch.zeros(b, length, dtype=torch.bool)
    positions = torch.ones(3, b, length, dtype=torch.long)
    offsets = []
    for row, p in enumerate(prompts):
        off = length - len(p)
        ids[row, off:] = torch.tensor(p.ids, dtype=torch.long)
        valid[row, off:] = True
        positions[:, row, off:] = p.position_ids
        offsets.append(off)
    return Batch(ids, valid, positions, offsets)
