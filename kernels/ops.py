"""The Triton side of model/step.py's three ops: the same names and signatures (``kernels.step_ops``
picks this module or ``model.step``). Importing it imports triton and decorates the kernels."""

from kernels.draw import draw_at
from kernels.guided import guided_purity
from kernels.selection import select_masked

__all__ = ["guided_purity", "select_masked", "draw_at"]
