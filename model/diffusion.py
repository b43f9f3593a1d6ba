"""Discrete mask-and-replace diffusion: the schedule, q(x_t | x0), the posterior.

The math of VQ-Diffusion (Gu et al. 2022) as released by Microsoft (docs/DESIGN.md section 2); the
code is our own. Conventions used by every function here:

* K token classes (ids 0..K-1); ``MASK_ID = K``.
* Log-probability tensors are (B, N, C): batch, positions, classes LAST (C = K or K + 1). This is
  the transpose of diffusers' and the official code's (B, C, N) layout: it keeps the class axis
  contiguous for softmax / logsumexp / sampling and matches the transformer's output.
* ``t`` is a per-sample LongTensor (B,). Every function takes a different t per row; there are
  no per-row Python loops and no ``.item()``. Timesteps are 0-based as in the official code:
  x_t at t = 0 has already had one corruption step, and index T of the cumulative tables is the
  "nothing happened yet" identity, so ``q(x_{t-1} | x0)`` at t = 0 is x0 itself.
* Log-probabilities are clamped to [-70, 0] where the official code clamps (posterior outputs);
  "log 0" for one-hot vectors is log(1e-30) = -69.08 (``LOG_ZERO``), as in both reference codes.
* Value checks (token ids in range, t in range) run only for CPU tensors: on an accelerator they
  would cost a host sync per call. Shape and dtype checks always run.
"""

from __future__ import annotations

import math

import torch

from vqdiff.model.config import DiffusionConfig

LOG_ZERO = math.log(1e-30)  # "log 0" of a clamped one-hot vector, -69.08
LOG_PROB_MIN = -70.0  # the official clamp floor for log-probabilities


