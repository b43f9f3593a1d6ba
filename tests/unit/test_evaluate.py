"""The shapes evaluator: exact scores for stand-in generators whose answers are known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import vqdiff.model.sampling.sampler as sampler_mod
from vqdiff.model.shapes import scenes as shapes
from vqdiff.model.shapes.evaluate import evaluate, grid
from vqdiff.model.sampling.params import GenerationParams


class _Fake:
    """Stands in for a model: ``sample`` is patched, so only what evaluate reads is needed."""

    generation_defaults: dict = {}


def _patch(monkeypatch, kind, split, n, draw):
    scenes = {caption: scene for caption, _, scene in shapes.prompt_scenes(kind, split, n)}

    def fake_sample(model, prompts, params, on_step=None):
        imgs = np.stack([draw(scenes[p], q.seed) for p, q in zip(prompts, params)])  # (B, H, W, 3)
        return sampler_mod.SampleResult(images=torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255,
                                        tokens=torch.zeros(len(prompts), 64, dtype=torch.long), params=params)

    monkeypatch.setattr(sampler_mod, "sample", fake_sample)


P = GenerationParams(steps=8)


@pytest.mark.parametrize("kind", ["one", "two", "three"])
def test_a_generator_that_draws_the_scene_scores_one(monkeypatch, kind):
    _patch(monkeypatch, kind, "heldout", 20, lambda scene, seed: shapes.render(scene))
    r = evaluate(_Fake(), kind, "heldout", n=20, samples=3, params=P)
    assert r["fidelity"] == 1.0 and r["quality"] == 1.0
    assert r["diversity"] == pytest.approx(1 / 3)  # the same image three times: one outcome
    assert r["images"].shape == (60, 32, 32, 3)


def test_wrong_colours_and_blank_images_are_caught(monkeypatch):
    def recolour(scene, seed):
        objs = tuple(replace(o, colour="green" if o.colour != "green" else "red") for o in scene.objects)
        return shapes.render(replace(scene, objects=objs))

    _patch(monkeypatch, "one", "train", 40, recolour)
    r = evaluate(_Fake(), "one", "train", n=40, params=P)
    stated_colour = sum(s.mentions[0].colour is not None for _, s in shapes.prompt_set("one", "train", 40))
    assert r["quality"] == 1.0
    assert r["fidelity"] == pytest.approx(1 - stated_colour / 40)  # only captions that name no colour survive

    _patch(monkeypatch, "two", "train", 10, lambda scene, seed: np.full((32, 32, 3), 255, np.uint8))
    assert evaluate(_Fake(), "two", "train", n=10, params=P)["fidelity"] == 0.0


def test_diversity_counts_distinct_outcomes(monkeypatch):
    def jitter(scene, seed):  # a different layout for every seed: moved objects read as another outcome
        rng = np.random.default_rng(seed)
        return shapes.render(shapes.sample_scene(rng, "train", len(scene.objects)))

    _patch(monkeypatch, "one", "train", 10, jitter)
    r = evaluate(_Fake(), "one", "train", n=10, samples=4, params=P)
    assert r["diversity"] > 0.9


def test_grid_layout():
    g = grid(np.zeros((10, 32, 32, 3), np.uint8), columns=4, scale=2)
    assert g.shape == ((3 * 33 + 1) * 2, (4 * 33 + 1) * 2, 3)


def test_failure_reasons():
    from vqdiff.model.shapes import grade
    from vqdiff.model.shapes import scenes as shapes
    from vqdiff.model.shapes.evaluate import failure

    red, blue = shapes.Mention("circle", "red", None), shapes.Mention("square", "blue", None)
    stated = shapes.Stated((red, blue), relation=(0, "above", 1))
    obj = lambda shape, colour, cx, cy: grade.ParsedObj(shape, colour, "small", cx, cy)  # noqa: E731
    ok = grade.Parsed((obj("circle", "red", 16, 6), obj("square", "blue", 16, 26)), clean=True)
    assert failure(ok, stated) is None
    assert failure(grade.Parsed(ok.objects, clean=False), stated) == "unclean"
    assert failure(grade.Parsed(ok.objects[:1], clean=True), stated) == "count"
    flipped = grade.Parsed((obj("circle", "red", 16, 26), obj("square", "blue", 16, 6)), clean=True)
    assert failure(flipped, stated) == "relation"
    wrong = grade.Parsed((obj("circle", "green", 16, 6), obj("square", "blue", 16, 26)), clean=True)
    assert failure(wrong, stated) == "attributes"


def test_fact_tally_picks_the_best_assignment_and_counts_each_fact():
    from vqdiff.model.shapes import grade
    from vqdiff.model.shapes import scenes as shapes
    from vqdiff.model.shapes.evaluate import fact_tally

    red = shapes.Mention("circle", "red", "small")
    blue = shapes.Mention("square", "blue", None)
    stated = shapes.Stated((red, blue), relation=(0, "above", 1))
    obj = lambda shape, colour, cx, cy: grade.ParsedObj(shape, colour, "small", cx, cy)  # noqa: E731
    # the blue square is drawn as a triangle and the pair is upside down: 4 of 6 facts shown
    parsed = grade.Parsed((obj("triangle", "blue", 16, 6), obj("circle", "red", 16, 26)), clean=True)
    assert fact_tally(parsed, stated) == {"shape": (1, 2), "colour": (2, 2), "size": (1, 1), "relation": (0, 1)}
    assert fact_tally(grade.Parsed(parsed.objects[:1], clean=True), stated) == {}  # a count miss
    placed = shapes.Stated((shapes.Mention(None, "green", None, "left"),))
    left, right = obj("square", "green", 5, 16), obj("square", "green", 27, 16)
    assert fact_tally(grade.Parsed((left,), clean=True), placed) == {"colour": (1, 1), "place": (1, 1)}
    assert fact_tally(grade.Parsed((right,), clean=True), placed) == {"colour": (1, 1), "place": (0, 1)}


def test_shape_misses_say_what_is_drawn_instead():
    from vqdiff.model.shapes import grade
    from vqdiff.model.shapes import scenes as shapes
    from vqdiff.model.shapes.evaluate import shape_misses

    stated = shapes.Stated((shapes.Mention("square", "red", None), shapes.Mention("circle", "yellow", None)))
    obj = lambda shape, colour, cx: grade.ParsedObj(shape, colour, "small", cx, 16)  # noqa: E731
    both = lambda a, b: grade.Parsed((a, b), clean=True)  # noqa: E731
    assert shape_misses(both(obj("square", "red", 6), obj("circle", "yellow", 26)), stated) == {}
    # the red square drawn with the circle's shape: carried across from the other mention
    assert shape_misses(both(obj("circle", "red", 6), obj("circle", "yellow", 26)), stated) == {"another mention's": 1}
    assert shape_misses(both(obj("triangle", "red", 6), obj("circle", "yellow", 26)), stated) == {"held-out pair": 1}
    yellow = shapes.Stated((shapes.Mention("square", "yellow", None), shapes.Mention("circle", "red", None)))
    assert shape_misses(both(obj("triangle", "yellow", 6), obj("circle", "red", 26)), yellow) == {"another shape": 1}
    assert shape_misses(both(obj(None, "yellow", 6), obj("square", "red", 26)), yellow) == {
        "no shape": 1, "another mention's": 1}
    assert shape_misses(grade.Parsed((obj("circle", "red", 6),), clean=True), stated) == {}  # a count miss


def test_evaluate_reports_facts(monkeypatch):
    _patch(monkeypatch, "one", "train", 12, lambda scene, seed: shapes.render(scene))
    r = evaluate(_Fake(), "one", "train", 12, 1, P)
    assert r["facts"] and all(a == n and n > 0 for a, n in r["facts"].values())  # a perfect drawer shows every fact
    assert sum(n for _, n in r["facts"].values()) >= 12


def test_evaluate_counts_images_that_draw_a_heldout_pair(monkeypatch):
    _patch(monkeypatch, "two", "heldout", 10, lambda scene, seed: shapes.render(scene))
    assert evaluate(_Fake(), "two", "heldout", 10, 1, P)["heldout_drawn"] == (10, 0)  # each asks for one, drawn

    _patch(monkeypatch, "one", "train", 30, lambda scene, seed: shapes.render(scene))
    assert evaluate(_Fake(), "one", "train", 30, 1, P)["heldout_drawn"] == (0, 0)  # the train split never draws one

    def red_triangles(scene, seed):  # every object a red triangle: drawn in every image, a miss where stated otherwise
        return shapes.render(replace(scene, objects=tuple(replace(o, colour="red", shape="triangle") for o in scene.objects)))

    _patch(monkeypatch, "one", "train", 30, red_triangles)
    r = evaluate(_Fake(), "one", "train", 30, 1, P)
    asked_otherwise = sum(any(m.shape not in (None, "triangle") or m.colour not in (None, "red") for m in s.mentions)
                          for _, s in shapes.prompt_set("one", "train", 30))
    assert r["heldout_drawn"] == (30, asked_otherwise) and 0 < asked_otherwise < 30
    shapes_asked = sum(sum(m.shape not in (None, "triangle") for m in s.mentions)
                       for _, s in shapes.prompt_set("one", "train", 30))
    assert r["shapes_missed"] == ({"held-out pair": shapes_asked} if shapes_asked else {})
    assert r["fidelity"] == pytest.approx(1 - asked_otherwise / 30)


def test_outcomes_and_standard_errors_follow_the_images(monkeypatch):
    def by_seed(scene, seed):  # odd image seeds draw a blank image (a count miss), even ones the scene
        return np.full((32, 32, 3), 255, np.uint8) if seed % 2 else shapes.render(scene)

    _patch(monkeypatch, "one", "train", 10, by_seed)
    r = evaluate(_Fake(), "one", "train", n=10, samples=2, params=P, seed=0)
    o = r["outcomes"]
    assert [(x["prompt"], x["sample"]) for x in o] == [(i, j) for i in range(10) for j in range(2)]
    assert [x["caption"] for x in o[::2]] == [c for c, _ in shapes.prompt_set("one", "train", 10)]
    assert [x["failure"] for x in o] == [None, "count"] * 10  # image seed = prompt * 2 + sample
    assert r["fidelity"] == 0.5 and r["fidelity_se"] == 0.0  # every prompt scores 0.5: no spread over prompts
    assert r["quality"] == 1.0 and r["quality_se"] == 0.0  # a blank image is clean, only empty

    _patch(monkeypatch, "one", "train", 10, by_seed)
    r = evaluate(_Fake(), "one", "train", n=10, samples=1, params=P, seed=0)
    hits = np.array([x["failure"] is None for x in r["outcomes"]], float)  # alternating 1, 0
    assert r["fidelity"] == 0.5 and r["fidelity_se"] == pytest.approx(hits.std(ddof=1) / np.sqrt(10))
