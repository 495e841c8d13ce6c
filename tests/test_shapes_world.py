"""The shapes world: deterministic scenes and texts, coverage, edit semantics, and analyser accuracy."""
from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from wallaroo_nodes.shapes import (ATTRIBUTES, BACKGROUND_COLOURS, CANVAS_SIZES, EDIT_KINDS, LANGS, OBJECT_COLOURS,
                                   POSITIONS, QA_KINDS, SHAPES, SIZES, Obj, Scene, accuracy, analyse, caption,
                                   caption_with_spans, compare, corpus_lines, description, edit_instruction, edit_kinds,
                                   match_objects, question_answer, render, scene_from_seed, scene_matches, vocabulary)
from wallaroo_nodes.shapes import text as text_mod

N_SCENES = 500
CJK = re.compile(r"[\u4e00-\u9fff]")


def all_texts(scene: Scene, lang: str, seed: int) -> list[str]:
    """Every kind of text for a scene, drawn from one seeded rng."""
    rng = random.Random(seed)
    out = [caption(scene, lang, rng)]
    for kind in QA_KINDS:
        out += question_answer(scene, lang, rng, kind)
    for kind in edit_kinds(scene):
        instruction, target = edit_instruction(scene, lang, rng, kind)
        out += [instruction, repr(target)]
    return out


