"""``vqdiff train clip`` (contrastive text-encoder pretraining with swapped-word negatives) and the
transformer trainer's --text-encoder / --freeze-text (tiny preset, a few steps)."""

from __future__ import annotations

import json

import pytest
import torch

from vqdiff.model.train.data import write_folder
from vqdiff.model.io.folder import load_model, load_text_encoder
from vqdiff.model.shapes.scenes import generate
from vqdiff.model.train.clip import CLIPTrainConfig, build, swapped, train_clip
from vqdiff.model.train.transformer import TransformerTrainConfig, train_transformer
from vqdiff.model.train.vqvae import VQVAETrainConfig, train_vqvae

PAIRS = ("left:right", "above:below", "top:bottom")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return write_folder(root / "data", ((im, c) for im, c, _, _ in (generate(i) for i in range(48))))


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), preset="tiny", steps=4, batch_size=16, warmup=2, log_every=1,
                ckpt_every=2, seed=3)
    base.update(kw)
    return CLIPTrainConfig(**base)


def test_swapped_replaces_one_listed_word():
    assert swapped("a red circle on the left", PAIRS, 0.0) == "a red circle on the right"
    assert swapped("a circle to the right of a square", PAIRS, 0.5) == "a circle to the left of a square"
    two = "a square at the top, a circle below a triangle"
    assert swapped(two, PAIRS, 0.0) == "a square at the bottom, a circle below a triangle"
    assert swapped(two, PAIRS, 0.99) == "a square at the top, a circle above a triangle"
    assert swapped("a circle on the left, a square", PAIRS, 0.0) == "a circle on the right, a square"
    assert swapped("a circle at the top, and more", PAIRS, 0.0) == "a circle at the bottom, and more"  # comma kept
    assert swapped("a leftover red circle", PAIRS, 0.0) is None  # whole words only
    assert swapped("a red circle", PAIRS, 0.3) is None


