"""The dual-potential worker: a separate OS process that keeps improving g while training runs.

``sdfm worker --run-dir RUN`` loads the run's dataset, runs SGD on g without end (fresh noise ->
assignments against all N points -> one step), and every ``potential.publish_every`` steps publishes
``RUN/potential/latest.safetensors`` (version, worker step, chi^2, epsilon, dataset fingerprint) and
its own state ``RUN/potential/worker_state.safetensors``, both atomically. A restarted worker
continues from that state, with the next version number. SIGTERM / SIGINT end it after the current
step with a final publish. Trainers pick up new versions at step boundaries
(``SemidiscreteCoupling.poll``).

One worker per run: it holds ``RUN/potential/.lock`` (a second one is refused with the holder's host
and PID). A worker spawned by its trainer dies with it (``PR_SET_PDEATHSIG`` on Linux, and a check of
its parent between steps elsewhere); a worker started as its own job stops once the trainer it saw
has not refreshed ``RUN/heartbeat.json`` for ``--trainer-timeout-s`` seconds.

The fit runs on ``potential.device`` (the trainer's device by default: CUDA when present), and under
``torchrun --nproc_per_node=K -m sdfm worker --run-dir RUN`` on K ranks that share every step.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sdfm import config as config_mod
from sdfm.checkpoint import check_writable, state_from_bytes, state_to_bytes, write_atomic
from sdfm.data import load_dataset
from sdfm.distributed.collectives import LOCAL, GroupCollectives
from sdfm.distributed.env import ProcessGroup, detect, potential_device
from sdfm.errors import UserError
from sdfm.monitor import info, set_main_process
from sdfm.rundir import RunLock, check_dataset, heartbeat_age, potential_dir
from sdfm.semidiscrete.configured import fit_setup
from sdfm.semidiscrete.fitter import PotentialFitter
from sdfm.semidiscrete.potential_file import save_potential
from sdfm.signals import TermFlag

PARENT_VARIABLE = "SDFM_WORKER_PARENT"
"""Set by a trainer that spawns its worker: the trainer's PID, which the worker dies with."""


def _die_with_parent() -> int:
    """The PID of the spawning trainer (0 when started by hand); on Linux, ask the kernel to send
    SIGTERM when it dies. Exits at once if it is already gone."""
    parent = int(os.environ.get(PARENT_VARIABLE, "0") or 0)
    if parent <= 0:
        return 0
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(f"the trainer (PID {parent}) that started this worker is gone; stopping")
    return parent


