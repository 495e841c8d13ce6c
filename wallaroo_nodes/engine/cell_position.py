"""Learned (row, column) embeddings of VQ image cells, shared by the edit source's pixel block and the
edited image's stream of codes.

Not in the official model (0 in its config). The tiny model needs it to copy: an edited image's cell (r, c)
should mostly repeat the source's cell (r, c), but the source pixel block sits before the vision block and
the instruction, so its distance from the generated cell changes with the instruction's length and 1-D
positions cannot point at it. With the same embedding on both, matching is one query-key product.
Generation does not use them: on its stream they slowed the tiny model's learning of the prompt (README).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class CellPositionEmbedding(nn.Module):
    """Row and column tables, summed: an embedding for every cell of grids up to `size` x `size`."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        # Small and random, not zero: distinct cells get distinct keys from the first step.
        self.rows = nn.Parameter(torch.randn(size, dim) * 0.02)
        self.cols = nn.Parameter(torch.randn(size, dim) * 0.02)

    def grid(self, rows: int, cols: int) -> torch.Tensor:
        """Embeddings (rows, cols, dim) of every cell of a rows x cols grid."""
        if rows > self.size or cols > self.size:
            raise ValueError(f"a {rows}x{cols} code grid exceeds this model's cell table ({self.size}x{self.size}); "
                             "pick a smaller output size")
        return self.rows[:rows, None, :] + self.cols[None, :cols, :]

    def stream(self, rows: int, cols: int) -> torch.Tensor:
        """(rows * cols, dim): for each input that predicts a code, in order, the embedding of that code's cell.

        The inputs are <|generate_start|>, each code but a row's last, and each end-of-line token, so the
        k-th of them predicts cell k in row-major order; a row's last code predicts nothing and gets none.
        """
        return self.grid(rows, cols).reshape(rows * cols, -1)
