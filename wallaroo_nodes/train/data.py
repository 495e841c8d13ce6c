"""Training examples for the three tasks, built with the engine's own prompt builders.

Training and inference share `engine.protocol`, so the tiny model learns exactly the prompt layout that
the pipeline later feeds it. An example is a prompt plus its continuation (answer text, or image codes in
rows separated by end-of-line tokens); `collate` turns examples into one right-padded batch.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..engine import images
from ..engine.config import WallarooConfig
from ..engine.protocol import Prompt, build_edit, build_generate, build_understand, follow_up_ids
from ..engine.text import TextTokenizer
from ..shapes import (EDIT_KINDS, LANGS, OBJECT_COLOURS, PALETTE, POSITIONS, QA_KINDS, SHAPES, SIZES, Obj, Scene,
                      added_object_span, caption_with_spans, edit_instruction_with_span, edit_kinds,
                      question_answer_about, random_scene, render)
from ..shapes.world import render_array

TASKS = ("understand", "generate", "edit")
# Share of generation and edit prompts dropped so the model learns the unconditional branch CFG guides against.
UNCOND_PROB = 0.1
# What the grounding read-out (recipe.Stage.ground_readout_weight) asks of the grounded head's output about the
# object it looks at: (attribute, values), place first.
READOUT_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (("position", POSITIONS), ("shape", SHAPES),
                                                           ("colour", OBJECT_COLOURS), ("size", SIZES))


class Grounding(NamedTuple):
    """One answer or edit about one object: which answer turn (0 for an edit), the vision tokens that show the
    object, its READOUT_FIELDS, how many objects its scene holds, and, when the query is a prompt token instead
    of the position before the answer or first code, that token's prompt position."""

    turn: int
    mask: torch.Tensor                    # (vision tokens,) bool
    fields: tuple[int, ...]               # the object's index in each READOUT_FIELDS value list
    scene_objects: int
    prompt_query: int | None = None


class CaptionGrounding(NamedTuple):
    """One object of a generation caption (or the source object an edit instruction names): the image cells it
    touches (raster order), the prompt positions of the phrase that describes it, its READOUT_FIELDS, and its
    scene's object count."""

    cells: torch.Tensor                   # (rows * cols,) bool
    phrase_positions: list[int]
    fields: tuple[int, ...]
    scene_objects: int
    # A moved object's new place (`ground_edit_moves`): its cells look up the words for the object's looks.
    moved: bool = False
    # An added object (`ground_edit_adds`): the trainer may send it through the caption head, as generation does.
    added: bool = False


def readout_fields(obj: Obj) -> tuple[int, ...]:
    """The object's READOUT_FIELDS as value indices."""
    return tuple(values.index(getattr(obj, name)) for name, values in READOUT_FIELDS)


@dataclass
class Example:
    """One training sequence before embedding."""

    task: str
    prompt: Prompt
    answer_ids: list[int] = field(default_factory=list)       # understand: answer + <|im_end|> (+ more turns)
    answer_is_target: list[bool] | None = None                # per answer id: trained on (None: all are)
    target_image: Image.Image | None = None                   # generate / edit: image whose codes follow
    source_image: Image.Image | None = None                   # understand / edit: the vision input
    vision_grid: tuple[int, int, int] | None = None
    vision_patches: torch.Tensor | None = None
    pixel_source: torch.Tensor | None = None                  # edit: (1, 3, H, W) VQ input in [-1, 1]
    # understand, with `ground`: per answer that names one object, where and what that object is
    ground: list[Grounding] = field(default_factory=list)
    # generate, with `ground_captions`: per object of the caption, where it starts and which words describe it;
    # edit, with `ground_edit_refs`: the same for the source object the instruction names
    caption_ground: list[CaptionGrounding] = field(default_factory=list)


def _weighted_kind(rng: random.Random, kinds: tuple[str, ...], weights: dict[str, float]) -> str:
    """One of `kinds`, drawn by `weights` (a kind they leave out weighs 1)."""
    return rng.choices(kinds, [weights.get(k, 1.0) for k in kinds])[0]


