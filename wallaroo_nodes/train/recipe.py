"""The tiny Wallaroo recipe: tokenizer, VQ, stage 0 (understanding pretraining standing in for Qwen2.5-VL),
then the paper's stages 1 alignment, 2 joint pretraining, 3 multi-resolution, 4 unified fine-tuning.

`python -m wallaroo_nodes.train --out runs/tiny` runs everything and exports a model folder; rerunning
resumes from the last checkpoint. Under `torchrun --nproc-per-node N` the same script trains data-parallel.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from ..engine.config import LLMConfig, ProtocolConfig, SamplingDefaults, VisionConfig, VQConfig, WallarooConfig
from ..engine.model import WallarooModel
from ..engine.rope import apply_rotary, mrope_cos_sin
from ..engine.text import TextTokenizer
from ..engine.vq import VQModel
from ..engine.weights import save_model_folder
from ..shapes import CANVAS_SIZES, random_scene, render
from ..shapes.world import object_side
from ..engine import images
from .data import READOUT_FIELDS, UNCOND_PROB, Batch, Example, collate, make_example
from .schedule import SAVE_EVERY_S, lr_at, save_checkpoint
from .tokenizer import train_tokenizer
from .vision_pretrain import pretrain_vision

ALL_CANVASES = [tuple(c) for c in CANVAS_SIZES]
VISION_STEPS = 1300  # scene-parsing steps before stage 0 (vision_pretrain.py says why; fields right 0.994 by 1,074)
SQUARE = [(64, 64)]
FIRST_CELL_WEIGHT = 4.0
# Stage 4's edit kinds: the ones two-object edits missed most (move 0.45, recolour 0.46, reshape 0.58 of the
# forty-third run's; remove 0.65 and move 0.68 of the fifty-seventh's 2,000) weigh more, the added object it nearly
# always made (0.93) less. Background changes weigh 1: at 0.5 they fell to 0.67 once two-hop grounding came in
# (seventy-fifth run), at 1 they made 0.89 (seventy-sixth run, r76c).
STAGE4_EDIT_KIND_WEIGHTS = {"move": 2.0, "remove": 2.0, "recolour": 1.5, "reshape": 1.25, "background": 1.0,
                            "add": 0.5}
# How many times `--ground` counts an answer about one of two objects (Stage.ground_two_object_weight says why).
GROUND_TWO_OBJECTS = 3.0
# Weight of caption grounding (Stage.caption_ground_weight) in the recipe's stages 2-4: `--ground-captions`'s default.
GROUND_CAPTIONS = 1.0
# `--ground-edit-moves`'s head (Stage.move_ref_head says why this one) and what its probes read: the moved object's
# looks, which its new place must draw.
MOVE_REF_HEAD = (3, 2)
MOVE_READOUT_FIELDS = ("shape", "colour", "size")
# The head of the edits' second grounding hop (Stage.edit_ref_head says why a layer after the first hop's).
EDIT_REF_HEAD = (3, 0)


@dataclass
class Stage:
    """One training stage: what it trains, on which tasks and canvases, for how long."""

    name: str
    steps: int
    lr: float
    tasks: dict[str, float]
    canvases: list[tuple[int, int]]
    # "all"; "reader": all but the vision tower; "align": only generation heads/adapters and token embeddings.
    trainable: str = "all"
    batch_size: int = 32
    # Questions asked per understanding image, each answer a target: the LLM is slow to learn to find the
    # object among the vision tokens, and every extra answer about the same image is one more signal for that.
    qa_turns: int = 3
    # Weights of understanding question kinds and of edit kinds (a kind left out weighs 1); None: uniform.
    qa_kind_weights: dict[str, float] | None = None
    edit_kind_weights: dict[str, float] | None = None
    # Object counts drawn for generation scenes (understanding always sees one or two objects).
    gen_objects: tuple[int, ...] = (1, 2)
    # Object counts drawn for edit sources; None: one or two, drawn by the scene generator as in earlier runs.
    edit_objects: tuple[int, ...] | None = None
    # Share of edit examples whose instruction is dropped (the source kept as the target): what CFG guides
    # against. Generation keeps data.make_example's default.
    edit_uncond_prob: float = UNCOND_PROB
    # Start the editing head and adapters as copies of generation's (they predict and embed the same VQ codes)
    # instead of from random weights.
    edit_from_generation: bool = False
    # Loss weight of the cell where each object starts in a generated image (first in raster order): the one
    # cell that must read the caption's colour, shape and size; every later object cell copies its neighbours.
    first_cell_weight: float = 1.0
    # Whether edited images weigh start cells (by first_cell_weight) too: "none", "objects" (each target
    # object's first cell) or "objects+changes" (also the first cell of each region where the target's code
    # differs from the source's).
    edit_start_cells: str = "none"
    # Weight of the grounding loss (`grounding_loss`): one attention head, `ground_head` = (layer, head), is
    # taught to look at the object a question names from the position that starts the answer. 0: off.
    ground_weight: float = 0.0
    ground_head: tuple[int, int] = (2, 0)
    # Weight of the grounding read-out: linear probes trained with the stage read the named object's place,
    # shape, colour and size (data.READOUT_FIELDS) from the grounded head's output at the answer start, so its
    # values must carry them. Grounded from stage 0 the head fetched the object's colour but not its place
    # (docs/tiny_model_runs.md, stage-0 probes). The probes are dropped at export. 0: off; needs ground_weight.
    ground_readout_weight: float = 0.0
    # How many times an answer about one of two objects counts in the grounding loss and read-out, against one for
    # a one-object scene: those are where the head must tell the named object from the other (stage-0 probes,
    # docs/tiny_model_runs.md); grounding only them did not learn at all.
    ground_two_object_weight: float = 1.0
    # Whether edits that name an object of the source are grounded too: from the position that predicts the edited
    # image's first code, the head looks at that object's vision tokens. Two-object edits missed the named object
    # most (move 0.41, recolour 0.32 of the thirty-fourth run's edits). Off: in stage 4 it held the edit image loss
    # at twice the run without it, from every code or from the first (forty-fourth and forty-fifth runs,
    # docs/tiny_model_runs.md). Needs ground_weight.
    ground_edits: bool = False
    # The same grounding queried from the instruction's last token that names the object instead of the first
    # code: the instruction follows both source images, so its words can fetch the object for the cells to read.
    # Two-object edits named by colour, shape or size alone succeed 0.36-0.43, named by place 0.84-0.92 (eval's
    # `editing.by_reference`). 500 probe steps on a finished model: the words found the object (grounding loss
    # 1.05 -> 0.12), the edits did not follow (sixty-seventh run, docs/tiny_model_runs.md). Needs ground_weight;
    # not with ground_edits. With caption_ground_edits it is the first of two hops: the words fetch the object,
    # the first changed cell fetches the words (TrainingModel.grounding_groups). Measured so (sixty-eighth run):
    # editing 0.523, looks-named 0.53 but recolour 0.16, as the caption head brings the old looks to the cell.
    ground_edit_words: bool = False
    # Weight of caption grounding in generation batches: from the position that predicts each object's first cell,
    # head `caption_ground_head` is taught to look at the caption phrase that describes the object, and probes
    # must read the object's place, shape, colour and size from that head's output. Two-object prompts drew the
    # right colours on the wrong objects (swapped: 11 of 24 images of the fifty-second run's stage 3): the cell
    # must find its own object's words. 0: off. A head of the other key/value group than `ground_head`'s, so the
    # two lookups (vision tokens, caption words) do not share keys.
    caption_ground_weight: float = 0.0
    caption_ground_head: tuple[int, int] = (2, 2)
    # Whether edits that name an object of the source are grounded the same way: from the position that predicts
    # the first cell of that object the edit changes, the caption head looks at the words that name it, and the
    # caption probes read the object from there. Edits fail mostly by changing the other object of two (remove
    # 0.58, move 0.68, recolour 0.70 of the fifty-fifth run's 2,000). Needs caption_ground_weight; not with
    # ground_edits.
    caption_ground_edits: bool = False
    # With caption_ground_edits, edits that add an object are grounded too: the new object's first cell looks up the
    # words that describe it (and its place), through the same head and probes. With place-only probes and no such
    # grounding, added objects took the source object's shape or size, and background edits drew copies of it (add
    # 0.89 -> 0.74, background 0.94 -> 0.76 of 2,000, r73d against r72b). Measured with r73d's options on its stages
    # 0-3 (r74c, seventy-fourth run): add 0.66, editing 0.794 against 0.8095; the new object still took the source
    # object's size and shape, since place-only probes do not bring its looks from the words. Off.
    caption_ground_adds: bool = False
    # With caption_ground_adds, whether those queries go through the caption head and its probes of every field (the
    # route a generated object's first cell takes to its caption words) instead of the edit head: r74c's new objects
    # took the source object's looks because place-only probes bring none from the words.
    adds_via_caption_head: bool = False
    # With caption_ground_edits, the head (layer, head) that grounds a moved object's first cell at its new place
    # on the words that name it, with probes reading the object's looks (not its place) from there; None: moves are
    # grounded like the other named edits only, from the first cell they change. Moves failed most (0.66 of r73d's
    # 2,000; 0.46 with two objects, the moved object drawn in the other's colour or shape). Its own key/value group
    # (heads 2-3 of layer 3 share theirs; the edit head's are 0-1), so the looks it brings do not reach the edit
    # head's cells, which must draw the new looks of a recoloured or reshaped object. Measured with adds grounded too
    # (r74d, seventy-fourth run): two-object moves 0.46 -> 0.65 (replayed cases), but background edits fell to 0.04,
    # their cells drawing looks from the instruction words (invented objects), and editing to 0.551. Off.
    move_ref_head: tuple[int, int] | None = None
    # With move_ref_head, the moved object's new place grounds on the vision tokens that show it in the source
    # instead of the words, which taught every cell to take looks from the instruction (r74d's background edits).
    move_ref_on_source: bool = False
    # The head (layer, head) that grounds those edits, with probes of its own; None: `caption_ground_head`. With
    # ground_edit_words the edit's second hop (cell to words) must sit in a later layer than the first (words to
    # object, `ground_head`): in the same layer the cell reads the words as they were before they fetched the
    # object, so only their old looks (sixty-eighth run, where both were in layer 2). Its own head also leaves the
    # caption head, which tells a generated cell what to draw, to generation. Both hops with (3, 0) (sixty-ninth
    # run): looks-named edits 0.71 (the bundle 0.43), but editing 0.671 of 2,000, background edits 0.46.
    edit_ref_head: tuple[int, int] | None = None
    # Whether that head has read-out probes (the source object's fields from its output at the cell). Off, only
    # where it looks is taught, and what it brings is left to the image loss: the probes make it carry the
    # object's old colour and shape to the cell that must draw the new ones.
    edit_ref_readout: bool = True
    # Which of READOUT_FIELDS those probes read (None: all). Both hops with all four (sixty-ninth run) lifted
    # looks-named edits 0.37 -> 0.71 and broke recolour; both hops without them (seventy-third run) left looks-named
    # edits at 0.32-0.45. So the probes are what carries the named object to the cell, its old looks included:
    # ("position",) lets the head carry only where the named object is, which a cell can compare with its own place
    # as it does with a place word. Measured so (r73d, one seed): looks-named 0.85, editing 0.8095, add and
    # background edits down to 0.74 / 0.76. The recipe's default since the seventy-fifth run, with both hops, head
    # (3, 0) and no first-hop read-out in stage 4 (RUN_OPTION_DEFAULTS).
    edit_ref_readout_fields: tuple[str, ...] | None = None
    # Added to the run's --seed for this stage's data: the bundle's stages 2-4 drew their examples from the
    # next seed after stages 0-1 (twentieth run, docs/tiny_model_runs.md), so one command draws that data order.
    seed_offset: int = 0
    # Whether the LLM's last layer computes only the rows from the batch's first target on (`first_output_row`):
    # the same losses and gradients up to float rounding, the last layer's queries and MLP over less than half of
    # an edit's rows (its prompt comes first). Off by default until a whole run with it is measured: it rounds
    # differently, so a run with it is a new draw, not the bundle's.
    last_layer_on_targets: bool = False


def default_stages(scale: float = 1.0) -> list[Stage]:
    """The curriculum; `scale` stretches or shrinks every stage's step count (tests use tiny scales)."""
    def n(steps: int) -> int:
        return max(2, int(steps * scale))
    return [
        # The pretrained tower stays frozen while the new LLM learns to read it (trainable_parameters says why).
        Stage("0-understanding-pretrain", n(900), 1e-3, {"understand": 1.0}, ALL_CANVASES, trainable="reader"),
        Stage("1-alignment", n(250), 1e-3, {"generate": 1.0}, SQUARE, trainable="align", gen_objects=(1,)),
        # Generation is bounded by how many image samples it sees, and one-object scenes bind the colour word
        # long before two-object ones do (probes from the stage-1 weights; docs/tiny_model_runs.md). So stage 2
        # is long, mostly generation, with three quarters of its scenes one-object; stage 3 brings the second
        # object and the other canvases.
        # From stage 2 on, the cell where each generated object starts weighs 4x in the image loss: the one cell
        # that must read the caption (Stage.first_cell_weight; nineteenth and twentieth runs,
        # docs/tiny_model_runs.md).
        # Caption grounding binds each object's words by step 1,750 of 2,600 (fifty-seventh run), so 1,800 suffice.
        Stage("2-joint-pretrain", n(1800), 1e-3, {"generate": 0.85, "understand": 0.15}, SQUARE,
              gen_objects=(1, 1, 1, 2), first_cell_weight=FIRST_CELL_WEIGHT, seed_offset=1),
        # With a token per Han character (train/tokenizer.py) 2,400 steps at generation 0.8 drew two objects
        # 0.66 after stage 3; 3,000 at 0.9 drew 0.81 (thirty-third and thirty-fourth runs, docs/tiny_model_runs.md).
        # With the binding learnt in stage 2 (caption grounding), 2,500 steps instead of 3,000, for the wall time.
        Stage("3-multi-resolution", n(2500), 7e-4, {"generate": 0.9, "understand": 0.1}, ALL_CANVASES,
              first_cell_weight=FIRST_CELL_WEIGHT, seed_offset=1),
        # Edits weigh the same start cells, and also where each change begins. Edits are step-limited: 60% of
        # 3,600 steps edit 0.62-0.63 where 55% of 1,800 edited 0.465; a quarter understanding keeps it at 0.95
        # (a fifth: 0.93), and generation holds on 15% (twenty-second, twenty-seventh to twenty-ninth runs,
        # docs/tiny_model_runs.md).
        # Two edit sources in three have two objects, and the kinds that fail most there weigh more: on the same
        # stage 3 this levelled editing across canvases (gap 0.078 -> 0.036 on 400 edits) at the same success
        # (0.757 against 0.762), and understanding rose to 0.985 (forty-seventh run, docs/tiny_model_runs.md).
        # 3,400 steps keep the 2,160 edit steps of 3,600 at 60% and give understanding 765 steps instead of 900: it
        # answered 0.961 of 1,000 against the fifty-seventh run's 0.998 (fifty-ninth run; stage 3 left it at 0.881).
        Stage("4-unified-finetune", n(3400), 5e-4, {"generate": 0.14, "understand": 0.225, "edit": 0.635}, ALL_CANVASES,
              edit_from_generation=True, first_cell_weight=FIRST_CELL_WEIGHT, edit_start_cells="objects+changes",
              edit_objects=(1, 2, 2), edit_kind_weights=STAGE4_EDIT_KIND_WEIGHTS, seed_offset=1),
    ]


