"""Helpers shared by the ``sdfm bench`` workloads: the default device, thread pinning, timing, the
machine description that every benchmark prints beside its numbers, and the JSON writer."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def default_device() -> str:
    """'cuda' when a GPU is present, else 'cpu' (the default --device of every benchmark)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(threads: int) -> None:
    """Pin every thread pool a benchmark uses to ``threads`` (0: leave the defaults).

    torch's intra-op pool; FAISS, whose wheel carries its own OpenMP runtime with its own setting
    (``faiss.omp_set_num_threads``); and OMP/MKL_NUM_THREADS for libraries loaded later and for child
    processes. KeOps's compiled CPU formulas link ``libgomp.so.1``, which resolves to the copy torch
    already loaded, so they follow torch's setting (checked by the CPU-utilization column).
    """
    if threads <= 0:
        return
    torch.set_num_threads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that wall time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[float, float, T]:
    """Run ``fn`` once: (wall seconds, process CPU seconds over wall seconds, result).

    The CPU/wall ratio is the number of busy cores: about 1.0 for a run pinned to one thread,
    whatever library did the work; it shows a thread pool that ignored the pinning.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    wall = time.perf_counter() - wall
    return wall, (time.process_time() - cpu) / max(wall, 1e-9), out


def machine_info() -> dict[str, str | int]:
    """Platform, CPU count, torch version/threads and the CUDA device (or 'none')."""
    info: dict[str, str | int] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    try:
        import faiss
    except ImportError:
        return info
    return info | {"faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()}


def start_machine(threads: int, **extra: Any) -> dict:
    """Pin the threads (``set_threads``), print the machine line every benchmark starts with, and
    return that description (``machine_info`` plus ``extra``, e.g. the device)."""
    set_threads(threads)
    machine = machine_info() | extra
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    return machine


def write_json(path: Path, machine: dict, args: Any, **results: Any) -> None:
    """Write a benchmark's machine, options (a dataclass) and results to ``path`` (the --json option)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(args) | {"json": str(path)}
    path.write_text(json.dumps({"machine": machine, "args": settings, **results}, indent=1, default=str))
    print(f"wrote {path}")


def triton_skip(device: torch.device | str) -> str | None:
    """Why the Triton rows cannot be timed on ``device`` (None on CUDA when Triton works). Off CUDA
    they are always skipped: Triton's CPU interpreter (TRITON_INTERPRET=1, set by the kernel tests)
    runs the kernels for correctness, far too slowly to time."""
    from sdfm import kernels

    if torch.device(device).type != "cuda":
        return "needs CUDA (Triton's CPU interpreter is for tests, not timing)"
    return kernels.triton_problem(device)
