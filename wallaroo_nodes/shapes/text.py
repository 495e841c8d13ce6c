"""Bilingual (English / Chinese) texts about shapes-world scenes: captions, questions, edits.

Prompts vary (several phrasings, picked with the caller's rng); answers are canonical and exact so
they can be compared as strings. Every object reference is unique within its scene.
"""
from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator

from .world import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, Obj, Scene, random_object, random_scene

LANGS: tuple[str, ...] = ("en", "zh")
QA_KINDS: tuple[str, ...] = ("shape", "colour", "size", "count", "position", "background", "description")
EDIT_KINDS: tuple[str, ...] = ("recolour", "reshape", "background", "remove", "add", "move")

# Canonical words (also the exact answers); variants are only used inside prompts.
WORDS: dict[str, dict[str, str]] = {
    "en": {"circle": "circle", "square": "square", "triangle": "triangle",
           "red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple",
           "orange": "orange", "white": "white", "black": "black", "gray": "gray",
           "small": "small", "large": "large", "left": "left", "centre": "centre", "right": "right"},
    "zh": {"circle": "圆形", "square": "正方形", "triangle": "三角形",
           "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
           "orange": "橙色", "white": "白色", "black": "黑色", "gray": "灰色",
           "small": "小", "large": "大", "left": "左边", "centre": "中间", "right": "右边"},
}
_PLURAL_EN = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_SIZE_VARIANTS = {"en": {"small": ("small", "little"), "large": ("large", "big")},
                  "zh": {"small": ("小",), "large": ("大",)}}
# English "where" phrases ("on the left"); Chinese bare place words ("左边").
_PLACE = {"en": {"left": ("on the left", "at the left"), "centre": ("in the centre", "in the middle"),
                 "right": ("on the right", "at the right")},
          "zh": {"left": ("左边", "左侧"), "centre": ("中间", "中央"), "right": ("右边", "右侧")}}
_MOVE_TO = {"en": {"left": ("to the left",), "centre": ("to the centre", "to the middle"), "right": ("to the right",)},
            "zh": _PLACE["zh"]}
_ARTICLE_AN = ("orange",)
_NOUN = {"en": ("object", "shape"), "zh": ("物体", "图形")}

_CAPTION = {
    "en": ("{objs} on {a_bg} background.", "{A_bg} background with {objs}.", "Draw {objs} on {a_bg} background.",
           "An image of {objs}; the background is {bg}.", "Generate {objs} on {a_bg} background."),
    "zh": ("{bg}背景上，{objs}。", "画一张图：{objs}，背景是{bg}。", "{objs}，背景为{bg}。", "一张{bg}背景的图片：{objs}。",
           "生成一张图片：{objs}，背景是{bg}。"),
}
_QUESTION = {
    "en": {"shape": ("What shape is {ref}?", "What is the shape of {ref}?", "Which shape is {ref}?"),
           "colour": ("What colour is {ref}?", "What is the colour of {ref}?", "Which colour is {ref}?"),
           "size": ("Is {ref} small or large?", "What size is {ref}?", "Is {ref} big or small?"),
           "count": ("How many objects are there?", "How many shapes are in the image?", "Count the objects."),
           "position": ("Where is {ref}?", "Is {ref} on the left, in the centre or on the right?",
                        "In which part of the image is {ref}?"),
           "position_both": ("Where are the two {what}?", "Which positions do the two {what} take?"),
           "background": ("What colour is the background?", "What is the background colour?",
                          "Which colour is the background?"),
           "description": ("Describe the image.", "What is in the picture?", "Describe the scene.")},
    "zh": {"shape": ("{ref}是什么形状？", "{ref}的形状是什么？"),
           "colour": ("{ref}是什么颜色？", "{ref}的颜色是什么？"),
           "size": ("{ref}是大还是小？", "{ref}是大的还是小的？"),
           "count": ("图中有几个物体？", "图片里有多少个图形？", "数一数图中有几个物体。"),
           "position": ("{ref}在哪里？", "{ref}在左边、中间还是右边？", "{ref}在图中的什么位置？"),
           "position_both": ("两个{what}在哪里？", "两个{what}分别在什么位置？"),
           "background": ("背景是什么颜色？", "背景的颜色是什么？"),
           "description": ("描述这张图片。", "图中有什么？", "请描述这个场景。")},
}
_EDIT = {
    "en": {"recolour": ("Make {ref} {new}.", "Change the colour of {ref} to {new}.", "Paint {ref} {new}.",
                        "Recolour {ref} {new}."),
           "reshape": ("Turn {ref} into a {new}.", "Change {ref} into a {new}.", "Make {ref} a {new}."),
           "background": ("Change the background to {new}.", "Make the background {new}.", "Use {a_new} background."),
           "remove": ("Remove {ref}.", "Delete {ref}.", "Take away {ref}."),
           "add": ("Add {new}.", "Put {new}.", "Draw {new} too."),
           "move": ("Move {ref} {new}.", "Shift {ref} {new}.")},
    "zh": {"recolour": ("把{ref}改成{new}。", "将{ref}的颜色换成{new}。", "把{ref}涂成{new}。"),
           "reshape": ("把{ref}变成{new}。", "将{ref}换成{new}。", "把{ref}改成{new}。"),
           "background": ("把背景改成{new}。", "将背景换成{new}。", "背景改为{new}。"),
           "remove": ("删除{ref}。", "去掉{ref}。", "把{ref}移除。"),
           "add": ("在{place}添加一个{obj}。", "在{place}加一个{obj}。", "再画一个{obj}，放在{place}。"),
           "move": ("把{ref}移到{new}。", "将{ref}移动到{new}。")},
}


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")


