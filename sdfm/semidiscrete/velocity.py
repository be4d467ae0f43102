"""The exact velocity of the semidiscrete OT flow (epsilon = 0), a ground-truth teacher field.

With potential g, the flow moves every noise sample x0 on a straight line to its matched point
y_{k(x0)}, k(x0) = argmax_j <x0, y_j> + g_j. A point x at time t < 1 lies on the path towards

    k(t, x) = argmax_j [ <x, y_j> - (t/2)|y_j|^2 + (1 - t) g_j ],

and v*(t, x) = (y_k - x) / (1 - t) (docs/design.md §7; consistent with the proximal formulation of OT-CFM).
Both brackets of the score at x_t = (1 - t) x0 + t y_k peak at j = k, which is why the search at time
t recovers the t = 0 match. One MIPS per evaluation: the same index with the time-dependent bias
-(t/2)|y|^2 + (1 - t) g swapped in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdfm.semidiscrete.index import MatchIndex


class ExactVelocity:
    """v*(t, x) for data y (N, *shape), potential g (N,) and optional per-class matching.

    Args:
        y: (N, *shape) data points.
        g: (N,) potential fitted with epsilon = 0 in the full space (no PCA).
        labels: (N,) classes for class-conditional matching (queries then need labels).
    """

    def __init__(self, y: Tensor, g: Tensor, labels: Tensor | None = None):
        self.shape = tuple(y.shape[1:])
        self.y = y.flatten(1).float()
        self.g = g.float()
        self.half_sq = 0.5 * (self.y.double() ** 2).sum(1)
        self.index = MatchIndex(self.y, backend="torch", labels=labels)

    def target(self, t: float, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B,) index of the data point each x (B, *shape) flows to, seen at time t."""
        bias = (-t * self.half_sq + (1 - t) * self.g.double()).float()
        self.index.set_potential(bias)
        return self.index.search(x.flatten(1).float(), labels)

    def __call__(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """v*(t, x) (B, *shape) at times t (B,) (one time per call, as the ODE solvers pass it)."""
        tt = float(t.reshape(-1)[0])
        if t.numel() > 1 and not torch.all(t == tt):
            raise ValueError("ExactVelocity takes one time per call")
        if tt > 1 - 1e-6:
            # (y_k - x)/(1 - t) is 0/0 at t = 1; only solvers that never evaluate there fit this field.
            raise ValueError("the exact velocity is singular at t = 1; use the euler or midpoint solver")
        k = self.target(tt, x, labels)
        v = (self.y[k] - x.flatten(1)) / (1.0 - tt)
        return v.view(x.shape)


@torch.no_grad()
def velocity_gap(
    model_velocity, exact: ExactVelocity, x0: Tensor, labels: Tensor | None, times: list[float]
) -> dict[str, float]:
    """Mean squared gap E|v_theta(t, x_t) - v*(t, x_t)|^2 along the coupling's paths
    x_t = (1 - t) x0 + t y_{k(x0)}, at each time of ``times`` (in [0, 1)) and averaged.

    Args:
        model_velocity: callable (t (B,), x (B, *shape)) -> (B, *shape), labels already bound.
        exact: the exact field.
        x0: (B, *shape) noise samples.
        labels: (B,) classes for conditional matching, or None.
        times: evaluation times.
    """
    x1 = exact.y[exact.target(0.0, x0, labels)].view(x0.shape)
    gaps = {}
    for t in times:
        xt = (1 - t) * x0 + t * x1
        tb = torch.full((len(x0),), t)
        diff = model_velocity(tb, xt) - exact(tb, xt, labels)
        gaps[f"{t:g}"] = float(diff.flatten(1).pow(2).sum(1).mean())
    return {"mean": sum(gaps.values()) / len(gaps), **gaps}
