"""The run folder: its layout, and the checks that keep a run's files consistent.

Layout of ``RUN/``::

    config.toml            the resolved config (``sdfm train --config RUN/config.toml`` reproduces it)
    dataset.json           name, fingerprint, size and point shape of the run's training data
    .lock                  the advisory lock of the trainer that owns the folder (host, PID, start)
    heartbeat.json         the owning trainer's host, PID, step and time, refreshed while it trains
    checkpoints/           step-NNNNNNNN/ folders and a ``latest`` pointer (``sdfm.checkpoint``)
    potential/             the semidiscrete potential: fitted.safetensors (fit before training), or the
                           worker's latest.safetensors, worker_state.safetensors, worker.log and .lock
    metrics.jsonl, tensorboard/, eval/

Rank 0 of a job owns the folder: only it writes here, and only while it holds ``.lock``.

A start is a transaction (``RunFolder``): everything is validated before the folder changes; a
replaced run (--overwrite) is moved aside and only deleted once the new run has started, or put back
if it fails; a rejected --resume leaves every file as it was; a failed first start leaves nothing
that blocks its retry.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from sdfm import config as config_mod
from sdfm.checkpoint import write_atomic
from sdfm.config import Config
from sdfm.data import Dataset
from sdfm.errors import UserError
from sdfm.monitor import info

DATASET_FILE = "dataset.json"
HEARTBEAT_FILE = "heartbeat.json"

__all__ = [
    "DATASET_FILE",
    "FIXED_ON_RESUME",
    "RunFolder",
    "recover_replaced",
    "RunLock",
    "check_dataset",
    "check_resume_config",
    "check_run_dir",
    "heartbeat_age",
    "is_locked",
    "is_run_dir",
    "potential_dir",
    "prepare_run_dir",
    "record_dataset",
    "snapshot_path",
    "write_heartbeat",
]


def potential_dir(run_dir: Path) -> Path:
    """Where a run keeps its semidiscrete potential files."""
    return Path(run_dir) / "potential"


def snapshot_path(run_dir: Path) -> Path:
    """Where the worker publishes the newest potential of a run."""
    return potential_dir(run_dir) / "latest.safetensors"


def is_run_dir(path: Path) -> bool:
    return (path / "config.toml").exists() or (path / "checkpoints").exists()


FIXED_ON_RESUME = ("data", "model", "method", "coupling.kind", "coupling.cost", "train.seed", "train.batch_size",
                   "potential.epsilon", "potential.pca_dim")  # fmt: skip
"""Config keys (a name alone: the whole section) that a --resume may not change: they define the
data, the network, what it learns and the draws of every step. Every other key may change on resume
(steps, log / checkpoint cadence, optimizer, evaluation, devices, the worker's settings); the merged
config is saved as the run's config.toml once the resume has started."""


def check_resume_config(saved: Config, cfg: Config) -> None:
    """Refuse (one line naming every key) a resume config that changes a key of ``FIXED_ON_RESUME``."""
    old, new = config_mod.to_dict(saved), config_mod.to_dict(cfg)
    changed = []
    for key in FIXED_ON_RESUME:
        section, _, name = key.partition(".")
        a, b = old.get(section, {}), new.get(section, {})
        names = [name] if name else sorted(set(a) | set(b))
        changed += [f"{section}.{n} ({a.get(n)!r} -> {b.get(n)!r})" for n in names if a.get(n) != b.get(n)]
    if changed:
        raise UserError(
            f"--resume cannot change {', '.join(changed)}: these are fixed for a run; drop those overrides "
            "(or start a new run in another --run-dir)"
        )


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder this start cannot use, without touching anything."""
    run_dir = Path(run_dir)
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if parent != run_dir and not parent.is_dir():
                raise UserError(f"--run-dir {run_dir} is below {parent}, which is a file; choose a folder")
            if not os.access(parent, os.W_OK) or str(parent.resolve()).startswith(("/proc", "/sys")):
                raise UserError(
                    f"--run-dir {run_dir}: {parent} is not writable; choose a folder you can write"
                )
            break
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; choose a folder")
    if resume and not run_dir.exists():  # the start-or-continue form of launchers: say it, loudly
        info(
            f"warning: --resume: {run_dir} does not exist; starting a new run there (check --run-dir if you "
            "meant to continue an existing run)"
        )
    for name, want in (("checkpoints", "a folder"), (".lock", "a file"), ("config.toml", "a file")):
        found = run_dir / name
        if found.exists() and (found.is_dir() if want == "a file" else not found.is_dir()):
            raise UserError(
                f"{found} is not {want}, but sdfm keeps its {name} there; move it out of the run folder"
            )
    # A start killed before its commit leaves only the lock (and perhaps a heartbeat): that is empty.
    if run_dir.is_dir() and any(p.name not in (".lock", HEARTBEAT_FILE) for p in run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"--run-dir {run_dir} is not empty and holds no sdfm run; choose another folder")
        if not resume and not overwrite:
            raise UserError(
                f"--run-dir {run_dir} already holds a run; pass --resume to continue it or --overwrite to delete it and start over"
            )
    pointer = run_dir / "checkpoints" / "latest"
    if resume and pointer.exists() and not pointer.is_file():
        raise UserError(
            f"{pointer} is not a file, but sdfm keeps its pointer to the newest checkpoint there; "
            "move it out of the checkpoints folder"
        )


class RunLock:
    """An advisory ``fcntl.flock`` on ``folder/.lock``, held by one process for as long as it works
    in the folder. The kernel drops the lock when its holder dies, so a stale lock (holder killed) is
    simply taken over; the file records the holder's host and PID for the refusal message. On
    network file systems without flock support, locking is best effort (see README, Reliability).

    Args:
        folder: the folder to own (created if missing).
        what: how the refusal names the holder ("trainer", "worker").
        fix: what the refused user should do.
    """

    def __init__(self, folder: Path, what: str, fix: str):
        self.path = Path(folder) / ".lock"
        self.what, self.fix = what, fix
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another {self.what} ({holder}); {self.fix}"
            ) from None
        previous = _read_holder(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        except OSError as e:  # a full disk: the holder record cannot be written (the lock itself holds)
            os.close(fd)
            raise UserError(
                f"{self.path} cannot be written ({e.strerror}); free space on that disk, or choose another folder"
            ) from None
        self.fd, self.previous = fd, previous
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _read_holder(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {rec['host']}, PID {rec['pid']}, since {rec['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def is_locked(folder: Path) -> str | None:
    """The holder of ``folder/.lock`` when a live process holds it, else None (never creates it)."""
    path = Path(folder) / ".lock"
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)
    return None


def recover_replaced(run_dir: Path) -> None:
    """Put back a run that an --overwrite killed before its first checkpoint had moved aside
    (``.RUN.replaced-PID`` whose process is gone); drop one whose replacement did checkpoint. Nothing
    happens while a live trainer holds the run folder's lock: the PID test sees this machine only, and
    the lock also holds across machines where the file system supports it."""
    run_dir = Path(run_dir)
    if is_locked(run_dir) is not None:
        return
    for aside in run_dir.parent.glob(f".{run_dir.name}.replaced-*"):
        pid = aside.name.rpartition("-")[2]
        if not aside.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        if (run_dir / "checkpoints" / "latest").is_file():
            shutil.rmtree(aside, ignore_errors=True)
            continue
        if run_dir.is_dir() and not run_dir.is_symlink():
            shutil.rmtree(run_dir)
        elif run_dir.exists() or run_dir.is_symlink():
            run_dir.unlink()
        os.replace(aside, run_dir)
        info(
            f"warning: {run_dir} held a run that was stopped before its first checkpoint while replacing "
            "another (--overwrite); the replaced run is back in place"
        )


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """The run folder as a transaction: ``begin`` claims it (lock; --overwrite moves the old run
    aside), ``commit`` writes the config and dataset record, ``settle`` deletes a replaced run once
    the new one has written its first complete checkpoint, and ``rollback`` puts everything back (a
    start that fails, or a new run that fails before its first checkpoint). Between ``begin`` and
    ``commit`` the trainer builds, resumes and starts; nothing it reads is changed until then. A run
    killed before its first checkpoint leaves the replaced run aside: ``recover_replaced``, which
    ``run_training`` calls before it checks anything, puts it back.
    """

    def __init__(self, run_dir: Path, *, resume: bool, overwrite: bool):
        self.run_dir = Path(run_dir)
        self.resume, self.overwrite = resume, overwrite
        self.created = False
        self.aside: Path | None = None
        self.lock: RunLock | None = None

    @property
    def replacing(self) -> bool:
        """Whether a replaced run is still kept aside (the new run has no checkpoint yet)."""
        return self.aside is not None

    def begin(self) -> None:
        if self.run_dir.is_symlink():  # work on the folder the link names: the link itself stays
            self.run_dir = self.run_dir.resolve()
        check_run_dir(self.run_dir, resume=self.resume, overwrite=self.overwrite)
        fix = "stop that trainer first, or choose another --run-dir"
        existing = self.run_dir.is_dir() and is_run_dir(self.run_dir)
        if self.overwrite and existing:
            with RunLock(self.run_dir, "trainer", fix):  # never replace a run that is training
                self.aside = self.run_dir.with_name(f".{self.run_dir.name}.replaced-{os.getpid()}")
                os.replace(self.run_dir, self.aside)
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = RunLock(self.run_dir, "trainer", fix).acquire()
        except BaseException:
            self.rollback()
            raise

    def commit(self, cfg: Config, data: Dataset) -> None:
        write_atomic(self.run_dir / "config.toml", config_mod.dumps(cfg).encode())
        record_dataset(self.run_dir, data)

    def settle(self) -> None:
        """The new run has a complete checkpoint: the replaced run can go."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def rollback(self) -> None:
        """Undo ``begin``: remove a folder this start created (or emptied), restore a replaced run."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created or self.aside is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.aside is not None:
            os.replace(self.aside, self.run_dir)
            self.aside = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def prepare_run_dir(run_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> None:
    """Create the run folder, refusing to clobber an existing run unless asked, and save the config
    (for benchmarks and tests that drive a Trainer directly; ``sdfm train`` uses ``RunFolder``)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if overwrite and run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.toml", config_mod.dumps(cfg).encode())


def write_heartbeat(run_dir: Path, step: int) -> None:
    """Record that the owning trainer is alive (read by a worker started as its own job)."""
    write_atomic(
        Path(run_dir) / HEARTBEAT_FILE,
        json.dumps({**holder_info(), "step": step, "time": time.time()}).encode(),
    )


def heartbeat_age(run_dir: Path) -> float | None:
    """Seconds since the trainer's last heartbeat, or None when there is none (or it is unreadable)."""
    try:
        rec = json.loads((Path(run_dir) / HEARTBEAT_FILE).read_text())
        return max(0.0, time.time() - float(rec["time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_dataset(run_dir: Path, data: Dataset) -> None:
    """Write RUN/dataset.json: the dataset a run belongs to (checked by workers and resumes)."""
    info_ = {"name": data.name, "fingerprint": data.fingerprint, "n": len(data), "shape": list(data.shape)}
    if data.pack_fingerprint is not None:  # the pack's own, computed once when it was packed
        info_["pack_fingerprint"] = data.pack_fingerprint
    write_atomic(Path(run_dir) / DATASET_FILE, json.dumps(info_, indent=1).encode())


def check_dataset(run_dir: Path, data: Dataset) -> None:
    """Refuse to work for a run folder whose recorded dataset is not ``data``."""
    path = Path(run_dir) / DATASET_FILE
    if not path.is_file():
        return
    try:
        rec = json.loads(path.read_text())
        name, recorded = str(rec["name"]), str(rec["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is not a dataset record ({type(e).__name__}); it is written by `sdfm train`: restore it, or "
            "rewrite it with `sdfm train --resume` on the run"
        ) from None
    if recorded != data.fingerprint:
        pack = rec.get("pack_fingerprint") if isinstance(rec, dict) else None
        if pack and data.pack_fingerprint and pack != data.pack_fingerprint:
            raise UserError(
                f"run folder {run_dir} was trained on a pack with fingerprint {pack}, but {data.name} now holds a "
                f"pack with fingerprint {data.pack_fingerprint} (the file changed); restore the run's pack"
            )
        raise UserError(
            f"run folder {run_dir} belongs to dataset {name} (fingerprint {recorded}), but the configured "
            f"data is {data.name} (fingerprint {data.fingerprint}); point at the run's own folder/config"
        )
