"""The sampler end to end: parity of the posterior sampler with diffusers, per-request
reproducibility inside mixed batches, params validation, plans, and the CLI."""

from __future__ import annotations

import math

import subprocess
import sys

import pytest
import torch
from PIL import Image

import vqdiff.model.sampling.step as step_mod
from vqdiff.model.config import DiffusionConfig
from vqdiff.model.diffusion import Schedule
from vqdiff.model.io.folder import load_model, random_model, save_model
from vqdiff.model.sampling.params import GenerationParams
from vqdiff.model.sampling.sampler import advance, default_params, plan, sample, start, request_params
from vqdiff.model.sampling.step import POSTERIOR, BatchParams, denoise_step
from tests.serving import cli


@pytest.fixture(scope="module")
def tiny_model(tokenizer, tiny_config):
    m = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():  # a random model with confident, varied predictions
        m.transformer.out.weight.mul_(40.0)
        m.null_cond.embeddings.normal_()
    return m


def _noise_from(generator: torch.Generator, last_step: int):
    """A stand-in for rng.uniform that replays diffusers' torch.rand draws, (B, C, N) -> (B, N, C).
    diffusers draws K classes at t = 0 and K + 1 otherwise."""

    def uniform(seed, step, stream, n, c=None):
        b = seed.shape[0]
        if int(step[0]) == last_step:
            u = torch.rand((b, c - 1, n), generator=generator)
            return torch.cat([u, torch.full((b, 1, n), 0.5)], dim=1).transpose(1, 2)
        return torch.rand((b, c, n), generator=generator).transpose(1, 2)

    return uniform