# ---------------------------------------------------------------------------------------------
# checks


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_long(x: torch.Tensor, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != ndim:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        _fail(f"{name} must be a {ndim}-d LongTensor, got {desc}")


def _check_range(x: torch.Tensor, lo: int, hi: int, name: str) -> None:
    """lo <= x <= hi, checked on CPU only (a host sync on an accelerator)."""
    if x.device.type == "cpu" and x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
        _fail(f"{name} must lie in [{lo}, {hi}], got values in [{int(x.min())}, {int(x.max())}]")


def _check_t(t: torch.Tensor, batch: int, lo: int, hi: int) -> None:
    _check_long(t, "t", 1)
    if t.shape[0] != batch:
        _fail(f"t has {t.shape[0]} entries for a batch of {batch}")
    _check_range(t, lo, hi, "t")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp16/bf16 cannot hold the ~1e-8 replace probabilities: compute in at least fp32."""
    return torch.promote_types(x.dtype, torch.float32)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------
# the schedule


def mask_and_replace_schedule(cfg: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The released ``alpha_schedule`` in float64; every table has T + 1 entries.

    Cumulative (x0 -> x_t): ``att`` (keep) falls and ``ctt`` (mask) rises linearly over t = 0..T-1;
    ``btt = (1 - att - ctt) / K`` is the probability of each particular replacement class. Entry T
    is the identity (att = 1, btt = 0, ctt = 0), which ``q(x_{t-1} | x0)`` at t = 0 looks up.
    Per step (x_{t-1} -> x_t): ``at = att[t] / att[t-1]``, ``1 - ct = (1 - ctt[t]) / (1 - ctt[t-1])``
    with att[-1] = 1, ctt[-1] = 0. The official code keeps T per-step entries; we pad index T with
    the identity too so all eight tables share one length.
    """
    T, K = cfg.num_timesteps, cfg.num_classes
    if T < 2:
        _fail(f"DiffusionConfig.num_timesteps must be >= 2, got {T}")
    if K < 1:
        _fail(f"DiffusionConfig.num_classes must be >= 1, got {K}")
    f64 = torch.float64
    ramp = torch.arange(T, dtype=f64) / (T - 1)  # (T,)
    att = ramp * (cfg.alpha_cum_end - cfg.alpha_cum_start) + cfg.alpha_cum_start  # (T,)
    ctt = ramp * (cfg.gamma_cum_end - cfg.gamma_cum_start) + cfg.gamma_cum_start  # (T,)
    one, zero = torch.ones(1, dtype=f64), torch.zeros(1, dtype=f64)
    att_prev = torch.cat([one, att[:-1]])  # (T,) att[t-1], with att[-1] = 1
    ctt_prev = torch.cat([zero, ctt[:-1]])  # (T,)
    at = att / att_prev  # (T,)
    ct = 1 - (1 - ctt) / (1 - ctt_prev)  # (T,)
    bt = (1 - at - ct) / K  # (T,)
    btt = (1 - att - ctt) / K  # (T,)
    for name, v in (("at", at), ("ct", ct), ("bt", bt), ("att", att), ("ctt", ctt), ("btt", btt)):
        if not bool(((v >= 0) & (v <= 1)).all()):
            _fail(f"DiffusionConfig {cfg} gives {name} outside [0, 1]: {v.tolist()}")
    pad = lambda v, x: torch.cat([v, torch.full((1,), x, dtype=f64)])  # noqa: E731  (T+1,)
    return {
        "at": pad(at, 1.0), "bt": pad(bt, 0.0), "ct": pad(ct, 0.0),
        "att": pad(att, 1.0), "btt": pad(btt, 0.0), "ctt": pad(ctt, 0.0),
    }  # fmt: skip


class Schedule:
    """Log tables of the mask-and-replace process, float64, each (T + 1,); index T = identity.

    A plain class, not an ``nn.Module``: ``module.to(torch.bfloat16)`` on a model holding it must
    not round these tables. ``.to(device)`` returns a moved copy. log(0) entries (bt, btt, ct, ctt
    at index T) are -inf, exactly as ``torch.log`` gives in the released code; the functions below
    only ever combine them through ``logaddexp`` or a final clamp, so they stay NaN-free.
    """

    NAMES = (
        "log_at", "log_bt", "log_ct", "log_1_min_ct",
        "log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct", "log_1_min_cumprod_ct",
    )  # fmt: skip

    def __init__(self, config: DiffusionConfig, device: torch.device | str | None = None) -> None:
        self.config = config
        self.num_classes = config.num_classes  # K
        self.num_timesteps = config.num_timesteps  # T
        self.mask_id = config.num_classes
        s = mask_and_replace_schedule(config)
        self.log_at = torch.log(s["at"])  # (T+1,)
        self.log_bt = torch.log(s["bt"])  # (T+1,)
        self.log_ct = torch.log(s["ct"])  # (T+1,)
        self.log_1_min_ct = torch.log1p(-s["ct"])  # (T+1,)
        self.log_cumprod_at = torch.log(s["att"])  # (T+1,)
        self.log_cumprod_bt = torch.log(s["btt"])  # (T+1,)
        self.log_cumprod_ct = torch.log(s["ctt"])  # (T+1,)
        self.log_1_min_cumprod_ct = torch.log1p(-s["ctt"])  # (T+1,)
        if device is not None:
            for name in self.NAMES:
                setattr(self, name, getattr(self, name).to(device))

    @property
    def device(self) -> torch.device:
        return self.log_at.device

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(self.config, device)

    def mask_prob(self) -> torch.Tensor:
        """ctt[t] for t in [0, T): the expected masked fraction of x_t. (T,) float64."""
        return self.log_cumprod_ct[: self.num_timesteps].exp()  # (T,)

    def gather(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Table ``name`` at per-row t, shaped (B, 1, 1) for broadcasting over (B, N, C)."""
        return getattr(self, name)[t].to(dtype).view(-1, 1, 1)  # (B, 1, 1)

    def __repr__(self) -> str:
        return f"Schedule(K={self.num_classes}, T={self.num_timesteps}, device={self.device})"


# ---------------------------------------------------------------------------------------------
# the forward process


def log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log(clamp(onehot(x), 1e-30)): (B, N) long -> (B, N, num_classes) float32.

    Built with scatter rather than ``F.one_hot``, whose CUDA range check syncs with the host.
    """
    _check_long(x, "x", 2)
    _check_range(x, 0, num_classes - 1, "x")
    out = torch.full((*x.shape, num_classes), LOG_ZERO, dtype=torch.float32, device=x.device)  # (B, N, C)
    return out.scatter_(-1, x.unsqueeze(-1), 0.0)  # (B, N, C)


def timestep_for_mask_fraction(schedule: Schedule, fraction: torch.Tensor) -> torch.Tensor:
    """argmin_t |fraction - ctt[t]| over t in [0, T): (B,) float -> (B,) long (docs/DESIGN.md sections 2 and 6)."""
    if not isinstance(fraction, torch.Tensor) or fraction.dim() != 1 or not fraction.is_floating_point():
        _fail(f"fraction must be a 1-d float tensor, got {getattr(fraction, 'shape', type(fraction))}")
    ctt = schedule.mask_prob().to(fraction.device)  # (T,) float64
    dist = (fraction.to(torch.float64).unsqueeze(1) - ctt.unsqueeze(0)).abs()  # (B, T)
    return dist.argmin(dim=1)  # (B,) first minimum on ties


def q_probs(schedule: Schedule, log_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log q(x_t | x0) = log(x0 @ Qbar_t) for a (possibly soft) log_x0 (B, N, K+1) -> (B, N, K+1).

    Non-mask class j: att * x0_j + btt * (1 - x0_mask); mask: ctt + (1 - ctt) * x0_mask.
    The released ``q_pred`` writes btt where we write btt * (1 - x0_mask): the same numbers for
    any x0 without mask mass (one-hot x0 has 1e-30 there), and exact for the others too.
    t may be in [-1, T]; -1 and T are the identity (returns log_x0 unchanged).
    """
    K, T = schedule.num_classes, schedule.num_timesteps
    if log_x0.dim() != 3 or log_x0.shape[-1] != K + 1:
        _fail(f"log_x0 must be (B, N, K+1) = (B, N, {K + 1}), got {tuple(log_x0.shape)}")
    _check_t(t, log_x0.shape[0], -1, T)
    t = t % (T + 1)  # (B,) -1 -> T
    dt = _work_dtype(log_x0)
    log_x0 = log_x0.to(dt)  # (B, N, K+1)
    a = schedule.gather("log_cumprod_at", t, dt)  # (B, 1, 1)
    b = schedule.gather("log_cumprod_bt", t, dt)  # (B, 1, 1)
    c = schedule.gather("log_cumprod_ct", t, dt)  # (B, 1, 1)
    one_min_c = schedule.gather("log_1_min_cumprod_ct", t, dt)  # (B, 1, 1)
    b = b + _log1mexp(log_x0[..., K:])  # (B, N, 1) btt * (1 - x0_mask)
    tokens = torch.logaddexp(log_x0[..., :K] + a, b)  # (B, N, K)
    mask = torch.logaddexp(log_x0[..., K:] + one_min_c, c)  # (B, N, 1)
    return torch.cat([tokens, mask], dim=-1)  # (B, N, K+1)


def q_sample(
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0) for token ids x0 (B, N) in [0, K): -> x_t (B, N) long.

    Exact and O(B N) instead of a Gumbel-max over (B, N, K+1): with u = uniform[..., 0],
      u < ctt                -> MASK_ID
      u < ctt + K * btt      -> class floor(uniform[..., 1] * K) (uniform replacement, may be x0)
      otherwise              -> x0
    so P(x0) = att + btt, P(j != x0) = btt, P(mask) = ctt: exactly q(x_t | x0).
    ``uniform`` (B, N, 2) in [0, 1) comes from the caller (e.g. counter-based per-request bits);
    if None it is drawn with ``torch.rand(generator=generator)``. t in [-1, T]; -1 and T: x_t = x0.
    """
    K, T = schedule.num_classes, schedule.num_timesteps
    _check_long(x0, "x0", 2)
    _check_range(x0, 0, K - 1, "x0")
    B, N = x0.shape
    _check_t(t, B, -1, T)
    if uniform is None:
        uniform = torch.rand((B, N, 2), generator=generator, device=x0.device)  # (B, N, 2)
    elif uniform.shape != (B, N, 2):
        _fail(f"uniform must be (B, N, 2) = ({B}, {N}, 2), got {tuple(uniform.shape)}")
    t = t % (T + 1)  # (B,)
    ctt = schedule.log_cumprod_ct[t].exp().view(B, 1)  # (B, 1) float64
    k_btt = schedule.log_cumprod_bt[t].exp().view(B, 1) * K  # (B, 1) float64
    u = uniform[..., 0].to(torch.float64)  # (B, N)
    replacement = (uniform[..., 1] * K).long().clamp_(0, K - 1)  # (B, N)
    x_t = torch.where(u < ctt + k_btt, replacement, x0)  # (B, N)
    return torch.where(u < ctt, torch.full_like(x0, K), x_t)  # (B, N)


# ---------------------------------------------------------------------------------------------
# the reverse process


def posterior(schedule: Schedule, log_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log p(x_{t-1} | x_t) = log sum_x0 q(x_{t-1} | x_t, x0) p(x0): (B, N, K) -> (B, N, K+1).

    ``log_x0`` (B, N, K): log p(x0 | x_t) over the K token classes (no mask row; one-hot x0 gives
    the true posterior q(x_{t-1} | x_t, x0)). ``x_t`` (B, N) in [0, K]. ``t`` (B,) in [0, T).
    The same math as diffusers' ``VQDiffusionScheduler.q_posterior`` and the official
    ``q_posterior``: with q_j = p(x0 = j) / q(x_t | x0 = j) and S = sum_j q_j,
        p(x_{t-1} = k | x_t) = S * (q / S @ Qbar_{t-1})_k * q(x_t | x_{t-1} = k).
    At t = 0, Qbar_{-1} is the identity (table index T) and the result equals log_x0 up to
    rounding (mask class -70), so rows at t = 0 may share a batch with the others; a caller may
    equally use log_x0 directly there, as diffusers does. Output clamped to [-70, 0] as released.
    Skip-step sampling evaluates this at a t other than x_t's own noise level; that is allowed.
    """
    K, T = schedule.num_classes, schedule.num_timesteps
    if log_x0.dim() != 3 or log_x0.shape[-1] != K:
        hint = " (drop the mask row)" if log_x0.dim() == 3 and log_x0.shape[-1] == K + 1 else ""
        _fail(f"log_x0 must be (B, N, K) = (B, N, {K}){hint}, got {tuple(log_x0.shape)}")
    B, N, _ = log_x0.shape
    _check_long(x_t, "x_t", 2)
    if x_t.shape != (B, N):
        _fail(f"x_t must be (B, N) = ({B}, {N}), got {tuple(x_t.shape)}")
    _check_range(x_t, 0, K, "x_t")
    _check_t(t, B, 0, T - 1)
    dt = _work_dtype(log_x0)
    log_x0 = log_x0.to(dt)  # (B, N, K)
    t_prev = (t - 1) % (T + 1)  # (B,) 0 -> T, the identity

    is_mask = (x_t == K).unsqueeze(-1)  # (B, N, 1)
    classes = torch.arange(K, device=x_t.device)  # (K,)
    log_oh = torch.where(classes == x_t.unsqueeze(-1), 0.0, LOG_ZERO).to(dt)  # (B, N, K) log one-hot of x_t

    # q(x_t | x0 = j), j < K: att + btt on the diagonal, btt off it, ctt for a masked x_t.
    # logaddexp(log_oh + a, b) rather than a where(): finite even if a schedule has btt = 0.
    a, b, c = (schedule.gather(n, t, dt) for n in ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"))
    log_q_xt_x0 = torch.where(is_mask, c, torch.logaddexp(log_oh + a, b))  # (B, N, K)

    # q(x_t | x_{t-1} = k), k <= K: one step. From the mask class only a masked x_t is reachable.
    a1, b1, c1 = (schedule.gather(n, t, dt) for n in ("log_at", "log_bt", "log_ct"))
    step_tokens = torch.where(is_mask, c1, torch.logaddexp(log_oh + a1, b1))  # (B, N, K)
    step_mask = torch.where(is_mask, 0.0, LOG_ZERO).to(dt)  # (B, N, 1)
    log_q_step = torch.cat([step_tokens, step_mask], dim=-1)  # (B, N, K+1)

    q = log_x0 - log_q_xt_x0  # (B, N, K)
    log_s = torch.logsumexp(q, dim=-1, keepdim=True)  # (B, N, 1)
    q = q - log_s  # (B, N, K) normalised: sums to 1 over the K classes

    # q / S @ Qbar_{t-1}: tokens att * q_j + btt (sum q = 1); mask ctt.
    ap, bp, cp = (schedule.gather(n, t_prev, dt) for n in ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"))
    prev_tokens = torch.logaddexp(q + ap, bp)  # (B, N, K)
    prev_mask = cp.expand(B, N, 1)  # (B, N, 1) -inf at t = 0: nothing was masked before step 0
    log_prev = torch.cat([prev_tokens, prev_mask], dim=-1)  # (B, N, K+1)

    out = log_prev + log_q_step + log_s  # (B, N, K+1)
    return out.clamp(LOG_PROB_MIN, 0.0)  # (B, N, K+1)


__all__ = [
    "LOG_ZERO",
    "LOG_PROB_MIN",
    "mask_and_replace_schedule",
    "Schedule",
    "log_onehot",
    "timestep_for_mask_fraction",
    "q_probs",
    "q_sample",
    "posterior",
]
