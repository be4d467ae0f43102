"""Training methods on top of the couplings: a path between each pair (``paths``) and an objective
(flow matching, mean flow, OAT-FM fine-tuning), chosen by the [method] section (docs/methods.md).

``Method`` is what the trainer calls: ``loss`` turns the model, the step's pairs and times into a
loss and its metrics; ``after_step`` refreshes an OAT target; ``state_dict`` holds what a resume
needs (the target copy, a learned schedule). The couplings, the data-parallel layer, checkpoints
and resume do not change with the method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

from sdfm.config import MethodConfig
from sdfm.couplings.base import Pairs
from sdfm.methods.meanflow import meanflow_loss, meanflow_times
from sdfm.methods.oat import TargetModel
from sdfm.methods.paths import HermitePath, LinearPath, PathSample, SchedulePath
from sdfm.methods.schedule import MonotoneSchedule

__all__ = ["Method", "RowDraws"]

RowDraws = Callable[[str, int], Tensor]
"""(key, width) -> (b, width) standard normals of this rank's rows of the step (rank-independent)."""


class Method:
    """The path and objective of a run.

    Args:
        cfg: the [method] section.
        schedule: the fitted schedule of a learned path.
        target: the frozen target copy of OAT fine-tuning.
    """

    def __init__(
        self, cfg: MethodConfig, schedule: MonotoneSchedule | None = None, target: TargetModel | None = None
    ):
        self.cfg, self.schedule, self.target = cfg, schedule, target
        if cfg.path == "learned":
            if schedule is None:
                raise ValueError("a learned path needs its fitted schedule")
            self.path = SchedulePath(schedule)
        elif cfg.path == "hermite":
            self.path = HermitePath()
        else:
            self.path = LinearPath()

    def loss(
        self, forward: nn.Module, bare: nn.Module, pairs: Pairs, t: Tensor, draws: RowDraws
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss of one step and its metrics.

        Args:
            forward: the model as the step calls it (DDP, compiled); bare: the module itself.
            pairs: this rank's pairs, on the model's device; t: (b,) the rows' times.
            draws: further per-row draws of the step (a mean flow's two times).
        """
        labels = pairs.labels
        if self.cfg.kind == "meanflow":
            c = self.cfg
            s, t_end = meanflow_times(
                draws("meanflow", 3).to(t.device), c.mf_ratio, c.mf_logit_mean, c.mf_logit_std
            )

            def through(model):
                return lambda x, a, b, lab: model(a, x, lab, horizon=b - a)

            return meanflow_loss(
                through(forward), through(bare), pairs.x0, pairs.x1, s, t_end,
                power=c.mf_power, c=c.mf_c, labels=labels,
            )  # fmt: skip
        sample = self.path.sample(pairs.x0, pairs.x1, t, pairs.v0, pairs.v1)
        pred = forward(sample.t, sample.x_t, labels)
        loss = F.mse_loss(pred.float(), sample.dx_t)
        metrics: dict[str, float] = {}
        if self.cfg.kind == "oat" and self.cfg.oat_accel > 0:
            accel = acceleration(bare, sample, labels)
            loss = loss + self.cfg.oat_accel * accel
            metrics["oat_accel"] = float(accel)
        return loss, metrics

    def after_step(self, model: nn.Module, step: int) -> None:
        """Refresh the OAT target after optimizer step ``step``."""
        if self.target is not None:
            self.target.after_step(model, step)

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.target is not None:
            out |= self.target.state_dict()
        if self.schedule is not None:
            out |= {f"schedule.{k}": v.detach().clone() for k, v in self.schedule.state_dict().items()}
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.target is not None:
            self.target.load_state_dict(state)
        if self.schedule is not None:
            self.schedule.load_state_dict(
                {k[len("schedule.") :]: v for k, v in state.items() if k.startswith("schedule.")}
            )


def acceleration(model: nn.Module, sample: PathSample, labels: Tensor | None) -> Tensor:
    """Mean |∂_t v_θ + (∇_x v_θ) v_θ|² at the path's points: the acceleration of the model's own flow
    (zero exactly on straight trajectories), by one JVP with tangent (1, v_θ); differentiable."""

    def v(tt: Tensor, xx: Tensor) -> Tensor:
        return model(tt, xx, labels).float()

    with torch.no_grad():
        direction = v(sample.t, sample.x_t)
    _, accel = jvp(v, (sample.t, sample.x_t), (torch.ones_like(sample.t), direction))
    return accel.pow(2).flatten(1).sum(1).mean()
