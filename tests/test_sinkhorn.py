"""Entropic Sinkhorn: cost spread, potentials against POT, backends, row sampling, the coupling."""

import math

import numpy as np
import ot
import pytest
import torch

from sdfm.couplings import SinkhornCoupling
from sdfm.ot import SinkhornOptions, cost_std, exact_ot_assignment, marginal_errors, sample_rows, sinkhorn


def points(n: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = 0.5 * torch.randn(m, d, generator=g) + 1.5  # shifted and narrower: a non-trivial plan
    return x, y


def dense_cost(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    x, y = x.double(), y.double()
    if cost == "sqeuclidean":
        return 0.5 * (x[:, None, :] - y[None, :, :]).square().sum(-1)
    return -(x @ y.T)


def dense_plan(x, y, result, cost) -> torch.Tensor:
    c = dense_cost(x, y, cost)
    n, m = c.shape
    return torch.exp((result.f.double()[:, None] + result.g.double()[None, :] - c) / result.eps) / (n * m)


@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
@pytest.mark.parametrize("d", [1, 3, 17])
def test_cost_std_matches_dense(cost, d):
    x, y = points(50, 70, d, seed=d)
    x = x + 10.0  # a large offset: the moment formula must not cancel catastrophically
    assert cost_std(x, y, cost) == pytest.approx(dense_cost(x, y, cost).std(correction=0).item(), rel=1e-9)


@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
@pytest.mark.parametrize(("n", "m", "d"), [(64, 64, 2), (200, 150, 5)])
def test_sinkhorn_matches_pot(cost, n, m, d):
    x, y = points(n, m, d)
    result = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, cost=cost, tol=1e-6, max_iter=5000))
    assert result.err < 1e-6 and result.iters < 5000
    c = dense_cost(x, y, cost).numpy()
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    ref = ot.bregman.sinkhorn_log(a, b, c, result.eps, numItermax=20000, stopThr=1e-10)
    plan = dense_plan(x, y, result, cost).numpy()
    assert np.abs(plan - ref).sum() < 1e-4
    assert (plan * c).sum() == pytest.approx((ref * c).sum(), rel=1e-5, abs=1e-6)
    assert np.abs(plan.sum(1) - 1 / n).sum() < 2e-6
    assert np.abs(plan.sum(0) - 1 / m).sum() < 2e-6
    row_err, col_err = marginal_errors(x, y, result.f, result.g, result.eps, cost=cost, block_size=32)
    assert row_err == pytest.approx(result.err, abs=1e-6) and col_err < 1e-6


def test_blocked_equals_unblocked_and_rectangular():
    x, y = points(90, 61, 3)
    # A fixed iteration count (tol unreachable), so both runs do the same number of updates.
    big = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, tol=1e-12, max_iter=100, block_size=4096))
    small = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, tol=1e-12, max_iter=100, block_size=16))
    assert big.f.shape == (90,) and big.g.shape == (61,) and big.err < 1e-4
    torch.testing.assert_close(small.f, big.f, rtol=0, atol=1e-4)
    torch.testing.assert_close(small.g, big.g, rtol=0, atol=1e-4)


def test_warm_start_reduces_iterations():
    x, y = points(128, 128, 2)
    cold = sinkhorn(x, y, SinkhornOptions(epsilon=0.05, tol=1e-4))
    # A slightly perturbed batch: the previous potentials are close to the new ones.
    x2 = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    warm = sinkhorn(x2, y, SinkhornOptions(epsilon=0.05, tol=1e-4), g_init=cold.g)
    again = sinkhorn(x2, y, SinkhornOptions(epsilon=0.05, tol=1e-4))
    assert warm.err < 1e-4 and warm.iters < again.iters / 2


def test_annealing_reaches_the_same_potentials():
    x, y = points(100, 100, 2)
    plain = sinkhorn(x, y, SinkhornOptions(epsilon=0.05, tol=1e-6, max_iter=5000))
    annealed = sinkhorn(x, y, SinkhornOptions(epsilon=0.05, tol=1e-6, max_iter=5000, anneal_from=1.0))
    assert annealed.eps == pytest.approx(plain.eps) and annealed.err < 1e-6
    # Potentials are unique up to f + k, g - k.
    shift = (annealed.f - plain.f).mean()
    torch.testing.assert_close(annealed.f - shift, plain.f, rtol=0, atol=1e-3)
    torch.testing.assert_close(annealed.g + shift, plain.g, rtol=0, atol=1e-3)


def test_max_iter_caps_and_reports_error():
    x, y = points(64, 64, 2)
    result = sinkhorn(x, y, SinkhornOptions(epsilon=0.01, tol=1e-9, max_iter=7, check_every=3))
    assert result.iters == 7 and result.err > 1e-9
    assert result.err == pytest.approx(marginal_errors(x, y, result.f, result.g, result.eps)[0], rel=1e-3)


