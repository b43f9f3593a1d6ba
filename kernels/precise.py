"""exp and log as accurate as torch's (<= 1 ulp), for the values that decide discrete outcomes.

``tl.exp``/``tl.log`` may compile to the GPU's approximate instructions (ex2/lg2.approx), whose
absolute error near 1 is larger than log(u) itself for u = 1 - 2^-24: the largest Gumbel noise, the one
that wins a draw, would be wrong. On CUDA these use libdevice (``__nv_expf``/``__nv_logf``, as torch's
own kernels do); the interpreter has no libdevice and uses numpy's float32 exp/log. ``PRECISE`` is a
constexpr the launchers set: True when compiled, False under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def log(x, PRECISE: tl.constexpr):
    if PRECISE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y
