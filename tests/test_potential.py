"""Fitting the semidiscrete dual potential: the χ̂² estimator against a closed form, convergence of
every method (ε = 0 and ε > 0, labels, PCA), problems whose answer is known (and the default
fitter's cells converging to it as the budget grows), exact resume, the stop rule, and the
potential file format with each of its errors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdfm.errors import UserError
from sdfm.semidiscrete import (
    Chi2Evaluator,
    FitBudget,
    FitterOptions,
    MatchIndex,
    PotentialFitter,
    fit_potential,
    load_potential,
    save_potential,
)
from sdfm.semidiscrete.chi2 import confirming_samples
from sdfm.semidiscrete.coarse import coarse_start
from sdfm.semidiscrete.methods import HIGH_DIM, METHODS, resolve_method

FITTED = [m for m in METHODS if m != "auto"]  # 'auto' runs one of these (test below)

A = torch.tensor([1.5, 0.0])


pytestmark = pytest.mark.usefixtures("one_thread")


def _points(n: int = 200, d: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.3, d)
    return torch.randn(n, d, generator=gen) * scale + 1.0


def _two_point_marginal(delta: float, epsilon: float) -> float:
    """Mass of +a for y = (+a, -a), g = (δ, -δ), x ~ N(0, I): the point +a wins when
    2<x, a> + 2δ > 0, i.e. z > -δ/|a| with z ~ N(0, 1); with ε > 0 it gets sigmoid((2|a|z + 2δ)/ε)."""
    r = float(A.norm())
    if epsilon == 0:
        return 0.5 * (1 + math.erf(delta / r / math.sqrt(2)))
    z, w = np.polynomial.hermite_e.hermegauss(200)
    s = 1 / (1 + np.exp(-(2 * r * z + 2 * delta) / epsilon))
    return float((w * s).sum() / w.sum())


@pytest.mark.parametrize("epsilon", [0.0, 0.7])
def test_chi2_estimator_matches_closed_form(epsilon):
    y = torch.stack([A, -A])
    evaluator = Chi2Evaluator(y, epsilon=epsilon, num_samples=200_000, batch_size=8192)
    for delta in [0.0, 0.4, -1.0]:
        m = _two_point_marginal(delta, epsilon)
        exact = 2 * (m**2 + (1 - m) ** 2) - 1  # Σ_j m_j² / b_j - 1 with b = (1/2, 1/2)
        assert evaluator(torch.tensor([delta, -delta])) == pytest.approx(exact, abs=0.01)


@pytest.mark.parametrize("block", [1 << 24, 21_000, 3000])  # all rows; blocks of 70 rows; two passes over N
def test_softmax_sums_are_exact_in_every_blocking(monkeypatch, block):
    from sdfm.semidiscrete import softmax

    gen = torch.Generator().manual_seed(0)
    q, keys, g = (
        torch.randn(100, 5, generator=gen),
        torch.randn(300, 5, generator=gen),
        torch.randn(300, generator=gen),
    )
    monkeypatch.setattr(softmax, "SOFTMAX_BLOCK", block)
    col_sum, col_sq = softmax.softmax_sums(q, keys, g, 0.7)
    s = torch.softmax((q.double() @ keys.double().T + g.double()) / 0.7, dim=1)
    assert torch.allclose(col_sum.double(), s.sum(0), atol=1e-5)
    assert torch.allclose(col_sq.double(), s.square().sum(0), atol=1e-5)


@pytest.mark.parametrize("method", FITTED)
@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_fit_drives_chi2_down(method, epsilon):
    y = _points()
    fitter = PotentialFitter(y, FitterOptions(epsilon=epsilon, method=method, batch_size=256, seed=1))
    start = fitter.evaluate(4096, torch.Generator().manual_seed(2), torch.zeros(len(y)))
    reports = [fitter.step() for _ in range(400)]
    end = fitter.evaluate(4096, torch.Generator().manual_seed(2))
    assert end < 0.1 and end < start / 20, (start, end)
    assert reports[-1]["step"] == 400 and math.isfinite(reports[-1]["chi2"])
    if method == "averaged_sgd":
        assert reports[0]["epsilon"] >= reports[-1]["epsilon"] >= epsilon  # ε_t = max(ε, ε0 / sqrt(t))
        assert epsilon > 0 or reports[0]["epsilon"] > reports[-1]["epsilon"]
    if method == "sgd_tail":  # lr0 / sqrt(1 + t / 100)
        assert reports[-1]["lr"] == pytest.approx(fitter.lr / math.sqrt(5))
    assert (reports[0]["lr"] > reports[-1]["lr"]) == (method != "sgd_ema")
    # The gradient sums to zero, so the mean of g stays at g0 = 0.
    assert abs(float(fitter.potential().mean())) < 1e-3 * float(fitter.potential().abs().max())


@pytest.mark.parametrize("method", FITTED)
def test_fit_with_labels_stays_within_classes(method):
    y = _points()
    labels = torch.randint(0, 3, (len(y),), generator=torch.Generator().manual_seed(4))
    fitter = PotentialFitter(y, FitterOptions(method=method, batch_size=256), labels=labels)
    start = fitter.evaluate(4096, torch.Generator().manual_seed(2), torch.zeros(len(y)))
    for _ in range(400):
        fitter.step()
    end = fitter.evaluate(4096, torch.Generator().manual_seed(2))
    assert end < 0.1 and end < start / 20, (start, end)
    g = fitter.potential()
    for c in range(3):  # one block per class, each with zero-sum gradients
        assert abs(float(g[labels == c].sum())) < 1e-2 * float(g.abs().max()) * int((labels == c).sum())


def test_fit_in_pca_space():
    y = _points(d=8)
    fitter = PotentialFitter(y, FitterOptions(batch_size=256, pca_dim=3))
    start = fitter.evaluate(4096, torch.Generator().manual_seed(2), torch.zeros(len(y)))
    for _ in range(400):
        fitter.step()
    end = fitter.evaluate(4096, torch.Generator().manual_seed(2))
    assert end < 0.1 and end < start / 20, (start, end)
    assert fitter.index.match_dim == 3


@pytest.mark.parametrize("method", FITTED)
def test_symmetric_two_points_have_zero_potential(method):
    # Cells of ±a under g = 0 are the half-spaces <x, a> > 0 and < 0, each of mass 1/2: g* = 0.
    fitter = PotentialFitter(torch.stack([A, -A]), FitterOptions(method=method, batch_size=256))
    for _ in range(300):
        fitter.step()
    g = fitter.potential()
    # |g1 - g2| = 2δ; δ = 0.05 |a| moves 2% of the mass, χ² ≈ 0.0016.
    assert float((g[0] - g[1]).abs()) < 0.1 * float(A.norm())
    assert fitter.evaluate(20_000, torch.Generator().manual_seed(0)) < 0.01


@pytest.mark.parametrize("method", FITTED)
def test_one_dimensional_cells_have_the_closed_form(method):
    """y = (-1, 0, 2) under N(0, 1): each cell must hold mass 1/3, so the boundaries sit at the
    normal's terciles -z and z (z = Φ^-1(2/3)). The boundary of y1 and y2 is where -x + g1 = g2, the
    one of y2 and y3 where g2 = 2x + g3: g1 - g2 = -z, g2 - g3 = 2z, and with mean 0, g* = (0, z, -z)."""
    y = torch.tensor([[-1.0], [0.0], [2.0]])
    z = 0.4307272992954576
    fitter = PotentialFitter(y, FitterOptions(method=method, batch_size=4096, seed=0))
    for _ in range(1500):
        fitter.step()
    g = fitter.potential()
    torch.testing.assert_close(g - g.mean(), torch.tensor([0.0, z, -z]), rtol=0, atol=0.01)


def _product_grid(n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points on an uneven n1 x n2 grid y_ik = (a_i, b_k) and 200,000 noise samples with their true
    cells. The cost -<x, y> is separable and N(0, I_2) and the uniform grid measure are products, so
    the optimal plan is the product of the two 1-D monotone maps: x goes to (a_i, b_k) with
    i = floor(n1 Φ(x_1)), k = floor(n2 Φ(x_2)) (sorted a and b)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.sort(torch.randn(n1, generator=gen) * 1.5 + 0.3).values
    b = torch.sort(torch.rand(n2, generator=gen) * 4 - 1).values
    y = torch.stack(torch.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
    x = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(5))
    phi = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    i = (phi[:, 0] * n1).long().clamp_max(n1 - 1)
    k = (phi[:, 1] * n2).long().clamp_max(n2 - 1)
    return y, x, i * n2 + k


def test_auto_method_picks_by_the_matching_spaces_dimension():
    assert resolve_method("auto", 2) == resolve_method("auto", HIGH_DIM - 1) == "sgd_tail"
    assert resolve_method("auto", HIGH_DIM) == resolve_method("auto", 784) == "averaged_sgd"
    assert all(resolve_method(m, 784) == m for m in FITTED)
    y = torch.randn(64, HIGH_DIM, generator=torch.Generator().manual_seed(0))
    auto = PotentialFitter(y, FitterOptions(batch_size=64))
    chosen = PotentialFitter(y, FitterOptions(method="averaged_sgd", batch_size=64))
    assert auto.method == "averaged_sgd" and auto.lr == chosen.lr
    for _ in range(3):  # 'auto' steps exactly as the method it resolved to
        assert auto.step() == chosen.step()
    assert torch.equal(auto.potential(), chosen.potential())
    # A fit interrupted under another method (the default before 'auto') says which setting resumes it.
    saved = PotentialFitter(y, FitterOptions(method="sgd_tail", batch_size=64)).state_dict()
    with pytest.raises(UserError, match="set potential.method = 'sgd_tail'"):
        auto.load_state_dict(saved)
    # With PCA the matching space is the PCA space: 8 dimensions, sgd_tail.
    fitter = PotentialFitter(y, FitterOptions(batch_size=64, pca_dim=8))
    tail = PotentialFitter(y, FitterOptions(method="sgd_tail", batch_size=64, pca_dim=8))
    assert fitter.method == "sgd_tail" and fitter.state_dict()["method"] == "sgd_tail"
    assert fitter.lr == tail.lr and fitter.step() == tail.step()


def test_the_default_fitters_cells_converge_to_the_known_optimal_cells():
    """A 12 x 12 grid whose optimal cells are known in closed form (``_product_grid``): the share of
    noise sent to a wrong cell must keep falling as the budget grows 4x and 16x, not plateau.
    Measured (coarse start, which 'auto' picks here): 0.083, 0.029, 0.011 after 500, 2,000, 8,000
    steps; sgd_ema plateaus: 0.17, 0.047, 0.035."""
    y, x, true = _product_grid(12, 12)
    fitter = PotentialFitter(y, FitterOptions(batch_size=256, seed=0))
    assert fitter.method == "sgd_tail" and fitter.init == "coarse"
    wrong = []
    for steps in (500, 2000, 8000):
        while fitter.t < steps:
            fitter.step()
        wrong.append(float(((x @ y.T + fitter.potential()).argmax(1) != true).float().mean()))
    assert wrong[0] > 1.5 * wrong[1] > 2.25 * wrong[2], wrong
    assert wrong[2] < 0.02, wrong


def test_the_gaussian_start_is_the_brenier_potential_of_gaussian_data():
    """For y ~ N(m, Σ) the start g(y) = -(y - m)^T Σ^(-1/2) (y - m) / 2 sends x to m + Σ^(1/2) x: on
    the grid of known cells it starts far closer than g = 0 (measured 7% vs 65% wrong cells after
    500 steps)."""
    y, x, true = _product_grid(12, 12)
    shares = {}
    for init in ("zero", "gaussian"):
        fitter = PotentialFitter(y, FitterOptions(batch_size=256, seed=0, init=init))
        for _ in range(500):
            fitter.step()
        shares[init] = float(((x @ y.T + fitter.potential()).argmax(1) != true).float().mean())
    assert shares["gaussian"] < 0.3 * shares["zero"], shares
    # Exactly Gaussian data: the start's map is the affine Brenier map (up to the sample's moments).
    gen = torch.Generator().manual_seed(3)
    cov_root = torch.tensor([[2.0, 0.0], [0.7, 0.5]])
    data = torch.randn(3000, 2, generator=gen) @ cov_root.T + torch.tensor([1.0, -2.0])
    start = PotentialFitter(data, FitterOptions(init="gaussian")).potential()
    assert abs(float(start.mean())) < 1e-3
    q = torch.randn(2000, 2, generator=gen)
    hit = data[(q @ data.T + start).argmax(1)]
    centered = data - data.mean(0)
    vals, vecs = torch.linalg.eigh(centered.T @ centered / (len(data) - 1))
    target = data.mean(0) + q @ ((vecs * vals.sqrt()) @ vecs.T).T
    assert float((hit - target).norm(dim=1).median()) < 0.1


def test_fit_potential_reaches_target_and_reports():
    lines: list[str] = []
    result = fit_potential(
        _points(),
        FitterOptions(batch_size=256),
        FitBudget(max_steps=3000, target_chi2=0.05, log_every=50),
        progress=False,
        log=lines.append,
    )
    assert result.converged and result.chi2 <= 0.05
    assert 0 < result.steps < 3000 and result.seconds > 0
    assert result.history and all(len(h) == 3 for h in result.history)
    assert result.g.shape == (200,) and torch.isfinite(result.g).all()
    assert any("chi2" in line for line in lines)
    # The returned potential really has the reported quality on independent noise.
    assert Chi2Evaluator(_points(), num_samples=8192)(result.g) < 0.1


def test_fit_potential_respects_time_budget():
    result = fit_potential(
        _points(),
        FitterOptions(batch_size=256),
        FitBudget(max_steps=10**6, max_seconds=0.5, eval_samples=0),
        log=None,
    )
    assert not result.converged or result.chi2 <= 0.05
    assert result.seconds < 5


@pytest.mark.parametrize("method", FITTED)
def test_state_dict_round_trip_continues_identically(method):
    y = _points()
    a = PotentialFitter(y, FitterOptions(method=method, batch_size=128, seed=3))
    for _ in range(5):
        a.step()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = PotentialFitter(y, FitterOptions(method=method, batch_size=128, seed=99))
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for _ in range(5):
        ra, rb = a.step(), b.step()
        assert ra == rb
    assert torch.equal(a.g, b.g) and torch.equal(a.potential(), b.potential())
    other = PotentialFitter(y[:100], FitterOptions(method=method, batch_size=128))
    with pytest.raises(UserError, match="n=200"):
        other.load_state_dict(a.state_dict())


def test_fitter_rejects_bad_arguments():
    y = _points()
    with pytest.raises(UserError, match="method"):
        PotentialFitter(y, FitterOptions(method="adam"))
    with pytest.raises(UserError, match="epsilon"):
        PotentialFitter(y, FitterOptions(epsilon=-1.0))
    with pytest.raises(UserError, match="decay_steps"):
        PotentialFitter(y, FitterOptions(decay_steps=0.0))
    with pytest.raises(UserError, match="tail_power"):
        PotentialFitter(y, FitterOptions(tail_power=-1.0))
    with pytest.raises(UserError, match="init"):
        PotentialFitter(y, FitterOptions(init="ones"))
    with pytest.raises(UserError, match="batch_size"):
        PotentialFitter(y, FitterOptions(batch_size=3), labels=torch.arange(200) % 3)
    with pytest.raises(UserError, match="pca_dim"):
        PotentialFitter(y, FitterOptions(pca_dim=5))
    with pytest.raises(UserError, match="sample_source"):
        PotentialFitter(y, sample_source=lambda n, gen: torch.randn(n, 3, generator=gen)).step()


def test_custom_source_is_used():
    y = _points(d=2)
    calls = []

    def source(n: int, generator: torch.Generator) -> torch.Tensor:
        calls.append(n)
        return 2.0 * torch.rand(n, 2, generator=generator) - 1.0

    fitter = PotentialFitter(y, FitterOptions(batch_size=64, init="zero"), sample_source=source)
    fitter.step()
    assert calls == [64]


def test_coarse_start_shortens_the_transient_in_2d():
    """2-D data: cells are ~1e-4 of the score spread wide, so SGD from g = 0 crawls; the coarse start
    (k-means clusters, their small problem, first-order interpolation) is far ahead after as many steps."""
    gen = torch.Generator().manual_seed(0)
    centers = 4.0 * torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y = centers[torch.randint(0, 4, (4000,), generator=gen)] + 0.3 * torch.randn(4000, 2, generator=gen)
    evaluate = Chi2Evaluator(y, num_samples=8192)
    results = {}
    for init in ("zero", "auto"):
        fitter = PotentialFitter(y, FitterOptions(batch_size=256, init=init))
        for _ in range(150):
            fitter.step()
        results[init] = (fitter.init, evaluate(fitter.potential()))
    assert results["auto"][0] == "coarse" and results["zero"][0] == "zero"
    assert results["auto"][1] < 0.2 * results["zero"][1], results


def test_auto_init_is_zero_for_image_like_data():
    assert PotentialFitter(_points(d=64), FitterOptions(batch_size=64)).init == "zero"


def test_coarse_start_is_centered_and_small_problems_stay_zero():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(400, 2, generator=gen)
    g = coarse_start(keys, lambda: torch.randn(128, 2, generator=gen), gen, clusters=16, steps=100)
    assert g.shape == (400,) and abs(float(g.mean())) < 1e-5 and float(g.std()) > 0
    tiny = coarse_start(keys[:7], lambda: torch.randn(8, 2, generator=gen), gen, clusters=16)
    assert torch.equal(tiny, torch.zeros(7))


def test_resumed_fitter_does_not_redo_the_coarse_start():
    y = _points(n=800, d=2)
    a = PotentialFitter(y, FitterOptions(batch_size=64, init="coarse", clusters=16))
    for _ in range(3):
        a.step()
    b = PotentialFitter(y, FitterOptions(batch_size=64, init="coarse", clusters=16))
    b.load_state_dict(a.state_dict())
    a.step()
    b.step()
    assert torch.equal(a.g, b.g) and torch.equal(a.potential(), b.potential())


# --- potential files -------------------------------------------------------------------------------


def _save(path, g, **kw):
    args = dict(version=3, step=120, epsilon=0.0, chi2=0.04, fingerprint="abc123") | kw
    return save_potential(path, g, **args)


def test_save_load_round_trip(tmp_path):
    g = torch.randn(50, generator=torch.Generator().manual_seed(0))
    path = _save(tmp_path / "potential.safetensors", g, pca_dim=8, extra={"method": "sgd_ema"})
    p = load_potential(path, expected_fingerprint="abc123", expected_n=50)
    assert torch.equal(p.g, g)
    meta = (p.version, p.step, p.epsilon, p.chi2, p.fingerprint, p.n, p.pca_dim)
    assert meta == (3, 120, 0.0, 0.04, "abc123", 50, 8)
    assert p.extra == {"method": "sgd_ema"} and p.created > 0
    assert [f.name for f in tmp_path.iterdir()] == ["potential.safetensors"]  # no temporary left
    # Overwriting replaces the file as a whole, and a MatchIndex accepts the loaded g.
    _save(path, g + 1, version=4)
    again = load_potential(path)
    assert again.version == 4 and torch.equal(again.g, g + 1)
    MatchIndex(torch.randn(50, 2)).set_potential(again.g)


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    g = torch.randn(50)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match="nope.safetensors does not exist"):
        load_potential(missing)

    good = _save(tmp_path / "good.safetensors", g)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-17])
    with pytest.raises(UserError, match="truncated.safetensors is not a readable safetensors file"):
        load_potential(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a tensor file at all")
    with pytest.raises(UserError, match="garbage.safetensors is not a readable"):
        load_potential(garbage)

    other = tmp_path / "other.safetensors"
    save_file({"g": g}, str(other), metadata={"format": "something/else"})
    with pytest.raises(UserError, match="other.safetensors has format 'something/else'"):
        load_potential(other)

    bad = g.clone()
    bad[4] = float("nan")
    nan_file = _save(tmp_path / "nan.safetensors", bad)
    with pytest.raises(UserError, match="nan.safetensors has 1 NaN/Inf"):
        load_potential(nan_file)

    with pytest.raises(UserError, match="good.safetensors has 50 entries but the dataset has 60"):
        load_potential(good, expected_n=60)
    with pytest.raises(UserError, match="good.safetensors was fitted on data with fingerprint abc123"):
        load_potential(good, expected_fingerprint="fff000")


def test_the_stop_rule_needs_a_confirming_bound_and_its_message_cannot_contradict_itself():
    from sdfm.semidiscrete.chi2 import Z_ONE_SIDED_95, describe_chi2

    # Without an evaluation the fit never stops on its own noisy batches: it runs the whole budget.
    result = fit_potential(
        _points(), FitterOptions(batch_size=256), FitBudget(max_steps=400, eval_samples=0), log=None
    )
    assert result.steps == 400 and not result.converged and math.isnan(result.chi2_se)
    # With one, it stops only when χ̂² + 1.645 SE is below the target, and says so consistently.
    lines: list[str] = []
    result = fit_potential(
        _points(),
        FitterOptions(batch_size=256),
        FitBudget(max_steps=3000, target_chi2=0.05),
        log=lines.append,
    )
    assert result.converged and result.chi2_se > 0
    assert result.chi2 + Z_ONE_SIDED_95 * result.chi2_se <= 0.05
    assert "target met" in lines[-1] and "±" in lines[-1]
    assert "target not met" in describe_chi2(0.0052, 0.004, 0.01)  # below the target, bound above it
    # Each evaluation is large enough that its bound can reach the target: near convergence the SE
    # is about sqrt(8) sqrt(2N) / M, so at N = 20,000 the old fixed 8,192 samples could never confirm
    # 0.05 (1.645 SE ≈ 0.11), while confirming_samples keeps 1.645 SE at half the target.
    assert confirming_samples(1797, 0.05) >= 8192 and confirming_samples(200, 0.05) == 8192
    for n, target in [(20_000, 0.05), (60_000, 0.05), (20_000, 0.03)]:
        m = confirming_samples(n, target)
        assert Z_ONE_SIDED_95 * math.sqrt(8) * math.sqrt(2 * n) / m <= target / 2 + 1e-12
        assert Z_ONE_SIDED_95 * math.sqrt(8) * math.sqrt(2 * n) / 8192 > target
    # A target no evaluation of bounded cost can confirm: capped at 64 batches, said, budget run.
    assert confirming_samples(20_000, 1e-9) == 64 * 1024 == confirming_samples(20_000, 1e-9, batch=1024)
    lines = []
    result = fit_potential(
        _points(), FitterOptions(batch_size=256), FitBudget(max_steps=60, target_chi2=1e-9), log=lines.append
    )
    assert result.steps == 60 and not result.converged
    assert any("below what" in line and "whole budget" in line for line in lines)
    assert "target met" in describe_chi2(0.0052, 0.001, 0.01)


def test_a_budget_means_what_it_says():
    """A time budget alone is not cut short by a step cap, and the final check is sized to fit inside
    it: a 2-s fit of 20,000 2-D points (whose default check would take seconds more) ends by ~2 s."""
    import sys as _sys

    from sdfm.data.synthetic import SETS
    from sdfm.semidiscrete.configured import DEFAULT_STEPS, step_cap
    from sdfm.semidiscrete.fit import FitBudget, fit_potential
    from sdfm.semidiscrete.fitter import FitterOptions

    assert step_cap(None, 30.0) == _sys.maxsize and step_cap(0, None) == DEFAULT_STEPS and step_cap(7, 30.0) == 7
    y = SETS["moons"](20_000, torch.Generator().manual_seed(0))
    lines = []
    res = fit_potential(
        y, FitterOptions(init="zero"), FitBudget(max_steps=step_cap(None, 2.0), target_chi2=1e-9, max_seconds=2.0),
        log=lines.append,
    )
    assert res.seconds <= 2.0 * 1.25, (res.seconds, lines[-3:])
    assert any("final check uses" in line for line in lines), lines[-5:]