@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
def test_keops_matches_torch(cost):
    x, y = points(120, 90, 3)
    ref = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, cost=cost, tol=1e-12, max_iter=100, backend="torch"))
    out = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, cost=cost, tol=1e-12, max_iter=100, backend="keops"))
    assert ref.err < 1e-4 and out.err == pytest.approx(ref.err, rel=0.1, abs=1e-6)
    scale = ref.f.abs().max()
    torch.testing.assert_close(out.f, ref.f, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(out.g, ref.g, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
def test_sample_rows_follows_the_plan(cost):
    x, y = points(4, 5, 2)
    result = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, cost=cost, tol=1e-7, max_iter=5000))
    conditional = dense_plan(x, y, result, cost)
    conditional = conditional / conditional.sum(1, keepdim=True)
    # 20 seeds x 500 copies of each row: the copies have distinct row ids, hence independent noise.
    copies, seeds = 500, 20
    rows = torch.arange(4).repeat_interleave(copies)
    counts = torch.zeros(4, 5, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    for seed in range(seeds):
        counts.index_put_(
            (rows, sample_rows(x[rows], y, result, SinkhornOptions(cost=cost), seed=seed)),
            one,
            accumulate=True,
        )
    # Binomial standard deviation <= 0.5 / sqrt(10^4) = 0.005 per cell, so 0.025 is 5 sigma; sampling
    # with g = 0 instead of the potential misses by > 0.18 here.
    assert (counts / (copies * seeds) - conditional).abs().max() < 0.025


def test_sample_rows_is_counter_based():
    x, y = points(40, 33, 3)
    result = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, tol=1e-4))
    full = sample_rows(x, y, result, SinkhornOptions(block_size=1000), seed=7)
    assert full.dtype == torch.long and full.shape == (40,)
    assert torch.equal(sample_rows(x, y, result, SinkhornOptions(block_size=3), seed=7), full)
    assert torch.equal(sample_rows(x[5:10], y, result, SinkhornOptions(), seed=7, row_offset=5), full[5:10])
    assert not torch.equal(sample_rows(x, y, result, SinkhornOptions(), seed=8), full)


def test_tiny_epsilon_coupling_is_exact_ot():
    x, y = points(16, 16, 2, seed=3)
    coupling = SinkhornCoupling(SinkhornOptions(epsilon=1e-3, anneal_from=1.0, tol=1e-4, max_iter=20000))
    index = coupling.match(x, y, torch.Generator().manual_seed(0))
    exact = exact_ot_assignment(x, y)
    c = dense_cost(x, y, "sqeuclidean")
    rows = torch.arange(16)
    assert c[rows, index].sum() <= 1.01 * c[rows, exact].sum()
    stats = coupling.stats()
    assert set(stats) == {"sinkhorn_iters", "sinkhorn_err", "sinkhorn_eps"} and stats["sinkhorn_err"] < 1e-4


def test_coupling_state_round_trip_is_bit_identical():
    x, y = points(32, 32, 2)
    x2, y2 = points(32, 32, 2, seed=5)
    a = SinkhornCoupling(SinkhornOptions(epsilon=0.05, tol=1e-3), warm_start=True)
    assert a.state_dict() == {} and a.stats() == {}
    a.match(x, y, torch.Generator().manual_seed(0))
    b = SinkhornCoupling(SinkhornOptions(epsilon=0.05, tol=1e-3), warm_start=True)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"g", "n"}
    ia = a.match(x2, y2, torch.Generator().manual_seed(1))
    ib = b.match(x2, y2, torch.Generator().manual_seed(1))
    assert torch.equal(ia, ib) and a.stats() == b.stats()
    assert torch.equal(a.state_dict()["g"], b.state_dict()["g"])
    with pytest.raises(ValueError, match="keys"):
        b.load_state_dict({"g": a.state_dict()["g"]})


def test_bad_inputs_are_rejected():
    x, y = points(8, 8, 2)
    with pytest.raises(ValueError, match="cost"):
        sinkhorn(x, y, SinkhornOptions(cost="l1"))
    with pytest.raises(ValueError, match="backend"):
        sinkhorn(x, y, SinkhornOptions(backend="jax"))
    with pytest.raises(ValueError, match="same d"):
        sinkhorn(x, y[:, :1])
    with pytest.raises(ValueError, match="g_init"):
        sinkhorn(x, y, g_init=torch.zeros(3))


def test_dense_and_blocked_reductions_agree(monkeypatch):
    """Small batches keep the scores in memory; large ones recompute them in blocks: same solve."""
    import importlib

    sk = importlib.import_module("sdfm.ot.sinkhorn")  # the package's `sinkhorn` is the function

    x, y = points(300, 280, 5, seed=7)
    dense = sk.sinkhorn(x, y, SinkhornOptions(epsilon=0.05, anneal_from=0.5, tol=1e-5))
    monkeypatch.setattr(sk, "DENSE_SCORES", 0)
    blocked = sk.sinkhorn(x, y, SinkhornOptions(epsilon=0.05, anneal_from=0.5, tol=1e-5, block_size=128))
    assert dense.iters == blocked.iters
    torch.testing.assert_close(dense.g, blocked.g, atol=1e-4, rtol=0)
    torch.testing.assert_close(dense.f, blocked.f, atol=1e-4, rtol=0)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("precision", "atol"), [("fp64", 1e-10), ("fp32", 1e-4)])
