"""Column sums of the softmax over all N points: the ε > 0 assignment of the semidiscrete problem."""

from __future__ import annotations

import torch
from torch import Tensor

SOFTMAX_BLOCK = 1 << 24
"""Scores held at once by the ε > 0 reduction (64 MB in fp32); more than that is done in two passes."""

__all__ = ["SOFTMAX_BLOCK", "softmax_sums"]


def softmax_sums(q: Tensor, keys: Tensor, g: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Column sums of s and s² for s_i = softmax((g + keys q_i) / ε) over all n points.

    Exact over all n (no top-k). When whole rows fit the memory block (n up to 2^24/64 = 262,144),
    queries are taken a block of rows at a time and each row's softmax is done in one pass: one
    matrix product per step. Otherwise the work is chunked over N in two passes (a running
    logsumexp for the row normalizers, then the normalized columns), which computes the products
    twice. (A first version always chunked over N: at N = 60,000, B = 1,024 that made a step 4.6x
    slower than an argmax step; blocks of rows brought it to about the cost of one.)

    Args:
        q: (b, p) float32 queries.
        keys: (n, p) float32 points.
        g: (n,) float32 potential.

    Returns:
        (n,) Σ_i s_ij and (n,) Σ_i s_ij², float32.
    """
    b, n = q.shape[0], keys.shape[0]
    scaled = g / epsilon

    def logits(rows: slice, cols: slice) -> Tensor:
        # (g + keys q) / ε in one fused matmul-plus-bias.
        return torch.addmm(scaled[None, cols], q[rows], keys[cols].T, alpha=1.0 / epsilon)

    col_sum = torch.zeros(n, device=q.device)
    col_sq = torch.zeros(n, device=q.device)
    every = slice(None)
    rows_per_block = SOFTMAX_BLOCK // n
    if rows_per_block >= min(b, 64):
        for start in range(0, b, rows_per_block):
            s = torch.softmax(logits(slice(start, start + rows_per_block), every), dim=1)
            col_sum += s.sum(0)
            col_sq += s.mul_(s).sum(0)
        return col_sum, col_sq
    chunk = max(1, SOFTMAX_BLOCK // b)
    top = torch.full((b,), -torch.inf, device=q.device)
    acc = torch.zeros(b, device=q.device)
    for start in range(0, n, chunk):
        z = logits(every, slice(start, start + chunk))
        new_top = torch.maximum(top, z.max(1).values)
        acc = acc * torch.exp(top - new_top) + torch.exp(z - new_top[:, None]).sum(1)
        top = new_top
    lse = top + torch.log(acc)
    for start in range(0, n, chunk):
        s = torch.exp(logits(every, slice(start, start + chunk)) - lse[:, None])
        col_sum[start : start + chunk] = s.sum(0)
        col_sq[start : start + chunk] = s.mul_(s).sum(0)
    return col_sum, col_sq
