"""One denoising step over a batch of requests: guidance, truncation, purity, selection, draw.

Every function is vectorised over B rows, each with its own parameters and its own step; there
are no per-row Python loops and no host syncs. These torch functions are the reference the Triton
kernels (issue 6) must equal.

Layout: logits and log-probs are (B, N, K), classes last; tokens are (B, N) with MASK_ID = K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model import rng
from model.diffusion import Schedule, posterior

LOG_MIN = -70.0  # the released code's floor for log-probabilities

# Per-row sampler kinds (BatchParams.kind)
PURITY, RANDOM, POSTERIOR = 0, 1, 2


@dataclass(frozen=True)
class BatchParams:
    """Per-row parameters of one step, as tensors on the model's device. Built on the host from the
    requests' own values, so which kinds are present (``kinds``) is known without a device sync."""

    guidance_scale: Tensor  # (B,) float
    truncation_rate: Tensor  # (B,) float
    purity_weight: Tensor  # (B,) float; 0 for the random sampler
    kind: Tensor  # (B,) long: PURITY, RANDOM or POSTERIOR
    seed: Tensor  # (B,) int64
    step: Tensor  # (B,) int64: the request's own step index (its randomness counter)
    count: Tensor  # (B,) long: tokens to unmask this step (selection samplers)
    t_eval: Tensor  # (B,) long: timestep at which the posterior is evaluated (posterior samplers)
    kinds: frozenset[int]  # host-side: the kinds present in this batch

    @classmethod
    def build(cls, rows: list[dict], device: torch.device | str) -> BatchParams:
        def col(name: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([r[name] for r in rows], dtype=dtype, device=device)

        return cls(
            guidance_scale=col("guidance_scale", torch.float32),
            truncation_rate=col("truncation_rate", torch.float32),
            purity_weight=col("purity_weight", torch.float32),
            kind=col("kind", torch.long),
            seed=col("seed", torch.int64),
            step=col("step", torch.int64),
            count=col("count", torch.long),
            t_eval=col("t_eval", torch.long),
            kinds=frozenset(r["kind"] for r in rows),
        )


def guided_log_probs(cond: Tensor, uncond: Tensor, guidance_scale: Tensor) -> Tensor:
    """Eq. 7 in the released convention on raw logits: uncond + g * (cond - uncond), normalised.

    cond, uncond: (B, N, K) logits; guidance_scale: (B,). Combining logits and normalising once is the
    same as combining log-probs (the per-position logsumexp terms are constants). Returns fp32
    log-probs clamped to [-70, 0] as released.
    """
    g = guidance_scale.view(-1, 1, 1).to(torch.float32)  # (B, 1, 1)
    uncond = uncond.float()
    logits = uncond + g * (cond.float() - uncond)  # (B, N, K)
    return torch.log_softmax(logits, dim=-1).clamp(LOG_MIN, 0.0)  # (B, N, K)


def truncate(log_p: Tensor, truncation_rate: Tensor) -> Tensor:
    """Keep, per position, the most likely classes while the mass before them is below r (so the top-1
    is always kept and the kept mass is at least r); the rest become -70. Not re-normalised.

    log_p: (B, N, K); truncation_rate: (B,). Rows with r = 1 are unchanged.
    """
    sorted_lp, order = torch.sort(log_p, dim=-1, descending=True)  # (B, N, K)
    mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()  # (B, N, K) exclusive cumsum
    r = truncation_rate.view(-1, 1, 1)
    keep_sorted = (mass_before < r) | (r >= 1.0)  # (B, N, K)
    keep_sorted[..., 0] = True
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)  # back to class order
    return torch.where(keep, log_p, torch.full_like(log_p, LOG_MIN))  # (B, N, K)


def purity(log_p: Tensor) -> Tensor:
    """Purity of each position: max_j p(x0 = j), (B, N, K) -> (B, N)."""
    return log_p.max(dim=-1).values.exp()


def select_positions(score: Tensor, masked: Tensor, count: Tensor, u: Tensor) -> Tensor:
    """Choose ``count[b]`` masked positions per row without replacement, with probability proportional
    to ``score`` (Gumbel-top-k; exact weighted sampling without replacement).

    score: (B, N) positive weights; masked: (B, N) bool; count: (B,); u: (B, N) uniforms.
    Returns chosen (B, N) bool; never an unmasked position; min(count, #masked) per row.
    """
    key = torch.log(score) + rng.gumbel(u)  # (B, N)
    key = torch.where(masked, key, torch.full_like(key, -torch.inf))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, N)
    ranks = torch.arange(key.shape[1], device=key.device).expand_as(order)  # (B, N)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # (B, N): rank of each position
    return (rank < count.view(-1, 1)) & masked


def draw_tokens(log_p: Tensor, sharpen: Tensor, u: Tensor) -> Tensor:
    """A token per position from softmax(sharpen * log p) (Eq. 11 with sharpen = 1 + r * purity).

    log_p: (B, N, K); sharpen: (B, N); u: (B, N, K) uniforms. Gumbel-max, so the draw is a pure
    function of the uniforms. Returns (B, N) long.
    """
    return torch.argmax(sharpen.unsqueeze(-1) * log_p + rng.gumbel(u), dim=-1)


@dataclass(frozen=True)
class StepOutput:
    tokens: Tensor  # (B, N) long: the new x
    purity: Tensor  # (B, N): max_j p(x0 = j) after guidance and truncation (previews, metrics)
    log_p: Tensor  # (B, N, K): the guided, truncated log p(x0) (predicted previews)


def denoise_step(
    cond: Tensor, uncond: Tensor, x: Tensor, p: BatchParams, schedule: Schedule
) -> StepOutput:
    """One step for B requests from the cond and uncond logits of one forward.

    cond, uncond: (B, N, K) logits; x: (B, N) current tokens (MASK_ID = K). Selection rows (purity,
    random) unmask ``count`` masked positions and freeze the rest; posterior rows draw x_{t-1} from
    the posterior at ``t_eval`` (the original samplers, skip-step included).
    """
    b, n, k = cond.shape
    log_p = truncate(guided_log_probs(cond, uncond, p.guidance_scale), p.truncation_rate)  # (B, N, K)
    pur = purity(log_p)  # (B, N)
    new = x

    if p.kinds & {PURITY, RANDOM}:
        masked = x == k  # (B, N)
        score = pur / pur.max(dim=-1, keepdim=True).values  # (B, N): per-image max is 1
        is_random = (p.kind == RANDOM).view(-1, 1)
        weight = torch.where(is_random, torch.ones_like(score), score)  # Algorithm 1: uniform positions
        chosen = select_positions(weight, masked, p.count, rng.uniform(p.seed, p.step, rng.SELECT, n))
        sharpen = 1.0 + p.purity_weight.view(-1, 1) * score  # (B, N)
        drawn = draw_tokens(log_p, sharpen, rng.uniform(p.seed, p.step, rng.TOKEN, n, k))  # (B, N)
        new = torch.where(chosen, drawn, x)

    if POSTERIOR in p.kinds:
        log_post = posterior(schedule, log_p, x, p.t_eval)  # (B, N, K+1)
        drawn = torch.argmax(log_post + rng.gumbel(rng.uniform(p.seed, p.step, rng.POSTERIOR, n, k + 1)), dim=-1)
        new = torch.where((p.kind == POSTERIOR).view(-1, 1), drawn, new)

    return StepOutput(tokens=new, purity=pur, log_p=log_p)
