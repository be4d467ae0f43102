"""Learned interpolants: monotone schedules a(t), b(t) fitted so that the flow they induce is straight
(docs/methods.md §4; the objective is sdfm's own formulation, see there).

The path is x_t = a(t) x0 + b(t) x1 with a(0) = 1, a(1) = 0, b(0) = 0, b(1) = 1. Each schedule is a
Bernstein polynomial of degree K whose coefficients increase from 0 to 1 (b) or decrease from 1 to 0
(a): a Bernstein polynomial with monotone coefficients is monotone and smooth, and with the evenly
spaced coefficients k/K of the initialization it is exactly t, so fitting starts from the linear path.
With ``per_dim`` every coordinate has its own pair of schedules.

For p0 = N(0, I), the independent coupling and a finite dataset {y_j}, the field the path induces
is known in closed form:

    v*(t, x) = sum_j w_j (a' x0_j + b' y_j),   x0_j = (x - b y_j) / a,
    w = softmax_j(-|x - b y_j|^2 / (2 a^2)),

(coordinate-wise a, b with ``per_dim``). Its logits are an inner product of the query
[x b / a^2 ; -b^2 / (2 a^2)] with the keys [y_j ; y_j * y_j], so for a large dataset the matching
index's top-k search (``topk``) restricts the softmax to the k best points. The straightness
objective is the mean squared acceleration of that flow along its own trajectories,

    S = E_t E_{x ~ p_t} |d/dt v*(t, X_t)|^2 = E |∂_t v* + (∇_x v*) v*|^2,

computed by one forward-mode JVP of v* with tangent (1, v*) and minimized over the schedules with
Adam. Library code: single device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jvp

from sdfm.signals import Interrupted, TermFlag

__all__ = ["MonotoneSchedule", "ScheduleFit", "fit_schedule", "optimal_field", "straightness"]

T_MAX = 0.9
"""Largest time of the objective: v* becomes singular as a(t) -> 0 at t = 1."""


def _bernstein(t: Tensor, degree: int) -> tuple[Tensor, Tensor]:
    """(T, K+1) Bernstein basis B_{k,K}(t) and its derivative, K = ``degree``."""
    k = torch.arange(degree + 1, device=t.device, dtype=t.dtype)
    binom = torch.exp(
        torch.lgamma(torch.tensor(degree + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(degree - k + 1)
    ).to(t.device)
    tt = t[:, None]
    basis = binom * tt**k * (1 - tt) ** (degree - k)
    # d/dt B_{k,K} = K (B_{k-1,K-1} - B_{k,K-1})
    k1 = torch.arange(degree, device=t.device, dtype=t.dtype)
    binom1 = torch.exp(
        torch.lgamma(torch.tensor(float(degree))) - torch.lgamma(k1 + 1) - torch.lgamma(degree - k1)
    ).to(t.device)
    lower = binom1 * tt**k1 * (1 - tt) ** (degree - 1 - k1)  # (T, K)
    zero = torch.zeros_like(lower[:, :1])
    deriv = degree * (torch.cat([zero, lower], 1) - torch.cat([lower, zero], 1))
    return basis, deriv


class MonotoneSchedule(nn.Module):
    """The schedules a(t), b(t) of a learned path (see the module docstring).

    Args:
        degree: Bernstein degree K (K + 1 coefficients per schedule).
        dim: number of coordinates with their own schedules (1: one scalar pair for all).
    """

    def __init__(self, degree: int = 8, dim: int = 1):
        super().__init__()
        if degree < 1 or dim < 1:
            raise ValueError(f"degree and dim must be positive, got {degree} and {dim}")
        self.degree, self.dim = degree, dim
        self.theta_a = nn.Parameter(torch.zeros(dim, degree))
        self.theta_b = nn.Parameter(torch.zeros(dim, degree))

    @staticmethod
    def _rising(theta: Tensor) -> Tensor:
        """(P, K+1) coefficients rising from 0 to 1: the cumulative softmax of theta with a leading 0."""
        steps = torch.softmax(theta, dim=1)
        return torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(1)], 1)

    def values(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """a, b, a', b' at times t (T,), each (T, P)."""
        basis, deriv = _bernstein(t.float(), self.degree)
        rise_a, rise_b = self._rising(self.theta_a), self._rising(self.theta_b)
        return 1 - basis @ rise_a.T, basis @ rise_b.T, -(deriv @ rise_a.T), deriv @ rise_b.T

    def coefficients(self, t: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """a, b, a', b' at times t (B,), shaped to broadcast against points of ``shape``."""
        out = self.values(t)
        if self.dim == 1:
            return tuple(v.view(-1, *[1] * len(shape)) for v in out)
        if self.dim != math.prod(shape):
            raise ValueError(
                f"a per-coordinate schedule of {self.dim} coordinates cannot shape points of {shape}"
            )
        return tuple(v.view(-1, *shape) for v in out)


def optimal_field(
    schedule: MonotoneSchedule, t: Tensor, x: Tensor, y: Tensor, topk: int = 0, index=None
) -> Tensor:
    """The closed-form field v*(t, x) (B, D) of the path for the independent coupling from N(0, I) to
    the points y (N, D) (see the module docstring); with ``topk`` the softmax runs over the k best
    points of ``index.topk`` (a ``MatchIndex`` over [y ; y * y])."""
    a, b, da, db = schedule.values(t)  # (B, P), P = 1 or D
    a, b, da, db = (v.to(x.dtype) for v in (a, b, da, db))
    if topk:
        q = torch.cat([x * b / a**2, -(b**2) / (2 * a**2) * torch.ones_like(x)], 1).detach()
        cand = index.topk(q, topk).index  # (B, k)
        pts = y[cand]  # (B, k, D)
    else:
        pts = y[None].expand(x.shape[0], -1, -1)
    diff = x[:, None, :] - b[:, None, :] * pts  # (B, n, D)
    logits = -(diff / a[:, None, :]).pow(2).sum(-1) / 2
    w = torch.softmax(logits, dim=1)  # (B, n)
    x0 = diff / a[:, None, :]
    return (w[..., None] * (da[:, None, :] * x0 + db[:, None, :] * pts)).sum(1)


def straightness(
    schedule: MonotoneSchedule, t: Tensor, x: Tensor, y: Tensor, topk: int = 0, index=None
) -> Tensor:
    """Mean squared acceleration |∂_t v* + (∇_x v*) v*|^2 at the points (t, x): one JVP of the closed
    form with tangent (1, v*). Differentiable in the schedule's parameters."""

    def field(tt: Tensor, xx: Tensor) -> Tensor:
        return optimal_field(schedule, tt, xx, y, topk, index)

    v = field(t, x).detach()
    _, accel = jvp(field, (t, x), (torch.ones_like(t), v))
    return accel.pow(2).sum(1).mean()


