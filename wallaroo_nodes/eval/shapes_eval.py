"""Evaluate a model on shapes-world cases drawn from held-out seeds, scoring images with the pixel analyser.

Training draws scenes from `random.Random` streams seeded below 2**40; evaluation scenes come from
`scene_from_seed(EVAL_SEED_BASE + i)`, a disjoint seed range. Each task cycles through canvas sizes and
languages so every breakdown has an equal share of the cases, and every question or edit kind meets every
canvas size and language. The words of a case (question, instruction, caption) come from a stream of their
own: drawn from the scene's stream, the draw that picks the object to ask about repeated the one that made
the scene hold two objects, so every two-object question, recolour, reshape and move named the right-hand
object (until 2026-12-04; docs/tiny_model_runs.md).
"""
from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict
from typing import Callable

from PIL import Image, ImageDraw

from ..engine.pipeline import Pipeline
from ..shapes import (ATTRIBUTES, CANVAS_SIZES, EDIT_KINDS, LANGS, QA_KINDS, analyse, caption, compare,
                      edit_instruction_with_span, edit_kinds, question_answer, reference_names_place, render,
                      scene_from_seed, scene_matches)

EVAL_SEED_BASE = 1 << 40
# The bars of the tiny model (issue: a tiny Wallaroo ...), as fractions.
BARS = {"understanding.accuracy": 0.95, "generation.one_object": 0.90, "generation.two_objects": 0.75,
        "editing.success": 0.80}
BATCH = 16
BALANCE = 0.05  # largest allowed gap between a language's or canvas size's score and the overall one