def object_cell_mask(scene: Scene, obj: Obj, rows: int, cols: int, min_share: float = 0.05) -> torch.Tensor:
    """(rows * cols,) bool: which cells of a rows x cols grid over the canvas (raster order) have more than
    `min_share` of their area covered by `obj`."""
    # The mask depends on the object and the canvas only, and a shapes world has few of those: cached, each
    # caller gets its own copy.
    return _object_cell_mask(scene.canvas, scene.background, obj, rows, cols, min_share).clone()


@functools.lru_cache(maxsize=8192)
def _object_cell_mask(canvas: tuple[int, int], background: str, obj: Obj, rows: int, cols: int,
                      min_share: float) -> torch.Tensor:
    alone = render_array(Scene(canvas, background, (obj,))).astype(np.int16)
    background_rgb = np.array(PALETTE[background], dtype=np.int16)
    on = torch.from_numpy((np.abs(alone - background_rgb).sum(-1) > 30).astype(np.float32))[None, None]
    return (F.adaptive_avg_pool2d(on, (rows, cols)) > min_share).flatten()


def object_token_mask(scene: Scene, obj: Obj, grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """(vision tokens,) bool: the merged vision tokens (raster order) that show some of `obj`'s pixels."""
    # A sliver under 5% of a token is antialiasing, not the object.
    return object_cell_mask(scene, obj, grid[1] // merge, grid[2] // merge)


def text_token_positions(tok: TextTokenizer, prompt: Prompt, text: str,
                         spans: list[tuple[int, int]]) -> list[list[int]]:
    """Per [start, end) character span of `text` (which the prompt holds once), the prompt positions of the
    tokens that overlap it."""
    full = tok.decode(prompt.ids, skip_special=False)
    encoding = tok.encoding(full)
    if encoding.ids != list(prompt.ids) or full.count(text) != 1:
        raise ValueError(f"cannot find {text!r} in the prompt's tokens once")
    at = full.index(text)
    return [[j for j, (a, b) in enumerate(encoding.offsets) if a < at + end and b > at + start]
            for start, end in spans]


def caption_grounding(tok: TextTokenizer, cfg: WallarooConfig, prompt: Prompt, scene: Scene, text: str,
                      spans: list[tuple[Obj, int, int]]) -> list[CaptionGrounding]:
    """The CaptionGrounding of each object of `scene` that a span of `text` describes (a generation caption's
    `caption_with_spans`, or an edit instruction's reference to a source object)."""
    ds = cfg.vq.downsample
    rows, cols = scene.canvas[0] // ds, scene.canvas[1] // ds
    positions = text_token_positions(tok, prompt, text, [(start, end) for _, start, end in spans])
    # Every cell the object touches: the VQ codes even a tip's few pixels, and that cell is where the model first
    # draws the object (the trainer takes the first of these whose code is not the background's).
    return [CaptionGrounding(object_cell_mask(scene, obj, rows, cols, min_share=0.0), phrase, readout_fields(obj),
                             len(scene.objects)) for (obj, _, _), phrase in zip(spans, positions)]


def grounding(turn: int, scene: Scene, obj: Obj, grid: tuple[int, int, int], cfg: WallarooConfig,
              prompt_query: int | None = None) -> Grounding:
    """The Grounding of an answer (turn) or edit (turn 0) about `obj` in `scene`, seen through a vision `grid`
    (queried from prompt position `prompt_query` when given)."""
    mask = object_token_mask(scene, obj, grid, cfg.vision.spatial_merge_size)
    return Grounding(turn, mask, readout_fields(obj), len(scene.objects), prompt_query)


def make_example(task: str, rng: random.Random, tok: TextTokenizer, cfg: WallarooConfig,
                 canvases: list[tuple[int, int]], uncond_prob: float = UNCOND_PROB, qa_turns: int = 1,
                 n_objects: int | None = None, qa_kind_weights: dict[str, float] | None = None,
                 edit_kind_weights: dict[str, float] | None = None, ground: bool = False,
                 ground_edits: bool = False, ground_captions: bool = False, ground_edit_refs: bool = False,
                 ground_edit_words: bool = False, ground_edit_adds: bool = False,
                 ground_edit_moves: bool = False, ground_edit_moves_source: bool = False) -> Example:
    """A random example of a task on one of the given canvases; prompts are dropped for CFG with uncond_prob.

    `n_objects` fixes the scene's object count (1 or 2); None draws it.
    `qa_kind_weights` and `edit_kind_weights` weigh question and edit kinds (a kind left out weighs 1); None
    draws them uniformly.
    Understanding examples ask `qa_turns` questions about the image in one chat: every answer is a training
    target for the price of one pass through the vision tower. With `ground`, each answer about one object
    also records the vision tokens that show it (`Example.ground`); with `ground_edits` so does each edit
    instruction that names an object of the source, and with `ground_captions` each object a generation caption
    describes (`Example.caption_ground`); with `ground_edit_refs` an edit records the named source object's cells
    and the words that name it there instead; with `ground_edit_words` an edit's grounding (as `ground_edits`)
    is queried from the last instruction token that names the object. Both together are two hops: the words
    fetch the object from the vision tokens, the first changed cell fetches the words. With `ground_edit_adds` (and
    `ground_edit_refs`) an edit adding an object grounds the new object's first cell on the words that describe it,
    as a generation caption does; with `ground_edit_moves` (and `ground_edit_refs`) a moved object's first cell
    at its new place grounds on the words that name it too (`CaptionGrounding.moved`), or with
    `ground_edit_moves_source` on the vision tokens that show it in the source. The draws are the same either way.
    """
    if ground_edit_moves_source and not ground_edit_moves:
        raise ValueError("ground_edit_moves_source changes what ground_edit_moves grounds a moved object on: it needs "
                         "ground_edit_moves")
    if (ground_edit_adds or ground_edit_moves) and not ground_edit_refs:
        raise ValueError("ground_edit_adds and ground_edit_moves ground edits the way ground_edit_refs grounds named "
                         "objects: they need ground_edit_refs")
    if ground_edits and (ground_edit_refs or ground_edit_words):
        raise ValueError("ground_edits (from the first code) grounds the same edits as ground_edit_words (from the "
                         "naming words) and ground_edit_refs (the caption head), from another query: choose one, "
                         "ground_edits or the others (alone or together)")
    for name, weights, kinds in (("qa_kind_weights", qa_kind_weights, QA_KINDS),
                                 ("edit_kind_weights", edit_kind_weights, EDIT_KINDS)):
        unknown = set(weights or ()) - set(kinds)
        if unknown:
            raise ValueError(f"{name} names unknown kinds {sorted(unknown)}; kinds are {kinds}")
    canvas = rng.choice(canvases)
    lang = rng.choice(LANGS)
    scene = random_scene(rng, canvas=canvas, n_objects=n_objects)
    if task == "understand":
        named: list[tuple[int, Obj]] = []  # (turn, the object its question names)
        turns = 0

        def ask() -> tuple[str, str]:
            nonlocal turns
            # kind None: the uniform draw earlier runs' data orders were made with
            kind = None if qa_kind_weights is None else _weighted_kind(rng, QA_KINDS, qa_kind_weights)
            question, answer, obj = question_answer_about(scene, lang, rng, kind=kind)
            if obj is not None:
                named.append((turns, obj))
            turns += 1
            return question, answer

        question, answer = ask()
        image = render(scene)
        patches, grid = images.vision_inputs(image, cfg.vision)
        prompt = build_understand(tok, cfg, question, grid)
        im_end = cfg.token_id("<|im_end|>")
        ids = tok.encode(answer) + [im_end]
        targets = [True] * len(ids)
        for _ in range(qa_turns - 1):
            question, answer = ask()
            turn = follow_up_ids(tok, cfg, question)
            reply = tok.encode(answer) + [im_end]
            ids += turn + reply
            targets += [False] * len(turn) + [True] * len(reply)
        grounds = [grounding(turn, scene, obj, grid, cfg) for turn, obj in named] if ground else []
        return Example(task, prompt, answer_ids=ids, answer_is_target=targets, source_image=image, vision_grid=grid,
                       vision_patches=patches, ground=grounds)
    if task == "generate":
        text, spans = ("", []) if rng.random() < uncond_prob else caption_with_spans(scene, lang, rng)
        prompt = build_generate(tok, cfg, text, canvas, lang=lang)
        grounds = caption_grounding(tok, cfg, prompt, scene, text, spans) if ground_captions and spans else []
        return Example(task, prompt, target_image=render(scene), caption_ground=grounds)
    if task == "edit":
        # kind None: the uniform draw earlier runs' data orders were made with
        kind = None if edit_kind_weights is None else _weighted_kind(rng, edit_kinds(scene), edit_kind_weights)
        instruction, target, named_obj, span = edit_instruction_with_span(scene, lang, rng, kind=kind)
        source = render(scene)
        if rng.random() < uncond_prob:
            named_obj = None
            if cfg.protocol.edit_uncond_keeps_source:
                instruction, target = "", scene  # nothing asked, nothing changed
            else:
                instruction, source = "", Image.new("RGB", source.size, (0, 0, 0))
        patches, grid = images.vision_inputs(source, cfg.vision, cfg.vision.edit_min_pixels, cfg.vision.edit_max_pixels)
        prompt = build_edit(tok, cfg, instruction, canvas, grid, lang=lang)
        grounds = []
        if (ground_edits or ground_edit_words) and named_obj:
            # With ground_edit_words the query is the last word naming the object: the instruction follows both
            # source images, so its words can fetch the object for the edited image's cells to read (edits naming
            # it by colour, shape or size alone were chance).
            query = text_token_positions(tok, prompt, instruction, [span])[0][-1] if ground_edit_words else None
            grounds = [grounding(0, scene, named_obj, grid, cfg, query)]
        refs = caption_grounding(tok, cfg, prompt, scene, instruction, [(named_obj, *span)]) \
            if ground_edit_refs and named_obj else []
        new_objects = [o for o in target.objects if o not in scene.objects]
        if ground_edit_moves and refs and new_objects and new_objects[0].position != named_obj.position:
            # The object drawn at its new place: its cells must bring its looks from where the words found it.
            (at_new_place,) = caption_grounding(tok, cfg, prompt, target, instruction, [(new_objects[0], *span)])
            if ground_edit_moves_source:
                # Its looks from where the source shows it rather than from the words: words taught every cell to
                # take looks from the instruction, and background edits drew invented objects (seventy-fourth run).
                shown = object_token_mask(scene, named_obj, grid, cfg.vision.spatial_merge_size)
                at_new_place = at_new_place._replace(
                    phrase_positions=[prompt.vision_slots[i] for i in shown.nonzero().flatten().tolist()])
            refs.append(at_new_place._replace(moved=True))
        if ground_edit_adds and instruction and len(target.objects) > len(scene.objects):
            # No source object to name: the new one's cells look up its description, which holds its place too.
            (added,) = new_objects
            refs = [g._replace(added=True) for g in caption_grounding(
                tok, cfg, prompt, target, instruction, [(added, *added_object_span(instruction, lang))])]
        return Example(task, prompt, target_image=render(target), source_image=source, vision_grid=grid,
                       vision_patches=patches, pixel_source=images.vq_input(source, canvas), ground=grounds,
                       caption_ground=refs)
    raise ValueError(f"unknown task {task!r}")


@dataclass
class Batch:
    """A right-padded batch of one task, with everything needed for the loss."""

    task: str
    ids: torch.Tensor               # (B, L) token ids (placeholders where codes go)
    valid: torch.Tensor             # (B, L)
    position_ids: torch.Tensor      # (3, B, L)
    vision_patches: torch.Tensor | None
    vision_grids: torch.Tensor | None   # (num_images, 3)
    vision_index: torch.Tensor | None   # (rows, cols) flat (batch*L) indices receiving vision features
    pixel_sources: torch.Tensor | None  # (B, 3, H, W)
    pixel_index: torch.Tensor | None    # flat indices receiving pixel features, row-major per example
    target_images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]
    code_input_index: torch.Tensor | None   # flat indices where generated codes are fed
    code_target_index: torch.Tensor | None  # flat indices whose hidden state predicts a code
    text_target_index: torch.Tensor | None  # flat indices whose hidden state predicts a text token
    text_targets: torch.Tensor | None
    # Grounding (examples made with `ground` or `ground_edits`): per answer about one object, the flat index of
    # the position that predicts its first token, its row's vision slots (positions in the row) and which of them
    # show the object; per edit that names an object, the same from the position that predicts the first code.
    # Generation batches (`ground_captions`): per object of a caption, the position that predicts the object's
    # first cell, and as keys its phrase's positions (right-padded, the padding not a target). Edit batches
    # (`ground_edit_refs`): the same for the named source object, from its first changed cell.
    ground_query_index: torch.Tensor | None = None   # (Q,)
    ground_key_index: torch.Tensor | None = None     # (Q, keys)
    ground_target: torch.Tensor | None = None        # (Q, keys) bool
    ground_fields: torch.Tensor | None = None        # (Q, len(READOUT_FIELDS)) the named object's value indices
    ground_scene_objects: torch.Tensor | None = None  # (Q,) objects in the answer's scene
    # Generation and edit batches: per query, the cells its object touches and the index in code_target_index of
    # its example's first cell (the trainer sets ground_query_index from them and the codes).
    ground_cells: torch.Tensor | None = None          # (Q, rows * cols) bool
    ground_cell_base: torch.Tensor | None = None      # (Q,)
    # With ground_cells: which queries are cells (the caption head's); the others (an edit's naming words, with
    # `ground_edit_words` beside `ground_edit_refs`) keep their query and ground on the vision tokens.
    ground_by_cell: torch.Tensor | None = None        # (Q,) bool
    # Which cell queries are a moved object's new place (`ground_edit_moves`): the trainer gives them their own head.
    ground_moved: torch.Tensor | None = None          # (Q,) bool
    # Which cell queries are an added object's first cell (`ground_edit_adds`).
    ground_added: torch.Tensor | None = None          # (Q,) bool


def collate(examples: list[Example], cfg: WallarooConfig) -> Batch:
    """Lay examples out as full sequences (prompt + continuation), right-padded, with loss index tables."""
    task = examples[0].task
    assert all(e.task == task for e in examples), "a batch holds one task"
    ds = cfg.vq.downsample
    eol, pad_code = cfg.token_id("<|end_of_line>|"), cfg.token_id("<|generate_image_pad|>")
    rows_ids, rows_pos = [], []
    vision_idx, pixel_idx, code_in, code_tgt, text_tgt, text_y = [], [], [], [], [], []
    ground_q, ground_k, ground_t, ground_f, ground_n = [], [], [], [], []
    ground_cells: list[torch.Tensor | None] = []  # None: a vision-grounded query (no cells)
    ground_cell_base = []
    ground_moved: list[bool] = []
    ground_added: list[bool] = []
    seqs = []
    for e in examples:
        ids = list(e.prompt.ids)
        cont: list[int] = []
        if task == "understand":
            cont = list(e.answer_ids)
        else:
            h, w = e.target_image.height // ds, e.target_image.width // ds
            for r in range(h):
                cont += [pad_code] * w + ([eol] if r < h - 1 else [])
        seqs.append((ids, cont))
    length = max(len(a) + len(b) for a, b in seqs)
    for b, (e, (ids, cont)) in enumerate(zip(examples, seqs)):
        base = b * length
        n_prompt = len(ids)
        full = ids + cont
        pos = torch.ones(3, length, dtype=torch.long)
        pos[:, :n_prompt] = e.prompt.position_ids
        start = int(e.prompt.position_ids[:, -1].max()) + 1
        pos[:, n_prompt:len(full)] = torch.arange(start, start + len(cont))
        rows_ids.append(full + [cfg.token_id("<|endoftext|>")] * (length - len(full)))
        rows_pos.append(pos)
        vision_idx += [base + s for s in e.prompt.vision_slots]
        pixel_idx += [base + s for s in e.prompt.pixel_slots]
        if e.ground:
            targets = e.answer_is_target or [True] * len(cont)
            # Turn k's answer starts at the k-th run of target ids, an edited image at its first code; the
            # position before it predicts it.
            starts = [j for j, t in enumerate(targets) if t and (j == 0 or not targets[j - 1])]
            for turn, mask, fields, scene_objects, prompt_query in e.ground:
                if len(mask) != len(e.prompt.vision_slots):
                    raise ValueError(f"grounding mask has {len(mask)} tokens, the image {len(e.prompt.vision_slots)}")
                ground_q.append(base + (prompt_query if prompt_query is not None else n_prompt + starts[turn] - 1))
                ground_k.append(e.prompt.vision_slots)
                ground_t.append(mask)
                ground_f.append(fields)
                ground_n.append(scene_objects)
                ground_cells.append(None)
                ground_cell_base.append(0)
                ground_moved.append(False)
                ground_added.append(False)
        for cells, phrase, fields, scene_objects, moved, added in e.caption_ground:
            # The query (the position predicting the object's first drawn cell) needs the VQ's codes: the trainer
            # finds it from the cells and where this example's code targets begin.
            ground_q.append(-1)
            ground_cells.append(cells)
            ground_cell_base.append(len(code_tgt))
            ground_k.append(phrase)
            ground_t.append(torch.ones(len(phrase), dtype=torch.bool))
            ground_f.append(fields)
            ground_n.append(scene_objects)
            ground_moved.append(moved)
            ground_added.append(added)
        for j, t in enumerate(cont):
            at = n_prompt + j
            if task == "understand":
                if e.answer_is_target is None or e.answer_is_target[j]:
                    text_tgt.append(base + at - 1)
                    text_y.append(t)
            elif t == pad_code:
                code_in.append(base + at)
                code_tgt.append(base + at - 1)
    ids = torch.tensor(rows_ids, dtype=torch.long)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for b, (a, c) in enumerate(seqs):
        valid[b, :len(a) + len(c)] = True

    def idx(values: list[int]) -> torch.Tensor | None:
        return torch.tensor(values, dtype=torch.long) if values else None

    with_vision = [e for e in examples if e.vision_patches is not None]
    by_cell = [c is not None for c in ground_cells]
    if any(by_cell):  # phrases (and vision slots) differ in length: pad, never a target
        width = max(len(t) for t in ground_t)
        ground_k = [list(k) + [0] * (width - len(k)) for k in ground_k]
        ground_t = [F.pad(t, (0, width - len(t))) for t in ground_t]
        # A batch holds one canvas, so every cell mask has the same length.
        no_cells = torch.zeros_like(next(c for c in ground_cells if c is not None))
        ground_cells = [no_cells if c is None else c for c in ground_cells]
    else:
        ground_cells, ground_cell_base = [], []
    return Batch(
        task=task, ids=ids, valid=valid, position_ids=torch.stack(rows_pos, dim=1),
        vision_patches=torch.cat([e.vision_patches for e in with_vision]) if with_vision else None,
        vision_grids=torch.tensor([e.vision_grid for e in with_vision]) if with_vision else None,
        vision_index=idx(vision_idx),
        pixel_sources=torch.cat([e.pixel_source for e in examples]) if task == "edit" else None,
        pixel_index=idx(pixel_idx),
        target_images=(torch.cat([images.vq_input(e.target_image, (e.target_image.height, e.target_image.width))
                                  for e in examples]) if task != "understand" else None),
        code_input_index=idx(code_in), code_target_index=idx(code_tgt),
        text_target_index=idx(text_tgt), text_targets=idx(text_y),
        ground_query_index=idx(ground_q), ground_key_index=idx(ground_k),
        ground_target=torch.stack(ground_t) if ground_t else None,
        ground_fields=torch.tensor(ground_f, dtype=torch.long) if ground_f else None,
        ground_scene_objects=idx(ground_n),
        ground_cells=torch.stack(ground_cells) if ground_cells else None, ground_cell_base=idx(ground_cell_base),
        ground_by_cell=torch.tensor(by_cell) if ground_cells else None,
        ground_moved=torch.tensor(ground_moved) if any(ground_moved) else None,
        ground_added=torch.tensor(ground_added) if any(ground_added) else None)
