"""The 'auto' backend: per shape class, time the Triton kernel against the torch code once, keep the
faster; fall back to torch for good (with one warning) if a Triton compile or launch fails.

A shape class is (operation, device, dtype, and each size rounded up to a power of two): close sizes
share a choice, so a run whose last batch is ragged does not measure again. The measurement is one
untimed call of each (Triton compiles, torch's allocator warms up) and then the best of two timed
calls; it costs about six calls of the operation once per class, and its results are used, not thrown
away. On a CPU 'auto' is torch: the interpreter is for tests, never faster.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from sdfm.kernels.reductions import triton_problem

T = TypeVar("T")

__all__ = ["AutoBackend", "auto", "auto_choices"]


def _bucket(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()


class AutoBackend:
    """Remembers which backend won for each shape class, and whether Triton failed.

    Args:
        timed_calls: timed calls of each backend per measurement (after one untimed call).
    """

    def __init__(self, timed_calls: int = 2):
        self.timed_calls = timed_calls
        self.choices: dict[tuple, str] = {}
        self.failure: str | None = None

    def _time(self, fn: Callable[[], T], sync: Callable[[], None]) -> tuple[float, T]:
        out = fn()
        best = float("inf")
        for _ in range(self.timed_calls):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best, out

    def _fail(self, key: tuple, error: Exception) -> None:
        self.failure = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(
            f"backend 'auto': the Triton kernel for {key[0]} failed ({self.failure}); using torch from now on",
            RuntimeWarning,
            stacklevel=2,
        )

    def run(
        self,
        key: tuple,
        run_triton: Callable[[], T],
        run_torch: Callable[[], T],
        sync: Callable[[], None] = lambda: None,
    ) -> T:
        """Compute with the backend chosen for ``key``, measuring both the first time.

        Args:
            key: the shape class, its first entry naming the operation (for messages).
            run_triton: computes the result with the Triton kernel.
            run_torch: computes the same result with torch.
            sync: waits for queued device work (torch.cuda.synchronize on a GPU), for timing.
        """
        if self.failure is not None or self.choices.get(key) == "torch":
            return run_torch()
        try:
            if key in self.choices:
                return run_triton()
            t_triton, out_triton = self._time(run_triton, sync)
        except Exception as error:  # a compile error, out of shared memory, a driver error, ...
            self._fail(key, error)
            return run_torch()
        t_torch, out_torch = self._time(run_torch, sync)
        self.choices[key] = "triton" if t_triton < t_torch else "torch"
        return out_triton if self.choices[key] == "triton" else out_torch


_AUTO = AutoBackend()


def auto(
    op: str, like: Tensor, sizes: tuple[int, ...], run_triton: Callable[[], T], run_torch: Callable[[], T]
) -> T:
    """Run ``op`` with the faster of its Triton and torch implementations (see the module docstring).

    Args:
        op: name of the operation, e.g. 'lse' (part of the shape class).
        like: an input tensor: its device and dtype are part of the shape class.
        sizes: the problem sizes, e.g. (n, m, d); each is rounded up to a power of two.
        run_triton: computes the result with the Triton kernel.
        run_torch: computes the same result with torch.

    Returns:
        What the chosen implementation returns.
    """
    if like.device.type != "cuda" or triton_problem(like.device) is not None:
        return run_torch()
    key = (op, str(like.device), like.dtype, *(_bucket(s) for s in sizes))
    return _AUTO.run(key, run_triton, run_torch, lambda: torch.cuda.synchronize(like.device))


def auto_choices() -> dict[tuple, str]:
    """Choices made so far by 'auto' in this process: {(op, device, dtype, *sizes): 'triton' or 'torch'}."""
    return dict(_AUTO.choices)
