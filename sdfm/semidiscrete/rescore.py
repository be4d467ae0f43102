"""Exact matches from low-precision candidates (docs/design.md §7).

A bf16 or fp16 search is fast (tensor cores, half the bytes) but its scores are rounded. Its top-k
candidates are rescored in float64, and the best of them is the exact answer whenever a bound on the
rounding proves that no point outside the candidates can beat it:

- every low-precision score s~_ij is within e_i of the exact s_ij = <q_i, y_j> + g_j (the bound of
  ``score_error_bound``: operand rounding 2u + u^2 and fp32 accumulation of the d products, both
  relative to |q_i| max_j |y_j|, the absolute rounding of coordinates below the normal range, plus
  the fp32 rounding of the sum and of the bias; infinite for a query beyond fp16's range, so that
  such a query is always searched again);
- a point j outside the top-k has s~_ij <= s~_i(k), the k-th candidate's low-precision score, so
  s_ij <= s~_i(k) + e_i;
- hence if the best rescored candidate j* has s_ij* > s~_i(k) + e_i, it is the exact argmax (with
  ties going to the smallest id among the candidates, as a float64 brute force does).

Queries whose certificate fails are searched again exactly (float64 over all points): correctness
never depends on k; k only decides how often that happens.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
"""Relative rounding of one operand stored in each precision."""
FP16_MAX = 65504.0
"""The largest finite fp16 value: a larger operand or bias would round to inf."""
_SUBNORMAL_STEP = {"fp32": 2.0**-150, "bf16": 2.0**-134, "fp16": 2.0**-25}
"""Absolute rounding of an operand below the normal range (half the smallest subnormal step)."""

_CHUNK = 1 << 24
"""Entries of the float64 candidate block gathered at a time (128 MB)."""

__all__ = ["FP16_MAX", "UNIT_ROUNDOFF", "exact_argmax", "rescore", "score_error_bound"]


def score_error_bound(
    q: Tensor, key_norm: float, bias_abs: float, precision: str, bias_precision: str = "fp32"
) -> Tensor:
    """(B,) float64 bound on |s~_ij - s_ij| over all j for queries q (B, p) (see the module docstring).

    Args:
        q: (B, p) fp32 queries (exact: they are rounded to ``precision`` for the product).
        key_norm: max_j |y_j| of the keys.
        bias_abs: max_j |g_j|.
        precision: the operands' precision ('fp32', 'bf16', 'fp16').
        bias_precision: the precision the bias was added in (a FAISS fp16 database rounds it).
    """
    u = UNIT_ROUNDOFF[precision]
    p = q.shape[1]
    gamma = 2.0 * p * 2.0**-24  # fp32 accumulation of p products, doubled for any order
    q_norm = q.double().norm(dim=1)
    product = q_norm * key_norm
    operands = (2 * u + u * u + gamma * (1 + u) ** 2) * product
    # Coordinates below the normal range round absolutely: |<q, dy>| <= |q| sqrt(p) step, and alike.
    tiny = _SUBNORMAL_STEP[precision] * p**0.5 * (q_norm + key_norm) * (1 + u)
    bound = operands + tiny + 2.0**-23 * (product + bias_abs) + UNIT_ROUNDOFF[bias_precision] * bias_abs
    if precision == "fp16":  # an operand beyond fp16's range became inf: nothing can be certified
        overflow = q.abs().amax(1) > FP16_MAX if q.numel() else torch.zeros(q.shape[0], dtype=torch.bool)
        bound = torch.where(overflow.to(bound.device), torch.inf, bound)
    if bias_precision == "fp16" and bias_abs > FP16_MAX:
        bound = torch.full_like(bound, torch.inf)
    return bound


def _exact_scores(q: Tensor, keys: Tensor, bias: Tensor, cand: Tensor) -> Tensor:
    """float64 <q_i, y_c> + g_c (B, k) for candidate ids cand (B, k) (-1: padding, scored -inf)."""
    out = torch.full(cand.shape, -torch.inf, dtype=torch.float64, device=q.device)
    rows = max(1, _CHUNK // max(1, cand.shape[1] * q.shape[1]))
    for start in range(0, q.shape[0], rows):
        c = cand[start : start + rows]
        valid = c >= 0
        safe = c.clamp_min(0)
        k = keys[safe].double()  # (b, k, p)
        s = torch.einsum("bkp,bp->bk", k, q[start : start + rows].double()) + bias[safe].double()
        out[start : start + rows] = torch.where(valid, s, out[start : start + rows])
    return out


def rescore(
    q: Tensor, keys: Tensor, bias: Tensor, cand: Tensor, kth: Tensor, bound: Tensor
) -> tuple[Tensor, Tensor]:
    """The exact best of each query's candidates, and whether it is certified to be the argmax.

    Args:
        q: (B, p) fp32 queries.
        keys: (n, p) fp32 points; bias: (n,) fp32 potential.
        cand: (B, k) int64 candidate ids into keys (-1: padding).
        kth: (B,) fp32 low-precision score of the k-th candidate (-inf when the candidates are all
            the points: then every answer is certified).
        bound: (B,) float64 ``score_error_bound``.

    Returns:
        (B,) int64 best candidate ids (ties: the smallest id) and (B,) bool certificates.
    """
    scores = _exact_scores(q, keys, bias, cand)
    top = scores.amax(1, keepdim=True)
    # Among candidates with the top score, the smallest id.
    tied = torch.where(scores == top, cand, torch.iinfo(torch.int64).max)
    best = tied.amin(1)
    certified = top.squeeze(1) > kth.double() + bound
    return best, certified


def exact_argmax(q: Tensor, keys: Tensor, bias: Tensor, chunk: int = 1 << 16) -> Tensor:
    """argmax_j <q_i, y_j> + g_j in float64 over all n points, chunked over n (ties: smallest j)."""
    q64 = q.double()
    best = torch.full((q.shape[0],), -torch.inf, dtype=torch.float64, device=q.device)
    arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    for start in range(0, keys.shape[0], chunk):
        s = q64 @ keys[start : start + chunk].double().T + bias[start : start + chunk].double()
        value, pos = s.max(1)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, pos + start, arg)
    return arg
