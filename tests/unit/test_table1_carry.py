"""benchmarks/table1_carry.py: a Table 1 run packed small (the default model's VQVAE named, not copied;
weights in fp16; no checkpoint.pt) and laid out again as a run the trainers go on from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import table1_carry as carry  # noqa: E402
from vqdiff.model.io.folder import load_model, save_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _run(work: Path, base_done: bool) -> torch.nn.Module:
    """A run folder as table1.sh leaves it: the base (the default model standing in) part-way or done."""
    model = load_model(ROOT / "models" / "default")
    with torch.no_grad():
        model.transformer.out.bias.add_(1e-3)  # fp32 values that fp16 rounds
    for stage in ("data", "clip_train") + (("base",) if base_done else ()):
        (work / f".done_{stage}").parent.mkdir(parents=True, exist_ok=True)
        (work / f".done_{stage}").touch()
    (work / "timeline.txt").write_text("[t] data: start\n")
    (work / "placed").mkdir()
    (work / "clip_train" / "text_encoder").mkdir(parents=True)
    (work / "clip_train" / "tokenizer").mkdir()
    save_model(model, work / "base" / "model")
    (work / "base" / "checkpoint.pt").write_bytes(b"x" * 1000)
    (work / "base" / "tokens.pt").write_bytes(b"x" * 1000)
    (work / "base" / "train.log").write_text('{"step": 25, "loss": 1.0}\n')
    (work / "base" / "progress.json").write_text(json.dumps({"step": 25, "data": str(work / "placed")}))
    (work / "ft_empty_s0").mkdir()
    (work / "ft_empty_s0" / "train.log").write_text('{"step": 1}\n')
    (work / "cells").mkdir()
    (work / "cells" / "base_g1_s0.jsonl").write_text('{"fidelity": 0.5}\n')
    return model


def test_pack_keeps_what_the_run_cannot_make_again_and_unpack_lays_it_out(tmp_path):
    model = _run(tmp_path / "work", base_done=False)
    dest = tmp_path / "carried"
    dest.mkdir()
    (dest / "README.md").write_text("kept\n")
    (dest / "stale.txt").write_text("from an earlier pack\n")
    carry.pack(tmp_path / "work", dest)

    assert (dest / "README.md").read_text() == "kept\n" and not (dest / "stale.txt").exists()
    assert (dest / "done.txt").read_text().split() == ["clip_train"]  # `data` is made again
    assert (dest / "base" / "model" / "vqvae.from").read_text().strip() == "models/default/vqvae"
    assert not (dest / "base" / "model" / "vqvae").exists()
    assert not any(dest.rglob("checkpoint.pt")) and not any(dest.rglob("tokens.pt"))
    assert (dest / "ft_empty_s0" / "train.log").is_file() and not (dest / "ft_empty_s0" / "model").exists()
    assert not (dest / "clip_train" / "text_encoder").exists()  # the base has started from it
    assert (dest / "cells" / "base_g1_s0.jsonl").is_file()
    assert json.loads((dest / "base" / "progress.json").read_text())["data"] == "placed"  # not this machine's path

    work = tmp_path / "again"
    carry.unpack(dest, work)
    assert sorted(p.name for p in work.glob(".done_*")) == [".done_clip_train"]
    progress = json.loads((work / "base" / "progress.json").read_text())
    assert progress["step"] == 25 and progress["data"] == str(work / "placed")  # the new WORK's images
    laid = load_model(work / "base" / "model")
    for name, w in model.state_dict().items():  # fp16 on disk, fp32 again on load
        assert torch.equal(laid.state_dict()[name], w.half().float()), name
    assert (work / "cells" / "base_g1_s0.jsonl").read_text() == '{"fidelity": 0.5}\n'
    with pytest.raises(SystemExit, match="a run is here already"):
        carry.unpack(dest, work)


def test_pack_carries_the_text_encoder_until_the_base_starts_and_refuses_a_folder_without_a_run(tmp_path):
    work = tmp_path / "work"
    _run(work, base_done=False)
    (work / "base" / "progress.json").unlink()
    carry.pack(work, tmp_path / "carried")
    assert (tmp_path / "carried" / "clip_train" / "text_encoder").is_dir()
    assert not (tmp_path / "carried" / "base" / "model").exists()
    with pytest.raises(SystemExit, match="no table1.sh run here"):
        carry.pack(tmp_path / "empty", tmp_path / "out")
