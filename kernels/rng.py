"""model/sampling/rng.py in Triton: the same hash bits, so a kernel draws exactly what the reference draws.

A uniform at (seed, step, stream, position, class) is ``uniform(row_state(seed, step, stream), index)``
with index = position * C + class (C classes; C = 1 for per-position streams). ``mix32`` is lowbias32
in uint32 arithmetic: multiplication wraps mod 2^32 and ``>>`` is a logical shift, exactly what the
reference's int64 ops masked to 32 bits compute.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vqdiff.kernels import precise


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (mix32 of model/sampling/rng.py)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def row_state(seed, step, STREAM: tl.constexpr):
    """seed, step: int64 (scalars or vectors) -> uint32 state of this row's stream."""
    h = mix32((seed & 0xFFFFFFFF).to(tl.uint32))
    h = mix32(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return mix32(h + (step * 4 + STREAM).to(tl.uint32))  # + wraps mod 2^32, as (h + v) & M32


@triton.jit
def uniform(h, index):
    """Uniforms in (0, 1) on a 23-bit grid (uniform of model/sampling/rng.py); h uint32, index int32/int64 (mod 2^32)."""
    x = mix32(mix32(h + index.to(tl.uint32)) ^ h)
    return ((x >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def gumbel(u, PRECISE: tl.constexpr):
    """Standard Gumbel noise, -log(-log(u)) (gumbel of model/sampling/rng.py)."""
    return -precise.log(-precise.log(u, PRECISE), PRECISE)
