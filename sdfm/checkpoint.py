"""Atomic, verifiable checkpoints: one folder per step, written aside and moved into place.

Layout of ``RUN/checkpoints/step-00001000/``::

    model.safetensors, ema.safetensors     weights (string metadata: step, fingerprint)
    coupling.safetensors                   coupling state (warm-start potentials, ...)
    method.safetensors                     the method's state (OAT-FM target copy, learned schedule)
    optimizer.safetensors, scheduler.safetensors
                                           optimizer / LR-schedule state dicts: their tensors, and the
                                           rest of the dict as JSON in the metadata (no pickle)
    scaler.safetensors                     the fp16 gradient scaler's state (train.precision = 'fp16')
    trainer_state.json                     step, data position, world size, ... and the sha256 of every file

Checkpoints of sdfm 0.1 stored the optimizer, scheduler and scaler with torch.save (``*.pt``); they
are still read, with ``weights_only=True`` (no code runs), and a ``.pt`` that this refuses makes the
checkpoint count as damaged. Every safetensors file is written with its JSON header's keys sorted, so
the same state gives the same bytes (and the same sha256) at every save.

The trainer's random draws are functions of (seed, step, row) (``sdfm.data.noise``), so no generator
state is saved and a checkpoint resumes on any number of ranks.

A checkpoint is complete when ``trainer_state.json`` exists and every file matches its recorded hash.
Files are written into ``.tmp-step-...``, fsynced, and the folder is renamed with ``os.replace``; only
then is the ``latest`` pointer updated (also atomically) and old checkpoints pruned. A crash at any
point leaves the previous complete checkpoint untouched, and a torn or corrupted one is skipped with a
warning when resuming.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from sdfm.errors import UserError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
TREE_KEY = "sdfm.tree"
"""Metadata key of a state file: the state dict with each tensor replaced by a reference, as JSON."""


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys (and padded with
    spaces to 8 bytes, as the format allows): safetensors itself writes the metadata in hash order,
    which differs between processes."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of a flat dict of tensors, deterministic for equal inputs."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return canonical_safetensors(save(flat, metadata=metadata))


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (ValueError if the header is not readable)."""
    try:
        n = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8 : 8 + n])
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not a safetensors file ({e})") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("not a safetensors file (its header is not an object)")
    return meta


