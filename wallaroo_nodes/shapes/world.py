"""The shapes world: scenes of one or two flat shapes on a plain background, and their renderer.

A scene is fully described by its canvas, background colour and objects; every scene is drawn
from a `random.Random`, so a seed fixes it completely. Rendering is crisp (no anti-aliasing) and
rasterises ideal shapes at half coverage, so the same scene always gives the same bytes.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Chosen far apart in RGB (pairwise distance >= ~100) so the nearest-colour reading survives
# VQ colour shifts; object colours are the chromatic ones, backgrounds may use all of them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 80, 230),
    "yellow": (245, 225, 30),
    "purple": (150, 40, 190),
    "orange": (250, 130, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
OBJECT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUND_COLOURS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "centre", "right")
# (height, width); multiples of 16 so they tile into VQ tokens exactly.
CANVAS_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (48, 80), (80, 48))
# Object side as a fraction of its slot (a horizontal third, capped by the height): large objects
# leave >= 3 px between neighbours even on the 48-wide canvas, small ones stay >= 9 px.
SIZE_FRACTION: dict[str, float] = {"small": 0.55, "large": 0.8}


_VALID_ATTRS = {(sh, c, sz, p) for sh in SHAPES for c in OBJECT_COLOURS for sz in SIZES for p in POSITIONS}


@dataclass(frozen=True)
class Obj:
    """One shape: its shape, colour, size and horizontal position names."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A canvas (height, width), a background colour name and 1-2 objects (left to right)."""

    canvas: tuple[int, int]
    background: str
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Normalise so equal scenes compare equal whatever order the objects were given in.
        object.__setattr__(self, "canvas", tuple(self.canvas))
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)
                                                         if o.position in POSITIONS else len(POSITIONS))))

    def problems(self) -> list[str]:
        """Why this scene is not a valid shapes-world scene (empty when it is)."""
        out = []
        if not 1 <= len(self.objects) <= 2:
            out.append(f"{len(self.objects)} objects")
        if self.background not in BACKGROUND_COLOURS:
            out.append(f"unknown background {self.background!r}")
        for o in self.objects:
            if (o.shape, o.colour, o.size, o.position) not in _VALID_ATTRS:
                out.append(f"bad object {o}")
            if o.colour == self.background:
                out.append(f"object colour equals background {self.background!r}")
        if len({o.position for o in self.objects}) != len(self.objects):
            out.append("two objects share a position")
        return out

    def object_at(self, position: str) -> Obj | None:
        """The object at a position, or None."""
        return next((o for o in self.objects if o.position == position), None)

    def free_positions(self) -> list[str]:
        """Positions with no object, in left-to-right order."""
        used = {o.position for o in self.objects}
        return [p for p in POSITIONS if p not in used]

    def replace_object(self, old: Obj, new: Obj | None) -> Scene:
        """A copy with `old` replaced by `new` (or removed when new is None)."""
        objs = [o for o in self.objects if o != old] + ([new] if new is not None else [])
        return replace(self, objects=tuple(objs))

    def add_object(self, new: Obj) -> Scene:
        """A copy with one more object."""
        return replace(self, objects=self.objects + (new,))

    def to_dict(self) -> dict:
        """Plain JSON-able form."""
        return {"canvas": list(self.canvas), "background": self.background,
                "objects": [dict(vars(o)) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Inverse of to_dict."""
        return cls(tuple(d["canvas"]), d["background"], tuple(Obj(**o) for o in d["objects"]))


def slot_width(canvas: tuple[int, int]) -> float:
    """Width of one horizontal third of the canvas (the space one object may use)."""
    return canvas[1] / len(POSITIONS)


def object_side(canvas: tuple[int, int], size: str) -> int:
    """Side in pixels of an object's square bounding box for a canvas and a size name."""
    return max(3, round(SIZE_FRACTION[size] * min(slot_width(canvas), canvas[0])))


def object_centre(canvas: tuple[int, int], position: str) -> tuple[float, float]:
    """(y, x) pixel centre of an object at a position: the middle of its third, vertically centred."""
    return canvas[0] / 2, (POSITIONS.index(position) + 0.5) * slot_width(canvas)


# Sub-pixel samples per pixel side when rasterising (coverage estimates and crisp masks).
SUPERSAMPLE = 4


def shape_coverage(shape: str, side: float, top: float, left: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel of a (height, width) grid covered by the ideal shape in the box (top, left, side).

    The ideal shapes: a square filling the box, the inscribed circle, and an apex-up triangle
    whose base is the box's bottom edge. Pixel (i, j) spans [i, i+1) x [j, j+1).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    n = SUPERSAMPLE
    v = (((np.arange(height * n) + 0.5) / n - top) / side)[:, None]
    u = (((np.arange(width * n) + 0.5) / n - left) / side)[None, :]
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "circle":
        inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        inside &= np.abs(u - 0.5) <= v / 2
    return inside.reshape(height, n, width, n).mean(axis=(1, 3))


@functools.lru_cache(maxsize=256)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Crisp boolean (side, side) raster of a shape: pixels at least half covered by the ideal shape (read-only:
    cached, since training renders the same few shapes and sides tens of thousands of times)."""
    mask = shape_coverage(shape, side, 0, 0, side, side) >= 0.5
    mask.flags.writeable = False
    return mask


def object_box(canvas: tuple[int, int], obj: Obj) -> tuple[int, int, int]:
    """(top, left, side) of an object's bounding box in pixels."""
    side = object_side(canvas, obj.size)
    cy, cx = object_centre(canvas, obj.position)
    return round(cy - side / 2), round(cx - side / 2), side


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a uint8 (height, width, 3) array."""
    h, w = scene.canvas
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.background]
    for obj in scene.objects:
        top, left, side = object_box(scene.canvas, obj)
        mask = shape_mask(obj.shape, side)
        img[top:top + side, left:left + side][mask] = PALETTE[obj.colour]
    return img


def render(scene: Scene) -> Image.Image:
    """The scene as a crisp RGB PIL image of size (width, height)."""
    return Image.fromarray(render_array(scene))  # uint8 (h, w, 3) is RGB


def random_object(rng: random.Random, position: str, background: str | None = None) -> Obj:
    """A random object at `position`, never coloured like `background`."""
    colours = [c for c in OBJECT_COLOURS if c != background]
    return Obj(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), position)


def random_scene(rng: random.Random, canvas: tuple[int, int] | None = None, n_objects: int | None = None) -> Scene:
    """A random valid scene; canvas and object count are drawn too unless given."""
    canvas = tuple(canvas) if canvas is not None else rng.choice(CANVAS_SIZES)
    n = n_objects if n_objects is not None else rng.choice((1, 2))
    if not 1 <= n <= 2:
        raise ValueError(f"n_objects must be 1 or 2, got {n}")
    positions = rng.sample(POSITIONS, n)
    objects = [random_object(rng, p) for p in positions]
    used = {o.colour for o in objects}
    background = rng.choice([c for c in BACKGROUND_COLOURS if c not in used])
    return Scene(canvas, background, tuple(objects))


def scene_from_seed(seed: int, **kw) -> Scene:
    """The scene `random_scene` draws from `random.Random(seed)`; kw go to random_scene."""
    return random_scene(random.Random(seed), **kw)
