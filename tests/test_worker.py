"""The dual-potential worker as a real OS process, and semidiscrete training around it."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_sdfm

from sdfm import config as config_mod
from sdfm.checkpoint import state_from_bytes
from sdfm.config import Config
from sdfm.potential_sources import SnapshotFeed
from sdfm.rundir import prepare_run_dir, record_dataset, snapshot_path
from sdfm.semidiscrete import load_potential, save_potential
from sdfm.trainer import Trainer, run_training

pytestmark = pytest.mark.timeout(300)


def sd_config(source="worker", steps=30) -> Config:
    cfg = Config()
    cfg.data.num_points, cfg.data.num_eval = 300, 50
    cfg.model.hidden, cfg.model.depth = 32, 2
    cfg.coupling.kind = "semidiscrete"
    cfg.potential.source = source
    cfg.potential.batch_size = 64
    cfg.potential.publish_every = 5
    cfg.potential.max_steps = 300
    cfg.potential.target_chi2 = 0.3
    cfg.potential.stale_warning_s = 1.0
    cfg.potential.spawn_worker = False
    cfg.potential.worker_threads = 1
    cfg.train.steps, cfg.train.batch_size = steps, 32
    cfg.train.log_every, cfg.train.ckpt_every = 10, 10
    cfg.train.eval_at_end = False
    return config_mod.validate(cfg)


def start_worker(run_dir: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sdfm", "worker", "--run-dir", str(run_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(cond, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_trainer_follows_worker_survives_kill_rejects_bad_snapshots_and_worker_resumes(tmp_path):
    cfg = sd_config()
    prepare_run_dir(tmp_path, cfg, resume=False, overwrite=False)
    trainer = Trainer(cfg, tmp_path)
    record_dataset(tmp_path, trainer.data)
    warnings = []
    snap = snapshot_path(tmp_path)
    trainer.feed = SnapshotFeed(snap, trainer.data.fingerprint, len(trainer.data), 1.0, warn=warnings.append)

    worker = start_worker(tmp_path)
    try:
        wait_until(snap.is_file, what="the first snapshot")
        # the trainer picks up newer versions at step boundaries
        seen = set()
        deadline = time.time() + 120
        while len(seen) < 3 and time.time() < deadline:
            trainer.train_step()
            seen.add(trainer.coupling.version)
        assert len(seen - {0}) >= 2, seen
        assert trainer.coupling.g.abs().sum() > 0

        # SIGKILL mid-run: training goes on with the last potential, then warns that it is stale
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        trainer.train_step()
        last_version = trainer.coupling.version
        time.sleep(1.2)
        for _ in range(3):
            trainer.train_step()
        assert trainer.coupling.version == last_version
        assert any("no new potential" in w for w in warnings), warnings

        # a torn snapshot and a snapshot of another dataset are ignored with a warning
        good = snap.read_bytes()
        snap.write_bytes(good[: len(good) // 2])
        trainer.train_step()
        assert trainer.coupling.version == last_version
        assert any("ignoring potential snapshot" in w for w in warnings)
        warnings.clear()
        save_potential(
            snap,
            torch.zeros(len(trainer.data)),
            version=10**6,
            step=1,
            epsilon=0.0,
            chi2=0.0,
            fingerprint="0" * 16,
        )
        trainer.train_step()
        assert trainer.coupling.version == last_version
        assert any("fingerprint" in w for w in warnings), warnings
        snap.write_bytes(good)

        # a restarted worker continues from its saved state with later versions
        state = state_from_bytes((tmp_path / "potential" / "worker_state.safetensors").read_bytes())
        worker = start_worker(tmp_path)
        wait_until(
            lambda: load_potential(snap).version > state["version"],
            what="a version from the restarted worker",
        )
        pot = load_potential(snap)
        assert pot.step > state["fitter"]["step"]
        trainer.train_step()
        assert trainer.coupling.version == pot.version or trainer.coupling.version > pot.version
    finally:
        worker.kill()
        out = worker.communicate(timeout=30)[0]
    assert "resumed from" in out, out


@pytest.mark.slow
def test_worker_stops_cleanly_on_sigterm_and_refuses_other_data(tmp_path):
    cfg = sd_config()
    prepare_run_dir(tmp_path, cfg, resume=False, overwrite=False)
    trainer = Trainer(cfg, tmp_path)
    record_dataset(tmp_path, trainer.data)
    worker = start_worker(tmp_path)
    wait_until(snapshot_path(tmp_path).is_file, what="the first snapshot")
    worker.send_signal(signal.SIGTERM)
    out = worker.communicate(timeout=60)[0]
    assert worker.returncode == 0, out
    assert "stopping" in out or "published" in out

    other = tmp_path / "other.toml"
    cfg2 = sd_config()
    cfg2.data.name = "moons"
    other.write_text(config_mod.dumps(cfg2))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdfm",
            "worker",
            "--run-dir",
            str(tmp_path),
            "--config",
            str(other),
            "--max-steps",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "belongs to dataset" in r.stderr and "Traceback" not in r.stderr


def test_trainer_spawns_worker_and_checkpoints_the_potential(tmp_path):
    cfg = sd_config(steps=40)
    cfg.potential.spawn_worker = True
    run_training(cfg, tmp_path)
    ckpt = tmp_path / "checkpoints" / "step-00000040" / "coupling.safetensors"
    from safetensors.torch import load_file

    state = load_file(ckpt)
    assert int(state["version"]) >= 1 and state["g"].abs().sum() > 0
    # the worker was stopped with the trainer
    assert (tmp_path / "potential" / "worker.log").is_file()
    # resume restores the potential in use
    cfg.train.steps = 41
    cfg.potential.spawn_worker = False
    t = Trainer(cfg, tmp_path)
    assert t.resume()
    assert torch.equal(t.coupling.g, state["g"]) and t.coupling.version == int(state["version"])


def test_semidiscrete_fit_then_train_and_resume_exactly(tmp_path):
    cfg = sd_config(source="fit", steps=20)
    full = run_training(cfg, tmp_path / "a")
    assert (tmp_path / "a" / "potential" / "fitted.safetensors").is_file()
    assert full.coupling.version == 1
    prepare_run_dir(tmp_path / "b", cfg, resume=False, overwrite=False)
    t = Trainer(cfg, tmp_path / "b")
    t.start_potential(resumed=False)
    t.train(until=10)
    t2 = Trainer(cfg, tmp_path / "b")
    assert t2.resume()
    t2.train()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k


def test_conditional_semidiscrete_pairs_never_cross_classes(tmp_path):
    cfg = sd_config(source="fit", steps=5)
    cfg.data.name = "digits"
    cfg.data.conditional = True
    cfg.model.kind = "mlp"
    cfg.potential.max_steps = 50
    t = Trainer(cfg, tmp_path)
    t.start_potential(resumed=False)
    gen = torch.Generator().manual_seed(0)
    idx = t.stream.next()
    x0 = torch.randn(len(idx), 1, 8, 8, generator=gen)
    pairs = t.coupling.pair(x0, t.data.x[idx], t.data.labels[idx], gen)
    assert torch.equal(t.data.labels[pairs.index], t.data.labels[idx])


_sdfm = run_sdfm  # conftest.run_sdfm: the CLI in this process (no interpreter start per command)


@pytest.mark.slow
def test_bad_potential_inputs_exit_2(tmp_path):
    cfg = sd_config(source="fit")
    from sdfm.data import load_dataset

    data = load_dataset(cfg.data)
    bad = {
        "wrong fingerprint": (torch.zeros(len(data)), "0" * 16, "fingerprint"),
        "wrong length": (torch.zeros(len(data) + 1), data.fingerprint, "points"),
    }
    base = ["train", "--coupling.kind", "semidiscrete", "--data.num_points", "300", "--data.num_eval", "50"]
    for name, (g, fp, needle) in bad.items():
        p = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_potential(p, g, version=1, step=1, epsilon=0.0, chi2=0.0, fingerprint=fp)
        r = _sdfm(
            *base,
            "--run-dir",
            tmp_path / name.replace(" ", "_"),
            "--potential.source",
            "file",
            "--potential.path",
            p,
        )
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
    p = tmp_path / "nan.safetensors"
    g = torch.zeros(len(data))
    g[3] = float("nan")
    save_potential(p, g, version=1, step=1, epsilon=0.0, chi2=0.0, fingerprint=data.fingerprint)
    r = _sdfm(*base, "--run-dir", tmp_path / "nan", "--potential.source", "file", "--potential.path", p)
    assert (
        r.returncode == 2 and ("NaN" in r.stderr or "finite" in r.stderr) and "Traceback" not in r.stderr
    ), r.stderr
    r = _sdfm(*base, "--run-dir", tmp_path / "eps", "--potential.epsilon", "-1")
    assert r.returncode == 2 and "potential.epsilon" in r.stderr
    r = _sdfm(*base, "--run-dir", tmp_path / "pca", "--potential.pca_dim", "5")
    assert r.returncode == 2 and "pca" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    for name in ("wrong_fingerprint", "wrong_length", "nan", "eps", "pca"):
        assert not (tmp_path / name / "checkpoints").exists()


@pytest.mark.slow
def test_fit_potential_command(tmp_path):
    out = tmp_path / "g.safetensors"
    r = _sdfm(
        "fit-potential",
        "--data.name",
        "digits",
        "--potential.max_steps",
        "400",
        "--potential.target_chi2",
        "0.05",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    pot = load_potential(out)
    from sdfm.config import DataConfig
    from sdfm.data import load_dataset

    data = load_dataset(DataConfig(name="digits"))
    assert pot.n == len(data) and pot.fingerprint == data.fingerprint and pot.step > 0
    assert pot.chi2 < 0.2, pot.chi2  # digits reach about 0.02 within a few hundred steps
    r = _sdfm("fit-potential", "--data.name", "digits")
    assert r.returncode == 2 and "--out" in r.stderr
