"""The methods of the potential fit, one small object each, chosen once per fit (``choose_method``).

Every method is SGD on the negated semi-dual −F (``sdfm.semidiscrete.problem``); they differ in four
things, which is all a method object holds:

- the default first step size lr0, in units of δ (the score width of a typical cell);
- the step schedule lr_t and the regularization schedule ε_t of step t (1-based);
- how the iterates g_t are averaged, and which average is the potential.

``sgd_tail`` (sdfm's own combination of known parts), ``sgd_ema`` (as OTT-JAX) and ``averaged_sgd``
(as POT's ``ot.semidiscrete.solve_semidiscrete``) are described on their classes; ``auto`` picks
``averaged_sgd`` in a matching space of at least ``HIGH_DIM`` dimensions and ``sgd_tail`` below.
docs/design.md §7 has the derivations and the measurements behind every default. The start
(zero, coarse, Gaussian) is chosen apart, by the data's geometry (``sdfm.semidiscrete.start``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from torch import Tensor

from sdfm.semidiscrete.schedule import tail_lr, tail_weight

__all__ = [
    "HIGH_DIM",
    "METHODS",
    "AveragedSgd",
    "Method",
    "FitMethod",
    "SgdEma",
    "SgdTail",
    "choose_method",
    "resolve_method",
]

Method = Literal["auto", "sgd_tail", "sgd_ema", "averaged_sgd"]
METHODS: tuple[str, ...] = get_args(Method)
HIGH_DIM = 256
"""method='auto' uses averaged_sgd in a matching space of at least HIGH_DIM dimensions, else sgd_tail
(measured at 64 and 784 dimensions; 256 lies between and is not tuned)."""


class FitMethod:
    """One fitting method: step and ε schedules, the average of the iterates, the potential.

    Attributes:
        name: the method's name in configs, logs and fitter states.
    """

    name: ClassVar[str]

    def default_lr(self, n: int, batch: int, delta: float) -> float:
        """lr0 for N = n points, ``batch`` noise samples per step and cell score width ``delta``."""
        raise NotImplementedError

    def lr_at(self, lr0: float, t: int) -> float:
        """Step size of step t (1-based)."""
        return lr0

    def epsilon_at(self, epsilon: float, eps0: float, t: int) -> float:
        """Regularization of step t for target ε ``epsilon`` and initial ε ``eps0``."""
        return epsilon

    def average(self, g_avg: Tensor, g: Tensor, t: int) -> None:
        """Fold iterate t (1-based) into the running average ``g_avg`` (N,), in place."""
        raise NotImplementedError

    def potential(self, g_avg: Tensor, t: int) -> Tensor:
        """(N,) the potential after t >= 1 steps, from the running average (a new tensor)."""
        return g_avg.clone()


@dataclass(frozen=True)
class SgdTail(FitMethod):
    """Decreasing steps lr0 / sqrt(1 + t / T0) and a polynomial-decay ("tail") average
    ḡ_t = ḡ_{t-1} + (1 + η)/(t + η) (g_t − ḡ_{t-1}), in which iterate s weighs ∝ s^η (Shamir & Zhang
    2013): the average forgets the transient from the start while its window grows with t, and the
    decreasing step removes a constant step's bias. lr0 = min(2 B, 0.4 N) δ: the larger start
    shortens the transient (a never-matched point gains lr/N per step).

    Attributes:
        decay_steps: T0 of the step schedule.
        tail_power: η of the average (0: the uniform average of every iterate).
    """

    name: ClassVar[str] = "sgd_tail"
    decay_steps: float = 100.0
    tail_power: float = 3.0

    def default_lr(self, n: int, batch: int, delta: float) -> float:
        return min(2.0 * batch, 0.4 * n) * delta

    def lr_at(self, lr0: float, t: int) -> float:
        return tail_lr(lr0, t, self.decay_steps)

    def average(self, g_avg: Tensor, g: Tensor, t: int) -> None:
        g_avg.add_(g - g_avg, alpha=tail_weight(t, self.tail_power))


@dataclass(frozen=True)
class SgdEma(FitMethod):
    """A constant step and a bias-corrected exponential moving average of the iterates (as
    OTT-JAX). lr = min(0.5 B, 0.1 N) δ keeps the raw iterate near χ̂² ≈ 0.3-0.5 whatever N, and
    small problems well inside stability. Its χ̂² stops falling near N / (B / (1 − ema)): the
    average covers a fixed number of samples.

    Attributes:
        ema: decay of the average.
    """

    name: ClassVar[str] = "sgd_ema"
    ema: float = 0.99

    def default_lr(self, n: int, batch: int, delta: float) -> float:
        return min(0.5 * batch, 0.1 * n) * delta

    def average(self, g_avg: Tensor, g: Tensor, t: int) -> None:
        g_avg.mul_(self.ema).add_(g, alpha=1 - self.ema)

    def potential(self, g_avg: Tensor, t: int) -> Tensor:
        """The EMA divided by 1 − ema^t (as Adam does): from g0 = 0 it is then the weighted average
        of the iterates so far instead of being pulled towards 0 for the first ~1/(1 − ema) steps."""
        return g_avg / (1 - self.ema**t)


@dataclass(frozen=True)
class AveragedSgd(FitMethod):
    """POT's schedule: lr_t = lr0 t^(-2/3), lr0 = min(2 sqrt(N B), 2 N) δ (POT's sqrt(N B) is for
    costs of unit scale; the 2 N cap avoids a long unstable start on tiny problems), a decreasing
    regularization ε_t = max(ε, ε0 / sqrt(t)) (ε0 = δ by default), and the uniform (Polyak) average
    of the iterates. Every step is a softmax over all N points, since ε_t > 0."""

    name: ClassVar[str] = "averaged_sgd"

    def default_lr(self, n: int, batch: int, delta: float) -> float:
        return min(2.0 * math.sqrt(n * batch), 2.0 * n) * delta

    def lr_at(self, lr0: float, t: int) -> float:
        return lr0 * t ** (-2.0 / 3.0)

    def epsilon_at(self, epsilon: float, eps0: float, t: int) -> float:
        return max(epsilon, eps0 / math.sqrt(t))

    def average(self, g_avg: Tensor, g: Tensor, t: int) -> None:
        g_avg.add_((g - g_avg) / t)


def resolve_method(method: str, match_dim: int) -> str:
    """The method a fit runs: ``method`` itself, or for 'auto' the one that measured best at
    ``match_dim`` (the dimension of the matching space: the PCA dimension, else d)."""
    if method != "auto":
        return method
    return "averaged_sgd" if match_dim >= HIGH_DIM else "sgd_tail"


def choose_method(
    method: str, match_dim: int, *, ema: float, decay_steps: float, tail_power: float
) -> FitMethod:
    """The method object of a fit: 'auto' resolved at ``match_dim``, with the settings it uses."""
    name = resolve_method(method, match_dim)
    if name == "sgd_tail":
        return SgdTail(decay_steps=decay_steps, tail_power=tail_power)
    if name == "sgd_ema":
        return SgdEma(ema=ema)
    if name == "averaged_sgd":
        return AveragedSgd()
    raise ValueError(f"unknown potential fitting method {method!r}; use one of {', '.join(METHODS)}")
