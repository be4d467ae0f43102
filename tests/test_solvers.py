"""ODE samplers against closed forms."""

import math

import pytest
import torch

from sdfm.solvers import EVALS_PER_STEP, METHODS, sample


def cubic_velocity(t, x):
    """dx/dt = 3t^2 per coordinate, so x(1) = x(0) + 1."""
    return 3 * t.view(-1, *([1] * (x.dim() - 1))) ** 2 * torch.ones_like(x)


def exp_velocity(t, x):
    """dx/dt = x, so x(1) = e * x(0)."""
    return x


def test_rk4_integrates_cubic_exactly():
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = sample(cubic_velocity, x0, method="rk4", nfe=4)
    torch.testing.assert_close(result.x, x0 + 1, rtol=0, atol=1e-12)
    assert result.nfe == 4


@pytest.mark.parametrize("method, bound", [("midpoint", 0.25), ("heun", 0.5), ("euler", 1.0)])
def test_low_order_cubic_error_within_order(method, bound):
    # Global error for a quadratic integrand: midpoint h^2/4, trapezoid h^2/2, Euler ~ 3h/2 (first order).
    x0 = torch.zeros(2, 4, dtype=torch.float64)
    nfe = 8 * EVALS_PER_STEP[method]
    h = 1 / 8
    error = (sample(cubic_velocity, x0, method=method, nfe=nfe).x - 1).abs().max().item()
    expected = bound * h**2 if method != "euler" else 1.5 * h
    assert error <= expected * (1 + 1e-9)
    assert error > 0


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_exponential_error_shrinks_at_order(method, order):
    x0 = torch.ones(3, 2, dtype=torch.float64)
    per_step = EVALS_PER_STEP[method]
    errors = [
        (sample(exp_velocity, x0, method=method, nfe=steps * per_step).x - math.e).abs().max().item()
        for steps in (16, 32)
    ]
    # Halving the step divides the error by about 2^order.
    ratio = errors[0] / errors[1]
    assert 2**order * 0.85 < ratio < 2**order * 1.15, (method, errors, ratio)


def test_dopri5_accuracy_and_counted_nfe():
    calls = 0

    def velocity(t, x):
        nonlocal calls
        calls += 1
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        return x

    x0 = torch.ones(4, 3, dtype=torch.float64)
    result = sample(velocity, x0, method="dopri5", nfe=1)
    assert (result.x - math.e).abs().max().item() < 1e-5
    assert result.nfe > 0 and result.nfe == calls
    assert result.trajectory is None and result.times is None


def test_velocity_receives_batched_time():
    seen = []

    def velocity(t, x):
        seen.append(t.clone())
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype and t.device == x.device
        return torch.zeros_like(x)

    sample(velocity, torch.zeros(3, 2), method="heun", nfe=4)
    assert [round(float(t[0]), 6) for t in seen] == [0.0, 0.5, 0.5, 1.0]


@pytest.mark.parametrize("method, nfe", [("euler", 0), ("midpoint", 3), ("heun", 5), ("rk4", 6), ("rk4", -4)])
def test_bad_nfe_raises(method, nfe):
    with pytest.raises(ValueError, match=method):
        sample(exp_velocity, torch.ones(2, 2), method=method, nfe=nfe)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown ODE method"):
        sample(exp_velocity, torch.ones(2, 2), method="rk45")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dopri5"])
def test_fixed_step_trajectory_shapes(method):
    x0 = torch.randn(5, 1, 4, 4)
    nfe = 4 * EVALS_PER_STEP[method]
    result = sample(exp_velocity, x0, method=method, nfe=nfe, return_trajectory=True)
    assert result.trajectory.shape == (5, 5, 1, 4, 4)
    torch.testing.assert_close(result.times, torch.linspace(0, 1, 5))
    torch.testing.assert_close(result.trajectory[0], x0)
    torch.testing.assert_close(result.trajectory[-1], result.x)


def test_dopri5_trajectory_shapes():
    x0 = torch.ones(2, 3, dtype=torch.float64)
    result = sample(exp_velocity, x0, method="dopri5", return_trajectory=True)
    assert result.trajectory.shape == (9, 2, 3)
    assert result.times.shape == (9,)
    expected = torch.exp(result.times)[:, None, None].expand(9, 2, 3)
    torch.testing.assert_close(result.trajectory, expected, rtol=1e-5, atol=1e-5)


def test_sample_builds_no_graph():
    weight = torch.ones(1, requires_grad=True)
    result = sample(lambda t, x: weight * x, torch.ones(2, 2), method="euler", nfe=2)
    assert not result.x.requires_grad
