"""The token draw at the chosen positions: Eq. 11 sharpening and Gumbel-max, noise hashed in-kernel.

Reference: ``vqdiff.model.sampling.step.draw_at`` (same signature). A position is drawn only if it was chosen (about
Δz of N per row, 1% at ITHQ's 10 of 1024). The grid is (B, M), M = ``max_count``: program (b, j) finds
row b's j-th chosen position from a prefix sum of the row's N flags, and reads nothing else if the row
has fewer. So the launch is B x Δz programs that all draw, not B x N mostly idle ones (at B = 32 those
spend their time in block scheduling: docs/BENCHMARKS.md). For its position a program recomputes guided
log p from the logits (K classes, fp32), truncates where r < 1, and takes

    argmax_c  sharpen * log p_c + Gumbel(u(seed, step, TOKEN, n * K + c))

with the uniforms of ``vqdiff.model.sampling.rng`` computed here (``kernels/rng.py``): the same bits, keyed by the true
position n, and never written to memory. Ties go to the lowest class, as ``torch.argmax``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqdiff.kernels import constants, rng
from vqdiff.kernels.checks import check_logits, check_tensor
from vqdiff.kernels.guided import LOG_MIN, guided_log_probs, row_blocks
from vqdiff.kernels.truncate import kept

MAX_N = 16384  # one row's chosen flags live in registers: one block of next_power_of_2(N)
DRAW_WARPS = 8  # warps of a program drawing one position of K >= 2048 classes


@triton.jit
def _draw_kernel(
    cond_ptr, uncond_ptr, g_ptr, r_ptr, sharpen_ptr, chosen_ptr, seed_ptr, step_ptr, out_ptr, N, K,
    STREAM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRUNCATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)  # this program draws row b's j-th chosen position, if it has one
    pos = tl.arange(0, BLOCK_N)
    flags = (tl.load(chosen_ptr + b.to(tl.int64) * N + pos, mask=pos < N, other=0) != 0).to(tl.int32)  # (BN,)
    hit = (flags != 0) & (tl.cumsum(flags, axis=0) == j + 1)  # (BN,): at most one position
    if tl.sum(hit.to(tl.int32), axis=0) > 0:
        n = tl.sum(tl.where(hit, pos, 0), axis=0)  # scalar: the position
        row = (b * N + n).to(tl.int64) + tl.zeros([1], dtype=tl.int64)  # (1,) flat position b * N + n
        take = row >= 0  # (1,) all true: the (R, BK) helpers take a row mask
        cls = tl.arange(0, BLOCK_K)
        kmask = cls < K
        valid = take[:, None] & kmask[None, :]  # (1, BK)
        offs = row[:, None] * K + cls[None, :]
        g = tl.load(g_ptr + b + tl.zeros([1], dtype=tl.int32))  # (1,)
        log_p, _ = guided_log_probs(cond_ptr, uncond_ptr, offs, valid, kmask, g, PRECISE)  # (1, BK)
        if TRUNCATE:
            r = tl.load(r_ptr + b + tl.zeros([1], dtype=tl.int32))
            if tl.min(r, axis=0) < 1.0:
                log_p = tl.where(kept(log_p, valid, r, BLOCK_K, PRECISE), log_p, LOG_MIN)
        h = rng.row_state(tl.load(seed_ptr + b), tl.load(step_ptr + b), STREAM)  # uint32 scalar
        u = rng.uniform(h, n.to(tl.int64) * K + cls)  # (BK,)
        sharpen = tl.load(sharpen_ptr + row)  # (1,)
        key = sharpen[:, None] * log_p + rng.gumbel(u, PRECISE)[None, :]
        token = tl.argmax(tl.where(valid, key, float("-inf")), axis=1, tie_break_left=True)  # (1,)
        tl.store(out_ptr + row, token.to(tl.int64))


INTERPRETED = not isinstance(_draw_kernel, triton.runtime.JITFunction)


def draw_at(
    cond: Tensor, uncond: Tensor, guidance_scale: Tensor, truncation_rate: Tensor, sharpen: Tensor,
    chosen: Tensor, x: Tensor, seed: Tensor, step: Tensor, max_count: int | None = None, truncates: bool = True,
) -> Tensor:
    """x (B, N) with a token drawn at every chosen position. See ``vqdiff.model.sampling.step.draw_at``: as there, only
    the first ``max_count`` chosen positions of a row are drawn (None: all N may be)."""
    b, n, k = check_logits(cond, uncond, INTERPRETED)
    dev = cond.device
    for name, t, dtype in (("guidance_scale", guidance_scale, torch.float32),
                           ("truncation_rate", truncation_rate, torch.float32),
                           ("seed", seed, torch.int64), ("step", step, torch.int64)):
        check_tensor(t, name, (b,), (dtype,), dev, INTERPRETED)
    check_tensor(sharpen, "sharpen", (b, n), (torch.float32,), dev, INTERPRETED)
    check_tensor(chosen, "chosen", (b, n), (torch.bool,), dev, INTERPRETED)
    check_tensor(x, "x", (b, n), (torch.int64,), dev, INTERPRETED)
    out = x.clone()
    if b * n == 0:
        return out
    m = n if max_count is None else max(0, min(int(max_count), n))
    if m == 0:
        return out
    block_n = triton.next_power_of_2(n)
    if block_n > MAX_N:
        raise ValueError(f"N = {n} positions is more than the draw kernel holds in one block ({MAX_N})")
    _, block_k, _ = row_blocks(1, k)
    warps = DRAW_WARPS if k >= 2048 else 4
    _draw_kernel[(b, m)](
        cond, uncond, guidance_scale, truncation_rate, sharpen, chosen.view(torch.uint8), seed, step, out, n, k,
        STREAM=constants.TOKEN, BLOCK_N=block_n, BLOCK_K=block_k, TRUNCATE=truncates, PRECISE=not INTERPRETED,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out