def test_bad_swap_pairs_fail_loudly(data, tmp_path, capsys):
    for bad in ("left", "left:left", "Left:right", "left:right:up"):
        with pytest.raises(ValueError, match="swap"):
            _cfg(data, tmp_path / "x", swap=(bad,))
    # vqdiff.cli's main in this process: a subprocess would spend seconds importing torch
    # (tests/unit/test_sampler.py runs the real command line once)
    from vqdiff.cli import main

    capsys.readouterr()
    code = main(["train", "clip", "--data", str(data), "--out", str(tmp_path / "y"), "--swap", "left", "--quiet"])
    assert code == 2 and "swap" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_trains_and_writes_a_text_encoder(data, tmp_path):
    out = train_clip(_cfg(data, tmp_path / "run"), progress=False)
    te = load_text_encoder(out)
    init = build(_cfg(data, tmp_path / "run"), [c for c in (generate(i)[1] for i in range(48))]).text_encoder
    assert te.tokenizer.get_vocab() == init.tokenizer.get_vocab()
    moved = [k for k, v in te.clip.state_dict().items() if not torch.equal(v, init.clip.state_dict()[k])]
    assert moved  # trained away from its initialisation
    log = [json.loads(x) for x in (out / "train.log").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(0.0 <= r["retrieval"] <= 1.0 and 0.0 <= r["beats_swap"] <= 1.0 and r["loss"] > 0 for r in log)


def test_resumed_equals_uninterrupted(data, tmp_path):
    straight = torch.load(train_clip(_cfg(data, tmp_path / "s"), progress=False) / "checkpoint.pt")["model"]
    train_clip(_cfg(data, tmp_path / "r", steps=2), progress=False)
    resumed = torch.load(train_clip(_cfg(data, tmp_path / "r"), progress=False) / "checkpoint.pt")["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match="trained on"):
        train_clip(_cfg(tmp_path / "elsewhere", tmp_path / "r", steps=6), progress=False)


def test_learns_to_tell_a_caption_from_its_swap(data, tmp_path):
    """The hard negatives are what teaches place words: after training, the true caption beats its
    swapped twin on the training batch more often than at the start (chance: 0.5)."""
    log_path = train_clip(_cfg(data, tmp_path / "l", steps=30, lr=2e-3, log_every=5, ckpt_every=30), progress=False)
    log = [json.loads(x) for x in (log_path / "train.log").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    # measured 0.5 at step 5, 1.0 from step 20 on (and to step 60 in a longer run)
    assert log[0]["beats_swap"] < 0.8 and sum(r["beats_swap"] for r in log[-3:]) / 3 > 0.8, log


def test_transformer_on_a_frozen_pretrained_text_encoder(data, tmp_path):
    clip = train_clip(_cfg(data, tmp_path / "clip"), progress=False)
    vq = train_vqvae(VQVAETrainConfig(data=str(data), out=str(tmp_path / "vq"), steps=2, batch_size=8), progress=False)
    kw = dict(data=str(data), preset="tiny", batch_size=8, warmup=2, log_every=1, ckpt_every=2, seed=1,
              text_encoder=str(clip), freeze_text=True)
    folder = train_transformer(TransformerTrainConfig(out=str(tmp_path / "t"), vqvae=str(vq), steps=2, **kw), progress=False)
    pre = load_text_encoder(clip).clip.state_dict()

    def same_text(model):
        return all(torch.equal(v, pre[k]) for k, v in model.text_encoder.clip.state_dict().items())

    model = load_model(folder)
    assert same_text(model) and model.null_cond is not None
    # resuming does not swap the text encoder in again; continuing a model folder (--init) does
    folder = train_transformer(TransformerTrainConfig(out=str(tmp_path / "t"), vqvae=str(vq), steps=4, **kw), progress=False)
    assert same_text(load_model(folder))
    joint = train_transformer(TransformerTrainConfig(out=str(tmp_path / "j"), vqvae=str(vq), steps=2, **{
        **kw, "text_encoder": None, "freeze_text": False}), progress=False)
    swapped_in = train_transformer(TransformerTrainConfig(out=str(tmp_path / "i"), init=str(joint), steps=2, **kw),
                                   progress=False)
    model = load_model(swapped_in)
    assert same_text(model)
    assert model.text_encoder.tokenizer.get_vocab() == load_text_encoder(clip).tokenizer.get_vocab()
    # without --freeze-text the pretrained encoder trains on
    thawed = train_transformer(TransformerTrainConfig(out=str(tmp_path / "u"), vqvae=str(vq), steps=2, **{
        **kw, "freeze_text": False}), progress=False)
    assert not same_text(load_model(thawed))


def test_cutting_the_padding_leaves_the_text_embedding_unchanged(data, tmp_path):
    pair = build(_cfg(data, tmp_path / "x"), [c for c in (generate(i)[1] for i in range(48))]).eval()
    captions = ["a red circle", "a large blue square to the left of a small green triangle"]
    ids = pair.text_encoder.tokenize(captions)  # (2, L) padded to L
    with torch.no_grad():
        full = torch.nn.functional.normalize(pair.text_proj(pair.text_encoder.clip(input_ids=ids).pooler_output), dim=-1)
        assert torch.allclose(pair.embed_text(ids), full, atol=1e-6)
        assert not torch.allclose(pair.embed_text(ids[:1]), full[1:], atol=1e-3)


def test_a_time_budget_fixes_the_clip_run_length_and_the_cosine_ends_there(data, tmp_path, monkeypatch):
    import vqdiff.model.train.clip as tc

    monkeypatch.setattr(tc, "PROBE_STEPS", 4)
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(tc.time, "time", lambda: float(next(clock)))  # each call advances one "second"
    out = train_clip(_cfg(data, tmp_path / "b", steps=500, time_budget_s=60.0, log_every=1, ckpt_every=1000),
                     progress=False)
    log = [json.loads(x) for x in (out / "train.log").read_text().splitlines()]
    plan = [r for r in log if "planned_steps" in r]
    assert len(plan) == 1 and plan[0]["step"] == 4
    planned = plan[0]["planned_steps"]
    assert 4 < planned < 500
    assert [r["step"] for r in log if "loss" in r][-1] == planned  # ended where it planned to ...
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # ... with the cosine at its floor
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["planned_steps"] == planned == ckpt["step"]
    with pytest.raises(ValueError, match="time_budget_s"):
        _cfg(data, tmp_path / "x", time_budget_s=-1.0)
    with pytest.raises(ValueError, match="precision"):
        _cfg(data, tmp_path / "x", precision="fp16")


def test_bf16_autocast_trains(data, tmp_path):
    out = train_clip(_cfg(data, tmp_path / "bf16", precision="bf16"), progress=False)
    log = [json.loads(x) for x in (out / "train.log").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    assert all(v.dtype == torch.float32 for v in load_text_encoder(out).clip.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_clip_training_draws_the_cpu_batches_and_matches_the_cpu_loss(data, tmp_path):
    losses = {}
    for device in ("cpu", "cuda"):
        out = train_clip(_cfg(data, tmp_path / device, device=device), progress=False)
        losses[device] = [json.loads(x)["loss"] for x in (out / "train.log").read_text().splitlines()]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)


def test_a_resumed_budgeted_run_keeps_its_planned_length(data, tmp_path, monkeypatch):
    import vqdiff.model.train.clip as tc

    monkeypatch.setattr(tc, "PROBE_STEPS", 4)
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(tc.time, "time", lambda: float(next(clock)))
    real_save, saves = tc.save_checkpoint, []

    def crash_after_two(state, path):  # the run dies after its second checkpoint (step 6)
        real_save(state, path)
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tc, "save_checkpoint", crash_after_two)
    cfg = _cfg(data, tmp_path / "r", steps=500, time_budget_s=60.0, log_every=1, ckpt_every=3)
    with pytest.raises(KeyboardInterrupt):
        train_clip(cfg, progress=False)
    planned = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["planned_steps"]
    assert saves == [3, 6] and 6 < planned < 500
    monkeypatch.setattr(tc, "save_checkpoint", real_save)
    train_clip(_cfg(data, tmp_path / "r", steps=500, log_every=1, ckpt_every=3), progress=False)  # no budget now
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == planned and ckpt["planned_steps"] == planned  # the plan outlives a second resume
