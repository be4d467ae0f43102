"""Exact row samples of an entropic plan by the Gumbel-max trick, with counter-based noise.

For each row i, j_i = argmax_j [(g_j - C_ij) / eps + G_ij] with G_ij i.i.d. Gumbel is an exact draw
from the conditional plan P(j | i) (docs/design.md §5). The noise is a hash of (seed, global row id,
column id) instead of a stored matrix, so a draw does not depend on the block size or the backend,
and a shard of rows draws exactly what those rows draw in the full batch.

Library code: single device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdfm import kernels
from sdfm.ot.reductions import Precision, lower, scores_plus
from sdfm.ot.sinkhorn import SinkhornOptions, SinkhornResult, check_problem, scaled

_MASK32 = 0xFFFFFFFF

__all__ = ["draw_seed", "gumbel", "hash32", "sample_rows"]


def draw_seed(generator: torch.Generator) -> int:
    """One sampling seed from the caller's generator (one draw: the generator advances by one)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): split x into 16-bit halves so nothing overflows."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """lowbias32 (Chris Wellons' integer hash): a bijection of [0, 2^32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel(row_keys: Tensor, cols: Tensor) -> Tensor:
    """Gumbel noise G_ij = -log(-log(u)), u = (hash(row_key_i + j) + 0.5) / 2^32.

    Args:
        row_keys: (bi,) int64 hash(hash(seed) ^ i) of the global row ids.
        cols: (bj,) int64 global column ids.

    Returns:
        (bi, bj) float32 noise.
    """
    bits = hash32((row_keys[:, None] + cols[None, :]) & _MASK32)
    # float64: in float32, u would round to 1 for the top 2^-25 of hashes and give G = inf.
    u = bits.double().add_(0.5).mul_(2.0**-32)
    return u.log_().neg_().log_().neg_().float()


def sample_rows(
    x: Tensor,
    y: Tensor,
    result: SinkhornResult,
    options: SinkhornOptions,
    *,
    seed: int,
    row_offset: int = 0,
) -> Tensor:
    """Draw one partner per row from the conditional plan P(j | i) by the Gumbel-max trick.

    j_i = argmax_j [(g_j - C_ij) / eps + G_ij] with G_ij Gumbel noise from a counter-based hash of
    (seed, global row id, column id), so a shard of rows x = X[row_offset : row_offset + n] gets the
    same partners as those rows of the full batch.

    Args:
        x: (n, d) rows (global ids row_offset .. row_offset + n - 1).
        y: (m, d) all columns.
        result: potentials from the Sinkhorn solve on these columns (only g and eps are used).
        options: the solve's settings: ``cost``, ``block_size``, ``precision`` (of the score products,
            as in the solve; 'fp64' samples with fp32 products), and ``backend``: 'triton' draws with
            the fused kernel (``sdfm.kernels.gumbel_argmax``: the same noise, hence the same partners
            up to the rounding of the scores), 'auto' with the faster of it and torch; 'torch' and
            'keops' use the blocked torch path.
        seed: integer seed (taken mod 2^32), drawn by the caller from its generator (``draw_seed``).
        row_offset: global id of the first row.

    Returns:
        (n,) int64 column indices into y.
    """
    if (problem := check_problem(x, y, options, rows_may_be_empty=True)) is not None:
        raise ValueError(problem)
    if tuple(result.g.shape) != (y.shape[0],):
        raise ValueError(f"result.g has shape {tuple(result.g.shape)} but y has {y.shape[0]} rows")
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    xs, ys, _, hy = scaled(x, y, result.eps, options.cost)
    h = result.g.detach().to(xs) / result.eps - hy  # the row term of C only shifts a row's scores
    seed_key = hash32(torch.tensor(seed & _MASK32, dtype=torch.long, device=xs.device))
    rows = torch.arange(row_offset, row_offset + x.shape[0], device=xs.device)
    row_keys = hash32((seed_key ^ rows) & _MASK32)
    precision: Precision = "fp32" if options.precision == "fp64" else options.precision
    if options.backend == "triton":
        return _gumbel_argmax_triton(xs, ys, h, row_keys, precision)
    if options.backend == "auto":
        return kernels.auto(
            "gumbel_argmax",
            xs,
            (xs.shape[0], *ys.shape),
            lambda: _gumbel_argmax_triton(xs, ys, h, row_keys, precision),
            lambda: _gumbel_argmax_torch(xs, ys, h, row_keys, options.block_size, precision),
        )
    return _gumbel_argmax_torch(xs, ys, h, row_keys, options.block_size, precision)


def _gumbel_argmax_triton(
    xs: Tensor, ys: Tensor, h: Tensor, row_keys: Tensor, precision: Precision
) -> Tensor:
    if precision == "bf16":
        return kernels.gumbel_argmax(xs.to(torch.bfloat16), ys.to(torch.bfloat16), h, row_keys).index
    return kernels.gumbel_argmax(xs, ys, h, row_keys, tf32=precision == "tf32").index


def _gumbel_argmax_torch(
    xs: Tensor, ys: Tensor, h: Tensor, row_keys: Tensor, block_size: int, precision: Precision = "fp32"
) -> Tensor:
    """argmax_j (h_j + <xs_i, ys_j> + G_ij) in blocks (the noise of ``gumbel``), O(block_size^2) memory.

    Args:
        xs: (n, d), ys: (m, d), h: (m,) float32; row_keys: (n,) int64 hashed global row ids.
        precision: of the score products (``sdfm.ot.reductions``).

    Returns:
        (n,) int64 column indices.
    """
    cols_all = torch.arange(ys.shape[0], device=xs.device)
    out = torch.empty(xs.shape[0], dtype=torch.long, device=xs.device)
    xl, yl = lower(xs, precision), lower(ys, precision)
    rows = 1 if precision == "bf16x3" else 0  # the row dimension of a stacked (hi, lo) operand
    for i0 in range(0, xs.shape[0], block_size):
        xi = xl.narrow(rows, i0, min(block_size, xs.shape[0] - i0))
        keys = row_keys[i0 : i0 + block_size]
        best = xs.new_full((keys.shape[0],), -math.inf)
        arg = torch.zeros(keys.shape[0], dtype=torch.long, device=xs.device)
        for j0 in range(0, ys.shape[0], block_size):
            cols = cols_all[j0 : j0 + block_size]
            yj = yl.narrow(rows, j0, min(block_size, ys.shape[0] - j0))
            scores = scores_plus(h[j0 : j0 + block_size], xi, yj, precision)
            value, index = (scores + gumbel(keys, cols)).max(dim=1)
            better = value > best  # strict: on a tie the earlier column wins, as in one big argmax
            best = torch.where(better, value, best)
            arg = torch.where(better, index + j0, arg)
        out[i0 : i0 + block_size] = arg
    return out
