"""The step size and averaging weight of ``sgd_tail``, shared by the fitter and the coarse start
(which always uses the defaults T0 = 100 and η = 3, whatever the fitter's options).

Step t (1-based) of SGD takes lr0 / sqrt(1 + t / T0), and the tail average takes
ḡ_t = ḡ_{t-1} + w_t (g_t - ḡ_{t-1}) with w_t = (1 + η) / (t + η): iterate s then weighs ∝ s^η
(docs/design.md §7 has why).
"""

from __future__ import annotations

import math

__all__ = ["tail_lr", "tail_weight"]


def tail_lr(lr0: float, t: int, decay_steps: float = 100.0) -> float:
    """lr0 / sqrt(1 + t / T0): the step size of step t."""
    return lr0 / math.sqrt(1 + t / decay_steps)


def tail_weight(t: int, power: float = 3.0) -> float:
    """(1 + η) / (t + η): the weight of iterate t in the tail average (1 at t = 1)."""
    return (1 + power) / (t + power)
