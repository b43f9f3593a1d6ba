"""Counter-based randomness: every random number a request sees is a pure function of
(seed, step, stream, position, class).

No generator state is kept anywhere, so a request's noise never depends on its place in a batch or
on its neighbours, and a Triton kernel (kernels/rng.py) can compute the very same bits. The hash is
"lowbias32" (two multiply-xorshift rounds on 32-bit words), chained over the counters; it is done in
int64 tensor ops masked to 32 bits, which wrap exactly as uint32 arithmetic does. Its constants, the
stream numbers and the uniforms' grid are those of kernels/constants.py, shared with the kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqdiff.kernels.constants import (  # SELECT, TOKEN, POSTERIOR: the streams of one step
    M32,
    MIX32_M1,
    MIX32_M2,
    MIX32_S1,
    MIX32_S2,
    MIX32_S3,
    POSTERIOR,
    SELECT,
    STREAMS_PER_STEP,
    TOKEN,
    UNIFORM_SCALE,
    UNIFORM_SHIFT,
)


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash; x holds values in [0, 2^32) as int64."""
    x = x ^ (x >> MIX32_S1)
    x = (x * MIX32_M1) & M32
    x = x ^ (x >> MIX32_S2)
    x = (x * MIX32_M2) & M32
    return x ^ (x >> MIX32_S3)


def uniform(seed: Tensor, step: Tensor, stream: int, num_positions: int, num_classes: int | None = None) -> Tensor:
    """Uniforms in (0, 1), exactly representable in fp32 (23 bits; never 0 or 1).

    seed, step: (B,) int64. Returns (B, N) if ``num_classes`` is None, else (B, N, C); the number at
    (b, n, c) depends only on (seed[b], step[b], stream, n, c).

    The counters are absorbed one after another (seed, then step and stream, then the index), each
    through the bijective ``mix32``, so swapping two counters changes the result; the last round
    xors the row's state back in, so two rows never see shifted copies of one stream.
    """
    c = 1 if num_classes is None else num_classes
    index = torch.arange(num_positions * c, device=seed.device, dtype=torch.int64).view(1, num_positions, c)  # (1, N, C)
    u = _uniform(_row_state(seed, step, stream), index)  # (B, N, C)
    return u.squeeze(-1) if num_classes is None else u


def uniform_at(seed: Tensor, step: Tensor, stream: int, positions: Tensor, num_classes: int) -> Tensor:
    """``uniform(seed, step, stream, N, C)`` at the given positions only: (B, M) -> (B, M, C), the same
    bits (a draw at a few chosen positions never computes the noise of all N x C)."""
    classes = torch.arange(num_classes, device=positions.device, dtype=torch.int64)
    index = positions.unsqueeze(-1) * num_classes + classes  # (B, M, C): the index uniform() gives (n, c)
    return _uniform(_row_state(seed, step, stream), index)


def _row_state(seed: Tensor, step: Tensor, stream: int) -> Tensor:
    """(B,) seeds and steps -> (B, 1, 1): the state of each row's stream."""
    seed = seed.view(-1, 1, 1)
    h = mix32(seed & M32)
    h = mix32(h ^ ((seed >> 32) & M32))
    return mix32((h + (step.view(-1, 1, 1) * STREAMS_PER_STEP + stream)) & M32)


def _uniform(h: Tensor, index: Tensor) -> Tensor:
    x = mix32(mix32((h + index) & M32) ^ h)
    return ((x >> UNIFORM_SHIFT).to(torch.float32) + 0.5) * UNIFORM_SCALE  # in [2^-24, 1 - 2^-24]


def gumbel(u: Tensor) -> Tensor:
    """Standard Gumbel noise from uniforms in (0, 1)."""
    return -torch.log(-torch.log(u))


def random_seed() -> int:
    """A fresh seed for a request that gave none (from the OS, not from torch's global state)."""
    import secrets

    return secrets.randbelow(2**53)  # exact in a JSON number


__all__ = ["uniform", "uniform_at", "gumbel", "mix32", "random_seed", "SELECT", "TOKEN", "POSTERIOR"]
