"""Tests of the batched denoise step (model/sampling/step.py), its randomness (model/sampling/rng.py) and the
request-level loop around it (model/sampling/sampler.py: plan, RequestState, advance, start).

References are independent: exact probabilities enumerated by hand (weighted sampling without
replacement, softmax), the log-space form of guidance in float64, the paper's two-position toy
whose data is only AA and BB, and statistics of many draws. Every random number comes from
``vqdiff.model.sampling.rng.uniform`` with fixed seeds, so each test is deterministic; sample sizes are chosen so
that the statistical bounds hold with a wide margin (alpha = 1e-3 or better) and still catch the
obvious wrong implementations (checked by the "power" assertions next to each chi-square).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from vqdiff.model.sampling import rng
from vqdiff.model.config import DiffusionConfig
from vqdiff.model.diffusion import Schedule
from vqdiff.model.sampling.params import GenerationParams
from vqdiff.model.sampling.sampler import RequestState, advance, plan, start
from vqdiff.model.sampling.step import (
    LOG_MIN,
    POSTERIOR,
    PURITY,
    RANDOM,
    BatchParams,
    denoise_step,
    draw_tokens,
    guided_log_probs,
    purity,
    select_positions,
    truncate,
)

# chi-square critical values at alpha = 1e-3, by degrees of freedom (used when scipy is absent)
CHI2_CRIT_1E3 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124}


def chi2_critical(df: int) -> float:
    try:
        from scipy.stats import chi2  # type: ignore

        return float(chi2.ppf(1 - 1e-3, df))
    except ImportError:
        return CHI2_CRIT_1E3[df]


def chi2_stat(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of integer counts against exact probabilities (same length)."""
    observed = observed.to(torch.float64)
    expected = probs.to(torch.float64) * observed.sum()
    assert bool((expected > 5).all()), "test design: every expected count must exceed 5"
    return float(((observed - expected) ** 2 / expected).sum())


def uniforms(num: int, stream: int, n: int, k: int | None = None, step: int = 0, seed0: int = 0) -> torch.Tensor:
    """``num`` independent rows of counter-based uniforms: seeds seed0..seed0+num-1."""
    seed = torch.arange(seed0, seed0 + num, dtype=torch.int64)
    return rng.uniform(seed, torch.full((num,), step, dtype=torch.int64), stream, n, k)


# ---------------------------------------------------------------------------------------------
# 1. the paper's joint-distribution toy: data is only AA and BB

A, B, MASK = 0, 1, 2


