"""Exact minibatch OT, the independent coupling, per-class pairing and the coupling factory."""

import itertools

import pytest
import torch

from sdfm.config import CouplingConfig
from sdfm.couplings import (
    ExactOTCoupling,
    IndependentCoupling,
    SinkhornCoupling,
    build_coupling,
)
from sdfm.errors import UserError
from sdfm.ot.exact import exact_ot_assignment


def brute_force(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """The optimal permutation by enumerating all n! of them."""
    x, y = x.double(), y.double()
    c = 0.5 * torch.cdist(x, y).square() if cost == "sqeuclidean" else -(x @ y.T)
    perms = torch.tensor(list(itertools.permutations(range(len(x)))))  # (n!, n)
    totals = c[torch.arange(len(x)), perms].sum(1)
    return perms[totals.argmin()]


@pytest.mark.parametrize("solver", ["auto", "lsa", "emd"])
@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_exact_matches_brute_force(cost, n, solver):
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        x, y = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) + 1
        assert torch.equal(exact_ot_assignment(x, y, cost, solver), brute_force(x, y, cost))


@pytest.mark.parametrize("d", [2, 16])
def test_both_solvers_find_the_same_optimum(d):
    g = torch.Generator().manual_seed(d)
    x, y = torch.randn(300, d, generator=g), torch.randn(300, d, generator=g) + 1
    assert torch.equal(exact_ot_assignment(x, y, solver="lsa"), exact_ot_assignment(x, y, solver="emd"))


def test_exact_coupling_pairs_by_the_permutation():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 2, 2, generator=g), torch.randn(6, 2, 2, generator=g)
    pairs = ExactOTCoupling().pair(x0, x1, None, g)
    index = exact_ot_assignment(x0.flatten(1), x1.flatten(1))
    assert torch.equal(pairs.index, index) and torch.equal(pairs.x1, x1[index]) and pairs.labels is None


def test_exact_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="both be"):
        exact_ot_assignment(torch.zeros(3, 2), torch.zeros(4, 2))


def test_independent_is_a_reproducible_permutation():
    x0, x1 = torch.randn(50, 3), torch.randn(50, 3)
    coupling = IndependentCoupling()
    a = coupling.match(x0, x1, torch.Generator().manual_seed(4))
    b = coupling.match(x0, x1, torch.Generator().manual_seed(4))
    c = coupling.match(x0, x1, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, torch.arange(50))


@pytest.mark.parametrize("kind", ["independent", "exact", "sinkhorn"])
def test_per_class_pairs_never_cross_classes(kind):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 2, 2])  # shuffled, uneven class sizes
    x0, x1 = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    coupling = build_coupling(CouplingConfig(kind=kind, max_iter=50), per_class=True)
    pairs = coupling.pair(x0, x1, labels, g)
    assert torch.equal(labels[pairs.index], labels) and torch.equal(pairs.labels, labels)
    assert torch.equal(pairs.x1, x1[pairs.index])
    if kind != "sinkhorn":  # a row sample of the entropic plan need not be a permutation
        assert torch.equal(pairs.index.sort().values, torch.arange(12))


def test_build_coupling_kinds():
    independent = build_coupling(CouplingConfig(kind="independent"), per_class=False)
    assert isinstance(independent, IndependentCoupling)
    exact = build_coupling(CouplingConfig(kind="exact", cost="dot"), per_class=True)
    assert isinstance(exact, ExactOTCoupling) and exact.cost == "dot" and exact.per_class
    cfg = CouplingConfig(kind="sinkhorn", epsilon=0.2, backend="keops", anneal_from=1.0, block_size=64)
    sink = build_coupling(cfg, per_class=False)
    assert isinstance(sink, SinkhornCoupling) and not sink.per_class
    o = sink.options
    assert (o.epsilon, o.backend, o.anneal_from, o.block_size) == (0.2, "keops", 1.0, 64)
    with pytest.raises(ValueError, match="dataset"):
        build_coupling(CouplingConfig(kind="semidiscrete"), per_class=False)
    with pytest.raises(UserError, match="coupling.kind.*'independent', 'exact', 'sinkhorn'"):
        build_coupling(CouplingConfig(kind="hungarian"), per_class=False)  # type: ignore[arg-type]
