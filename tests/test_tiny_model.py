"""The bundled tiny model, evaluated on held-out shapes-world seeds (50 cases per task, floors 10 points
under the bars that the full 200-case `wallaroo eval` is held to)."""
from __future__ import annotations

import pytest

from wallaroo_nodes.engine.cache import bundled_models
from wallaroo_nodes.eval.shapes_eval import BARS, background_code_entropy, evaluate, vq_round_trip_accuracy

pytestmark = pytest.mark.skipif("tiny" not in bundled_models(),
                                reason="bundled model wallaroo_nodes/models/tiny is absent (train it with "
                                       "`python -m wallaroo_nodes.train --export wallaroo_nodes/models/tiny`)")

FLOOR_MARGIN = 0.10
# The bundled model (the recipe's seventy-seventh run, one command from an empty folder) reaches the quick eval's floors of
# understanding, generation and editing, and the VQ round trip its 0.95 (README, "The bundled tiny model").
# Strict: once a retrained model reaches the floors these tests XPASS and fail, so the marker has to go with the fix.
BELOW_BARS = pytest.mark.xfail(strict=True, reason="bundled tiny model below the issue's bars; a better recipe "
                                                   "is open work (issue #3)")


@pytest.fixture(scope="module")
def pipe():
    from wallaroo_nodes.engine.cache import SHARED_CACHE
    return SHARED_CACHE.get("tiny", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def report(pipe):
    rep, _ = evaluate(pipe, n=50)
    return rep


def test_understanding_reads_shape_size_and_place(report):
    # The bundle (0.998 on 1,000 cases) reads what the seventh run answered at chance: shape, size, position.
    und = report["understanding"]
    assert und["by_kind"]["background"] >= 0.9
    assert min(und["by_kind"][k] for k in ("shape", "size", "position")) >= 0.6
    assert min(und["by_language"].values()) >= 0.8


def test_generation_lays_out_the_scene_it_is_asked_for(report):
    # Background, object count and places are right on 0.998 / 0.995 / 1.00 of 200 + 200 prompts (colour 1.00,
    # shape 0.968: shape is what still fails most).
    by_attribute = report["generation"]["by_attribute"]
    assert by_attribute["background"] >= 0.9
    assert by_attribute["count"] >= 0.8 and by_attribute["position"] >= 0.8


def test_the_stage_0_check_passes_the_bundled_model(pipe):
    # The check the recipe logs after stage 0: the bundle reads place, shape and size of one object (1.00 on
    # each kind's 20 questions); stage-0 runs that missed it stayed near chance (docs/tiny_model_runs.md,
    # eleventh run).
    from wallaroo_nodes.eval.shapes_eval import vision_reading_check
    assert min(vision_reading_check(pipe).values()) >= 0.9


@pytest.fixture(scope="module")
def round_trip(pipe):
    return vq_round_trip_accuracy(pipe.model.vq, n=60)


def test_vq_round_trip_keeps_most_scenes_readable(round_trip):
    # The bundled VQ (1,024 codes, cell-local, decoder polished) keeps 98% of the recipe's held-out scenes readable
    # (before the polish 93%; the third run's 80%).
    assert round_trip >= 0.9


def test_vq_gives_each_flat_background_colour_one_code(pipe):
    # Cell-local encoding: a flat cell's code cannot depend on its surroundings (third run's VQ: 0.83 nats).
    assert pipe.model.vq.cfg.cell_local
    assert background_code_entropy(pipe.model.vq, n=100) == 0.0


def test_vq_round_trip_keeps_scenes_readable(round_trip):
    # Reached with the decoder polish (recipe.VQ_POLISH_STEPS): small circles on the (80, 48) canvas no longer
    # come back with square corners.
    assert round_trip >= 0.95


# Metrics whose floor the bundled model reaches; the others are strict expected failures until it does.
# Seventy-seventh run, on 200 cases: understanding 1.000 (0.998 on 1,000); generation one-object 0.970, two-object
# 0.910; editing 0.835 (0.839 on 2,000); floors 0.85 / 0.80 / 0.65 / 0.70.
REACHED: set[str] = {"understanding.accuracy", "generation.one_object", "generation.two_objects", "editing.success"}


@pytest.mark.parametrize("metric", [m if m in REACHED else pytest.param(m, marks=BELOW_BARS) for m in sorted(BARS)])
def test_quick_eval_stays_above_floor(report, metric):
    section, name = metric.split(".")
    value = report[section][name]
    assert value >= BARS[metric] - FLOOR_MARGIN, f"{metric} = {value:.2f}, floor {BARS[metric] - FLOOR_MARGIN:.2f}"