def path_points(schedule: MonotoneSchedule, t: Tensor, x0: Tensor, y1: Tensor) -> Tensor:
    """x ~ p_t: a(t) x0 + b(t) y1 for noise x0 (B, D) and data points y1 (B, D), without gradients."""
    with torch.no_grad():
        a, b, _, _ = schedule.values(t)
        return a * x0 + b * y1


def _draws(y: Tensor, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Times t ~ U(0, T_MAX), noise x0 ~ N(0, I) and uniformly drawn data points, one batch."""
    t = torch.rand(batch, generator=generator) * T_MAX
    x0 = torch.randn(batch, y.shape[1], generator=generator)
    return t, x0, y[torch.randint(len(y), (batch,), generator=generator)]


@dataclass
class ScheduleFit:
    """A fitted schedule and the straightness objective before and after (on the same fixed draws)."""

    schedule: MonotoneSchedule
    before: float
    after: float
    steps: int
    seconds: float


def fit_schedule(
    y: Tensor,
    *,
    degree: int = 8,
    per_dim: bool = False,
    steps: int = 300,
    batch: int = 256,
    lr: float = 0.02,
    topk: int = 0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> ScheduleFit:
    """Fit a ``MonotoneSchedule`` to the points y (N, D) by Adam on the straightness objective.

    Every step draws ``batch`` times t ~ U(0, T_MAX), noise and data points, and x_t on the current
    schedule (one generator: the fit is a function of ``seed``). The objective is reported before
    (the linear path) and after on the same 4 batches of (t, x0, y1) draws.
    """
    stop = TermFlag()  # SIGTERM ends the fit at a step boundary with one line (``Interrupted``)
    try:  # the handler goes back on every exit
        y = y.flatten(1).float()
        schedule = MonotoneSchedule(degree, y.shape[1] if per_dim else 1)
        index = None
        if topk:
            from sdfm.semidiscrete import MatchIndex

            index = MatchIndex(torch.cat([y, y * y], 1), precision="fp32")
            index.set_potential(torch.zeros(len(y)))
        gen = torch.Generator().manual_seed(seed)
        evals = [_draws(y, batch, gen) for _ in range(4)]  # fixed (t, x0, y1): x_t follows the schedule

        def score() -> float:
            total = sum(
                straightness(schedule, t, path_points(schedule, t, x0, y1), y, topk, index).item()
                for t, x0, y1 in evals
            )
            return float(total / len(evals))

        before = score()
        optimizer = torch.optim.Adam(schedule.parameters(), lr=lr)
        start = time.perf_counter()
        for step in range(steps):
            if stop.requested:
                raise Interrupted(
                    f"SIGTERM during the learned schedule's fit (step {step} of {steps}): it runs before the first step, "
                    "so nothing of the run changed; start it again to fit the schedule"
                )
            t, x0, y1 = _draws(y, batch, gen)
            loss = straightness(schedule, t, path_points(schedule, t, x0, y1), y, topk, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if log is not None and (step + 1) % max(1, steps // 5) == 0:
                log(f"schedule: step {step + 1}/{steps}, straightness {loss.item():.4g}")
        after = score()
        return ScheduleFit(schedule, before, after, steps, time.perf_counter() - start)
    finally:
        stop.restore()
