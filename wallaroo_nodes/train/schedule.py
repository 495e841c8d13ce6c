"""The learning-rate schedule every training loop of the recipe uses, its checkpoint cadence, and how checkpoints
are written."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

SAVE_EVERY_S = 120  # checkpoint cadence: a killed run loses at most two minutes


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename it over `path`: a reader (the trainer reading the VQ side
    process's checkpoint) or a kill mid-write never meets half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up (a tenth of the run, at most 50 steps), then cosine down to a tenth of the peak."""
    warmup = max(1, min(50, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
