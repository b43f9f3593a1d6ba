"""Truncation without a sort: the reference's kept set, found by bisection on the log-probability.

Reference (``vqdiff.model.sampling.step.truncate``): sort log p descending (stable: ties by class index), keep a
class while the mass before it, summed in fp64 and rounded to fp32, is < r; the top-1 always; r >= 1
keeps all. Sorting is O(K log K) with data-dependent shuffles; here the kept set is found from sums:

    A(t) = sum of p_j over classes with log p_j > t    (fp64)

is non-increasing in t, so "fp32(A(t)) < r" holds exactly for t >= some t*, and t* is one of the
log-probabilities. Bisection over the 32-bit integer image of log p (monotone in the float value)
finds t* in 32 sums. Kept: every class with log p > t*; of the classes tied at t*, the one j-th by
index is kept iff fp32(A(t*) + j * p) < r (the stable sort's mass before it). So ties are broken by
class index exactly as ``torch.sort(stable=True)``. Given the same log p, only the fp64 summation
order differs from the reference's cumsum, which could change a decision only if the mass before a
class lay within ~1e-16 of an fp32 rounding boundary next to r. The log p themselves differ from the
reference's in their last bits (the softmax denominator is summed in another order), so a class whose
mass before it lies within ~1e-7 (relative) of r may fall either way: measure zero for the tests'
data; at ITHQ size, a few classes in millions, each with about 1/K chance of being the one drawn.

Cost: 33 fp64 sums over K per position. The step runs it only where it draws (Δz of N positions) and
where log p is written (previews, posterior samplers), and only in rows with r < 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vqdiff.kernels import precise

INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def ordered_int(x):
    """The int32 image of fp32 values with the same order (for non-NaN values)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def kept(log_p, valid, r, BLOCK_K: tl.constexpr, PRECISE: tl.constexpr):
    """(R, BLOCK_K) bool: the classes truncation keeps. log_p (R, BLOCK_K) fp32 clamped log p;
    valid (R, BLOCK_K) bool (real classes of live rows); r (R,) truncation rates."""
    p = tl.where(valid, precise.exp(log_p, PRECISE), 0.0).to(tl.float64)  # (R, BK): 0 off the valid classes
    key = ordered_int(log_p)  # (R, BK) int32
    lo = tl.min(tl.where(valid, key, INT32_MAX), axis=1).to(tl.int64)  # (R,): t* is in [lo, hi]
    hi = tl.max(tl.where(valid, key, INT32_MIN), axis=1).to(tl.int64)  # fp32(A(hi)) = 0 < r
    for _ in range(32):  # the range spans < 2^32 keys
        mid = lo + ((hi - lo) >> 1)
        above = tl.sum(tl.where(key > mid.to(tl.int32)[:, None], p, 0.0), axis=1)  # (R,) A(mid)
        ok = above.to(tl.float32) < r
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    t = hi.to(tl.int32)[:, None]  # (R, 1)
    before = tl.sum(tl.where(key > t, p, 0.0), axis=1)  # (R,) A(t*)
    tie = valid & (key == t)
    j = tl.cumsum(tie.to(tl.int32), axis=1) - tie.to(tl.int32)  # (R, BK): earlier classes in the tie
    keep = (key > t) | (tie & ((before[:, None] + j.to(tl.float64) * p).to(tl.float32) < r[:, None]))
    top = tl.argmax(tl.where(valid, key, INT32_MIN), axis=1, tie_break_left=True)  # (R,) the sort's first
    keep = keep | (tl.arange(0, BLOCK_K)[None, :] == top[:, None]) | (r[:, None] >= 1.0)
    return keep & valid