def _a(word: str) -> str:
    """English indefinite article for a word."""
    return "an" if word in _ARTICLE_AN else "a"


def _w(lang: str, name: str) -> str:
    return WORDS[lang][name]


def _zh_noun_phrase(colour: str | None, size: str | None, shape: str | None, rng: random.Random) -> str:
    """Chinese '红色的大圆形' style phrase from optional attributes."""
    if shape:
        head = (_w("zh", size) if size else "") + _w("zh", shape)
    elif size:
        head = _w("zh", size) + rng.choice(_NOUN["zh"])
    else:
        head = rng.choice(_NOUN["zh"])
    return (_w("zh", colour) + "的" + head) if colour else head


def object_phrase(obj: Obj, lang: str, rng: random.Random, place: bool = True) -> str:
    """An indefinite phrase naming all of an object's attributes ('a small red circle on the left')."""
    _check_lang(lang)
    if lang == "en":
        words = f"{rng.choice(_SIZE_VARIANTS['en'][obj.size])} {obj.colour} {obj.shape}"
        if not place:
            return f"a {words}"
        return f"a {words} {rng.choice(_PLACE['en'][obj.position])}"
    noun = f"一个{_w('zh', obj.colour)}的{_w('zh', obj.size)}{_w('zh', obj.shape)}"
    if not place:
        return noun[2:]  # without the classifier, for "添加一个…" templates
    where = rng.choice(_PLACE["zh"][obj.position])
    return rng.choice((f"{noun}在{where}", f"{where}有{noun}", f"{where}{noun}"))


def singles_out(scene: Scene, obj: Obj, attrs: tuple[str, ...]) -> bool:
    """Whether `obj`'s values of `attrs` differ, in some attribute, from every other object's in the scene."""
    return all(any(getattr(o, a) != getattr(obj, a) for a in attrs) for o in scene.objects if o != obj)


def _unique_refs(scene: Scene, obj: Obj, exclude: str | None) -> list[tuple[str, ...]]:
    """Attribute subsets (0-2 attributes) that single out `obj` among the scene's objects."""
    attrs = [a for a in ("size", "colour", "shape", "position") if a != exclude]
    return [combo for k in range(0, 3) for combo in itertools.combinations(attrs, k) if singles_out(scene, obj, combo)]


def reference(scene: Scene, obj: Obj, lang: str, rng: random.Random, exclude: str | None = None) -> str | None:
    """A definite phrase that picks out `obj` uniquely without using attribute `exclude`, or None."""
    _check_lang(lang)
    refs = _unique_refs(scene, obj, exclude)
    if not refs:
        return None
    combo = rng.choice(refs)
    size = obj.size if "size" in combo else None
    colour = obj.colour if "colour" in combo else None
    shape = obj.shape if "shape" in combo else None
    if lang == "en":
        words = [rng.choice(_SIZE_VARIANTS["en"][size])] if size else []
        words += [colour] if colour else []
        # "What shape is the object" rather than "... the shape".
        words += [shape] if shape else [rng.choice(_NOUN["en"][:1] if exclude == "shape" else _NOUN["en"])]
        phrase = "the " + " ".join(words)
        if "position" in combo:
            phrase += " " + rng.choice(_PLACE["en"][obj.position])
        return phrase
    phrase = _zh_noun_phrase(colour, size, shape, rng)
    if "position" in combo:
        phrase = rng.choice(_PLACE["zh"][obj.position]) + "的" + phrase
    elif not combo:
        phrase = "这个" + phrase
    return phrase


