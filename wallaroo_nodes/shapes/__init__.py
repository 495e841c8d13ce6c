"""The procedural bilingual shapes world: scenes, renderer, texts and a pixel analyser for evaluation."""
from .analyser import ATTRIBUTES, accuracy, analyse, compare, match_objects, read_scene, scene_matches
from .text import (EDIT_KINDS, LANGS, QA_KINDS, added_object_span, caption, caption_with_spans, corpus_lines,
                   description, edit_instruction, edit_instruction_about, edit_instruction_with_span, edit_kinds,
                   question_answer, question_answer_about, reference_names_place, vocabulary)
from .world import (BACKGROUND_COLOURS, CANVAS_SIZES, OBJECT_COLOURS, PALETTE, POSITIONS, SHAPES, SIZES, Obj, Scene,
                    random_scene, render, scene_from_seed)

__all__ = [
    "ATTRIBUTES", "BACKGROUND_COLOURS", "CANVAS_SIZES", "EDIT_KINDS", "LANGS", "OBJECT_COLOURS", "Obj", "PALETTE",
    "POSITIONS", "QA_KINDS", "SHAPES", "SIZES", "Scene", "accuracy", "added_object_span", "analyse", "caption",
    "caption_with_spans", "compare", "corpus_lines", "description", "edit_instruction", "edit_instruction_about",
    "edit_instruction_with_span", "edit_kinds", "match_objects", "question_answer", "question_answer_about",
    "random_scene", "read_scene", "reference_names_place", "render", "scene_from_seed", "scene_matches", "vocabulary",
]
