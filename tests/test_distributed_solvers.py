"""Sharded Sinkhorn and sharded matching on real gloo process groups (2 and 3 CPU ranks), checked
against single-process runs on the concatenated batch / the full dataset.

Spawning ranks costs seconds, so each world size is launched once (a module-scoped fixture) and its
ranks run every scenario, returning what they saw; the tests compare that with the references. Every
launch has a hard deadline (``run_local``: collective timeout + killing stragglers).
"""

from __future__ import annotations

import pytest
import torch

from sdfm.couplings.sinkhorn import SinkhornCoupling
from sdfm.distributed.spawn import run_local
from sdfm.ot.sinkhorn import SinkhornOptions, sinkhorn
from sdfm.semidiscrete.index import MatchIndex, reference_argmax

DEADLINE_S = 90.0
pytestmark = pytest.mark.timeout(4 * DEADLINE_S)  # a backstop: run_local itself kills a launch at DEADLINE_S
# Rows per rank: uneven, and with 3 ranks one rank holds none.
ROWS = {2: [37, 27], 3: [30, 0, 34]}
# Data points per shard (matching), queries per rank.
SHARDS = {2: [61, 40], 3: [45, 1, 55]}
QUERIES = {2: [13, 20], 3: [10, 0, 17]}
SOLVE = dict(epsilon=0.1, tol=0.0, max_iter=60, check_every=10)  # a fixed iteration count
CONVERGED = dict(epsilon=0.05, tol=1e-4, max_iter=2000, check_every=10)
ANNEALED = dict(CONVERGED, anneal_from=1.0)


def points(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), 0.5 * torch.randn(m, d, generator=g) + 1.5


def split(t: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return t[start : start + counts[rank]]


def batch(world: int, step: int) -> dict[str, torch.Tensor]:
    """A global batch of (x0, x1, labels) for the couplings, 3 classes in shuffled order."""
    n = sum(ROWS[world])
    x0, x1 = points(n, n, 2, seed=100 + step)
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(200 + step)) % 3
    return {"x0": x0, "x1": x1, "labels": labels}


def dataset(world: int) -> dict[str, torch.Tensor]:
    """Data points with a duplicate across the first and last shard (an exact tie), their potential,
    labels, and queries (some aimed at the duplicate)."""
    n, b = sum(SHARDS[world]), sum(QUERIES[world])
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(n, 5, generator=gen)
    g = 0.3 * torch.randn(n, generator=gen)
    y[2] = 4.0 * y[2] / y[2].norm()  # far out, so that the queries below pick it
    y[-1], g[-1] = y[2], g[2]  # the same point and potential in two shards: the lower id must win
    x = torch.randn(b, 5, generator=gen)
    x[::4] = 50.0 * y[2]  # these queries pick the duplicated point
    labels = torch.arange(n) % 3
    labels[-1] = labels[2]
    return {"y": y, "g": g, "x": x, "labels": labels, "query_labels": torch.arange(b) % 3}