def description(scene: Scene, lang: str) -> str:
    """The canonical full description (the exact answer to a 'description' question)."""
    _check_lang(lang)
    if lang == "en":
        objs = " and ".join(f"a {o.size} {o.colour} {o.shape} {_PLACE['en'][o.position][0]}" for o in scene.objects)
        return f"{objs[0].upper()}{objs[1:]}, on {_a(scene.background)} {scene.background} background."
    objs = "，".join(f"一个{_w('zh', o.colour)}的{_w('zh', o.size)}{_w('zh', o.shape)}在{_w('zh', o.position)}"
                    for o in scene.objects)
    return f"{objs}，背景是{_w('zh', scene.background)}。"


def caption(scene: Scene, lang: str, rng: random.Random) -> str:
    """A generation prompt naming every object's size, colour, shape and position, and the background."""
    return caption_with_spans(scene, lang, rng)[0]


def caption_with_spans(scene: Scene, lang: str, rng: random.Random) -> tuple[str, list[tuple[Obj, int, int]]]:
    """`caption`'s text (same draws, so the same text) and, per object, the [start, end) characters of its phrase."""
    _check_lang(lang)
    objs = list(scene.objects)
    rng.shuffle(objs)  # order carries no meaning; positions are explicit
    phrases = [object_phrase(o, lang, rng) for o in objs]
    sep = " and " if lang == "en" else "，"
    joined = sep.join(phrases)
    bg = _w(lang, scene.background)
    template = rng.choice(_CAPTION[lang])
    background = {"bg": bg, "a_bg": f"{_a(bg)} {bg}", "A_bg": f"{_a(bg).title()} {bg}"}
    text = template.format(objs=joined, **background)
    at = len(template[:template.index("{objs}")].format(**background))  # where the first phrase starts
    spans = []
    for obj, phrase in zip(objs, phrases):
        spans.append((obj, at, at + len(phrase)))
        at += len(phrase) + len(sep)
    return text[0].upper() + text[1:], spans


def question_answer(scene: Scene, lang: str, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """A (question, exact answer) pair of the given kind (random kind when None)."""
    question, answer, _ = question_answer_about(scene, lang, rng, kind)
    return question, answer


def question_answer_about(scene: Scene, lang: str, rng: random.Random,
                          kind: str | None = None) -> tuple[str, str, Obj | None]:
    """`question_answer`'s pair (same draws) and the one object the question names (None: the whole scene, or
    two objects that only their places tell apart)."""
    _check_lang(lang)
    kind = kind if kind is not None else rng.choice(QA_KINDS)
    if kind not in QA_KINDS:
        raise ValueError(f"unknown QA kind {kind!r}")
    templates = _QUESTION[lang]
    if kind in ("count", "background", "description"):
        q = rng.choice(templates[kind])
        a = {"count": str(len(scene.objects)), "background": _w(lang, scene.background),
             "description": description(scene, lang)}[kind]
        return q, a, None
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, lang, rng, exclude=kind)
    if ref is None:
        # Only 'position' can fail: two objects identical but for position. Ask where both are.
        what = (f"{obj.size} {obj.colour} {_PLURAL_EN[obj.shape]}" if lang == "en"
                else _zh_noun_phrase(obj.colour, obj.size, obj.shape, rng))
        q = rng.choice(templates["position_both"]).format(what=what)
        places = [_w(lang, o.position) for o in scene.objects]
        return q, (" and ".join(places) if lang == "en" else "和".join(places)), None
    q = rng.choice(templates[kind]).format(ref=ref)
    return q[0].upper() + q[1:], _w(lang, getattr(obj, kind)), obj


def edit_kinds(scene: Scene) -> tuple[str, ...]:
    """The edit kinds applicable to a scene (remove needs two objects, add needs one)."""
    return tuple(k for k in EDIT_KINDS
                 if not (k == "remove" and len(scene.objects) < 2) and not (k == "add" and len(scene.objects) > 1))


def edit_instruction(scene: Scene, lang: str, rng: random.Random, kind: str | None = None) -> tuple[str, Scene]:
    """An (instruction, target scene) pair; the target differs from `scene` only as instructed."""
    instruction, target, _ = edit_instruction_about(scene, lang, rng, kind)
    return instruction, target


def edit_instruction_about(scene: Scene, lang: str, rng: random.Random,
                           kind: str | None = None) -> tuple[str, Scene, Obj | None]:
    """`edit_instruction`'s pair (same draws) and the source object the instruction names (None: it names none,
    as adding an object or changing the background)."""
    text, target, obj, _ = edit_instruction_with_span(scene, lang, rng, kind)
    return text, target, obj


