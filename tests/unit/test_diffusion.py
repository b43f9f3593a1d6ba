"""Tests of model/diffusion.py: the schedule, q(x_t | x0), the posterior; and of the training loss
(model/train/loss.py).

Three kinds of reference: diffusers' ``VQDiffusionScheduler`` (parity with released numbers),
dense (K+1) x (K+1) transition matrices in float64 on a small schedule whose replace mass is
visible (independent math), and statistics of samples.
"""

from __future__ import annotations


import pytest
import torch

from vqdiff.model.config import DiffusionConfig
from vqdiff.model.diffusion import (
    LOG_ZERO,
    Schedule,
    log_onehot,
    mask_and_replace_schedule,
    posterior,
    q_probs,
    q_sample,
    timestep_for_mask_fraction,
)
from vqdiff.model.train.loss import ImportanceSampler, sample_timesteps, training_loss

K = 37  # deliberately not a power of two (the tiny preset's codebook)
RELEASED = DiffusionConfig(num_classes=K)
# A short schedule with a large uniform-replace mass (btt = 0.01), so the "replace" half of
# mask-and-replace is visible in dense checks and in samples; the released one has btt ~ 1e-8.
SMALL = DiffusionConfig(
    num_classes=5, num_timesteps=10, alpha_cum_start=0.9, alpha_cum_end=0.1, gamma_cum_start=0.05, gamma_cum_end=0.85
)


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule(RELEASED)


# ---------------------------------------------------------------------------------------------
# dense float64 references


def dense_step(s: Schedule, t: int) -> torch.Tensor:
    """Q_t[i, j] = q(x_t = j | x_{t-1} = i), (K+1, K+1) float64."""
    k = s.num_classes
    at, bt, ct = (getattr(s, n)[t].exp().item() for n in ("log_at", "log_bt", "log_ct"))
    q = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    q[:k, :k] = bt + at * torch.eye(k, dtype=torch.float64)
    q[:k, k] = ct
    q[k, k] = 1.0
    return q


def dense_cumulative(s: Schedule, t: int) -> torch.Tensor:
    """Qbar_t = Q_0 @ ... @ Q_t; Qbar_{-1} = I."""
    out = torch.eye(s.num_classes + 1, dtype=torch.float64)
    for i in range(t + 1):
        out = out @ dense_step(s, i)
    return out


def dense_posterior(s: Schedule, p0: torch.Tensor, x_t: int, t: int) -> torch.Tensor:
    """sum_x0 p(x0) q(x_{t-1} | x_t, x0) by Bayes, p0 (K,) -> (K+1,) probabilities."""
    k = s.num_classes
    prev, step, cur = dense_cumulative(s, t - 1), dense_step(s, t), dense_cumulative(s, t)
    out = torch.zeros(k + 1, dtype=torch.float64)
    for j in range(k):
        out += p0[j] * prev[j] * step[:, x_t] / cur[j, x_t]
    return out


# ---------------------------------------------------------------------------------------------
# 1. the schedule


