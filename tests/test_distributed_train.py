"""Data-parallel training on CPU ranks (gloo) under a real torchrun: equality with one process, resume
onto another number of ranks, a killed rank, SIGTERM, and bad launches.

Every job runs under a hard timeout; torchrun's --standalone rendezvous picks a free port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdfm import config as config_mod
from sdfm.config import Config
from sdfm.rundir import prepare_run_dir
from sdfm.trainer import Trainer

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 240
OVERRIDES = [
    "--data.num_points", "480", "--data.num_eval", "64",
    "--model.hidden", "32", "--model.depth", "2",
    "--train.batch_size", "48", "--train.log_every", "10", "--train.ckpt_every", "10",
    "--train.eval_at_end", "False", "--train.device", "cpu",
    "--optim.warmup_steps", "5", "--coupling.max_iter", "50",
    "--potential.max_steps", "40", "--potential.publish_every", "10",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, run_dir: Path, *args: str, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}", "-m", "sdfm.train", "--run-dir", str(run_dir), "--resume",
        *OVERRIDES, *args,
    ]  # fmt: skip


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A job in its own session, so that ``stop`` can kill torchrun and every rank it started."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(cmd: list[str], timeout: int = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    proc = start(cmd)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def parse_train(args: list[str]) -> Config:
    """The config ``sdfm train ARGS`` would train."""
    from sdfm.cli import parse

    return parse(["train", *args]).cfg


def single_process(run_dir: Path, kind: str, steps: int, extra: tuple[str, ...] = ()) -> Trainer:
    """The reference: the same job in this process (one rank)."""
    args = [*OVERRIDES, "--coupling.kind", kind, "--train.steps", str(steps), *extra]
    cfg: Config = config_mod.validate(parse_train(args))
    prepare_run_dir(run_dir, cfg, resume=False, overwrite=False)
    trainer = Trainer(cfg, run_dir)
    trainer.start_potential(resumed=False)
    trainer.train()
    return trainer


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # DDP sums gradients across ranks in another order than one process does: equal up to rounding.
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("kind", "nproc", "extra"),
    [
        ("independent", 2, ()),
        ("exact", 3, ()),
        ("sinkhorn", 2, ("--coupling.shard_above", "0")),  # solved jointly by the ranks
        ("sinkhorn", 3, ()),  # 48 rows: below shard_above, every rank solves the whole batch
        ("semidiscrete", 2, ()),
    ],
    ids=["independent", "exact", "sinkhorn-sharded", "sinkhorn-replicated", "semidiscrete"],
)
def test_ddp_matches_single_process(tmp_path, kind, nproc, extra):
    """W ranks with per-rank batch 48 / W train the same model as one process with batch 48."""
    ref = single_process(tmp_path / "one", kind, 20, extra)
    proc = run(torchrun(nproc, tmp_path / "ddp", "--coupling.kind", kind, "--train.steps", "20", *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"over {nproc} ranks ({48 // nproc} each)" in proc.stderr
    assert_same_weights(final_weights(tmp_path / "ddp"), {k: v for k, v in ref.model.state_dict().items()})


@pytest.mark.parametrize("conditional", [False, True])
def test_sharded_matching_index_matches_single_process(tmp_path, conditional):
    """potential.shard_index: each of 3 ranks holds a third of the index; same weights as one process."""
    extra = ["--potential.shard_index", "True"]
    if conditional:
        extra += ["--data.name", "digits", "--data.conditional", "True", "--data.num_eval", "300"]
        # An MLP, not the U-Net: the U-Net's zero-initialized block outputs leave some parameters with
        # near-zero gradients whose rounding (DDP sums them in another order) Adam scales up to full
        # steps, so its weights are not comparable at this tolerance; the matching is what is tested.
        extra += ["--model.kind", "mlp"]
    ref = single_process(tmp_path / "one", "semidiscrete", 20, extra)
    proc = run(
        torchrun(3, tmp_path / "ddp", "--coupling.kind", "semidiscrete", "--train.steps", "20", *extra)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "ddp"), dict(ref.model.state_dict()))


def test_accelerate_launch_matches_single_process_then_resumes_onto_more_ranks(tmp_path):
    """`accelerate launch` (its torchrun launcher, 2 CPU processes) runs the same DDP job: 20 steps equal
    20 steps in one process; then torchrun resumes that run onto 3 ranks, and its 20 more steps equal
    40 steps in one process (one 2-rank job serves both checks)."""
    cfg = config_mod.validate(parse_train([*OVERRIDES, "--coupling.kind", "exact", "--train.steps", "40"]))
    prepare_run_dir(tmp_path / "one", cfg, resume=False, overwrite=False)
    ref = Trainer(cfg, tmp_path / "one")
    ref.start_potential(resumed=False)
    ref.train(until=20)
    ref_20 = {k: v.clone() for k, v in ref.model.state_dict().items()}
    ref.train()
    config = Path(__file__).resolve().parents[1] / "launch" / "accelerate" / "cpu-2proc.yaml"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        "sdfm.train",
    ]
    cmd += ["--run-dir", str(tmp_path / "acc"), "--resume", *OVERRIDES, "--coupling.kind", "exact"]
    proc = run([*cmd, "--train.steps", "20"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 ranks (24 each)" in proc.stderr
    assert_same_weights(final_weights(tmp_path / "acc"), ref_20)
    # The resumed job reads RUN/config.toml; only train.steps changes (a constant lr schedule).
    second = run(torchrun(3, tmp_path / "acc", "--coupling.kind", "exact", "--train.steps", "40"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "written by 2 rank(s), resuming on 3" in second.stderr
    assert_same_weights(final_weights(tmp_path / "acc"), dict(ref.model.state_dict()))


def test_worker_potential_reaches_every_rank(tmp_path):
    """Rank 0 spawns the dual-potential worker and broadcasts each new version: the job finishes on
    a published potential (version > 0) and stops the worker."""
    run_dir = tmp_path / "ddp"
    args = ["--coupling.kind", "semidiscrete", "--potential.source", "worker", "--train.steps", "60"]
    proc = run(
        torchrun(2, run_dir, *args, "--potential.max_steps", "100000", "--potential.worker_threads", "1")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("potential: started worker pid") == 1  # rank 0 only
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["potential_version"] > 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    latest = run_dir / "checkpoints" / "latest"
    while time.time() < deadline:
        if latest.exists() and int(latest.read_text().strip().split("-")[1]) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


def test_killed_rank_restarts_from_last_checkpoint(tmp_path):
    """SIGKILL one rank mid-run: torchrun restarts the group, which resumes and finishes the run with the
    weights of an uninterrupted one."""
    steps = 120  # the kill comes after step 30: 90 steps (several seconds) of margin before the end
    ref = single_process(tmp_path / "one", "independent", steps)
    run_dir = tmp_path / "ddp"
    cmd = torchrun(2, run_dir, "--coupling.kind", "independent", "--train.steps", str(steps), max_restarts=1)
    proc = start(cmd)
    try:
        _wait_for_checkpoint(run_dir, proc, 30)
        ranks = _children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err
    assert final_weights(run_dir).keys() and (run_dir / "checkpoints" / f"step-{steps:08d}").is_dir()
    assert_same_weights(final_weights(run_dir), dict(ref.model.state_dict()))


def test_sigterm_saves_the_same_step_and_exits_zero(tmp_path):
    """Preemption: SIGTERM to every rank (as Slurm and Kubernetes send it) -> one checkpoint of the step
    all ranks stopped at, and exit code 0."""
    run_dir = tmp_path / "ddp"
    cmd = torchrun(2, run_dir, "--train.steps", "100000", "--train.ckpt_every", "100000")
    proc = start(cmd)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved checkpoint" in err
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) > 0


def test_sigterm_single_process(tmp_path):
    cmd = [sys.executable, "-m", "sdfm.train", "--run-dir", str(tmp_path), *OVERRIDES]
    cmd += ["--train.steps", "100000", "--train.ckpt_every", "100000"]
    proc = start(cmd)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 1


# ------------------------------------------------------------------------------------ bad launches


def test_batch_that_does_not_divide(tmp_path):
    proc = run(torchrun(2, tmp_path / "r", "--train.batch_size", "45", "--train.steps", "5"))
    assert proc.returncode != 0
    assert (
        proc.stderr.count("error: train.batch_size=45 (the global batch) does not divide over 2 ranks") == 1
    )
    assert "Traceback" not in proc.stderr.split("error: train.batch_size")[0][-200:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_configs_that_differ_between_ranks(tmp_path):
    """Two ranks started by hand with different configs: one error line from rank 0, both exit 2."""
    port = _free_port()
    procs = []
    for rank, lr in ((0, "0.001"), (1, "0.002")):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "sdfm.train", "--run-dir", str(tmp_path / "r"), *OVERRIDES]
        cmd += ["--optim.lr", lr, "--train.dist_timeout_s", "60"]
        procs.append(start(cmd, env))
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=JOB_TIMEOUT)[1])
        finally:
            stop(p)
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "error: the config differs between rank 0 and ranks [1]" in errs[0]
    assert errs[1].strip() == ""


def test_missing_rendezvous_variable(tmp_path):
    env = {**_env(), "RANK": "0", "WORLD_SIZE": "2"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sdfm.train", "--run-dir", str(tmp_path / "r"), *OVERRIDES],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: MASTER_ADDR and MASTER_PORT not set for a 2-process job; launch with torchrun or set the rendezvous address"
    ]
    assert not (tmp_path / "r").exists()
