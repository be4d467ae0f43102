"""The run folder: its layout, and the checks that keep a run's files consistent.

Layout of ``RUN/``::

    config.toml            the resolved config (``sdfm train --config RUN/config.toml`` reproduces it)
    dataset.json           name, fingerprint, size and point shape of the run's training data
    checkpoints/           step-NNNNNNNN/ folders and a ``latest`` pointer (``sdfm.checkpoint``)
    potential/             the semidiscrete potential: fitted.safetensors (fit before training), or the
                           worker's latest.safetensors, worker_state.pt and worker.log
    metrics.jsonl, tensorboard/, eval/

Rank 0 of a job owns the folder: only it writes here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sdfm import config as config_mod
from sdfm.checkpoint import write_atomic
from sdfm.config import Config
from sdfm.data import Dataset
from sdfm.errors import UserError

DATASET_FILE = "dataset.json"

__all__ = [
    "DATASET_FILE",
    "check_dataset",
    "is_run_dir",
    "potential_dir",
    "prepare_run_dir",
    "record_dataset",
    "snapshot_path",
]


def potential_dir(run_dir: Path) -> Path:
    """Where a run keeps its semidiscrete potential files."""
    return Path(run_dir) / "potential"


def snapshot_path(run_dir: Path) -> Path:
    """Where the worker publishes the newest potential of a run."""
    return potential_dir(run_dir) / "latest.safetensors"


def is_run_dir(path: Path) -> bool:
    return (path / "config.toml").exists() or (path / "checkpoints").exists()


def prepare_run_dir(run_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> None:
    """Create the run folder, refusing to clobber an existing run unless asked, and save the config."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; choose a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"--run-dir {run_dir} is not empty and holds no sdfm run; choose another folder")
        if not resume and not overwrite:
            raise UserError(
                f"--run-dir {run_dir} already holds a run; pass --resume to continue it or --overwrite to delete it and start over"
            )
        if overwrite:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.toml", config_mod.dumps(cfg).encode())


def record_dataset(run_dir: Path, data: Dataset) -> None:
    """Write RUN/dataset.json: the dataset a run belongs to (checked by workers and resumes)."""
    info_ = {"name": data.name, "fingerprint": data.fingerprint, "n": len(data), "shape": list(data.shape)}
    write_atomic(Path(run_dir) / DATASET_FILE, json.dumps(info_, indent=1).encode())


def check_dataset(run_dir: Path, data: Dataset) -> None:
    """Refuse to work for a run folder whose recorded dataset is not ``data``."""
    path = Path(run_dir) / DATASET_FILE
    if not path.is_file():
        return
    rec = json.loads(path.read_text())
    if rec["fingerprint"] != data.fingerprint:
        raise UserError(
            f"run folder {run_dir} belongs to dataset {rec['name']} (fingerprint {rec['fingerprint']}), but this "
            f"worker's data is {data.name} (fingerprint {data.fingerprint}); point the worker at the run's own folder/config"
        )
