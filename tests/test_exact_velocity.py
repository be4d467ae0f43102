import torch

from sdfm.semidiscrete import FitBudget, FitterOptions, fit_potential
from sdfm.semidiscrete.velocity import ExactVelocity, velocity_gap
from sdfm.solvers import sample


def _problem(n=200, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=gen) * 2 + 1
    g = fit_potential(
        y, FitterOptions(batch_size=128), FitBudget(max_steps=200, target_chi2=0.2), log=None, progress=False
    ).g
    x0 = torch.randn(64, d, generator=gen)
    return y, g, x0


def test_integrating_exact_velocity_lands_on_the_t0_match():
    y, g, x0 = _problem()
    v = ExactVelocity(y, g)
    k0 = v.target(0.0, x0)
    # the t = 0 target is the training-time matching argmax_j <x0, y_j> + g_j
    assert torch.equal(k0, torch.argmax(x0.double() @ y.double().T + g.double(), dim=1))
    for method, nfe in [("euler", 1), ("euler", 7), ("midpoint", 8)]:
        x1 = sample(v, x0, method=method, nfe=nfe).x
        torch.testing.assert_close(x1, y[k0], rtol=0, atol=1e-4, msg=f"{method} {nfe}")
    # v* is singular at t = 1: a solver that evaluates there is refused rather than given garbage
    import pytest

    with pytest.raises(ValueError, match="singular"):
        sample(v, x0, method="rk4", nfe=8)


def test_target_is_constant_along_the_straight_path():
    y, g, x0 = _problem(seed=1)
    v = ExactVelocity(y, g)
    k0 = v.target(0.0, x0)
    for t in (0.1, 0.5, 0.9, 0.99):
        xt = (1 - t) * x0 + t * y[k0]
        assert torch.equal(v.target(t, xt), k0)
        torch.testing.assert_close(v(torch.full((64,), t), xt), y[k0] - x0, rtol=1e-4, atol=1e-3)


def test_velocity_gap_is_zero_for_the_exact_field_and_positive_otherwise():
    y, g, x0 = _problem(seed=2)
    v = ExactVelocity(y, g)
    assert velocity_gap(v, v, x0, None, [0.0, 0.5])["mean"] < 1e-8
    assert velocity_gap(lambda t, x: torch.zeros_like(x), v, x0, None, [0.0, 0.5])["mean"] > 0.1


def test_conditional_exact_velocity_stays_in_class():
    y, g, x0 = _problem(seed=3)
    labels = torch.arange(len(y)) % 3
    q = torch.arange(len(x0)) % 3
    v = ExactVelocity(y, g, labels=labels)
    k = v.target(0.0, x0, q)
    assert torch.equal(labels[k], q)
