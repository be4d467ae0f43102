"""ODE samplers for flow matching: integrate dx/dt = v(t, x) from t=0 to t=1.

Fixed-step methods (Euler, midpoint, Heun, RK4) spend an exact budget of velocity evaluations (NFE),
which is how samplers are compared in the literature; dopri5 adapts its steps to a tolerance and
reports the evaluations it actually used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]
"""velocity(t, x) -> dx/dt, with t (B,) in x's dtype/device and x, dx/dt (B, *shape)."""

METHODS = ("euler", "midpoint", "heun", "rk4", "dopri5")

# Velocity evaluations per step of each fixed-step method.
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}

# Times at which dopri5 records the trajectory when one is requested.
DOPRI5_TRAJECTORY_POINTS = 9


@dataclass
class SampleResult:
    """The outcome of one ODE solve.

    Attributes:
        x: (B, *shape) state at t=1.
        nfe: velocity evaluations used (the budget for fixed-step methods, the count for dopri5).
        trajectory: (S+1, B, *shape) states at ``times``, or None when not requested.
        times: (S+1,) time grid of ``trajectory``, or None when not requested.
    """

    x: Tensor
    nfe: int
    trajectory: Tensor | None = None
    times: Tensor | None = None


def sample(
    velocity: Velocity,
    x0: Tensor,
    *,
    method: str = "euler",
    nfe: int = 8,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> SampleResult:
    """Integrate dx/dt = velocity(t, x) from x(0) = x0 to t=1 without building a graph.

    Args:
        velocity: the vector field, called as ``velocity(t, x)`` with t (B,) and x (B, *shape).
        x0: (B, *shape) initial state (source samples).
        method: one of ``METHODS``.
        nfe: evaluation budget for fixed-step methods; must be a positive multiple of the method's
            evaluations per step (euler 1, midpoint 2, heun 2, rk4 4). Ignored by dopri5.
        return_trajectory: also return the states at every step boundary (fixed-step methods) or at
            9 uniform times (dopri5).
        rtol: relative tolerance of dopri5.
        atol: absolute tolerance of dopri5.

    Returns:
        SampleResult with the final state, the evaluations used and the optional trajectory.

    Raises:
        ValueError: unknown method, or an nfe that the fixed-step method cannot spend exactly.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(METHODS)}")
    if x0.dim() < 1:
        raise ValueError(f"x0 must have a batch dimension, got shape {tuple(x0.shape)}")
    with torch.no_grad():
        if method == "dopri5":
            return _sample_dopri5(velocity, x0, return_trajectory, rtol, atol)
        return _sample_fixed(velocity, x0, method, nfe, return_trajectory)


def _sample_fixed(
    velocity: Velocity, x0: Tensor, method: str, nfe: int, return_trajectory: bool
) -> SampleResult:
    per_step = EVALS_PER_STEP[method]
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe <= 0 or nfe % per_step:
        raise ValueError(
            f"method {method!r} uses {per_step} evaluations per step, so nfe must be a positive "
            f"multiple of {per_step} (e.g. {per_step}, {2 * per_step}, {4 * per_step}), got {nfe!r}"
        )
    steps = nfe // per_step
    batch = x0.shape[0]
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=x0.dtype, device=x0.device)

    def v(t: Tensor, x: Tensor) -> Tensor:
        # The velocity sees one time per sample, as during training.
        return velocity(t.expand(batch).contiguous(), x)

    x = x0
    states = [x0] if return_trajectory else None
    for i in range(steps):
        t, h = times[i], times[i + 1] - times[i]
        if method == "euler":
            x = x + h * v(t, x)
        elif method == "midpoint":
            k1 = v(t, x)
            x = x + h * v(t + h / 2, x + (h / 2) * k1)
        elif method == "heun":
            # Trapezoid rule: Euler predictor, then average the slopes at both ends.
            k1 = v(t, x)
            k2 = v(t + h, x + h * k1)
            x = x + (h / 2) * (k1 + k2)
        else:  # rk4
            k1 = v(t, x)
            k2 = v(t + h / 2, x + (h / 2) * k1)
            k3 = v(t + h / 2, x + (h / 2) * k2)
            k4 = v(t + h, x + h * k3)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        if states is not None:
            states.append(x)
    if states is None:
        return SampleResult(x=x, nfe=nfe)
    return SampleResult(x=x, nfe=nfe, trajectory=torch.stack(states), times=times)


def _sample_dopri5(
    velocity: Velocity, x0: Tensor, return_trajectory: bool, rtol: float, atol: float
) -> SampleResult:
    # Imported here so that fixed-step sampling does not need torchdiffeq.
    from torchdiffeq import odeint

    batch = x0.shape[0]
    calls = 0

    def counted(t: Tensor, x: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return velocity(t.to(x.dtype).expand(batch).contiguous(), x)

    points = DOPRI5_TRAJECTORY_POINTS if return_trajectory else 2
    times = torch.linspace(0.0, 1.0, points, dtype=x0.dtype, device=x0.device)
    states = odeint(counted, x0, times, method="dopri5", rtol=rtol, atol=atol)
    if not return_trajectory:
        return SampleResult(x=states[-1], nfe=calls)
    return SampleResult(x=states[-1], nfe=calls, trajectory=states, times=times)
