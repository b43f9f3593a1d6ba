"""The benchmark's feature network and the Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqdiff.model.shapes import scenes as shapes
from vqdiff.model.shapes.features import LABELS, FeatureNet, embed, frechet_distance, labels, load_features, train_features


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, 3))
    b = rng.normal([1.0, 0.0, -2.0], [2.0, 1.0, 0.5], (20000, 3))
    want = (1 + 0 + 4) + ((1 - 2) ** 2 + 0 + (1 - 0.5) ** 2)  # |dmu|^2 + sum (sigma_a - sigma_b)^2
    assert frechet_distance(a, b) == pytest.approx(want, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_labels_describe_the_scene():
    scene = shapes.Scene((shapes.Obj("circle", "red", "small", 8, 8), shapes.Obj("square", "blue", "large", 24, 20)))
    y = labels(scene)
    on = {LABELS[i] for i in np.flatnonzero(y)}
    assert on == {"red circle", "blue square", "small circle", "large square", "2 objects", "left half", "right half",
                  "top half", "bottom half"}


def test_train_save_load_embed(tmp_path):
    out = train_features(tmp_path / "f", steps=3, batch_size=8, progress=False)
    net = load_features(out)
    images = np.stack([shapes.generate(i)[0] for i in range(5)])
    f = embed(net, images)
    assert f.shape == (5, 64) and np.isfinite(f).all()
    torch.manual_seed(0)
    assert embed(FeatureNet().eval(), images[:, ::2, ::2]).shape == (5, 64)  # other image sizes pool to 4 x 4