def added_object_span(instruction: str, lang: str) -> tuple[int, int]:
    """The [start, end) characters of an "add" instruction that describe the new object, its place included (in
    Chinese the place and the object are two fills, so the span runs from the first to the end of the last)."""
    _check_lang(lang)
    for template in _EDIT[lang]["add"]:
        # Every fill becomes a group; the instruction's first letter was capitalised after filling.
        pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>.+)", re.escape(template))
        match = re.fullmatch(pattern, instruction[:1].lower() + instruction[1:]) or re.fullmatch(pattern, instruction)
        if match:
            return min(match.start(g) for g in match.groupdict()), max(match.end(g) for g in match.groupdict())
    raise ValueError(f"{instruction!r} fits none of the {lang} add templates: pass an add instruction and its language")


def reference_names_place(phrase: str, obj: Obj, lang: str) -> bool:
    """Whether a phrase that names `obj` (a `reference`) says where it is, not only what it looks like."""
    _check_lang(lang)
    return any(place in phrase for place in _PLACE[lang][obj.position])


def edit_instruction_with_span(scene: Scene, lang: str, rng: random.Random, kind: str | None = None
                               ) -> tuple[str, Scene, Obj | None, tuple[int, int] | None]:
    """`edit_instruction_about`'s triple (same draws) and the [start, end) characters of the phrase that names the
    source object (None where it names none)."""
    _check_lang(lang)
    allowed = edit_kinds(scene)
    kind = kind if kind is not None else rng.choice(allowed)
    if kind not in allowed:
        raise ValueError(f"edit kind {kind!r} does not apply to a scene with {len(scene.objects)} object(s)")
    templates = _EDIT[lang]
    if kind == "background":
        used = {o.colour for o in scene.objects}
        new_bg = rng.choice([c for c in BACKGROUND_COLOURS if c not in used and c != scene.background])
        word = _w(lang, new_bg)
        text = rng.choice(templates[kind]).format(new=word, a_new=f"{_a(word)} {word}")
        return text, Scene(scene.canvas, new_bg, scene.objects), None, None
    if kind == "add":
        pos = rng.choice(scene.free_positions())
        new = random_object(rng, pos, background=scene.background)
        if lang == "en":
            text = rng.choice(templates[kind]).format(new=object_phrase(new, lang, rng))
        else:
            text = rng.choice(templates[kind]).format(place=rng.choice(_PLACE["zh"][pos]),
                                                      obj=object_phrase(new, lang, rng, place=False))
        return text[0].upper() + text[1:], scene.add_object(new), None, None
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, lang, rng)  # position always makes a unique reference
    if kind == "remove":
        target, new_word = scene.replace_object(obj, None), ""
    elif kind == "recolour":
        colour = rng.choice([c for c in OBJECT_COLOURS if c not in (obj.colour, scene.background)])
        target, new_word = scene.replace_object(obj, Obj(obj.shape, colour, obj.size, obj.position)), _w(lang, colour)
    elif kind == "reshape":
        shape = rng.choice([s for s in SHAPES if s != obj.shape])
        target, new_word = scene.replace_object(obj, Obj(shape, obj.colour, obj.size, obj.position)), _w(lang, shape)
    else:  # move
        pos = rng.choice(scene.free_positions())
        target = scene.replace_object(obj, Obj(obj.shape, obj.colour, obj.size, pos))
        new_word = rng.choice(_MOVE_TO[lang][pos])
    template = rng.choice(templates[kind])
    text = template.format(ref=ref, new=new_word)
    at = template.index("{ref}")  # every template names the object before anything else it fills in
    return text[0].upper() + text[1:], target, obj, (at, at + len(ref))


def vocabulary(lang: str) -> list[str]:
    """Every word and fixed phrase fragment the texts of a language can use."""
    _check_lang(lang)
    words = set(WORDS[lang].values()) | set(_NOUN[lang])
    words |= {v for d in (_SIZE_VARIANTS, _PLACE, _MOVE_TO) for vs in d[lang].values() for v in vs}
    if lang == "en":
        words |= set(_PLURAL_EN.values())
    return sorted(words)


def corpus_lines(n: int, seed: int = 0) -> Iterator[str]:
    """n sample texts of every kind in both languages (vocabulary first), e.g. for training a BPE tokenizer."""
    rng = random.Random(seed)
    emitted = 0
    for lang in LANGS:
        for word in vocabulary(lang):
            if emitted >= n:
                return
            yield word
            emitted += 1
    while emitted < n:
        scene = random_scene(rng)
        lang = rng.choice(LANGS)
        q, a = question_answer(scene, lang, rng)
        instruction, _ = edit_instruction(scene, lang, rng)
        for text in (caption(scene, lang, rng), q, a, instruction):
            if emitted >= n:
                return
            yield text
            emitted += 1
