"""model/sampling/rng.py in Triton: the same hash bits, so a kernel draws exactly what the reference draws.

A uniform at (seed, step, stream, position, class) is ``uniform(row_state(seed, step, stream), index)``
with index = position * C + class (C classes; C = 1 for per-position streams). ``mix32`` is lowbias32
in uint32 arithmetic: multiplication wraps mod 2^32 and ``>>`` is a logical shift, exactly what the
reference's int64 ops masked to 32 bits compute. The constants are kernels/constants.py's, as the reference's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vqdiff.kernels import constants, precise

M32 = tl.constexpr(constants.M32)
S1, M1 = tl.constexpr(constants.MIX32_S1), tl.constexpr(constants.MIX32_M1)
S2, M2 = tl.constexpr(constants.MIX32_S2), tl.constexpr(constants.MIX32_M2)
S3 = tl.constexpr(constants.MIX32_S3)
STREAMS_PER_STEP = tl.constexpr(constants.STREAMS_PER_STEP)
UNIFORM_SHIFT = tl.constexpr(constants.UNIFORM_SHIFT)
UNIFORM_SCALE = tl.constexpr(constants.UNIFORM_SCALE)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (mix32 of model/sampling/rng.py)."""
    x = x ^ (x >> S1)
    x = x * M1
    x = x ^ (x >> S2)
    x = x * M2
    return x ^ (x >> S3)


@triton.jit
def row_state(seed, step, STREAM: tl.constexpr):
    """seed, step: int64 (scalars or vectors) -> uint32 state of this row's stream."""
    h = mix32((seed & M32).to(tl.uint32))
    h = mix32(h ^ ((seed >> 32) & M32).to(tl.uint32))
    return mix32(h + (step * STREAMS_PER_STEP + STREAM).to(tl.uint32))  # + wraps mod 2^32, as (h + v) & M32


@triton.jit
def uniform(h, index):
    """Uniforms in (0, 1) on a 23-bit grid (uniform of model/sampling/rng.py); h uint32, index int32/int64 (mod 2^32)."""
    x = mix32(mix32(h + index.to(tl.uint32)) ^ h)
    return ((x >> UNIFORM_SHIFT).to(tl.float32) + 0.5) * UNIFORM_SCALE


@triton.jit
def gumbel(u, PRECISE: tl.constexpr):
    """Standard Gumbel noise, -log(-log(u)) (gumbel of model/sampling/rng.py)."""
    return -precise.log(-precise.log(u, PRECISE), PRECISE)
