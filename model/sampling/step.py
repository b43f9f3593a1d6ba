"""One denoising step over a batch of requests: guidance, truncation, purity, selection, draw.

Every function is vectorised over B rows, each with its own parameters and its own step; there
are no per-row Python loops and no host syncs.

The step is three ops, each the torch reference of a Triton kernel in kernels/ with the same name and
signature: ``guided_purity`` (guidance, log-softmax, truncation, purity), ``select_masked``
(top-Δz selection) and ``draw_at`` (the token draw at the chosen positions). ``denoise_step`` takes
them from ``step_ops`` (the switch, here): the kernels on CUDA, these functions elsewhere
(``VQDIFF_KERNELS`` forces either). The smaller functions they are built from (``guided_log_probs``, ``truncate``,
``purity``, ``select_positions``, ``draw_tokens``) are the math, tested on their own.

Layout: logits and log-probs are (B, N, K), classes last; tokens are (B, N) with MASK_ID = K.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from types import ModuleType

import torch
from torch import Tensor

from vqdiff import kernels  # never imports triton; kernels.ops does
from vqdiff.kernels.constants import LOG_MIN  # the released code's floor for log-probabilities
from vqdiff.model.sampling import rng
from vqdiff.model.diffusion import Schedule, posterior

KERNEL_MODES = ("auto", "triton", "torch")  # VQDIFF_KERNELS

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
    truncates: bool = True  # host-side: some row has truncation_rate < 1 (False: truncation is skipped)
    max_count: int | None = None  # host-side: the largest count (None: unknown, draws may cover all N)

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
            truncates=any(r["truncation_rate"] < 1.0 for r in rows),
            max_count=max((int(r["count"]) for r in rows), default=0),
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
    Exactly defined, so that a kernel can equal it: classes in descending log p, ties by class index
    (a stable sort; torch's default sort is not stable on the CPU); the mass before a class is the
    inclusive cumsum of the classes before it, accumulated in fp64 and rounded to fp32: what the
    released code's fp32 cumsum gives on the CPU (torch accumulates it in fp64 there), and the same
    on CUDA, where an fp32 cumsum would scan in fp32 and round differently.
    """
    sorted_lp, order = torch.sort(log_p, dim=-1, descending=True, stable=True)  # (B, N, K)
    cum = torch.cumsum(sorted_lp.exp(), dim=-1, dtype=torch.float64)  # (B, N, K) inclusive
    mass_before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1).float()  # (B, N, K)
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


# ---------------------------------------------------------------------------------------------
# The three ops of the step: references of kernels/guided.py, kernels/selection.py, kernels/draw.py


