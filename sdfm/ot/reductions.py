"""The one reduction of every Sinkhorn update, out_i = logsumexp_j (h_j + <a_i, b_j>), per backend
and per precision of the products.

Backends:

- ``torch``: blocked matrix products with a streaming logsumexp, O(block_size^2) memory; batches whose
  scores fit ``DENSE_SCORES`` keep the products in memory instead (``DenseReducer``).
- ``keops``: a KeOps LazyTensor reduction (any device, never stores the scores; fp32 only).
- ``triton``: the fused kernel ``sdfm.kernels.lse`` (CUDA, or TRITON_INTERPRET=1).
- ``auto``: on CUDA the faster of triton and torch, measured once per shape class; torch elsewhere.

Precisions (of the products <a_i, b_j> only: the bias, the logsumexp, the potentials and the
marginal error stay fp32):

- ``fp32``: exact fp32 products (TF32 is switched off for them on CUDA, whatever torch's setting);
- ``tf32``: TF32 tensor cores (10-bit mantissas, fp32 accumulation); emulated on a CPU by rounding
  the operands to TF32;
- ``bf16``: bf16 operands (8-bit mantissas) on tensor cores with fp32 accumulation and fp32 scores;
  on a CPU the bf16-rounded operands are multiplied in fp32, which is the same arithmetic;
- ``bf16x3``: each operand split as hi + lo with hi = bf16(a), lo = bf16(a - hi), and
  <a, b> ≈ <hi_a, hi_b> + <hi_a, lo_b> + <lo_a, hi_b> (the lo-lo term is 2^-16 of the product):
  about 16-bit mantissas from three bf16 products, torch backend only;
- ``fp64``: float64 throughout, for references (torch backend only).

Library code: single device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

from sdfm import kernels

Backend = Literal["torch", "keops", "triton", "auto"]
BACKENDS = ("torch", "keops", "triton", "auto")
"""torch: blocked matmul + logsumexp; keops: LazyTensors; triton: the fused kernels of sdfm.kernels (CUDA,
or TRITON_INTERPRET=1); auto: on CUDA, whichever of triton and torch measures faster, else torch."""

Precision = Literal["fp32", "tf32", "bf16", "bf16x3", "fp64"]
PRECISIONS = ("fp32", "tf32", "bf16", "bf16x3", "fp64")
SUPPORTED = {
    "torch": PRECISIONS,
    "keops": ("fp32", "fp64"),
    "triton": ("fp32", "tf32", "bf16"),
    "auto": ("fp32", "tf32", "bf16"),
}
"""The precisions each backend can honour."""

DENSE_SCORES = 1 << 24
"""Batches with n m up to this many scores (64 MB in fp32, n = m = 4,096) keep them in memory."""

Reduce = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(a (n, d), b (m, d), h (m,)) -> (n,) logsumexp_j (h_j + <a_i, b_j>)."""

