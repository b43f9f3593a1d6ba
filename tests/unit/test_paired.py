"""Paired comparison of two evaluation runs: the difference, its standard error, and the checks that
refuse runs which are not on the same prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vqdiff.model.shapes import paired


def _run(hits: list[list[bool]], kind="one", split="train", seed=0, captions=None) -> list[dict]:
    """Outcomes of a run: hits[i][j] says whether sample j of prompt i honours it."""
    return [{"kind": kind, "split": split, "seed": seed, "prompt": i, "sample": j,
             "caption": captions[i] if captions else f"prompt {i}", "failure": None if h else "attributes"}
            for i, row in enumerate(hits) for j, h in enumerate(row)]


def test_the_difference_and_its_standard_error_are_over_shared_prompts():
    a = _run([[True], [True], [False], [True], [False]])
    b = _run([[True], [False], [False], [False], [True], [True]])  # one prompt more: not paired
    (r,) = paired.paired_difference(a, b)
    d = np.array([0, 1, 0, 1, -1], float)
    assert r["prompts"] == 5 and r["better"] == 2 and r["worse"] == 1
    assert r["this"] == pytest.approx(0.6) and r["other"] == pytest.approx(0.4)
    assert r["difference"] == pytest.approx(0.2) and r["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(5))


def test_samples_of_a_prompt_are_one_unit():
    a = _run([[True, False], [True, True]])
    b = _run([[False, False], [True, True]])
    (r,) = paired.paired_difference(a, b)
    assert r["difference"] == pytest.approx(0.25) and r["better"] == 1 and r["worse"] == 0
    assert r["se"] == pytest.approx(np.array([0.5, 0.0]).std(ddof=1) / np.sqrt(2))


def test_runs_that_are_not_on_the_same_prompts_are_refused():
    with pytest.raises(ValueError, match="share no kind"):
        paired.paired_difference(_run([[True]], kind="one"), _run([[True]], kind="two"))
    with pytest.raises(ValueError, match="share no prompt"):
        paired.paired_difference(_run([[True]], seed=1), _run([[True]], seed=2))
    with pytest.raises(ValueError, match="captions differ"):
        paired.paired_difference(_run([[True]], captions=["a red square"]), _run([[True]], captions=["a circle"]))
    with pytest.raises(ValueError, match=r"kind \['two'\]"):
        paired.check_pairable(_run([[True]]), ["one", "two"], "train", 0)
    paired.check_pairable(_run([[True]]), ["one"], "train", 0)


def test_outcomes_files_round_trip_and_bad_lines_are_named(tmp_path):
    rows = [{"kind": "two", "split": "heldout", "outcomes": [{"prompt": 0, "sample": 0, "caption": "c", "failure": None},
                                                             {"prompt": 1, "sample": 0, "caption": "d", "failure": "count"}]}]
    path = tmp_path / "o.jsonl"
    paired.write_outcomes(path, paired.flatten(rows, 7))
    back = paired.read_outcomes(path)
    assert back == paired.flatten(rows, 7) and back[1] == {"kind": "two", "split": "heldout", "seed": 7, "prompt": 1,
                                                         "sample": 0, "caption": "d", "failure": "count"}
    text = paired.format_paired(paired.paired_difference(back, back), path)
    assert "two, heldout: 2 prompts, fidelity 0.500 against 0.500: +0.000 +- 0.000" in text

    path.write_text(json.dumps({"kind": "one"}) + "\n")
    with pytest.raises(ValueError, match=r"o.jsonl:1: missing \['split'"):
        paired.read_outcomes(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="o.jsonl:1: not a JSON line"):
        paired.read_outcomes(path)
    with pytest.raises(ValueError, match="no such outcomes file"):
        paired.read_outcomes(tmp_path / "missing.jsonl")


def test_vqdiff_eval_writes_outcomes_and_pairs_against_them(tmp_path, capsys):
    from pathlib import Path

    from vqdiff.cli import main

    model = str(Path(__file__).resolve().parents[2] / "models" / "default")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = ["eval", "--model", model, "--kind", "one,two", "--n", "3", "--steps", "2", "--quiet"]
    base = common + ["--seed", "5"]
    assert main(base + ["--outcomes", str(a)]) == 0
    report = capsys.readouterr().out
    assert "standard errors over prompts (one, train): fidelity" in report
    rows = paired.read_outcomes(a)
    assert [(o["kind"], o["prompt"]) for o in rows] == [(k, i) for k in ("one", "two") for i in range(3)]
    assert main(base + ["--outcomes", str(b), "--against", str(a)]) == 0  # the same run again: no difference
    out = capsys.readouterr().out
    assert "one, train: 3 prompts" in out and "two, train: 3 prompts" in out
    assert out.count("+0.000 +- 0.000 (SE); better on 0 prompts, worse on 0") == 2
    assert paired.read_outcomes(b) == rows  # our code fixes the draws: the same seeds give the same images
    assert main(common + ["--seed", "6", "--against", str(a)]) == 2  # refused before it runs
    assert "prompt seed 6" in capsys.readouterr().err
