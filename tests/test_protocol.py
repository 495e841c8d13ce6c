"""Golden token sequences of the three prompt protocols (understand, generate, edit), EN and ZH, two sizes.

The expected prompt texts are written out by hand from the reference inference scripts
(JiePKU/Wallaroo scripts/evaluate/ar_infer_t2i_geneval_mar.py and ar_infer_i2i_mar_imgedit.py,
templates from wallaroo/datasets/constants.py), not produced by the builders:

* generate: `processor.apply_chat_template([system, user], add_generation_prompt=False)` +
  " <indicator:{h}><indicator:{w}>", tokenized as one text, then "<|im_start|>assistant\\n<|generate_start|>"
  tokenized on its own and appended. The template says "{target_w}x{target_h}" (width first) while the
  indicators go height first. The unconditional branch is the same with prompt "" (same template).
* edit: system message tokenized alone; the user turn "<|im_start|>user\\n" + vision block + template +
  " <indicator:h><indicator:w>" + "<|im_end|>\\n"; the pixel block ("<|pixel_start|>" + rows of w/16
  "<|image_pad|>" joined by "<|end_of_line>|" + "<|pixel_end|>") tokenized alone and spliced in just before
  "<|vision_start|>" (pixel_pad_left); then "<|generate_start|>" with no assistant header.
* understand: Qwen2.5-VL chat with the image first in the user turn, then the question, then the assistant
  header.

`tests/golden/protocol_ids.json` freezes the resulting id lists, so a change of the tokenizer fixture or of a
builder shows up as a diff. Regenerate it deliberately with WALLAROO_REGEN_GOLDEN=1.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import make_tokenizer_and_config
from wallaroo_nodes.engine.protocol import batch_prompts, build_edit, build_generate, build_understand, pixel_block
from wallaroo_nodes.engine.text import TextTokenizer

GOLDEN = Path(__file__).parent / "golden" / "protocol_ids.json"

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ASSISTANT_GEN = "<|im_start|>assistant\n<|generate_start|>"

EN_PROMPT, ZH_PROMPT = "a red circle", "左边有一个红色的圆形"
EN_EDIT, ZH_EDIT = "make it blue", "把它变成蓝色"
EN_QUESTION, ZH_QUESTION = "What shape is in the picture?", "图片里是什么形状？"

SIZES = [(32, 48), (48, 32)]  # (height, width)
# Vision grids in patches (t, h, w); with merge 2 these are 2x3 and 3x2 LLM tokens.
GRIDS = {(32, 48): (1, 4, 6), (48, 32): (1, 6, 4)}


def gen_user(lang: str, prompt: str, h: int, w: int) -> str:
    if lang == "en":
        return f'Generate an image with resolution {w}x{h} based on the prompt: "{prompt}"'
    return f"生成一幅图像，分辨率为{w}x{h}，基于文本提示：“{prompt}”"


def edit_user(lang: str, prompt: str, h: int, w: int) -> str:
    if lang == "en":
        return (f'Edit the input image based on the text prompt: "{prompt}", and generate a new image with a '
                f"resolution of {w}x{h}.")
    return f"根据输入图片，并结合文本提示：“{prompt}”，对图片进行编辑，生成一幅{w}x{h}的图像"


def pixel_text(h: int, w: int) -> str:
    rows = ["<|image_pad|>" * (w // 16)] * (h // 16)
    return "<|pixel_start|>" + "<|end_of_line>|".join(rows) + "<|pixel_end|>"


def vision_text(n: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok_path, cfg = make_tokenizer_and_config(tmp_path_factory.mktemp("protocol"))
    return TextTokenizer(tok_path, cfg.tokens), cfg


def _cases():
    """(name, kind, lang, text, size) for every golden case."""
    out = []
    for h, w in SIZES:
        for lang, prompt, edit, question in (("en", EN_PROMPT, EN_EDIT, EN_QUESTION),
                                             ("zh", ZH_PROMPT, ZH_EDIT, ZH_QUESTION)):
            tag = f"{lang}_{h}x{w}"
            out += [(f"generate_cond_{tag}", "generate", lang, prompt, (h, w)),
                    (f"generate_uncond_{tag}", "generate", lang, "", (h, w)),
                    (f"edit_cond_{tag}", "edit", lang, edit, (h, w)),
                    (f"edit_uncond_{tag}", "edit", lang, "", (h, w)),
                    (f"understand_{tag}", "understand", lang, question, (h, w))]
    return out


CASES = _cases()


def build(tok, cfg, kind, lang, text, size):
    if kind == "generate":
        return build_generate(tok, cfg, text, size, lang=lang)
    if kind == "edit":
        return build_edit(tok, cfg, text, size, GRIDS[size], lang=lang)
    return build_understand(tok, cfg, text, GRIDS[size])


def expected_ids(tok, kind, lang, text, size):
    """Token ids the reference scripts would produce, from hand-written text pieces tokenized as they do."""
    h, w = size
    t, gh, gw = GRIDS[size]
    n_vision = t * gh * gw // 4
    if kind == "generate":
        chat = f"{SYSTEM}<|im_start|>user\n{gen_user(lang, text, h, w)}<|im_end|>\n"
        return tok.encode(chat + f" <indicator:{h}><indicator:{w}>") + tok.encode(ASSISTANT_GEN)
    if kind == "edit":
        user = (f"<|im_start|>user\n{vision_text(n_vision)}{edit_user(lang, text, h, w)}"
                f" <indicator:{h}><indicator:{w}><|im_end|>\n")
        user_ids = tok.encode(user)
        start = user_ids.index(tok.tokenizer.token_to_id("<|vision_start|>"))
        spliced = user_ids[:start] + tok.encode(pixel_text(h, w)) + user_ids[start:]
        return tok.encode(SYSTEM) + spliced + tok.encode("<|generate_start|>")
    return tok.encode(f"{SYSTEM}<|im_start|>user\n{vision_text(n_vision)}{text}<|im_end|>\n<|im_start|>assistant\n")


def expected_text(kind, lang, text, size):
    """The whole prompt as one string (the builders may tokenize it in one go)."""
    h, w = size
    t, gh, gw = GRIDS[size]
    n_vision = t * gh * gw // 4
    if kind == "generate":
        return (f"{SYSTEM}<|im_start|>user\n{gen_user(lang, text, h, w)}<|im_end|>\n"
                f" <indicator:{h}><indicator:{w}>{ASSISTANT_GEN}")
    if kind == "edit":
        return (f"{SYSTEM}<|im_start|>user\n{pixel_text(h, w)}{vision_text(n_vision)}{edit_user(lang, text, h, w)}"
                f" <indicator:{h}><indicator:{w}><|im_end|>\n<|generate_start|>")
    return f"{SYSTEM}<|im_start|>user\n{vision_text(n_vision)}{text}<|im_end|>\n<|im_start|>assistant\n"


# --- exact sequences ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind,lang,text,size", CASES, ids=[c[0] for c in CASES])
def test_exact_token_sequence(env, name, kind, lang, text, size):
    tok, cfg = env
    prompt = build(tok, cfg, kind, lang, text, size)
    assert prompt.ids == tok.encode(expected_text(kind, lang, text, size))
    # Tokenizing piecewise like the reference scripts gives the same ids (added tokens split the text).
    assert prompt.ids == expected_ids(tok, kind, lang, text, size)
    # The prompt round-trips to its text exactly (nothing dropped or merged).
    assert tok.decode(prompt.ids, skip_special=False) == expected_text(kind, lang, text, size)


def _special_layout(tok, ids):
    """The prompt's special tokens in order, run-length encoded: [(token, count), ...]."""
    specials = set(tok.special_ids)
    out = []
    for name, i in zip(tok.token_text(ids), ids):
        if i not in specials:
            continue
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return [tuple(x) for x in out]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lang,prompt", [("en", EN_PROMPT), ("zh", ZH_PROMPT)])
def test_generate_layout(env, size, lang, prompt):
    tok, cfg = env
    h, w = size
    for text in (prompt, ""):
        p = build_generate(tok, cfg, text, size, lang=lang)
        assert _special_layout(tok, p.ids) == [
            ("<|im_start|>", 1), ("<|im_end|>", 1), ("<|im_start|>", 1), ("<|im_end|>", 1),
            (f"<indicator:{h}>", 1), (f"<indicator:{w}>", 1), ("<|im_start|>", 1), ("<|generate_start|>", 1)]
        assert p.ids[-1] == cfg.tokens["<|generate_start|>"]
        assert not p.vision_slots and not p.pixel_slots and p.grids == []
        # Text only: all three M-RoPE axes are 0..L-1.
        assert torch.equal(p.position_ids, torch.arange(len(p)).expand(3, -1))
        # Width x height in the words, height then width in the indicators.
        words = tok.decode(p.ids)
        assert f"{w}x{h}" in words and f"{h}x{w}" not in words
        pos = p.ids.index(cfg.tokens[f"<indicator:{h}>"])
        assert p.ids[pos + 1] == cfg.tokens[f"<indicator:{w}>"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lang,instruction", [("en", EN_EDIT), ("zh", ZH_EDIT)])
def test_edit_layout_and_slots(env, size, lang, instruction):
    tok, cfg = env
    h, w = size
    rows, cols = h // 16, w // 16
    grid = GRIDS[size]
    n_vision = grid[0] * grid[1] * grid[2] // 4
    for text in (instruction, ""):
        p = build_edit(tok, cfg, text, size, grid, lang=lang)
        pixel_rows = []
        for r in range(rows):
            pixel_rows += [("<|image_pad|>", cols)] + ([("<|end_of_line>|", 1)] if r < rows - 1 else [])
        assert _special_layout(tok, p.ids) == [
            ("<|im_start|>", 1), ("<|im_end|>", 1), ("<|im_start|>", 1),
            ("<|pixel_start|>", 1), *pixel_rows, ("<|pixel_end|>", 1),
            ("<|vision_start|>", 1), ("<|image_pad|>", n_vision), ("<|vision_end|>", 1),
            (f"<indicator:{h}>", 1), (f"<indicator:{w}>", 1), ("<|im_end|>", 1), ("<|generate_start|>", 1)]
        # No assistant header: "<|im_end|>\n<|generate_start|>" ends the prompt.
        assert tok.token_text(p.ids[-3:]) == ["<|im_end|>", "Ċ", "<|generate_start|>"]
        assert "\nassistant\n" not in tok.decode(p.ids)

        ids = p.ids
        pad = cfg.tokens["<|image_pad|>"]
        ps, pe = ids.index(cfg.tokens["<|pixel_start|>"]), ids.index(cfg.tokens["<|pixel_end|>"])
        vs, ve = ids.index(cfg.tokens["<|vision_start|>"]), ids.index(cfg.tokens["<|vision_end|>"])
        assert ps < pe < vs < ve
        # Pixel slots: row-major, skipping the end-of-line token between rows.
        assert p.pixel_slots == [ps + 1 + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
        assert all(ids[i] == pad for i in p.pixel_slots)
        eols = [i for i in range(ps, pe) if ids[i] == cfg.tokens["<|end_of_line>|"]]
        assert eols == [ps + 1 + r * (cols + 1) + cols for r in range(rows - 1)]
        # Vision slots: exactly the pads between vision start and end.
        assert p.vision_slots == list(range(vs + 1, ve)) and len(p.vision_slots) == n_vision
        assert all(ids[i] == pad for i in p.vision_slots)
        assert p.grids == [grid]
        assert torch.equal(p.position_ids, expected_positions(ids, cfg, [grid]))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lang,question", [("en", EN_QUESTION), ("zh", ZH_QUESTION)])
def test_understand_layout_and_slots(env, size, lang, question):
    tok, cfg = env
    grid = GRIDS[size]
    n_vision = grid[0] * grid[1] * grid[2] // 4
    p = build_understand(tok, cfg, question, grid)
    assert _special_layout(tok, p.ids) == [
        ("<|im_start|>", 1), ("<|im_end|>", 1), ("<|im_start|>", 1),
        ("<|vision_start|>", 1), ("<|image_pad|>", n_vision), ("<|vision_end|>", 1),
        ("<|im_end|>", 1), ("<|im_start|>", 1)]
    assert tok.decode(p.ids).endswith(question + "\nassistant\n")
    vs = p.ids.index(cfg.tokens["<|vision_start|>"])
    assert p.vision_slots == list(range(vs + 1, vs + 1 + n_vision)) and p.pixel_slots == []
    assert torch.equal(p.position_ids, expected_positions(p.ids, cfg, [grid]))
    # Text-only question: no vision block, plain positions.
    q = build_understand(tok, cfg, question, None)
    assert cfg.tokens["<|vision_start|>"] not in q.ids and q.vision_slots == []
    assert torch.equal(q.position_ids, torch.arange(len(q)).expand(3, -1))


# --- M-RoPE positions --------------------------------------------------------------------------

def expected_positions(ids, cfg, grids):
    """Independent M-RoPE positions: text counts up on all axes; the tokens after each vision start are a
    (t, h/2, w/2) grid offset by the running position; text after resumes at the grid's maximum + 1. The pixel
    block of an edit prompt is ordinary text here."""
    vs = cfg.tokens["<|vision_start|>"]
    out, p, i, g = [], 0, 0, 0
    while i < len(ids):
        out.append((p, p, p))
        p += 1
        if ids[i] == vs:
            t, gh, gw = grids[g][0], grids[g][1] // 2, grids[g][2] // 2
            for a in range(t):
                for r in range(gh):
                    for c in range(gw):
                        out.append((p + a, p + r, p + c))
            p = p + max(t, gh, gw)
            i += 1 + t * gh * gw
            g += 1
            continue
        i += 1
    return torch.tensor(out, dtype=torch.long).T


def test_positions_small_grid_by_hand(env):
    """A 2x3 vision grid, written out: pixel block text-like, grid 3-D, text after at max + 1."""
    tok, cfg = env
    p = build_edit(tok, cfg, EN_EDIT, (32, 48), (1, 4, 6), lang="en")
    ps = p.ids.index(cfg.tokens["<|pixel_start|>"])
    vs = p.ids.index(cfg.tokens["<|vision_start|>"])
    pos = p.position_ids
    # Pixel block (start, 3 pads, EOL, 3 pads, end): consecutive, equal on all axes.
    block = torch.arange(ps, vs)
    assert torch.equal(pos[:, ps:vs], block.expand(3, -1))
    # Vision start at position vs; its 2x3 tokens at base = vs + 1.
    b = vs + 1
    assert pos[:, vs].tolist() == [vs] * 3
    assert pos[:, vs + 1:vs + 7].T.tolist() == [
        [b, b, b], [b, b, b + 1], [b, b, b + 2],
        [b, b + 1, b], [b, b + 1, b + 1], [b, b + 1, b + 2]]
    # Vision end resumes at max (b + 2) + 1, then counts up.
    assert pos[:, vs + 7].tolist() == [b + 3] * 3
    assert torch.equal(pos[:, vs + 7:], (b + 3 + torch.arange(len(p) - vs - 7)).expand(3, -1))
    # Transposed grid (3 rows x 2 cols): height axis runs to b + 2, width to b + 1.
    q = build_edit(tok, cfg, EN_EDIT, (48, 32), (1, 6, 4), lang="en")
    vs = q.ids.index(cfg.tokens["<|vision_start|>"])
    b = vs + 1
    assert q.position_ids[:, vs + 1:vs + 7].T.tolist() == [
        [b, b, b], [b, b, b + 1], [b, b + 1, b], [b, b + 1, b + 1], [b, b + 2, b], [b, b + 2, b + 1]]
    assert q.position_ids[:, vs + 7].tolist() == [b + 3] * 3


# --- golden file -------------------------------------------------------------------------------

def test_golden_ids(env):
    tok, cfg = env
    got = {"tokens": dict(cfg.tokens),
           "cases": {name: build(tok, cfg, kind, lang, text, size).ids for name, kind, lang, text, size in CASES}}
    if os.environ.get("WALLAROO_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in got["cases"].items()]
        GOLDEN.write_text('{\n "tokens": ' + json.dumps(got["tokens"]) + ',\n "cases": {\n'
                          + ",\n".join(lines) + "\n }\n}\n", encoding="utf-8")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; create it with WALLAROO_REGEN_GOLDEN=1"
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert got["tokens"] == golden["tokens"], "the tokenizer fixture's special-token table changed"
    assert sorted(got["cases"]) == sorted(golden["cases"])
    for name, ids in got["cases"].items():
        assert ids == golden["cases"][name], f"{name}: token ids drifted from tests/golden/protocol_ids.json"


# --- batching and errors -----------------------------------------------------------------------

def test_batch_prompts_left_pads(env):
    tok, cfg = env
    cond = build_generate(tok, cfg, EN_PROMPT, (32, 48), lang="en")
    uncond = build_generate(tok, cfg, "", (32, 48), lang="en")
    assert len(uncond) < len(cond)
    pad_id = cfg.tokens["<|endoftext|>"]
    batch = batch_prompts([cond, uncond], pad_id)
    n, k = len(cond), len(cond) - len(uncond)
    assert batch.ids.shape == (2, n) and batch.offsets == [0, k]
    assert batch.ids[0].tolist() == cond.ids
    assert batch.ids[1].tolist() == [pad_id] * k + uncond.ids
    assert batch.valid[0].all() and not batch.valid[1, :k].any() and batch.valid[1, k:].all()
    assert torch.equal(batch.position_ids[:, 0], cond.position_ids)
    assert (batch.position_ids[:, 1, :k] == 1).all()
    assert torch.equal(batch.position_ids[:, 1, k:], uncond.position_ids)
    # Both rows end on the same last position index: the padded row's positions restart at 0 after padding.
    assert batch.position_ids[0, 1, k].item() == 0


def test_batch_prompts_with_slots_offsets(env):
    tok, cfg = env
    cond = build_edit(tok, cfg, EN_EDIT, (48, 32), GRIDS[(48, 32)], lang="en")
    uncond = build_edit(tok, cfg, "", (48, 32), GRIDS[(48, 32)], lang="en")
    batch = batch_prompts([cond, uncond], cfg.tokens["<|endoftext|>"])
    off = batch.offsets[1]
    pad = cfg.tokens["<|image_pad|>"]
    assert all(batch.ids[1, off + s].item() == pad for s in uncond.vision_slots + uncond.pixel_slots)


@pytest.mark.parametrize("lang,short,long", [("en", EN_EDIT, "make the small red circle on the left blue"),
                                             ("zh", ZH_EDIT, "把左边那个小小的红色圆形变成蓝色")])
def test_edit_instruction_first_moves_only_the_template(env, lang, short, long):
    """The tiny model's option: the template before both blocks, every slot and position still consistent."""
    tok, base = env
    cfg = dataclasses.replace(base, protocol=dataclasses.replace(base.protocol, edit_instruction_first=True))
    size, grid = (48, 32), GRIDS[(48, 32)]
    h, w = size
    p = build_edit(tok, cfg, short, size, grid, lang=lang)
    n_vision = grid[0] * grid[1] * grid[2] // 4
    want = (f"{SYSTEM}<|im_start|>user\n{edit_user(lang, short, h, w)}{pixel_text(h, w)}{vision_text(n_vision)}"
            f" <indicator:{h}><indicator:{w}><|im_end|>\n<|generate_start|>")
    assert p.ids == tok.encode(want)
    assert tok.decode(p.ids, skip_special=False) == want
    ref = build_edit(tok, base, short, size, grid, lang=lang)
    assert sorted(p.ids) == sorted(ref.ids) and p.ids != ref.ids
    pad = cfg.tokens["<|image_pad|>"]
    assert len(p.pixel_slots) == len(ref.pixel_slots) == (h // 16) * (w // 16)
    assert len(p.vision_slots) == len(ref.vision_slots) == n_vision
    assert all(p.ids[i] == pad for i in p.pixel_slots + p.vision_slots)
    # Every instruction token comes before the first source slot, so the source tokens can attend to it.
    first_slot = min(p.pixel_slots + p.vision_slots)
    words = tok.encode(short)
    assert any(p.ids[i:i + len(words)] == words for i in range(first_slot - len(words) + 1))
    # From the prompt's end (where drawing starts) each pixel slot is as far whatever the instruction's length;
    # in the reference order it moves with it.
    q = build_edit(tok, cfg, long, size, grid, lang=lang)
    assert len(q) > len(p)
    dist = lambda prompt: [len(prompt) - i for i in prompt.pixel_slots]
    assert dist(q) == dist(p)
    assert dist(build_edit(tok, base, long, size, grid, lang=lang)) != dist(ref)
    # Vision tokens keep their 3-D layout: the same grid offsets from their start as in the reference order.
    rel = lambda prompt: prompt.position_ids[:, prompt.vision_slots] - prompt.position_ids[:, prompt.vision_slots[:1]]
    assert torch.equal(rel(p), rel(ref))


@pytest.mark.parametrize("reserved", ["<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|image_pad|>",
                                      "<|generate_start|>", "<|end_of_line>|", "<indicator:32>"])
def test_reserved_token_text_rejected(env, reserved):
    tok, cfg = env
    bad = f"a red {reserved} circle"
    with pytest.raises(ValueError, match="reserved token text"):
        build_generate(tok, cfg, bad, (32, 48))
    with pytest.raises(ValueError, match="reserved token text"):
        build_edit(tok, cfg, bad, (32, 48), GRIDS[(32, 48)])
    with pytest.raises(ValueError, match="reserved token text"):
        build_understand(tok, cfg, bad, GRIDS[(32, 48)])


def test_unknown_language_rejected(env):
    tok, cfg = env
    with pytest.raises(ValueError, match=r"no prompt template for language 'fr'.*\['en', 'zh'\]"):
        build_generate(tok, cfg, EN_PROMPT, (32, 48), lang="fr")
    with pytest.raises(ValueError, match="no prompt template for language 'fr'"):
        build_edit(tok, cfg, EN_EDIT, (32, 48), GRIDS[(32, 48)], lang="fr")


def test_language_detected_from_text(env):
    tok, cfg = env
    assert build_generate(tok, cfg, ZH_PROMPT, (32, 48)).ids == \
        build_generate(tok, cfg, ZH_PROMPT, (32, 48), lang="zh").ids
    assert build_edit(tok, cfg, ZH_EDIT, (32, 48), GRIDS[(32, 48)]).ids == \
        build_edit(tok, cfg, ZH_EDIT, (32, 48), GRIDS[(32, 48)], lang="zh").ids
    # An empty prompt has no language of its own; callers pass the conditional prompt's.
    assert "生成" in tok.decode(build_generate(tok, cfg, "", (32, 48), lang="zh").ids)


def test_pixel_block_helper(env):
    _, cfg = env
    assert pixel_block(cfg, (48, 32)) == pixel_text(48, 32)


def test_multimodal_positions_of_two_images_with_text_between_written_out_by_hand():
    """Text counts on by one; an image block takes its (t, h, w) merged-grid coordinates plus the running offset;
    the text after it resumes at the block's largest position + 1 (values worked out by hand)."""
    from wallaroo_nodes.engine.rope import multimodal_position_ids
    vs, pad, ve = 90, 91, 92
    ids = [5, vs, pad, pad, pad, pad, ve, 7, vs, pad, pad, ve, 9]
    got = multimodal_position_ids(ids, [(1, 4, 4), (1, 2, 4)], vs, merge=2)
    expected = torch.tensor([
        [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 7, 9, 10],  # temporal
        [0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 9, 10],  # rows
        [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # columns
    ])
    assert torch.equal(got, expected)
    assert torch.equal(multimodal_position_ids(ids[:8], [(1, 4, 4)], vs, merge=2, start=3), expected[:, :8] + 3)
    with pytest.raises(ValueError, match="2 vision-start tokens but 3 images"):
        multimodal_position_ids(ids, [(1, 4, 4), (1, 2, 4), (1, 2, 2)], vs, merge=2)
    with pytest.raises(ValueError, match="needs 8 tokens after its vision start"):
        multimodal_position_ids(ids[:5], [(1, 4, 8)], vs, merge=2)


def test_cached_encoding_is_the_tokenizers_own(env):
    """TextTokenizer caches encodings (training encodes a prompt twice): the cache returns what `tokenizers` does,
    and a caller changing its id list does not change the next caller's."""
    tok, cfg = env
    prompt = build_edit(tok, cfg, "make the circle blue", (64, 64), (1, 8, 8))
    text = tok.decode(prompt.ids, skip_special=False)
    first = tok.encode(text)
    assert first == tok.tokenizer.encode(text, add_special_tokens=False).ids == prompt.ids
    first.append(-1)
    assert tok.encode(text) == prompt.ids
    assert tok.encoding(text).offsets == tok.tokenizer.encode(text, add_special_tokens=False).offsets