_MM_FP32_OUT: bool | None = None  # whether this torch multiplies bf16 into fp32 outputs on CUDA


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA fp32 matrix products on or off inside the block (torch's global switch)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def round_tf32(t: Tensor) -> Tensor:
    """fp32 values rounded (to nearest, ties to even) to TF32's 10-bit mantissa, kept in fp32."""
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def lower(t: Tensor, precision: Precision) -> Tensor:
    """The operand as the products of ``precision`` read it: bf16 for bf16, a stacked (2, n, d) bf16
    (hi, lo) for bf16x3, TF32-rounded fp32 for tf32 off CUDA, else t itself."""
    if precision == "bf16":
        return t.to(torch.bfloat16)
    if precision == "bf16x3":
        hi = t.to(torch.bfloat16)
        return torch.stack([hi, (t - hi.float()).to(torch.bfloat16)])
    if precision == "tf32" and t.device.type != "cuda":
        return round_tf32(t.float())
    return t


def mm_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    """a (n, d) @ b (m, d)^T of 16-bit (bf16 or fp16) operands into fp32 scores: tensor cores with fp32
    accumulation on CUDA (torch.mm with out_dtype), the 16-bit values multiplied in fp32 elsewhere
    (the same arithmetic: products of 16-bit values are exact in fp32)."""
    global _MM_FP32_OUT
    if a.device.type == "cuda" and _MM_FP32_OUT is not False:
        try:
            out = torch.mm(a, b.T, out_dtype=torch.float32)
            _MM_FP32_OUT = True
            return out
        except (RuntimeError, TypeError):
            _MM_FP32_OUT = False  # an older torch: no bf16 -> fp32 product; fall back below
    return a.float() @ b.float().T


def products(a: Tensor, b: Tensor, precision: Precision) -> Tensor:
    """<a_i, b_j> (n, m) in fp32 (fp64 for 'fp64') from operands made by ``lower``."""
    if precision == "bf16":
        return mm_fp32_out(a, b)
    if precision == "bf16x3":
        return mm_fp32_out(a[0], b[0]) + (mm_fp32_out(a[0], b[1]) + mm_fp32_out(a[1], b[0]))
    if a.device.type == "cuda":
        with _tf32(precision == "tf32"):
            return a @ b.T
    return a @ b.T


def scores_plus(h: Tensor, a: Tensor, b: Tensor, precision: Precision) -> Tensor:
    """h_j + <a_i, b_j> (n, m) from operands made by ``lower``: one fused addmm where the product is
    a plain fp32 / TF32 / fp64 one."""
    if precision in ("bf16", "bf16x3"):
        return products(a, b, precision).add_(h)
    if a.device.type == "cuda":
        with _tf32(precision == "tf32"):
            return torch.addmm(h, a, b.T)
    return torch.addmm(h, a, b.T)


def lse_blocked(a: Tensor, b: Tensor, h: Tensor, block_size: int, precision: Precision = "fp32") -> Tensor:
    """out_i = logsumexp_j (h_j + <a_i, b_j>) in blocks, with O(block_size^2) memory.

    Args:
        a: (n, d), b: (m, d), h: (m,), float32 (float64 with precision 'fp64').
        block_size: rows and columns per block.
        precision: of the products (the module docstring).

    Returns:
        (n,) in h's dtype.
    """
    out = h.new_empty(a.shape[0])
    al, bl = lower(a, precision), lower(b, precision)
    rows = 1 if precision == "bf16x3" else 0  # the row dimension of a stacked (hi, lo) operand
    for i0 in range(0, a.shape[0], block_size):
        ai = al.narrow(rows, i0, min(block_size, a.shape[0] - i0))
        acc = None
        for j0 in range(0, b.shape[0], block_size):
            bj = bl.narrow(rows, j0, min(block_size, b.shape[0] - j0))
            hj = h[j0 : j0 + block_size]
            # One block: GEMM + bias, then a logsumexp merged into the running one (streaming), in
            # place: torch.logsumexp allocates more block-sized temporaries (about 2x slower on CPU).
            s = scores_plus(hj, ai, bj, precision)
            top = s.amax(dim=1, keepdim=True)
            part = s.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
            acc = part if acc is None else torch.logaddexp(acc, part)
        out[i0 : i0 + block_size] = acc
    return out


class DenseReducer:
    """``lse_blocked`` for batches whose n x m scores fit in memory: the product <a_i, b_j> of each
    orientation is computed once per epsilon instead of at every iteration (the iterations then cost
    one pass of add, exp and sum; on a CPU at d = 256 the product was most of an iteration).

    Args:
        precision: of the products (the module docstring).
    """

    def __init__(self, precision: Precision = "fp32") -> None:
        self.precision = precision
        self._cache: list[tuple[Tensor, Tensor, Tensor]] = []
        self._buffer: Tensor | None = None

    def __call__(self, a: Tensor, b: Tensor, h: Tensor) -> Tensor:
        scores = next((s for ka, kb, s in self._cache if ka is a and kb is b), None)
        if scores is None:
            if len(self._cache) == 2:  # annealing rescaled the points: both products are stale
                self._cache.clear()
            scores = products(lower(a, self.precision), lower(b, self.precision), self.precision)
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


def lse_triton(a: Tensor, b: Tensor, h: Tensor, precision: Precision) -> Tensor:
    """``sdfm.kernels.lse`` with the operands and the tl.dot precision of ``precision``."""
    if precision == "bf16":
        return kernels.lse(a.to(torch.bfloat16), b.to(torch.bfloat16), h)
    return kernels.lse(a, b, h, tf32=precision == "tf32")


def reducer(
    backend: Backend, block_size: int, *, dense: bool = False, precision: Precision = "fp32"
) -> Reduce:
    """The backend's reduction at ``precision`` (see the module docstring); ``dense`` (torch only)
    keeps the scores in memory."""
    if precision not in SUPPORTED.get(backend, ()):
        raise ValueError(f"backend {backend!r} cannot compute products in {precision!r}")
    if backend == "torch":
        if dense:
            return DenseReducer(precision)
        return lambda a, b, h: lse_blocked(a, b, h, block_size, precision)
    if backend == "keops":
        return lse_keops
    if backend == "triton":
        return lambda a, b, h: lse_triton(a, b, h, precision)
    if backend == "auto":
        return lambda a, b, h: kernels.auto(
            "lse",
            a,
            (a.shape[0], b.shape[0], a.shape[1]),
            lambda: lse_triton(a, b, h, precision),
            lambda: lse_blocked(a, b, h, block_size, precision),
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
