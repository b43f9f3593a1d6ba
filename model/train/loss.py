"""The training side of the diffusion: the loss of the official ``_train_loss``, the choice of t, and the
categorical KL both it and a teacher's term (``--teacher``: a fine-tune held to another model) take.

Only the trainers use these; the math they share with sampling (the schedule, q(x_t | x0), the
posterior) is model/diffusion.py, whose conventions hold here too: log-probabilities (B, N, C)
with classes last, a per-row ``t`` (B,) long, value checks on CPU tensors only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vqdiff.model.diffusion import (
    LOG_PROB_MIN,
    Schedule,
    _check_long,
    _check_range,
    _check_t,
    _fail,
    _work_dtype,
    log_onehot,
    posterior,
)


class LossTerms(NamedTuple):
    vb: torch.Tensor  # (B,) KL(q || p_theta) summed over positions; -log p(x0) at t = 0. Not / pt.
    aux: torch.Tensor  # (B,) cross-entropy of x0 summed over positions (same t = 0 substitution)


def training_loss(
    schedule: Schedule,
    log_x0_pred: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    pt: torch.Tensor | None = None,
    auxiliary_loss_weight: float | None = None,
    adaptive_auxiliary: bool = True,
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossTerms]:
    """Per-sample loss (B,) of the official ``_train_loss`` (mask_weight [1, 1]).

    ``log_x0_pred`` (B, N, K) log p_theta(x0 | x_t) (log-softmax of the network; clamped to
    [-70, 0] here, as the official ``predict_start`` does). ``x0`` (B, N) in [0, K), ``x_t``
    (B, N) in [0, K], ``t`` (B,) in [0, T).

        vb  = sum_n KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t))   (t > 0)
            = sum_n -log p_theta(x0 | x_t)                                (t = 0, decoder NLL)
        aux = sum_n -log p_theta(x0 | x_t)   (the KL between one-hot x0 and the prediction)
        loss = (vb + w * (2 - t / T if adaptive_auxiliary else 1) * aux) / pt

    ``w`` defaults to ``schedule.config.auxiliary_loss_weight`` (5e-4); the released configs set
    ``adaptive_auxiliary_loss: True``. ``pt`` (B,) defaults to 1. The official trainer passes
    pt = 1 / T for uniform t (``sample_timesteps``) or the importance probabilities
    (``ImportanceSampler``), i.e. a loss scaled by ~T; pass those pt to reproduce its scale.
    Summed over positions, NOT divided by N: the caller takes ``loss.sum() / (B * N)`` as the
    official code does. ``return_terms`` also returns the unweighted terms; ``LossTerms.vb`` is
    what ``ImportanceSampler.update`` wants.
    """
    K, T = schedule.num_classes, schedule.num_timesteps
    if log_x0_pred.dim() != 3 or log_x0_pred.shape[-1] != K:
        _fail(f"log_x0_pred must be (B, N, K) = (B, N, {K}), got {tuple(log_x0_pred.shape)}")
    B, N, _ = log_x0_pred.shape
    for name, x in (("x0", x0), ("x_t", x_t)):
        _check_long(x, name, 2)
        if x.shape != (B, N):
            _fail(f"{name} must be (B, N) = ({B}, {N}), got {tuple(x.shape)}")
    _check_range(x0, 0, K - 1, "x0")
    _check_t(t, B, 0, T - 1)
    if pt is not None and pt.shape != (B,):
        _fail(f"pt must be (B,) = ({B},), got {tuple(pt.shape)}")
    w = schedule.config.auxiliary_loss_weight if auxiliary_loss_weight is None else auxiliary_loss_weight

    log_x0_pred = log_x0_pred.to(_work_dtype(log_x0_pred)).clamp(LOG_PROB_MIN, 0.0)  # (B, N, K)
    log_model = posterior(schedule, log_x0_pred, x_t, t)  # (B, N, K+1) p_theta(x_{t-1} | x_t)
    with torch.no_grad():
        log_true = posterior(schedule, log_onehot(x0, K).to(log_model.dtype), x_t, t)  # (B, N, K+1)
    kl = categorical_kl(log_true, log_model)  # (B,)
    idx = x0.unsqueeze(-1)  # (B, N, 1)
    decoder_nll = -log_model.gather(-1, idx).squeeze(-1).sum(dim=-1)  # (B,) -log p(x_{-1} = x0) at t = 0
    ce = -log_x0_pred.gather(-1, idx).squeeze(-1).sum(dim=-1)  # (B,)

    at_zero = t == 0  # (B,)
    vb = torch.where(at_zero, decoder_nll, kl)  # (B,)
    aux = torch.where(at_zero, decoder_nll, ce)  # (B,)
    aux_scale = (2.0 - t.to(vb.dtype) / T) if adaptive_auxiliary else torch.ones_like(vb)  # (B,)
    loss = vb + w * aux_scale * aux  # (B,)
    if pt is not None:
        loss = loss / pt.to(loss.dtype)  # (B,)
    return (loss, LossTerms(vb, aux)) if return_terms else loss


def sample_timesteps(
    batch: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform t in [0, T): -> (t (B,) long, pt (B,) float32 = 1 / T), as the official code."""
    if batch < 1 or num_timesteps < 1:
        _fail(f"sample_timesteps needs batch >= 1 and num_timesteps >= 1, got {batch}, {num_timesteps}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=device)  # (B,)
    pt = torch.full((batch,), 1.0 / num_timesteps, device=device)  # (B,)
    return t, pt


class ImportanceSampler:
    """Importance sampling of t by loss history, as the official ``sample_time('importance')``.

    Keeps an EMA of vb^2 per timestep; until every t has been seen more than ``warmup`` times it
    samples uniformly. Then p(t) ~ sqrt(E[vb^2]) + 1e-4, with p(0) set to p(1) (the decoder term
    is on another scale). One difference from the official code: when a batch holds t several
    times, the EMA takes their mean (the official ``scatter_`` keeps an arbitrary one).
    ``sample`` reads ``warmed_up`` on the host: a training-loop sync, not an inference one.
    """

    def __init__(self, num_timesteps: int, warmup: int = 10, device: torch.device | str = "cpu") -> None:
        if num_timesteps < 2:
            _fail(f"ImportanceSampler needs num_timesteps >= 2, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.warmup = warmup
        self.lt_history = torch.zeros(num_timesteps, dtype=torch.float64, device=device)  # (T,) EMA of vb^2
        self.lt_count = torch.zeros(num_timesteps, dtype=torch.long, device=device)  # (T,)

    @property
    def warmed_up(self) -> bool:
        return bool((self.lt_count > self.warmup).all())

    def probs(self) -> torch.Tensor:
        """p(t) over [0, T) for the importance branch. (T,) float64."""
        lt_sqrt = torch.sqrt(self.lt_history + 1e-10) + 1e-4  # (T,)
        lt_sqrt = torch.cat([lt_sqrt[1:2], lt_sqrt[1:]])  # (T,) p(0) := p(1)
        return lt_sqrt / lt_sqrt.sum()  # (T,)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (t (B,) long, pt (B,) float32)."""
        device = self.lt_history.device
        if not self.warmed_up:
            return sample_timesteps(batch, self.num_timesteps, generator, device)
        p = self.probs()  # (T,)
        t = torch.multinomial(p, batch, replacement=True, generator=generator)  # (B,)
        return t, p[t].float()  # (B,), (B,)

    @torch.no_grad()
    def update(self, t: torch.Tensor, vb: torch.Tensor) -> None:
        """Record the unweighted per-sample vb (``LossTerms.vb``) of timesteps t (B,)."""
        _check_long(t, "t", 1)
        if vb.shape != t.shape:
            _fail(f"vb must match t's shape {tuple(t.shape)}, got {tuple(vb.shape)}")
        _check_range(t, 0, self.num_timesteps - 1, "t")
        t = t.to(self.lt_history.device)  # (B,)
        lt2 = vb.detach().to(self.lt_history).pow(2)  # (B,)
        sums = torch.zeros_like(self.lt_history).index_add_(0, t, lt2)  # (T,)
        counts = torch.zeros_like(self.lt_count).index_add_(0, t, torch.ones_like(t))  # (T,)
        mean = sums / counts.clamp(min=1)  # (T,)
        self.lt_history = torch.where(counts > 0, 0.1 * mean + 0.9 * self.lt_history, self.lt_history)  # (T,)
        self.lt_count = self.lt_count + counts  # (T,)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"lt_history": self.lt_history.clone(), "lt_count": self.lt_count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("lt_history", "lt_count"):
            cur = getattr(self, key)
            if key not in state or state[key].shape != cur.shape:
                _fail(f"ImportanceSampler state {key!r} must have shape {tuple(cur.shape)}")
            setattr(self, key, state[key].to(cur))


def categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of categorical distributions over the last axis, summed over positions: (B,).

    Both are log-probabilities (B, N, C); a class p gives no mass adds nothing (0 log 0 = 0), even
    where q gives it none. The posterior KL of ``training_loss`` and the teacher's term of
    ``vqdiff train transformer --teacher`` (KL(teacher || model) of the x0 predictions)."""
    if log_p.shape != log_q.shape:
        _fail(f"categorical_kl: shapes {tuple(log_p.shape)} and {tuple(log_q.shape)} differ")
    p = log_p.exp()  # (B, N, C)
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # (B, N, C)
    return terms.sum(dim=-1).sum(dim=-1)  # (B,)

__all__ = [
    "LossTerms",
    "training_loss",
    "sample_timesteps",
    "ImportanceSampler",
    "categorical_kl",
]

