"""Per-step random draws as functions of (seed, step, row): the same global batch on any number of
ranks.

The noise x0 and the time t of row i of the global batch at step s come from a generator seeded with
(seed, s, i // ROW_BLOCK). A rank that owns rows [lo, hi) draws only the blocks that cover them, so a
data-parallel job with any number of ranks trains on exactly the draws of a single process with the
same global batch, and a resume (with the same or another number of ranks) needs no generator state:
the step counter is the state.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from sdfm.data.synthetic import Source

ROW_BLOCK = 256
"""Rows drawn per generator: a rank draws at most two blocks more than it needs."""


def derived_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (different keys give unrelated streams)."""
    h = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def step_generator(seed: int, step: int, *keys: int | str) -> torch.Generator:
    """A CPU generator for the draws of step ``step`` named by ``keys`` (e.g. 'coupling')."""
    return torch.Generator().manual_seed(derived_seed(seed, step, *keys))


def draw_rows(
    source: Source, shape: tuple[int, ...], seed: int, step: int, lo: int, hi: int
) -> tuple[Tensor, Tensor]:
    """Noise and times of rows [lo, hi) of the global batch of step ``step``.

    Args:
        source: the source distribution (``sdfm.data.synthetic.Source``).
        shape: shape of one point.
        seed: the run's seed (train.seed).
        step: the step being drawn for (0-based).
        lo, hi: global row range.

    Returns:
        x0 (hi - lo, *shape) float32 and t (hi - lo,) float32 in [0, 1), on the CPU.
    """
    xs, ts = [], []
    for k in range(lo // ROW_BLOCK, math.ceil(hi / ROW_BLOCK)):
        gen = step_generator(seed, step, "rows", k)
        x = source.draw(ROW_BLOCK, shape, gen)
        t = torch.rand(ROW_BLOCK, generator=gen)
        a, b = max(lo, k * ROW_BLOCK) - k * ROW_BLOCK, min(hi, (k + 1) * ROW_BLOCK) - k * ROW_BLOCK
        xs.append(x[a:b])
        ts.append(t[a:b])
    return torch.cat(xs), torch.cat(ts)


def row_normals(seed: int, step: int, lo: int, hi: int, key: str, width: int) -> Tensor:
    """(hi - lo, width) standard normals of rows [lo, hi) of step ``step``, in a stream named ``key``
    (per-row draws of a training method, e.g. a mean flow's two times), rank-independent like
    ``draw_rows``."""
    out = []
    for k in range(lo // ROW_BLOCK, math.ceil(hi / ROW_BLOCK)):
        z = torch.randn(ROW_BLOCK, width, generator=step_generator(seed, step, key, k))
        a, b = max(lo, k * ROW_BLOCK) - k * ROW_BLOCK, min(hi, (k + 1) * ROW_BLOCK) - k * ROW_BLOCK
        out.append(z[a:b])
    return torch.cat(out)
