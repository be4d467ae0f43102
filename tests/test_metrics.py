"""Metrics against closed forms: exact W2, MMD, Fréchet distance, path energy / straightness / NPE,
and the feature classifier (training, safetensors round trip, cache, Fréchet distance)."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from sdfm.errors import UserError
from sdfm.metrics import (
    FeatureNet,
    classifier_features,
    classifier_frechet,
    classifier_path,
    distances,
    flow_stats,
    frechet_distance,
    gaussian_stats,
    get_classifier,
    load_classifier,
    mmd,
    normalized_path_energy,
    path_energy,
    save_classifier,
    straightness,
    train_classifier,
    wasserstein2,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- W2


def test_w2_1d_is_distance_of_sorted_samples():
    x = torch.randn(200, 1, generator=gen(0), dtype=torch.float64)
    y = 0.5 * torch.randn(200, 1, generator=gen(1), dtype=torch.float64) + 1.0
    expected = torch.sqrt(((x.sort(0).values - y.sort(0).values) ** 2).mean()).item()
    assert wasserstein2(x, y) == pytest.approx(expected, rel=1e-9)


def test_w2_of_a_shifted_sample_is_the_shift():
    x = torch.randn(150, 3, generator=gen(2))
    c = torch.tensor([0.3, -1.2, 2.0])
    assert wasserstein2(x, x + c) == pytest.approx(c.norm().item(), rel=1e-6)
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-12)


def test_w2_flattens_images_and_allows_unequal_sizes():
    x = torch.randn(40, 1, 4, 4, generator=gen(3))
    # Two copies of each point: the same empirical distribution, so W2 = 0 (up to the sqrt of a
    # round-off of the squared-distance matrix, ~1e-16 * |x|^2).
    assert wasserstein2(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-6)
    assert wasserstein2(x.numpy(), x.flatten(1).numpy() + 1.0) == pytest.approx(4.0, rel=1e-9)


def test_w2_rejects_mismatched_and_too_large_inputs(monkeypatch):
    with pytest.raises(ValueError, match="features per point"):
        wasserstein2(torch.zeros(5, 2), torch.zeros(5, 3))
    monkeypatch.setattr(distances, "MAX_PAIRS", 99)
    with pytest.raises(ValueError, match="subsample"):
        wasserstein2(torch.zeros(10, 2), torch.zeros(10, 2))


# ---------------------------------------------------------------- MMD


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    x = torch.randn(400, 2, generator=gen(4))
    y = torch.randn(400, 2, generator=gen(5))
    same = mmd(x, y)
    shifted = mmd(x, y + torch.tensor([1.0, 0.0]))
    assert abs(same) < 0.01
    assert shifted > 0.1
    assert shifted > 20 * abs(same)


def test_mmd_with_fixed_bandwidth_matches_brute_force():
    x = torch.randn(7, 3, generator=gen(6), dtype=torch.float64)
    y = torch.randn(5, 3, generator=gen(7), dtype=torch.float64) + 0.5

    def k(a, b):
        return math.exp(-((a - b) ** 2).sum().item() / (2 * 0.8**2))

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert mmd(x, y, bandwidths=[0.8]) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_stats_is_zero():
    f = torch.randn(500, 16, generator=gen(8)) @ torch.randn(16, 16, generator=gen(9))
    mu, cov = gaussian_stats(f)
    assert mu.dtype == np.float64 and cov.shape == (16, 16)
    np.testing.assert_allclose(cov, np.cov(f.double().numpy(), rowvar=False), rtol=1e-10)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8 * np.trace(cov))
    # Rank-deficient covariances (fewer samples than features) still give a finite value near 0.
    mu_s, cov_s = gaussian_stats(f[:8])
    assert 0.0 <= frechet_distance(mu_s, cov_s, mu_s, cov_s) < 1e-3 * np.trace(cov_s)


# ---------------------------------------------------------------- path energy, straightness, NPE


def test_constant_field_has_energy_c2_and_is_straight():
    c = torch.tensor([3.0, -4.0])
    x0 = torch.randn(64, 2, generator=gen(10))

    def velocity(t, x):
        return c.expand_as(x)

    assert path_energy(velocity, x0, nfe=50) == pytest.approx(25.0, rel=1e-6)
    assert straightness(velocity, x0, nfe=50) == pytest.approx(0.0, abs=1e-8)


def test_straight_line_to_fixed_targets():
    # v(t, x) = (y - x) / (1 - t) moves each x0 along the segment to its y at speed |y - x0|; Euler
    # follows it exactly and never evaluates at t = 1.
    x0 = torch.randn(32, 3, generator=gen(11), dtype=torch.float64)
    y = torch.randn(32, 3, generator=gen(12), dtype=torch.float64)

    def velocity(t, x):
        return (y - x) / (1 - t)[:, None]

    stats = flow_stats(velocity, x0, nfe=40)
    torch.testing.assert_close(stats.x1, y)
    assert stats.path_energy == pytest.approx(((y - x0) ** 2).sum(1).mean().item(), rel=1e-10)
    assert stats.straightness == pytest.approx(0.0, abs=1e-12)
    assert stats.nfe == 80


def test_accelerating_straight_path():
    # v = 2 t a: x_t = x0 + t^2 a is straight in space but not at constant speed.
    # Continuous values: PE = 4/3 |a|^2, straightness = |a|^2 / 3. Euler's left sums, exactly:
    # PE = (4/S^3) sum k^2 |a|^2, u = (S-1)/S a, straightness = (1/S) sum |2k/S - (S-1)/S|^2 |a|^2.
    a = torch.tensor([1.0, 2.0])
    x0 = torch.randn(16, 2, generator=gen(13))
    S = 100

    def velocity(t, x):
        return 2 * t[:, None] * a

    k = np.arange(S)
    a2 = float(a @ a)
    pe_euler = 4 * (k**2).sum() / S**3 * a2
    st_euler = ((2 * k / S - (S - 1) / S) ** 2).sum() / S * a2
    stats = flow_stats(velocity, x0, nfe=S)
    assert stats.path_energy == pytest.approx(pe_euler, rel=1e-5)
    assert stats.straightness == pytest.approx(st_euler, rel=1e-4)
    assert stats.path_energy == pytest.approx(4 / 3 * a2, rel=2e-2)
    assert stats.straightness == pytest.approx(a2 / 3, rel=2e-2)


def test_contracting_field_is_evaluated_along_the_simulated_path():
    # v = -x: the velocity depends on the position, so it must be read along the path.
    # Euler: x_k = (1-h)^k x0. Continuous: PE = E|x0|^2 (1 - e^-2) / 2.
    x0 = torch.randn(256, 2, generator=gen(14), dtype=torch.float64)
    S, h = 200, 1 / 200
    m2 = (x0**2).sum(1).mean().item()

    def velocity(t, x):
        return -x

    decay = (1 - h) ** np.arange(S)
    pe_euler = h * (decay**2).sum() * m2
    st_euler = h * ((decay + ((1 - h) ** S - 1)) ** 2).sum() * m2
    # ∫ (e^-t + c)^2 dt with c = e^-1 - 1, the straightness of the exact flow.
    e = math.exp(-1)
    st_exact = ((1 - e**2) / 2 + 2 * (e - 1) * (1 - e) + (e - 1) ** 2) * m2
    stats = flow_stats(velocity, x0, nfe=S)
    assert stats.path_energy == pytest.approx(pe_euler, rel=1e-10)
    assert stats.straightness == pytest.approx(st_euler, rel=1e-8)
    assert stats.path_energy == pytest.approx((1 - e**2) / 2 * m2, rel=1e-2)
    assert stats.straightness == pytest.approx(st_exact, rel=2e-2)
    # The identities the module docstring relies on: S = PE - E|x1 - x0|^2 and PE >= W2^2(x0, x1).
    moved = ((stats.x1 - x0) ** 2).sum(1).mean().item()
    assert stats.straightness == pytest.approx(stats.path_energy - moved, rel=1e-8)
    assert stats.path_energy >= wasserstein2(x0, stats.x1) ** 2


def test_normalized_path_energy():
    assert normalized_path_energy(3.0, 2.0) == pytest.approx(0.5)
    assert normalized_path_energy(1.0, 2.0) == pytest.approx(0.5)
    assert normalized_path_energy(2.0, 2.0) == 0.0
    with pytest.raises(ValueError, match="w2_squared"):
        normalized_path_energy(1.0, 0.0)


# ---------------------------------------------------------------- classifier


@pytest.fixture(scope="session")  # once per xdist worker, even if its tests of this module come in several runs
def digits():
    d = load_digits()
    x = torch.tensor(d.images / 16 * 2 - 1, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=gen(15))
    return x[order], y[order]


@pytest.fixture(scope="session")  # once per xdist worker, even if its tests of this module come in several runs
def trained(digits):
    x, y = digits
    return train_classifier(x[:400], y[:400], x[1400:], y[1400:], epochs=6, batch_size=64, lr=3e-3, seed=0)


def test_classifier_learns_digits(trained, digits):
    model, acc = trained
    x, _ = digits
    assert acc > 0.8
    assert not model.training
    assert model.features(x[:5]).shape == (5, 128) and model(x[:5]).shape == (5, 10)


def test_classifier_save_load_round_trip(trained, digits, tmp_path):
    model, acc = trained
    x, _ = digits
    path = tmp_path / "sub" / "clf.safetensors"
    save_classifier(model, path, {"val_accuracy": acc, "fingerprint": "abc"})
    assert [p.name for p in path.parent.iterdir()] == ["clf.safetensors"]  # no temporary left over
    loaded = load_classifier(path)
    assert torch.equal(classifier_features(loaded, x[:300]), classifier_features(model, x[:300]))
    assert loaded.metadata["fingerprint"] == "abc"
    assert float(loaded.metadata["val_accuracy"]) == pytest.approx(acc)
    assert loaded.metadata["image_size"] == "8" and loaded.metadata["feat_dim"] == "128"


def test_load_classifier_rejects_bad_files(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "clf.safetensors"
    save_classifier(model, path, {})
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.safetensors is not a valid safetensors file"):
        load_classifier(bad)
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_classifier(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")


def test_classifier_frechet_separates_real_from_scrambled(trained, digits):
    model, _ = trained
    x, _ = digits
    real_a, real_b = x[:800], x[800:1600]
    scrambled = real_b.flatten(1)[:, torch.randperm(64, generator=gen(16))].reshape(real_b.shape)
    same = classifier_frechet(model, real_a, real_a)
    between_halves = classifier_frechet(model, real_a, real_b)
    to_scrambled = classifier_frechet(model, real_a, scrambled)
    assert same < 1e-6 * between_halves + 1e-6
    assert to_scrambled > 10 * between_halves


def test_get_classifier_trains_once_then_loads(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("SDFM_CACHE", str(tmp_path))
    x, y = digits
    path = classifier_path("digits", "0123abcd")
    assert path == tmp_path / "classifiers" / "digits-0123abcd.safetensors"
    lines: list[str] = []
    args = ("digits", "0123abcd", x[:200], y[:200], x[1600:], y[1600:])
    first = get_classifier(*args, log=lines.append, epochs=2)
    assert path.is_file() and any("training" in line for line in lines)
    lines.clear()
    second = get_classifier(*args, log=lines.append, train_if_missing=False)
    assert not any("training" in line for line in lines)
    assert torch.equal(classifier_features(first, x[:50]), classifier_features(second, x[:50]))
    assert second.metadata["fingerprint"] == "0123abcd"
    # A file whose fingerprint disagrees with its name is refused, as is a missing one without training.
    save_classifier(FeatureNet(8), path, {"fingerprint": "other"})
    with pytest.raises(UserError, match="fingerprint"):
        get_classifier(*args, log=lines.append)
    with pytest.raises(UserError, match="no cached classifier"):
        get_classifier("digits", "ffff", x[:200], y[:200], x[1600:], y[1600:], train_if_missing=False)
    with pytest.raises(ValueError, match="dataset_name"):
        classifier_path("../evil", "0123")


def test_train_classifier_is_deterministic_and_leaves_the_global_rng_alone(digits):
    x, y = digits
    state = torch.get_rng_state()
    m1, a1 = train_classifier(x[:128], y[:128], x[1600:], y[1600:], epochs=2, batch_size=32, lr=1e-3, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    m2, a2 = train_classifier(x[:128], y[:128], x[1600:], y[1600:], epochs=2, batch_size=32, lr=1e-3, seed=3)
    assert a1 == a2
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k
