"""The transformer trainer and the null-condition fine-tune (tiny preset, a few steps)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from vqdiff.model.train.data import write_folder
from vqdiff.model.io.folder import load_model
from vqdiff.model.sampling.params import GenerationParams
from vqdiff.model.sampling.sampler import sample
from vqdiff.model.shapes.scenes import generate
from vqdiff.model.net.tokenizer import caption_words
from vqdiff.model.train.transformer import TransformerTrainConfig, train_transformer
from vqdiff.model.train.vqvae import VQVAETrainConfig, train_vqvae


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tt")
    data = write_folder(root / "data", ((im, c) for im, c, _, _ in (generate(i) for i in range(32))))
    vq = train_vqvae(VQVAETrainConfig(data=str(data), out=str(root / "vq"), steps=2, batch_size=8), progress=False)
    return root, data, vq


def _cfg(run, out, **kw):
    root, data, vq = run
    base = dict(data=str(data), out=str(root / out), vqvae=str(vq), preset="tiny", batch_size=8, warmup=2,
                log_every=1, ckpt_every=2, seed=1)
    base.update(kw)
    return TransformerTrainConfig(**base)


def _state(folder):
    m = load_model(folder)
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_trains_and_writes_a_model_folder_that_generates(run):
    folder = train_transformer(_cfg(run, "a", steps=4), progress=False)
    model = load_model(folder)
    assert model.null_cond is not None
    words = set(caption_words([c for c in (generate(i)[1] for i in range(32))]))
    assert {"circle", "square", "triangle"} <= words
    ids = model.text_encoder.tokenize(["a red circle"])[0].tolist()
    assert ids[:4] == [model.text_encoder.tokenizer.bos_token_id] + [
        model.text_encoder.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "red", "circle")]
    out = sample(model, ["a red circle"], GenerationParams(steps=8, seed=0))
    assert out.images.shape == (1, 3, 16, 16)
    log = [json.loads(x) for x in (run[0] / "a" / "train.log").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)


def test_resumed_equals_uninterrupted(run):
    straight = _state(train_transformer(_cfg(run, "s", steps=4), progress=False))
    train_transformer(_cfg(run, "r", steps=2), progress=False)
    resumed = _state(train_transformer(_cfg(run, "r", steps=4), progress=False))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_without_its_checkpoint_a_run_resumes_from_its_weights_and_position(run):
    from vqdiff.model.train.transformer import REWARM_STEPS, lr_factor

    out = run[0] / "w"
    cfg = _cfg(run, "w", steps=6, lr=1e-3, min_lr=1e-4)
    train_transformer(replace(cfg, steps=2, min_lr=None), progress=False)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["step"] == 2 and progress["data"] == cfg.data and progress["rewarm_from"] is None
    assert len(progress["importance"]["lt_history"]) == len(progress["importance"]["lt_count"]) > 1
    at2 = _state(out / "model")
    (out / "checkpoint.pt").unlink()  # what a carried run lacks
    after = _state(train_transformer(replace(cfg, steps=4), progress=False))
    log = _log(run, "w")
    assert log[2]["step"] == 2 and "weights only" in log[2]["resumed"]
    assert [r["step"] for r in log[3:]] == [3, 4]
    # the schedule goes on from step 2, its learning rate ramped up again from there
    assert log[3]["lr"] == pytest.approx(1e-3 * lr_factor(replace(cfg, steps=4), 3, rewarm_from=2))
    assert log[3]["lr"] < 1e-3 * lr_factor(replace(cfg, steps=4), 3) * 3 / REWARM_STEPS
    assert any(not torch.equal(at2[k], v) for k, v in after.items())
    # an exact resume after it keeps the ramp
    train_transformer(cfg, progress=False)
    assert _log(run, "w")[-1]["lr"] == pytest.approx(1e-3 * lr_factor(cfg, 6, rewarm_from=2))
    assert json.loads((out / "progress.json").read_text())["rewarm_from"] == 2
    (out / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match="progress.json: was trained on"):
        train_transformer(replace(cfg, data=str(shutil.copytree(run[1], run[0] / "elsewhere")), steps=8), progress=False)


def test_kept_snapshots_are_the_model_at_each_checkpoint(run):
    kept = train_transformer(_cfg(run, "k", steps=4, keep_snapshots=True), progress=False).parent
    assert sorted(p.name for p in (kept / "snapshots").iterdir()) == ["2", "4"]
    final, at2 = _state(kept / "model"), _state(kept / "snapshots" / "2")
    assert all(torch.equal(final[k], v) for k, v in _state(kept / "snapshots" / "4").items())
    short = _state(train_transformer(_cfg(run, "k2", steps=2), progress=False))
    assert all(torch.equal(short[k], v) for k, v in at2.items())
    assert not all(torch.equal(final[k], v) for k, v in at2.items())
    assert not (run[0] / "k2" / "snapshots").exists()


def _held_loss(folder, data) -> float:
    """Mean loss of a model folder on a fixed set: every image at a fixed grid of t, fixed noise."""
    from vqdiff.model.train.data import ImageCaptionFolder
    from vqdiff.model.diffusion import q_sample
    from vqdiff.model.train.loss import training_loss
    from vqdiff.model.train.transformer import tokenize_dataset

    model = load_model(folder)
    ds = ImageCaptionFolder(data, model.config.image_size)
    x0 = tokenize_dataset(model, ds).repeat(4, 1)  # (4n, N)
    t = torch.tensor([10, 40, 70, 95]).repeat_interleave(len(ds))  # (4n,)
    x_t = q_sample(model.schedule, x0, t, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = model.text_encoder.encode([c for _, c in ds.pairs] * 4)
        log_x0 = model.transformer.log_probs(x_t, t, text)
        return float(training_loss(model.schedule, log_x0, x0, x_t, t).mean())


def test_loss_falls(run):
    _, data, _ = run
    start = train_transformer(_cfg(run, "l0", steps=1, lr=1e-9, warmup=1), progress=False)
    trained = train_transformer(_cfg(run, "l", steps=60, lr=1e-3, warmup=5, ckpt_every=60), progress=False)
    before, after = _held_loss(start, data), _held_loss(trained, data)
    assert after < 0.93 * before, (before, after)  # 3.22 -> 2.90 measured: tiny model, 2-step VQVAE


def test_null_cond_fine_tune_only_moves_the_null(run):
    base = train_transformer(_cfg(run, "b", steps=2), progress=False)
    before = _state(base)
    tuned = train_transformer(_cfg(run, "n", vqvae=None, init=str(base), steps=3, only_null=True, null_drop=1.0,
                                   lr=1e-2), progress=False)
    after = _state(tuned)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"null_cond.embeddings"}


def test_train_only_moves_just_the_matched_parameters(run):
    base = train_transformer(_cfg(run, "b2", steps=2), progress=False)
    before = _state(base)
    tuned = train_transformer(_cfg(run, "kv", vqvae=None, init=str(base), steps=3, lr=1e-2, freeze_text=True,
                                   train_only=r"attn2\.to_[kv]\."), progress=False)
    after = _state(tuned)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    kv = {k for k in before if k.startswith("transformer.") and (".attn2.to_k." in k or ".attn2.to_v." in k)}
    assert kv and changed == kv
    with pytest.raises(ValueError, match="matches no parameter"):  # the text encoder is fixed: nothing to train
        train_transformer(_cfg(run, "kv2", vqvae=None, init=str(base), steps=1, freeze_text=True,
                               train_only=r"^text_encoder\."), progress=False)
    with pytest.raises(ValueError, match="not a regular expression"):
        _cfg(run, "x", train_only="attn2[")


def test_null_modes(run):
    folder = train_transformer(_cfg(run, "e", steps=2, null_mode="empty"), progress=False)
    assert load_model(folder).null_cond is None  # "guidance with a null text": no learnable null in the model
    with pytest.raises(ValueError, match="null_mode"):
        _cfg(run, "x", null_mode="zero")
    with pytest.raises(ValueError, match="exactly one of vqvae"):
        _cfg(run, "x", init="somewhere")
    with pytest.raises(ValueError, match="only_null"):
        _cfg(run, "x", only_null=True, null_mode="none")


def test_learnable_null_fine_tune_of_a_base_without_one(run):
    """Table 1's protocol: a base trained without dropping captions, then fine-tuned with the learnable
    null, which starts at the empty prompt's embedding."""
    base = train_transformer(_cfg(run, "nn", steps=2, null_mode="none"), progress=False)
    assert load_model(base).null_cond is None
    tuned = load_model(train_transformer(_cfg(run, "nl", vqvae=None, init=str(base), steps=2, null_drop=1.0),
                                         progress=False))
    assert tuned.config.learnable_null and tuned.null_cond is not None
    empty = load_model(base).text_encoder.encode([""])[0]
    assert not torch.equal(tuned.null_cond.embeddings, empty)  # trained away from its start
    assert (tuned.null_cond.embeddings - empty).abs().max() < 0.5  # ...by two small steps
    out = sample(tuned, ["a red circle"], GenerationParams(steps=4, seed=0, uncond="null"))
    assert out.images.shape == (1, 3, 16, 16)


