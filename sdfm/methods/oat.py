"""OAT-FM fine-tuning: optimal acceleration transport between (position, velocity) states
(docs/methods.md §3). The paper's code and method section were not available: the parts below marked
[ours] are sdfm's formulation, built on the facts the paper's abstract and reviews state.

- A frozen target copy of the phase-1 model gives the endpoint velocities v0 = v̄(0, x0) and
  v1 = v̄(1, x1); it is refreshed by a hard copy every K steps or as an EMA (``TargetModel``).
- The least ∫|ẍ|² dt between (x0, v0) and (x1, v1) is 12 |x1 − x0 − (v0 + v1)/2|² + |v1 − v0|²
  [derived]; weighted α : 1 − α (α = 12/13 is that ratio) it is the squared Euclidean distance of
  a = [√α (x0 + v0/2) ; √(1 − α) v0] and b = [√α (x1 − v1/2) ; √(1 − α) v1] (``lift``), so every
  coupling applies unchanged to the lifted points (``AccelerationCoupling``), sharded Sinkhorn
  included, and the pairs are read back exactly (``lower``).
- Semidiscrete [ours]: b_j depends on the data point alone, so after each target refresh the lifted
  dataset {b_j} gets its own matching index and dual potential, fitted in this process with the
  run's [potential] budget against fresh lifted noise a(x0) (``SemidiscreteAcceleration``).
- The model then regresses the velocity of the Hermite path between the paired states (``HermitePath``).

Library code: single device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sdfm.couplings.base import Coupling, CouplingWrapper, Pairs

__all__ = ["AccelerationCoupling", "SemidiscreteAcceleration", "TargetModel", "lift", "lower"]


class TargetModel:
    """A frozen copy of the model that supplies endpoint velocities.

    Args:
        model: the model being fine-tuned (copied now).
        every: hard copy every this many steps (0: an EMA instead).
        ema: EMA decay per step when ``every`` = 0.
    """

    def __init__(self, model: nn.Module, every: int, ema: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.every, self.decay = every, ema
        self.version = 0

    def velocity(self, t: float, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """v̄(t, x) (B, *shape) of the frozen copy, in fp32 without gradients, on x's device."""
        device = next(self.module.parameters()).device
        with torch.no_grad():
            tt = torch.full((x.shape[0],), float(t), device=device)
            lab = None if labels is None else labels.to(device)
            return self.module(tt, x.to(device), lab).float().to(x.device)

    def after_step(self, model: nn.Module, step: int) -> bool:
        """Refresh after optimizer step ``step``; True when the copy changed by a hard copy."""
        if self.every > 0:
            if step % self.every == 0:
                self.module.load_state_dict(model.state_dict())
                self.version += 1
                return True
            return False
        with torch.no_grad():
            for tgt, src in zip(self.module.parameters(), model.parameters(), strict=True):
                tgt.lerp_(src.detach(), 1 - self.decay)
        return False

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"target.{k}": v.detach().clone() for k, v in self.module.state_dict().items()}
        out["target_version"] = torch.tensor(self.version)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        weights = {k[len("target.") :]: v for k, v in state.items() if k.startswith("target.")}
        self.module.load_state_dict(weights)
        self.version = int(state["target_version"])


def lift(x: Tensor, v: Tensor, alpha: float, end: int) -> Tensor:
    """(B, 2D) lifted states: a = [√α (x + v/2) ; √(1 − α) v] for the source (end 0), b =
    [√α (x − v/2) ; √(1 − α) v] for the target (end 1); |a_i − b_j|² is the acceleration cost."""
    x, v = x.flatten(1), v.flatten(1)
    sign = 0.5 if end == 0 else -0.5
    return torch.cat([math.sqrt(alpha) * (x + sign * v), math.sqrt(1 - alpha) * v], 1)


