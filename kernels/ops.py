"""The Triton side of model/sampling/step.py's three ops: the same names and signatures (``vqdiff.kernels.step_ops``
picks this module or ``vqdiff.model.sampling.step``). Importing it imports triton and decorates the kernels."""

from vqdiff.kernels.draw import draw_at
from vqdiff.kernels.guided import guided_purity
from vqdiff.kernels.selection import select_masked

__all__ = ["guided_purity", "select_masked", "draw_at"]
