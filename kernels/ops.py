"""The Triton side of model/sampling/step.py's three ops: the same names and signatures
(``vqdiff.model.sampling.step.step_ops`` picks this module or the step module itself). Importing it imports
triton and decorates the kernels."""

from vqdiff.kernels.draw import draw_at
from vqdiff.kernels.guided import guided_purity
from vqdiff.kernels.selection import select_masked

__all__ = ["guided_purity", "select_masked", "draw_at"]
