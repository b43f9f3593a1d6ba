"""Fused guided log-probs: Eq. 7 guidance, log-softmax, truncation and purity in one pass over the logits.

Reference: ``vqdiff.model.sampling.step.guided_purity`` (same signature). Each program reads R whole positions (K
classes each) of the cond and uncond logits once, in their own dtype (fp32, bf16 or fp16), and works
in fp32:

    z = uncond + g * (cond - uncond)                     (B, N, K), g per row (released convention)
    log p = clamp((z - max z) - log sum exp(z - max z), -70, 0)
    purity = exp(max log p) = exp(clamp(-log sum exp(z - max z)))

Truncation keeps the top-1, so purity never needs it: the hot path writes only purity (B, N), 4 bytes
per position against 2 K logit reads. With ``with_log_p`` the truncated log p (B, N, K) is written too
(previews, posterior samplers), and truncation runs per row where r < 1 (``kernels/truncate.py``).
NaN or +inf logits give a NaN purity (and NaN log p) for that position only, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqdiff.kernels import constants, precise
from vqdiff.kernels.checks import check_logits, check_tensor
from vqdiff.kernels.truncate import kept

LOG_MIN = tl.constexpr(constants.LOG_MIN)
MAX_K = 16384  # one position's classes live in registers: one block of next_power_of_2(K)


@triton.jit
def clamp_log(x):
    """clamp(x, LOG_MIN, 0), keeping NaN as torch.clamp does (tl.maximum may drop it)."""
    return tl.where(x < LOG_MIN, LOG_MIN, tl.where(x > 0.0, 0.0, x))


@triton.jit
def guided_log_probs(cond_ptr, uncond_ptr, offs, mask, kmask, g, PRECISE: tl.constexpr):
    """(R, BK) clamped log p(x0) of R positions and (R,) log of their softmax denominators.
    offs (R, BK) element offsets; mask (R, BK) what to load; kmask (BK,) real classes; g (R,)."""
    c = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = u + g[:, None] * (c - u)  # (R, BK): Eq. 7 on raw logits, the reference's op order
    z = tl.where(kmask[None, :], z, float("-inf"))
    shifted = z - tl.max(z, axis=1)[:, None]  # (R, BK)
    log_s = precise.log(tl.sum(precise.exp(shifted, PRECISE), axis=1), PRECISE)  # (R,)
    return clamp_log(shifted - log_s[:, None]), log_s


@triton.jit
def _guided_purity_kernel(
    cond_ptr, uncond_ptr, g_ptr, r_ptr, purity_ptr, log_p_ptr, num_rows, N, K,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_LOG_P: tl.constexpr, TRUNCATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (R,) flat position b * N + n
    live = row < num_rows
    b = row // N
    cls = tl.arange(0, BLOCK_K)
    kmask = cls < K
    valid = live[:, None] & kmask[None, :]  # (R, BK)
    offs = row.to(tl.int64)[:, None] * K + cls[None, :]  # (R, BK)
    g = tl.load(g_ptr + b, mask=live, other=1.0)  # (R,)
    log_p, log_s = guided_log_probs(cond_ptr, uncond_ptr, offs, valid, kmask, g, PRECISE)
    tl.store(purity_ptr + row, precise.exp(clamp_log(-log_s), PRECISE), mask=live)
    if WRITE_LOG_P:
        if TRUNCATE:
            r = tl.load(r_ptr + b, mask=live, other=1.0)  # (R,)
            if tl.min(r, axis=0) < 1.0:  # rows at r = 1 skip the search
                log_p = tl.where(kept(log_p, valid, r, BLOCK_K, PRECISE), log_p, LOG_MIN)
        tl.store(log_p_ptr + offs, log_p, mask=valid)


INTERPRETED = not isinstance(_guided_purity_kernel, triton.runtime.JITFunction)


def row_blocks(num_rows: int, k: int, itemsize: int = 4) -> tuple[int, int, int]:
    """(ROWS, BLOCK_K, num_warps) for programs that each hold ROWS whole positions of K classes of
    ``itemsize``-byte logits. Compiled: about 4096 elements a program (one ITHQ position); the
    interpreter pays per program, so it takes 16384. A 4096-class position of 16-bit logits takes 4
    warps, of fp32 ones 8 (chosen by measurement: docs/BENCHMARKS.md, sampling-step kernels). The warps depend on nothing
    but K and the dtype: they fix the order of the softmax sum, so purity has the same bits whether
    or not log p is written (a posterior row in the batch must not change a purity row's draw)."""
    block_k = triton.next_power_of_2(max(k, 1))
    if block_k > MAX_K:
        raise ValueError(f"K = {k} classes is more than these kernels hold in one block ({MAX_K})")
    per_program = 16384 if INTERPRETED else 4096
    rows = max(1, min(per_program // block_k, triton.next_power_of_2(max(num_rows, 1))))
    elems = rows * block_k
    if elems == 4096 and itemsize < 4:
        warps = 4
    else:
        warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return rows, block_k, warps


def guided_purity(
    cond: Tensor, uncond: Tensor, guidance_scale: Tensor, truncation_rate: Tensor,
    with_log_p: bool = False, truncates: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(purity (B, N) fp32, truncated log p (B, N, K) fp32 or None). See ``vqdiff.model.sampling.step.guided_purity``."""
    b, n, k = check_logits(cond, uncond, INTERPRETED)
    for name, t in (("guidance_scale", guidance_scale), ("truncation_rate", truncation_rate)):
        check_tensor(t, name, (b,), (torch.float32,), cond.device, INTERPRETED)
    purity = torch.empty(b, n, dtype=torch.float32, device=cond.device)
    log_p = torch.empty(b, n, k, dtype=torch.float32, device=cond.device) if with_log_p else None
    if b * n == 0:
        return purity, log_p
    rows, block_k, warps = row_blocks(b * n, k, cond.element_size())
    _guided_purity_kernel[(triton.cdiv(b * n, rows),)](
        cond, uncond, guidance_scale, truncation_rate, purity, purity if log_p is None else log_p, b * n, n, k,
        ROWS=rows, BLOCK_K=block_k, WRITE_LOG_P=with_log_p, TRUNCATE=truncates, PRECISE=not INTERPRETED,
        num_warps=warps, enable_fp_fusion=False,  # the reference rounds u + g * (c - u) twice, not as one FMA
    )
    return purity, log_p