def lower(z: Tensor, alpha: float, end: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The inverse of ``lift``: (x, v), each (B, *shape)."""
    d = z.shape[1] // 2
    v = z[:, d:] / math.sqrt(1 - alpha)
    sign = 0.5 if end == 0 else -0.5
    x = z[:, :d] / math.sqrt(alpha) - sign * v
    return x.reshape(-1, *shape), v.reshape(-1, *shape)


class AccelerationCoupling(CouplingWrapper):
    """Any coupling applied to the lifted states: pairs minimizing the acceleration cost (the inner
    coupling's own cost, squared Euclidean, on the lifted points), returned with v0 and v1.

    Args:
        inner: the coupling of the lifted points (exact, Sinkhorn, in any data-parallel form).
        target: the ``TargetModel`` giving v0 and v1.
        alpha: weight of the position term (docs/methods.md §3).
    """

    def __init__(self, inner: Coupling, target: TargetModel, alpha: float):
        super().__init__(inner)
        self.target, self.alpha = target, alpha

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        shape = tuple(x0.shape[1:])
        v0 = self.target.velocity(0.0, x0, labels)
        v1 = self.target.velocity(1.0, x1, labels)
        inner = self.inner.pair(lift(x0, v0, self.alpha, 0), lift(x1, v1, self.alpha, 1), labels, generator)
        px0, pv0 = lower(inner.x0, self.alpha, 0, shape)
        px1, pv1 = lower(inner.x1, self.alpha, 1, shape)
        return Pairs(px0, px1, inner.labels, inner.index, v0=pv0, v1=pv1)

    def poll(self) -> bool:
        return self.inner.poll()

    def state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)


class SemidiscreteAcceleration(Coupling):
    """Semidiscrete OT of lifted noise against the lifted dataset {b_j} [ours].

    After every target refresh (``refresh``) the lifted dataset is recomputed, a ``MatchIndex`` is
    built over it and its dual potential is fitted (``fit``, the run's [potential] settings) against
    lifted noise a(x0), x0 from the run's source; ``pair`` then matches each lifted noise sample
    against the whole lifted dataset and reads the pairs back.

    Unconditional runs only (the lifted noise would need a class per sample).

    Args:
        y: (N, *shape) the dataset.
        target, alpha: as for ``AccelerationCoupling``.
        build: B (N, 2D) -> a ``SemidiscreteCoupling`` over the lifted points.
        fit: (B (N, 2D), sample_source) -> (g (N,), chi2): the potential of the lifted problem.
        source: (n, generator) -> (n, *shape) source samples.
    """

    def __init__(
        self,
        y: Tensor,
        target: TargetModel,
        alpha: float,
        build: Callable,
        fit: Callable,
        source: Callable[[int, torch.Generator], Tensor],
    ):
        self.y, self.target, self.alpha = y, target, alpha
        self.build, self.fit, self.source = build, fit, source
        self.inner = None
        self.version = -1

    def _lifted_noise(self, n: int, generator: torch.Generator) -> Tensor:
        x0 = self.source(n, generator)
        return lift(x0, self.target.velocity(0.0, x0), self.alpha, 0)

    def refresh(self) -> None:
        """Lift the dataset with the current target, rebuild the index, refit the potential."""
        lifted = torch.cat(
            [lift(chunk, self.target.velocity(1.0, chunk), self.alpha, 1) for chunk in self.y.split(4096)]
        )
        self.inner = self.build(lifted)
        g, chi2 = self.fit(lifted, self._lifted_noise)
        self.inner.set_potential(g, self.target.version + 1, chi2)
        self.version = self.target.version

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        if self.inner is None or self.version != self.target.version:
            self.refresh()
        shape = tuple(x0.shape[1:])
        v0 = self.target.velocity(0.0, x0)
        a = lift(x0, v0, self.alpha, 0)
        inner = self.inner.pair(a, a, None, generator)  # matched against the whole lifted dataset
        px1, pv1 = lower(inner.x1, self.alpha, 1, shape)
        return Pairs(x0, px1, labels, inner.index, v0=v0, v1=pv1)

    def stats(self) -> dict[str, float]:
        return {} if self.inner is None else self.inner.stats()
