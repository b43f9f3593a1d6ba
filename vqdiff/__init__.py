"""Improved VQ-Diffusion: the model core (vqdiff.model), the server (vqdiff.server), the Triton kernels
(vqdiff.kernels) and the shipped default model (vqdiff.models)."""

from vqdiff import _checkout

_checkout.install()   # before anything imports transformers: see vqdiff/_checkout.py