def test_posterior_step_matches_diffusers_scheduler(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    k, n, b = 37, 16, 3
    sched = diffusers.VQDiffusionScheduler(num_vec_classes=k + 1)
    ours = Schedule(DiffusionConfig(num_classes=k))
    g = torch.Generator().manual_seed(0)
    for t in (99, 50, 2, 1, 0):
        log_p = torch.log_softmax(torch.randn(b, n, k, generator=g) * 3, -1)  # (B, N, K)
        x_t = torch.randint(0, k, (b, n), generator=g)
        x_t[torch.rand(b, n, generator=g) < 0.5] = k  # half masked
        want = sched.step(log_p.transpose(1, 2), t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        monkeypatch.setattr(step_mod.rng, "uniform", _noise_from(torch.Generator().manual_seed(t), 0 if t == 0 else -1))
        rows = [dict(guidance_scale=1.0, truncation_rate=1.0, purity_weight=0.0, kind=POSTERIOR, seed=0,
                     step=0, count=0, t_eval=t)] * b
        got = denoise_step(log_p, log_p, x_t, BatchParams.build(rows, "cpu"), ours).tokens
        assert torch.equal(got, want), f"t={t}"


def test_posterior_sampler_reproduces_diffusers_pipeline(diffusers_pipeline, diffusers_folder, monkeypatch):
    """The whole original reverse process (100 steps, learned null, guidance, truncation) with
    diffusers' noise gives diffusers' image."""
    ours = load_model(diffusers_folder)
    prompt = "a red circle above a blue square"
    want = diffusers_pipeline(prompt, num_inference_steps=100, guidance_scale=4.0, truncation_rate=0.9,
                              generator=torch.Generator().manual_seed(7), output_type="np").images  # (1, H, W, 3)
    monkeypatch.setattr(step_mod.rng, "uniform", _noise_from(torch.Generator().manual_seed(7), 99))
    params = GenerationParams(sampler="posterior", steps=100, guidance_scale=4.0, truncation_rate=0.9, seed=0)
    got = sample(ours, [prompt], params).images.permute(0, 2, 3, 1).numpy()
    assert abs(want - got).max() <= 1e-4


def test_same_seed_same_tokens(tiny_model):
    p = GenerationParams(steps=8, seed=11)
    a, b = sample(tiny_model, ["a red circle"], p), sample(tiny_model, ["a red circle"], p)
    assert torch.equal(a.tokens, b.tokens)
    c = sample(tiny_model, ["a red circle"], GenerationParams(steps=8, seed=12))
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("sampler,steps", [("purity", 8), ("random", 5), ("skip", 6), ("posterior", 100)])
def test_request_alone_equals_request_in_a_mixed_batch(tiny_model, sampler, steps):
    """The same request alone, and joined late into a batch of three others (other prompts, params,
    samplers, all at other steps) gives identical tokens."""
    target = ("a red circle above a blue square", GenerationParams(sampler=sampler, steps=steps, seed=123,
                                                                   guidance_scale=3.0, truncation_rate=0.95))
    others = [
        ("green triangle", GenerationParams(steps=20, seed=1, guidance_scale=7.0, purity_weight=2.0)),
        ("blue square", GenerationParams(sampler="skip", steps=30, seed=2, uncond="empty")),
        ("a circle", GenerationParams(sampler="random", steps=64, seed=3, negative_prompt="red")),
    ]
    (alone,) = start(tiny_model, [target[0]], [target[1]])
    while not alone.done:
        advance(tiny_model.transformer, tiny_model.schedule, [alone])

    batch = start(tiny_model, [o[0] for o in others], [o[1] for o in others])
    for i in range(3):  # the others run ahead, to different steps
        advance(tiny_model.transformer, tiny_model.schedule, batch[i:])
    (joined,) = start(tiny_model, [target[0]], [target[1]])
    while not joined.done:
        running = [s for s in batch if not s.done] + [joined]
        assert len({s.step for s in running}) > 1 or len(running) == 1
        advance(tiny_model.transformer, tiny_model.schedule, running)
    assert torch.equal(alone.tokens, joined.tokens)
    assert (alone.tokens < tiny_model.config.transformer.num_embed).all()  # nothing left masked


def test_the_cosine_unmask_schedule_spreads_few_tokens_first():
    from vqdiff.model.sampling.sampler import masked_left

    s = Schedule(DiffusionConfig(num_classes=37))
    assert masked_left(64, 16, "linear") == [64 - 4 * i for i in range(16)] + [0]
    left = masked_left(64, 16, "cosine")
    assert left[0] == 64 and left[-1] == 0
    assert round(64 * math.cos(math.pi / 32)) == 64 and left[1] == 63  # nudged: one token at least
    counts = [a - b for a, b in zip(left, left[1:])]
    assert sum(counts) == 64 and min(counts) >= 1 and counts[0] < 4 < counts[-1]
    assert sum(counts[:8]) < 64 / 3 and counts[0] == 1  # the first half of the forwards: under a third
    for m in (1, 2, 5, 64, 1024):  # every forward unmasks at least one, at any steps <= m
        for steps in {s for s in (1, 2, 3, m // 2, m - 1, m) if 1 <= s <= m}:
            c = [a - b for a, b in zip(masked_left(m, steps, "cosine"), masked_left(m, steps, "cosine")[1:])]
            assert sum(c) == m and min(c) >= 1 and len(c) == steps
    assert plan("purity", 64, 64, s, unmask_schedule="cosine").counts == (1,) * 64  # one per forward: no choice
    p = plan("purity", 16, 64, s, unmask_schedule="cosine")
    assert p.counts == tuple(counts) and p.timesteps[0] == 99
    assert list(p.timesteps) == sorted(p.timesteps, reverse=True)
    with pytest.raises(ValueError, match="unmask_schedule"):
        GenerationParams(unmask_schedule="exp")


def test_a_few_steps_rule_sets_the_defaults_of_short_requests(tiny_model):
    from vqdiff.model.sampling.params import split_defaults

    rule = {"max_steps": 16, "unmask_schedule": "cosine", "purity_weight": 2.0}
    saved = tiny_model.generation_defaults
    tiny_model.generation_defaults = {"steps": 64, "guidance_scale": 2.0, "few_steps": rule}
    try:
        long = request_params(tiny_model, {})
        assert (long.steps, long.unmask_schedule, long.purity_weight) == (64, "linear", 1.0)
        short = request_params(tiny_model, {"steps": 16})
        assert (short.unmask_schedule, short.purity_weight, short.guidance_scale) == ("cosine", 2.0, 2.0)
        assert request_params(tiny_model, {"steps": 17}).unmask_schedule == "linear"  # past max_steps
        mine = request_params(tiny_model, {"steps": 8, "purity_weight": 0.5})  # what a request gives wins
        assert (mine.purity_weight, mine.unmask_schedule) == (0.5, "cosine")
        assert request_params(tiny_model, {"sampler": "skip", "steps": 8}).purity_weight == 1.0  # selection only
        assert split_defaults(tiny_model.generation_defaults) == ({"steps": 64, "guidance_scale": 2.0}, rule)
    finally:
        tiny_model.generation_defaults = saved
    for bad, match in (({"few_steps": {"unmask_schedule": "cosine"}}, "max_steps"),
                       ({"few_steps": {"max_steps": 8, "steps": 4}}, "may not set steps"),
                       ({"few_steps": {"max_steps": 8, "purity_weight": -1}}, "purity_weight"),
                       ({"few_steps": [8]}, "few_steps")):
        with pytest.raises(ValueError, match=match):
            split_defaults(bad)


def test_plans():
    s = Schedule(DiffusionConfig(num_classes=37))
    p = plan("purity", 10, 64, s)
    assert sum(p.counts) == 64 and max(p.counts) - min(p.counts) <= 1
    assert p.timesteps[0] == 99 and list(p.timesteps) == sorted(p.timesteps, reverse=True)
    assert plan("random", 64, 64, s).counts == (1,) * 64
    assert plan("posterior", 100, 64, s).timesteps == tuple(range(99, -1, -1))
    assert plan("posterior", 100, 64, s).t_eval == tuple(range(99, -1, -1))
    skip = plan("skip", 5, 64, s)
    assert skip.timesteps == (99, 74, 50, 25, 0) and skip.t_eval == (75, 51, 26, 1, 0)
    with pytest.raises(ValueError, match="steps: 65"):
        plan("purity", 65, 64, s)


@pytest.mark.parametrize("field,value,match", [
    ("guidance_scale", 0.5, r"guidance_scale: 0.5 is not allowed; expected a number in \[1.0, 50.0\]"),
    ("guidance_scale", float("nan"), "guidance_scale: nan"),
    ("truncation_rate", 0.0, r"truncation_rate: 0.0 is not allowed; expected a number in \(0.0, 1.0\]"),
    ("truncation_rate", 1.5, "truncation_rate: 1.5"),
    ("sampler", "ddim", "sampler: 'ddim' is not allowed; expected one of"),
    ("steps", 0, "steps: 0 is not allowed"),
    ("steps", 2.5, "steps: 2.5"),
    ("purity_weight", -1.0, "purity_weight: -1.0"),
    ("seed", -3, "seed: -3"),
    ("uncond", "negative", "needs a non-empty negative_prompt"),
])
def test_invalid_params_name_field_value_range(field, value, match):
    with pytest.raises(ValueError, match=match):
        GenerationParams(**{field: value})


def test_params_checked_against_the_model(tiny_model):
    with pytest.raises(ValueError, match=r"steps: 100 is not allowed for sampler 'purity'; expected 1..64"):
        sample(tiny_model, ["a"], GenerationParams(steps=100, seed=0))
    with pytest.raises(ValueError, match="unknown generation parameter"):
        GenerationParams.from_dict({"guidance": 3})


def test_cli_generates_a_png(tiny_model, tmp_path, capsys):
    folder = save_model(tiny_model, tmp_path / "m")
    out = tmp_path / "img.png"
    code, err = cli(capsys, "generate", "a red circle", "--model", str(folder), "-o", str(out), "--steps", "8",
                    "--seed", "4", "--guidance-scale", "3", "--sampler", "purity", "--truncation-rate", "0.9",
                    "--purity-weight", "1.5")
    assert code == 0, err
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (16, 16) and img.mode == "RGB"
    want = sample(tiny_model, ["a red circle"], GenerationParams(steps=8, seed=4, guidance_scale=3.0,
                                                                 truncation_rate=0.9, purity_weight=1.5)).images
    got = torch.tensor(list(img.getdata()), dtype=torch.float32).view(16, 16, 3).permute(2, 0, 1) / 255
    assert (got - want[0]).abs().max() <= 1 / 255 + 1e-6  # the same image, up to 8-bit rounding


def test_cli_a_named_sampler_without_steps_gets_its_own_default(tiny_model, tmp_path, capsys):
    """A folder without defaults (steps: min(100, N) = 64 here) asked for the posterior sampler:
    its steps are the model's T, not the folder's default, which posterior could not take."""
    from vqdiff.cli import main

    folder = save_model(tiny_model, tmp_path / "m")
    c = tiny_model.config.transformer
    for sampler, steps in (("posterior", c.num_timesteps), ("skip", min(100, c.num_tokens, c.num_timesteps))):
        capsys.readouterr()
        code = main(["generate", "a red circle", "--model", str(folder), "-o", str(tmp_path / "p.png"), "--seed", "1",
                     "--sampler", sampler, "--quiet"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert f"sampler={sampler} steps={steps} " in out.out, out.out
    assert default_params(tiny_model, "random").steps == default_params(tiny_model).steps == min(100, c.num_tokens)


@pytest.mark.parametrize("args,match", [
    (["--guidance-scale", "0.5"], "guidance_scale: 0.5 is not allowed"),
    (["--sampler", "nope"], "sampler: 'nope' is not allowed"),
    (["--steps", "1000"], "steps: 1000 is not allowed"),
])
def test_cli_bad_input_is_one_line_and_nonzero(tiny_model, tmp_path, args, match, capsys):
    folder = save_model(tiny_model, tmp_path / "m")
    code, err = cli(capsys, "generate", "x", "--model", str(folder), "--quiet", "-o", str(tmp_path / "o.png"), *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], err
    assert not (tmp_path / "o.png").exists()


def test_cli_bad_model_folder(tmp_path):
    """The real command line, in its own process: the exit status and nothing on stderr but the
    one line (no warnings from the imports either)."""
    (tmp_path / "m").mkdir()
    r = subprocess.run([sys.executable, "-m", "vqdiff.cli", "generate", "x", "--model", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "model_index.json: file not found" in lines[0], r.stderr


def test_cli_uses_vqdiff_model_when_no_model_is_given(tiny_model, tmp_path, capsys, monkeypatch):
    folder = save_model(tiny_model, tmp_path / "m")
    monkeypatch.setenv("VQDIFF_MODEL", str(folder))
    code, err = cli(capsys, "generate", "a red circle", "-o", str(tmp_path / "o.png"), "--steps", "4", "--seed", "1",
                    "--quiet")
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (16, 16)
    monkeypatch.setenv("VQDIFF_MODEL", str(tmp_path / "nowhere"))
    code, err = cli(capsys, "generate", "x", "--quiet")
    assert code == 2 and "$VQDIFF_MODEL is not a model folder" in err
