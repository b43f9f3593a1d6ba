"""The token draw at the chosen positions: Eq. 11 sharpening and Gumbel-max, noise hashed in-kernel.

Reference: ``model.step.draw_at`` (same signature). A position is drawn only if it was chosen (about
Δz of N per row, 1% at ITHQ's 10 of 1024): a program loads R chosen flags and, if none is set, reads
nothing else. For a chosen position it recomputes guided log p from the logits (K classes, fp32),
truncates where r < 1, and takes

    argmax_c  sharpen * log p_c + Gumbel(u(seed, step, TOKEN, n * K + c))

with the uniforms of ``model.rng`` computed here (``kernels/rng.py``): the same bits, keyed by the true
position n, and never written to memory. Ties go to the lowest class, as ``torch.argmax``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import rng
from kernels.checks import check_logits, check_tensor
from kernels.guided import LOG_MIN, guided_log_probs, row_blocks
from kernels.truncate import kept
from model import rng as _model_rng


@triton.jit
def _draw_kernel(
    cond_ptr, uncond_ptr, g_ptr, r_ptr, sharpen_ptr, chosen_ptr, seed_ptr, step_ptr, out_ptr, num_rows, N, K,
    STREAM: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, TRUNCATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (R,) flat position b * N + n
    live = row < num_rows
    take = tl.load(chosen_ptr + row, mask=live, other=0) != 0  # (R,)
    if tl.max(take.to(tl.int32), axis=0) > 0:
        b = row // N
        n = row - b * N
        cls = tl.arange(0, BLOCK_K)
        kmask = cls < K
        valid = take[:, None] & kmask[None, :]  # (R, BK): logits are read for chosen positions only
        offs = row.to(tl.int64)[:, None] * K + cls[None, :]
        g = tl.load(g_ptr + b, mask=take, other=1.0)
        log_p, _ = guided_log_probs(cond_ptr, uncond_ptr, offs, valid, kmask, g, PRECISE)  # (R, BK)
        if TRUNCATE:
            r = tl.load(r_ptr + b, mask=take, other=1.0)
            if tl.min(r, axis=0) < 1.0:
                log_p = tl.where(kept(log_p, valid, r, BLOCK_K, PRECISE), log_p, LOG_MIN)
        h = rng.row_state(tl.load(seed_ptr + b, mask=take, other=0), tl.load(step_ptr + b, mask=take, other=0),
                          STREAM)  # (R,) uint32
        u = rng.uniform(h[:, None], n.to(tl.int64)[:, None] * K + cls[None, :])  # (R, BK)
        sharpen = tl.load(sharpen_ptr + row, mask=take, other=1.0)  # (R,)
        key = sharpen[:, None] * log_p + rng.gumbel(u, PRECISE)
        token = tl.argmax(tl.where(valid, key, float("-inf")), axis=1, tie_break_left=True)  # (R,)
        tl.store(out_ptr + row, token.to(tl.int64), mask=take)


INTERPRETED = not isinstance(_draw_kernel, triton.runtime.JITFunction)


def draw_at(
    cond: Tensor, uncond: Tensor, guidance_scale: Tensor, truncation_rate: Tensor, sharpen: Tensor,
    chosen: Tensor, x: Tensor, seed: Tensor, step: Tensor, max_count: int | None = None, truncates: bool = True,
) -> Tensor:
    """x (B, N) with a token drawn at every chosen position. See ``model.step.draw_at``; ``max_count``
    (a bound on chosen positions per row, for the reference's gather) is not needed here."""
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
    rows, block_k, warps = row_blocks(b * n, k)
    _draw_kernel[(triton.cdiv(b * n, rows),)](
        cond, uncond, guidance_scale, truncation_rate, sharpen, chosen.view(torch.uint8), seed, step, out,
        b * n, n, k, STREAM=_model_rng.TOKEN, ROWS=rows, BLOCK_K=block_k, TRUNCATE=truncates,
        PRECISE=not INTERPRETED, num_warps=warps, enable_fp_fusion=False,
    )
    return out
