"""Triton kernels for the sampling step (guidance + purity, top-Δz selection, token draw): see issue 6."""