def test_schedule_matches_diffusers(sched: Schedule) -> None:
    import numpy as np
    from diffusers import VQDiffusionScheduler
    from diffusers.schedulers.scheduling_vq_diffusion import alpha_schedules, gamma_schedules

    T = RELEASED.num_timesteps
    at, att = alpha_schedules(T)
    ct, ctt = gamma_schedules(T)
    bt, btt = (1 - at - ct) / K, (1 - att - ctt) / K
    # The probability tables, before any log: our code does the same IEEE-754 +, -, *, / (each
    # correctly rounded) in the same order as diffusers' numpy functions, so these bits are ours to
    # fix, and they must agree bit for bit.
    probs = mask_and_replace_schedule(RELEASED)
    for name, v in {"at": at, "bt": bt, "ct": ct, "att": att, "btt": btt, "ctt": ctt}.items():
        assert probs[name].dtype == torch.float64 and probs[name].shape == (T + 1,)
        assert torch.equal(probs[name][: len(v)], torch.from_numpy(v)), name

    # The log tables, float64, against numpy.log of diffusers' tables. torch.log and numpy.log are
    # two libm implementations, each with SIMD paths picked by the CPU, accurate to about an ulp:
    # their last bits may differ (on some CPUs they do, by one ulp), so rtol 1e-15 (4.5 to 9 ulp in
    # float64), atol 0. log(0) = -inf entries (index T) must match exactly, which assert_close checks.
    with np.errstate(divide="ignore"):
        expect = {
            "log_at": np.log(at), "log_bt": np.log(bt), "log_ct": np.log(ct),
            "log_cumprod_at": np.log(att), "log_cumprod_bt": np.log(btt), "log_cumprod_ct": np.log(ctt),
        }  # fmt: skip
    ref = VQDiffusionScheduler(num_vec_classes=K + 1)
    for name, v in expect.items():
        ours = getattr(sched, name)
        assert ours.dtype == torch.float64 and ours.shape == (T + 1,)
        torch.testing.assert_close(ours[: len(v)], torch.from_numpy(v), rtol=1e-15, atol=0, msg=name)
        # diffusers keeps float32 copies of torch.log of the same float64 tables. A last-bit
        # difference in the float64 log can move the rounding to float32 by one float32 ulp
        # (relative 2**-24 to 2**-23), so rtol 2**-23, atol 0.
        theirs = getattr(ref, name)
        torch.testing.assert_close(ours[: theirs.shape[0]].float(), theirs, rtol=2**-23, atol=0, msg=name)

    # Built twice from the same config in one process: the same bits (our own computation, with
    # the same inputs and shapes).
    again = Schedule(RELEASED)
    assert all(torch.equal(getattr(again, n), getattr(sched, n)) for n in Schedule.NAMES)


def test_schedule_identity_padding_and_consistency(sched: Schedule) -> None:
    T = RELEASED.num_timesteps
    e = lambda n: getattr(sched, n).exp()  # noqa: E731
    # index T: identity, per step and cumulative
    for n, v in (("log_at", 1.0), ("log_bt", 0.0), ("log_ct", 0.0), ("log_1_min_ct", 1.0)):
        assert e(n)[T].item() == v, n
    for n, v in (("log_cumprod_at", 1.0), ("log_cumprod_bt", 0.0), ("log_cumprod_ct", 0.0)):
        assert e(n)[T].item() == v, n
    assert sched.log_1_min_cumprod_ct[T].item() == 0.0
    # rows of the transition matrices sum to 1; 1 - c tables agree with c
    one = torch.ones(T + 1, dtype=torch.float64)
    torch.testing.assert_close(e("log_at") + K * e("log_bt") + e("log_ct"), one, rtol=0, atol=1e-12)
    cumulative_rows = e("log_cumprod_at") + K * e("log_cumprod_bt") + e("log_cumprod_ct")
    torch.testing.assert_close(cumulative_rows, one, rtol=0, atol=1e-12)
    torch.testing.assert_close(e("log_1_min_ct"), 1 - e("log_ct"), rtol=0, atol=1e-15)
    torch.testing.assert_close(e("log_1_min_cumprod_ct"), 1 - e("log_cumprod_ct"), rtol=0, atol=1e-15)
    # cumulative = product of the steps
    torch.testing.assert_close(torch.cumsum(sched.log_at[:T], 0), sched.log_cumprod_at[:T], rtol=0, atol=1e-9)
    log_keep = torch.cumsum(sched.log_1_min_ct[:T], 0)
    torch.testing.assert_close(log_keep, sched.log_1_min_cumprod_ct[:T], rtol=0, atol=1e-9)
    # released end points
    ctt = sched.mask_prob()
    assert ctt.shape == (T,) and abs(ctt[0].item() - 9e-6) < 1e-12 and abs(ctt[-1].item() - 0.99999) < 1e-12


def test_schedule_to_device_keeps_float64() -> None:
    s = Schedule(SMALL).to("meta")
    assert isinstance(s, Schedule) and s.device.type == "meta"
    assert all(getattr(s, n).dtype == torch.float64 for n in Schedule.NAMES)


def test_schedule_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="num_timesteps"):
        Schedule(DiffusionConfig(num_classes=5, num_timesteps=1))
    with pytest.raises(ValueError, match="outside"):  # att + ctt > 1: negative replace mass
        Schedule(DiffusionConfig(num_classes=5, alpha_cum_start=0.9, gamma_cum_start=0.2))


