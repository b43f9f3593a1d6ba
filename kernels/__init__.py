"""Triton kernels for the sampling step (issue 6), and the one switch that picks them.

The step has three ops, each a set of a torch reference in ``model/sampling/step.py`` and a kernel here with the
same name and signature:

    guided_purity   kernels/guided.py     Eq. 7 guidance, log-softmax, truncation, purity (one pass)
    select_masked   kernels/selection.py  top-Δz importance selection among masked positions (Gumbel-top-k)
    draw_at         kernels/draw.py       the token draw at the chosen positions only (Eq. 11, Gumbel-max)

with the shared parts beside them: kernels/rng.py (model/sampling/rng.py's hash in Triton), kernels/truncate.py
(truncation by bisection, no sort), kernels/precise.py (exp/log as accurate as torch's),
kernels/checks.py (what the launchers check).

``step_ops(device)`` returns the module whose ops the step uses: the kernels on CUDA (when triton is
installed), the references elsewhere. ``VQDIFF_KERNELS`` forces either: ``triton``, ``torch`` or
``auto`` (the default). This file never imports triton: importing ``vqdiff.model.sampling.step`` must stay cheap and
must not fix triton's mode (``TRITON_INTERPRET`` is read when the ``@triton.jit`` decorators run).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

MODES = ("auto", "triton", "torch")


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether triton runs kernels on the CPU (``TRITON_INTERPRET=1``, read by triton at decoration)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device | str) -> bool:
    """The switch: ``VQDIFF_KERNELS`` (auto | triton | torch) for tensors on ``device``."""
    mode = os.environ.get("VQDIFF_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"VQDIFF_KERNELS: {mode!r} is not allowed; expected one of {', '.join(MODES)}")
    on_cuda = torch.device(device).type == "cuda"
    if mode == "torch":
        return False
    if mode == "auto":
        return on_cuda and triton_installed()
    if not triton_installed():
        raise ValueError("VQDIFF_KERNELS=triton: triton is not installed (pip install 'vqdiff[kernels]')")
    if not on_cuda and not interpreted():
        raise ValueError(
            f"VQDIFF_KERNELS=triton: tensors are on {torch.device(device)}; the kernels need CUDA, "
            "or TRITON_INTERPRET=1 (set before the kernels are imported) to run on the CPU"
        )
    return True


def step_ops(device: torch.device | str) -> ModuleType:
    """The module providing ``guided_purity``, ``select_masked`` and ``draw_at`` for ``device``."""
    if use_triton(device):
        from vqdiff.kernels import ops  # imports triton: only here

        return ops
    import vqdiff.model.sampling.step as reference

    return reference