def run_worker(
    run_dir: Path,
    *,
    config_path: Path | None = None,
    max_steps: int = 0,
    trainer_timeout_s: float = 900.0,
    log=info,
) -> int:
    """Fit and publish until stopped (or ``max_steps`` steps in this process, for tests and batch
    jobs; or until a trainer that was seen stops its heartbeat for ``trainer_timeout_s`` seconds,
    0: never). Returns the last published version.

    One process, or every rank of a ``torchrun --nproc_per_node=K -m sdfm worker`` job: each rank
    scores its share of every noise batch against the whole dataset on its own device and the
    assignment counts are summed over the ranks, so all ranks take the same SGD step on g
    (``PotentialFitter(comm=...)``). Rank 0 reads the state, publishes and saves it; state and
    snapshots are the single-process ones, so a run can resume on another number of ranks.
    """
    run_dir = Path(run_dir)
    if max_steps < 0:
        raise UserError(f"--max-steps must be >= 0 (0: run until stopped), got {max_steps}")
    if trainer_timeout_s < 0:
        raise UserError(
            f"--trainer-timeout-s must be >= 0 (0: never stop for a silent trainer), got {trainer_timeout_s}"
        )
    parent = _die_with_parent()
    env = detect()
    set_main_process(env.is_main)
    cfg_path = config_path or run_dir / "config.toml"
    if not cfg_path.is_file():
        raise UserError(
            f"no config at {cfg_path}; point --run-dir at a run made by `sdfm train` (or pass --config)"
        )
    cfg = config_mod.load_config(cfg_path)
    if cfg.coupling.kind != "semidiscrete":
        raise UserError(
            f"{cfg_path} trains with coupling.kind = {cfg.coupling.kind!r}, which uses no dual potential; the worker "
            "fits potentials for semidiscrete runs only"
        )
    if config_path is None and not (run_dir / "dataset.json").is_file():
        raise UserError(
            f"{run_dir} holds a config but no dataset.json: it is not a run started by `sdfm train`; start the "
            "trainer first, or pass --config to fit for a run folder of your own"
        )
    check_writable(potential_dir(run_dir) / "snapshot.safetensors", "--run-dir")  # before any work
    if cfg.potential.worker_threads:
        torch.set_num_threads(cfg.potential.worker_threads)
    device = potential_device(env, cfg)
    data = load_dataset(cfg.data)
    pg = ProcessGroup(env, device, cfg.train.dist_backend, cfg.train.dist_timeout_s)
    lock = None
    try:
        pg.check_same(
            "the worker's data (its fingerprint)", data.fingerprint, fix="give every rank the run's own data"
        )
        check_dataset(run_dir, data)
        error = None
        if env.is_main:
            try:
                lock = RunLock(
                    potential_dir(run_dir),
                    "worker",
                    "stop it first, or leave it running: the trainer picks up its snapshots",
                ).acquire()
            except UserError as e:
                error = str(e)
        if (error := pg.broadcast_object(error)) is not None:
            raise UserError(error)
        comm = GroupCollectives(None, pg.flag_device) if env.distributed else LOCAL
        alive = _Liveness(run_dir, parent, trainer_timeout_s, log)
        return _fit_and_publish(run_dir, cfg, data, device, comm, pg, max_steps, log, alive)
    finally:
        if lock is not None:
            lock.release()
        pg.close()


class _Liveness:
    """Whether the worker should go on: its spawning trainer is still its parent, and a trainer that
    was seen refreshing RUN/heartbeat.json has not been silent for longer than the timeout (checked
    at most every few seconds)."""

    def __init__(self, run_dir: Path, parent: int, timeout_s: float, log):
        self.run_dir, self.parent, self.timeout_s, self.log = run_dir, parent, timeout_s, log
        self.seen, self.checked = False, 0.0

    def gone(self) -> bool:
        if self.parent and os.getppid() != self.parent:
            self.log(f"worker: the trainer (PID {self.parent}) that started it is gone; stopping")
            return True
        if not self.timeout_s or time.monotonic() - self.checked < 5.0:
            return False
        self.checked = time.monotonic()
        age = heartbeat_age(self.run_dir)
        if age is not None and age < self.timeout_s:
            self.seen = True
        elif self.seen and age is not None:
            self.log(f"worker: no trainer heartbeat for {age:.0f} s (> --trainer-timeout-s); stopping")
            return True
        return False


def _fit_and_publish(run_dir, cfg, data, device, comm, pg, max_steps: int, log, alive: _Liveness) -> int:
    out = potential_dir(run_dir)
    main = pg.env.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    fitter = fit_setup(cfg, data).fitter(data.x.flat(), device, comm)
    state_path = out / STATE_FILE
    state = _read_state(out, log) if main else None
    state = pg.broadcast_object(state)
    version = 0
    if state is not None:
        fitter.load_state_dict(state["fitter"])
        version = int(state["version"])
        log(f"worker: resumed from {state_path} at step {fitter.t}, version {version}")
    p = cfg.potential
    # The published χ̂² is that of the published potential (the fitter's average), on 4 fresh batches
    # of its own noise: the per-step χ̂² is the last iterate's, which under sgd_tail is far noisier
    # than the average (digits at step 100: 0.49 against 0.03). Noise of the estimate ≈ sqrt(2N)/(4B).
    eval_generator = torch.Generator(device=fitter.problem.device).manual_seed(cfg.train.seed + 104_729)

    def published_chi2() -> float:
        return fitter.evaluate(4 * fitter.batch_size, eval_generator) if main else math.nan

    ranks = f" on {pg.env.world_size} ranks" if pg.env.distributed else ""
    log(
        f"worker: fitting g for {data.name} (N={len(data)}, eps={p.epsilon}, {fitter.method}) on {device}{ranks}, "
        f"publishing every {p.publish_every} steps"
    )
    steps_here = 0
    stop = TermFlag((signal.SIGTERM, signal.SIGINT))  # checked between steps; the process then exits
    try:  # the handlers go back on every exit (the worker also runs in-process, in tests)
        while not pg.any(stop.requested or alive.gone()) and not (max_steps and steps_here >= max_steps):
            fitter.step()
            steps_here += 1
            if fitter.t % p.publish_every == 0:
                version += 1
                chi2 = published_chi2()
                if main:
                    publish(out, fitter, version, chi2, data.fingerprint, p.pca_dim)
                log(f"worker: step {fitter.t} published version {version} chi2 {chi2:.4g}")
        if fitter.t % p.publish_every:  # final publish of the last steps
            version += 1
            chi2 = published_chi2()
            if main:
                publish(out, fitter, version, chi2, data.fingerprint, p.pca_dim)
            log(f"worker: step {fitter.t} published version {version} chi2 {chi2:.4g}; stopping")
    finally:
        stop.restore()
    return version


