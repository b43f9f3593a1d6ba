"""Top-Δz importance selection: per row, ``count`` masked positions without replacement, with
probability proportional to ``score`` (Gumbel-top-k), noise hashed in-kernel.

Reference: ``vqdiff.model.sampling.step.select_masked`` (same signature). Keys are log(score) + Gumbel(u(seed, step,
SELECT, n)) at masked positions and -inf elsewhere; the reference sorts them (stable, descending) and
keeps ranks < count. Here each position's rank is counted instead:

    rank_i = #{j : key_j > key_i, or key_j == key_i and j < i}

which is the stable sort's rank exactly, in O(N^2 / programs) compares and no sort (N = 1024: a
1024 x 1024 compare per row, split over N / BLOCK_I programs). Per-row counts need no host value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqdiff.kernels import constants, precise, rng
from vqdiff.kernels.checks import check_tensor


@triton.jit
def _keys(score_ptr, masked_ptr, base, pos, N, h, PRECISE: tl.constexpr):
    """Gumbel-top-k keys of positions ``pos`` of one row (-inf where not masked or past N)."""
    live = pos < N
    score = tl.load(score_ptr + base + pos, mask=live, other=1.0)
    masked = tl.load(masked_ptr + base + pos, mask=live, other=0) != 0
    key = precise.log(score, PRECISE) + rng.gumbel(rng.uniform(h, pos), PRECISE)
    return tl.where(masked & live, key, float("-inf"))


@triton.jit
def _select_kernel(
    score_ptr, masked_ptr, count_ptr, seed_ptr, step_ptr, chosen_ptr, N,
    STREAM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, PRECISE: tl.constexpr,
):
    b = tl.program_id(0)
    base = b.to(tl.int64) * N
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # (BI,) the positions ranked here
    h = rng.row_state(tl.load(seed_ptr + b), tl.load(step_ptr + b), STREAM)  # uint32 scalar
    key_i = _keys(score_ptr, masked_ptr, base, i, N, h, PRECISE)  # (BI,)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)  # (BJ,)
        key_j = _keys(score_ptr, masked_ptr, base, j, N, h, PRECISE)
        beats = (key_j[None, :] > key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((beats & (j < N)[None, :]).to(tl.int32), axis=1)
    masked = tl.load(masked_ptr + base + i, mask=i < N, other=0) != 0
    chosen = masked & (rank < tl.load(count_ptr + b))
    tl.store(chosen_ptr + base + i, chosen.to(tl.uint8), mask=i < N)


INTERPRETED = not isinstance(_select_kernel, triton.runtime.JITFunction)


def select_masked(score: Tensor, masked: Tensor, count: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    """(B, N) bool: the chosen positions. See ``vqdiff.model.sampling.step.select_masked``."""
    if not isinstance(score, Tensor) or score.dim() != 2:
        raise ValueError(f"score must be (B, N), got {getattr(score, 'shape', type(score).__name__)}")
    b, n = score.shape
    dev = score.device
    check_tensor(score, "score", (b, n), (torch.float32,), dev, INTERPRETED)
    check_tensor(masked, "masked", (b, n), (torch.bool,), dev, INTERPRETED)
    for name, t in (("count", count), ("seed", seed), ("step", step)):
        check_tensor(t, name, (b,), (torch.int64,), dev, INTERPRETED)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dev)
    if b * n == 0:
        return chosen
    block_i = triton.next_power_of_2(n) if INTERPRETED else min(128, triton.next_power_of_2(n))
    block_j = 64 if INTERPRETED else 32
    _select_kernel[(b, triton.cdiv(n, block_i))](
        score, masked.view(torch.uint8), count, seed, step, chosen.view(torch.uint8), n,
        STREAM=constants.SELECT, BLOCK_I=block_i, BLOCK_J=block_j, PRECISE=not INTERPRETED, num_warps=4,
    )
    return chosen
