"""Packed datasets: the format round trip, memory mapping shared between processes, a training run on
a pack that resumes exactly, and every bad input refused with one line and nothing half-written."""

import errno
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_sdfm, train_run
from safetensors import safe_open

from sdfm.config import Config, DataConfig
from sdfm.data import load_dataset
from sdfm.data.pack import PackWriter, open_pack, sample_positions, verify_pack
from sdfm.data.packer import pack_source
from sdfm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _images(n=40, seed=0, channels_last=True):
    rng = np.random.default_rng(seed)
    shape = (n, 6, 5, 3) if channels_last else (n, 3, 6, 5)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 4, n)


def _quiet(_msg):
    pass


def _pack_npz(tmp_path, n=40, name="a"):
    x, labels = _images(n)
    np.savez(tmp_path / f"{name}.npz", x=x, labels=labels)
    out = tmp_path / f"{name}.safetensors"
    pack_source(str(tmp_path / f"{name}.npz"), out, progress=False, log=_quiet)
    return out, x, labels


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (/proc/self/maps)."""
    ranges = []
    target = str(path.resolve())
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == target:
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def test_round_trip_values_labels_and_fingerprint(tmp_path):
    out, x, labels = _pack_npz(tmp_path)
    pack = open_pack(out)
    # The stored bytes are the source's, in (C, H, W); read as float they are the documented scaling.
    assert torch.equal(pack.x.storage, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    expected = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    assert torch.equal(pack.x.dense(), expected)
    assert torch.equal(pack.labels, torch.from_numpy(labels.astype(np.int64)))
    assert pack.meta["class_counts"] == json.dumps(np.bincount(labels, minlength=4).tolist())
    # A standard safetensors file: the library itself reads the same tensors and metadata.
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("x"), pack.x.storage)
        assert f.metadata()["fingerprint"] == pack.fingerprint
    # The fingerprint depends on the content: the same data packed again gives it, other data does not.
    again = pack_source(str(tmp_path / "a.npz"), tmp_path / "b.safetensors", progress=False, log=_quiet)
    assert again.fingerprint == pack.fingerprint
    x[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "c.npz", x=x, labels=labels)
    other = pack_source(str(tmp_path / "c.npz"), tmp_path / "c.safetensors", progress=False, log=_quiet)
    assert other.fingerprint != pack.fingerprint
    assert verify_pack(out).fingerprint == pack.fingerprint


def test_pack_is_mapped_not_copied(tmp_path):
    """The points of an opened pack live in this process's mapping of the file, not in a copy."""
    out, _, _ = _pack_npz(tmp_path, n=64)
    data = load_dataset(DataConfig(name="file", path=str(out), num_eval=8))
    ranges = _mapped_ranges(out)
    ptr = data.x.storage.data_ptr()
    assert ranges and any(lo <= ptr < hi for lo, hi in ranges)
    # The eval split and the training rows are row ids into the same storage.
    assert data.x_eval.storage.data_ptr() == ptr and len(data) + len(data.x_eval) == 64
    # A plain uint8 .npy is mapped as well.
    x, _ = _images(30)
    np.save(tmp_path / "u8.npy", x)
    d = load_dataset(DataConfig(name="file", path=str(tmp_path / "u8.npy"), num_eval=6))
    assert any(lo <= d.x.storage.data_ptr() < hi for lo, hi in _mapped_ranges(tmp_path / "u8.npy"))
    assert d.x.stored_dtype == torch.uint8