def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 0.8, sigma: float = 8.0) -> Image.Image:
    """Roughly what a VQ autoencoder round trip does: slight blur plus Gaussian noise (sigma in 0-255 units)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    noisy = blurred + rng.normal(0.0, sigma, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


# --- determinism -----------------------------------------------------------------------------------------------


def test_same_seed_same_scene_texts_and_pixels():
    for seed in range(30):
        a, b = scene_from_seed(seed), scene_from_seed(seed)
        assert a == b
        assert render(a).tobytes() == render(b).tobytes()
        for lang in LANGS:
            assert all_texts(a, lang, seed) == all_texts(b, lang, seed)


def test_different_seeds_differ():
    scenes = [scene_from_seed(s) for s in range(100)]
    assert len(set(scenes)) > 90
    assert len({render(s).tobytes() for s in scenes}) == len(set(scenes))
    assert len({caption(scenes[0], "en", random.Random(s)) for s in range(30)}) > 5


def test_scene_dict_round_trip_and_order_free_equality():
    s = scene_from_seed(7, n_objects=2)
    assert Scene.from_dict(s.to_dict()) == s
    assert Scene(s.canvas, s.background, tuple(reversed(s.objects))) == s


# --- coverage and validity -------------------------------------------------------------------------------------


def test_scenes_valid_and_cover_every_attribute():
    seen: dict[str, set] = {k: set() for k in ("shape", "colour", "size", "position", "canvas", "background", "n",
                                               "qa", "edit")}
    for seed in range(N_SCENES):
        s = scene_from_seed(seed)
        assert not s.problems(), (seed, s, s.problems())
        assert s.canvas in CANVAS_SIZES and all(d % 16 == 0 for d in s.canvas)
        seen["canvas"].add(s.canvas)
        seen["background"].add(s.background)
        seen["n"].add(len(s.objects))
        for o in s.objects:
            for k in ("shape", "colour", "size", "position"):
                seen[k].add(getattr(o, k))
        rng = random.Random(seed)
        lang = LANGS[seed % 2]
        q, a = question_answer(s, lang, rng)
        seen["qa"].add(_qa_kind_of(q, lang))
        seen["edit"].add(_edit_kind_of(s, edit_instruction(s, lang, rng)[1]))
    assert seen["shape"] == set(SHAPES)
    assert seen["colour"] == set(OBJECT_COLOURS)
    assert seen["size"] == set(SIZES)
    assert seen["position"] == set(POSITIONS)
    assert seen["canvas"] == set(CANVAS_SIZES)
    assert seen["background"] == set(BACKGROUND_COLOURS)
    assert seen["n"] == {1, 2}
    assert seen["edit"] == set(EDIT_KINDS)
    assert seen["qa"] == set(QA_KINDS)
    questions = {question_answer(scene_from_seed(s), "en", random.Random(s))[0] for s in range(N_SCENES)}
    assert len(questions) > 100  # phrasings and references vary


def _qa_kind_of(question: str, lang: str) -> str:
    """Which QA kind a question was drawn from, by matching it against the templates."""
    # Fixed questions first: "What colour is the background?" also fits "What colour is {ref}?".
    candidates = sorted(((k, t) for k, ts in text_mod._QUESTION[lang].items() for t in ts), key=lambda kt: "{" in kt[1])
    for kind, t in candidates:
        pattern = re.escape(t).replace(re.escape("{ref}"), ".+").replace(re.escape("{what}"), ".+")
        if re.fullmatch(pattern, question, flags=re.IGNORECASE):
            return "position" if kind == "position_both" else kind
    raise AssertionError(f"no template matches {question!r}")


def _answer_fits_kind(scene: Scene, lang: str, kind: str, answer: str) -> bool:
    words = text_mod.WORDS[lang]
    if kind == "count":
        return answer == str(len(scene.objects))
    if kind == "description":
        return answer == description(scene, lang)
    if kind == "background":
        return answer == words[scene.background]
    return answer in {words[getattr(o, kind)] for o in scene.objects}


def _edit_kind_of(src: Scene, tgt: Scene) -> str:
    """Which edit turned src into tgt, judged from the scenes alone."""
    if len(tgt.objects) < len(src.objects):
        return "remove"
    if len(tgt.objects) > len(src.objects):
        return "add"
    if tgt.background != src.background:
        return "background"
    wrong = [k for k, ok in compare(src, tgt).items() if not ok and k != "all"]
    assert len(wrong) == 1, (src, tgt, wrong)
    return {"colour": "recolour", "shape": "reshape", "position": "move"}[wrong[0]]


def test_every_qa_kind_and_language_produces_text():
    for seed in range(200):
        s = scene_from_seed(seed)
        for lang in LANGS:
            for kind in QA_KINDS:
                q, a = question_answer(s, lang, random.Random(seed), kind)
                assert _qa_kind_of(q, lang) == kind, (kind, q)
                assert _answer_fits_kind(s, lang, kind, a) or _is_twin_answer(s, lang, kind, a), (kind, q, a)


def _is_twin_answer(scene: Scene, lang: str, kind: str, answer: str) -> bool:
    """Two objects identical but for position: the position answer names both places."""
    a, b = (scene.objects + (None, None))[:2]
    if kind != "position" or b is None or (a.shape, a.colour, a.size) != (b.shape, b.colour, b.size):
        return False
    words = text_mod.WORDS[lang]
    return answer == (" and " if lang == "en" else "和").join(words[o.position] for o in scene.objects)


def test_languages_use_their_script():
    for seed in range(N_SCENES):
        s = scene_from_seed(seed)
        rng = random.Random(seed)
        for kind in QA_KINDS:
            q, a = question_answer(s, "zh", rng, kind)
            assert CJK.search(q), q
            assert kind == "count" or CJK.search(a), a  # counts are digits in both languages
            q, a = question_answer(s, "en", rng, kind)
            assert q.isascii() and a.isascii(), (q, a)
        assert CJK.search(caption(s, "zh", rng)) and caption(s, "en", rng).isascii()
        for kind in edit_kinds(s):
            assert CJK.search(edit_instruction(s, "zh", rng, kind)[0])
            assert edit_instruction(s, "en", rng, kind)[0].isascii()


def test_captions_name_every_attribute():
    for seed in range(N_SCENES):
        s = scene_from_seed(seed)
        rng = random.Random(seed)
        en, zh = caption(s, "en", rng), caption(s, "zh", rng)
        assert s.background in en and text_mod.WORDS["zh"][s.background] in zh, (en, zh)
        for o in s.objects:
            en_phrases = [f"{size} {o.colour} {o.shape} {where}" for size in text_mod._SIZE_VARIANTS["en"][o.size]
                          for where in text_mod._PLACE["en"][o.position]]
            assert any(p in en for p in en_phrases), (en, o)
            w = text_mod.WORDS["zh"]
            assert f"{w[o.colour]}的{w[o.size]}{w[o.shape]}" in zh, (zh, o)
            assert any(p in zh for p in text_mod._PLACE["zh"][o.position]), (zh, o)


def test_caption_spans_cover_each_objects_own_phrase_and_keep_the_caption():
    """caption_with_spans draws what caption draws, and each span holds its object's words and no other's."""
    for seed in range(N_SCENES):
        s = scene_from_seed(seed, n_objects=2 if seed % 2 else None)
        for lang in LANGS:
            text, spans = caption_with_spans(s, lang, random.Random(seed))
            assert text == caption(s, lang, random.Random(seed))
            assert sorted(map(repr, (o for o, _, _ in spans))) == sorted(map(repr, s.objects))
            ends = sorted((start, end) for _, start, end in spans)
            assert all(a[1] < b[0] for a, b in zip(ends, ends[1:])), (text, spans)  # disjoint, in order
            for o, start, end in spans:
                phrase = text[start:end]
                w = text_mod.WORDS[lang]
                assert w[o.colour] in phrase and w[o.shape] in phrase, (text, phrase, o)
                assert any(p in phrase for p in text_mod._PLACE[lang][o.position]), (text, phrase, o)
                others = [x for x in s.objects if x is not o and x.colour != o.colour]
                assert not any(w[x.colour] in phrase for x in others), (text, phrase)


def test_answers_are_unique_functions_of_question():
    """The same question about the same scene always gets the same answer (references are unambiguous)."""
    for seed in range(200):
        s = scene_from_seed(seed, n_objects=2)
        for lang in LANGS:
            answers: dict[str, str] = {}
            for i in range(40):
                q, a = question_answer(s, lang, random.Random(seed * 1000 + i))
                assert answers.setdefault(q, a) == a, (s, q, a, answers[q])


def test_identical_twins_position_question():
    twin = Obj("circle", "red", "small", "left")
    s = Scene((64, 64), "white", (twin, Obj("circle", "red", "small", "right")))
    assert question_answer(s, "en", random.Random(0), "position")[1] == "left and right"
    assert question_answer(s, "zh", random.Random(0), "position")[1] == "左边和右边"


def test_canonical_answers():
    s = Scene((64, 64), "white", (Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "right")))
    assert description(s, "en") == ("A large red circle on the left and a small blue square on the right, "
                                     "on a white background.")
    assert description(s, "zh") == "一个红色的大圆形在左边，一个蓝色的小正方形在右边，背景是白色。"
    q, a = question_answer(s, "en", random.Random(0), "count")
    assert a == "2"
    q, a = question_answer(Scene((64, 64), "orange", s.objects[:1]), "en", random.Random(0), "background")
    assert a == "orange"


# --- edits -----------------------------------------------------------------------------------------------------


def test_edit_targets_change_exactly_what_was_asked():
    expected_wrong = {"recolour": {"colour"}, "reshape": {"shape"}, "background": {"background"}, "move": {"position"},
                      "add": {"count"}, "remove": {"count"}}
    for seed in range(N_SCENES):
        s = scene_from_seed(seed)
        for lang in LANGS:
            for kind in EDIT_KINDS:
                rng = random.Random(seed)
                if kind not in edit_kinds(s):
                    with pytest.raises(ValueError):
                        edit_instruction(s, lang, rng, kind)
                    continue
                instruction, t = edit_instruction(s, lang, rng, kind)
                assert not t.problems(), (kind, s, t, t.problems())
                assert t.canvas == s.canvas and t != s
                # remove: the target is what is left of the source; otherwise compare target to source.
                c = compare(t, s) if kind == "remove" else compare(s, t)
                wrong = {k for k in ATTRIBUTES if not c[k]}
                assert wrong == expected_wrong[kind], (kind, instruction, s, t, wrong)
                if kind == "remove":
                    assert set(t.objects) < set(s.objects)
                if kind == "add":
                    assert set(s.objects) < set(t.objects)
                if kind in ("recolour", "reshape", "move"):
                    assert len(set(s.objects) - set(t.objects)) == 1


def test_edit_kinds_depend_on_object_count():
    one, two = scene_from_seed(1, n_objects=1), scene_from_seed(1, n_objects=2)
    assert "add" in edit_kinds(one) and "remove" not in edit_kinds(one)
    assert "remove" in edit_kinds(two) and "add" not in edit_kinds(two)


# --- corpus ----------------------------------------------------------------------------------------------------


def test_corpus_lines():
    lines = list(corpus_lines(400, seed=3))
    assert len(lines) == 400 and lines == list(corpus_lines(400, seed=3))
    assert set(vocabulary("en")) <= set(lines) and set(vocabulary("zh")) <= set(lines)
    assert sum(bool(CJK.search(line)) for line in lines) > 100
    assert sum(line.isascii() and len(line.split()) > 3 for line in lines) > 100


# --- analyser --------------------------------------------------------------------------------------------------


def test_analyser_reads_clean_renders():
    results = []
    for seed in range(N_SCENES):
        s = scene_from_seed(seed)
        results.append(compare(s, analyse(render(s))))
    acc = accuracy(results)
    print(f"\nanalyser on clean renders ({N_SCENES} scenes): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["all"] >= 0.99


def test_analyser_reads_vq_like_renders():
    rng = np.random.default_rng(0)
    results = []
    for seed in range(N_SCENES):
        s = scene_from_seed(seed)
        results.append(compare(s, analyse(degrade(render(s), rng))))
    acc = accuracy(results)
    print(f"\nanalyser on blur 0.8 + noise 8/255 ({N_SCENES} scenes): "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["all"] >= 0.95


def test_analyser_survives_colour_shift():
    rng = np.random.default_rng(1)
    results = []
    for seed in range(100):
        s = scene_from_seed(seed)
        arr = np.asarray(render(s), dtype=np.float32) + rng.uniform(-20, 20, 3)
        results.append(compare(s, analyse(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))))
    assert accuracy(results)["all"] >= 0.95


def test_analyser_empty_and_garbage_images():
    assert analyse(Image.new("RGB", (64, 64), (250, 250, 250))) is None
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    got = analyse(Image.fromarray(noise))  # must not crash; whatever it reads is not a clean scene
    assert got is None or isinstance(got, Scene)
    s = scene_from_seed(0)
    assert compare(s, None) == {**{k: False for k in ATTRIBUTES}, "all": False}
    assert not scene_matches(s, None)


def test_comparison_is_order_free_and_attribute_level():
    a, b = Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "right")
    s = Scene((64, 64), "white", (a, b))
    assert scene_matches(s, Scene((64, 64), "white", (b, a)))
    assert scene_matches(s, Scene((48, 80), "white", (a, b)))  # canvas is not compared
    wrong = Scene((64, 64), "white", (a, Obj("triangle", "blue", "small", "right")))
    c = compare(s, wrong)
    assert not c["shape"] and not c["all"] and c["colour"] and c["size"] and c["position"] and c["count"]
    missing = Scene((64, 64), "white", (b,))
    c = compare(s, missing)
    assert not c["count"] and not c["shape"]
    assert dict(match_objects(s, missing))[b] == b


@pytest.mark.parametrize("task,n,offset,kinds", [("edit", 216, 30_000_000, EDIT_KINDS), ("und", 210, 0, None)])
def test_eval_cases_meet_every_kind_on_every_canvas_and_language(task, n, offset, kinds):
    """Per-size and per-language figures must compare sizes and languages, not edit or question kinds."""
    from collections import Counter
    from wallaroo_nodes.eval.shapes_eval import _cases
    from wallaroo_nodes.shapes import QA_KINDS
    kinds = kinds or QA_KINDS
    seen = Counter((c["kind"], c["size"], c["lang"]) for c in _cases(task, n, offset))
    assert len(seen) == len(kinds) * len(CANVAS_SIZES) * len(LANGS)
    assert max(seen.values()) - min(seen.values()) <= 1


@pytest.mark.parametrize("task,offset", [("und", 0), ("edit", 30_000_000)])
def test_eval_cases_name_either_of_two_objects(task, offset):
    """A case's words must not be drawn from its scene's stream: that named the right-hand of two objects in
    every two-object question, recolour, reshape and move, so the eval measured one object of the two."""
    from collections import Counter
    from wallaroo_nodes.eval.shapes_eval import _cases
    from wallaroo_nodes.shapes.text import _w
    named = Counter()
    for c in _cases(task, 400, offset):
        objs = c["scene"].objects
        if len(objs) != 2:
            continue
        if task == "und" and c["kind"] == "position":
            # The answer is the asked object's place (an object's place is unique in its scene).
            idx = [i for i, o in enumerate(objs) if _w(c["lang"], o.position) == c["answer"]]
        elif task == "edit" and c["kind"] in ("recolour", "reshape", "move", "remove"):
            idx = [i for i, o in enumerate(objs) if o not in c["target"].objects]  # the one edited away
        else:
            continue
        if len(idx) == 1:  # not "where are the two red circles"
            named[idx[0]] += 1
    total = sum(named.values())
    assert total >= 30, named
    assert 0.3 <= named[0] / total <= 0.7, named  # left-hand (first) object


def test_eval_edit_cases_say_whether_they_name_one_of_two_objects_by_place_or_by_looks():
    """`editing.by_reference` splits two-object edits by how the instruction names the object: by its place (which
    a cell can check against its own column) or by colour, shape and size alone (which it must find)."""
    from collections import Counter
    from wallaroo_nodes.eval.shapes_eval import _cases
    from wallaroo_nodes.shapes.text import _PLACE, reference_names_place
    seen = Counter()
    for c in _cases("edit", 432, 30_000_000):
        two = len(c["scene"].objects) == 2
        named = [o for o in c["scene"].objects if o not in c["target"].objects]
        if not two or c["kind"] in ("add", "background"):
            assert c["reference"] is None
            continue
        assert len(named) == 1
        places = _PLACE[c["lang"]][named[0].position]
        # A move's destination is another place than the named object's, so its words never match these.
        assert (c["reference"] == "place") == any(p in c["instruction"] for p in places), c
        seen[c["reference"]] += 1
    assert seen["place"] >= 20 and seen["looks"] >= 20, seen
    assert reference_names_place("the red circle on the left", Obj("circle", "red", "large", "left"), "en")
    assert not reference_names_place("the red circle", Obj("circle", "red", "large", "left"), "en")
    assert reference_names_place("左边的红色圆形", Obj("circle", "red", "large", "left"), "zh")


def test_question_answer_about_names_the_object_its_answer_is_about():
    from wallaroo_nodes.shapes import question_answer_about
    from wallaroo_nodes.shapes.text import _w
    named = 0
    for seed in range(300):
        scene = scene_from_seed(seed)
        kind = QA_KINDS[seed % len(QA_KINDS)]
        lang = LANGS[seed % 2]
        q, a = question_answer(scene, lang, random.Random(seed), kind=kind)
        q2, a2, obj = question_answer_about(scene, lang, random.Random(seed), kind=kind)
        assert (q, a) == (q2, a2)  # the same draws
        if kind in ("count", "background", "description"):
            assert obj is None
        elif obj is not None:
            named += 1
            assert obj in scene.objects and a == _w(lang, getattr(obj, kind))
        else:  # "where are the two red circles": two objects alike but for their places
            assert kind == "position" and len(scene.objects) == 2
    assert named > 100


def test_edit_instruction_about_names_the_source_object_it_changes():
    from wallaroo_nodes.shapes import edit_instruction_about, edit_instruction_with_span
    kinds_named = Counter()
    for seed in range(300):
        scene = scene_from_seed(seed)
        kinds = edit_kinds(scene)
        kind = kinds[seed % len(kinds)]
        lang = LANGS[seed % 2]
        instruction, target = edit_instruction(scene, lang, random.Random(seed), kind)
        instruction2, target2, obj = edit_instruction_about(scene, lang, random.Random(seed), kind)
        assert (instruction, target) == (instruction2, target2)  # the same draws
        *about, span = edit_instruction_with_span(scene, lang, random.Random(seed), kind)
        assert tuple(about) == (instruction, target, obj)
        if kind in ("add", "background"):
            assert obj is None and span is None
            continue
        # the span is where the template's {ref} went, and the reference names only the object's own colour/shape
        phrase, before, after = instruction[span[0]:span[1]], instruction[:span[0]], instruction[span[1]:]
        fits = [t for t in text_mod._EDIT[lang][kind] if t.split("{ref}")[0].lower() == before.lower()
                and re.fullmatch(re.escape(t.split("{ref}")[1]).replace(re.escape("{new}"), ".+"), after)]
        assert fits and phrase and phrase.strip() == phrase, (instruction, phrase)
        words = text_mod.WORDS[lang]
        for attr, values in (("colour", OBJECT_COLOURS), ("shape", SHAPES)):
            named = [v for v in values if words[v] in phrase]
            assert named in ([], [getattr(obj, attr)]), (instruction, phrase, obj)
        kinds_named[kind] += 1
        assert obj in scene.objects
        # the named object is the one the edit changes: it is gone from the target, the others stay
        assert obj not in target.objects
        assert [o for o in scene.objects if o != obj] == [o for o in target.objects if o in scene.objects]
    assert set(kinds_named) == {"remove", "recolour", "reshape", "move"}, kinds_named


def test_cached_shape_masks_cannot_be_changed_through_a_render():
    """Shape masks are cached (training renders the same few thousands of times): they are read-only, and a
    render is a fresh array, so changing one render changes neither the mask nor the next render."""
    from wallaroo_nodes.shapes.world import render_array, shape_mask
    scene = Scene((64, 64), "white", (Obj("circle", "red", "large", "centre"),))
    first = render_array(scene)
    before = first.copy()
    first[:] = 0
    assert np.array_equal(render_array(scene), before)
    mask = shape_mask("circle", 20)
    with pytest.raises(ValueError, match="read-only"):
        mask[0, 0] = not mask[0, 0]
