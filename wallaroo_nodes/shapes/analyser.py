"""Read a shapes-world scene back from pixels alone, and score readings against expected scenes.

The analyser never sees the generator's scene, only the world's fixed vocabulary and geometry
(palette, object sides, thirds). It is built to survive what a VQ autoencoder does to an image
(noise, blur, colour shifts, colours bleeding between neighbours):
- each pixel gets its nearest named colour; the background is the most common one on the border;
- objects are the connected components of non-background pixels (split at a valley when wider
  than any object, since blur can bridge neighbours); specks are dropped;
- colour: nearest object colour to the component's pixels farthest from the background;
- shape and size: least-squares fit of the six ideal (shape, size) templates, centred on the
  blur-invariant centroid of a soft mask, over a few template blurs and a bounded contrast gain;
- position: the third holding the centroid.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from itertools import permutations

import numpy as np
from PIL import Image

from .world import OBJECT_COLOURS, PALETTE, POSITIONS, SHAPES, Obj, Scene, object_side, shape_coverage, slot_width

ATTRIBUTES: tuple[str, ...] = ("background", "count", "shape", "colour", "size", "position")
OBJECT_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")

_ALL_NAMES = list(PALETTE)
_ALL_RGB = np.array([PALETTE[n] for n in _ALL_NAMES], dtype=np.float32)
_OBJ_RGB = np.array([PALETTE[n] for n in OBJECT_COLOURS], dtype=np.float32)


def _nearest(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index into `table` of the nearest RGB entry for each pixel (..., 3)."""
    d = ((pixels[..., None, :] - table) ** 2).sum(-1)
    return d.argmin(-1)


def nearest_colour(rgb: Iterable[float], objects_only: bool = False) -> str:
    """Name of the palette colour nearest to an RGB triple."""
    names, table = (OBJECT_COLOURS, _OBJ_RGB) if objects_only else (_ALL_NAMES, _ALL_RGB)
    return names[int(_nearest(np.asarray(rgb, dtype=np.float32), table))]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as a boolean mask of the same shape."""
    todo = set(zip(*(idx.tolist() for idx in np.nonzero(mask))))  # plain tuples: far faster than array indexing
    out = []
    while todo:
        stack = [todo.pop()]
        members = []
        while stack:
            y, x = stack.pop()
            members.append((y, x))
            for q in ((y - 1, x - 1), (y - 1, x), (y - 1, x + 1), (y, x - 1), (y, x + 1),
                      (y + 1, x - 1), (y + 1, x), (y + 1, x + 1)):
                if q in todo:
                    todo.remove(q)
                    stack.append(q)
        comp = np.zeros(mask.shape, dtype=bool)
        comp[tuple(np.array(members).T)] = True
        out.append(comp)
    return out


def _split_wide(comp: np.ndarray, max_width: int) -> list[np.ndarray]:
    """Split a component wider than any object at its thinnest column (the bridge between two objects)."""
    cols = comp.sum(axis=0)
    xs = np.nonzero(cols)[0]
    left, right = int(xs.min()), int(xs.max()) + 1
    if right - left <= max_width:
        return [comp]
    # Look for the bridge away from the ends, where the objects themselves are.
    lo, hi = left + (right - left) // 4, right - (right - left) // 4
    cut = lo + int(np.argmin(cols[lo:hi]))
    if cols[cut] > 0.5 * min(cols[left:cut].max(initial=0), cols[cut + 1:right].max(initial=0)):
        return [comp]  # no clear valley: a single (noisy, blurred) object
    a, b = comp.copy(), comp.copy()
    a[:, cut:] = False
    b[:, :cut + 1] = False
    return [c for part in (a, b) if part.any() for c in _split_wide(part, max_width)]


@lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix applying a 1-D Gaussian blur with zero padding."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2)
    k[np.abs(d) > int(np.ceil(3 * sigma))] = 0.0
    return k / k.sum(axis=1, keepdims=True).max()


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero padding), sigma in pixels; sigma 0 returns it unchanged."""
    if sigma <= 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


# Template blurs tried; the best-fitting one absorbs the unknown blur of the image.
_FIT_BLURS = (0.0, 0.7, 1.2, 1.8)
# Allowed contrast gain: a blurred small object never shows its full colour, so the colour read
# from its core underestimates the contrast and inflates the soft mask; the gain absorbs that.
_FIT_GAIN = (0.85, 1.2)
# Centroid of each ideal shape as a fraction of its side from the box top (x is always centred).
_CENTROID_Y = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3}


def _fit_error(soft: np.ndarray, template: np.ndarray) -> float:
    """Squared error of soft ~ gain * template, with the gain fitted but kept within _FIT_GAIN."""
    gain = float((soft * template).sum()) / max(float((template * template).sum()), 1e-6)
    gain = min(max(gain, _FIT_GAIN[0]), _FIT_GAIN[1])
    return float(((soft - gain * template) ** 2).sum())