@pytest.mark.slow
def test_two_processes_read_one_pack(tmp_path):
    out, x, _ = _pack_npz(tmp_path, n=64)
    code = (
        "import sys, torch\n"
        "from sdfm.data.pack import open_pack\n"
        "p = open_pack(sys.argv[1])\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(p.fingerprint, float(p.x.dense().sum()), sys.argv[1] in maps)\n"
    )
    procs = [
        subprocess.run([sys.executable, "-c", code, str(out.resolve())], capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    here = open_pack(out)
    want = f"{here.fingerprint} {float(here.x.dense().sum())} True"
    for p in procs:
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == want


def test_pack_from_fashion_mnist_keeps_its_test_split_and_floats():
    from sdfm.data import files

    if not files.fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fm.safetensors"
        pack_source("fashion-mnist", out, progress=False, log=_quiet)
        packed = load_dataset(DataConfig(name="file", path=str(out), num_eval=500, max_points=3000))
        builtin = load_dataset(DataConfig(name="fashion-mnist", num_eval=500, max_points=3000))
        # The same points as the built-in loader, float for float, and the same held-out test images.
        assert torch.equal(packed.x.dense(), builtin.x.dense())
        assert torch.equal(packed.x_eval.dense(), builtin.x_eval.dense())
        assert torch.equal(packed.labels, builtin.labels) and packed.num_classes == 10


def _png_folder(root: Path, sizes=((12, 9), (10, 14)), bad=0):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c, (w, h) in zip(("cat", "dog"), sizes, strict=True):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    for i in range(bad):
        (root / "dog" / f"broken{i}.png").write_bytes(b"not a png")


def test_image_folder_resize_crop_labels_and_workers(tmp_path):
    from PIL import Image

    _png_folder(tmp_path / "imgs")
    one = pack_source(str(tmp_path / "imgs"), tmp_path / "one.safetensors", size=8, workers=1, progress=False, log=_quiet)
    two = pack_source(str(tmp_path / "imgs"), tmp_path / "two.safetensors", size=8, workers=2, progress=False, log=_quiet)
    assert one.n == 6 and one.fingerprint == two.fingerprint  # decoding in processes keeps the file order
    pack = open_pack(one.path)
    assert tuple(pack.x.storage.shape) == (6, 3, 8, 8)
    assert pack.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # The first cat image (12 wide, 9 high) by hand: shorter side to 8 (bicubic), then the centre 8 x 8.
    with Image.open(tmp_path / "imgs" / "cat" / "0.png") as im:
        im = im.convert("RGB").resize((round(12 * 8 / 9), 8), Image.Resampling.BICUBIC)
        left = (im.size[0] - 8) // 2
        want = np.asarray(im.crop((left, 0, left + 8, 8))).transpose(2, 0, 1)
    assert np.array_equal(pack.x.storage[0].numpy(), want)


def test_unreadable_images_are_skipped_with_a_count_or_refused(tmp_path):
    _png_folder(tmp_path / "imgs", bad=2)
    said = []
    r = pack_source(str(tmp_path / "imgs"), tmp_path / "p.safetensors", size=8, workers=1, progress=False, log=said.append)
    assert r.n == 6 and r.skipped == 2 and "skipped 2 unreadable image(s) of 8" in said[0]
    with pytest.raises(UserError, match="broken0.png: cannot read image.*without --strict"):
        pack_source(str(tmp_path / "imgs"), tmp_path / "q.safetensors", size=8, workers=1, strict=True, progress=False, log=_quiet)
    assert not (tmp_path / "q.safetensors").exists() and not list(tmp_path.glob(".q.safetensors.partial-*"))


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda p: (p / "empty").mkdir(), "holds no images"),
        (lambda p: _png_folder(p / "empty"), "pass --size S"),
    ],
)
def test_bad_folders_are_one_line(tmp_path, setup, needle):
    setup(tmp_path)
    with pytest.raises(UserError, match=needle):
        pack_source(str(tmp_path / "empty"), tmp_path / "p.safetensors", workers=1, progress=False, log=_quiet)
    assert not (tmp_path / "p.safetensors").exists() and not list(tmp_path.glob(".p.safetensors.partial-*"))


def test_existing_target_refused_then_replaced_only_when_complete(tmp_path):
    out, _, _ = _pack_npz(tmp_path)
    before = out.read_bytes()
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        pack_source(str(tmp_path / "a.npz"), out, progress=False, log=_quiet)
    # A failing overwrite (here: the source is not finite) leaves the old pack as it was.
    np.save(tmp_path / "nan.npy", np.full((20, 3), np.nan, np.float32))
    with pytest.raises(UserError, match="NaN, Inf"):
        pack_source(str(tmp_path / "nan.npy"), out, overwrite=True, progress=False, log=_quiet)
    assert out.read_bytes() == before and not list(tmp_path.glob(".a.safetensors.partial-*"))