def with_caption_grounding(stages: list[Stage], weight: float, edits: bool = False,
                           edit_head: tuple[int, int] | None = None, edit_readout: bool = True,
                           edit_readout_fields: tuple[str, ...] | None = None, adds: bool = False,
                           move_head: tuple[int, int] | None = None, adds_via_caption: bool = False,
                           moves_on_source: bool = False) -> list[Stage]:
    """The stages with caption grounding at `weight` wherever they train generation with the LLM unfrozen (and,
    with `edits`, the edits of those stages grounded by the words that name their object, through `edit_head` if
    given, its probes reading `edit_readout_fields`; with `adds` too, edits adding an object by its words; with
    `move_head`, moved objects' new places by their words through that head, or with `moves_on_source` by the
    source's vision tokens of the object; with `adds_via_caption`, added objects through the caption head)."""
    return [replace(s, caption_ground_weight=weight, caption_ground_edits=edits and "edit" in s.tasks,
                    caption_ground_adds=adds and edits and "edit" in s.tasks,
                    adds_via_caption_head=adds_via_caption and adds and edits and "edit" in s.tasks,
                    move_ref_head=move_head if edits and "edit" in s.tasks else None,
                    move_ref_on_source=moves_on_source and move_head is not None and edits and "edit" in s.tasks,
                    edit_ref_head=edit_head if edits and "edit" in s.tasks else None, edit_ref_readout=edit_readout,
                    edit_ref_readout_fields=edit_readout_fields)
            if "generate" in s.tasks and s.trainable != "align" else s for s in stages]


def with_grounding(stages: list[Stage], weight: float = 1.0, readout_weight: float = 0.0,
                   two_object_weight: float = 1.0, edits: bool = False, edit_words: bool = False,
                   readout_until_edits: bool = False) -> list[Stage]:
    """The stages with the grounding loss at `weight` (its read-out at `readout_weight`, answers about one of two
    objects counted `two_object_weight` times) wherever they train understanding, and with `edits` (queried from
    the first code) or `edit_words` (from the naming words) editing too (`--ground`, `--ground-readout`,
    `--ground-two-objects`, `--ground-edits`, `--ground-edit-words`); with `readout_until_edits` the stages that
    train editing ground without the read-out (`--ground-readout-until-edits`)."""
    def grounded(s: Stage) -> bool:
        return "understand" in s.tasks or ((edits or edit_words) and "edit" in s.tasks)
    def readout(s: Stage) -> float:
        return 0.0 if readout_until_edits and "edit" in s.tasks else readout_weight
    return [replace(s, ground_weight=weight, ground_readout_weight=readout(s),
                    ground_two_object_weight=two_object_weight, ground_edits=edits and "edit" in s.tasks,
                    ground_edit_words=edit_words and "edit" in s.tasks)
            if grounded(s) else s for s in stages]


def tiny_model_config(tokens: dict[str, int], vocab_size: int, mrope_interleaved: bool = False,
                      edit_instruction_first: bool = False) -> WallarooConfig:
    """The architecture of the bundled tiny model: same code paths as 7B, sized for two CPU cores.

    `mrope_interleaved` (`--mrope-interleaved`; thirty-ninth run, docs/tiny_model_runs.md) gives image columns
    rotary frequencies that turn across a scene; the bundle keeps Qwen2.5-VL's sectioned layout.
    `edit_instruction_first` (`--edit-instruction-first`; seventy-first run) puts an edit's instruction before its
    source blocks (ProtocolConfig.edit_instruction_first)."""
    # A dropped edit prompt keeps its source and learns it unchanged, not the reference's black image: on the
    # same stage 3 it took unguided editing 0.34 -> 0.40 of 400 held-out edits (twenty-second run,
    # docs/tiny_model_runs.md).
    protocol = ProtocolConfig(sizes=[tuple(c) for c in CANVAS_SIZES], default_size=(64, 64),
                              edit_uncond_keeps_source=True, edit_instruction_first=edit_instruction_first)
    cfg = WallarooConfig(
        name="wallaroo-tiny-shapes",
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                      num_kv_heads=2, mrope_section=(8, 12, 12), mrope_interleaved=mrope_interleaved, rope_theta=10000.0,
                      max_position_embeddings=4096),
        # Images are upscaled to >= 112x112 so a 64 px scene gets 16 vision tokens, not 4.
        # The absolute position table (Qwen3-VL's idea; none in Qwen2.5-VL): see VisionConfig.abs_position_grid.
        vision=VisionConfig(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, out_hidden_size=256,
                            fullatt_block_indexes=(1, 3), min_pixels=112 * 112, max_pixels=28 * 28 * 32,
                            edit_min_pixels=112 * 112, edit_max_pixels=28 * 28 * 32, abs_position_grid=8),
        # Cells encoded on their own: with the whole image in view the encoder gave a flat background many
        # codes, each carrying context the LLM could not guess (0.83 nats per background cell with 256 codes,
        # 1.12 with 1,024). Encoded locally a flat cell has exactly one code per colour (entropy 0), so the
        # book can be 1,024 codes again for the objects' edges.
        vq=VQConfig(codebook_size=1024, codebook_embed_dim=8, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                    z_channels=64, norm_groups=8, cell_local=True),
        protocol=protocol,
        # Swept on the eighth run (docs/tiny_model_runs.md): temperature 1 -> 0.5 took one-object prompts
        # 0.775 -> 0.845 and two-object 0.195 -> 0.30; edits were best near greedy and without guidance
        # (0.04 -> 0.13).
        sampling=SamplingDefaults(generate_cfg=1.5, generate_temperature=0.5, generate_top_k=50, edit_cfg=1.0,
                                  edit_temperature=0.2, edit_top_k=50, understand_max_new_tokens=48),
        tokens=tokens, has_edit=True, edit_copy_source=True, weights_dtype="float32")
    cfg.validate()
    return cfg


