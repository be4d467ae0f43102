"""Where a training run's dual potential comes from: one small object per ``potential.source``, each
with one ``start``, and the feed that brings the worker's snapshots into the coupling.

- ``FilePotential`` (``source = "file"``): a potential written by ``sdfm fit-potential`` or a worker;
- ``FittedPotential`` (``"fit"``): fitted before the first step, saved in ``RUN/potential/``, and
  continued after a SIGTERM during the fit;
- ``WorkerPotential`` (``"worker"``): the dual-potential worker process keeps publishing snapshots
  (spawned here unless one already runs for the run, or ``potential.spawn_worker`` is off); its
  ``SnapshotFeed`` swaps each new one into the coupling between steps and warns when none came for
  ``potential.stale_warning_s``.

A resumed run takes its potential from the checkpoint (the coupling's state), so only the worker
source does anything then. The trainer calls ``start`` on rank 0; in a data-parallel job the
coupling's ``poll`` shares rank 0's potential with the other ranks. The semidiscrete coupling itself
stays a pure coupling: it never reads files or keeps timers.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdfm.config import Config
from sdfm.data import Dataset
from sdfm.errors import UserError
from sdfm.monitor import info
from sdfm.rundir import is_locked, potential_dir, snapshot_path
from sdfm.semidiscrete.potential_file import Potential, load_potential

__all__ = [
    "FilePotential",
    "FittedPotential",
    "PotentialSource",
    "SnapshotFeed",
    "StartContext",
    "WorkerPotential",
    "potential_source",
]


class SnapshotFeed:
    """Brings new potential snapshots published at ``path`` into a coupling, between steps.

    ``poll`` stats the file (cheap) and reads it only when its size, mtime or inode changed. A torn,
    foreign (other dataset) or otherwise bad snapshot is ignored with a warning, once per file state.
    When the coupling has had a potential but no newer one arrives for ``stale_after_s``, it warns
    once (training goes on with the last potential).

    Args:
        path: the snapshot file the worker publishes.
        fingerprint, n: of the run's data; a snapshot of other data is refused.
        stale_after_s: seconds without a new version before the warning.
        warn: receives one-line warnings.
    """

    def __init__(
        self, path: Path, fingerprint: str, n: int, stale_after_s: float, warn: Callable[[str], None] = info
    ):
        self.path, self.fingerprint, self.n = Path(path), fingerprint, n
        self.stale_after_s, self.warn = stale_after_s, warn
        self._seen: tuple | None = None
        self._stale_warned_for: int | None = None

    def _read(self) -> Potential | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self._seen:
            return None
        self._seen = key
        try:
            return load_potential(self.path, expected_fingerprint=self.fingerprint, expected_n=self.n)
        except UserError as e:
            self.warn(f"warning: ignoring potential snapshot: {e}")
            return None

    def poll(self, coupling) -> bool:
        """Swap a newer published potential into ``coupling`` (its ``set_potential``); True when it did."""
        pot = self._read()
        if pot is not None and pot.version > coupling.version:
            coupling.set_potential(pot.g, pot.version, pot.chi2, pot.created)
            return True
        age = time.time() - coupling.published_at
        if coupling.version and age > self.stale_after_s and self._stale_warned_for != coupling.version:
            self.warn(
                f"warning: no new potential for {age:.0f} s (still version {coupling.version}); "
                "is the worker running? training goes on with the last potential"
            )
            self._stale_warned_for = coupling.version
        return False


@dataclass
class StartContext:
    """What a potential source needs to start: the run's config, data and folder, where the potential
    is fitted or matched, and how many ranks train."""

    cfg: Config
    data: Dataset
    run_dir: Path
    device: torch.device
    world: int


class PotentialSource(ABC):
    """One origin of the potential: ``start`` gives ``coupling`` its first potential (unless the run
    was ``resumed`` from a checkpoint, which holds it) and returns the feed of later ones, if any."""

    process = None  # the worker process this source started, if any

    @abstractmethod
    def start(self, coupling, ctx: StartContext, resumed: bool) -> SnapshotFeed | None:
        """Give ``coupling`` (``set_potential``, ``version``) its potential; the feed of later ones."""


class FilePotential(PotentialSource):
    """``potential.source = "file"``: read ``potential.path`` once (checked against the run's data)."""

    def start(self, coupling, ctx: StartContext, resumed: bool) -> SnapshotFeed | None:
        if not resumed:
            p = ctx.cfg.potential
            pot = load_potential(p.path, expected_fingerprint=ctx.data.fingerprint, expected_n=len(ctx.data))
            coupling.set_potential(pot.g, pot.version, pot.chi2, pot.created)
            info(f"potential: loaded {p.path} (version {pot.version}, chi2 {pot.chi2:.4g})")
        return None


class FittedPotential(PotentialSource):
    """``potential.source = "fit"``: fit before the first step into ``RUN/potential/fitted.safetensors``.
    A single process saves an interrupted fit (SIGTERM) and continues it at the next start."""

    def start(self, coupling, ctx: StartContext, resumed: bool) -> SnapshotFeed | None:
        if resumed:
            return None
        from sdfm.semidiscrete import fit_and_save
        from sdfm.semidiscrete.fit import FitInterrupted

        p, folder = ctx.cfg.potential, potential_dir(ctx.run_dir)
        info(f"potential: fitting g over N={len(ctx.data)} points to chi2 <= {p.target_chi2} ({p.method})")
        try:
            res = fit_and_save(
                ctx.cfg, ctx.data, folder / "fitted.safetensors", device=ctx.device, log=info,
                state_path=folder / "fit_state.safetensors" if ctx.world == 1 else None,
            )  # fmt: skip
        except FitInterrupted as e:
            info(f"{e}; `sdfm train --resume` continues the fit")
            raise SystemExit(0) from None
        coupling.set_potential(res.g, 1, res.chi2)
        info(f"potential: {res.steps} steps in {res.seconds:.1f} s, chi2 {res.chi2:.4g}")
        return None


class WorkerPotential(PotentialSource):
    """``potential.source = "worker"``: follow the worker's snapshots (``SnapshotFeed``), starting the
    worker unless one already runs for this run or ``potential.spawn_worker`` is off; before the first
    step, wait up to ``first_wait_s`` for its first snapshot."""

    first_wait_s = 120.0

    def start(self, coupling, ctx: StartContext, resumed: bool) -> SnapshotFeed | None:
        from sdfm.worker import WorkerProcess, wait_for_version

        p = ctx.cfg.potential
        path = snapshot_path(ctx.run_dir)
        running = is_locked(potential_dir(ctx.run_dir))
        if p.spawn_worker and running:
            info(f"potential: a worker is already running for this run ({running}); using its snapshots")
        elif p.spawn_worker:
            self.process = WorkerProcess(ctx.run_dir)
            info(f"potential: started worker pid {self.process.proc.pid} (log {self.process.log_path})")
        if coupling.version == 0 and not wait_for_version(path, timeout=self.first_wait_s):
            info(
                "warning: no potential published yet; training starts with g = 0 and picks versions up as they come"
            )
        return SnapshotFeed(path, ctx.data.fingerprint, len(ctx.data), p.stale_warning_s)


SOURCES: dict[str, type[PotentialSource]] = {"file": FilePotential, "fit": FittedPotential, "worker": WorkerPotential}


def potential_source(cfg: Config) -> PotentialSource:
    """The source object of ``cfg.potential.source``."""
    return SOURCES[cfg.potential.source]()
