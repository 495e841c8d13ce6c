"""Vision tower pretraining: the tiny model's stand-in for the pretraining Qwen2.5-VL's ViT had before VL.

Trained only through the LLM's answers (stage 0), the tower learnt colour but hardly any geometry: the
bundled fifth-to-seventh runs answered shape, size and position questions at chance even on one-object
scenes, and 600 more understanding steps did not move them (README, #3). So before stage 0 the tower learns
to parse scenes: the background colour, and for each horizontal slot whether it holds an object and that
object's shape, colour and size, read through attention pooling with one learned query per slot (what an
LLM attention head does when a question names an object by place). The head is thrown away afterwards.

Slot queries find an object by its place. Questions and edits also name an object by what it is ("where is
the red circle?", "make the square blue"), and with two objects the bundled thirty-fourth run answered with
the left-hand one whenever the right-hand one was named (README, #3). So the head also finds objects by
description: a query built from one to three of an object's attributes (the subsets a reference may use)
pools the tokens and must read that object's place and attributes, which asks the tower's tokens for keys
that a description can match (`find_by_description`, `--vision-find`; off in the bundle's recipe: on its own it
did not move two-object position answers after stage 0, thirty-eighth run in docs/tiny_model_runs.md).
"""
from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..engine import images
from ..engine.config import VisionConfig
from ..engine.vision import VisionTower
from ..shapes import BACKGROUND_COLOURS, CANVAS_SIZES, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, Scene, random_scene, render
from ..shapes.text import singles_out
from .schedule import SAVE_EVERY_S, lr_at, save_checkpoint

SLOT_FIELDS: tuple[tuple[str, int], ...] = (("present", 2), ("shape", len(SHAPES)), ("colour", len(OBJECT_COLOURS)),
                                           ("size", len(SIZES)))
# (name, classes) of every read-out: the background, then per slot presence, shape, colour, size.
PARSE_FIELDS: tuple[tuple[str, int], ...] = (("background", len(BACKGROUND_COLOURS)),) + tuple(
    (f"{slot}.{attr}", n) for slot in POSITIONS for attr, n in SLOT_FIELDS)
FIND_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (("shape", SHAPES), ("colour", OBJECT_COLOURS),
                                                              ("size", SIZES))
FIND_FIELDS: tuple[tuple[str, int], ...] = (("position", len(POSITIONS)),) + tuple(
    (name, len(values)) for name, values in FIND_ATTRIBUTES)
# One description query per object, at most one object per slot; the same read-out serves every query.
PARSE_FIELDS += tuple((f"find{k}.{name}", n) for k in range(len(POSITIONS)) for name, n in FIND_FIELDS)
# A description query's attribute indices with every attribute left out (index len(values)): no query.
NO_DESCRIPTION: list[int] = [len(values) for _, values in FIND_ATTRIBUTES]
IGNORE = -100  # attributes of an empty slot


def scene_descriptions(scene: Scene, rng: random.Random) -> list[list[int]]:
    """Per object (in slot order, padded to len(POSITIONS)): the FIND_ATTRIBUTES indices of a random description
    that singles it out, with len(values) for an attribute left out; all left out for no query.

    An object that only its place tells apart from another gets no query: its description names two objects.
    """
    names = tuple(name for name, _ in FIND_ATTRIBUTES)
    out = []
    for obj in scene.objects:
        subsets = [combo for k in range(1, len(names) + 1) for combo in itertools.combinations(names, k)
                   if singles_out(scene, obj, combo)]
        if not subsets:
            out.append(list(NO_DESCRIPTION))
            continue
        combo = rng.choice(subsets)
        out.append([values.index(getattr(obj, name)) if name in combo else NO_DESCRIPTION[a]
                    for a, (name, values) in enumerate(FIND_ATTRIBUTES)])
    return out + [list(NO_DESCRIPTION)] * (len(POSITIONS) - len(out))


def scene_targets(scene: Scene, descriptions: list[list[int]] | None = None) -> list[int]:
    """The class index of every PARSE_FIELDS entry for a scene (IGNORE for an empty slot's attributes and for
    description queries that are absent, or all of them when `descriptions` is None)."""
    out = [BACKGROUND_COLOURS.index(scene.background)]
    for slot in POSITIONS:
        obj = scene.object_at(slot)
        if obj is None:
            out += [0, IGNORE, IGNORE, IGNORE]
        else:
            out += [1, SHAPES.index(obj.shape), OBJECT_COLOURS.index(obj.colour), SIZES.index(obj.size)]
    for k in range(len(POSITIONS)):
        if descriptions is None or descriptions[k] == NO_DESCRIPTION:
            out += [IGNORE] * len(FIND_FIELDS)
        else:
            obj = scene.objects[k]
            out += [POSITIONS.index(obj.position)]
            out += [values.index(getattr(obj, name)) for name, values in FIND_ATTRIBUTES]
    return out