def test_cli_continues_training_from_a_model_folder(run, capsys):
    # vqdiff.cli's main in this process: a subprocess would spend seconds importing torch for each
    # call (tests/unit/test_sampler.py runs the real command line once)
    from vqdiff.cli import main

    root, data, _ = run
    base = train_transformer(_cfg(run, "c0", steps=2), progress=False)
    code = main(["train", "transformer", "--data", str(data), "--init", str(base), "--out", str(root / "c1"),
                 "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert not torch.equal(_state(base)["transformer.out.weight"], _state(root / "c1" / "model")["transformer.out.weight"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's own error
        main(["train", "transformer", "--data", str(data), "--out", str(root / "c2"), "--quiet"])
    assert e.value.code == 2 and "one of the arguments --vqvae --init is required" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from vqdiff.model.train.transformer import lr_factor

    constant = TransformerTrainConfig(data="d", out="o", vqvae="v", steps=100, lr=1e-3, warmup=10)
    cosine = TransformerTrainConfig(data="d", out="o", vqvae="v", steps=100, lr=1e-3, warmup=10, min_lr=1e-4)
    assert lr_factor(constant, 0) == pytest.approx(0.1) and lr_factor(constant, 99) == 1.0
    assert lr_factor(cosine, 0) == pytest.approx(0.1) and lr_factor(cosine, 10) == pytest.approx(1.0)
    values = [lr_factor(cosine, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup
    assert lr_factor(cosine, 100) == pytest.approx(0.1)  # min_lr / lr
    with pytest.raises(ValueError, match="min_lr"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", lr=1e-3, min_lr=2e-3)


def test_aux_weight_reaches_the_loss(run):
    first = {}
    for w in (0.0, 1.0):
        train_transformer(_cfg(run, f"aux{w}", steps=1, aux_weight=w), progress=False)
        first[w] = json.loads((run[0] / f"aux{w}" / "train.log").read_text().splitlines()[0])["loss"]
    assert first[1.0] > first[0.0] > 0  # the same batch and t; only the x0 cross-entropy's weight differs
    with pytest.raises(ValueError, match="aux_weight"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", aux_weight=-1.0)


def test_bf16_autocast_trains_with_fp32_weights(run):
    losses = {}
    for precision in ("fp32", "bf16"):
        out = train_transformer(_cfg(run, precision, steps=2, precision=precision), progress=False)
        losses[precision] = [json.loads(x)["loss"] for x in (run[0] / precision / "train.log").read_text().splitlines()]
    model = load_model(out)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.transformer.parameters())
    assert len(losses["bf16"]) == 2 and losses["bf16"] != losses["fp32"]  # the forward really ran in bf16 ...
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)  # ... and computes the same loss
    with pytest.raises(ValueError, match="precision"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", precision="fp8")


def test_a_resumed_run_reuses_its_tokens_unless_the_images_or_vqvae_change(run, monkeypatch, tmp_path):
    import os
    import shutil

    import vqdiff.model.train.transformer as tt

    train_transformer(_cfg(run, "tok", steps=2), progress=False)
    assert (run[0] / "tok" / "tokens.pt").is_file()
    calls = []
    real = tt.tokenize_dataset
    monkeypatch.setattr(tt, "tokenize_dataset", lambda model, data: calls.append(1) or real(model, data))
    train_transformer(_cfg(run, "tok", steps=3), progress=False)
    assert calls == []  # resumed from the cached tokens
    # a changed image (new mtime) makes the cache stale: the tokens are computed again
    data = shutil.copytree(run[1], tmp_path / "data")
    out = str(tmp_path / "run")  # absolute: _cfg's root / out is then this path
    train_transformer(_cfg(run, out, data=str(data), steps=2), progress=False)
    assert calls == [1]
    first = sorted((data / "images").iterdir())[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    train_transformer(_cfg(run, out, data=str(data), steps=3), progress=False)
    assert calls == [1, 1]


def test_budgeted_steps_fit_the_time_left():
    from vqdiff.model.train.common import TimeBudget, budgeted_steps

    assert budgeted_steps(100.0, 10_000, 50, elapsed_s=10.0, s_per_step=0.1) == 50 + int(0.95 * 90 / 0.1)
    assert budgeted_steps(100.0, 10_000, 50, elapsed_s=10.0, s_per_step=0.001) == 10_000  # never beyond --steps
    assert budgeted_steps(100.0, 10_000, 50, elapsed_s=150.0, s_per_step=0.1) == 50  # over budget: stop now
    # the plan comes once, at the probe's end, at the pace of its second half (the first holds start-up costs)
    budget = TimeBudget(100.0, t_start=0.0, start_step=0, probe=4)
    assert [budget.plan(s, 10_000, now) for s, now in ((1, 5.0), (2, 6.0), (3, 6.1))] == [None, None, None]
    assert budget.plan(4, 10_000, 6.2) == 4 + int(0.95 * (100 - 6.2) / 0.1)
    assert budget.plan(5, 10_000, 6.3) is None and not budget.over(100.0) and budget.over(100.5)
    assert TimeBudget(None, 0.0, 0).plan(50, 10, 1.0) is None and not TimeBudget(None, 0.0, 0).over(1e9)
    with pytest.raises(ValueError, match="time_budget_s"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", time_budget_s=0.0)


def test_a_time_budget_fixes_the_run_length_and_the_cosine_ends_there(run, monkeypatch):
    import vqdiff.model.train.transformer as tt

    monkeypatch.setattr(tt, "PROBE_STEPS", 4)
    # a 4-step probe, then a budget that allows only a few more steps at the measured pace
    clock = iter(range(0, 10_000, 1))
    monkeypatch.setattr(tt.time, "time", lambda: float(next(clock)))  # each call advances one "second"
    cfg = _cfg(run, "budget", steps=500, time_budget_s=60.0, min_lr=1e-5, ckpt_every=1000)
    folder = train_transformer(cfg, progress=False)
    log = [json.loads(x) for x in (run[0] / "budget" / "train.log").read_text().splitlines()]
    plan = [r for r in log if "planned_steps" in r]
    assert len(plan) == 1 and plan[0]["step"] == 4
    planned = plan[0]["planned_steps"]
    assert 4 < planned < 500
    steps = [r["step"] for r in log if "loss" in r]
    assert steps[-1] == planned  # the run ended where it planned to ...
    assert log[-1]["lr"] == pytest.approx(1e-5)  # ... with the cosine tail at min_lr
    ckpt = torch.load(run[0] / "budget" / "checkpoint.pt", weights_only=True)
    assert ckpt["planned_steps"] == planned and ckpt["step"] == planned
    assert load_model(folder).null_cond is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_draws_the_cpu_batches_and_matches_the_cpu_loss(run, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the VQVAE's convs must give the CPU's tokens
    losses = {}
    for device in ("cpu", "cuda"):
        train_transformer(_cfg(run, f"dev-{device}", steps=3, device=device), progress=False)
        losses[device] = [json.loads(x)["loss"] for x in (run[0] / f"dev-{device}" / "train.log").read_text().splitlines()]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
    ckpt = torch.load(run[0] / "dev-cuda" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3


def test_a_spent_time_budget_stops_the_run_with_a_saved_model(run, monkeypatch):
    import vqdiff.model.train.transformer as tt

    monkeypatch.setattr(tt, "PROBE_STEPS", 10_000)  # no plan: only the hard stop can end this run early
    clock = iter(range(0, 10_000, 1))
    monkeypatch.setattr(tt.time, "time", lambda: float(next(clock)))
    # 100 "seconds" cannot hold 500 steps at several clock reads a step: the run stops before its plan
    folder = train_transformer(_cfg(run, "spent", steps=500, time_budget_s=100.0, ckpt_every=1000), progress=False)
    log = [json.loads(x) for x in (run[0] / "spent" / "train.log").read_text().splitlines()]
    assert log[-1]["stopped"] == "time budget spent"
    ckpt = torch.load(run[0] / "spent" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == log[-1]["step"] < 500
    assert load_model(folder) is not None


def _log(run, out):
    return [json.loads(x) for x in (run[0] / out / "train.log").read_text().splitlines()]


def test_a_teacher_that_is_the_start_adds_nothing_at_the_first_step_and_holds_the_model_near_it(run):
    """Learning without forgetting: the KL to the teacher's x0 predictions is zero where the model is
    the teacher, and pulls a fine-tune towards it."""
    base = train_transformer(_cfg(run, "t0", steps=2), progress=False)
    kw = dict(vqvae=None, init=str(base), steps=6, lr=3e-3, warmup=1, null_drop=0.0)
    free = train_transformer(_cfg(run, "t_free", **kw), progress=False)
    held = train_transformer(_cfg(run, "t_held", teacher=str(base), teacher_weight=50.0, **kw), progress=False)
    log = _log(run, "t_held")
    assert log[0]["teacher_kl"] < 1e-5  # the model is the teacher before its first update
    assert all(r["teacher_kl"] >= 0 for r in log) and max(r["teacher_kl"] for r in log) > 1e-4
    assert log[0]["loss"] == pytest.approx(_log(run, "t_free")[0]["loss"], rel=1e-4)

    def distance(folder):
        a, b = _state(folder), _state(base)
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in a if k.startswith("transformer."))
    assert distance(held) < distance(free)


def test_teacher_weight_zero_or_every_caption_skipped_is_the_run_without_a_teacher(run):
    base = train_transformer(_cfg(run, "tb", steps=2), progress=False)
    other = train_transformer(_cfg(run, "to", steps=3, seed=7), progress=False)
    kw = dict(vqvae=None, init=str(base), steps=2)
    plain = _state(train_transformer(_cfg(run, "tp", **kw), progress=False))
    zero = _state(train_transformer(_cfg(run, "tz", teacher=str(other), teacher_weight=0.0, **kw), progress=False))
    skipped = _state(train_transformer(_cfg(run, "ts", teacher=str(other), teacher_skip=".", **kw), progress=False))
    taught = _state(train_transformer(_cfg(run, "tt", teacher=str(other), **kw), progress=False))
    assert all(torch.equal(plain[k], zero[k]) and torch.equal(plain[k], skipped[k]) for k in plain)
    assert not all(torch.equal(plain[k], taught[k]) for k in plain)
    assert "teacher_kl" not in _log(run, "ts")[0] and "teacher_kl" in _log(run, "tt")[0]


def test_teacher_settings_fail_loudly(run, tmp_path):
    from vqdiff.model.io.folder import ModelFolderError
    from vqdiff.model.train.transformer import load_teacher

    with pytest.raises(ValueError, match="teacher_skip and teacher_on_null choose"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", teacher_skip="shape")
    with pytest.raises(ValueError, match="not a regular expression"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", teacher="t", teacher_skip="(")
    with pytest.raises(ValueError, match="teacher_weight"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", teacher="t", teacher_weight=float("nan"))
    base = load_model(train_transformer(_cfg(run, "tf", steps=1), progress=False))
    other = replace(base.config, diffusion=replace(base.config.diffusion, gamma_cum_end=0.9))
    odd = type(base)(other, base.transformer, base.vqvae, base.text_encoder, base.null_cond)
    with pytest.raises(ModelFolderError, match="diffusion schedule"):
        load_teacher(str(run[0] / "tf" / "model"), odd, torch.device("cpu"))


def test_a_teacher_on_null_also_holds_the_unconditional_branch(run):
    """With every caption dropped, the teacher's term exists only with teacher_on_null, the teacher
    then given its own learnable null: zero before the first update when the teacher is the start."""
    base = train_transformer(_cfg(run, "tn0", steps=2), progress=False)
    kw = dict(vqvae=None, init=str(base), steps=3, null_drop=1.0, teacher=str(base))
    train_transformer(_cfg(run, "tn_off", **kw), progress=False)
    train_transformer(_cfg(run, "tn_on", teacher_on_null=True, **kw), progress=False)
    assert "teacher_kl" not in _log(run, "tn_off")[0]
    log = _log(run, "tn_on")
    assert log[0]["teacher_kl"] < 1e-5 and max(r["teacher_kl"] for r in log) > 0
    with pytest.raises(ValueError, match="teacher_on_null"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", teacher_on_null=True)


def test_without_summary_keeps_the_words_and_gives_the_rest_the_empty_prompts_states():
    from vqdiff.model.train.transformer import without_summary

    ids = torch.tensor([[9, 4, 5, 2, 2, 2], [9, 4, 5, 6, 7, 2]])  # (B, L): bos 9, eos (= pad) 2
    text, empty = torch.randn(2, 6, 3), torch.randn(1, 6, 3)
    out = without_summary(text, ids, 2, empty)
    assert torch.equal(out[0, :3], text[0, :3]) and torch.equal(out[0, 3:], empty[0, 3:])
    assert torch.equal(out[1, :5], text[1, :5]) and torch.equal(out[1, 5:], empty[0, 5:])


def test_summary_drop_changes_a_run_only_when_asked_for(run):
    """summary_drop 0 is the run as before (no extra draw); 1 trains on the words' states alone."""
    kw = dict(steps=2)
    plain = _state(train_transformer(_cfg(run, "sd_plain", **kw), progress=False))
    zero = _state(train_transformer(_cfg(run, "sd_zero", summary_drop=0.0, **kw), progress=False))
    blind = _state(train_transformer(_cfg(run, "sd_one", summary_drop=1.0, **kw), progress=False))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], blind[k]) for k in plain)
    assert all(r["loss"] > 0 for r in _log(run, "sd_one"))
    with pytest.raises(ValueError, match="summary_drop"):
        TransformerTrainConfig(data="d", out="o", vqvae="v", summary_drop=1.5)
