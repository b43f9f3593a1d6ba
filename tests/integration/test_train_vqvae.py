"""Image-caption folders and the resumable VQVAE trainer (tiny preset, a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vqdiff.model.train.data import ImageCaptionFolder, read_index, write_folder
from vqdiff.model.train.vqvae import VQVAETrainConfig, train_vqvae
from tests.serving import cli


def _images(n: int, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((size, size, 3), 255, np.uint8)
        x, y, s = rng.integers(0, size - 6, 3)
        img[y : y + 4 + s % 3, x : x + 4 + s % 3] = rng.integers(0, 255, 3)
        yield img, f"a square number {i}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "squares", _images(24))


def test_folder_layouts_read_the_same(data, tmp_path):
    pairs = read_index(data)
    assert len(pairs) == 24 and pairs[3][1] == "a square number 3"
    side = tmp_path / "sidecar"
    side.mkdir()
    for p, caption in pairs[:5]:
        Image.open(p).save(side / p.name)
        (side / p.name).with_suffix(".txt").write_text(caption + "\n")
    ds = ImageCaptionFolder(side, 16)
    x, caption = ds[2]
    assert x.shape == (3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1 and caption == pairs[2][1]
    assert torch.equal(x, ImageCaptionFolder(data, 16)[2][0])


def test_bad_folders_fail_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        read_index(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        read_index(tmp_path / "a")
    (tmp_path / "a" / "captions.jsonl").write_text('{"image": "x.png", "caption": "c"}\nnot json\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2"):
        read_index(tmp_path / "a")
    (tmp_path / "a" / "captions.jsonl").write_text('{"image": "x.png", "caption": "c"}\n')
    with pytest.raises(FileNotFoundError, match="x.png: listed"):
        read_index(tmp_path / "a")


def test_resumed_training_equals_uninterrupted(data, tmp_path):
    base = dict(data=str(data), preset="tiny", batch_size=8, ckpt_every=2, log_every=1, seed=3)
    straight = train_vqvae(VQVAETrainConfig(out=str(tmp_path / "a"), steps=6, **base), progress=False)
    train_vqvae(VQVAETrainConfig(out=str(tmp_path / "b"), steps=4, **base), progress=False)  # "interrupted"
    resumed = train_vqvae(VQVAETrainConfig(out=str(tmp_path / "b"), steps=6, **base), progress=False)
    a = load_file(straight / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "b" / "train.log").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the second run started at step 5
    assert all(np.isfinite(r["loss"]) for r in log)


def test_training_reduces_reconstruction_loss(data, tmp_path):
    # 16 steps: the mean of the last five is already under a fifth of the first five's (measured 0.17)
    train_vqvae(VQVAETrainConfig(data=str(data), out=str(tmp_path / "r"), steps=16, batch_size=8, lr=1e-3,
                                 log_every=1, ckpt_every=16), progress=False)
    log = [json.loads(line) for line in (tmp_path / "r" / "train.log").read_text().splitlines()]
    first, last = np.mean([r["rec"] for r in log[:5]]), np.mean([r["rec"] for r in log[-5:]])
    assert last < 0.7 * first, (first, last)


def test_append_continues_a_folder_and_refuses_to_overwrite(tmp_path):
    folder = write_folder(tmp_path / "mix", _images(3, seed=1))
    with pytest.raises(FileExistsError, match="append=True"):
        write_folder(folder, _images(2, seed=2))
    write_folder(folder, _images(2, seed=2), append=True)
    pairs = read_index(folder)
    assert [c for _, c in pairs] == [f"a square number {i}" for i in (0, 1, 2, 0, 1)]
    second = next(_images(2, seed=2))[0]
    assert np.array_equal(np.asarray(Image.open(pairs[3][0])), second)  # the appended images, in order


def test_cli_data_shapes_writes_generate_in_order(tmp_path, capsys):
    from vqdiff.model.shapes.scenes import CaptionRates, generate

    out = tmp_path / "mix"
    for extra in ([], ["--split", "heldout", "--seed", "7", "--start", "5", "--append"]):
        code, err = cli(capsys, "data", "shapes", str(out), "--n", "3", "--quiet", *extra)
        assert code == 0, err
    pairs = read_index(out)
    want = [generate(i) for i in range(3)] + [generate(i, seed=7, split="heldout") for i in range(5, 8)]
    assert [c for _, c in pairs] == [w[1] for w in want]
    assert np.array_equal(np.asarray(Image.open(pairs[4][0])), want[4][0])
    code, err = cli(capsys, "data", "shapes", str(out), "--n", "3", "--quiet")
    assert code == 2 and "append" in err and len(read_index(out)) == 6  # nothing overwritten
    code, err = cli(capsys, "data", "shapes", str(tmp_path / "placed"), "--n", "4", "--place-rate", "1",
                    "--place-rate-many", "1", "--quiet")
    assert code == 0, err
    rates = CaptionRates(place=1.0, place_many=1.0)
    assert [c for _, c in read_index(tmp_path / "placed")] == [generate(i, rates=rates)[1] for i in range(4)]
    code, err = cli(capsys, "data", "shapes", str(tmp_path / "bad"), "--n", "4", "--place-rate", "1.5", "--quiet")
    assert code == 2 and "--place-rate" in err and not (tmp_path / "bad").exists()


def test_cli_data_shapes_workers_write_the_same_folder(tmp_path, capsys):
    def shapes(out, *extra):
        return cli(capsys, "data", "shapes", str(tmp_path / out), "--n", "40", "--start", "3", "--place-rate", "1",
                   "--quiet", *extra)

    assert shapes("one")[0] == 0
    code, err = shapes("two", "--workers", "2")  # two spawned worker processes
    assert code == 0, err
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "captions.jsonl").read_text() == (one / "captions.jsonl").read_text()
    names = sorted(p.name for p in (one / "images").iterdir())
    assert len(names) == 40 and names == sorted(p.name for p in (two / "images").iterdir())
    assert all((one / "images" / n).read_bytes() == (two / "images" / n).read_bytes() for n in names)
    code, err = shapes("bad", "--workers", "0")
    assert code == 2 and "--workers" in err and not (tmp_path / "bad").exists()


def test_cli_train_vqvae(data, tmp_path, capsys):
    code, err = cli(capsys, "train", "vqvae", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2",
                    "--batch-size", "8", "--quiet")
    assert code == 0, err
    assert (tmp_path / "run" / "vqvae" / "config.json").is_file()
    code, err = cli(capsys, "train", "vqvae", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run2"),
                    "--quiet")
    assert code == 2 and "data folder not found" in err


def test_tie_weight_and_error_restarts_train_and_log_the_tie_term(data, tmp_path):
    train_vqvae(VQVAETrainConfig(data=str(data), out=str(tmp_path / "t"), steps=3, batch_size=8, log_every=1,
                                 ckpt_every=3, tie_weight=1.0, restart_by_error=True), progress=False)
    log = [json.loads(line) for line in (tmp_path / "t" / "train.log").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["tie"]) and r["tie"] >= 0 for r in log)