@pytest.mark.parametrize("failure", ["disk full", "interrupt"])
def test_failure_while_packing_leaves_nothing(tmp_path, monkeypatch, failure):
    x, labels = _images(400)
    np.savez(tmp_path / "a.npz", x=x, labels=labels)
    calls = {"n": 0}
    real = PackWriter.add

    def add(self, block):
        calls["n"] += 1
        if calls["n"] == 2:
            if failure == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise KeyboardInterrupt
        real(self, block)

    monkeypatch.setattr(PackWriter, "add", add)
    monkeypatch.setattr("sdfm.data.packer._BLOCK_BYTES", 4096)
    expected = UserError if failure == "disk full" else KeyboardInterrupt
    with pytest.raises(expected, match="disk is full" if failure == "disk full" else None):
        pack_source(str(tmp_path / "a.npz"), tmp_path / "p.safetensors", progress=False, log=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def _rewrite_header(path: Path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])


def _flip_byte(path: Path, row: int):
    pack = open_pack(path, check_sample=False)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    at = 8 + n + row * pack.x.dim  # uint8 rows of x come first in the data region
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
        (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
        (lambda p: p.write_bytes(b"\xff" * 64), "not a safetensors file"),
        (lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(format="other")), "not an sdfm pack"),
        (lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(n="39")), "does not match the points"),
        (lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(version="9")), "format version 9"),
        (lambda p: _rewrite_header(p, lambda h: h["x"].update(shape=[41, 3, 6, 5])), "does not match its"),
        (lambda p: _flip_byte(p, sample_positions(40)[3]), "differ from the ones it was packed with"),
    ],
)
def test_damaged_packs_are_refused_with_one_line(tmp_path, damage, needle):
    out, _, _ = _pack_npz(tmp_path)
    damage(out)
    with pytest.raises(UserError, match=needle):
        open_pack(out)
    if needle != "not an sdfm pack":  # that one is a plain safetensors file of points now, and loads
        with pytest.raises(UserError, match="a.safetensors"):
            load_dataset(DataConfig(name="file", path=str(out), num_eval=8))


def test_verify_finds_damage_the_sample_check_does_not_see(tmp_path):
    out, _, _ = _pack_npz(tmp_path, n=200)
    row = next(i for i in range(200) if i not in sample_positions(200))
    _flip_byte(out, row)
    open_pack(out)  # the cheap start-up check reads only the sampled rows
    with pytest.raises(UserError, match="content fingerprint .* differs"):
        verify_pack(out)


@pytest.mark.slow
def test_data_commands(tmp_path):
    x, labels = _images(30)
    np.savez(tmp_path / "a.npz", x=x, labels=labels)

    def sdfm(*args):
        return run_sdfm("data", *args)  # the CLI in this process

    out = tmp_path / "a.safetensors"
    r = sdfm("pack", str(tmp_path / "a.npz"), str(out))
    assert r.returncode == 0 and "packed 30 points" in r.stdout, r.stderr
    r = sdfm("info", str(out))
    assert r.returncode == 0 and "sdfm-pack" in r.stdout and "[3, 6, 5]" in r.stdout
    r = sdfm("verify", str(out))
    assert r.returncode == 0 and ": ok, 30 points" in r.stdout
    r = sdfm("pack", str(tmp_path / "a.npz"), str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: pack target")
    r = sdfm("info", str(tmp_path / "a.npz"))
    assert r.returncode == 2 and "error:" in r.stderr


def _cfg(path: Path, steps: int) -> Config:
    cfg = Config()
    cfg.data.name, cfg.data.path, cfg.data.num_eval = "file", str(path), 8
    cfg.model.kind, cfg.model.channels = "unet", 8
    cfg.coupling.kind = "exact"
    cfg.train.steps, cfg.train.batch_size, cfg.train.ckpt_every = steps, 8, 2
    cfg.train.eval_at_end = False
    return cfg




@pytest.mark.slow
def test_training_on_a_pack_resumes_exactly_and_refuses_a_changed_pack(tmp_path):
    x, labels = _images(48, channels_last=False)
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 2)))[:, :, :8, :8]  # 8 x 8: the U-Net halves it twice
    np.savez(tmp_path / "a.npz", x=x, labels=labels)
    out = tmp_path / "a.safetensors"
    pack_source(str(tmp_path / "a.npz"), out, progress=False, log=_quiet)
    full = train_run(_cfg(out, 4), tmp_path / "full")
    train_run(_cfg(out, 4), tmp_path / "half", until=2)
    resumed = train_run(_cfg(out, 4), tmp_path / "half", resume=True)
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    # The same points from the .npz in memory train the same weights: a pack changes nothing but memory.
    cfg = _cfg(tmp_path / "a.npz", 4)
    from_npz = train_run(cfg, tmp_path / "npz")
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, from_npz.model.state_dict()[name]), name
    # A pack replaced under the run (other content, same path) is refused at resume, in one line.
    x[:, 0] = 255 - x[:, 0]
    np.savez(tmp_path / "b.npz", x=x, labels=labels)
    pack_source(str(tmp_path / "b.npz"), out, overwrite=True, progress=False, log=_quiet)
    with pytest.raises(UserError, match="fingerprint"):
        train_run(_cfg(out, 6), tmp_path / "full", resume=True)


