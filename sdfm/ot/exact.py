"""Exact OT between two equal-size point sets: with uniform weights, a linear assignment problem."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sdfm.ot.sinkhorn import COSTS, Cost

__all__ = ["exact_ot_assignment"]


def exact_ot_assignment(x: Tensor, y: Tensor, cost: Cost = "sqeuclidean") -> Tensor:
    """Optimal permutation between two equal-size point sets.

    Between uniform measures with n points each, some optimal plan is a permutation (Birkhoff), so
    exact OT is the linear assignment problem, solved here by scipy's Jonker-Volgenant solver on the
    dense cost in float64 on the CPU (O(n^2) memory, about O(n^3) time: n up to a few thousand).

    Args:
        x: (n, d) sources.
        y: (n, d) targets.
        cost: 'sqeuclidean' (0.5 |x - y|^2) or 'dot' (-<x, y>). Between equal-size sets both give the
            same optimal permutations; the choice only matters for ties and rounding.

    Returns:
        (n,) int64 index into y of each row's partner, on x's device.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if x.dim() != 2 or y.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be (n, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    x64 = x.detach().to("cpu", torch.float64)
    y64 = y.detach().to("cpu", torch.float64)
    c = 0.5 * torch.cdist(x64, y64).square() if cost == "sqeuclidean" else -(x64 @ y64.T)
    rows, cols = linear_sum_assignment(c.numpy())
    # linear_sum_assignment returns rows in order 0..n-1, so cols is the permutation itself.
    return torch.from_numpy(cols).to(device=x.device, dtype=torch.long)
