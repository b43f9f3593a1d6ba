"""The FLOP count behind the benchmarks' MFU agrees with ITHQ's published size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vqdiff.model.config import ithq

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from flops import forward_flops, image_flops  # noqa: E402


def test_ithq_is_about_2_3_tflop_per_row_and_460_per_image():
    c = ithq()
    assert forward_flops(c.transformer, 77) == pytest.approx(2.29e12, rel=0.01)
    assert image_flops(c.transformer, 77, forwards=100) == pytest.approx(458e12, rel=0.01)
    # the matrix products dominate: doubling the width roughly quadruples the count
    from dataclasses import replace

    wide = replace(c.transformer, head_dim=2 * c.transformer.head_dim)
    assert 3.5 < forward_flops(wide, 77) / forward_flops(c.transformer, 77) < 4.0
