import numpy as np
import pytest
import torch

from sdfm.config import DataConfig
from sdfm.data import DataStream, load_dataset, sample_source
from sdfm.data.files import fashion_mnist_available
from sdfm.errors import UserError


@pytest.mark.parametrize("name", ["8gaussians", "moons", "checkerboard", "circles"])
def test_synthetic_sets_are_seeded_2d(name):
    a = load_dataset(DataConfig(name=name, num_points=500, num_eval=100))
    b = load_dataset(DataConfig(name=name, num_points=500, num_eval=100))
    assert a.x.shape == (500, 2) and a.x_eval.shape == (100, 2)
    assert torch.equal(a.x.dense(), b.x.dense()) and a.fingerprint == b.fingerprint
    c = load_dataset(DataConfig(name=name, num_points=500, num_eval=100, seed=1))
    assert c.fingerprint != a.fingerprint
    assert torch.isfinite(a.x.dense()).all()


def test_eight_gaussians_modes():
    d = load_dataset(DataConfig(name="8gaussians", num_points=4000))
    x = d.x.dense()
    r = x.norm(dim=1)
    assert abs(r.mean().item() - 5.0) < 0.2
    angles = torch.atan2(x[:, 1], x[:, 0]) / (torch.pi / 4)
    assert (angles - angles.round()).abs().mean() < 0.15


def test_sources():
    g = torch.Generator().manual_seed(0)
    assert sample_source("normal", 7, (1, 8, 8), g).shape == (7, 1, 8, 8)
    assert sample_source("moons", 7, (2,), g).shape == (7, 2)
    with pytest.raises(ValueError):
        sample_source("moons", 7, (3,), g)
    with pytest.raises(UserError, match="data.source"):
        load_dataset(DataConfig(name="digits", source="moons"))


def test_digits_labels_and_split():
    d = load_dataset(DataConfig(name="digits", conditional=True))
    assert d.shape == (1, 8, 8) and d.num_classes == 10
    assert len(d) + len(d.x_eval) == 1797
    assert d.x.dense().min() >= -1 and d.x.dense().max() <= 1
    # held-out points are not in the training set
    train = {tuple(r) for r in d.x.dense().flatten(1).numpy().round(4)}
    assert sum(tuple(r) in train for r in d.x_eval.dense().flatten(1).numpy().round(4)) < 10


@pytest.mark.skipif(
    not fashion_mnist_available(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_subset():
    d = load_dataset(DataConfig(name="fashion-mnist", max_points=5000, num_eval=500))
    assert d.x.shape == (5000, 1, 28, 28) and d.x_eval.shape == (500, 1, 28, 28)
    assert d.num_classes == 10 and d.labels.shape == (5000,)


def test_user_files(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    d = load_dataset(DataConfig(name="file", path=str(tmp_path / "a.npy"), num_eval=10))
    assert d.shape == (3,) and len(d) == 90
    labels = np.arange(100) % 4
    np.savez(tmp_path / "b.npz", x=x, labels=labels)
    d = load_dataset(DataConfig(name="file", path=str(tmp_path / "b.npz"), conditional=True))
    assert d.num_classes == 4
    from safetensors.numpy import save_file

    imgs = np.random.default_rng(0).integers(0, 256, size=(50, 8, 8), dtype=np.uint8)
    save_file({"x": imgs}, str(tmp_path / "c.safetensors"))
    d = load_dataset(DataConfig(name="file", path=str(tmp_path / "c.safetensors")))
    assert d.shape == (1, 8, 8) and d.x.dense().min() >= -1 and d.x.dense().max() <= 1


def test_image_folder_with_classes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    d = load_dataset(DataConfig(name="file", path=str(tmp_path), conditional=True))
    assert d.shape == (1, 8, 8) and d.num_classes == 2


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"garbage"), "cannot read"),
        (lambda p: np.save(p, np.zeros((0, 3), np.float32)), "empty"),
        (lambda p: np.save(p, np.zeros(5, np.float32)), "shape"),
        (lambda p: np.save(p, np.array([[0.0, np.nan]] * 20, np.float32)), "NaN, Inf"),
        (lambda p: np.save(p, np.array([[0.0, np.inf]] * 20, np.float32)), "NaN, Inf"),
    ],
)
def test_bad_files(tmp_path, make, match):
    p = tmp_path / "x.npy"
    make(p)
    with pytest.raises(UserError, match=match):
        load_dataset(DataConfig(name="file", path=str(p)))


def test_truncated_npy(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.ones((100, 4), np.float32))
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(UserError, match="cannot read"):
        load_dataset(DataConfig(name="file", path=str(p)))


def test_conditional_without_labels():
    with pytest.raises(UserError, match="conditional"):
        load_dataset(DataConfig(name="moons", conditional=True))


def test_data_stream_resumes_exactly():
    a = DataStream(10, 3, seed=5)
    seq = [a.next() for _ in range(7)]
    b = DataStream(10, 3, seed=5)
    for _ in range(4):
        b.next()
    c = DataStream(10, 3, seed=5)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(seq[4:], [c.next() for _ in range(3)], strict=True))
    # each epoch visits distinct points
    assert len(set(torch.cat(seq[:3]).tolist())) == 9
    with pytest.raises(UserError, match="batch_size"):
        DataStream(2, 3, seed=0)


def test_num_eval_zero_trains_on_every_point():
    from sdfm.config import DataConfig
    from sdfm.data import load_dataset

    full = load_dataset(DataConfig(name="digits", num_eval=0))
    assert len(full) == 1797 and full.x_eval.shape == (0, *full.shape) and full.num_classes == 10
    assert len(load_dataset(DataConfig(name="digits"))) < 1797
