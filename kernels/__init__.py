"""Triton kernels for the sampling step: whether they can run here, and the ops themselves.

The step has three ops, each a set of a torch reference in ``model/sampling/step.py`` and a kernel here with the
same name and signature:

    guided_purity   kernels/guided.py     Eq. 7 guidance, log-softmax, truncation, purity (one pass)
    select_masked   kernels/selection.py  top-Δz importance selection among masked positions (Gumbel-top-k)
    draw_at         kernels/draw.py       the token draw at the chosen positions only (Eq. 11, Gumbel-max)

with the shared parts beside them: kernels/rng.py (model/sampling/rng.py's hash in Triton), kernels/truncate.py
(truncation by bisection, no sort), kernels/precise.py (exp/log as accurate as torch's),
kernels/checks.py (what the launchers check), kernels/constants.py (the numbers the references share with the
kernels: LOG_MIN, the hash's constants, the streams).

kernels/ is a leaf: it imports nothing of ``vqdiff.model`` or ``vqdiff.server``. Which ops a step uses (the
``VQDIFF_KERNELS`` switch) is decided by the caller, ``vqdiff.model.sampling.step.step_ops``. The kernel ops are
``vqdiff.kernels.ops`` (also reachable as ``vqdiff.kernels.guided_purity`` and so on, imported on first use).
This file never imports triton: importing ``vqdiff.kernels`` must stay cheap and must not fix triton's mode
(``TRITON_INTERPRET`` is read when the ``@triton.jit`` decorators run).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache

OPS = ("guided_purity", "select_masked", "draw_at")


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether triton runs kernels on the CPU (``TRITON_INTERPRET=1``, read by triton at decoration)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(device_type: str) -> bool:
    """Whether the kernels can run on tensors of this device type (``"cuda"``, ``"cpu"``): triton is
    installed, and the device is CUDA or triton interprets kernels on the CPU."""
    return triton_installed() and (device_type == "cuda" or interpreted())


def __getattr__(name: str):
    if name in OPS:  # imports triton: only here
        return getattr(importlib.import_module("vqdiff.kernels.ops"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
