"""Launchers of the fused Triton reductions: input checks, tile sizes, the column split, merging.

Three reductions over the scores S_ij = h_j + <a_i, b_j> of rows a (n, d) against columns b (m, d):

- ``lse``: logsumexp_j S_ij (the Sinkhorn update, ``sdfm.ot.reductions.lse_blocked``);
- ``argmax``: max_j and argmax_j S_ij (the matching search, ``sdfm.semidiscrete.backends.TorchBlock.search``);
- ``gumbel_argmax``: the same with Gumbel noise G_ij from a counter-based hash added (the row sampler,
  ``sinkhorn.sample_rows``).

Each launches one program per (BLOCK_M rows, column split): on a GPU the columns are split so that
there are about two programs per SM even when n is small (a matching batch of a few hundred queries
against a million points), and the per-split partial results are merged here with torch.

Nothing here imports triton at module level: sdfm runs without it, and ``triton_problem`` says why a
Triton backend cannot run instead of an ImportError deep in a solver.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from sdfm.errors import UserError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Input dtypes of a and b; the bias, the accumulation and the outputs are always fp32."""


class Argmax(NamedTuple):
    """Best column of each row.

    Attributes:
        values: (n,) float32 max_j of the (noisy) scores.
        index: (n,) int64 argmax_j, the smallest j on a tie.
    """

    values: Tensor
    index: Tensor


@dataclass(frozen=True)
class Tiles:
    """Launch configuration: tile shape (rows, columns, slice of d) and Triton's warps/pipeline stages."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def tiles(d: int, dtype: torch.dtype, tf32: bool | None = None) -> Tiles:
    """The launch configuration for inputs of dimension d and this dtype.

    On tensor cores (16-bit inputs, or fp32 under TF32) 128 x 64 score tiles with 8 warps, the shape of
    Triton's fused-attention tutorial, whose inner loop is the same (a dot, a bias, an online reduction
    over column tiles); exact fp32 products run on the FMA units and get 64 x 64 tiles with 4 warps.
    The d-slice is 64 wide for 16-bit inputs and 32 for fp32 (the same bytes per pipeline stage), never
    wider than d needs; ``tl.dot`` needs every side >= 16. Compiled for sm_90, these configurations
    spill at most 24 bytes per thread (ptxas -v; README.md); they are not tuned on a GPU yet.
    """
    widest = 32 if dtype == torch.float32 else 64
    block_d = min(widest, max(16, 1 << max(d - 1, 0).bit_length()))
    if _precision(dtype, tf32) == "ieee":
        return Tiles(block_m=64, block_n=64, block_d=block_d, num_warps=4, num_stages=3)
    return Tiles(block_m=128, block_n=64, block_d=block_d, num_warps=8, num_stages=3)


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter (read now, through triton's knobs)."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _imported_interpreted() -> bool:
    """Whether triton's own library (tl.max, tl.sum, tl.argmax are jit functions, wrapped when triton
    is first imported) runs in the interpreter: Triton fixes the mode at that import."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


