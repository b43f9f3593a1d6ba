"""benchmarks/table1_eval.py: Table 1's summary (mean ± standard error over replicates, paired
differences between settings) from JSON lines, and one real evaluation of a tiny model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import table1_eval as t1  # noqa: E402


def _row(setting, replicate, g, fidelity, kind="one", fd=5.0):
    return {"setting": setting, "replicate": replicate, "g": g, "kind": kind, "fidelity": fidelity,
            "quality": 0.5, "diversity": 1.0, "fd": fd}


def test_mean_se():
    m, se = t1.mean_se([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and se == pytest.approx(0.1 / math.sqrt(3))
    assert math.isnan(t1.mean_se([0.4])[1])


def test_summary_pairs_replicates_and_marks_differences_beyond_two_se():
    rows = [_row("zero-shot", k, 2.0, f) for k, f in enumerate((0.40, 0.42, 0.38))]
    rows += [_row("null text", k, 2.0, f, fd=4.0) for k, f in enumerate((0.50, 0.53, 0.49))]  # +0.107, tight
    rows += [_row("learnable null", k, 2.0, f, fd=4.0 + k) for k, f in enumerate((0.55, 0.48, 0.51))]  # mixed
    text = t1.summary(rows)
    assert "| null text | 2 | 3 | 0.507 ± 0.012 |" in text
    pair = next(line for line in text.splitlines() if "| null text vs zero-shot |" in line)
    assert "0.107 ± 0.003 **better**" in pair and "-1.00 ± 0.00 **better**" in pair  # FD: lower is better
    mixed = next(line for line in text.splitlines() if "| learnable null vs null text |" in line)
    assert "**" not in mixed.split("|")[4]  # fidelity: +0.007 with a spread larger than that
    with pytest.raises(ValueError, match="twice"):
        t1.summary(rows + [_row("zero-shot", 0, 2.0, 0.1)])


def test_summary_sets_every_guided_cell_against_no_guidance():
    rows = [_row("no guidance", k, 1.0, f) for k, f in enumerate((0.50, 0.60, 0.55))]
    rows += [_row("zero-shot", k, 2.0, f) for k, f in enumerate((0.30, 0.41, 0.34))]  # -0.2 each, +-0.01
    rows += [_row("null text", k, 3.0, f) for k, f in enumerate((0.50, 0.70, 0.55))]  # +0, +0.1, 0
    rows += [_row("learnable null", k, 3.0, f) for k, f in enumerate((0.55, 0.70, 0.57))]  # +0.057 +- 0.023
    rows += [_row("null text", k, 2.0, f, kind="two") for k, f in enumerate((0.5, 0.5, 0.5))]  # no baseline there
    text = t1.summary(rows).split("### Guidance against no guidance")[1]
    zs = next(line for line in text.splitlines() if "| zero-shot vs no guidance |" in line)
    assert zs.startswith("| one | 2 |") and "-0.200 ± 0.006 **worse**" in zs
    nt = next(line for line in text.splitlines() if "| null text vs no guidance |" in line)
    assert nt.startswith("| one | 3 |") and "0.033 ± 0.033 |" in nt  # within the noise: not marked
    ln = next(line for line in text.splitlines() if "| learnable null vs no guidance |" in line)
    assert "0.057 ± 0.023 |" in ln  # 2.4 SE: beyond 2 SE, within the t-test's 4.30 SE for three replicates
    assert "| two |" not in text  # a kind without a no-guidance row has no pairs here
    assert "### Guidance against" not in t1.summary([r for r in rows if r["setting"] != "no guidance"])


def test_rows_at_other_forwards_or_held_out_are_kinds_of_their_own():
    assert t1.label("one", "train", t1.STEPS) == "one"
    assert t1.label("two", "heldout", t1.STEPS) == "two, heldout"
    assert t1.label("two", "train", 64) == "two, 64 forwards"
    rows = [_row("null text", 0, 2.0, 0.5), _row("null text", 0, 2.0, 0.7, kind=t1.label("one", "train", 64))]
    assert "### one, 64 forwards" in t1.summary(rows)  # the same (setting, g, replicate) twice, not pooled


def test_eval_writes_one_line_per_g_seed_and_kind(tmp_path):
    out = tmp_path / "t1.jsonl"
    root = Path(__file__).resolve().parents[2]
    t1.main(["eval", "--model", str(root / "models" / "default"), "--setting", "learnable null", "--replicate", "2",
             "--uncond", "null", "--g", "1,3", "--prompt-seeds", "4", "--kind", "one", "--n", "3", "--samples", "2",
             "--steps", "2", "--out", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["g"], r["prompt_seed"], r["kind"], r["replicate"]) for r in rows] == [
        (1.0, 4, "one, 2 forwards", 2), (3.0, 4, "one, 2 forwards", 2)]  # not the table's 16: a kind of its own
    assert all(0.0 <= r["fidelity"] <= 1.0 and 0.0 < r["diversity"] <= 1.0 and r["fd"] > 0 for r in rows)
