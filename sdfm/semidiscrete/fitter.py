"""The stochastic fitter of the dual potential g of semidiscrete OT (``PotentialFitter``).

Methods (the problem and its gradient: ``sdfm.semidiscrete.problem``; docs/design.md §7 has the
measurements behind the choice):

- ``auto`` (the default): ``averaged_sgd`` when the matching space has at least ``HIGH_DIM`` (256)
  dimensions, else ``sgd_tail``. Why (``sdfm bench potential``, one CPU thread; docs/design.md §7):
  at d = 784 the B x N product dominates a step, so averaged_sgd's softmax step costs about what an
  argmax step does (Fashion-MNIST 10k: 571 against 535 steps in 240 s) and its lower χ̂² per step
  makes it 2.4x lower per second there (0.021 against 0.050 at 240 s; tied on the full 60,000).
  At d <= 64 the B x N exponentials dominate (digits: 1,764 against 4,626 steps in 60 s) and it is
  tied (digits) or behind (2-D data: 6.1 against 0.052 after 60 s; Fashion-MNIST PCA 64: 0.033
  against 0.0045 after 240 s). 256 lies between the dimensions measured; it is not tuned.
- ``sgd_tail`` (sdfm's own formulation of "decreasing steps with averaging"): SGD with a
  slowly decreasing step lr_t = lr0 / sqrt(1 + t / T0) (T0 = ``decay_steps``, 100) and a
  polynomial-decay ("tail") average of the iterates, ḡ_t = ḡ_{t-1} + (1 + η)/(t + η) (g_t - ḡ_{t-1})
  (η = ``tail_power``, 3: iterate s weighs ∝ s^η, so the first half of the fit carries 6% of the
  weight and the average forgets the transient; Shamir & Zhang 2013). Default lr0 = 4 x sgd_ema's
  step, min(2 B, 0.4 N) δ. Why: a constant step leaves a noise floor (the EMA below averages only
  ~1/(1 - ema) steps, i.e. a fixed number of samples, so its χ̂² stops falling: χ̂² ≈ N / samples
  averaged), while the tail average's window grows with t and the decreasing step removes the
  constant step's bias, so χ̂² keeps falling with the budget. The larger start shortens the
  transient from g = 0 (a never-matched point gains lr/N per step).
- ``sgd_ema`` (as OTT-JAX): plain SGD on g from g0 = 0 with a constant step, and an exponential moving
  average (0.99, bias-corrected) of the iterates is the potential. Default step:
  lr = min(0.5 B, 0.1 N) δ, with δ the score width of a typical cell (``problem_scales``). Why: SGD's
  stationary noise gives the raw iterate χ̂² ≈ lr / (2 B δ_eff) (measured δ_eff ≈ 0.5-1 δ on digits,
  Fashion-MNIST 10k/PCA-64 and 2-D data), so 0.5 B δ keeps the raw iterate near χ̂² ≈ 0.3-0.5 and its
  EMA far lower, whatever N; the curvature of F per coordinate is ~1/(N δ), so 0.1 N δ keeps small
  problems well inside stability (10 steps to relax). A never-matched point gains lr/N per step:
  with N >> B the transient, not the noise, is what limits a short fit (raise lr there).
- ``averaged_sgd`` (as POT's ``ot.semidiscrete.solve_semidiscrete``): lr_t = lr0 t^(-2/3),
  lr0 = min(2 sqrt(N B), 2 N) δ (POT's sqrt(N B) is for costs of unit scale; in units of δ the
  factor 2 was near the best on digits and Fashion-MNIST 10k/PCA-64, and the 2 N cap avoids a long
  unstable start on tiny problems), a decreasing regularization ε_t = max(ε, ε0 / sqrt(t)) with
  ε0 = δ (POT: 0.1 in cost units), and the uniform (Polyak) average of the iterates as the
  potential. Because ε_t > 0 always, every step is a softmax over all N points (about twice the cost
  of an argmax step on a CPU).

The start: g = 0, or a coarse problem's potential (``sdfm.semidiscrete.coarse``) where cells are
narrow (2-D data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sdfm.errors import UserError
from sdfm.ot.collectives import LOCAL, Collectives, share
from sdfm.semidiscrete.coarse import coarse_start
from sdfm.semidiscrete.index import Backend, MatchIndex, Precision
from sdfm.semidiscrete.problem import SampleSource, SemidiscreteProblem
from sdfm.semidiscrete.schedule import tail_lr, tail_weight

Method = Literal["auto", "sgd_tail", "sgd_ema", "averaged_sgd"]
METHODS = ("auto", "sgd_tail", "sgd_ema", "averaged_sgd")
Init = Literal["auto", "coarse", "gaussian", "zero"]
INITS = ("auto", "coarse", "gaussian", "zero")

COARSE_BELOW = 0.01
"""init='auto' starts from the coarse problem when δ (cell score width) < COARSE_BELOW * s (spread)."""
HIGH_DIM = 256
"""method='auto' uses averaged_sgd in a matching space of at least HIGH_DIM dimensions, else sgd_tail."""
FITTER_FORMAT = "sdfm.potential_fitter/1"

__all__ = ["HIGH_DIM", "METHODS", "FitterOptions", "PotentialFitter", "resolve_method"]


def resolve_method(method: str, match_dim: int) -> str:
    """The method a fit runs: ``method`` itself, or for 'auto' the one that measured best at
    ``match_dim`` (the dimension of the matching space: the PCA dimension, else d)."""
    if method != "auto":
        return method
    return "averaged_sgd" if match_dim >= HIGH_DIM else "sgd_tail"


@dataclass(frozen=True, kw_only=True)
class FitterOptions:
    """Settings of a potential fit (the [potential] config carries the same names where it has them).

    Attributes:
        epsilon: entropic regularization of the target problem (0: the hard, Laguerre-cell problem).
        method: 'auto' (the default: averaged_sgd in a matching space of >= ``HIGH_DIM`` dimensions,
            else sgd_tail), 'sgd_tail' (decreasing step, tail average), 'sgd_ema' (constant step,
            EMA of the iterates) or 'averaged_sgd' (POT's schedule, ε annealed from δ).
        batch_size: noise samples per step (with labels, split across classes, at least 2 each).
        lr: step size (sgd_ema) or lr0 (sgd_tail, averaged_sgd); None: the default of the module
            docstring (``PotentialFitter.lr`` holds the value used).
        ema: decay of the iterate average for sgd_ema.
        tail_power: η of sgd_tail's average (0: the uniform average of every iterate).
        decay_steps: T0 of sgd_tail's step, lr0 / sqrt(1 + t / T0).
        pca_dim: fit in the top principal components (0: full dimension).
        backend: ``MatchIndex`` backend for the ε = 0 assignments.
        seed: seed of the fitter's generator (all noise comes from it).
        eps0: initial regularization of averaged_sgd's schedule (None: δ, the cell score width).
        init: 'coarse' (start from ``coarse_start`` of each class block, computed at the first step),
            'zero' (g = 0), or 'auto': coarse when a cell's score width is under 1% of the spread of
            the scores (δ / s: ~1e-4 for 20,000 2-D points, where it turns a minute's χ̂² from ~40
            into ~1; ~0.2 for digits and Fashion-MNIST, where g = 0 is as good and the coarse start
            only costs time).
        clusters: K of the coarse start (None: min(1024, N / 16)).
        precision: of the matching index's products (None: ``default_precision``, 16-bit for
            the torch index on CUDA, fp32 elsewhere; 16-bit answers are rescored and certified exact).
        candidates: candidates per query of a 16-bit matching search.
    """

    epsilon: float = 0.0
    method: Method = "auto"
    batch_size: int = 1024
    lr: float | None = None
    ema: float = 0.99
    tail_power: float = 3.0
    decay_steps: float = 100.0
    pca_dim: int = 0
    backend: Backend = "torch"
    seed: int = 0
    eps0: float | None = None
    init: Init = "auto"
    clusters: int | None = None
    precision: Precision | None = None
    candidates: int = 16

    def check(self) -> None:
        """Raise UserError (one line naming the setting) for settings no problem can take."""
        if self.init not in INITS:
            raise UserError(f"unknown potential init '{self.init}'; use one of {', '.join(INITS)}")
        if self.method not in METHODS:
            raise UserError(
                f"unknown potential fitting method '{self.method}'; use one of {', '.join(METHODS)}"
            )
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise UserError(
                f"epsilon={self.epsilon} must be a finite number >= 0 (0: unregularized matching)"
            )
        if not 0 <= self.ema < 1:
            raise UserError(f"ema={self.ema} must be in [0, 1)")
        if not (self.tail_power >= 0 and math.isfinite(self.tail_power)):
            raise UserError(f"tail_power={self.tail_power} must be a finite number >= 0")
        if not (self.decay_steps > 0 and math.isfinite(self.decay_steps)):
            raise UserError(f"decay_steps={self.decay_steps} must be a positive number of steps")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr={self.lr} must be positive (or None for the default)")


class PotentialFitter:
    """Stateful stochastic solver of the semi-dual (see the module docstring for the methods).

    Args:
        y: (N, d) data points (flattened).
        options: the fit's settings.
        labels: (N,) classes: one independent block of g per class.
        sample_source: ``(n, generator) -> (n, d)`` noise; default standard normal.
        device: where to compute (default: y's device).
        comm: the ranks that share every step (``LOCAL``: one process). Every rank draws the same
            noise batch (the same seed), scores its share of the rows against all N points, and the
            column sums are summed over the ranks, so every rank takes the same step: for ε = 0 (counts)
            bit for bit the single-process one, and the fitter's state is the single-process state.

    Attributes:
        problem: the ``SemidiscreteProblem``; n: N; batch_size: noise samples per step.
        lr, eps0: the step size and averaged_sgd's initial regularization in use.
        method, init: the method and start in use ('auto' resolved; init 'coarse', 'gaussian' or
            'zero').
        t: steps taken; g: the last iterate; g_avg: the running average (``potential()``): the EMA
            (sgd_ema), the tail average (sgd_tail) or the uniform average (averaged_sgd).
    """

    def __init__(
        self,
        y: Tensor,
        options: FitterOptions = FitterOptions(),
        *,
        labels: Tensor | None = None,
        sample_source: SampleSource | None = None,
        device: torch.device | str | None = None,
        comm: Collectives = LOCAL,
    ):
        options.check()
        self.comm = comm
        o = self.options = options
        self.problem = SemidiscreteProblem(
            y,
            labels=labels,
            pca_dim=o.pca_dim,
            backend=o.backend,
            device=device,
            batch_size=o.batch_size,
            sample_source=sample_source,
            precision=o.precision,
            candidates=o.candidates,
        )
        p = self.problem
        self.n, self.epsilon, self.ema = p.n, float(o.epsilon), o.ema
        self.method = resolve_method(o.method, p.index.match_dim)
        self.batch_size = p.total_batch
        delta = p.cell_scale
        lr = o.lr
        if lr is None:
            if self.method == "sgd_ema":
                lr = min(0.5 * p.total_batch, 0.1 * p.n) * delta
            elif self.method == "sgd_tail":
                lr = min(2.0 * p.total_batch, 0.4 * p.n) * delta
            else:
                lr = min(2.0 * math.sqrt(p.n * p.total_batch), 2.0 * p.n) * delta
        self.lr = float(lr)
        self.eps0 = delta if o.eps0 is None else float(o.eps0)
        self.generator = torch.Generator(device=p.device).manual_seed(o.seed)
        self.g = torch.zeros(p.n, device=p.device)
        self.g_avg = torch.zeros(p.n, device=p.device)
        self.t = 0
        self.clusters = min(1024, p.n // 16) if o.clusters is None else o.clusters
        init = o.init
        if init == "auto":
            init = "coarse" if p.cell_scale < COARSE_BELOW * p.score_scale else "zero"
        self.init = init
        self._coarse_pending = init == "coarse"  # done at the first step, not for a resumed fitter
        if init == "gaussian":
            self._gaussian_start()

    def _coarse_start(self) -> None:
        """g <- ``coarse_start`` of each class block (the blocks are independent problems)."""
        p = self.problem
        keys = p.index.data_keys(p.y)
        gen = torch.Generator(device=self.generator.device).manual_seed(
            int(self.generator.initial_seed()) + 1
        )
        for rows in p.rows:
            self.g[rows] = coarse_start(
                keys[rows], lambda: p.draw(gen), gen, clusters=max(1, round(self.clusters * len(rows) / p.n))
            )

    def _gaussian_start(self) -> None:
        """g <- the dual potential of the Brenier map onto the moment-matched Gaussian of each class.

        For data y ~ N(m, Σ) and standard-normal noise, the optimal map is x -> m + Σ^(1/2) x and its
        semi-dual potential is g(y) = -(y - m)^T Σ^(-1/2) (y - m) / 2 (argmax_y <x, y> + g(y) is then
        exactly m + Σ^(1/2) x). Σ's eigenvalues are floored at 1e-3 of their mean (images have a
        singular covariance).
        """
        p = self.problem
        keys = p.index.data_keys(p.y)
        for rows in p.rows:
            k = keys[rows].double()
            centered = k - k.mean(0)
            cov = centered.T @ centered / max(1, len(rows) - 1)
            vals, vecs = torch.linalg.eigh(cov)
            vals = vals.clamp_min(1e-3 * float(vals.mean().clamp_min(1e-30)))
            inv_sqrt = (vecs * vals.rsqrt()) @ vecs.T
            g = -0.5 * ((centered @ inv_sqrt) * centered).sum(1)
            self.g[rows] = (g - g.mean()).float()

    @property
    def index(self) -> MatchIndex:
        """The matching index of the fit (its bias is the last iterate used for an ε = 0 step)."""
        return self.problem.index

    def epsilon_at(self, t: int) -> float:
        """Regularization used at step t (1-based)."""
        if self.method == "averaged_sgd":
            return max(self.epsilon, self.eps0 / math.sqrt(t))
        return self.epsilon

    def lr_at(self, t: int) -> float:
        """Step size at step t (1-based)."""
        if self.method == "sgd_tail":
            return tail_lr(self.lr, t, self.options.decay_steps)
        return self.lr * t ** (-2.0 / 3.0) if self.method == "averaged_sgd" else self.lr

    def step(self) -> dict[str, float]:
        """One SGD step on a fresh noise batch.

        Returns:
            dict with 'step', 'chi2' (χ̂² of the iterate the gradient was taken at, on this batch),
            'epsilon' and 'lr' used.
        """
        if self._coarse_pending:
            self._coarse_start()
            self._coarse_pending = False
        t = self.t + 1
        eps, lr = self.epsilon_at(t), self.lr_at(t)
        q = self.problem.draw(self.generator)
        mine = share(q.shape[0], self.comm.rank, self.comm.world)
        col_sum, col_sq = self.problem.sums(q, self.g, eps, mine)
        if self.comm.world > 1:  # ε = 0: col_sq is col_sum (counts), one reduction is enough
            col_sum = self.comm.reduce_sum(col_sum)
            col_sq = col_sum if eps <= 0 else self.comm.reduce_sum(col_sq)
        chi2 = self.problem.chi2(col_sum, col_sq)
        self.g.sub_(lr * self.problem.gradient(col_sum))
        if self.method == "sgd_ema":
            self.g_avg.mul_(self.ema).add_(self.g, alpha=1 - self.ema)
        elif self.method == "sgd_tail":
            self.g_avg.add_(self.g - self.g_avg, alpha=tail_weight(t, self.options.tail_power))
        else:
            self.g_avg.add_((self.g - self.g_avg) / t)
        self.t = t
        return {"step": t, "chi2": chi2, "epsilon": eps, "lr": lr}

    def potential(self) -> Tensor:
        """(N,) float32 potential to use: the EMA (sgd_ema), the tail average (sgd_tail) or the
        uniform average (averaged_sgd).

        The EMA is bias-corrected (divided by 1 - ema^t, as Adam does): started at g0 = 0 it is then
        the weighted average of the iterates so far instead of being pulled towards 0 for the first
        ~1/(1 - ema) steps.
        """
        if self.t == 0:
            return self.g.clone()  # the start (zero, Gaussian or coarse)
        if self.method == "sgd_ema":
            return self.g_avg / (1 - self.ema**self.t)
        return self.g_avg.clone()

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: iterates, step count and the generator's state."""
        return {
            "format": FITTER_FORMAT,
            "method": self.method,
            "epsilon": self.epsilon,
            "n": self.n,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "eps0": self.eps0,
            "step": self.t,
            "g": self.g.cpu().clone(),
            "g_avg": self.g_avg.cpu().clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a fitter on the same data and settings."""
        if state.get("format") != FITTER_FORMAT:
            raise UserError(f"fitter state has format {state.get('format')!r}, expected {FITTER_FORMAT!r}")
        # A state saved under another default (e.g. before method 'auto') names the setting to pin.
        # (batch_size is the total over classes, so it names no single setting.)
        fixes = {"method": "potential.method", "epsilon": "potential.epsilon"}
        for key in ("method", "epsilon", "n", "batch_size"):
            if state[key] != getattr(self, key):
                fix = (
                    f"set {fixes[key]} = {state[key]!r}"
                    if key in fixes
                    else "use the same data and potential.batch_size"
                )
                raise UserError(
                    f"fitter state was saved with {key}={state[key]!r} but this fitter has {getattr(self, key)!r}; "
                    f"to continue it {fix}, or start a new fit"
                )
        self.lr, self.eps0, self.t = float(state["lr"]), float(state["eps0"]), int(state["step"])
        self.g.copy_(state["g"])
        self.g_avg.copy_(state["g_avg"])
        self._coarse_pending = False
        self.generator.set_state(state["generator"])

    def evaluate(self, num_samples: int, generator: torch.Generator, g: Tensor | None = None) -> float:
        """χ̂² of ``g`` (default: ``potential()``) at the target ε on about ``num_samples`` fresh noise
        samples drawn from ``generator`` (``SemidiscreteProblem.evaluate``)."""
        g = self.potential() if g is None else g
        return self.problem.evaluate(g, self.epsilon, num_samples, generator)

    def evaluate_with_error(self, num_samples: int, generator: torch.Generator) -> tuple[float, float]:
        """(χ̂², standard error) of ``potential()`` (``SemidiscreteProblem.evaluate_with_error``)."""
        return self.problem.evaluate_with_error(self.potential(), self.epsilon, num_samples, generator)