def state_to_bytes(obj: Any) -> bytes:
    """A state dict (nested dicts, lists, tuples, numbers, strings, None and tensors: what optimizers,
    LR schedulers and gradient scalers return) as safetensors bytes, without pickle.

    Dicts are walked in sorted key order (string keys, or integer keys such as an optimizer's parameter
    ids), so equal states give equal bytes whatever order their dicts were filled in: a resumed
    optimizer's per-parameter dicts hold the same entries as an uninterrupted one's in another order."""
    tensors: dict[str, torch.Tensor] = {}

    def ordered(d: dict) -> list:
        keys = list(d)
        if all(isinstance(k, str) for k in keys) or all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
            keys.sort()
        return [(k, d[k]) for k in keys]

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors[key := str(len(tensors))] = x
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: walk(v) for k, v in ordered(x)}}
            return {"__items__": [[walk(k), walk(v)] for k, v in ordered(x)]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return {"__float__": repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"a {type(x).__name__} cannot be stored in a checkpoint state file")

    tree = walk(obj)
    return save_tensors(tensors, {TREE_KEY: json.dumps(tree, sort_keys=True)})


def state_from_bytes(blob: bytes) -> Any:
    """Inverse of ``state_to_bytes`` (ValueError on anything it did not write)."""
    tree = json.loads(safetensors_metadata(blob).get(TREE_KEY, "null"))
    if tree is None:
        raise ValueError(f"no {TREE_KEY} entry: not an sdfm state file")
    tensors = load(blob)

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__dict__" in x:
            return {k: walk(v) for k, v in x["__dict__"].items()}
        if "__items__" in x:
            return {walk(k): walk(v) for k, v in x["__items__"]}
        if "__tuple__" in x:
            return tuple(walk(v) for v in x["__tuple__"])
        if "__float__" in x:
            return float(x["__float__"])
        raise ValueError(f"unknown entry {sorted(x)} in a state file")

    return walk(tree)


class DiskFullError(UserError):
    """No space left while writing: the write was abandoned and the previous files are untouched."""


def _disk_full(path: Path, e: OSError) -> DiskFullError:
    return DiskFullError(
        f"no space left on the device of {path} ({e.strerror}); the previous checkpoint and files are kept: "
        "free space (or lower train.keep_last) and resume with --resume"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one:
    a temporary file in the same folder, fsync, ``os.replace``, fsync of the folder. The one atomic
    writer of sdfm (checkpoint pointers, configs, potentials, classifiers, evaluation files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files follow the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, e) from None
        raise
    _fsync_dir(path.parent)


def check_writable(path: Path, flag: str) -> None:
    """Refuse (one line) an output path that cannot be written, before any work: below a file, or in
    a folder this process cannot write (a test file is created there and removed)."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(
                    f"{flag} {path} is below {parent}, which is a file; choose a path in a folder"
                )
            break
    if Path(path).is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=Path(path).parent, prefix=".sdfm-write-test-"):
            pass
    except OSError as e:
        raise UserError(
            f"{flag} {path} cannot be written ({e.strerror}); choose a folder you can write"
        ) from None


@dataclass
class Checkpoint:
    """A loaded checkpoint: its step, folder, trainer state and a reader for its files."""

    step: int
    path: Path
    state: dict[str, Any]
    _objects: dict[str, Any] = field(default_factory=dict, repr=False)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``name.safetensors`` (verified when the checkpoint was opened)."""
        return load((self.path / f"{name}.safetensors").read_bytes())

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors of ``name.safetensors``, from its header alone."""
        with safe_open(str(self.path / f"{name}.safetensors"), "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118

    def has(self, filename: str) -> bool:
        """Whether the checkpoint recorded (and verified) the file ``filename``."""
        return filename in self.state.get("files", {})

    def object(self, name: str) -> Any:
        """The state dict ``name`` (optimizer, scheduler, scaler): ``name.safetensors``, or the
        ``name.pt`` of an older checkpoint, loaded with weights_only (no code runs on load). Read once
        per checkpoint: the check that a resume can load it and the resume itself share the read."""
        if name not in self._objects:
            if self.has(f"{name}.safetensors"):
                self._objects[name] = state_from_bytes((self.path / f"{name}.safetensors").read_bytes())
            else:
                self._objects[name] = torch.load(self.path / f"{name}.pt", map_location="cpu", weights_only=True)
        return self._objects[name]


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
            objects: file stem -> state dict (optimizer, scheduler), stored by ``state_to_bytes``.
            state: JSON-serializable trainer state; the file hashes are added to it.
            metadata: string metadata stored in every safetensors file.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        blobs: dict[str, bytes] = {}
        for stem, tdict in tensors.items():
            blobs[f"{stem}.safetensors"] = save_tensors(tdict, {"step": str(step), **(metadata or {})})
        for stem, obj in objects.items():
            blobs[f"{stem}.safetensors"] = state_to_bytes(obj)
        try:
            tmp.mkdir()
            hashes = {}
            for name, blob in sorted(blobs.items()):
                with open(tmp / name, "wb") as fh:
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
                hashes[name] = hashlib.sha256(blob).hexdigest()
            # The state file is written last: its presence and hashes mark the checkpoint complete.
            full_state = {**state, "step": step, "files": hashes}
            with open(tmp / STATE_FILE, "w") as fh:
                json.dump(full_state, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(final, e) from None
            raise
        if final.exists():  # re-saving the same step (e.g. after a resume at that step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self.check_pointer()
        write_atomic(self.dir / "latest", f"{final.name}\n".encode())
        self._prune()
        return final

    def check_pointer(self) -> None:
        """Refuse a ``latest`` that is not a file (sdfm writes its pointer to the newest checkpoint there)."""
        pointer = self.dir / "latest"
        if pointer.exists() and not pointer.is_file():
            raise UserError(
                f"{pointer} is not a file, but sdfm keeps its pointer to the newest checkpoint there; "
                "move it out of the checkpoints folder"
            )

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
        files = state.get("files") if isinstance(state, dict) else None
        if (
            not isinstance(files, dict)
            or not files
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
            or state.get("step") != int(path.name[len("step-") :])
        ):
            raise ValueError(f"{STATE_FILE} is not a trainer state of this step (no step or file hashes)")
        for name, digest in files.items():
            f = path / name
            if "/" in name or name.startswith(".") or not f.is_file():
                raise ValueError(f"{name} is missing")
            blob = f.read_bytes()
            if hashlib.sha256(blob).hexdigest() != digest:
                raise ValueError(f"{name} does not match its recorded hash (truncated or corrupted)")
            try:  # readable as what it claims to be: a file with a valid hash can still be forged
                if name.endswith(".safetensors"):
                    load(blob) if TREE_KEY not in safetensors_metadata(blob) else state_from_bytes(blob)
                elif name.endswith(".pt"):
                    torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001  (any refusal: pickle, format, ...)
                raise ValueError(
                    f"{name} is not readable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                ) from None
        return state

    def load_latest(self, accept: Callable[[Checkpoint], None] | None = None) -> Checkpoint | None:
        """The newest complete checkpoint, skipping broken ones with a warning.

        Args:
            accept: a further check of a verified checkpoint (for example that its tensors fit the
                model); a ValueError from it skips that checkpoint like a damaged one.

        Returns None when there is no checkpoint at all; raises UserError when checkpoints exist but
        none is complete.
        """
        steps = self.steps()
        for step in steps:
            path = self.dir / f"step-{step:08d}"
            try:
                ckpt = Checkpoint(step=step, path=path, state=self._verify(path))
                if accept is not None:
                    accept(ckpt)
            except ValueError as e:
                self.warn(f"warning: skipping checkpoint {path}: {e}")
                continue
            return ckpt
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
