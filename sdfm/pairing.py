"""The pairs of every training step, computed ahead in a background thread where the coupling allows.

A step's pairs are a function of (train.seed, step, the data stream's position, the coupling's
state): this rank's rows of the global batch (``DataStream``), their noise and times
(``sdfm.data.noise.draw_rows``), and the coupling of them (``Coupling.pair`` with the step's
generator). A coupling that runs on the CPU and talks to no other rank while pairing
(``Coupling.prefetchable``: exact OT, a semidiscrete coupling whose index is on the CPU) gets the
pairs of step k + 1 computed in one background thread while step k trains, so a CPU solver does not
stall the GPU. They are the pairs the step would compute itself, bit for bit: the data indices come
from ``DataStream.peek`` (the stream only moves when the step takes them), the draws from
(seed, step), and the coupling's state does not change in between, because a prefetching step
polls the coupling (a new potential from the worker) after taking its pairs and before launching the
next ones, instead of before. With a worker, a new potential is therefore used one step later than
without prefetching; with a fixed potential nothing differs.

A coupling that pairs on the training device (a GPU solver, or one that talks to other ranks) still
gets the next step's data rows gathered ahead in that thread: the rows are read in their stored dtype
from the (memory-mapped) dataset into pinned memory while the step trains, and copied to the device
without blocking, where they are converted to float32 (``Points.take``). The same bytes either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from sdfm.couplings.base import Coupling, Pairs
from sdfm.data import Dataset, DataStream
from sdfm.data.noise import draw_rows

__all__ = ["PairSource", "StepPairs"]


@dataclass
class StepPairs:
    """One step's pairs of this rank's rows.

    Attributes:
        pairs: the coupling's pairs (x0, x1, labels, index).
        t: (b,) the rows' times.
        coupling_ms: wall time of ``Coupling.pair`` (in the background thread when prefetched).
        wait_ms: time the training loop waited for them (the coupling's real cost to the step).
    """

    pairs: Pairs
    t: Tensor
    coupling_ms: float
    wait_ms: float = 0.0


class PairSource:
    """This rank's pairs of each training step (see the module docstring).

    Args:
        data: the training set (rows are taken from it on the CPU).
        stream: the global batches' index stream (only ``take`` moves it).
        coupling: this rank's coupling of the global batch.
        generator: step -> the coupling's generator of that step.
        seed: ``train.seed`` (the noise comes from ``data.source``).
        rows: this rank's rows [lo, hi) of every global batch.
        conditional: whether pairs carry labels.
        device: where the step trains; a coupling that is not prefetchable pairs there.
        prefetch: compute the next step's pairs ahead when the coupling allows it, else gather the
            next step's data rows ahead.
        refresh: called at every step boundary to take new coupling state (a new dual potential from
            the worker, shared by every rank); default: the coupling's ``poll``.
    """

    def __init__(
        self,
        data: Dataset,
        stream: DataStream,
        coupling: Coupling,
        generator,
        *,
        seed: int,
        rows: tuple[int, int],
        conditional: bool,
        device: torch.device,
        prefetch: bool,
        refresh: Callable[[], bool] | None = None,
    ):
        self.data, self.stream, self.coupling, self.generator = data, stream, coupling, generator
        self.refresh = refresh if refresh is not None else coupling.poll
        self.seed, self.rows, self.conditional = seed, rows, conditional
        self.on_cpu = getattr(coupling, "prefetchable", False)  # pairs on the CPU, then moved
        self.device = torch.device("cpu") if self.on_cpu else device
        self.prefetching = prefetch and self.on_cpu
        self.gather_ahead = prefetch and not self.on_cpu
        self._pool: ThreadPoolExecutor | None = None  # started by the first prefetch, stopped by close
        self._pending: tuple[int, Tensor, Future] | None = None
        self._rows_ahead: tuple[int, Tensor, Future] | None = None  # the next step's stored rows
        self.prefetched = 0  # steps whose pairs came from the background thread
        self.gathered_ahead = 0  # steps whose data rows came from the background thread

    def _pair(self, step: int, idx: Tensor, stored: Tensor | None = None) -> StepPairs:
        """Pairs of step ``step`` for the data rows ``idx`` (this rank's); ``stored``: those rows as
        gathered ahead (``Points.gather``), else they are gathered now."""
        lo, hi = self.rows
        if stored is None:
            x1 = self.data.x.take(idx, self.device)  # gathered as stored, converted on the device
        else:
            x1 = self.data.x.convert(stored, self.device)
        labels = self.data.labels[idx].to(self.device) if self.conditional else None
        x0, t = draw_rows(self.data.source, self.data.shape, self.seed, step, lo, hi)
        start = time.perf_counter()
        pairs = self.coupling.pair(x0.to(self.device), x1, labels, self.generator(step))
        return StepPairs(pairs, t, 1000 * (time.perf_counter() - start))

    def take(self, step: int) -> StepPairs:
        """The pairs of step ``step`` (prefetched, or computed now); moves the stream by one batch."""
        lo, hi = self.rows
        begin = time.perf_counter()
        if not self.prefetching:
            self.refresh()  # a new dual potential from the worker is swapped in here, between steps
            idx = self.stream.next()[lo:hi]
            result = self._pair(step, idx, self._gathered(step, idx))
            if self.gather_ahead:
                ahead = self.stream.peek()[lo:hi]
                pin = self.device.type == "cuda"
                self._rows_ahead = (step + 1, ahead, self._thread().submit(self.data.x.gather, ahead, pin=pin))
        else:
            idx = self.stream.next()[lo:hi]
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == step and torch.equal(pending[1], idx):
                result = pending[2].result()
                self.prefetched += 1
            else:  # the first step (or after a resume): nothing was computed ahead
                if pending is not None:
                    pending[2].result()
                result = self._pair(step, idx)
            self.refresh()  # after the pairs are taken, before the next ones start
            ahead = self.stream.peek()[lo:hi]
            self._pending = (step + 1, ahead, self._thread().submit(self._pair, step + 1, ahead))
        result.wait_ms = 1000 * (time.perf_counter() - begin)
        return result

    def _thread(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sdfm-pairs")
        return self._pool

    def _gathered(self, step: int, idx: Tensor) -> Tensor | None:
        """The rows of ``step`` gathered ahead, when they are the ones asked for (not after a resume)."""
        ahead, self._rows_ahead = self._rows_ahead, None
        if ahead is None:
            return None
        stored = ahead[2].result()
        if ahead[0] != step or not torch.equal(ahead[1], idx):
            return None
        self.gathered_ahead += 1
        return stored

    def close(self) -> None:
        """Wait for a pair computation still running and stop the thread."""
        for pending in (self._pending, self._rows_ahead):
            if pending is not None:
                pending[2].result()
        self._pending = self._rows_ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
