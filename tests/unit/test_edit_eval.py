"""The editing benchmark's pieces (model/shapes/edit_eval.py): the replacement object, the mask, the
caption, the token distances, why a new object misses, and one small run on the default model."""

from __future__ import annotations

import numpy as np
import torch

from vqdiff.model.shapes import edit_eval, grade
from vqdiff.model.shapes.scenes import HELDOUT, Obj, Scene, render


def test_the_replacement_differs_in_shape_and_colour_and_is_never_held_out():
    scene = Scene((Obj("circle", "red", "large", 10, 10), Obj("square", "blue", "small", 24, 24)))
    rng = np.random.default_rng(0)
    for _ in range(50):
        new = edit_eval.swap_first(scene, rng)
        assert new.shape != "circle" and new.colour != "red" and (new.colour, new.shape) not in HELDOUT
        assert (new.size, new.cx, new.cy) == ("large", 10, 10)


def test_mask_caption_and_distances():
    obj = Obj("square", "green", "small", 8.0, 8.0)  # half extent 4 at 32 px
    m = edit_eval.box_mask(obj, 32, pad=1)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (3, 12, 3, 12)
    text, stated = edit_eval.caption((obj, Obj("circle", "red", "large", 20, 20)), 32)
    assert text == "a small green square and a large red circle" and len(stated.mentions) == 2
    edit = torch.zeros(16, dtype=torch.bool)
    edit[5] = True  # token (1, 1) of a 4x4 grid
    d = edit_eval.token_distance(edit, 4, 4)
    assert d[1, 1] == 0 and d[0, 0] == 1 and d[3, 3] == 2 and d[1, 3] == 2


def test_why_a_new_object_misses():
    new = Obj("triangle", "orange", "large", 10.0, 10.0)
    kept = Obj("circle", "blue", "small", 24.0, 24.0)
    right = grade.parse(render(Scene((new, kept))))
    assert edit_eval.new_miss(right, new) is None
    wrong = grade.parse(render(Scene((Obj("square", "orange", "large", 10.0, 10.0), kept))))
    assert edit_eval.new_miss(wrong, new) == "shape"
    assert edit_eval.new_miss(grade.parse(render(Scene((kept,)))), new) == "nothing"


def test_a_small_run_reads_back_every_row():
    from vqdiff.model.io.default import default_model_dir
    from vqdiff.model.io.folder import load_model
    from vqdiff.model.sampling.sampler import default_params

    model = load_model(default_model_dir())
    rows = edit_eval.evaluate_edits(model, n=3, seed=5, steps=(2,))
    assert [r["task"] for r in rows] == ["edit", "generate"]
    edit_row = rows[0]
    assert edit_row["images"].shape == (3, 32, 32, 3) and edit_row["mean_steps"] == 2
    assert set(edit_row["border"]) == {0, 1, 2, 3} and 0 <= edit_row["kept"] <= 1
    text = edit_eval.format_edit_report(rows, default_params(model), "default")
    assert "new object missed (2 steps)" in text
    var = edit_eval.evaluate_variations(model, n=2, seed=5, strengths=(0.25,))
    assert var[0]["repainted"] == 16 / 64 and 0 <= var[0]["changed"] <= var[0]["repainted"]