class CopyTransformer(nn.Module):
    """Two positions, two classes. Both masked: each position 50/50. One unmasked: the other one
    copies it (logits +-20). Records the text_kv rows it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_kv: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_kv: torch.Tensor) -> torch.Tensor:
        m, n = x_t.shape
        assert n == 2 and t.shape == (m,) and text_kv.shape[2] == m
        self.seen_kv.append(text_kv[0, 0, :, 0].clone())
        other = x_t.flip(-1)  # (M, 2): the token at the other position
        logits = torch.zeros(m, n, 2)
        known = other != MASK
        onehot = torch.nn.functional.one_hot(other.clamp(max=1), 2).float()  # (M, 2, 2)
        logits = torch.where(known.unsqueeze(-1), 40.0 * onehot - 20.0, logits)
        return logits


TOY_SCHEDULE = Schedule(DiffusionConfig(num_classes=2))


def toy_states(sampler: str, steps: int, seeds: range, purity_weight: float = 1.0,
               guidance_scale: float = 1.0) -> list[RequestState]:
    p = plan(sampler, steps, 2, TOY_SCHEDULE)
    states = []
    for s in seeds:
        params = GenerationParams(
            guidance_scale=guidance_scale, truncation_rate=1.0, sampler=sampler, steps=steps, seed=s,
            purity_weight=purity_weight
        ).resolve(num_tokens=2, num_timesteps=TOY_SCHEDULE.num_timesteps, has_null=False)
        kv = torch.tensor([float(s), -float(s) - 1]).view(1, 1, 2, 1).expand(1, 2, 2, 1).contiguous()
        states.append(RequestState(params=params, plan=p, tokens=torch.full((2,), MASK), text_kv=kv))
    return states


def run_toy(sampler: str, steps: int, n: int = 400, purity_weight: float = 1.0) -> torch.Tensor:
    net = CopyTransformer()
    states = toy_states(sampler, steps, range(1000, 1000 + n), purity_weight)
    forwards = 0
    while not all(s.done for s in states):
        advance(net, TOY_SCHEDULE, [s for s in states if not s.done])
        forwards += 1
    assert forwards == steps
    return torch.stack([s.tokens for s in states])  # (n, 2)


@pytest.mark.parametrize("sampler", ["random", "purity"])
def test_toy_one_step_breaks_the_joint(sampler):
    """Both tokens drawn in one forward are independent: AB / BA about half the time."""
    x = run_toy(sampler, steps=1)
    assert bool((x != MASK).all())
    mixed = (x[:, 0] != x[:, 1]).double().mean().item()
    assert 0.4 < mixed < 0.6, mixed
    for pair in itertools.product((A, B), repeat=2):  # each of AA, AB, BA, BB about a quarter
        f = ((x[:, 0] == pair[0]) & (x[:, 1] == pair[1])).double().mean().item()
        assert 0.15 < f < 0.35, (pair, f)


@pytest.mark.parametrize("purity_weight", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("sampler", ["random", "purity"])
def test_toy_one_token_per_step_keeps_the_joint(sampler, purity_weight):
    """One token per forward: the second copies the first, so only AA and BB, each about half."""
    x = run_toy(sampler, steps=2, purity_weight=purity_weight)
    assert bool((x != MASK).all())
    assert bool((x[:, 0] == x[:, 1]).all()), "AB or BA generated with one token per step"
    aa = (x[:, 0] == A).double().mean().item()
    assert 0.4 < aa < 0.6, aa


@pytest.mark.parametrize("sampler", ["random", "purity"])
def test_toy_first_position_is_uniform(sampler):
    """Which position goes first (equal purities) is 50/50, and a request's tokens are a pure
    function of its seed: the same seeds in another batch order agree."""
    net = CopyTransformer()
    states = toy_states(sampler, 2, range(400))
    advance(net, TOY_SCHEDULE, states)
    first = torch.stack([s.tokens for s in states])  # (400, 2): exactly one unmasked
    assert bool(((first != MASK).sum(-1) == 1).all())
    f0 = (first[:, 0] != MASK).double().mean().item()
    assert 0.4 < f0 < 0.6, f0
    rev = toy_states(sampler, 2, range(400))[::-1]
    advance(net, TOY_SCHEDULE, rev)
    assert torch.equal(torch.stack([s.tokens for s in rev[::-1]]), first)


def test_advance_feeds_cond_rows_then_uncond_rows():
    net = CopyTransformer()
    states = toy_states("random", 2, range(3), guidance_scale=2.0)
    advance(net, TOY_SCHEDULE, states)
    # request s has kv cond = s, uncond = -s - 1
    assert net.seen_kv[0].tolist() == [0.0, 1.0, 2.0, -1.0, -2.0, -3.0]
    assert all(s.step == 1 for s in states)
    net = CopyTransformer()
    advance(net, TOY_SCHEDULE, toy_states("random", 2, range(3)))  # guidance 1: no uncond rows at all
    assert net.seen_kv[0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        advance(net, TOY_SCHEDULE, [])


# ---------------------------------------------------------------------------------------------
# 2. purity selection: exact weighted sampling without replacement


def exact_set_probs(weights: list[float], candidates: list[int], count: int) -> dict[frozenset, float]:
    """P(chosen set) for successive draws without replacement, proportional to weight, among
    ``candidates``: enumerate every ordered draw."""
    out: dict[frozenset, float] = {}
    for order in itertools.permutations(candidates, count):
        p, left = 1.0, sum(weights[i] for i in candidates)
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        out[frozenset(order)] = out.get(frozenset(order), 0.0) + p
    return out


SELECT_CASES = [
    # weights, masked, count
    ([1.0, 2.0, 3.0, 4.0], [True, True, True, True], 2),
    ([1.0, 2.0, 3.0, 4.0], [True, True, True, True], 1),
    ([1.0, 2.0, 3.0, 4.0], [True, True, True, True], 3),
    ([1.0, 2.0, 3.0, 4.0], [True, False, True, True], 2),  # position 1 already unmasked
    ([0.05, 1.0, 0.3, 0.6, 0.9], [True, True, True, True, False], 2),
]


@pytest.mark.parametrize("weights, masked, count", SELECT_CASES)
def test_select_positions_matches_exact_probabilities(weights, masked, count):
    m, n = 20000, len(weights)
    u = uniforms(m, rng.SELECT, n, seed0=7)
    score = torch.tensor(weights).expand(m, n)
    mask = torch.tensor(masked).expand(m, n)
    chosen = select_positions(score, mask, torch.full((m,), count), u)  # (m, n)

    assert bool((chosen.sum(-1) == count).all())
    assert not bool((chosen & ~mask).any()), "an unmasked position was chosen"

    exact = exact_set_probs(weights, [i for i in range(n) if masked[i]], count)
    sets = list(exact)
    code = (chosen.long() * (2 ** torch.arange(n))).sum(-1)  # (m,) bitmask of the chosen set
    keys = torch.tensor([sum(2**i for i in s) for s in sets])
    assert bool(torch.isin(code, keys).all())
    observed = torch.stack([(code == k).sum() for k in keys])
    probs = torch.tensor([exact[s] for s in sets], dtype=torch.float64)
    assert abs(probs.sum().item() - 1.0) < 1e-12
    stat = chi2_stat(observed, probs)
    assert stat < chi2_critical(len(sets) - 1), (stat, observed.tolist(), (probs * m).tolist())

    # power: the same counts are far from uniform sets and from "top-k of weight * u"
    if len(sets) > 1:
        assert chi2_stat(observed, torch.full((len(sets),), 1.0 / len(sets))) > chi2_critical(len(sets) - 1)
    if count < len([x for x in masked if x]) and count > 1:
        naive = torch.where(mask, score * u, torch.full_like(u, -1.0)).topk(count, dim=-1).indices
        naive_code = (2 ** naive).sum(-1)
        naive_obs = torch.stack([(naive_code == k).sum() for k in keys])
        assert chi2_stat(naive_obs, probs) > chi2_critical(len(sets) - 1)


def test_select_positions_per_row_counts():
    """Counts differ per row in one batch; a count above the number of masked positions takes them all."""
    n = 6
    masked = torch.tensor([
        [True] * 6,
        [True] * 6,
        [True, False, True, False, True, True],
        [True] * 6,
        [False, True, False, True, False, False],  # 2 masked, count 4
        [False] * 6,  # nothing masked, count 3
    ])
    count = torch.tensor([0, 1, 3, 4, 4, 3])
    want = torch.minimum(count, masked.sum(-1))
    score = torch.rand(6, n, generator=torch.Generator().manual_seed(0)) + 0.01
    for s in range(200):
        u = uniforms(6, rng.SELECT, n, seed0=100 * s)
        chosen = select_positions(score, masked, count, u)
        assert torch.equal(chosen.sum(-1), want)
        assert not bool((chosen & ~masked).any())
        for b in range(6):  # a row alone gives the same choice
            alone = select_positions(score[b : b + 1], masked[b : b + 1], count[b : b + 1], u[b : b + 1])
            assert torch.equal(alone[0], chosen[b])


# ---------------------------------------------------------------------------------------------
# 3. plans: after every advance exactly the scheduled number of masks remains


def test_plan_counts_and_timesteps():
    sched = Schedule(DiffusionConfig(num_classes=37))
    for sampler in ("purity", "random"):
        for steps in (1, 2, 7, 10, 63, 64):
            p = plan(sampler, steps, 64, sched)
            assert p.steps == steps and sum(p.counts) == 64 and min(p.counts) >= 1
            assert max(p.counts) - min(p.counts) <= 1
            assert list(p.timesteps) == sorted(p.timesteps, reverse=True)
            assert p.timesteps[0] == sched.num_timesteps - 1  # everything masked: the last timestep
    with pytest.raises(ValueError):
        plan("purity", 65, 64, sched)
    with pytest.raises(ValueError):
        plan("random", 0, 64, sched)


def test_masks_follow_the_plan(tiny_config, tokenizer):
    from vqdiff.model.io.folder import random_model

    model = random_model(tiny_config, tokenizer, seed=0).eval()
    n = tiny_config.transformer.num_tokens
    assert n == 64
    specs = [("purity", 1, 1.0, 1.0), ("purity", 7, 3.0, 0.8), ("purity", 64, 5.0, 1.0),
             ("random", 1, 1.0, 0.5), ("random", 7, 1.0, 1.0), ("random", 64, 7.5, 0.9), ("purity", 13, 2.0, 1.0)]
    params = [GenerationParams(sampler=s, steps=k, guidance_scale=g, truncation_rate=r, seed=10 + i)
              for i, (s, k, g, r) in enumerate(specs)]
    states = start(model, ["a red circle"] * len(specs), params)
    k = model.config.transformer.num_embed
    for s in states:
        assert int((s.tokens == k).sum()) == n
    while running := [s for s in states if not s.done]:
        before = {id(s): s.tokens.clone() for s in running}
        advance(model.transformer, model.schedule, running)
        for s in running:
            old, new = before[id(s)], s.tokens
            masks_left = int((new == k).sum())
            assert masks_left == n - sum(s.plan.counts[: s.step]), (s.params.sampler, s.params.steps, s.step)
            assert torch.equal(new[old != k], old[old != k]), "an unmasked token changed"
            assert bool(((new >= 0) & (new <= k)).all())
            assert s.purity is not None and bool(((s.purity > 0) & (s.purity <= 1)).all())
    for s in states:
        assert s.step == s.params.steps and not bool((s.tokens == k).any())


# ---------------------------------------------------------------------------------------------
# 4. guidance


def test_guidance_logit_space_equals_log_space():
    gen = torch.Generator().manual_seed(1)
    b, n, k = 3, 17, 9
    cond = torch.randn(b, n, k, generator=gen) * 4
    uncond = torch.randn(b, n, k, generator=gen) * 4
    g = torch.tensor([1.0, 3.0, 7.5])
    out = guided_log_probs(cond, uncond, g)
    assert out.dtype == torch.float32 and out.shape == (b, n, k)
    assert bool((out >= LOG_MIN).all() & (out <= 0).all())

    # g = 1: the conditional distribution
    torch.testing.assert_close(out[0], torch.log_softmax(cond[0], -1), atol=1e-5, rtol=0)

    # the released log-space formulation in float64
    lc, lu = torch.log_softmax(cond.double(), -1), torch.log_softmax(uncond.double(), -1)
    ref = torch.log_softmax(lu + g.double().view(-1, 1, 1) * (lc - lu), -1).clamp(LOG_MIN, 0.0)
    sel = ref > -30
    assert int(sel.sum()) > b * n  # the comparison covers more than the top-1 of each position
    assert (out.double()[sel] - ref[sel]).abs().max().item() < 1e-4
    # guidance really changes rows 1 and 2
    assert (out[1] - torch.log_softmax(cond[1], -1)).abs().max() > 0.1

    # per-row scales in one batch equal each row alone
    for i in range(b):
        torch.testing.assert_close(out[i : i + 1], guided_log_probs(cond[i : i + 1], uncond[i : i + 1], g[i : i + 1]),
                                   atol=1e-6, rtol=0)


def test_guidance_accepts_half_precision_logits():
    gen = torch.Generator().manual_seed(2)
    cond = (torch.randn(2, 5, 6, generator=gen) * 3).to(torch.bfloat16)
    uncond = (torch.randn(2, 5, 6, generator=gen) * 3).to(torch.bfloat16)
    out = guided_log_probs(cond, uncond, torch.tensor([3.0, 5.0]))
    assert out.dtype == torch.float32
    ref = guided_log_probs(cond.float(), uncond.float(), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------------------------
# 5. truncation


def test_truncate_hand_case():
    lp = torch.log(torch.tensor([[[0.2, 0.5, 0.3]]])).expand(4, 1, 3).contiguous()
    out = truncate(lp, torch.tensor([0.45, 0.55, 0.85, 1.0]))
    kept = out > LOG_MIN
    assert kept.squeeze(1).tolist() == [
        [False, True, False],  # 0.5 >= 0.45: top-1 only
        [False, True, True],  # 0.5 < 0.55: keep 0.3 as well
        [True, True, True],  # 0.8 < 0.85: keep all
        [True, True, True],
    ]


def test_truncate_properties():
    gen = torch.Generator().manual_seed(3)
    b, n, k = 5, 64, 11
    lp = torch.log_softmax(torch.randn(b, n, k, generator=gen) * 3, -1)
    r = torch.tensor([0.05, 0.3, 0.6, 0.9, 1.0])
    out = truncate(lp, r)

    kept = out != LOG_MIN
    assert torch.equal(out[kept], lp[kept]), "kept classes must be unchanged (not re-normalised)"
    assert bool((out[~kept] == LOG_MIN).all())
    top = lp.argmax(-1, keepdim=True)
    assert bool(kept.gather(-1, top).all()), "top-1 must always be kept"
    p = lp.double().exp()
    kept_mass = (p * kept).sum(-1)  # (b, n)
    assert bool((kept_mass >= r.double().view(-1, 1) - 1e-6).all())
    # minimal: without its least likely kept class, the kept mass is below r (or only the top-1 is kept)
    least = torch.where(kept, p, torch.full_like(p, 2.0)).min(-1).values
    minimal = (kept_mass - least < r.double().view(-1, 1) + 1e-6) | (kept.sum(-1) == 1)
    assert bool(minimal.all())
    # kept classes are the most likely ones: every kept p >= every dropped p
    max_dropped = torch.where(kept, torch.full_like(p, -1.0), p).max(-1).values
    assert bool((least >= max_dropped).all())
    # r = 1 leaves the row unchanged; small r really truncates
    assert torch.equal(out[-1], lp[-1])
    assert bool((kept[0].sum(-1) == 1).any()) and bool((kept[3].sum(-1) < k).all())
    # each row alone
    for i in range(b):
        assert torch.equal(truncate(lp[i : i + 1], r[i : i + 1]), out[i : i + 1])


def test_purity_is_max_probability():
    gen = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(2, 8, 5, generator=gen), -1)
    torch.testing.assert_close(purity(lp), lp.exp().max(-1).values)
    # truncation never changes purity (the top-1 is kept)
    torch.testing.assert_close(purity(truncate(lp, torch.tensor([0.2, 0.7]))), purity(lp))


# ---------------------------------------------------------------------------------------------
# 6. token draws


def test_draw_tokens_matches_softmax():
    m, k = 40000, 5
    probs = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3])
    lp = probs.log().view(1, 1, k).expand(m, 1, k)
    u = uniforms(m, rng.TOKEN, 1, k, seed0=11)
    crit = chi2_critical(k - 1)
    for s in (1.0, 1.5, 3.0):
        tok = draw_tokens(lp, torch.full((m, 1), s), u)[:, 0]
        assert tok.shape == (m,) and tok.dtype == torch.long
        counts = torch.bincount(tok, minlength=k)
        want = torch.softmax(s * probs.log().double(), -1)
        stat = chi2_stat(counts, want)
        assert stat < crit, (s, stat, counts.tolist(), (want * m).tolist())
        if s == 1.0:  # power: not uniform, and not already sharpened
            assert chi2_stat(counts, torch.full((k,), 1.0 / k)) > crit
            assert chi2_stat(counts, torch.softmax(1.5 * probs.log().double(), -1)) > crit


def test_draw_tokens_sharpen_concentrates_on_argmax():
    m, k = 20000, 6
    lp = torch.log_softmax(torch.tensor([1.0, -0.2, 0.1, 0.0, -1.0, 0.5]), -1).view(1, 1, k).expand(m, 1, k)
    u = uniforms(m, rng.TOKEN, 1, k, seed0=12)
    freqs = []
    for s in (1.0, 1.5, 2.0, 4.0, 8.0, 32.0):
        tok = draw_tokens(lp, torch.full((m, 1), s), u)[:, 0]
        freqs.append((tok == 0).double().mean().item())
    assert all(a < b for a, b in zip(freqs, freqs[1:])), freqs
    assert freqs[-1] > 0.99 and freqs[0] < 0.4, freqs
    # per-position sharpen in one row: each position uses its own
    sh = torch.tensor([[1.0, 32.0]]).expand(m, 2)
    tok = draw_tokens(lp.expand(m, 2, k), sh, uniforms(m, rng.TOKEN, 2, k))
    f = (tok == 0).double().mean(0)
    assert f[0] < 0.4 and f[1] > 0.99, f


# ---------------------------------------------------------------------------------------------
# the whole step: rows are independent of their batch


def test_denoise_step_rows_independent_of_batch():
    k, n = 6, 12
    sched = Schedule(DiffusionConfig(num_classes=k))
    gen = torch.Generator().manual_seed(5)
    cond = torch.randn(3, n, k, generator=gen) * 3
    uncond = torch.randn(3, n, k, generator=gen) * 3
    x = torch.full((3, n), k)
    x[0, :4] = torch.tensor([0, 1, 2, 3])  # some positions already unmasked in the purity row
    rows = [
        dict(guidance_scale=3.0, truncation_rate=0.9, purity_weight=1.0, kind=PURITY, seed=2**40 + 3, step=2,
             count=3, t_eval=0),
        dict(guidance_scale=1.0, truncation_rate=1.0, purity_weight=0.0, kind=RANDOM, seed=9, step=0, count=5,
             t_eval=0),
        dict(guidance_scale=5.0, truncation_rate=1.0, purity_weight=0.0, kind=POSTERIOR, seed=4, step=7, count=0,
             t_eval=50),
    ]
    out = denoise_step(cond, uncond, x, BatchParams.build(rows, "cpu"), sched)
    for i in range(3):
        alone = denoise_step(cond[i : i + 1], uncond[i : i + 1], x[i : i + 1], BatchParams.build([rows[i]], "cpu"),
                             sched)
        assert torch.equal(alone.tokens[0], out.tokens[i]), i
        torch.testing.assert_close(alone.log_p[0], out.log_p[i])
    # selection rows: the frozen tokens stay, exactly ``count`` new ones
    assert torch.equal(out.tokens[0, :4], x[0, :4])
    assert int((out.tokens[0] != k).sum()) == 4 + 3
    assert int((out.tokens[1] != k).sum()) == 5
    assert bool((out.tokens[:2] <= k).all())


# ---------------------------------------------------------------------------------------------
# 7. counter-based uniforms


def test_uniform_rows_depend_only_on_their_counters():
    seed = torch.tensor([0, 5, 2**40 + 5, 2**63 - 1])
    step = torch.tensor([0, 3, 3, 99])
    for k in (None, 7):
        batch = rng.uniform(seed, step, rng.TOKEN, 10, k)
        assert batch.shape == ((4, 10) if k is None else (4, 10, 7)) and batch.dtype == torch.float32
        for i in range(4):
            assert torch.equal(rng.uniform(seed[i : i + 1], step[i : i + 1], rng.TOKEN, 10, k)[0], batch[i])
    # without a class axis, a longer row starts with the same numbers
    short, long_ = rng.uniform(seed, step, rng.SELECT, 5), rng.uniform(seed, step, rng.SELECT, 50)
    assert torch.equal(short, long_[:, :5])


def test_uniform_counters_all_matter():
    base = dict(seed=torch.tensor([123]), step=torch.tensor([4]), stream=rng.TOKEN)

    def u(seed=None, step=None, stream=None):
        return rng.uniform(base["seed"] if seed is None else torch.tensor([seed]),
                           base["step"] if step is None else torch.tensor([step]),
                           base["stream"] if stream is None else stream, 64, 3)

    ref = u()
    for other in (u(seed=124), u(seed=123 + 2**32), u(seed=123 + 2**62), u(step=5), u(step=1000),
                  u(stream=rng.SELECT), u(stream=rng.POSTERIOR)):
        assert (other != ref).double().mean() > 0.99
    # positions and classes differ too
    assert ref.flatten().unique().numel() == ref.numel()
    # the SELECT stream at (step) must not equal the TOKEN stream at any nearby step
    sel = rng.uniform(base["seed"], base["step"], rng.SELECT, 64)
    for st in range(0, 10):
        assert not torch.equal(sel, rng.uniform(base["seed"], torch.tensor([st]), rng.TOKEN, 64))


def test_uniform_streams_and_steps_share_no_numbers():
    """Within one seed, the numbers of every stream and step are distinct up to chance 24-bit
    coincidences (about 0.08 expected per seed here)."""
    seeds = torch.arange(200, dtype=torch.int64)
    parts = []
    for step in range(10):
        st = torch.full((200,), step, dtype=torch.int64)
        parts += [rng.uniform(seeds, st, rng.SELECT, 16), rng.uniform(seeds, st, rng.TOKEN, 16, 4).flatten(1),
                  rng.uniform(seeds, st, rng.POSTERIOR, 16, 5).flatten(1)]
    vals = torch.cat(parts, dim=1)  # (200, 1600)
    dups = sum(vals.shape[1] - vals[i].unique().numel() for i in range(200))
    assert dups < 60, dups


def test_uniform_select_and_token_streams_are_not_coupled():
    """The minimal case: the SELECT number of position 0 is not the TOKEN number of (position 0,
    class 1) at the same step."""
    seed, zero = torch.arange(50, dtype=torch.int64), torch.zeros(50, dtype=torch.int64)
    sel = rng.uniform(seed, zero, rng.SELECT, 1)[:, 0]
    tok = rng.uniform(seed, zero, rng.TOKEN, 1, 2)[:, 0, 1]
    assert int((sel == tok).sum()) == 0


def test_uniform_distribution():
    m = 100_000
    u = uniforms(1000, rng.TOKEN, 100, step=3).flatten().double()  # 1000 seeds x 100 positions
    assert u.numel() == m
    assert u.min().item() > 0.0 and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    # Kolmogorov-Smirnov against U(0, 1): D_n < 1.95 / sqrt(n) at alpha = 1e-3
    s = u.sort().values
    i = torch.arange(1, m + 1, dtype=torch.float64)
    d = torch.maximum(i / m - s, s - (i - 1) / m).max().item()
    assert d < 1.95 / math.sqrt(m), d
    # neighbouring positions, neighbouring seeds and the two streams are uncorrelated
    grid = uniforms(1000, rng.TOKEN, 100, step=3).double()
    other = uniforms(1000, rng.SELECT, 100, step=3).double()

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())

    assert abs(corr(grid[:, 1:], grid[:, :-1])) < 0.015
    assert abs(corr(grid[1:], grid[:-1])) < 0.015
    assert abs(corr(grid, other)) < 0.015
    # bits: 24-bit grid, every one of 256 bins about equally full
    counts = torch.bincount((u * 256).long().clamp(max=255), minlength=256)
    assert chi2_stat(counts, torch.full((256,), 1 / 256)) < 330  # df 255, alpha ~ 1e-3


def _unmix32(x: int) -> int:
    """The inverse of rng.mix32 on one 32-bit word (xorshifts undone, multipliers inverted mod 2^32)."""
    m = 2**32
    x ^= x >> 16
    x = (x * pow(0x846CA68B, -1, m)) % m
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * pow(0x7FEB352D, -1, m)) % m
    return x ^ (x >> 16)


def test_uniform_never_reaches_one():
    """A uniform of exactly 1.0 would give +inf Gumbel noise, and that class would win the argmax
    whatever its probability (a regression: a 24-bit grid plus 0.5 once rounded up to 1.0 in fp32).
    The largest and the smallest hash words are reached exactly (mix32 inverted), so the extreme
    uniforms the code can give are checked rather than hoped for among random draws; and at the
    ITHQ shape (N = 1024, K = 4096) every uniform is in (0, 1), every Gumbel finite, and a one-hot
    log p is always drawn as its one class."""
    assert all(_unmix32(int(rng.mix32(torch.tensor(v)))) == v for v in (0, 1, 2**31 + 5, 2**32 - 1))
    h = rng._row_state(torch.tensor([3]), torch.tensor([1]), rng.TOKEN)  # (1, 1, 1)
    hv = int(h)
    index = torch.tensor([[[(_unmix32(_unmix32(x) ^ hv) - hv) % 2**32 for x in (2**32 - 1, 0)]]])  # (1, 1, 2)
    u = rng._uniform(h, index)  # (1, 1, 2): from the largest and the smallest hash word
    assert u.tolist() == [[[1 - 2**-24, 2**-24]]]
    assert torch.isfinite(rng.gumbel(u)).all()
    one_hot = torch.tensor([[[LOG_MIN, 0.0]]])  # class 1 certain, the largest uniform on class 0
    assert draw_tokens(one_hot, torch.ones(1, 1), u).item() == 1
    lp = torch.full((1, 1024, 4096), LOG_MIN)
    lp[..., 0] = 0.0
    u = rng.uniform(torch.tensor([0]), torch.tensor([0]), rng.TOKEN, 1024, 4096)
    assert float(u.max()) < 1.0 and float(u.min()) > 0.0
    assert torch.isfinite(rng.gumbel(u)).all()
    assert (draw_tokens(lp, torch.ones(1, 1024), u) == 0).all()
