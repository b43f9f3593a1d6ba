"""Packs a benchmarks/table1.sh run into a small folder that can be committed, and lays it out again
on another machine, where the same command then goes on from it.

    python benchmarks/table1_carry.py pack WORK DEST     # DEST is rewritten
    python benchmarks/table1_carry.py unpack DEST WORK   # WORK must hold no run yet

What a run holds and what DEST keeps of it:
  placed/, tokens.pt        nothing: `table1.sh` makes the same images again (seeded) and the
                            trainers tokenize them again
  .done_<stage>             done.txt, a stage a line (not `data`: its images are not carried)
  timeline.txt, cells/, table1.md, <stage>/train.log
                            as they are
  clip_train/               its text encoder and tokenizer, while the base has not started from it
  base/, ft_<mode>_s<k>/    model/ in fp16 (loads as fp32) and progress.json, for the base always and for
                            a fine-tune until its replicate's cells are done; no checkpoint.pt (weights,
                            AdamW's moments, ~100 MB): the transformer trainer resumes from the weights
                            and the step (model/train/transformer.py)
  <stage>/model/vqvae/      a file `vqvae.from` naming the repository folder it equals, tensor for
                            tensor (the runs keep the default model's VQVAE frozen), else the weights
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from vqdiff.model.io.folder import load_model, load_vqvae, save_model

ROOT = Path(__file__).resolve().parent.parent
VQVAE_SOURCE = "models/default/vqvae"  # relative to the repository root


def _stages(work: Path) -> list[Path]:
    return sorted(p for p in work.iterdir() if p.is_dir() and (p.name in ("clip_train", "base") or p.name.startswith("ft_")))


def _needed(stage: Path, work: Path) -> bool:
    """Whether a stage's weights are still read by the run."""
    if stage.name == "clip_train":
        return (work / ".done_clip_train").exists() and not (work / "base" / "progress.json").exists()
    if stage.name == "base":
        return (stage / "progress.json").exists()
    k = stage.name.rsplit("_s", 1)[1]  # ft_<mode>_s<k>
    return (stage / "progress.json").exists() and not (work / f".done_replicate_{k}").exists()


def _pack_model(src: Path, dest: Path) -> None:
    model = load_model(src)
    save_model(model, dest, overwrite=True, dtype=torch.float16)
    ours, theirs = model.vqvae.state_dict(), load_vqvae(ROOT / VQVAE_SOURCE).state_dict()
    if ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours):
        shutil.rmtree(dest / "vqvae")
        (dest / "vqvae.from").write_text(VQVAE_SOURCE + "\n")


def _copy_progress(src: Path, dst: Path, work: Path, relative: bool) -> None:
    """progress.json names its data by absolute path (the trainer refuses other data): packed, a path
    inside WORK is kept relative to it, and laid out again under the new WORK (its images made again there)."""
    progress = json.loads(src.read_text())
    data = Path(progress["data"])
    if relative and data.is_relative_to(work):
        progress["data"] = str(data.relative_to(work))
    elif not relative and not data.is_absolute():
        progress["data"] = str(work / data)  # as table1.sh spells "$WORK/placed"
    dst.write_text(json.dumps(progress))


def pack(work: Path, dest: Path) -> None:
    if not (work / "timeline.txt").is_file():
        sys.exit(f"{work}: no table1.sh run here (no timeline.txt)")
    readme = (dest / "README.md").read_text() if (dest / "README.md").is_file() else None
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if readme is not None:
        (dest / "README.md").write_text(readme)
    shutil.copy2(work / "timeline.txt", dest)
    done = sorted(p.name.removeprefix(".done_") for p in work.glob(".done_*") if p.name != ".done_data")
    (dest / "done.txt").write_text("".join(f"{s}\n" for s in done))
    if (work / "table1.md").is_file():
        shutil.copy2(work / "table1.md", dest)
    if (work / "cells").is_dir():
        (dest / "cells").mkdir()
        for f in sorted((work / "cells").glob("*.jsonl")):
            shutil.copy2(f, dest / "cells")
    for stage in _stages(work):
        out = dest / stage.name
        out.mkdir()
        if (stage / "train.log").is_file():
            shutil.copy2(stage / "train.log", out)
        if not _needed(stage, work):
            continue
        if stage.name == "clip_train":
            for part in ("text_encoder", "tokenizer"):
                shutil.copytree(stage / part, out / part)
            continue
        _copy_progress(stage / "progress.json", out / "progress.json", work, relative=True)
        _pack_model(stage / "model", out / "model")
        print(f"{out}: its model at step {json.loads((out / 'progress.json').read_text())['step']}, fp16")


def unpack(dest: Path, work: Path) -> None:
    if (work / "timeline.txt").exists():
        sys.exit(f"{work}: a run is here already; unpack only into an empty folder")
    if not (dest / "timeline.txt").is_file():
        sys.exit(f"{dest}: no packed run here (no timeline.txt)")
    work.mkdir(parents=True, exist_ok=True)
    for s in (dest / "done.txt").read_text().split():
        (work / f".done_{s}").touch()
    for part in ("cells", "table1.md"):
        src = dest / part
        if src.is_dir():
            shutil.copytree(src, work / part)
        elif src.is_file():
            shutil.copy2(src, work / part)
    for stage in sorted(p for p in dest.iterdir() if p.is_dir() and p.name != "cells"):
        shutil.copytree(stage, work / stage.name)
        if (stage / "progress.json").is_file():
            _copy_progress(stage / "progress.json", work / stage.name / "progress.json", work, relative=False)
        link = work / stage.name / "model" / "vqvae.from"
        if link.is_file():
            shutil.copytree(ROOT / link.read_text().strip(), link.parent / "vqvae")
            link.unlink()
    shutil.copy2(dest / "timeline.txt", work)  # last: its presence marks a laid-out run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="WORK -> DEST")
    p.add_argument("work", type=Path)
    p.add_argument("dest", type=Path)
    u = sub.add_parser("unpack", help="DEST -> WORK")
    u.add_argument("dest", type=Path)
    u.add_argument("work", type=Path)
    args = ap.parse_args()
    pack(args.work, args.dest) if args.cmd == "pack" else unpack(args.dest, args.work)


if __name__ == "__main__":
    main()