def triton_problem(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (one line that names the fix), or None.

    They run on CUDA devices, and on any device when TRITON_INTERPRET=1 (Triton's interpreter: exact
    but slow, meant for tests). Triton reads TRITON_INTERPRET once, when it is first imported, so the
    variable must be set before that (in the environment of the process, or before anything imports
    triton); setting it later is reported here rather than failing inside a kernel.
    """
    if importlib.util.find_spec("triton") is None:
        return (
            "the triton backend needs the triton package: pip install triton (Linux), or use backend 'torch'"
        )
    device = torch.device(device)
    interpret = interpret_mode()
    if device.type != "cuda" and not interpret:
        return (
            f"the triton backend needs a CUDA device, got {device.type}; use backend 'torch' (or 'auto') "
            "here, or set TRITON_INTERPRET=1 to run the kernels through Triton's slow CPU interpreter (tests)"
        )
    if _imported_interpreted() != interpret:
        state = "set" if interpret else "unset"
        return (
            f"TRITON_INTERPRET is {state} now but was not when triton was imported, and Triton fixes the "
            "interpreter mode at import; set TRITON_INTERPRET before the process starts (or before anything "
            "imports triton)"
        )
    return None


def require_triton(device: torch.device | str) -> None:
    """Raise UserError (one line, naming the fix) unless the Triton kernels can run on ``device``."""
    problem = triton_problem(device)
    if problem is not None:
        raise UserError(problem)


def _prepare(a: Tensor, b: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (n, d) and (m, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if tuple(h.shape) != (b.shape[0],):
        raise ValueError(f"h must have shape ({b.shape[0]},) (one bias per row of b), got {tuple(h.shape)}")
    if a.dtype != b.dtype or a.dtype not in DTYPES:
        raise ValueError(f"a and b must share one dtype out of {DTYPES}, got {a.dtype} and {b.dtype}")
    if not a.device == b.device == h.device:
        raise ValueError(f"a, b and h must be on one device, got {a.device}, {b.device} and {h.device}")
    if b.shape[0] == 0:
        raise ValueError("b must have at least one row")
    if max(a.shape[0], b.shape[0]) >= 2**31:
        raise ValueError("a and b must have fewer than 2^31 rows each (int32 indices in the kernels)")
    require_triton(a.device)
    return a.contiguous(), b.contiguous(), h.to(torch.float32).contiguous()


def _precision(dtype: torch.dtype, tf32: bool | None = None) -> str:
    """tl.dot input precision for fp32 inputs: TF32 tensor cores when ``tf32`` is True, exact fp32
    products when False, and with None torch's own switch (torch.set_float32_matmul_precision: exact
    by default). 16-bit inputs always use the tensor cores (the argument only matters for fp32)."""
    if dtype != torch.float32:
        return "tf32"
    if tf32 is None:
        tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def _splits(
    n: int, m: int, t: Tiles, device: torch.device, interpret: bool, splits: int | None
) -> tuple[int, int]:
    """(number of column splits, columns per split, a multiple of block_n) with no empty split."""
    col_tiles = -(-m // t.block_n)
    if splits is None:
        if interpret or device.type != "cuda":
            splits = 1
        else:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = -(-2 * sms // -(-n // t.block_m))
    splits = max(1, min(splits, col_tiles))
    cols_per_split = -(-col_tiles // splits) * t.block_n
    return -(-m // cols_per_split), cols_per_split


def _launch(
    name: str,
    a: Tensor,
    b: Tensor,
    h: Tensor,
    inputs: tuple[Tensor, ...],
    out_dtypes: tuple[torch.dtype, ...],
    splits: int | None,
    tf32: bool | None = None,
    **constexprs,
) -> tuple[Tensor, ...]:
    """Launch kernel ``name`` over (row tiles, column splits); returns its (splits, n) outputs."""
    from sdfm.kernels._triton import compiled

    n, d = a.shape
    m = b.shape[0]
    interpret = interpret_mode()
    t = tiles(d, a.dtype, tf32)
    splits, cols_per_split = _splits(n, m, t, a.device, interpret, splits)
    outputs = tuple(torch.empty((splits, n), dtype=dtype, device=a.device) for dtype in out_dtypes)
    kernel = compiled(name, interpret)
    grid = (-(-n // t.block_m), splits)
    # Triton launches on the current CUDA device, not on the tensors' one.
    on_device = torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        kernel[grid](
            a,
            b,
            h,
            *inputs,
            *outputs,
            n,
            m,
            d,
            a.stride(0),
            b.stride(0),
            cols_per_split,
            BLOCK_M=t.block_m,
            BLOCK_N=t.block_n,
            BLOCK_D=t.block_d,
            PRECISION=_precision(a.dtype, tf32),
            # Triton 3.9's interpreter multiplies 16-bit floats as their raw integer storage in
            # tl.dot, so there the tiles are widened to fp32 first (16-bit products are exact in fp32).
            UPCAST=interpret and a.dtype != torch.float32,
            **constexprs,
            num_warps=t.num_warps,
            num_stages=t.num_stages,
            enable_fp_fusion=True,
        )
    return outputs


def lse(a: Tensor, b: Tensor, h: Tensor, *, splits: int | None = None, tf32: bool | None = None) -> Tensor:
    """out_i = logsumexp_j (h_j + <a_i, b_j>), fused: no (n, m) matrix is ever stored.

    Args:
        a: (n, d) rows, float32 / bfloat16 / float16.
        b: (m, d) columns, same dtype as a; m >= 1.
        h: (m,) bias, used in float32.
        splits: column splits (default: about two programs per SM on a GPU, 1 in the interpreter).
        tf32: fp32 inputs on TF32 tensor cores (True), exact (False), or torch's setting (None).

    Returns:
        (n,) float32.
    """
    a, b, h = _prepare(a, b, h)
    if a.shape[0] == 0:
        return h.new_empty(0)
    (partial,) = _launch("lse_kernel", a, b, h, (), (torch.float32,), splits, tf32)
    return partial[0] if partial.shape[0] == 1 else torch.logsumexp(partial, 0)


def argmax(a: Tensor, b: Tensor, h: Tensor, *, splits: int | None = None, tf32: bool | None = None) -> Argmax:
    """max_j and argmax_j (h_j + <a_i, b_j>) per row (ties: smallest j), fused.

    Args:
        a: (n, d) rows (queries), float32 / bfloat16 / float16.
        b: (m, d) columns (keys), same dtype as a; m >= 1.
        h: (m,) bias, used in float32.
        splits: column splits (see ``lse``).
        tf32: fp32 inputs on TF32 tensor cores (see ``lse``).

    Returns:
        Argmax of (n,) float32 values and (n,) int64 indices into b.
    """
    a, b, h = _prepare(a, b, h)
    return _argmax(a, b, h, None, splits, tf32)


def gumbel_argmax(
    a: Tensor, b: Tensor, h: Tensor, row_keys: Tensor, *, splits: int | None = None, tf32: bool | None = None
) -> Argmax:
    """argmax_j (h_j + <a_i, b_j> + G_ij) with G_ij the counter-based Gumbel noise of ``sample_rows``.

    G_ij = -log(-log(u)), u = (hash32((row_keys_i + j) mod 2^32) + 0.5) / 2^32, computed in float64 and
    rounded to float32, bit for bit the noise of ``sdfm.ot.gumbel.gumbel``: on the same
    scores this draws the same index as the torch sampler (up to the rounding of the scores).

    Args:
        a: (n, d) rows, float32 / bfloat16 / float16.
        b: (m, d) columns, same dtype as a; m >= 1.
        h: (m,) bias, used in float32.
        row_keys: (n,) integer keys of the rows (taken mod 2^32), e.g. hash32(hash32(seed) ^ i).
        splits: column splits (see ``lse``).
        tf32: fp32 inputs on TF32 tensor cores (see ``lse``).

    Returns:
        Argmax of (n,) float32 noisy maxima and (n,) int64 indices into b.
    """
    a, b, h = _prepare(a, b, h)
    if tuple(row_keys.shape) != (a.shape[0],) or row_keys.is_floating_point():
        raise ValueError(
            f"row_keys must be ({a.shape[0]},) integers, got {tuple(row_keys.shape)} {row_keys.dtype}"
        )
    keys = row_keys.to(a.device, torch.int64) & 0xFFFFFFFF
    keys = torch.where(keys >= 2**31, keys - 2**32, keys).to(torch.int32)  # the uint32 bit patterns
    return _argmax(a, b, h, keys, splits, tf32)


def _argmax(
    a: Tensor, b: Tensor, h: Tensor, keys: Tensor | None, splits: int | None, tf32: bool | None
) -> Argmax:
    n = a.shape[0]
    if n == 0:
        return Argmax(h.new_empty(0), torch.empty(0, dtype=torch.long, device=a.device))
    # Without noise the keys pointer is never read; h stands in for it.
    inputs = (h if keys is None else keys,)
    values, index = _launch(
        "argmax_kernel", a, b, h, inputs, (torch.float32, torch.int64), splits, tf32, GUMBEL=keys is not None
    )
    if values.shape[0] == 1:
        return Argmax(values[0], index[0])
    best = values.amax(0)
    # Splits hold increasing column ranges: among the splits that reach the max, take the first one.
    first = torch.where(values == best, index, torch.iinfo(torch.int64).max).amin(0)
    return Argmax(best, first)