def test_two_point_plan_has_the_closed_form(epsilon, precision, atol):
    """n = m = 2: the marginals force P = [[p, 1/2 - p], [1/2 - p, p]], and the cross ratio
    P11 P22 / (P12 P21) = K11 K22 / (K12 K21) (K = exp(-C / eps)) survives Sinkhorn's diagonal
    scalings, so p / (1/2 - p) = r = exp(-(C11 + C22 - C12 - C21) / (2 eps)) (docs/design.md §5)."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.5]])
    y = torch.tensor([[0.2, -0.1], [1.5, 1.0]])
    result = sinkhorn(x, y, SinkhornOptions(epsilon=epsilon, tol=1e-12, max_iter=2000, precision=precision))
    c = dense_cost(x, y, "sqeuclidean")
    r = math.exp(-(c[0, 0] + c[1, 1] - c[0, 1] - c[1, 0]).item() / (2 * result.eps))
    p = r / (2 * (1 + r))
    expected = torch.tensor([[p, 0.5 - p], [0.5 - p, p]], dtype=torch.float64)
    torch.testing.assert_close(dense_plan(x, y, result, "sqeuclidean"), expected, rtol=0, atol=atol)


def test_one_dimensional_exact_ot_sorts():
    """In one dimension the optimal permutation is the monotone one: the i-th smallest source goes to
    the i-th smallest target, for the squared cost."""
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(64, 1, generator=gen), 3 * torch.rand(64, 1, generator=gen)
    perm = exact_ot_assignment(x, y)
    rank_x, rank_y = torch.argsort(torch.argsort(x[:, 0])), torch.argsort(torch.argsort(y[:, 0]))
    assert torch.equal(rank_y[perm], rank_x)


UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "bf16x3": 2.0**-15}
"""Relative rounding of one operand of the score products in each precision (bf16x3: hi + lo)."""


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "bf16x3"])
@pytest.mark.parametrize(("d", "epsilon"), [(2, 0.05), (16, 0.02)])
def test_low_precision_products_stay_within_their_stated_error(precision, d, epsilon, device):
    """The potentials of each product precision deviate from the float64 loop by at most
    2 u max_ij |x~_i||y~_j| (in units of eps: u the operands' relative rounding, x~, y~ the points in
    units of sqrt(eps)) beyond what fp32 itself deviates; potentials and marginals stay fp32. On CUDA
    the products run on tensor cores (tf32, bf16)."""
    from sdfm.ot.sinkhorn import scaled

    x, y = (p.to(device) for p in points(300, 260, d, seed=d))
    options = dict(epsilon=epsilon, tol=0.0, max_iter=40)
    ref = sinkhorn(x, y, SinkhornOptions(**options, precision="fp64"))

    def deviation(result) -> float:
        shift = (result.f.double() - ref.f).mean()
        worst = max(
            (result.f.double() - ref.f - shift).abs().max(), (result.g.double() - ref.g + shift).abs().max()
        )
        return float(worst) / ref.eps

    xs, ys, _, _ = scaled(x, y, ref.eps, "sqeuclidean")
    spread = float(xs.norm(dim=1).max() * ys.norm(dim=1).max())
    fp32 = deviation(sinkhorn(x, y, SinkhornOptions(**options)))
    result = sinkhorn(x, y, SinkhornOptions(**options, precision=precision))
    assert result.f.dtype == result.g.dtype == torch.float32
    assert deviation(result) <= 2 * UNIT_ROUNDOFF[precision] * spread + 2 * fp32
    if precision == "bf16x3":  # three bf16 products: far closer than one
        bf16 = deviation(sinkhorn(x, y, SinkhornOptions(**options, precision="bf16")))
        assert deviation(result) < bf16 / 20


@pytest.mark.parametrize("precision", ["tf32", "bf16", "bf16x3"])
def test_low_precision_dense_blocked_and_sampling_agree(monkeypatch, precision):
    """In-memory and blocked scores are the same products; the coupling samples with them."""
    import importlib

    sk = importlib.import_module("sdfm.ot.sinkhorn")
    x, y = points(200, 180, 5, seed=3)
    options = SinkhornOptions(epsilon=0.1, tol=0.0, max_iter=30, precision=precision, block_size=64)
    dense = sk.sinkhorn(x, y, options)
    monkeypatch.setattr(sk, "DENSE_SCORES", 0)
    blocked = sk.sinkhorn(x, y, options)
    torch.testing.assert_close(dense.g, blocked.g, atol=1e-4 * dense.eps, rtol=0)
    index = SinkhornCoupling(options).match(x, y, torch.Generator().manual_seed(0))
    assert index.shape == (200,) and bool((index >= 0).all() and (index < 180).all())
