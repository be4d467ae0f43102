"""The dual-potential worker on several ranks (gloo, real torchrun): the same g as one process for the
same draws, the single-process state and snapshot format, resume after SIGKILL (also onto another
number of ranks), and ranks that disagree about their data.

Every job runs under a hard timeout and is killed by process group, so no rank outlives a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdfm import config as config_mod
from sdfm.checkpoint import state_from_bytes
from sdfm.config import Config
from sdfm.data import load_dataset
from sdfm.rundir import prepare_run_dir, record_dataset, snapshot_path
from sdfm.semidiscrete import load_potential

pytestmark = pytest.mark.slow
JOB_TIMEOUT = 180


def worker_config(epsilon: float = 0.0, conditional: bool = False) -> Config:
    cfg = Config()
    cfg.data.name = "digits" if conditional else "8gaussians"
    cfg.data.num_points, cfg.data.num_eval = 600, 64
    cfg.data.conditional = conditional
    cfg.coupling.kind = "semidiscrete"
    cfg.potential.source, cfg.potential.spawn_worker = "worker", False
    cfg.potential.epsilon = epsilon
    cfg.potential.batch_size = 96  # not a multiple of 2 or 3 ranks' shares on purpose: 48/48, 32/32/32
    cfg.potential.publish_every = 10
    cfg.potential.worker_threads = 1
    cfg.train.device = "cpu"
    return config_mod.validate(cfg)


def make_run(run_dir: Path, cfg: Config) -> None:
    prepare_run_dir(run_dir, cfg, resume=False, overwrite=False)
    record_dataset(run_dir, load_dataset(cfg.data))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def worker_command(run_dir: Path, nproc: int, *extra: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "sdfm", "worker", "--run-dir", str(run_dir), *extra]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "sdfm", "worker", "--run-dir", str(run_dir), *extra,
    ]  # fmt: skip


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = start(cmd)
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        kill(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def worker_state(run_dir: Path) -> dict:
    return state_from_bytes((run_dir / "potential" / "worker_state.safetensors").read_bytes())


@pytest.mark.parametrize(
    ("epsilon", "conditional", "nproc"),
    [(0.0, False, 2), (0.0, True, 3), (0.3, False, 2)],
    ids=["argmax-2ranks", "classes-3ranks", "softmax-2ranks"],
)
def test_ranks_take_the_single_process_steps(tmp_path, epsilon, conditional, nproc):
    """K ranks, each scoring its share of every batch, give the potential of one process: bit for bit
    for argmax counts, up to the order of float sums for softmax assignments."""
    cfg = worker_config(epsilon, conditional)
    for name in ("one", "many"):
        make_run(tmp_path / name, cfg)
    one = run(worker_command(tmp_path / "one", 1, "--max-steps", "30"))
    assert one.returncode == 0, one.stderr[-2000:]
    many = run(worker_command(tmp_path / "many", nproc, "--max-steps", "30"))
    assert many.returncode == 0, many.stderr[-2000:]
    assert f"on {nproc} ranks" in many.stderr
    a, b = worker_state(tmp_path / "one"), worker_state(tmp_path / "many")
    assert a.keys() == b.keys() and a["version"] == b["version"] == 3
    assert a["fitter"].keys() == b["fitter"].keys() and b["fitter"]["step"] == 30
    if epsilon == 0:
        assert torch.equal(a["fitter"]["g"], b["fitter"]["g"])
        assert torch.equal(a["fitter"]["g_avg"], b["fitter"]["g_avg"])
    else:
        torch.testing.assert_close(a["fitter"]["g"], b["fitter"]["g"], rtol=0, atol=1e-5)
    pa, pb = load_potential(snapshot_path(tmp_path / "one")), load_potential(snapshot_path(tmp_path / "many"))
    assert (pa.version, pa.step, pa.fingerprint, pa.n) == (pb.version, pb.step, pb.fingerprint, pb.n)
    torch.testing.assert_close(pa.g, pb.g, rtol=0, atol=1e-5)


def test_resume_after_sigkill_continues_the_same_fit_on_another_rank_count(tmp_path):
    """A 2-rank worker SIGKILLed after a few publishes resumes from its state on 3 ranks, and ends with the
    state an uninterrupted single process reaches at the same step."""
    cfg = worker_config()
    make_run(tmp_path / "run", cfg)
    proc = start(worker_command(tmp_path / "run", 2))
    try:
        deadline = time.time() + JOB_TIMEOUT
        while not (
            snapshot_path(tmp_path / "run").is_file()
            and load_potential(snapshot_path(tmp_path / "run")).version >= 2
        ):
            assert time.time() < deadline and proc.poll() is None, "the worker never published twice"
            time.sleep(0.05)
    finally:
        kill(proc)
    saved = worker_state(tmp_path / "run")["fitter"]["step"]
    assert saved >= 20 and saved % 10 == 0
    resumed = run(worker_command(tmp_path / "run", 3, "--max-steps", "10"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and f"at step {saved}" in resumed.stderr
    make_run(tmp_path / "ref", cfg)
    ref = run(worker_command(tmp_path / "ref", 1, "--max-steps", str(saved + 10)))
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = worker_state(tmp_path / "ref")["fitter"], worker_state(tmp_path / "run")["fitter"]
    assert a["step"] == b["step"] == saved + 10
    assert torch.equal(a["g"], b["g"]) and torch.equal(a["g_avg"], b["g_avg"])


def test_ranks_that_see_different_data_are_refused(tmp_path):
    """Two worker ranks started by hand, rank 1 with other data: one error line from rank 0, both exit 2."""
    cfg = worker_config()
    make_run(tmp_path, cfg)
    other = worker_config()
    other.data.seed = 7  # another draw of the data: another fingerprint
    (tmp_path / "other.toml").write_text(config_mod.dumps(other))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "sdfm", "worker", "--run-dir", str(tmp_path), "--max-steps", "5"]
        if rank == 1:
            cmd += ["--config", str(tmp_path / "other.toml")]
        procs.append(
            subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        )
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=JOB_TIMEOUT)[1])
        finally:
            kill(p)
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "error: the worker's data (its fingerprint) differs between rank 0 and ranks [1]" in errs[0]
    assert errs[0].count("\n") == 1 and errs[1].strip() == "", errs