def _ranks(rank: int, world: int, keops: bool) -> dict:
    """Every scenario on one rank; returns what it computed (CPU tensors, floats, error messages)."""
    from sdfm.distributed.collectives import GroupCollectives, all_gather_rows
    from sdfm.distributed.matching import ShardedMatchIndex
    from sdfm.distributed.sinkhorn import ShardedSinkhornCoupling, sharded_sinkhorn
    from sdfm.errors import UserError

    out: dict = {}
    x, y = points(sum(ROWS[world]), 50, 3, seed=world)
    xr = split(x, ROWS[world], rank)
    gathered = all_gather_rows(split(y, [25, 25] if world == 2 else [17, 16, 17], rank))
    assert torch.equal(gathered.rows, y)
    for cost in ("sqeuclidean", "dot"):
        r = sharded_sinkhorn(xr, y, SinkhornOptions(cost=cost, **SOLVE))
        out[f"fixed_{cost}"] = (r.f, r.g, r.eps, r.err, r.iters, r.row_offset, r.comm_s)
    r = sharded_sinkhorn(xr, y, SinkhornOptions(**ANNEALED))
    out["annealed"] = (r.f, r.g, r.eps, r.err, r.iters)
    r = sharded_sinkhorn(xr, y, SinkhornOptions(**CONVERGED))
    out["converged"] = (r.f, r.g, r.eps, r.err, r.iters)
    x2 = split(x + 0.01, ROWS[world], rank)
    warm = sharded_sinkhorn(x2, y, SinkhornOptions(**CONVERGED), g_init=r.g)
    out["warm_g"] = (warm.f, warm.g, warm.iters)
    warm = sharded_sinkhorn(x2, y, SinkhornOptions(**CONVERGED), f_init=r.f)
    out["warm_f"] = (warm.f, warm.g, warm.iters)
    if keops:
        xk, yk = points(16, 12, 3, seed=5)
        r = sharded_sinkhorn(split(xk, [9, 7], rank), yk, SinkhornOptions(backend="keops", **SOLVE))
        out["keops"] = (r.f, r.g, r.iters)

    # Couplings: two steps each (the second one warm-started), per-rank generators seeded differently.
    for per_class in (False, True):
        coupling = ShardedSinkhornCoupling(
            SinkhornCoupling(SinkhornOptions(epsilon=0.1, tol=1e-5), warm_start=True, per_class=per_class), GroupCollectives()
        )
        gen = torch.Generator().manual_seed(11 + rank)
        for step in range(2):
            b = {k: split(v, ROWS[world], rank) for k, v in batch(world, step).items()}
            pairs = coupling.pair(b["x0"], b["x1"], b["labels"], gen)
            out[f"pairs_{per_class}_{step}"] = (pairs.index, pairs.x1, pairs.labels)
        out[f"stats_{per_class}"] = coupling.stats()
        out[f"state_{per_class}"] = coupling.state_dict()

    # Matching: the shard's index, then a new potential given as this rank's slice.
    data = dataset(world)
    index = ShardedMatchIndex(split(data["y"], SHARDS[world], rank))
    index.set_potential(data["g"])
    found = index.search(split(data["x"], QUERIES[world], rank))
    out["match"] = (found.index, found.points)
    index.set_potential(split(-data["g"], SHARDS[world], rank))
    out["match_neg"] = index.search(split(data["x"], QUERIES[world], rank)).index
    labeled = ShardedMatchIndex(
        split(data["y"], SHARDS[world], rank), labels=split(data["labels"], SHARDS[world], rank)
    )
    labeled.set_potential(data["g"])
    qr = split(data["x"], QUERIES[world], rank)
    out["match_labeled"] = labeled.search(qr, split(data["query_labels"], QUERIES[world], rank)).index

    # Bad input: ranks disagree about d; one rank's f_init has the wrong shape. Every rank must raise
    # (nobody left waiting in a collective), and the group stays usable afterwards.
    errors = []
    for kwargs in (
        {"x_local": torch.zeros(4, 3 + rank), "y": torch.zeros(6, 3 + rank)},
        {"x_local": torch.zeros(4, 3), "y": torch.zeros(6, 3), "f_init": torch.zeros(4 + (rank == 1))},
    ):
        try:
            sharded_sinkhorn(**kwargs)
        except ValueError as e:
            errors.append(str(e))
    try:
        index.search(torch.zeros(2, 5 + (rank == world - 1)))
    except UserError as e:
        errors.append(str(e))
    out["errors"] = errors
    out["after_errors"] = all_gather_rows(torch.full((1,), float(rank))).rows
    return out


@pytest.fixture(scope="session")  # once per xdist worker, even if its tests of this module come in several runs
def launches() -> dict[int, list[dict] | Exception]:
    """What the ranks of each world size returned, launched on first use: once per world size for
    the module whatever order the tests run in (a parametrized module fixture is set up again each
    time the order switches between its parameters, as under pytest-xdist)."""
    return {}


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, launches) -> tuple[int, list[dict]]:
    world = request.param
    if world not in launches:
        keops = world == 2
        try:
            if keops:  # compile the KeOps formula here once, not in two ranks racing for the cache
                xk, yk = points(16, 12, 3, seed=5)
                sinkhorn(xk, yk, SinkhornOptions(backend="keops", **SOLVE))
            launches[world] = run_local(_ranks, world, args=(keops,), timeout_s=DEADLINE_S)
        except Exception as e:  # a failed launch fails every test of its size at once, not after a relaunch each
            launches[world] = e
    if isinstance(launches[world], Exception):
        raise launches[world]
    return world, launches[world]


def cat(outs: list[dict], key: str, item: int) -> torch.Tensor:
    return torch.cat([o[key][item] for o in outs])


@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
@pytest.mark.slow
def test_sharded_sinkhorn_equals_single_process(ranks, cost):
    world, outs = ranks
    x, y = points(sum(ROWS[world]), 50, 3, seed=world)
    ref = sinkhorn(x, y, SinkhornOptions(cost=cost, **SOLVE))
    key = f"fixed_{cost}"
    torch.testing.assert_close(cat(outs, key, 0), ref.f, rtol=0, atol=1e-4)
    for o, offset in zip(outs, [sum(ROWS[world][:r]) for r in range(world)], strict=True):
        f, g, eps, err, iters, row_offset, comm_s = o[key]
        torch.testing.assert_close(g, ref.g, rtol=0, atol=1e-4)
        assert eps == pytest.approx(ref.eps, rel=1e-12) and iters == ref.iters == 60
        assert err == pytest.approx(ref.err, rel=1e-3, abs=1e-7) and row_offset == offset
        assert comm_s > 0
    assert all(torch.equal(o[key][1], outs[0][key][1]) for o in outs)  # one g on every rank


