"""Run a function on W local processes joined in one gloo process group, with a hard deadline.

For the tests and the benchmark of the sharded solvers on one machine; a real job is launched by
torchrun and joins its group through ``sdfm.distributed.env``. The parent process owns the rendezvous
store, bound to a port the OS picks (port 0), so there is no hard-coded port and no window in which
another program can take a port between choosing it and binding it. Every collective times out
after ``timeout_s``, and the parent kills (by process object) any rank still alive at the deadline or
once another rank has failed, so a hang costs at most ``timeout_s``.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue as queue_module
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

HOST = "127.0.0.1"


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    threads: int,
    args: tuple,
    results: mp.Queue,
) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        # Plain pickle (not torch's shared-memory reductions): the result must outlive this process.
        results.put((rank, pickle.dumps(fn(rank, world_size, *args)), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    timeout_s: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes in one gloo group.

    Args:
        fn: a module-level (picklable) function; the default process group is initialized when it
            runs, so it can call collectives with ``group=None``.
        world_size: number of processes.
        args: extra picklable arguments.
        timeout_s: deadline for the whole run, and the timeout of every collective.
        threads: torch CPU threads per process (0: torch's default).

    Returns:
        The return values of the ranks, in rank order.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message) or died without a result.
        TimeoutError: not every rank finished within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    master = dist.TCPStore(
        HOST, 0, None, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, master.port, timeout_s, threads, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            try:
                rank, payload, error = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:g} s") from None
                continue
            if error is not None:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(out) == world_size else 0.0)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
