"""How straight and how cheap a learned flow is: path energy, normalized path energy, straightness.

All three integrate along the path that ``sdfm.solvers.sample`` simulates with the Euler method on
a uniform grid of S = ``nfe`` steps, t_k = k/S, x_{k+1} = x_k + h v(t_k, x_k), h = 1/S, and estimate a
time integral by the average over steps of the integrand at the step's start (a left Riemann sum).

Why Euler and not RK4: with Euler the velocities in the sum are exactly the ones that moved the
sample, so sum_k h |v_k|^2 = sum_k |x_{k+1} - x_k|^2 / h is the exact kinetic energy of the
piecewise-linear path the simulation produced. Then PE >= mean_i |x1_i - x0_i|^2 >= W2^2(x0, x1)
holds exactly (Cauchy-Schwarz, then optimality of W2) rather than up to discretization error, and
straightness is exactly 0 for a path that moves at constant velocity. RK4 would follow the ODE more
closely, but the quadrature of |v|^2 at step starts stays first order, and at equal NFE its grid is
4x coarser. For a smooth flow, Euler's path and its energy are within O(1/nfe) of the ODE's; compare
values at the same ``nfe``.

Velocities are evaluated under ``torch.no_grad``; the sums over steps are accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sdfm.solvers import Velocity, sample


@dataclass
class FlowStats:
    """Path statistics of a flow from one batch of source samples (see ``flow_stats``).

    Attributes:
        x1: (B, *shape) endpoints of the simulated paths.
        path_energy: E_x0 sum_k h |v(t_k, x_k)|^2.
        straightness: E_x0 sum_k h |v(t_k, x_k) - (x1 - x0)|^2.
        nfe: velocity evaluations spent (2 * nfe: one pass per statistic).
    """

    x1: Tensor
    path_energy: float
    straightness: float
    nfe: int


def _euler_path_integral(
    velocity: Velocity, x0: Tensor, nfe: int, reference: Tensor | None
) -> tuple[Tensor, float]:
    """Simulate from x0 with Euler and average over samples sum_k h_k |v(t_k, x_k) - reference|^2.

    Args:
        velocity: the field, velocity(t (B,), x (B, *shape)) -> (B, *shape).
        x0: (B, *shape) source samples.
        nfe: Euler steps.
        reference: (B, *shape) vector subtracted from each sample's velocity, or None for |v|^2.

    Returns:
        x1: (B, *shape) endpoints; and the sample mean of the integral.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    times: list[float] = []
    squared: list[Tensor] = []

    # The integrand is recorded inside the field the solver calls, so the velocities summed are
    # exactly those Euler stepped with, and no (S+1, B, *shape) trajectory has to be kept.
    def recorded(t: Tensor, x: Tensor) -> Tensor:
        v = velocity(t, x)
        r = v if reference is None else v - reference
        times.append(float(t.reshape(-1)[0]))
        squared.append(r.flatten(1).to(torch.promote_types(r.dtype, torch.float32)).pow(2).sum(dim=1))
        return v

    with torch.no_grad():
        result = sample(recorded, x0, method="euler", nfe=nfe)
    grid = torch.tensor([*times, 1.0], dtype=torch.float64)
    steps = grid.diff()
    # Guard against a solver whose Euler is not "nfe evaluations at increasing step starts on [0, 1]":
    # the weights below would then be wrong silently.
    if len(times) != nfe or times[0] != 0.0 or (steps <= 0).any():
        raise RuntimeError(
            f"expected Euler to evaluate the field at {nfe} increasing times from 0, got {times[:5]}..."
        )
    per_sample = (torch.stack(squared).cpu().to(torch.float64) * steps[:, None]).sum(dim=0)  # (B,)
    return result.x, float(per_sample.mean())


def path_energy(velocity: Velocity, x0: Tensor, nfe: int = 100) -> float:
    """Path energy PE = E_x0 ∫_0^1 |v(t, x_t)|^2 dt of a flow, along Euler paths from x0.

    Estimated as (1/B) sum_i (1/S) sum_k |v(t_k, x_k^i)|^2 over the S = nfe Euler steps from each of
    the B source samples (see the module docstring for why Euler). For a flow that transports the
    source to the target, PE >= W2^2(source, target), with equality for the OT flow.

    Args:
        velocity: the field, velocity(t (B,), x (B, *shape)) -> (B, *shape).
        x0: (B, *shape) source samples (e.g. noise).
        nfe: Euler steps, i.e. velocity evaluations.

    Returns:
        The estimated path energy (squared units of x per unit time).
    """
    return _euler_path_integral(velocity, x0, nfe, reference=None)[1]


def normalized_path_energy(path_energy: float, w2_squared: float) -> float:
    """Normalized path energy NPE = |PE - W2^2| / W2^2 (Tong et al., 2023, OT-CFM).

    0 for a flow whose path energy equals the optimal transport cost. ``w2_squared`` is the squared W2
    between the source and target distributions, e.g. ``wasserstein2(x0, x_data) ** 2`` on samples of
    the same size as the one PE was measured on. (With W2 between x0 and the flow's own endpoints
    instead, PE >= W2^2 holds exactly for the Euler estimate, so the NPE measures pure excess.)

    Args:
        path_energy: PE, from ``path_energy``.
        w2_squared: W2^2 > 0.

    Returns:
        The NPE, >= 0.
    """
    if not w2_squared > 0:
        raise ValueError(f"w2_squared must be > 0, got {w2_squared}")
    return abs(path_energy - w2_squared) / w2_squared


def straightness(velocity: Velocity, x0: Tensor, nfe: int = 100) -> float:
    """Straightness S = E_x0 ∫_0^1 |v(t, x_t) - (x1 - x0)|^2 dt, x1 the endpoint of the path from x0.

    0 exactly when every path is a straight segment traversed at constant speed (then one Euler step
    is exact); larger values mean more curvature or speed changes. Estimated with two Euler passes
    of S = nfe steps: the first finds each x1, the second averages |v(t_k, x_k) - (x1 - x0)|^2 over
    the steps' starts, and the result is the mean over the B samples. Because the Euler steps sum to
    x1 - x0, the estimate equals path_energy - mean |x1 - x0|^2, i.e. the time variance of the
    velocity along each path, without the cancellation of computing it as that difference.

    Args:
        velocity: the field, velocity(t (B,), x (B, *shape)) -> (B, *shape); must be deterministic,
            since the second pass retraces the path of the first.
        x0: (B, *shape) source samples.
        nfe: Euler steps per pass (2 * nfe evaluations in all).

    Returns:
        The estimated straightness (squared units of x per unit time).
    """
    return flow_stats(velocity, x0, nfe).straightness


def flow_stats(velocity: Velocity, x0: Tensor, nfe: int = 100) -> FlowStats:
    """Path energy, straightness and endpoints together, in 2 * nfe evaluations.

    Args:
        velocity: the field, velocity(t (B,), x (B, *shape)) -> (B, *shape); deterministic.
        x0: (B, *shape) source samples.
        nfe: Euler steps per pass.

    Returns:
        A ``FlowStats``; see ``path_energy`` and ``straightness`` for the estimators.
    """
    x1, energy = _euler_path_integral(velocity, x0, nfe, reference=None)
    x1_again, straight = _euler_path_integral(velocity, x0, nfe, reference=x1 - x0)
    if not torch.allclose(x1_again, x1, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the velocity field is not deterministic: two Euler passes from x0 disagree")
    return FlowStats(x1=x1, path_energy=energy, straightness=straight, nfe=2 * nfe)
