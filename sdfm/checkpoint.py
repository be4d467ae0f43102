"""Atomic, verifiable checkpoints: one folder per step, written aside and moved into place.

Layout of ``RUN/checkpoints/step-00001000/``::

    model.safetensors, ema.safetensors     weights (string metadata: step, fingerprint)
    coupling.safetensors                   coupling state (warm-start potentials, ...)
    optimizer.pt, scheduler.pt             torch.save'd state dicts (loaded with weights_only=True)
    scaler.pt                              the fp16 gradient scaler's state (train.precision = 'fp16')
    trainer_state.json                     step, data position, world size, ... and the sha256 of every file

The trainer's random draws are functions of (seed, step, row) (``sdfm.data.noise``), so no generator
state is saved and a checkpoint resumes on any number of ranks.

A checkpoint is complete when ``trainer_state.json`` exists and every file matches its recorded hash.
Files are written into ``.tmp-step-...``, fsynced, and the folder is renamed with ``os.replace``; only
then is the ``latest`` pointer updated (also atomically) and old checkpoints pruned. A crash at any
point leaves the previous complete checkpoint untouched, and a torn or corrupted one is skipped with a
warning when resuming.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from sdfm.errors import UserError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one:
    a temporary file in the same folder, fsync, ``os.replace``, fsync of the folder. The one atomic
    writer of sdfm (checkpoint pointers, configs, potentials, classifiers, evaluation files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass
class Checkpoint:
    """A loaded checkpoint: its step, folder, trainer state and a reader for its files."""

    step: int
    path: Path
    state: dict[str, Any]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``name.safetensors`` (verified when the checkpoint was opened)."""
        return load((self.path / f"{name}.safetensors").read_bytes())

    def has(self, filename: str) -> bool:
        """Whether the checkpoint recorded (and verified) the file ``filename``."""
        return filename in self.state.get("files", {})

    def object(self, name: str) -> Any:
        """A torch.save'd state dict ``name.pt`` (weights_only: no code runs on load)."""
        return torch.load(self.path / f"{name}.pt", map_location="cpu", weights_only=True)


class CheckpointManager:
    """Saves and finds checkpoints under ``run_dir/checkpoints``.

    Args:
        run_dir: the run folder.
        keep_last: number of most recent complete checkpoints to keep.
        warn: callable receiving one-line warnings (skipped checkpoints).
    """

    def __init__(self, run_dir: Path, keep_last: int, warn: Callable[[str], None] = print):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.warn = warn

    def save(
        self,
        step: int,
        tensors: dict[str, dict[str, torch.Tensor]],
        objects: dict[str, Any],
        state: dict[str, Any],
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically and return its folder.

        Args:
            step: training step (the folder is ``step-{step:08d}``).
            tensors: file stem -> flat dict of tensors, written as safetensors.
            objects: file stem -> state dict written with torch.save (optimizer, scheduler).
            state: JSON-serializable trainer state; the file hashes are added to it.
            metadata: string metadata stored in every safetensors file.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        blobs: dict[str, bytes] = {}
        for stem, tdict in tensors.items():
            flat = {k: v.detach().cpu().contiguous() for k, v in tdict.items()}
            blobs[f"{stem}.safetensors"] = save(flat, metadata={"step": str(step), **(metadata or {})})
        for stem, obj in objects.items():
            buf = io.BytesIO()
            torch.save(obj, buf)
            blobs[f"{stem}.pt"] = buf.getvalue()
        hashes = {}
        for name, blob in blobs.items():
            with open(tmp / name, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            hashes[name] = hashlib.sha256(blob).hexdigest()
        # The state file is written last: its presence and hashes mark the checkpoint complete.
        full_state = {**state, "step": step, "files": hashes}
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump(full_state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume at that step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        write_atomic(self.dir / "latest", f"{final.name}\n".encode())
        self._prune()
        return final

    def steps(self) -> list[int]:
        """Steps of all checkpoint folders present (complete or not), newest first."""
        if not self.dir.is_dir():
            return []
        found = [int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def _verify(self, path: Path) -> dict[str, Any]:
        """Return the trainer state of a complete checkpoint; raise ValueError saying what is wrong."""
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise ValueError(f"{STATE_FILE} is missing")
        try:
            state = json.loads(state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{STATE_FILE} is unreadable ({e})") from None
        for name, digest in state.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise ValueError(f"{name} is missing")
            if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
                raise ValueError(f"{name} does not match its recorded hash (truncated or corrupted)")
        return state

    def load_latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, skipping broken ones with a warning.

        Returns None when there is no checkpoint at all; raises UserError when checkpoints exist but
        none is complete.
        """
        steps = self.steps()
        for step in steps:
            path = self.dir / f"step-{step:08d}"
            try:
                state = self._verify(path)
            except ValueError as e:
                self.warn(f"warning: skipping checkpoint {path}: {e}")
                continue
            return Checkpoint(step=step, path=path, state=state)
        if steps:
            raise UserError(
                f"no complete checkpoint in {self.dir} (all {len(steps)} are damaged); "
                "start a new run with --overwrite or restore a checkpoint"
            )
        return None

    def _prune(self) -> None:
        for step in self.steps()[self.keep_last :]:
            shutil.rmtree(self.dir / f"step-{step:08d}", ignore_errors=True)
        for p in self.dir.glob(".tmp-step-*"):  # leftovers of crashed saves of this or other runs
            if not p.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(p, ignore_errors=True)
