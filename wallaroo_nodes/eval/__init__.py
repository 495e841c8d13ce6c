"""Shapes-world evaluation of a model: understanding, generation and editing on held-out seeds."""
from .shapes_eval import BARS, evaluate, save_grid

__all__ = ["BARS", "evaluate", "save_grid"]
