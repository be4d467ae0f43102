"""Where a potential fit starts: g = 0, the coarse problem's potential (``coarse``), or the Gaussian
one; ``choose_start`` resolves 'auto' by the data's geometry (docs/design.md §7, *Starts*)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sdfm.semidiscrete.backends import StoredKeys

__all__ = ["COARSE_BELOW", "INITS", "Init", "choose_start", "gaussian_start"]

Init = Literal["auto", "coarse", "gaussian", "zero"]
INITS = ("auto", "coarse", "gaussian", "zero")

COARSE_BELOW = 0.01
"""init='auto' starts from the coarse problem when δ (cell score width) < COARSE_BELOW * s (spread):
~1e-4 for 20,000 2-D points, where it turns a minute's χ̂² from ~40 into ~1; ~0.2 for digits and
Fashion-MNIST, where g = 0 is as good and the coarse start only costs time."""


def choose_start(init: str, cell_scale: float, score_scale: float) -> str:
    """'coarse', 'gaussian' or 'zero': ``init`` itself, or for 'auto' coarse where cells are narrow
    next to the spread of the scores (``cell_scale`` < COARSE_BELOW * ``score_scale``), else zero."""
    if init != "auto":
        return init
    return "coarse" if cell_scale < COARSE_BELOW * score_scale else "zero"


def gaussian_start(keys: Tensor | StoredKeys, blocks: list[Tensor]) -> Tensor:
    """(N,) the dual potential of the Brenier map onto the moment-matched Gaussian of each block.

    For data y ~ N(m, Σ) and standard-normal noise, the optimal map is x -> m + Σ^(1/2) x and its
    semi-dual potential is g(y) = -(y - m)^T Σ^(-1/2) (y - m) / 2 (argmax_y <x, y> + g(y) is then
    exactly m + Σ^(1/2) x). Σ's eigenvalues are floored at 1e-3 of their mean (images have a
    singular covariance). Each block (the row ids of a class) is centred to mean 0.

    Args:
        keys: (N, p) points in the matching space.
        blocks: row ids of each independent block of g.
    """
    g = torch.zeros(keys.shape[0], device=blocks[0].device)
    for rows in blocks:
        k = keys[rows].double()
        centered = k - k.mean(0)
        cov = centered.T @ centered / max(1, len(rows) - 1)
        vals, vecs = torch.linalg.eigh(cov)
        vals = vals.clamp_min(1e-3 * float(vals.mean().clamp_min(1e-30)))
        inv_sqrt = (vecs * vals.rsqrt()) @ vecs.T
        block = -0.5 * ((centered @ inv_sqrt) * centered).sum(1)
        g[rows] = (block - block.mean()).float().to(g.device)
    return g