STATE_FILE = "worker_state.safetensors"
"""The worker's own state (``state_to_bytes``: no pickle); sdfm 0.1 wrote ``worker_state.pt``."""


def _read_state(out: Path, log) -> dict | None:
    """The worker's saved state, or None (none yet, or unreadable: then the fit starts over)."""
    path, old = out / STATE_FILE, out / "worker_state.pt"
    if not path.is_file() and not old.is_file():
        return None
    try:
        if path.is_file():
            state = state_from_bytes(path.read_bytes())
        else:  # the layout of sdfm 0.1, read without running code
            path = old
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "fitter" not in state or "version" not in state:
            raise ValueError("not a worker state")
        return state
    except Exception as e:  # a torn or foreign state file: say so and start over rather than crash forever
        log(f"warning: worker state {path} is unreadable ({type(e).__name__}); starting the fit from zero")
        return None


def publish(
    out: Path, fitter: PotentialFitter, version: int, chi2: float, fingerprint: str, pca_dim: int
) -> None:
    """Save the worker's own state first, then the snapshot trainers read: a crash in between means a
    restarted worker republishes that version, never that trainers see a version the state lacks."""
    write_atomic(out / STATE_FILE, state_to_bytes({"fitter": fitter.state_dict(), "version": version}))
    save_potential(
        out / "latest.safetensors",
        fitter.potential(),
        version=version,
        step=fitter.t,
        epsilon=fitter.epsilon,
        chi2=chi2,
        fingerprint=fingerprint,
        pca_dim=pca_dim,
    )


LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
)
"""The variables of a torchrun launch (``sdfm.distributed.env.detect``), removed from a spawned worker."""


class WorkerProcess:
    """A worker started by the trainer as a subprocess (``potential.spawn_worker``).

    Its output goes to RUN/potential/worker.log. ``check`` reports (once) when it has exited, so the
    trainer can warn and go on with the last potential.
    """

    def __init__(self, run_dir: Path):
        out = potential_dir(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "worker.log"
        self._log = open(self.log_path, "ab")
        # The worker is one process of its own, not a rank of the trainer's job: a torchrun launch's
        # variables would make it join (and wait for) a process group of its own size.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in LAUNCH_VARIABLES and not k.startswith("TORCHELASTIC_")
        }
        env[PARENT_VARIABLE] = str(os.getpid())  # the worker dies with this process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdfm", "worker", "--run-dir", str(run_dir)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._reported = False

    def check(self) -> str | None:
        """A one-line warning the first time the worker is found dead, else None."""
        code = self.proc.poll()
        if code is None or self._reported:
            return None
        self._reported = True
        return (
            f"warning: the potential worker exited with code {code} (see {self.log_path}); training goes on with "
            "the last potential; restart it with `sdfm worker --run-dir RUN`"
        )

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_for_version(path: Path, timeout: float) -> bool:
    """Wait until a snapshot exists at ``path`` (the first publish of a freshly started worker)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            return True
        time.sleep(0.2)
    return False
