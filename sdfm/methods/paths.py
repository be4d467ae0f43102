"""Probability paths between a pair (x0, x1): where a training point x_t sits at time t and the velocity
dx_t the model regresses onto (docs/methods.md §1).

- ``LinearPath``: x_t = (1 - t) x0 + t x1, dx_t = x1 - x0 (flow matching, OT-CFM, SD-FM).
- ``HermitePath``: the cubic Hermite curve from (x0, v0) at t = 0 to (x1, v1) at t = 1, the path of
  least acceleration between two (position, velocity) states (OAT-FM fine-tuning). With
  v0 = v1 = x1 - x0 it is the straight line.
- ``SchedulePath``: x_t = a(t) x0 + b(t) x1 with learned monotone schedules a, b
  (``sdfm.methods.schedule``), dx_t = a'(t) x0 + b'(t) x1.

Every path answers ``sample(x0, x1, t, v0=None, v1=None) -> PathSample``. Library code: single device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HermitePath", "LinearPath", "PathSample", "SchedulePath", "expand"]


@dataclass
class PathSample:
    """Points on the path and the velocity to regress onto.

    Attributes:
        x_t: (B, *shape) the points at time t.
        dx_t: (B, *shape) the path's velocity there.
        t: (B,) the times.
    """

    x_t: Tensor
    dx_t: Tensor
    t: Tensor


def expand(t: Tensor, like: Tensor) -> Tensor:
    """(B,) times viewed as (B, 1, ..., 1) to broadcast against ``like`` (B, *shape)."""
    return t.view(-1, *[1] * (like.dim() - 1))


class LinearPath:
    """x_t = (1 - t) x0 + t x1, dx_t = x1 - x0."""

    name = "linear"

    def sample(
        self, x0: Tensor, x1: Tensor, t: Tensor, v0: Tensor | None = None, v1: Tensor | None = None
    ) -> PathSample:
        tb = expand(t, x0)
        return PathSample(x_t=(1 - tb) * x0 + tb * x1, dx_t=x1 - x0, t=t)


class HermitePath:
    """x(t) = h00 x0 + h10 v0 + h01 x1 + h11 v1 (h00 = 2t³ − 3t² + 1, h10 = t³ − 2t² + t,
    h01 = −2t³ + 3t², h11 = t³ − t²), the least-acceleration curve between (x0, v0) and (x1, v1), and
    its velocity x'(t). Needs the endpoint velocities v0, v1."""

    name = "hermite"

    def sample(
        self, x0: Tensor, x1: Tensor, t: Tensor, v0: Tensor | None = None, v1: Tensor | None = None
    ) -> PathSample:
        if v0 is None or v1 is None:
            raise ValueError("the Hermite path needs the endpoint velocities v0 and v1")
        s = expand(t, x0)
        s2, s3 = s * s, s * s * s
        x_t = (2 * s3 - 3 * s2 + 1) * x0 + (s3 - 2 * s2 + s) * v0 + (3 * s2 - 2 * s3) * x1 + (s3 - s2) * v1
        dx_t = (6 * s2 - 6 * s) * (x0 - x1) + (3 * s2 - 4 * s + 1) * v0 + (3 * s2 - 2 * s) * v1
        return PathSample(x_t=x_t, dx_t=dx_t, t=t)


class SchedulePath:
    """x_t = a(t) x0 + b(t) x1 with a learned ``MonotoneSchedule`` (a(0) = 1, a(1) = 0, b(0) = 0,
    b(1) = 1), dx_t = a'(t) x0 + b'(t) x1. The schedule is fixed while the model trains."""

    name = "learned"

    def __init__(self, schedule: torch.nn.Module):
        self.schedule = schedule

    def sample(
        self, x0: Tensor, x1: Tensor, t: Tensor, v0: Tensor | None = None, v1: Tensor | None = None
    ) -> PathSample:
        with torch.no_grad():
            a, b, da, db = self.schedule.coefficients(t, x0.shape[1:])
        return PathSample(x_t=a * x0 + b * x1, dx_t=da * x0 + db * x1, t=t)
