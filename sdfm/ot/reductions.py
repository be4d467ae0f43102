"""The one reduction of every Sinkhorn update, out_i = logsumexp_j (h_j + <a_i, b_j>), per backend.

- ``torch``: blocked matrix products with a streaming logsumexp, O(block_size^2) memory; batches whose
  scores fit ``DENSE_SCORES`` keep the products in memory instead (``DenseReducer``).
- ``keops``: a KeOps LazyTensor reduction (any device, never stores the scores).
- ``triton``: the fused kernel ``sdfm.kernels.lse`` (CUDA, or TRITON_INTERPRET=1).
- ``auto``: on CUDA the faster of triton and torch, measured once per shape class; torch elsewhere.

Library code: single device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from sdfm import kernels

Backend = Literal["torch", "keops", "triton", "auto"]
BACKENDS = ("torch", "keops", "triton", "auto")
"""torch: blocked matmul + logsumexp; keops: LazyTensors; triton: the fused kernels of sdfm.kernels (CUDA,
or TRITON_INTERPRET=1); auto: on CUDA, whichever of triton and torch measures faster, else torch."""

DENSE_SCORES = 1 << 24
"""Batches with n m up to this many scores (64 MB in fp32, n = m = 4,096) keep them in memory."""

Reduce = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(a (n, d), b (m, d), h (m,)) -> (n,) logsumexp_j (h_j + <a_i, b_j>)."""


def lse_blocked(a: Tensor, b: Tensor, h: Tensor, block_size: int) -> Tensor:
    """out_i = logsumexp_j (h_j + <a_i, b_j>) in blocks, with O(block_size^2) memory.

    Args:
        a: (n, d), b: (m, d), h: (m,), all of one dtype (float32, or float64 for references).
        block_size: rows and columns per block.

    Returns:
        (n,) in a's dtype.
    """
    out = a.new_empty(a.shape[0])
    for i0 in range(0, a.shape[0], block_size):
        ai = a[i0 : i0 + block_size]
        acc = None
        for j0 in range(0, b.shape[0], block_size):
            # One block: GEMM + bias, then a logsumexp merged into the running one (streaming).
            # In place rather than torch.logsumexp, which allocates more block-sized temporaries
            # (about 2x slower on CPU).
            s = torch.addmm(h[j0 : j0 + block_size], ai, b[j0 : j0 + block_size].T)
            top = s.amax(dim=1, keepdim=True)
            part = s.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
            acc = part if acc is None else torch.logaddexp(acc, part)
        out[i0 : i0 + block_size] = acc
    return out


class DenseReducer:
    """``lse_blocked`` for batches whose n x m scores fit in memory: the product <a_i, b_j> of each
    orientation is computed once per epsilon instead of at every iteration (the iterations then cost
    one pass of add, exp and sum; on a CPU at d = 256 the product was most of an iteration)."""

    def __init__(self) -> None:
        self._cache: list[tuple[Tensor, Tensor, Tensor]] = []
        self._buffer: Tensor | None = None

    def __call__(self, a: Tensor, b: Tensor, h: Tensor) -> Tensor:
        scores = next((s for ka, kb, s in self._cache if ka is a and kb is b), None)
        if scores is None:
            if len(self._cache) == 2:  # annealing rescaled the points: both products are stale
                self._cache.clear()
            scores = a @ b.T
            self._cache.append((a, b, scores))
        if self._buffer is None or self._buffer.shape != scores.shape:
            self._buffer = torch.empty_like(scores)
        s = torch.add(scores, h, out=self._buffer)
        top = s.amax(dim=1, keepdim=True)
        return s.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


def lse_keops(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """Same reduction as ``lse_blocked`` with KeOps LazyTensors (one formula per dimension d)."""
    from pykeops.torch import LazyTensor

    a_i = LazyTensor(a[:, None, :].contiguous())
    b_j = LazyTensor(b[None, :, :].contiguous())
    h_j = LazyTensor(h[None, :, None].contiguous())
    return ((a_i | b_j) + h_j).logsumexp(dim=1).view(-1)


def reducer(backend: Backend, block_size: int, *, dense: bool = False) -> Reduce:
    """The backend's reduction (see ``BACKENDS``); ``dense`` (torch only) keeps the scores in memory."""
    if backend == "torch":
        return DenseReducer() if dense else (lambda a, b, h: lse_blocked(a, b, h, block_size))
    if backend == "keops":
        return lse_keops
    if backend == "triton":
        return kernels.lse
    if backend == "auto":
        return lambda a, b, h: kernels.auto(
            "lse",
            a,
            (a.shape[0], b.shape[0], a.shape[1]),
            lambda: kernels.lse(a, b, h),
            lambda: lse_blocked(a, b, h, block_size),
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