def _fit_shape_size(soft: np.ndarray, canvas: tuple[int, int]) -> tuple[str, str, float]:
    """(shape, size, centroid x) where the ideal template centred on the soft mask's centroid fits it best."""
    h, w = soft.shape
    mass = max(float(soft.sum()), 1e-6)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    # The centroid is unchanged by blur, so it anchors templates even on soft edges.
    cy, cx = float((soft * ys).sum() / mass), float((soft * xs).sum() / mass)
    best, best_err = ("circle", "small"), np.inf
    for size in ("small", "large"):
        side = object_side(canvas, size)
        for shape in SHAPES:
            ideal = shape_coverage(shape, side, cy - _CENTROID_Y[shape] * side, cx - side / 2, h, w)
            err = min(_fit_error(soft, _blur(ideal, b)) for b in _FIT_BLURS)
            if err < best_err:
                best, best_err = (shape, size), err
    return best[0], best[1], cx


def _read_object(arr: np.ndarray, comp: np.ndarray, others: np.ndarray, bg_rgb: np.ndarray,
                 canvas: tuple[int, int]) -> Obj:
    """Read one object from its component mask (`others`: pixels of other components)."""
    # Edge pixels mix object and background (red blurred into yellow looks orange), so read the
    # colour from the pixels farthest from the background: the object's least mixed part.
    pixels = arr[comp]
    far = np.linalg.norm(pixels - bg_rgb, axis=1)
    obj_rgb = np.median(pixels[far >= min(np.quantile(far, 0.75), np.sort(far)[-3])], axis=0)
    colour = nearest_colour(obj_rgb, objects_only=True)
    # Soft mask: each pixel's position between background (0) and object colour (1). Clipped only
    # loosely so zero-mean noise stays zero-mean and blur keeps mass and centroid.
    d = obj_rgb - bg_rgb
    soft = np.clip(((arr - bg_rgb) @ d) / max(float(d @ d), 1e-6), -0.5, 1.5)
    ys, xs = np.nonzero(comp)
    m = 3  # blur halo around the component; neighbours are at least 3 px away
    top, bottom = max(ys.min() - m, 0), min(ys.max() + m + 1, canvas[0])
    left, right = max(xs.min() - m, 0), min(xs.max() + m + 1, canvas[1])
    window = soft[top:bottom, left:right].copy()
    window[others[top:bottom, left:right]] = 0.0
    shape, size, cx = _fit_shape_size(window, canvas)
    third = int((left + cx) / slot_width(canvas))
    position = POSITIONS[min(max(third, 0), len(POSITIONS) - 1)]
    return Obj(shape, colour, size, position)


def read_scene(image: Image.Image) -> Scene:
    """Everything the analyser sees in an image, without validation (may hold 0 or >2 objects)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = arr.shape[:2]
    labels = _nearest(arr, _ALL_RGB)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(_ALL_NAMES)).argmax())
    border_rgb = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    # The observed background (not the named one) so a global colour shift does not move the threshold.
    bg_rgb = np.median(border_rgb[border == bg], axis=0)
    # Specks well under the smallest possible object (a small triangle, ~half its box) are noise.
    min_area = 0.15 * object_side((h, w), "small") ** 2
    # Blur can bridge the gap between neighbours; nothing wider than a large object plus its halo is one object.
    max_width = object_side((h, w), "large") + 6
    fg = labels != bg
    comps = [c for comp in _components(fg) for c in _split_wide(comp, max_width) if c.sum() >= min_area]
    objects = [_read_object(arr, comp, fg & ~comp, bg_rgb, (h, w)) for comp in comps]
    return Scene((h, w), _ALL_NAMES[bg], tuple(objects))


def analyse(image: Image.Image, strict: bool = False) -> Scene | None:
    """The scene read from an image; None when no object is found (or, if strict, when the reading is invalid)."""
    scene = read_scene(image)
    if not scene.objects or (strict and scene.problems()):
        return None
    return scene


def _agreement(a: Obj, b: Obj) -> int:
    return sum(getattr(a, k) == getattr(b, k) for k in OBJECT_ATTRIBUTES)


def match_objects(expected: Scene, got: Scene) -> list[tuple[Obj, Obj | None]]:
    """Pair each expected object with a read one (or None), maximising agreeing attributes; order-free."""
    exp, found = list(expected.objects), list(got.objects)
    slots: list[Obj | None] = found + [None] * max(0, len(exp) - len(found))
    best, best_score = None, -1
    for perm in permutations(slots, len(exp)):
        score = sum(_agreement(e, g) + 1 if g is not None else 0 for e, g in zip(exp, perm))
        if score > best_score:
            best, best_score = perm, score
    return list(zip(exp, best or ()))


def compare(expected: Scene, got: Scene | None) -> dict[str, bool]:
    """Per-attribute correctness of a reading (ATTRIBUTES) plus 'all'; object attributes need every object right."""
    if got is None:
        return {**{k: False for k in ATTRIBUTES}, "all": False}
    result = {"background": expected.background == got.background, "count": len(expected.objects) == len(got.objects)}
    pairs = match_objects(expected, got)
    for k in OBJECT_ATTRIBUTES:
        result[k] = all(g is not None and getattr(e, k) == getattr(g, k) for e, g in pairs)
    result["all"] = all(result[k] for k in ATTRIBUTES)
    return result


def scene_matches(expected: Scene, got: Scene | None) -> bool:
    """Whether a reading agrees with the expected scene on background and every object (canvas is not compared)."""
    return compare(expected, got)["all"]


def accuracy(results: Iterable[dict[str, bool]]) -> dict[str, float]:
    """Mean of each key over `compare` results (per attribute and 'all')."""
    results = list(results)
    if not results:
        return {}
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}