class SceneParseHead(nn.Module):
    """Attention pooling, one learned query for the background and one per slot, then per-field logits; with
    `find`, also one query per object built from its description, with its own keys and read-out.

    The slot read-out is shared by the three slots, so what tells them apart is only where each query looks:
    the tower's tokens must say where they are (the absolute position table) and what they show, as the
    LLM's attention heads need when a question names an object by place or asks where it is. The description
    query carries no slot, so reading the place right means the keys matched the object's attributes.
    """

    def __init__(self, width: int, key_dim: int = 64, find: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1 + len(POSITIONS), key_dim) * key_dim ** -0.5)
        self.keys = nn.Linear(width, key_dim)
        self.background = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, len(BACKGROUND_COLOURS)))
        self.slot = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                  nn.Linear(2 * width, sum(n for _, n in SLOT_FIELDS)))
        self.find = None
        if not find:
            return
        # Index len(values) is "not in the description" and adds nothing to the query.
        self.describe = nn.ModuleList(nn.Embedding(len(values) + 1, key_dim, padding_idx=len(values))
                                      for _, values in FIND_ATTRIBUTES)
        self.find_keys = nn.Linear(width, key_dim)
        self.find = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                  nn.Linear(2 * width, sum(n for _, n in FIND_FIELDS)))

    def forward(self, tokens: torch.Tensor, tokens_per_image: list[int],
                descriptions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per PARSE_FIELDS entry, logits (images, classes) from the tower's output tokens and the description
        queries' attribute indices (images, len(POSITIONS), len(FIND_ATTRIBUTES)); without a find read-out or
        descriptions, the background and slot entries only."""
        if len(set(tokens_per_image)) != 1:
            raise ValueError("a scene-parsing batch holds images of one size")
        x = tokens.view(len(tokens_per_image), tokens_per_image[0], -1)  # (B, n, width)
        weights = torch.softmax(self.keys(x) @ self.queries.T / self.queries.shape[1] ** 0.5, dim=1)  # (B, n, 4)
        pooled = weights.transpose(1, 2) @ x  # (B, 4, width)
        out = [self.background(pooled[:, 0])]
        for s in range(len(POSITIONS)):
            out += list(self.slot(pooled[:, 1 + s]).split([n for _, n in SLOT_FIELDS], dim=-1))
        if self.find is None or descriptions is None:
            return out
        queries = sum(embed(descriptions[..., a]) for a, embed in enumerate(self.describe))  # (B, 3, key_dim)
        weights = torch.softmax(self.find_keys(x) @ queries.transpose(1, 2) / queries.shape[-1] ** 0.5, dim=1)
        found = weights.transpose(1, 2) @ x  # (B, 3, width)
        for k in range(len(POSITIONS)):
            out += list(self.find(found[:, k]).split([n for _, n in FIND_FIELDS], dim=-1))
        return out


def parse_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over fields, and the fraction of (non-ignored) fields read right."""
    losses, right, total = [], 0, 0
    for j, field_logits in enumerate(logits):
        y = targets[:, j]
        keep = y != IGNORE
        if keep.any():
            losses.append(F.cross_entropy(field_logits[keep].float(), y[keep]))
            right += int((field_logits[keep].argmax(-1) == y[keep]).sum())
            total += int(keep.sum())
    return torch.stack(losses).mean(), right / max(1, total)


def scene_batch(rng: random.Random, cfg: VisionConfig, n: int, describe: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """n random scenes on one random canvas: vision patches, grids, tokens per image, description queries,
    parse targets. Without `describe` no description is drawn (the find fields are IGNORE), so the scenes are
    the ones runs before the find read-out drew."""
    absent = [NO_DESCRIPTION] * len(POSITIONS)
    canvas = rng.choice([tuple(c) for c in CANVAS_SIZES])
    patches, grids, descriptions, targets = [], [], [], []
    for _ in range(n):
        scene = random_scene(rng, canvas=canvas)
        p, grid = images.vision_inputs(render(scene), cfg)
        patches.append(p)
        grids.append(grid)
        descriptions.append(scene_descriptions(scene, rng) if describe else absent)
        targets.append(scene_targets(scene, descriptions[-1] if describe else None))
    unit = cfg.spatial_merge_size ** 2
    return (torch.cat(patches), torch.tensor(grids), [t * h * w // unit for t, h, w in grids],
            torch.tensor(descriptions, dtype=torch.long), torch.tensor(targets, dtype=torch.long))


def pretrain_vision(tower: VisionTower, steps: int, out: Path, seed: int, device: torch.device, rank: int = 0,
                    batch_size: int = 32, lr: float = 1e-3, log=print, find_by_description: bool = False) -> float:
    """Train `tower` in place to parse scenes (resumable from out/vision.pt); returns the last field accuracy."""
    ckpt, done = out / "vision.pt", out / "vision.done"
    head = SceneParseHead(tower.cfg.out_hidden_size, find=find_by_description).to(device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    start, accuracy = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        tower.load_state_dict(state["tower"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start, accuracy = state["step"], state["accuracy"]
    if done.exists() or start >= steps:
        return accuracy
    tower.train()
    bar = tqdm(range(start, steps), desc="vision", initial=start, total=steps, disable=rank != 0, mininterval=5)
    t0 = last_save = time.time()
    ema_loss = ema_acc = None
    for step in bar:
        rng = random.Random(seed * 1_000_003 + 77_777 + step * 131 + rank)
        patches, grids, counts, descriptions, targets = scene_batch(rng, tower.cfg, batch_size, find_by_description)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        logits = head(tower(patches.to(device), grids.to(device)), counts, descriptions.to(device))
        loss, accuracy = parse_loss(logits, targets.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = accuracy if ema_acc is None else 0.95 * ema_acc + 0.05 * accuracy
        bar.set_postfix(parse=f"{ema_loss:.3f}", fields_right=f"{ema_acc:.3f}", refresh=False)
        if rank == 0 and (time.time() - last_save > SAVE_EVERY_S or step + 1 == steps):
            last_save = time.time()
            save_checkpoint({"tower": tower.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                             "step": step + 1, "accuracy": ema_acc}, ckpt)
            log(json.dumps({"stage": "vision", "step": step + 1, "parse_loss": round(ema_loss, 4),
                            "fields_right": round(ema_acc, 4)}))
    if rank == 0:
        done.write_text(json.dumps({"seconds": round(time.time() - t0, 1), "fields_right": round(ema_acc, 4)}))
    tower.eval()
    return ema_acc
