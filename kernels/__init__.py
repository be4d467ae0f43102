"""Fused Triton kernels for sdfm's two hot loops (see README.md in this folder).

- ``lse``: logsumexp_j (h_j + <a_i, b_j>), the reduction of every Sinkhorn update;
- ``argmax`` / ``gumbel_argmax``: argmax_j (h_j + <a_i, b_j> [+ Gumbel noise]), the semidiscrete
  matching search and the Sinkhorn row sampler;
- ``auto``: the 'auto' backend, a measured choice between a Triton kernel and the torch code.

Importing this package does not import triton; the kernels need it (and CUDA, or TRITON_INTERPRET=1).
"""

from sdfm.kernels.auto import auto, auto_choices
from sdfm.kernels.reductions import (
    Argmax,
    Tiles,
    argmax,
    gumbel_argmax,
    interpret_mode,
    lse,
    require_triton,
    tiles,
    triton_problem,
)

__all__ = [
    "Argmax",
    "Tiles",
    "argmax",
    "auto",
    "auto_choices",
    "gumbel_argmax",
    "interpret_mode",
    "lse",
    "require_triton",
    "tiles",
    "triton_problem",
]