# --- distributed helpers ------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# --- the model with its training losses -----------------------------------------------------------

def region_start_cells(mask: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) bool: cells of `mask` with no `mask` cell to their left, upper left, above or upper
    right, i.e. where each region of the mask begins in raster order."""
    padded = F.pad(mask, (1, 1, 1, 0))  # one column each side, one row on top, all False
    rows, cols = mask.shape[1:]
    before = (padded[:, 1:, :cols] | padded[:, :rows, :cols] | padded[:, :rows, 1:cols + 1]
              | padded[:, :rows, 2:])
    return mask & ~before


def object_start_cells(codes: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) bool: where each object (cells whose code differs from the top-left background cell's)
    begins in raster order."""
    return region_start_cells(codes != codes[:, :1, :1])


def grounding_loss(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, model: WallarooModel, head: int,
                   query_index: torch.Tensor, key_index: torch.Tensor, target: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """-log of the attention one head gives the named object's vision tokens, from the position that predicts
    the answer, averaged over answers.

    q, k: one layer's q_proj / k_proj outputs (B, L, heads * head_dim) / (B, L, kv_heads * head_dim); query_index
    flat (B * L) positions, key_index (Q, tokens) positions within each query's row. The keys a query may see are
    all positions up to it (causal), so the object's share is of the head's whole softmax.
    """
    c = model.cfg.llm
    b, length, _ = q.shape
    kv_head = head // (c.num_heads // c.num_kv_heads)
    inv_freq, axis = model.rope_tables(q.device)
    cos, sin = mrope_cos_sin(position_ids, inv_freq, axis, torch.float32)  # (B, L, D)
    rows = query_index // length
    # Only the query rows are rotated; each sequence's keys once, not once per query (a chat asks three).
    qh = q.view(b * length, c.num_heads, c.head_dim)[query_index, head].float()
    qh = apply_rotary(qh[None, None], cos.flatten(0, 1)[query_index][None], sin.flatten(0, 1)[query_index][None])
    kh = k.view(b, length, c.num_kv_heads, c.head_dim)[:, :, kv_head].float()  # (B, L, D)
    kh = apply_rotary(kh[:, None], cos, sin)[:, 0]
    # Each query against every sequence's keys, then its own sequence's row: one matmul instead of (Q, L, D).
    scores = (qh[0, 0] @ kh.flatten(0, 1).T).view(-1, b, length)
    scores = scores[torch.arange(len(query_index), device=q.device), rows] / c.head_dim ** 0.5  # (Q, L)
    causal = torch.arange(length, device=q.device)[None] <= (query_index % length)[:, None]
    log_all = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
    on_object = scores.gather(1, key_index).masked_fill(~target, float("-inf")).logsumexp(-1)
    return weighted_mean(log_all - on_object, weights)


def first_drawn_cell_queries(batch: Batch, codes: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Flat positions predicting each caption-grounded object's first drawn cell: the first cell it touches whose
    code is not its image's background code (the top-left cell's); a cell it touches if the VQ drew none.
    With `source` (an edit's source codes, laid out as `codes`): the first cell it touches whose code the edit
    changes."""
    cells = batch.ground_cells.to(codes.device)
    base = batch.ground_cell_base.to(codes.device)
    at = base[:, None] + torch.arange(cells.shape[1], device=codes.device)
    own = codes[at]  # (Q, cells)
    drawn = cells & (own != (own[:, :1] if source is None else source[at]))
    first = torch.where(drawn.any(1), drawn.float().argmax(1), cells.float().argmax(1))
    return batch.code_target_index.to(codes.device)[base + first]


def ground_subset(batch: Batch, select: torch.Tensor) -> Batch:
    """The batch with only the grounded queries `select` (Q,) bool keeps."""
    at = select.nonzero().flatten().cpu()
    fields = ("ground_query_index", "ground_key_index", "ground_target", "ground_fields", "ground_scene_objects",
              "ground_cells", "ground_cell_base", "ground_by_cell", "ground_moved", "ground_added")
    return replace(batch, **{f: getattr(batch, f)[at.to(getattr(batch, f).device)] for f in fields
                             if getattr(batch, f) is not None})


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values`, each counted `weights` times (None: plain mean)."""
    return values.mean() if weights is None else (weights * values).sum() / weights.sum()


def first_output_row(batch: Batch, groups: list, length: int, last_layer: int) -> int:
    """The first position of a row whose last-layer output some loss reads, over the batch: a text or code target,
    or a query of a grounding group on the last layer (whose q and head outputs the hooks capture there). The
    last layer's keys and values cover every row whatever this is."""
    used = [index for index in (batch.text_target_index, batch.code_target_index) if index is not None]
    for _, select, _, (layer, _), _, _ in groups:
        if layer == last_layer:
            queries = batch.ground_query_index
            used.append(queries if select is None else queries[select.to(queries.device)])
    used = [index for index in used if index.numel()]
    return min(int((index % length).min()) for index in used) if used else 0


class TrainingModel(nn.Module):
    """Wraps WallarooModel so one forward returns the summed text + image losses (DDP needs a forward)."""

    def __init__(self, model: WallarooModel, first_cell_weight: float = 1.0, edit_start_cells: str = "none",
                 ground_weight: float = 0.0, ground_head: tuple[int, int] = (2, 0), ground_readout_weight: float = 0.0,
                 ground_two_object_weight: float = 1.0, caption_ground_weight: float = 0.0,
                 caption_ground_head: tuple[int, int] = (2, 2), edit_ref_head: tuple[int, int] | None = None,
                 edit_ref_readout: bool = True, edit_ref_readout_fields: tuple[str, ...] | None = None,
                 move_ref_head: tuple[int, int] | None = None, adds_via_caption_head: bool = False,
                 last_layer_on_targets: bool = False):
        super().__init__()
        if ground_readout_weight > 0 and ground_weight <= 0:
            raise ValueError("ground_readout_weight reads the grounded head, so it needs ground_weight > 0")
        if edit_start_cells not in ("none", "objects", "objects+changes"):
            raise ValueError(f"unknown edit_start_cells {edit_start_cells!r}")
        heads = [("ground_head", ground_head), ("caption_ground_head", caption_ground_head)]
        heads += [(n, h) for n, h in (("edit_ref_head", edit_ref_head), ("move_ref_head", move_ref_head)) if h]
        for name, (layer, head) in heads:
            if not (0 <= layer < model.cfg.llm.num_layers and 0 <= head < model.cfg.llm.num_heads):
                raise ValueError(f"{name} {(layer, head)} is not a (layer, head) of this "
                                 f"{model.cfg.llm.num_layers}-layer, {model.cfg.llm.num_heads}-head LLM")
        self.model = model
        self.first_cell_weight = first_cell_weight
        self.edit_start_cells = edit_start_cells
        self.ground_weight = ground_weight
        self.ground_head = ground_head
        self.ground_readout_weight = ground_readout_weight
        self.ground_two_object_weight = ground_two_object_weight
        # Training-only probes (not in the model, so not exported); their state rides in the stage checkpoint.
        self.readout = self.new_probes() if ground_readout_weight > 0 else None
        self.caption_ground_weight = caption_ground_weight
        self.caption_ground_head = caption_ground_head
        self.caption_readout = self.new_probes() if caption_ground_weight > 0 else None
        self.edit_ref_head = edit_ref_head
        self.edit_ref_readout = self.new_probes(edit_ref_readout_fields) \
            if edit_ref_head is not None and edit_ref_readout and caption_ground_weight > 0 else None
        self.move_ref_head = move_ref_head
        self.adds_via_caption_head = adds_via_caption_head
        self.move_ref_readout = self.new_probes(MOVE_READOUT_FIELDS) \
            if move_ref_head is not None and caption_ground_weight > 0 else None
        self.last_layer_on_targets = last_layer_on_targets

    def new_probes(self, fields: tuple[str, ...] | None = None) -> nn.ModuleList:
        """One linear probe per READOUT_FIELDS field (or per named field), reading it from one head's output."""
        names = [name for name, _ in READOUT_FIELDS]
        unknown = sorted(set(fields or ()) - set(names))
        if unknown:
            raise ValueError(f"read-out fields {unknown} are not among {names}")
        chosen = [i for i, name in enumerate(names) if fields is None or name in fields]
        probes = nn.ModuleList(nn.Linear(self.model.cfg.llm.head_dim, len(READOUT_FIELDS[i][1])) for i in chosen)
        probes.field_indices = tuple(chosen)  # which column of a batch's ground_fields each probe reads
        return probes

    def probes(self) -> dict[str, nn.ModuleList]:
        """The training-only read-out probes this trainer has, by checkpoint key."""
        return {k: v for k, v in (("readout", self.readout), ("caption_readout", self.caption_readout),
                                  ("edit_ref_readout", self.edit_ref_readout),
                                  ("move_ref_readout", self.move_ref_readout)) if v is not None}

    def grounding_groups(self, batch: Batch) -> list[tuple[str, torch.Tensor | None, float, tuple[int, int], float,
                                                           nn.ModuleList | None]]:
        """For a batch: per group of grounded queries, its log name, which queries it takes (None: all), the
        grounding loss's weight and head, and the read-out's weight and probes. Cell queries (generation, edits
        grounded by their words) take caption grounding's; the others (answers, edits' first code or naming
        words) the vision grounding's. An edit batch grounded both ways has both groups (two hops). An edit's cell
        queries go through `edit_ref_head` and its probes where the trainer has one."""
        if batch.ground_query_index is None:
            return []
        vision = (self.ground_weight, self.ground_head, self.ground_readout_weight, self.readout)
        head, probes = (self.edit_ref_head, self.edit_ref_readout) \
            if batch.task == "edit" and self.edit_ref_head is not None else (self.caption_ground_head, self.caption_readout)
        cell = (self.caption_ground_weight, head, self.caption_ground_weight, probes)  # no probes: no read-out
        by_cell = batch.ground_by_cell  # None: no cell queries (generation batches always have them)
        if by_cell is None:
            groups = [("ground", None, *vision)]
        elif by_cell.all():
            groups = [("ground", None, *cell)]
        else:
            groups = [("ground", ~by_cell, *vision), ("ref_ground", by_cell, *cell)]
        moved, added = batch.ground_moved, batch.ground_added
        if moved is not None and moved.any() and self.move_ref_head is None:
            raise ValueError("the batch grounds moved objects' new places (ground_edit_moves) but this trainer has no "
                             "move_ref_head to ground them through")
        # Moved objects' new places and (adds_via_caption_head) added objects leave the cell group (the last) for
        # their own route: the move head and its looks probes, or generation's caption head and its probes.
        routes = [("move_ground", moved, self.move_ref_head, self.move_ref_readout),
                  ("add_ground", added if self.adds_via_caption_head else None,
                   self.caption_ground_head, self.caption_readout)]
        cell_at = len(groups) - 1
        for route, select_route, head, probes in routes:
            if select_route is None or not select_route.any():
                continue
            name, select, *rest = groups[cell_at]
            groups[cell_at] = (name, ~select_route if select is None else select & ~select_route, *rest)
            groups.append((route, select_route, self.caption_ground_weight, head, self.caption_ground_weight, probes))
        # A group its queries all left (a batch whose only grounded edits add objects) has nothing to average.
        return [g for g in groups if g[2] > 0 and (g[1] is None or g[1].any())]

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        m, dev = self.model, self.model.device
        kind = "edit" if batch.task == "edit" else "generate"
        embeds = m.embed_tokens(batch.ids.to(dev))
        b, length, d = embeds.shape
        flat = embeds.reshape(b * length, d)
        if batch.vision_index is not None:
            feats = m.visual(batch.vision_patches.to(dev), batch.vision_grids.to(dev))
            flat = flat.index_copy(0, batch.vision_index.to(dev), feats.to(flat.dtype))
        source_grid = None
        if batch.pixel_index is not None:
            with torch.no_grad():
                z = m.vq.encode_features(batch.pixel_sources.to(dev))
                if (m.cfg.edit_copy_source or self.edit_start_cells == "objects+changes"
                        or batch.ground_cells is not None):
                    # Source and target share the canvas, so source cell k lines up with target code k.
                    source_grid = m.vq.quantize_features(z)
            flat = flat.index_copy(0, batch.pixel_index.to(dev), m.pixel_adapter(z.flatten(0, 2)))
        codes = weights = None
        if batch.code_input_index is not None:
            with torch.no_grad():
                grid = m.vq.encode(batch.target_images.to(dev))
                codes = grid.flatten()
                starts = None
                if self.first_cell_weight != 1.0 and (kind == "generate" or self.edit_start_cells != "none"):
                    starts = object_start_cells(grid)
                    if kind == "edit" and self.edit_start_cells == "objects+changes":
                        starts = starts | region_start_cells(grid != source_grid)
                if starts is not None:
                    weights = 1.0 + (self.first_cell_weight - 1.0) * starts.flatten().float()
            fed = m.input_adapter(kind)(m.vq.codebook_entries(codes))
            flat = flat.index_copy(0, batch.code_input_index.to(dev), fed)
        groups = self.grounding_groups(batch)
        if groups and batch.ground_cells is not None:
            cell_queries = first_drawn_cell_queries(batch, codes, None if source_grid is None else source_grid.flatten())
            batch = replace(batch, ground_query_index=torch.where(
                batch.ground_by_cell.to(codes.device), cell_queries, batch.ground_query_index.to(codes.device)))
        captured: dict[int, dict[str, torch.Tensor]] = {}
        hooks = []
        for layer in sorted({head[0] for _, _, _, head, _, _ in groups}):
            attn, into = m.model.layers[layer].self_attn, captured.setdefault(layer, {})
            hooks += [attn.q_proj.register_forward_hook(lambda mod, inp, out, into=into: into.__setitem__("q", out)),
                      attn.k_proj.register_forward_hook(lambda mod, inp, out, into=into: into.__setitem__("k", out)),
                      # o_proj's input: the heads' outputs side by side (for the read-out probes)
                      attn.o_proj.register_forward_pre_hook(
                          lambda mod, inp, into=into: into.__setitem__("heads", inp[0]))]
        last_layer = m.cfg.llm.num_layers - 1
        first_row = first_output_row(batch, groups, length, last_layer) if self.last_layer_on_targets else 0
        try:
            hidden = m(flat.view(b, length, d), batch.position_ids.to(dev), batch.valid.to(dev),
                       last_layer_from=first_row)
        finally:
            for h in hooks:
                h.remove()
        if first_row:
            # The last layer left out the rows before the first one any loss reads: zeros there keep the flat
            # (B * L) indices of targets and queries as they are.
            hidden = F.pad(hidden, (0, 0, first_row, 0))
            if last_layer in captured:
                for key in ("q", "heads"):
                    captured[last_layer][key] = F.pad(captured[last_layer][key], (0, 0, first_row, 0))
        hidden = hidden.reshape(b * length, d)
        loss = hidden.new_zeros(())
        parts: dict[str, float] = {}
        for name, select, ground_weight, (layer, head), readout_weight, probes in groups:
            group = batch if select is None else ground_subset(batch, select)
            layer_out = captured[layer]
            answer_weights = self.grounded_answer_weights(group)
            ground_loss = grounding_loss(layer_out["q"], layer_out["k"], group.position_ids.to(dev), m, head,
                                         group.ground_query_index.to(dev), group.ground_key_index.to(dev),
                                         group.ground_target.to(dev), answer_weights)
            loss = loss + ground_weight * ground_loss
            parts[name] = ground_loss.item()
            if probes is not None:
                readout_loss = self.grounded_readout_loss(layer_out["heads"], group, probes, head, answer_weights)
                loss = loss + readout_weight * readout_loss
                parts[name.replace("ground", "readout")] = readout_loss.item()
        if batch.text_target_index is not None:
            logits = m.lm_head(hidden[batch.text_target_index.to(dev)])
            text_loss = F.cross_entropy(logits.float(), batch.text_targets.to(dev))
            loss = loss + text_loss
            parts["text"] = text_loss.item()
        if codes is not None:
            at_targets = hidden[batch.code_target_index.to(dev)]
            logits = m.image_head(kind)(at_targets)
            if kind == "edit" and m.cfg.edit_copy_source:
                logits = m.add_source_copy(logits.float(), at_targets, source_grid.flatten())
            per_cell = F.cross_entropy(logits.float(), codes, reduction="none")
            image_loss = per_cell.mean() if weights is None else (weights * per_cell).sum() / weights.sum()
            loss = loss + image_loss
            parts["image"] = image_loss.item()
        return loss, parts

    def grounded_answer_weights(self, batch: Batch) -> torch.Tensor | None:
        """Per grounded answer, how many times it counts (ground_two_object_weight for two-object scenes)."""
        if self.ground_two_object_weight == 1.0:
            return None
        two = batch.ground_scene_objects.to(self.model.device) > 1
        return torch.where(two, self.ground_two_object_weight, 1.0)

    def grounded_readout_loss(self, heads: torch.Tensor, batch: Batch, probes: nn.ModuleList, head: int,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the read-out probes on the grounded head's output at each grounded query (an answer's
        start, an edit's or a generated object's first cell), summed over the fields its probes read."""
        c = self.model.cfg.llm
        at = heads.reshape(-1, heads.shape[-1])[batch.ground_query_index.to(heads.device)]
        out = at[:, head * c.head_dim:(head + 1) * c.head_dim].float()
        fields = batch.ground_fields.to(heads.device)
        return sum(weighted_mean(F.cross_entropy(probe(out), fields[:, i], reduction="none"), weights)
                   for i, probe in zip(probes.field_indices, probes))


def training_precision(device: torch.device) -> torch.dtype:
    """bfloat16 autocast where the hardware does bf16 matmuls natively (CUDA, AVX512-BF16/AMX CPUs), else fp32.

    On a 2-core AVX512-BF16 EPYC a stage step runs 1.6x faster (weights, optimiser and losses stay fp32);
    elsewhere bf16 would be emulated and slower, so those machines train in fp32 as before.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.bfloat16 if supported is not None and supported() else torch.float32


@contextlib.contextmanager
def step_context(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` for one training forward; on CPU also the math attention kernel.

    PyTorch's CPU flash-attention backward took a fifth of a step at these sizes (27 ms a layer for
    32 x 131 tokens); the plain matmul-softmax path is faster here and its memory cost is small. The LLM's
    attention goes further on a CPU and skips SDPA when training (`attention._explicit_attention`); the vision
    tower's still runs through it.
    """
    with contextlib.ExitStack() as stack:
        if dtype != torch.float32:
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def trainable_parameters(model: WallarooModel, mode: str) -> list[nn.Parameter]:
    """Parameters a stage updates; the VQ tokenizer is always frozen.

    "reader" freezes the vision tower: while a fresh LLM's attention is still random, the tower's gradients are
    noise, and AdamW turns noise into full-size steps. Trained along in stage 0, the scene-parsing tower lost
    its read-out (a frozen parse head read 98-100% of fields before stage 0, 49-68% after) and 5 of 7 runs
    never learnt where the object is. With the tower frozen, both towers those misses had started from were
    read perfectly (stage-0 check 1.00 / 1.00 / 1.00; answer loss 0.07-0.10, not 0.25-0.37), and the steps
    run faster (docs/tiny_model_runs.md, twelfth run).
    """
    if mode not in ("all", "reader", "align"):
        raise ValueError(f"unknown trainable mode {mode!r}")
    model.requires_grad_(False)
    if mode == "align":
        parts = [model.gen_image_head, model.gen_input_adapter, model.model.embed_tokens]
    else:
        parts = [model.model, model.lm_head, model.gen_image_head, model.gen_input_adapter,
                 model.edit_image_head, model.edit_input_adapter, model.pixel_adapter]
        if model.cfg.edit_copy_source:
            parts.append(model.edit_copy_gate)
        if mode == "all":
            parts.append(model.visual)
    for p in parts:
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# --- VQ tokenizer ---------------------------------------------------------------------------------

def _reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE + L1 with object pixels weighted 10x and pixels on an object's outline 30x.

    Objects cover a few percent of a shapes-world image, so a plain pixel loss learns the background and
    leaves objects as blobs of the wrong colour; with object weighting alone the colours came right but the
    outlines (all that tells a circle from a square at 12 px) stayed soft, so the outline gets its own
    weight. The background is read off each image's border.
    """
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    foreground = ((x - background).abs().sum(1, keepdim=True) > 0.1).float()
    # Outline: within one pixel of the object boundary, on either side (dilation minus erosion).
    outline = F.max_pool2d(foreground, 3, 1, 1) + F.max_pool2d(-foreground, 3, 1, 1)
    weight = 1.0 + 9.0 * foreground + 20.0 * outline
    err = recon - x
    return (weight * (err.pow(2) + 0.2 * err.abs())).mean() / weight.mean()


def train_vq(cfg: VQConfig, steps: int, out: Path, seed: int, device: torch.device, rank: int,
             batch_size: int = 8, log=print, warm_steps: int | None = None, polish_steps: int = 0) -> VQModel:
    """Train the LlamaGen-design VQ on shapes-world renders (all canvas sizes), then `polish_steps` more of its
    decoder alone (the codes stay as they are); resumable."""
    ckpt = out / "vq.pt"
    # The VQ trains in a spawned side process, whose torch generator this torch seeds at random: without this,
    # the same --seed drew another codebook, and so other stages 1-4 (sixtieth run, docs/tiny_model_runs.md).
    torch.manual_seed(seed * 1_000_003 + rank)
    vq = VQModel(cfg).to(device)
    decoder = list(vq.decoder.parameters()) + list(vq.post_quant_conv.parameters())

    def optimizer(step: int) -> torch.optim.Optimizer:
        # The polish has an optimizer of its own, over the decoder alone.
        params = decoder if step >= steps else vq.parameters()
        return torch.optim.AdamW(params, lr=VQ_LR, betas=(0.9, 0.95), weight_decay=0.0)
    start, total = 0, steps + polish_steps
    state = torch.load(ckpt, map_location=device, weights_only=True) if ckpt.exists() else None
    if state is not None:
        vq.load_state_dict(state["model"])
        start = state["step"]
    opt = optimizer(start)
    if state is not None and start != steps:  # saved at `steps`, it is the whole VQ's: the polish starts afresh
        opt.load_state_dict(state["optimizer"])
    if start >= total:
        return vq.eval().requires_grad_(False)
    bar = tqdm(range(start, total), desc="vq", initial=start, total=total, disable=rank != 0, mininterval=5)
    t0, seen = time.time(), 0
    last_save = t0
    usage = torch.zeros(cfg.codebook_size, device=device)
    warm = int(0.45 * steps) if warm_steps is None else warm_steps
    for step in bar:
        rng = random.Random(seed * 1_000_003 + step * 131 + rank)
        polishing = step >= steps
        if step == steps:
            opt = optimizer(step)
        canvas = POLISH_CANVAS if polishing and rng.random() < POLISH_CANVAS_SHARE else rng.choice(ALL_CANVASES)
        x = torch.cat([images.vq_input(render(random_scene(rng, canvas=canvas)), canvas)
                       for _ in range(batch_size)]).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - steps, polish_steps, VQ_LR) if polishing else lr_at(step, steps, VQ_LR)
        if polishing:
            # Phase 3: the decoder alone, on codes that no longer move, so the stages' targets are the same
            # whether they were encoded before or after it.
            with torch.no_grad():
                z_q = vq.codebook_entries(vq.encode(x)).permute(0, 3, 1, 2)
            rec = _reconstruction_loss(vq.decode_features(z_q), x)
            loss = rec
        elif step < warm:
            # Phase 1: a plain autoencoder through the l2-normalised bottleneck. Quantising from step 0
            # left the decoder chasing a codebook that moved under it, and it learnt nothing for 500 steps.
            recon = vq.decode_features(vq.encode_features(x).permute(0, 3, 1, 2))
            rec = _reconstruction_loss(recon, x)
            loss = rec
        else:
            # Phase 2: quantise, the codebook seeded from (and kept alive by) encoder outputs.
            if step == warm or (step % RESET_EVERY == 0 and step < 0.9 * steps) or step == start:
                _restart_dead_codes(vq, x, usage if step not in (warm, start) else torch.zeros_like(usage), rng)
                usage.zero_()
            recon, codes, (vq_loss, commit) = vq(x)
            usage.index_add_(0, codes.flatten(), torch.ones(codes.numel(), device=device))
            rec = _reconstruction_loss(recon, x)
            loss = rec + vq_loss + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += batch_size
        bar.set_postfix(rec=f"{rec.item():.4f}", img_s=f"{seen / (time.time() - t0):.0f}", refresh=False)
        # Also saved where the codes become final (the end of phase 2): the trainer starts stage 1 from that
        # checkpoint while the polish goes on.
        if rank == 0 and (time.time() - last_save > SAVE_EVERY_S or step + 1 in (steps, total)):
            last_save = time.time()
            save_checkpoint({"model": vq.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, ckpt)
            log(json.dumps({"stage": "vq", "step": step + 1, "recon": round(rec.item(), 5)}))
    return vq.eval().requires_grad_(False)


RESET_EVERY = 20
# Decoder-only VQ steps after the VQ's own (train_vq's phase 3). Jointly trained, the decoder still drew small
# circles on the narrow canvas with square corners: 0.77 of its held-out scenes survived the round trip, 0.94-0.97
# of the others'. The codes told circle from square all along; 3,000 decoder steps, half of them on that canvas,
# took it to 0.88 and the others to 0.97-0.98, and 6,000 to 0.967 and 0.987, which lifted the bundle's
# editing from 0.783 to 0.813 of 2,000 held-out edits (forty-third run's VQ, docs/tiny_model_runs.md). Stages
# 1-4 start beside it: they read only the codes.
VQ_POLISH_STEPS = 6000
# The canvas with the smallest objects (9 px small ones in (80, 48)'s 16 px thirds) and its share of polish batches.
POLISH_CANVAS = min(ALL_CANVASES, key=lambda c: object_side(c, "small"))
POLISH_CANVAS_SHARE = 0.5
# This deep GroupNorm conv net diverges or stalls at 2e-3 on the shapes world; 4e-4 learns ~5x faster.
VQ_LR = 4e-4
COPY_GATE_START = 2.0  # nats added to the source code's logit before stage 4 trains the gate


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, x: torch.Tensor, usage: torch.Tensor, rng: random.Random) -> int:
    """Move codes unused since the last check onto random current encoder outputs (plus jitter).

    An l2-normalised codebook trained by gradient alone collapses to a handful of codes on this data
    (2 of 1,024 after 70 steps); restarting dead codes keeps the whole codebook in play.
    """
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    z = vq.encode_features(x).reshape(-1, vq.cfg.codebook_embed_dim)
    g = torch.Generator(device="cpu").manual_seed(rng.randrange(1 << 30))
    pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=g).to(z.device)
    jitter = 0.02 * torch.randn(dead.numel(), z.shape[1], generator=g).to(z.device)
    vq.quantize.embedding.weight[dead] = F.normalize(z[pick] + jitter, dim=-1)
    return int(dead.numel())


# --- the stages -----------------------------------------------------------------------------------

@torch.no_grad()
def copy_generation_into_edit(model: WallarooModel) -> None:
    """Set the edit image head to the generation head, and the edit and pixel adapters to generation's adapter.

    Both heads predict the same VQ codes and all three adapters embed 8-d VQ vectors; starting from
    generation's weights, editing does not spend its few stage-4 steps relearning the code table.
    """
    model.edit_image_head.load_state_dict(model.gen_image_head.state_dict())
    model.edit_input_adapter.load_state_dict(model.gen_input_adapter.state_dict())
    model.pixel_adapter.load_state_dict(model.gen_input_adapter.state_dict())
    if model.cfg.edit_copy_source:
        # The gate starts as a constant lean towards the source's code: an edit keeps most cells, and the
        # model learns from the instruction where to override it.
        nn.init.zeros_(model.edit_copy_gate.weight)
        nn.init.constant_(model.edit_copy_gate.bias, COPY_GATE_START)


def stage_objects(stage: Stage, task: str, rng: random.Random) -> int | None:
    """The object count a stage draws for a task's next scene (None: the scene generator draws it)."""
    if task == "generate":
        return rng.choice(stage.gen_objects)
    if task == "edit" and stage.edit_objects is not None:
        return rng.choice(stage.edit_objects)
    return None


def stage_seed(stage: Stage, index: int, seed: int) -> int:
    """The seed a stage's draws start from: its step data (`step_examples`) and its new probes (`run_stage`)."""
    return (seed + stage.seed_offset) * 1_000_003 + index * 10_000_019


def step_examples(stage: Stage, index: int, step: int, seed: int, rank: int, count: int, tok: TextTokenizer,
                  cfg: WallarooConfig) -> tuple[str, list[Example]]:
    """The task and `count` examples that rank `rank` trains on at `step` of stage `index` (deterministic)."""
    # Every rank takes the same task and canvas (drawn from rank 0's stream): a data-parallel step waits
    # for its slowest rank, and an edit batch is half again as long as a generation batch.
    step_seed = stage_seed(stage, index, seed) + step * 131
    rng = random.Random(step_seed)
    tasks, weights = zip(*stage.tasks.items())
    task = rng.choices(tasks, weights)[0]
    canvas = rng.choice(stage.canvases)
    if rank:
        rng = random.Random(step_seed + rank)  # each rank's own examples
    return task, task_examples(stage, task, canvas, rng, count, tok, cfg)


def task_examples(stage: Stage, task: str, canvas: tuple[int, int], rng: random.Random, count: int,
                  tok: TextTokenizer, cfg: WallarooConfig) -> list[Example]:
    """`count` examples of one task on one canvas, drawn as `stage` draws them."""
    uncond_prob = stage.edit_uncond_prob if task == "edit" else UNCOND_PROB
    return [make_example(task, rng, tok, cfg, [canvas], uncond_prob=uncond_prob, qa_turns=stage.qa_turns,
                         qa_kind_weights=stage.qa_kind_weights, edit_kind_weights=stage.edit_kind_weights,
                         ground=stage.ground_weight > 0, ground_edits=stage.ground_edits,
                         ground_captions=stage.caption_ground_weight > 0, ground_edit_refs=stage.caption_ground_edits,
                         ground_edit_adds=stage.caption_ground_adds, ground_edit_moves=stage.move_ref_head is not None,
                         ground_edit_moves_source=stage.move_ref_on_source,
                         ground_edit_words=stage.ground_edit_words, n_objects=stage_objects(stage, task, rng))
            for _ in range(count)]


def stage_trainer(model: WallarooModel, stage: Stage) -> tuple[TrainingModel, list[nn.Parameter]]:
    """The loss wrapper a stage trains through, and the parameters it updates (its read-out probes included)."""
    trainer = TrainingModel(model, stage.first_cell_weight, stage.edit_start_cells, stage.ground_weight,
                            stage.ground_head, stage.ground_readout_weight, stage.ground_two_object_weight,
                            stage.caption_ground_weight, stage.caption_ground_head, stage.edit_ref_head,
                            stage.edit_ref_readout, stage.edit_ref_readout_fields, stage.move_ref_head,
                            stage.adds_via_caption_head, stage.last_layer_on_targets)
    params = trainable_parameters(model, stage.trainable)
    for probes in trainer.probes().values():
        params = params + list(probes.parameters())
    return trainer, params


def run_stage(index: int, stage: Stage, model: WallarooModel, tok: TextTokenizer, out: Path, seed: int,
              device: torch.device, rank: int, world: int, log=print,
              before_step: Callable[[int], None] | None = None, precision: torch.dtype | None = None) -> None:
    """Train one stage from its checkpoint (if any) to the end, checkpointing every couple of minutes.

    `precision` is the autocast dtype (None: `training_precision(device)`).
    """
    ckpt = out / f"stage{index}.pt"
    done_marker = out / f"stage{index}.done"
    if done_marker.exists():
        return
    if stage.caption_ground_edits and (stage.caption_ground_weight <= 0 or stage.ground_edits):
        raise ValueError(f"stage {stage.name}: caption_ground_edits grounds edits with the caption head, so it needs "
                         f"caption_ground_weight > 0 and ground_edits off")
    if stage.move_ref_head is not None and not stage.caption_ground_edits:
        raise ValueError(f"stage {stage.name}: move_ref_head grounds moved objects as caption_ground_edits grounds "
                         f"named ones, so it needs caption_ground_edits")
    if stage.move_ref_on_source and stage.move_ref_head is None:
        raise ValueError(f"stage {stage.name}: move_ref_on_source changes what move_ref_head grounds moves on, so it "
                         f"needs move_ref_head")
    if stage.adds_via_caption_head and not stage.caption_ground_adds:
        raise ValueError(f"stage {stage.name}: adds_via_caption_head routes the queries caption_ground_adds makes, so "
                         f"it needs caption_ground_adds")
    if stage.caption_ground_adds and not stage.caption_ground_edits:
        raise ValueError(f"stage {stage.name}: caption_ground_adds grounds added objects as caption_ground_edits "
                         f"grounds named ones, so it needs caption_ground_edits")
    if stage.ground_edit_words and (stage.ground_weight <= 0 or stage.ground_edits):
        raise ValueError(f"stage {stage.name}: ground_edit_words adds edits to the grounding loss, so it needs "
                         f"ground_weight > 0 and ground_edits off")
    if stage.ground_edits and stage.ground_weight <= 0:
        raise ValueError(f"stage {stage.name}: ground_edits adds edits to the grounding loss, so it needs "
                         f"ground_weight > 0")
    # The stage's new read-out probes start from a seed of the stage's own, not from whatever the process drew
    # before (a whole run's earlier stages, or nothing in a resumed one): a resumed stage repeats a whole run's.
    torch.manual_seed(stage_seed(stage, index, seed) + 17)
    training_model, params = stage_trainer(model, stage)
    training_model.to(device)
    probes = training_model.probes()
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.01)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        load_training_state(model, state["model"])
        for key, module in probes.items():
            module.load_state_dict(state[key])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    elif stage.edit_from_generation:
        copy_generation_into_edit(model)
    trainer: nn.Module = training_model
    if world > 1:
        trainer = nn.parallel.DistributedDataParallel(trainer, find_unused_parameters=True)
    model.train()
    model.vq.eval()
    precision = training_precision(device) if precision is None else precision
    bar = tqdm(range(start, stage.steps), desc=f"stage {stage.name}", initial=start, total=stage.steps,
               disable=rank != 0, mininterval=5)
    t0, seen, ema = time.time(), 0, {}
    last_save = t0
    for step in bar:
        if before_step is not None:
            before_step(step)
        per_rank = max(1, stage.batch_size // world)
        task, examples = step_examples(stage, index, step, seed, rank, per_rank, tok, model.cfg)
        batch = collate(examples, model.cfg)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, stage.steps, stage.lr)
        with step_context(device, precision):
            loss, parts = trainer(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += per_rank * world
        for k, v in parts.items():
            ema[f"{task}.{k}"] = v if f"{task}.{k}" not in ema else 0.95 * ema[f"{task}.{k}"] + 0.05 * v
        bar.set_postfix({**{k: f"{v:.3f}" for k, v in ema.items()}, "samples/s": f"{seen / (time.time() - t0):.1f}"}, refresh=False)
        if rank == 0 and (time.time() - last_save > SAVE_EVERY_S or step + 1 == stage.steps):
            last_save = time.time()
            extra = {key: module.state_dict() for key, module in probes.items()}
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1, **extra},
                            ckpt)
            log(json.dumps({"stage": stage.name, "step": step + 1, **{k: round(v, 4) for k, v in ema.items()},
                            "samples_per_s": round(seen / (time.time() - t0), 1),
                            "precision": str(precision).removeprefix("torch.")}))
    if rank == 0:  # the checkpoint saved at the last step holds the finished stage (last_finished_weights)
        done_marker.write_text(json.dumps({"seconds": time.time() - t0}))
    if world > 1:
        dist.barrier()
    model.eval()


def load_training_state(model: WallarooModel, state: dict[str, torch.Tensor]) -> None:
    """Load a run folder's weights strictly, except that checkpoints from before `edit_copy_gate` existed may
    lack it (stage 4 initialises it; stages 0-3 never use it)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("edit_copy_gate.")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_or_resume(out: Path, seed: int, device: torch.device, rank: int,
                    mrope_interleaved: bool = False,
                    edit_instruction_first: bool = False) -> tuple[WallarooModel, TextTokenizer]:
    """Tokenizer (trained once), then the model, initialised from the last finished stage if any."""
    tok_path = out / "tokenizer.json"
    meta_path = out / "tokens.json"
    if rank == 0 and not meta_path.exists():
        table = train_tokenizer(tok_path, ProtocolConfig(sizes=[tuple(c) for c in CANVAS_SIZES]))
        meta_path.write_text(json.dumps(table))
    if dist.is_initialized():
        dist.barrier()
    table = json.loads(meta_path.read_text())
    from tokenizers import Tokenizer
    vocab = (Tokenizer.from_file(str(tok_path)).get_vocab_size() + 63) // 64 * 64
    cfg = tiny_model_config(table, vocab, mrope_interleaved=mrope_interleaved,
                            edit_instruction_first=edit_instruction_first)
    torch.manual_seed(seed)
    model = WallarooModel(cfg).to(device)
    _init_weights(model)
    weights = last_finished_weights(out)
    if weights is not None:
        load_training_state(model, torch.load(weights, map_location=device, weights_only=True)["model"])
    return model, TextTokenizer(tok_path, cfg.tokens)


RUN_OPTIONS_FILE = "options.json"


# A run's recorded options (options.json) in the order their defaults depend on each other: each default is a
# function of the options before it. Edits are grounded in two hops by default (seventy-third run, r73d): the
# naming words find the object (`ground_head`, no read-out probes in stage 4), the first changed cell finds the
# words through EDIT_REF_HEAD, whose probes read only the object's place. Added objects are grounded on the words
# that describe them through the caption head, as generated ones are (seventy-sixth run: adds 0.70 -> 0.82).
RUN_OPTION_DEFAULTS: list[tuple[str, Callable[[dict], object]]] = [
    ("vision_find", lambda o: False),
    ("mrope_interleaved", lambda o: False),
    ("ground", lambda o: True),
    ("ground_readout", lambda o: o["ground"]),
    ("ground_two_objects", lambda o: GROUND_TWO_OBJECTS if o["ground"] else False),  # False: weight 1
    ("ground_edits", lambda o: False),
    ("ground_captions", lambda o: GROUND_CAPTIONS),  # False: off
    ("ground_edit_refs", lambda o: bool(o["ground_captions"]) and not o["ground_edits"]),
    ("ground_edit_words", lambda o: o["ground"] and o["ground_edit_refs"] and not o["ground_edits"]),
    ("ground_readout_until_edits", lambda o: o["ground_readout"] and o["ground_edit_words"]),
    ("edit_ref_head", lambda o: list(EDIT_REF_HEAD) if o["ground_edit_refs"] and o["ground_edit_words"] else False),
    ("no_edit_ref_readout", lambda o: False),
    ("edit_ref_readout_place", lambda o: bool(o["edit_ref_head"]) and not o["no_edit_ref_readout"]),
    ("ground_edit_adds", lambda o: bool(o["ground_edit_refs"])),
    ("ground_edit_moves", lambda o: False),
    ("ground_edit_adds_caption", lambda o: bool(o["ground_edit_adds"])),
    ("ground_edit_moves_source", lambda o: False),
    ("edit_instruction_first", lambda o: False),
    ("last_layer_on_targets", lambda o: False),
]
# Options a flag pair sets either way (argparse.BooleanOptionalAction); the others are switched on by one flag.
TWO_WAY_OPTIONS = {"ground", "ground_readout", "ground_edit_refs", "ground_edit_words", "ground_readout_until_edits",
                   "edit_ref_readout_place", "ground_edit_adds", "ground_edit_adds_caption"}


def resolve_run_options(chosen: dict[str, object]) -> dict[str, object]:
    """A run's options: each one `chosen` leaves out or None takes the recipe's default given those before it."""
    options: dict[str, object] = {}
    for key, default in RUN_OPTION_DEFAULTS:
        value = chosen.get(key)
        options[key] = default(options) if value is None else value
    return options


def recipe_stages(options: dict[str, object], scale: float = 1.0, batch_size: int | None = None) -> list[Stage]:
    """The curriculum a run with these resolved options trains (`resolve_run_options`), every stage's steps
    stretched by `scale` and its batch set to `batch_size` if given."""
    stages = [replace(s, batch_size=batch_size) if batch_size else s for s in default_stages(scale)]
    if options["ground"]:
        stages = with_grounding(stages, readout_weight=1.0 if options["ground_readout"] else 0.0,
                                two_object_weight=options["ground_two_objects"] or 1.0,
                                edits=options["ground_edits"], edit_words=options["ground_edit_words"],
                                readout_until_edits=options["ground_readout_until_edits"])
    if options["ground_captions"]:
        head = options["edit_ref_head"]
        stages = with_caption_grounding(stages, options["ground_captions"], edits=options["ground_edit_refs"],
                                        edit_head=tuple(head) if head else None,
                                        edit_readout=not options["no_edit_ref_readout"],
                                        edit_readout_fields=("position",) if options["edit_ref_readout_place"] else None,
                                        adds=options["ground_edit_adds"],
                                        move_head=MOVE_REF_HEAD if options["ground_edit_moves"] else None,
                                        adds_via_caption=options["ground_edit_adds_caption"],
                                        moves_on_source=options["ground_edit_moves_source"])
    if options["last_layer_on_targets"]:
        stages = [replace(s, last_layer_on_targets=True) for s in stages]
    return stages


def _option_flag(key: str, value: object) -> str:
    flag = "--" + key.replace("_", "-")
    if key == "ground_two_objects":
        return f"{flag} {value or 1.0:g}"
    if key == "ground_captions":
        return f"{flag} {value or 0.0:g}"
    if key == "edit_ref_head":
        return f"{flag} {value[0]},{value[1]}" if value else f"{flag} caption"
    if value:
        return flag
    return "--no-" + key.replace("_", "-") if key in TWO_WAY_OPTIONS else ""


def run_option_flags(options: dict[str, object]) -> str:
    """The command-line flags that start a run with these recorded options ("" for the defaults; an option a folder
    predates records nothing and reads as off)."""
    seen: dict[str, object] = {}
    flags = []
    for key, default in RUN_OPTION_DEFAULTS:
        value = options.get(key, False)
        value = list(value) if isinstance(value, (list, tuple)) else value
        if value != default(seen):
            flags.append(_option_flag(key, value))
        seen[key] = value
    return " ".join(f for f in flags if f)


def check_run_options(out: Path, options: dict[str, bool | float]) -> None:
    """Record a run's architecture and pretraining options in its folder, or stop a resume that changes them.

    A stage resumed with another M-RoPE layout or tower read-out would train on weights made for the other,
    without an error; the first start writes the options, every later start must repeat them.
    """
    path = out / RUN_OPTIONS_FILE
    if not path.exists():
        if not any(out.glob("stage*.pt")) and not any(out.glob("stage*.done")):
            path.write_text(json.dumps(options, sort_keys=True) + "\n")
            return
        # Stages trained before run folders recorded options had every option off (grounding included, now on
        # by default): a resume that turns one on would switch recipe half-way.
        path.write_text(json.dumps({k: False for k in options}, sort_keys=True) + "\n")
    recorded = json.loads(path.read_text())
    if any(recorded.get(k, False) != v for k, v in options.items()):
        flags = run_option_flags(recorded) or "no option flags"
        raise SystemExit(f"{out} was started with {flags} ({path}); resume it with the same options, or start "
                         f"a new --out folder")


def last_finished_weights(out: Path) -> Path | None:
    """The checkpoint holding the model as the last finished stage left it (None before any stage finishes).

    That stage's own checkpoint (saved at its final step) is exact even in a folder assembled from another
    run's finished stages; `latest_model.pt` (which older versions wrote as each stage ended) serves folders
    that kept only it. A done marker with neither would otherwise restart the later stages from random weights
    without a word.
    """
    finished = sorted(int(p.stem.removeprefix("stage")) for p in out.glob("stage*.done")
                      if p.stem.removeprefix("stage").isdigit())
    if not finished:
        return None
    last = finished[-1]
    latest, own = out / "latest_model.pt", out / f"stage{last}.pt"
    if own.exists():
        return own
    if latest.exists():
        return latest
    raise FileNotFoundError(f"{out} marks stage {last} finished but holds neither latest_model.pt nor "
                            f"stage{last}.pt; delete stage{last}.done to retrain that stage, or restore its weights")


def vq_steps_done(out: Path) -> int:
    """Steps the run folder's VQ checkpoint has trained (0 when there is none)."""
    ckpt = out / "vq.pt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["step"] if ckpt.exists() else 0


def log_vq_quality(vq: VQModel, log=print) -> dict[str, float]:
    """Log how well the VQ serves the stages: scenes that survive its round trip, and background-code entropy."""
    from ..eval.shapes_eval import background_code_entropy, vq_round_trip_accuracy

    vq.eval()
    quality = {"vq_round_trip": round(vq_round_trip_accuracy(vq, n=60), 3),
               "vq_background_code_entropy": round(background_code_entropy(vq, n=100), 3)}
    log(json.dumps({"stage": "vq", **quality}))
    print(f"VQ: {quality['vq_round_trip']:.0%} of held-out scenes survive the round trip; background-code entropy "
          f"{quality['vq_background_code_entropy']:.2f} nats (0 = one code per colour)")
    return quality


def log_vision_reading(model: WallarooModel, tok: TextTokenizer, log=print) -> dict[str, float]:
    """Log whether stage 0 learnt to read the image, and warn when it did not (the later stages will not)."""
    from ..engine.pipeline import Pipeline
    from ..eval.shapes_eval import READING_CHANCE, vision_reading_check

    reading = vision_reading_check(Pipeline(model.eval(), tok))
    log(json.dumps({"stage": "0-check", **{k: round(v, 3) for k, v in reading.items()}}))
    summary = ", ".join(f"{k} {v:.2f} (chance {READING_CHANCE[k]:.2f})" for k, v in reading.items())
    print(f"stage 0 check, one-object scenes: {summary}")
    # Position only: runs that went on to read everything (the bundle) still had shape near chance here.
    if reading["position"] < 0.6:
        print("warning: stage 0 did not learn to find the object among the vision tokens; stages 1-4 did not make "
              "up for that in past runs (docs/tiny_model_runs.md, eleventh run). Consider stopping and starting a "
              "new run folder with another --seed.")
    return reading


def run_log(out: Path) -> Callable[[str], None]:
    """A function appending one line to the run folder's train_log.jsonl."""
    def log(line: str) -> None:
        with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return log


def _exit_with_parent(parent: int) -> None:
    # A daemon process is only stopped when its parent exits normally; a trainer killed by SIGTERM or SIGKILL
    # would leave its VQ training on, writing checkpoints into a run folder that may since have been reused.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


# Where the trainer takes back the VQ side process's thread: a fixed (stage, step), not the moment the side ends,
# because a bf16 training step sums differently on one and two threads, so a wall-clock handover made two runs
# of one seed part at stage 2 (sixty-second run, docs/tiny_model_runs.md). The polish ended between stage-2
# steps 244 and 452 on these VMs; a later side is waited for, an earlier one costs one-thread steps until here.
THREAD_HANDOVER = (2, 460)


def thread_handover(side: BaseProcess, threads: int, stage_index: int,
                    on_side_failed: Callable[[], BaseException]) -> Callable[[int], None]:
    """A `before_step` for stage `stage_index` that gives the trainer all `threads` at THREAD_HANDOVER."""
    def before_step(step: int) -> None:
        if (stage_index, step) < THREAD_HANDOVER or torch.get_num_threads() == threads:
            return
        side.join()  # usually ended already; otherwise wait, so the handover step stays the same
        if side.exitcode != 0:
            raise on_side_failed()
        torch.set_num_threads(threads)
    return before_step


def _vq_process(cfg: VQConfig, steps: int, out: Path, seed: int, threads: int, parent: int, **train_kw) -> None:
    """Entry point of the side process that trains the VQ while stage 0 runs (spawned, so picklable args)."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    train_vq(cfg, steps, out, seed, torch.device("cpu"), 0, log=run_log(out), **train_kw)


def _init_weights(model: WallarooModel) -> None:
    # GPT-style small init for the transformer parts; the VQ keeps its own (it is trained separately).
    for name, module in model.named_modules():
        if name.startswith("vq"):
            continue
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


def export(model: WallarooModel, tok_path: Path, folder: Path, sampling: SamplingDefaults | None = None) -> Path:
    """Write the trained model as a model folder (the format `wallaroo convert` produces)."""
    cfg = replace(model.cfg, sampling=sampling or model.cfg.sampling)
    return save_model_folder(folder, cfg, model.state_dict().items(), tok_path)


def layer_head(text: str) -> tuple[int, int] | bool:
    """"LAYER,HEAD" (as typed on the command line) as a (layer, head) pair; "caption" (the caption head) as False."""
    if text == "caption":
        return False
    try:
        layer, head = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER,HEAD (two integers, e.g. 3,0) or caption") from None
    return layer, head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wallaroo_nodes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run folder (checkpoints, logs)")
    parser.add_argument("--export", type=Path, default=None, help="model folder to write at the end")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    parser.add_argument("--vq-steps", type=int, default=3600)
    parser.add_argument("--vq-batch-size", type=int, default=8)
    parser.add_argument("--no-side-vq", action="store_true",
                        help="train the VQ before stage 0 instead of in a side process beside it")
    parser.add_argument("--vq-warm-steps", type=int, default=1000,
                        help="VQ steps trained as a plain autoencoder before quantising")
    parser.add_argument("--vq-polish-steps", type=int, default=VQ_POLISH_STEPS,
                        help="decoder-only VQ steps after --vq-steps: the codes stay, small shapes come out right")
    parser.add_argument("--last-layer-on-targets", action="store_true", default=None,
                        help="the LLM's last layer computes only the rows from each batch's first target on: the same "
                             "losses up to float rounding for less arithmetic (Stage.last_layer_on_targets; off: the "
                             "bundle was trained without it, and rounding differently makes a run a new draw)")
    parser.add_argument("--vision-steps", type=int, default=VISION_STEPS,
                        help="scene-parsing steps of the vision tower before stage 0 (0 = none)")
    parser.add_argument("--vision-find", action="store_true", default=None,
                        help="vision pretraining also finds each object from a description (thirty-eighth run)")
    parser.add_argument("--mrope-interleaved", action="store_true", default=None,
                        help="the LLM's M-RoPE in Qwen3-VL's interleaved layout (thirty-ninth run)")
    two_way = argparse.BooleanOptionalAction
    parser.add_argument("--ground", action=two_way, default=None,
                        help="the grounding loss in every stage with understanding, from stage 0 on (forty-first run; "
                             "on by default since the forty-third run became the bundle)")
    parser.add_argument("--ground-readout", action=two_way, default=None,
                        help="with --ground, probes must read the named object's place and looks from the grounded "
                             "head (forty-second and forty-third runs; default: on with --ground)")
    parser.add_argument("--ground-readout-until-edits", action=two_way, default=None,
                        help="with --ground-readout, the stages that train editing ground without the read-out "
                             "probes, whose looks the edit words would carry to the cells that must draw new ones "
                             "(seventy-third run's stage 4; default: on with --ground-edit-words)")
    parser.add_argument("--ground-two-objects", type=float, default=None, metavar="W",
                        help="with --ground, answers about one of two objects count W times in the grounding loss "
                             f"and read-out (default with --ground: {GROUND_TWO_OBJECTS:g}, the forty-third run's)")
    parser.add_argument("--ground-edits", action="store_true", default=None,
                        help="with --ground, edits that name an object are grounded too, from the position that "
                             "predicts their first code (forty-fifth run; off)")
    parser.add_argument("--ground-captions", type=float, default=None, metavar="W",
                        help="caption grounding at weight W in every stage that trains generation past alignment: "
                             "each generated object's first drawn cell looks up its caption phrase (fifty-fifth run; "
                             f"default {GROUND_CAPTIONS:g}; 0 = off, the recipe before it)")
    parser.add_argument("--ground-edit-refs", action=two_way, default=None,
                        help="with caption grounding, edits that name an object are grounded by their words too: the "
                             "first cell of the object that the edit changes looks up the phrase that names it "
                             "(default: on with caption grounding)")
    parser.add_argument("--ground-edit-words", action=two_way, default=None,
                        help="with --ground, edits that name an object are grounded from the instruction's last "
                             "token that names it; with --ground-edit-refs, two hops: words to object, first changed "
                             "cell to words (sixty-eighth to seventy-third runs; default: on with both)")
    parser.add_argument("--edit-ref-head", type=layer_head, default=None, metavar="LAYER,HEAD",
                        help="with --ground-edit-refs, the attention head (and probes of its own) that grounds the "
                             "edits' changed cells on their words; 'caption' for the caption head; with "
                             "--ground-edit-words pick a later layer than the first hop's (2) "
                             f"(default with both: {EDIT_REF_HEAD[0]},{EDIT_REF_HEAD[1]})")
    parser.add_argument("--no-edit-ref-readout", action="store_true", default=None,
                        help="with --edit-ref-head, no read-out probes on that head: only where it looks is taught")
    parser.add_argument("--edit-ref-readout-place", action=two_way, default=None,
                        help="with --edit-ref-head, that head's probes read only the named object's place, not its "
                             "looks, so the changed cell learns where the object is without its old colour and shape "
                             "(seventy-third run; default: on with --edit-ref-head)")
    parser.add_argument("--ground-edit-adds", action=two_way, default=None,
                        help="with --ground-edit-refs, edits that add an object are grounded too: the new object's "
                             "first cell looks up the words that describe it (seventy-fourth run, through the edit "
                             "head: add edits 0.74 -> 0.66; default: on with --ground-edit-refs)")
    parser.add_argument("--ground-edit-adds-caption", action=two_way, default=None,
                        help="with --ground-edit-adds, added objects are grounded through the caption head and its "
                             "probes of every field, as generated objects are, instead of the edit head (seventy-sixth "
                             "run: add edits 0.70 -> 0.82; default: on with --ground-edit-adds)")
    parser.add_argument("--ground-edit-moves", action="store_true", default=None,
                        help=f"with --ground-edit-refs, a moved object's first cell at its new place looks up the words "
                             f"that name it through head {MOVE_REF_HEAD[0]},{MOVE_REF_HEAD[1]}, whose probes read the "
                             f"object's looks (seventy-fourth run: background edits broke, editing 0.551; off)")
    parser.add_argument("--ground-edit-moves-source", action="store_true", default=None,
                        help="with --ground-edit-moves, a moved object's new place looks up the object's vision tokens "
                             "in the source instead of the words that name it (off)")
    parser.add_argument("--edit-instruction-first", action="store_true", default=None,
                        help="put an edit's instruction before its source image blocks, so each drawn cell sits a fixed "
                             "distance from its source cell (the reference puts it after; the exported config "
                             "records it)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seeds the VQ, vision pretraining and every stage (default 1: the bundled model's run)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="autocast dtype of the stages (auto: bf16 where the hardware has native bf16)")
    parser.add_argument("--batch-size", type=int, default=0, help="override every stage's batch size (0 = recipe's)")
    args = parser.parse_args(argv)
    chosen = {key: getattr(args, key) for key, _ in RUN_OPTION_DEFAULTS}
    if args.ground_two_objects is not None:
        chosen["ground_two_objects"] = args.ground_two_objects if args.ground_two_objects != 1.0 else False
    if args.ground_captions is not None:
        chosen["ground_captions"] = args.ground_captions or False
    if args.edit_ref_head not in (None, False):
        chosen["edit_ref_head"] = list(args.edit_ref_head)
    options = resolve_run_options(chosen)
    # Defaults follow the options chosen before them, so only an explicit choice can contradict another; each
    # check runs before the run folder records options it cannot train.
    if not options["ground"] and (options["ground_readout"] or options["ground_two_objects"] or options["ground_edits"]
                                  or options["ground_edit_words"]):
        parser.error("--ground-readout, --ground-two-objects, --ground-edits and --ground-edit-words change the "
                     "grounding loss, which --no-ground turns off: drop --no-ground or them")
    if options["ground_readout_until_edits"] and not options["ground_readout"]:
        parser.error("--ground-readout-until-edits limits the read-out that --no-ground-readout and --no-ground turn "
                     "off: drop one of them")
    if options["ground_edit_words"] and options["ground_edits"]:
        parser.error("--ground-edit-words and --ground-edits ground the same edits from different queries: choose "
                     "one (add --no-ground-edit-words to use --ground-edits)")
    if options["ground_edit_refs"] and (not options["ground_captions"] or options["ground_edits"]):
        parser.error("--ground-edit-refs grounds edits with the caption head: it needs --ground-captions above 0 "
                     "and cannot go with --ground-edits (add --no-ground-edit-refs)")
    if options["ground_edit_adds_caption"] and not options["ground_edit_adds"]:
        parser.error("--ground-edit-adds-caption routes the queries --ground-edit-adds makes, which is off here: drop "
                     "--no-ground-edit-adds (and --no-ground-edit-refs) or --ground-edit-adds-caption")
    if options["ground_edit_moves_source"] and not options["ground_edit_moves"]:
        parser.error("--ground-edit-moves-source changes what --ground-edit-moves grounds moves on: add "
                     "--ground-edit-moves or drop --ground-edit-moves-source")
    for key in ("ground_edit_adds", "ground_edit_moves"):
        if options[key] and not options["ground_edit_refs"]:
            option = "--" + key.replace("_", "-")
            parser.error(f"{option} grounds edits as --ground-edit-refs grounds named objects: drop "
                         f"--no-ground-edit-refs or {option}")
    if options["edit_ref_head"] and not options["ground_edit_refs"]:
        parser.error("--edit-ref-head picks the head that --ground-edit-refs trains: drop --no-ground-edit-refs or "
                     "--edit-ref-head")
    if options["no_edit_ref_readout"] and not options["edit_ref_head"]:
        parser.error("--no-edit-ref-readout drops the probes of the head --edit-ref-head picks, and there is none: "
                     "pick one with --edit-ref-head or drop --no-edit-ref-readout")
    if options["edit_ref_readout_place"] and (not options["edit_ref_head"] or options["no_edit_ref_readout"]):
        parser.error("--edit-ref-readout-place narrows the probes of the head --edit-ref-head picks: pick one with "
                     "--edit-ref-head and drop --no-edit-ref-readout")
    for key, value in options.items():
        setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = _dist()
    device = _device(rank)
    args.out.mkdir(parents=True, exist_ok=True)
    log = run_log(args.out) if rank == 0 else (lambda line: None)

    t0 = time.time()
    log(json.dumps({"event": "started", "world_size": world, "threads_per_rank": torch.get_num_threads(),
                    "device": str(device)}))
    if rank == 0:
        check_run_options(args.out, options)
    model, tok = build_or_resume(args.out, args.seed, device, rank, mrope_interleaved=args.mrope_interleaved,
                                 edit_instruction_first=args.edit_instruction_first)
    stages = recipe_stages(options, args.scale, args.batch_size)
    vq_done = vq_steps_done(args.out) >= args.vq_steps + args.vq_polish_steps
    finished_before = vq_done and all((args.out / f"stage{i}.done").exists() for i in range(len(stages)))
    vq_run = (model.cfg.vq, args.vq_steps, args.out, args.seed)
    vq_kw = {"batch_size": args.vq_batch_size, "warm_steps": args.vq_warm_steps, "polish_steps": args.vq_polish_steps}
    threads = torch.get_num_threads()
    side = None
    if rank == 0 and not vq_done:
        stage0_left = not (args.out / "stage0.done").exists()
        if world == 1 and device.type == "cpu" and threads >= 2 and stage0_left and not args.no_side_vq:
            # Stage 0 (understanding) never touches the VQ, so on a CPU the two train at once, each on
            # half the threads: small convolutions and matrices use one core better than they share two.
            import multiprocessing as mp
            side = mp.get_context("spawn").Process(target=_vq_process, args=(*vq_run, threads // 2, os.getpid()),
                                                   kwargs=vq_kw, daemon=True)
            side.start()
            torch.set_num_threads(threads - threads // 2)
        else:
            train_vq(*vq_run, device, rank, log=log, **vq_kw)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's VQ instead of timing out inside DDP's first step

    def side_failed() -> SystemExit:
        return SystemExit(f"VQ training failed (exit code {side.exitcode}); see the log above, rerun to resume")

    def handover(stage_index: int) -> Callable[[int], None] | None:
        return thread_handover(side, threads, stage_index, side_failed) if side is not None else None

    precision = {"auto": training_precision(device), "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    if args.vision_steps and not (args.out / "stage0.pt").exists() and not (args.out / "stage0.done").exists():
        # Only before stage 0 starts: afterwards its checkpoints hold the tower.
        if rank == 0:
            pretrain_vision(model.visual, args.vision_steps, args.out, args.seed, device, log=log,
                            find_by_description=args.vision_find)
        if dist.is_initialized():
            dist.barrier()  # the other ranks take rank 0's tower
            if rank != 0:
                model.visual.load_state_dict(torch.load(args.out / "vision.pt", map_location=device,
                                                        weights_only=True)["tower"])
    run_stage(0, stages[0], model, tok, args.out, args.seed, device, rank, world, log,
              before_step=handover(0), precision=precision)

    if side is not None:
        # Stages 1-4 need only the VQ's codes (its encoder and codebook), final once phase 2 ends; the polish
        # touches the decoder alone. So they start then, on the threads stage 0 had, while the polish finishes.
        while vq_steps_done(args.out) < args.vq_steps and side.is_alive():
            time.sleep(2.0)
        if not side.is_alive() and side.exitcode != 0:
            raise side_failed()
    if dist.is_initialized():
        dist.barrier()  # rank 0 trained the VQ; everyone uses that one
    model.vq.load_state_dict(torch.load(args.out / "vq.pt", map_location=device, weights_only=True)["model"])
    if rank == 0 and not (args.out / "stage1.done").exists():
        log_vision_reading(model, tok, log)
    for i, stage in enumerate(stages[1:], start=1):
        run_stage(i, stage, model, tok, args.out, args.seed, device, rank, world, log,
                  before_step=handover(i), precision=precision)
    if side is not None:
        side.join()
        torch.set_num_threads(threads)
        if side.exitcode != 0:
            raise side_failed()
    # The polished decoder (stage checkpoints carry whichever VQ weights the trainer held when they were saved).
    model.vq.load_state_dict(torch.load(args.out / "vq.pt", map_location=device, weights_only=True)["model"])
    if rank == 0:
        if not finished_before:
            log_vq_quality(model.vq, log)
        log(json.dumps({"event": "finished", "seconds_this_run": round(time.time() - t0, 1)}))
        if args.export:
            export(model, args.out / "tokenizer.json", args.export)
            print(f"exported {args.export}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