def test_annealing_and_warm_starts_match_single_process(ranks):
    world, outs = ranks
    x, y = points(sum(ROWS[world]), 50, 3, seed=world)
    for key, options in (("annealed", ANNEALED), ("converged", CONVERGED)):
        ref = sinkhorn(x, y, SinkhornOptions(**options))
        assert ref.err < 1e-4
        assert [o[key][4] for o in outs] == [ref.iters] * world
        torch.testing.assert_close(cat(outs, key, 0), ref.f, rtol=0, atol=1e-4)
        torch.testing.assert_close(outs[0][key][1], ref.g, rtol=0, atol=1e-4)
    for key, init in (("warm_g", {"g_init": ref.g}), ("warm_f", {"f_init": ref.f})):
        warm = sinkhorn(x + 0.01, y, SinkhornOptions(**CONVERGED), **init)
        assert outs[0][key][2] == warm.iters < ref.iters
        torch.testing.assert_close(cat(outs, key, 0), warm.f, rtol=0, atol=1e-4)
        torch.testing.assert_close(outs[-1][key][1], warm.g, rtol=0, atol=1e-4)


def test_keops_backend_sharded(ranks):
    world, outs = ranks
    if world != 2:
        pytest.skip("KeOps is checked once, with 2 ranks (each new formula compiles for ~10 s)")
    xk, yk = points(16, 12, 3, seed=5)
    ref = sinkhorn(xk, yk, SinkhornOptions(backend="keops", **SOLVE))
    torch.testing.assert_close(cat(outs, "keops", 0), ref.f, rtol=0, atol=1e-4)
    torch.testing.assert_close(outs[1]["keops"][1], ref.g, rtol=0, atol=1e-4)
    assert outs[0]["keops"][2] == ref.iters


@pytest.mark.parametrize("per_class", [False, True], ids=["global", "per_class"])
def test_sharded_pairs_equal_single_process_pairs(ranks, per_class):
    world, outs = ranks
    coupling = SinkhornCoupling(SinkhornOptions(epsilon=0.1, tol=1e-5), warm_start=True, per_class=per_class)
    gen = torch.Generator().manual_seed(11)  # rank 0's seed: the shared sampling seed comes from rank 0
    for step in range(2):
        b = batch(world, step)
        ref = coupling.pair(b["x0"], b["x1"], b["labels"], gen)
        key = f"pairs_{per_class}_{step}"
        assert torch.equal(cat(outs, key, 0), ref.index)
        assert torch.equal(cat(outs, key, 1), ref.x1)
        assert torch.equal(cat(outs, key, 2), ref.labels)
        if per_class:
            assert torch.equal(ref.labels, b["labels"])  # pairs never cross classes
    last = coupling.stats()
    stats = outs[0][f"stats_{per_class}"]
    assert stats["sinkhorn_iters"] == last["sinkhorn_iters"]
    assert 0 < stats["sinkhorn_comm_ms"] <= stats["sinkhorn_total_ms"]
    state = outs[-1][f"state_{per_class}"]
    torch.testing.assert_close(state["g"], coupling.state_dict()["g"], rtol=0, atol=1e-4)
    assert int(state["n"]) == int(coupling.state_dict()["n"])


def test_sharded_matching_equals_unsharded_index(ranks):
    world, outs = ranks
    data = dataset(world)
    full = MatchIndex(data["y"])
    for key, g in (("match", data["g"]), ("match_neg", -data["g"])):
        full.set_potential(g)
        expected = full.search(data["x"])
        got = torch.cat([o[key][0] if key == "match" else o[key] for o in outs])
        assert torch.equal(got, expected)
        assert torch.equal(got, reference_argmax(data["x"], data["y"], g))
    assert (expected[::4] == 2).all()  # the exact tie across shards went to the smaller global id
    full.set_potential(data["g"])
    assert torch.equal(cat(outs, "match", 1), data["y"][full.search(data["x"])])


def test_sharded_matching_with_labels(ranks):
    world, outs = ranks
    data = dataset(world)
    full = MatchIndex(data["y"], labels=data["labels"])
    full.set_potential(data["g"])
    expected = full.search(data["x"], data["query_labels"])
    assert torch.equal(torch.cat([o["match_labeled"] for o in outs]), expected)
    assert torch.equal(data["labels"][expected], data["query_labels"])


def test_bad_input_fails_on_every_rank_without_hanging(ranks):
    world, outs = ranks
    for o in outs:
        d_msg, f_msg, q_msg = o["errors"]
        assert d_msg == outs[0]["errors"][0] and "ranks disagree about d" in d_msg and "\n" not in d_msg
        assert f_msg.startswith("rank 1: f_init must have shape")
        assert q_msg.startswith(f"rank {world - 1}: queries have shape")
        assert torch.equal(o["after_errors"], torch.arange(world, dtype=torch.float32))