def guided_purity(
    cond: Tensor, uncond: Tensor, guidance_scale: Tensor, truncation_rate: Tensor,
    with_log_p: bool = False, truncates: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Purity (B, N) after guidance and, with ``with_log_p``, the guided, truncated log p (B, N, K).

    cond, uncond: (B, N, K) logits (fp32, bf16 or fp16); guidance_scale, truncation_rate: (B,) fp32.
    ``truncates`` False (no row has r < 1, known on the host) skips truncation. Truncation keeps the
    top-1 unchanged, so purity does not depend on it; the kernel writes only purity unless asked.
    """
    log_p = guided_log_probs(cond, uncond, guidance_scale)  # (B, N, K)
    pur = purity(log_p)  # (B, N)
    if not with_log_p:
        return pur, None
    return pur, truncate(log_p, truncation_rate) if truncates else log_p


def select_masked(score: Tensor, masked: Tensor, count: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    """``select_positions`` with each row's own SELECT uniforms: (B, N) bool, count[b] masked positions
    (fewer if fewer are masked). score: (B, N) fp32 > 0; masked: (B, N) bool; count, seed, step: (B,)."""
    return select_positions(score, masked, count, rng.uniform(seed, step, rng.SELECT, score.shape[1]))


def draw_at(
    cond: Tensor, uncond: Tensor, guidance_scale: Tensor, truncation_rate: Tensor, sharpen: Tensor,
    chosen: Tensor, x: Tensor, seed: Tensor, step: Tensor, max_count: int | None = None, truncates: bool = True,
) -> Tensor:
    """x (B, N) with a token drawn at every chosen position from softmax(sharpen * log p) (Eq. 11,
    ``draw_tokens``), log p guided and truncated as ``guided_purity``'s, noise the row's TOKEN uniforms.

    Only M = ``max_count`` positions per row are computed (chosen ones first; None: all N), never the
    (B, N, K) noise of every position: the bits are those of a draw everywhere, since the uniforms are
    keyed by the true position. sharpen: (B, N) fp32; chosen: (B, N) bool; x: (B, N) long.
    """
    b, n, k = cond.shape
    m = n if max_count is None else max(0, min(max_count, n))
    if m == 0:
        return x.clone()
    pos = torch.sort(chosen.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :m]  # (B, M)
    rows = pos.unsqueeze(-1).expand(b, m, k)  # (B, M, K)
    log_p = guided_log_probs(cond.gather(1, rows), uncond.gather(1, rows), guidance_scale)  # (B, M, K)
    if truncates:
        log_p = truncate(log_p, truncation_rate)
    drawn = draw_tokens(log_p, sharpen.gather(1, pos), rng.uniform_at(seed, step, rng.TOKEN, pos, k))  # (B, M)
    return x.scatter(1, pos, torch.where(chosen.gather(1, pos), drawn, x.gather(1, pos)))


# ---------------------------------------------------------------------------------------------
# The switch: which module's three ops a step uses


def use_triton(device: torch.device | str) -> bool:
    """``VQDIFF_KERNELS`` (auto | triton | torch) for tensors on ``device``: auto takes the kernels on
    CUDA when triton is installed, the references elsewhere; triton and torch force either (triton
    raises where the kernels cannot run: no triton, or a CPU without ``TRITON_INTERPRET=1``)."""
    mode = os.environ.get("VQDIFF_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"VQDIFF_KERNELS: {mode!r} is not allowed; expected one of {', '.join(KERNEL_MODES)}")
    device = torch.device(device)
    if mode == "torch":
        return False
    if mode == "auto":
        return device.type == "cuda" and kernels.triton_installed()
    if not kernels.triton_installed():
        raise ValueError("VQDIFF_KERNELS=triton: triton is not installed (pip install 'vqdiff[kernels]')")
    if not kernels.usable(device.type):
        raise ValueError(
            f"VQDIFF_KERNELS=triton: tensors are on {device}; the kernels need CUDA, "
            "or TRITON_INTERPRET=1 (set before the kernels are imported) to run on the CPU"
        )
    return True


def step_ops(device: torch.device | str) -> ModuleType:
    """The module providing ``guided_purity``, ``select_masked`` and ``draw_at`` for ``device``:
    ``vqdiff.kernels.ops`` or this module (``use_triton``)."""
    if use_triton(device):
        from vqdiff.kernels import ops  # imports triton: only here

        return ops
    return sys.modules[__name__]


# ---------------------------------------------------------------------------------------------
# The step


@dataclass(frozen=True)
class StepOutput:
    tokens: Tensor  # (B, N) long: the new x
    purity: Tensor  # (B, N): max_j p(x0 = j) after guidance and truncation (previews, metrics)
    compute_log_p: Callable[[], Tensor] = field(repr=False, compare=False)  # gives log_p (below)

    @cached_property
    def log_p(self) -> Tensor:
        """(B, N, K): the guided, truncated log p(x0) (predicted previews). Computed on first use: the
        selection samplers' step never needs it, and the kernels do not write it unless asked."""
        return self.compute_log_p()


def denoise_step(
    cond: Tensor, uncond: Tensor, x: Tensor, p: BatchParams, schedule: Schedule
) -> StepOutput:
    """One step for B requests from the cond and uncond logits of one forward.

    cond, uncond: (B, N, K) logits; x: (B, N) current tokens (MASK_ID = K). Selection rows (purity,
    random) unmask ``count`` masked positions and freeze the rest; posterior rows draw x_{t-1} from
    the posterior at ``t_eval`` (the original samplers, skip-step included). The three ops come from
    ``step_ops``: Triton kernels on CUDA (one read of the logits for purity, the draw reading
    only the chosen positions), this module's references elsewhere; both give the same tokens.
    """
    b, n, k = cond.shape
    ops = step_ops(cond.device)  # the Triton kernels on CUDA, this module's references elsewhere
    cond, uncond, x = cond.contiguous(), uncond.contiguous(), x.contiguous()  # the kernels' layout; no-ops here
    guide = (cond, uncond, p.guidance_scale, p.truncation_rate)
    pur, log_p = ops.guided_purity(*guide, POSTERIOR in p.kinds, p.truncates)  # (B, N), (B, N, K) or None
    new = x

    if p.kinds & {PURITY, RANDOM}:
        masked = x == k  # (B, N)
        score = pur / pur.max(dim=-1, keepdim=True).values  # (B, N): per-image max is 1
        is_random = (p.kind == RANDOM).view(-1, 1)
        weight = torch.where(is_random, torch.ones_like(score), score)  # Algorithm 1: uniform positions
        chosen = ops.select_masked(weight, masked, p.count, p.seed, p.step)  # (B, N)
        sharpen = 1.0 + p.purity_weight.view(-1, 1) * score  # (B, N)
        new = ops.draw_at(*guide, sharpen, chosen, x, p.seed, p.step, p.max_count, p.truncates)  # (B, N)

    if POSTERIOR in p.kinds:
        log_post = posterior(schedule, log_p, x, p.t_eval)  # (B, N, K+1)
        drawn = torch.argmax(log_post + rng.gumbel(rng.uniform(p.seed, p.step, rng.POSTERIOR, n, k + 1)), dim=-1)
        new = torch.where((p.kind == POSTERIOR).view(-1, 1), drawn, new)

    if log_p is None:  # kept lazy: previews ask for it every few steps at most
        return StepOutput(new, pur, compute_log_p=lambda: ops.guided_purity(*guide, True, p.truncates)[1])
    return StepOutput(new, pur, compute_log_p=lambda: log_p)