def test_q_probs_matches_dense_product_of_steps() -> None:
    s = Schedule(SMALL)
    k, T = s.num_classes, s.num_timesteps
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, k + 1, generator=g, dtype=torch.float64).softmax(-1)  # (3, 4, K+1) soft, some mask mass
    for t in range(T):
        ours = q_probs(s, x0.log(), torch.full((3,), t)).exp()  # (3, 4, K+1)
        torch.testing.assert_close(ours, x0 @ dense_cumulative(s, t), rtol=0, atol=1e-12)
    x0[1, 2] = torch.eye(k + 1, dtype=torch.float64)[k]  # a masked x0 stays masked
    for t in range(T):
        ours = q_probs(s, x0.log(), torch.full((3,), t)).exp()  # (3, 4, K+1)
        torch.testing.assert_close(ours, x0 @ dense_cumulative(s, t), rtol=0, atol=1e-12)
    for t in (-1, T):  # identity
        torch.testing.assert_close(q_probs(s, x0.log(), torch.full((3,), t)), x0.log(), rtol=0, atol=1e-12)
    # per-row t
    t = torch.tensor([0, 5, 9])
    rows = torch.stack([x0[i] @ dense_cumulative(s, int(t[i])) for i in range(3)])
    torch.testing.assert_close(q_probs(s, x0.log(), t).exp(), rows, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. the posterior


def random_case(k: int, b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    log_x0 = torch.log_softmax(torch.randn(b, n, k, generator=g), dim=-1)  # (B, N, K)
    x_t = torch.randint(0, k, (b, n), generator=g)  # (B, N)
    x_t[torch.rand(b, n, generator=g) < 0.5] = k  # half masked
    x_t[:, 0], x_t[:, 1] = k, 0  # both kinds in every row
    return log_x0, x_t


def test_posterior_matches_diffusers(sched: Schedule) -> None:
    from diffusers import VQDiffusionScheduler

    ref = VQDiffusionScheduler(num_vec_classes=K + 1)
    B, N = 3, 16
    log_x0, x_t = random_case(K, B, N, seed=1)
    for t in (1, 2, 50, 99):
        ours = posterior(sched, log_x0, x_t, torch.full((B,), t))  # (B, N, K+1)
        theirs = ref.q_posterior(log_x0.transpose(1, 2), x_t, t).transpose(1, 2)  # (B, N, K+1)
        # diffusers does not clamp; the released code and we clamp to [-70, 0]. Below -70 both are
        # "probability 0" (e^-70 ~ 4e-31); above it they must agree to fp32 rounding.
        assert ours.dtype == torch.float32 and ours.shape == (B, N, K + 1)
        torch.testing.assert_close(ours, theirs.clamp(-70, 0), rtol=0, atol=1e-4)


def test_posterior_per_row_t_equals_rows_alone(sched: Schedule) -> None:
    B, N = 4, 16
    log_x0, x_t = random_case(K, B, N, seed=2)
    t = torch.tensor([99, 1, 50, 0])
    together = posterior(sched, log_x0, x_t, t)  # (B, N, K+1)
    for i in range(B):
        alone = posterior(sched, log_x0[i : i + 1], x_t[i : i + 1], t[i : i + 1])  # (1, N, K+1)
        # torch's elementwise kernels (exp, log, logaddexp) may compute some elements on a scalar
        # path rather than the SIMD one, and which ones follows the tensor's size and the CPU's
        # vector width: a row alone and in a batch may differ in the last bits. A few float32 ulp
        # of log-probabilities down to -70 (one ulp there is 7.6e-6).
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=5e-5)
        # and each row is computed at its own t: another row's t changes it far beyond that
        other = posterior(sched, log_x0[i : i + 1], x_t[i : i + 1], t[(i + 1) % B : (i + 1) % B + 1])
        assert (other - alone).abs().max() > 1e-2


def test_posterior_matches_dense_bayes() -> None:
    s = Schedule(SMALL)
    k, T = s.num_classes, s.num_timesteps
    log_x0, x_t = random_case(k, T, 6, seed=3)
    log_x0, t = torch.log_softmax(log_x0.double(), -1), torch.arange(T)  # every t, one per row
    ours = posterior(s, log_x0, x_t, t).exp()  # (T, 6, K+1)
    assert ours.dtype == torch.float64
    for b in range(T):
        for n in range(6):
            expect = dense_posterior(s, log_x0[b, n].exp(), int(x_t[b, n]), b)
            torch.testing.assert_close(ours[b, n], expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.sum(-1), torch.ones(T, 6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_posterior_at_t0_is_log_x0(sched: Schedule) -> None:
    log_x0, x_t = random_case(K, 2, 16, seed=4)
    out = posterior(sched, log_x0, x_t, torch.zeros(2, dtype=torch.long))  # (2, 16, K+1)
    torch.testing.assert_close(out[..., :K], log_x0.clamp(min=-70), rtol=0, atol=1e-4)
    assert bool((out[..., K] <= -50).all())  # mask: e^-50 at most


def test_posterior_shape_errors(sched: Schedule) -> None:
    log_x0, x_t = random_case(K, 2, 16, seed=5)
    t = torch.tensor([3, 4])
    with pytest.raises(ValueError, match="mask row"):
        posterior(sched, torch.cat([log_x0, log_x0[..., :1]], -1), x_t, t)
    with pytest.raises(ValueError, match="x_t must be"):
        posterior(sched, log_x0, x_t[:, :8], t)
    with pytest.raises(ValueError, match="LongTensor"):
        posterior(sched, log_x0, x_t.float(), t)
    with pytest.raises(ValueError, match="entries"):
        posterior(sched, log_x0, x_t, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        posterior(sched, log_x0, x_t, torch.tensor([3, 100]))
    with pytest.raises(ValueError, match="x_t must lie"):
        posterior(sched, log_x0, x_t + 1, t)


# ---------------------------------------------------------------------------------------------
# 3. fraction -> timestep


def test_timestep_for_mask_fraction(sched: Schedule) -> None:
    f = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.0])
    assert timestep_for_mask_fraction(sched, f).tolist() == [99, 89, 50, 10, 0]
    assert timestep_for_mask_fraction(sched, f.double()).dtype == torch.long
    with pytest.raises(ValueError):
        timestep_for_mask_fraction(sched, torch.tensor([[0.5]]))


# ---------------------------------------------------------------------------------------------
# 4. sampling the forward process


def test_q_sample_mask_fraction_follows_ctt(sched: Schedule) -> None:
    B, N = 4, 20000
    g = torch.Generator().manual_seed(6)
    x0 = torch.randint(0, K, (B, N), generator=g)
    t = torch.tensor([0, 30, 70, 99])
    x_t = q_sample(sched, x0, t, generator=g)  # (B, N)
    assert x_t.shape == (B, N) and x_t.dtype == torch.long
    ctt = sched.mask_prob()[t]  # (B,)
    masked = (x_t == K).sum(1).double()  # (B,)
    tol = 5 * torch.sqrt(N * ctt * (1 - ctt)) + 3
    assert bool(((masked - N * ctt).abs() <= tol).all()), (masked, N * ctt)
    assert masked[0] <= 5 and masked[3] >= N - 5  # t = 0: almost none; t = 99: almost all
    kept = x_t != K
    assert (x_t[kept] != x0[kept]).double().mean() < 1e-3  # released replace mass is ~1e-6


def test_q_sample_distribution_matches_q_probs() -> None:
    s = Schedule(SMALL)
    k, N = s.num_classes, 200000
    x0 = torch.full((2, N), 2)
    t = torch.tensor([3, 7])
    x_t = q_sample(s, x0, t, generator=torch.Generator().manual_seed(7))
    expect = q_probs(s, log_onehot(x0[:, :1], k + 1).double(), t).exp()[:, 0]  # (2, K+1)
    counts = torch.stack([torch.bincount(x_t[i], minlength=k + 1) for i in range(2)]).double()  # (2, K+1)
    tol = 5 * torch.sqrt(N * expect * (1 - expect)) + 3
    assert bool(((counts - N * expect).abs() <= tol).all()), (counts / N, expect)


def test_q_sample_identity_and_supplied_uniforms(sched: Schedule) -> None:
    x0 = torch.randint(0, K, (2, 64), generator=torch.Generator().manual_seed(8))
    assert torch.equal(q_sample(sched, x0, torch.tensor([-1, 100])), x0)
    u = torch.full((2, 64, 2), 0.999)
    assert torch.equal(q_sample(sched, x0, torch.tensor([0, 50]), uniform=u), x0)
    u[..., 0] = 0.0
    assert bool((q_sample(sched, x0, torch.tensor([0, 50]), uniform=u) == K).all())
    with pytest.raises(ValueError, match="uniform"):
        q_sample(sched, x0, torch.tensor([0, 50]), uniform=u[..., :1])
    with pytest.raises(ValueError, match="x0 must lie"):
        q_sample(sched, x0 + K, torch.tensor([0, 50]))


def test_log_onehot() -> None:
    x = torch.tensor([[0, 2], [1, 1]])
    out = log_onehot(x, 3)  # (2, 2, 3)
    assert out.shape == (2, 2, 3) and out.dtype == torch.float32
    assert torch.equal(out.argmax(-1), x)
    assert out.max().item() == 0.0 and out.min().item() == pytest.approx(LOG_ZERO)
    # diffusers' log one-hot: torch.log of float32(1e-30); ours holds LOG_ZERO, math.log(1e-30) in
    # float64 rounded to float32. Two libms on two slightly different inputs: one float32 ulp at
    # 69 (7.6e-6) apart at most; the zeros are exact
    theirs = torch.log(torch.nn.functional.one_hot(x, 3).float().clamp(min=1e-30))
    torch.testing.assert_close(out, theirs, rtol=0, atol=8e-6)
    assert torch.equal(out == 0, theirs == 0)


# ---------------------------------------------------------------------------------------------
# 5. the training loss


def loss_case(sched: Schedule, seed: int) -> tuple[torch.Tensor, ...]:
    B, N = 6, 32
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K, (B, N), generator=g)
    t = torch.tensor([0, 1, 10, 50, 90, 99])
    x_t = q_sample(sched, x0, t, generator=g)
    noise = torch.randn(B, N, K, generator=g)
    return x0, x_t, t, noise


def test_training_loss_perfect_prediction_is_zero(sched: Schedule) -> None:
    x0, x_t, t, _ = loss_case(sched, seed=9)
    loss = training_loss(sched, log_onehot(x0, K), x0, x_t, t)
    assert loss.shape == (6,)
    assert bool((loss.abs() < 1e-3).all()), loss


def test_training_loss_decreases_towards_truth_and_has_gradient(sched: Schedule) -> None:
    x0, x_t, t, noise = loss_case(sched, seed=10)
    onehot = torch.nn.functional.one_hot(x0, K).float()  # (B, N, K)
    totals = []
    for strength in (0.0, 2.0, 4.0, 8.0, 16.0):
        logits = (noise + strength * onehot).requires_grad_(True)  # (B, N, K)
        loss = training_loss(sched, torch.log_softmax(logits, -1), x0, x_t, t)  # (B,)
        assert bool(torch.isfinite(loss).all()) and bool((loss > -1e-3).all()), loss
        loss.sum().backward()
        assert bool(torch.isfinite(logits.grad).all())
        assert bool((logits.grad.abs().sum(dim=(1, 2)) > 0).all())  # every row, t = 0 included
        totals.append(loss.sum().item())
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


def test_training_loss_terms_match_the_official_definition() -> None:
    s = Schedule(SMALL)
    k, T = s.num_classes, s.num_timesteps
    B, N = T, 3
    g = torch.Generator().manual_seed(11)
    x0 = torch.randint(0, k, (B, N), generator=g)
    t = torch.arange(T)
    x_t = q_sample(s, x0, t, generator=g)
    log_pred = torch.log_softmax(torch.randn(B, N, k, generator=g, dtype=torch.float64), -1)
    pt = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    loss, terms = training_loss(s, log_pred, x0, x_t, t, pt=pt, auxiliary_loss_weight=0.1, return_terms=True)
    for b in range(B):
        vb, aux = 0.0, 0.0
        for n in range(N):
            nll = -log_pred[b, n, x0[b, n]].item()
            if b == 0:
                vb, aux = vb + nll, aux + nll
                continue
            true = dense_posterior(s, torch.eye(k, dtype=torch.float64)[x0[b, n]], int(x_t[b, n]), b)
            model = dense_posterior(s, log_pred[b, n].exp(), int(x_t[b, n]), b)
            keep = true > 0
            vb += (true[keep] * (true[keep].log() - model[keep].log())).sum().item()
            aux += nll
        assert terms.vb[b].item() == pytest.approx(vb, abs=1e-9)
        assert terms.aux[b].item() == pytest.approx(aux, abs=1e-9)
        expect = (vb + 0.1 * (2 - b / T) * aux) / pt[b].item()
        assert loss[b].item() == pytest.approx(expect, abs=1e-9)
    no_adapt = training_loss(s, log_pred, x0, x_t, t, auxiliary_loss_weight=0.1, adaptive_auxiliary=False)
    torch.testing.assert_close(no_adapt, terms.vb + 0.1 * terms.aux)


def test_training_loss_shape_errors(sched: Schedule) -> None:
    x0, x_t, t, noise = loss_case(sched, seed=12)
    with pytest.raises(ValueError, match="log_x0_pred"):
        training_loss(sched, noise[..., :-1], x0, x_t, t)
    with pytest.raises(ValueError, match="x_t must be"):
        training_loss(sched, noise, x0, x_t[:, :4], t)
    with pytest.raises(ValueError, match="pt must be"):
        training_loss(sched, noise, x0, x_t, t, pt=torch.ones(2))
    with pytest.raises(ValueError, match="x0 must lie"):
        training_loss(sched, noise, x_t, x_t, t)  # x_t holds MASK_ID


# ---------------------------------------------------------------------------------------------
# timestep sampling


def test_sample_timesteps_uniform() -> None:
    t, pt = sample_timesteps(4000, 100, torch.Generator().manual_seed(13))
    assert t.shape == pt.shape == (4000,) and t.dtype == torch.long
    assert 0 <= t.min().item() and t.max().item() <= 99 and len(t.unique()) > 90
    assert torch.equal(pt, torch.full((4000,), 0.01))


def test_importance_sampler() -> None:
    T = 5
    sampler = ImportanceSampler(T, warmup=2)
    g = torch.Generator().manual_seed(14)
    t, pt = sampler.sample(8, g)
    assert torch.equal(pt, torch.full((8,), 1 / T))  # uniform until every t is seen > warmup times

    sampler.update(torch.tensor([1, 1]), torch.tensor([1.0, 3.0]))  # duplicates: EMA of their mean
    assert sampler.lt_history[1].item() == pytest.approx(0.1 * (1 + 9) / 2)
    assert sampler.lt_count.tolist() == [0, 2, 0, 0, 0]

    sampler = ImportanceSampler(T, warmup=2)
    ts = torch.arange(T)
    for _ in range(200):
        sampler.update(ts, (ts + 1).double())  # vb = t + 1
    assert sampler.warmed_up
    p = sampler.probs()
    expect = torch.tensor([2.0, 2, 3, 4, 5], dtype=torch.float64) + 1e-4  # sqrt(vb^2), p(0) := p(1)
    torch.testing.assert_close(p, expect / expect.sum(), rtol=1e-6, atol=0)
    t, pt = sampler.sample(20000, g)
    torch.testing.assert_close(pt, p[t].float())
    freq = torch.bincount(t, minlength=T).double() / 20000
    torch.testing.assert_close(freq, p, rtol=0, atol=0.02)

    clone = ImportanceSampler(T, warmup=2)
    clone.load_state_dict(sampler.state_dict())
    assert torch.equal(clone.probs(), p)
    with pytest.raises(ValueError):
        clone.load_state_dict({"lt_history": torch.zeros(3), "lt_count": torch.zeros(3)})


def test_categorical_kl_is_the_kl_summed_over_positions():
    from vqdiff.model.train.loss import categorical_kl

    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)  # (B, N, K)
    q = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)
    want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(dim=(1, 2))
    torch.testing.assert_close(categorical_kl(p, q), want)
    assert torch.equal(categorical_kl(p, p), torch.zeros(3))
    p0 = p.clone()
    p0[..., 0] = float("-inf")  # a class with no teacher mass adds nothing, even where the model gives it none
    q0 = q.clone()
    q0[..., 0] = float("-inf")
    assert torch.isfinite(categorical_kl(p0, q0)).all()
    with pytest.raises(ValueError, match="shapes"):
        categorical_kl(p, q[:, :4])