def _size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _rate(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def _breakdown(rows: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r["ok"])
    return {k: _rate(v) for k, v in sorted(groups.items())}


def _by_attribute(rows: list[dict]) -> dict[str, float]:
    """Fraction of images right on each analysed attribute (background, count, shape, colour, ...): what fails."""
    return {k: _rate([r["checks"][k] for r in rows]) for k in ATTRIBUTES}


def words_rng(seed: int) -> random.Random:
    """The random stream for a case's words, independent of `scene_from_seed(seed)`'s stream."""
    return random.Random(f"eval-words-{seed}")  # str seeds go through SHA-512: same stream on every run


def _cases(task: str, n: int, offset: int) -> list[dict]:
    """n cases for a task, cycling canvas and language; deterministic."""
    out = []
    canvases = [tuple(c) for c in CANVAS_SIZES]
    for i in range(n):
        seed = EVAL_SEED_BASE + offset + i
        rng = words_rng(seed)
        canvas = canvases[i % len(canvases)]
        lang = LANGS[(i // len(canvases)) % len(LANGS)]
        if task == "gen1" or task == "gen2":
            scene = scene_from_seed(seed, canvas=canvas, n_objects=1 if task == "gen1" else 2)
            out.append({"scene": scene, "lang": lang, "size": canvas, "prompt": caption(scene, lang, rng)})
        elif task == "und":
            scene = scene_from_seed(seed, canvas=canvas)
            kind = QA_KINDS[i % len(QA_KINDS)]
            q, a = question_answer(scene, lang, rng, kind=kind)
            out.append({"scene": scene, "lang": lang, "size": canvas, "question": q, "answer": a, "kind": kind})
        else:
            # Kinds advance once per canvas-and-language cycle: with i % 6 each of the six kinds met only one
            # canvas and one language, so the per-size and per-language figures compared kinds, not sizes.
            kind = EDIT_KINDS[(i // (len(canvases) * len(LANGS))) % len(EDIT_KINDS)]
            n_obj = 2 if kind == "remove" else 1 if kind == "add" else None
            scene = scene_from_seed(seed, canvas=canvas, n_objects=n_obj)
            if kind not in edit_kinds(scene):
                kind = rng.choice(edit_kinds(scene))
            instruction, target, named, span = edit_instruction_with_span(scene, lang, rng, kind=kind)
            # How an edit names one of two objects: by its place, or by its looks alone (colour, shape, size).
            reference = None if named is None or len(scene.objects) < 2 else \
                "place" if reference_names_place(instruction[span[0]:span[1]], named, lang) else "looks"
            out.append({"scene": scene, "target": target, "lang": lang, "size": canvas,
                        "instruction": instruction, "kind": kind, "reference": reference})
    return out


def evaluate(pipe: Pipeline, n: int = 200, *, cfg: float | None = None, top_k: int | None = None,
             temperature: float | None = None, seed: int = 0, tasks: tuple[str, ...] = ("und", "gen", "edit"),
             progress: Callable[[str, int, int], None] | None = None,
             keep_images: int = 0) -> tuple[dict, dict[str, list]]:
    """Run n cases per task (generation: n one-object and n two-object prompts); return (report, samples)."""
    t0 = time.time()
    report: dict = {"model": pipe.config.name, "cases_per_task": n, "seed_base": EVAL_SEED_BASE,
                    "settings": {"cfg": cfg if cfg is not None else pipe.config.sampling.generate_cfg,
                                 "top_k": top_k if top_k is not None else pipe.config.sampling.generate_top_k,
                                 "temperature": temperature if temperature is not None
                                 else pipe.config.sampling.generate_temperature, "seed": seed}}
    samples: dict[str, list] = {"generation": [], "editing": []}
    say = progress or (lambda task, done, total: None)
    knobs = {"cfg": cfg, "top_k": top_k, "temperature": temperature}

    if "und" in tasks:
        rows = []
        cases = _cases("und", n, 0)
        for i, c in enumerate(cases):
            got = pipe.understand(render(c["scene"]), c["question"], seed=seed)
            rows.append({"ok": got.strip() == c["answer"], "lang": c["lang"], "size": _size_name(c["size"]),
                         "kind": c["kind"]})
            say("understanding", i + 1, len(cases))
        report["understanding"] = {"accuracy": _rate([r["ok"] for r in rows]), "by_language": _breakdown(rows, "lang"),
                                   "by_size": _breakdown(rows, "size"), "by_kind": _breakdown(rows, "kind")}

    if "gen" in tasks:
        rows = []
        cases = [dict(c, objects=1) for c in _cases("gen1", n, 10_000_000)] + \
                [dict(c, objects=2) for c in _cases("gen2", n, 20_000_000)]
        done = 0
        for size in sorted({c["size"] for c in cases}):
            group = [c for c in cases if c["size"] == size]
            for start in range(0, len(group), BATCH):
                chunk = group[start:start + BATCH]
                outs = pipe.generate_many([c["prompt"] for c in chunk], size=size, seed=seed + start, **knobs)
                for c, im in zip(chunk, outs):
                    checks = compare(c["scene"], analyse(im))
                    ok = checks["all"]
                    rows.append({"ok": ok, "lang": c["lang"], "size": _size_name(size), "objects": c["objects"],
                                 "checks": checks})
                    if len(samples["generation"]) < keep_images:
                        samples["generation"].append((c["prompt"], im, ok))
                done += len(chunk)
                say("generation", done, len(cases))
        one = [r for r in rows if r["objects"] == 1]
        two = [r for r in rows if r["objects"] == 2]
        report["generation"] = {"one_object": _rate([r["ok"] for r in one]), "two_objects": _rate([r["ok"] for r in two]),
                                "overall": _rate([r["ok"] for r in rows]), "by_language": _breakdown(rows, "lang"),
                                "by_size": _breakdown(rows, "size"), "by_attribute": _by_attribute(rows)}

    if "edit" in tasks:
        rows = []
        cases = _cases("edit", n, 30_000_000)
        done = 0
        for size in sorted({c["size"] for c in cases}):
            group = [c for c in cases if c["size"] == size]
            for start in range(0, len(group), BATCH):
                chunk = group[start:start + BATCH]
                sources = [render(c["scene"]) for c in chunk]
                outs = pipe.edit_many(sources, [c["instruction"] for c in chunk], seed=seed + start, **knobs)
                for c, src, im in zip(chunk, sources, outs):
                    checks = compare(c["target"], analyse(im))
                    ok = checks["all"]
                    rows.append({"ok": ok, "lang": c["lang"], "size": _size_name(size), "kind": c["kind"],
                                 "reference": c["reference"], "checks": checks})
                    if len(samples["editing"]) < keep_images:
                        samples["editing"].append((c["instruction"], src, im, ok))
                done += len(chunk)
                say("editing", done, len(cases))
        report["editing"] = {"success": _rate([r["ok"] for r in rows]), "by_language": _breakdown(rows, "lang"),
                             "by_size": _breakdown(rows, "size"), "by_kind": _breakdown(rows, "kind"),
                             # Two-object edits naming one object, by how they name it (None rows left out).
                             "by_reference": _breakdown([r for r in rows if r["reference"]], "reference"),
                             "by_attribute": _by_attribute(rows)}

    report["bars"] = {k: {"bar": v, "value": _get(report, k), "pass": (_get(report, k) or 0) >= v}
                      for k, v in BARS.items() if _get(report, k) is not None}
    # Every language and canvas size should be within BALANCE of its task's overall figure.
    for section, overall_key in (("understanding", "accuracy"), ("generation", "overall"), ("editing", "success")):
        if section in report:
            overall = report[section][overall_key]
            worst = max(abs(v - overall) for key in ("by_language", "by_size") for v in report[section][key].values())
            report["bars"][f"{section}.balance"] = {"bar": BALANCE, "value": round(worst, 4), "pass": worst <= BALANCE}
    report["seconds"] = round(time.time() - t0, 1)
    return report, samples


def _get(report: dict, dotted: str) -> float | None:
    node = report
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def save_grid(samples: dict[str, list], path: str, scale: int = 2) -> None:
    """A picture grid: generated images (green/red frame = analyser pass/fail), then edit before -> after pairs."""
    tiles: list[tuple[Image.Image, bool]] = [(im, ok) for _p, im, ok in samples.get("generation", [])]
    for _t, src, im, ok in samples.get("editing", []):
        tiles.append((src, True))
        tiles.append((im, ok))
    if not tiles:
        return
    cell = 80 * scale + 8
    cols = 8
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (im, ok) in enumerate(tiles):
        x, y = (i % cols) * cell, (i // cols) * cell
        big = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        draw.rectangle([x + 1, y + 1, x + 2 + big.width + 3, y + 2 + big.height + 3],
                       outline=(40, 160, 40) if ok else (200, 40, 40), width=2)
        grid.paste(big, (x + 4, y + 4))
    grid.save(path)


def vq_round_trip_accuracy(vq, n: int = 120, seed: int = 0) -> float:
    """Fraction of held-out scenes the analyser still reads correctly after VQ encode -> decode."""
    import torch

    from ..engine import images as image_ops

    ok = 0
    for i in range(n):
        canvas = tuple(CANVAS_SIZES[i % len(CANVAS_SIZES)])
        scene = scene_from_seed(EVAL_SEED_BASE + 40_000_000 + seed + i, canvas=canvas)
        x = image_ops.vq_input(render(scene), canvas).to(next(vq.parameters()).device)
        with torch.inference_mode():
            out = vq.decode_codes(vq.encode(x))
        ok += scene_matches(scene, analyse(image_ops.vq_output_to_pil(out.float())[0]))
    return ok / n


def background_code_entropy(vq, n: int = 200, seed: int = 0) -> float:
    """Mean entropy (nats) of the top-left code of one-object 64x64 scenes, per background colour.

    That patch is pure background, so an ideal tokenizer gives it one code per colour (entropy 0). Encoders
    that see the whole image (GroupNorm, attention) spread it over synonyms, and every synonym is one more
    thing the LLM has to learn to predict; the recipe logs this next to the round-trip accuracy.
    """
    import torch

    from ..engine import images as image_ops

    by_colour: dict[str, Counter] = defaultdict(Counter)
    device = next(vq.parameters()).device
    for i in range(n):
        scene = scene_from_seed(EVAL_SEED_BASE + 50_000_000 + seed + i, canvas=(64, 64), n_objects=1)
        with torch.inference_mode():
            codes = vq.encode(image_ops.vq_input(render(scene), (64, 64)).to(device))
        by_colour[scene.background][int(codes[0, 0, 0])] += 1
    entropies = []
    for counts in by_colour.values():
        total = sum(counts.values())
        entropies.append(-sum(c / total * math.log(c / total) for c in counts.values()))
    return sum(entropies) / len(entropies)


# Chance on one-object scenes: three positions, three shapes, two sizes.
READING_CHANCE = {"position": 1 / 3, "shape": 1 / 3, "size": 1 / 2}


def vision_reading_check(pipe: Pipeline, n: int = 20, seed: int = 0) -> dict[str, float]:
    """Exact-answer accuracy of position, shape and size questions about one-object 64x64 scenes.

    Stage 0 either learns to find the object among the vision tokens or leaves these at chance, and the
    later stages did not make up for it (docs/tiny_model_runs.md, eleventh run); the recipe logs this right after
    stage 0.
    """
    result = {}
    for kind in READING_CHANCE:
        ok = 0
        for i in range(n):
            scene = scene_from_seed(EVAL_SEED_BASE + 60_000_000 + seed + i, canvas=(64, 64), n_objects=1)
            question, answer = question_answer(scene, LANGS[i % len(LANGS)], random.Random(i), kind=kind)
            ok += pipe.understand(render(scene), question, seed=0).strip() == answer.strip()
        result[kind] = ok / n
    return result