def test_index_over_stored_points_holds_no_float_copy_and_matches_the_dense_index():
    """A CPU index of uint8 points searches the stored bytes (StoredKeys) and answers as float64
    brute force does over the float points, with and without classes; the coupling pairs agree too."""
    from sdfm.config import PotentialConfig
    from sdfm.couplings.semidiscrete import SemidiscreteCoupling
    from sdfm.data.points import Points
    from sdfm.semidiscrete.backends import StoredKeys
    from sdfm.semidiscrete.index import MatchIndex, reference_argmax

    gen = torch.Generator().manual_seed(0)
    stored = torch.randint(0, 256, (3000, 1, 6, 6), dtype=torch.uint8, generator=gen)
    points = Points(stored, divisor=127.5, offset=-1.0)
    dense = points.dense().flatten(1)
    labels = torch.randint(0, 3, (3000,), generator=gen)
    g = torch.randn(3000, generator=gen)
    x = torch.randn(200, 36, generator=gen) * 3
    ql = torch.randint(0, 3, (200,), generator=gen)
    for lab, qlab in ((None, None), (labels, ql)):
        index = MatchIndex(points.flat(), labels=lab)
        assert all(isinstance(b.exact, StoredKeys) for b in index._blocks)
        index.set_potential(g)
        want = reference_argmax(x, dense, g, labels=lab, query_labels=qlab)
        assert torch.equal(index.search(x, qlab), want)
        assert torch.equal(index.topk(x, 5, qlab).index[:, 0], want)
    coupling = SemidiscreteCoupling(points, labels, PotentialConfig(), "fp", per_class=True)
    coupling.set_potential(g, 1)
    pairs = coupling.pair(x.view(200, 1, 6, 6), dense[:200].view(200, 1, 6, 6), ql, gen)
    assert torch.equal(pairs.index, reference_argmax(x, dense, g, labels=labels, query_labels=ql))
    assert torch.equal(pairs.x1, points.dense()[pairs.index]) and torch.equal(pairs.labels, labels[pairs.index])


def test_rows_gathered_ahead_are_the_rows_gathered_in_step(tmp_path):
    """A coupling that pairs on the step's device gets the next step's rows gathered in the background
    thread: the same pairs as gathering them in the step, and after a restart of the stream too."""
    from sdfm.couplings import IndependentCoupling
    from sdfm.data import DataStream
    from sdfm.data.noise import step_generator
    from sdfm.pairing import PairSource

    out, _, _ = _pack_npz(tmp_path, n=64)
    data = load_dataset(DataConfig(name="file", path=str(out), num_eval=8))
    taken = {}
    for prefetch in (False, True):
        stream = DataStream(len(data), 8, seed=3)
        source = PairSource(
            data, stream, IndependentCoupling(), lambda k: step_generator(3, k, "coupling"), seed=3,
            rows=(0, 8), conditional=False, device=torch.device("cpu"), prefetch=prefetch,
        )  # fmt: skip
        taken[prefetch] = [source.take(k) for k in range(10)]
        assert source.gathered_ahead == (9 if prefetch else 0) and source.prefetched == 0
        source.close()
    for a, b in zip(taken[False], taken[True], strict=True):
        assert torch.equal(a.pairs.x1, b.pairs.x1) and torch.equal(a.pairs.x0, b.pairs.x0)
