"""The numbers the sampling step and its kernels must share, defined once, here.

Plain Python values (no torch, no triton), so that model/sampling/ can import them without importing
triton, and kernels/ wraps them as ``tl.constexpr`` for its ``@triton.jit`` code.

The counter-based hash (model/sampling/rng.py in torch, kernels/rng.py in Triton) is lowbias32: three
xorshifts and two multiplications on 32-bit words, ``x ^= x >> S1; x *= M1; x ^= x >> S2; x *= M2;
x ^= x >> S3``. A row's stream state absorbs ``step * STREAMS_PER_STEP + stream``. A uniform keeps the
top ``UNIFORM_BITS`` bits of a hash: ``((x >> UNIFORM_SHIFT) + 0.5) * UNIFORM_SCALE``, in (0, 1).
"""

from __future__ import annotations

LOG_MIN = -70.0  # the released code's floor for log-probabilities

# lowbias32
M32 = 0xFFFFFFFF  # 32-bit words kept in int64 (torch) are masked with this
MIX32_S1, MIX32_M1 = 16, 0x7FEB352D
MIX32_S2, MIX32_M2 = 15, 0x846CA68B
MIX32_S3 = 16

# Streams: independent random numbers for the different draws of one step.
SELECT = 0  # which masked positions to unmask (purity / random samplers)
TOKEN = 1  # which token to draw at a position
POSTERIOR = 2  # the posterior draw of the original samplers
STREAMS_PER_STEP = 4  # room for the streams above in the per-step counter

# Uniforms on a 23-bit grid: exactly representable in fp32, never 0 or 1.
UNIFORM_BITS = 23
UNIFORM_SHIFT = 32 - UNIFORM_BITS
UNIFORM_SCALE = 1.0 / 2**UNIFORM_BITS

assert len({SELECT, TOKEN, POSTERIOR}) == 3 and max(SELECT, TOKEN, POSTERIOR) < STREAMS_PER_STEP
