"""Mean flows with any coupling's pairs (docs/methods.md §2; MeanFlow, Geng et al. 2025, in sdfm's time
convention: noise at t = 0, data at t = 1).

A mean-flow model u_θ(x, s, t) predicts the average velocity of the flow over [s, t], so that
X_t = X_s + (t − s) u(X_s, s, t) and u(x, t, t) = v(t, x). Along a trajectory,

    u(x, s, t) = v(s, x) + (t − s) D_s u,   D_s u = ∂_s u + (∇_x u) v(s, x)

(the MeanFlow identity; the paper's sign is the opposite because its time runs from data to noise).
Training on a pair (x0, x1): x_s = (1 − s) x0 + s x1, w = x1 − x0, D = the JVP of u_θ at (x_s, s, t)
with tangent (w, 1, 0), target u_tgt = stopgrad(w + (t − s) D), and the adaptive loss
‖u_θ − u_tgt‖² / stopgrad(‖u_θ − u_tgt‖² + c)^p per sample. Rows with s = t (a share 1 − ratio)
regress plain flow matching and skip the JVP.

The network is sdfm's MLP or U-Net built with ``model.horizon_input``: u_θ(x, s, t) is
``model(s, x, labels, horizon=t - s)``. The JVP runs on the bare module (``torch.func.jvp`` cannot
trace a DDP wrapper) without gradients, with attention on the math kernel (the fused ones have no
forward-mode rule); the loss's own forward pass runs through the training wrapper (DDP, compile),
so gradients are reduced as for flow matching. Library code: single device.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.func import jvp

__all__ = ["meanflow_loss", "meanflow_sample", "meanflow_target", "meanflow_times"]

MeanFlowFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""u(x, s, t) -> (B, *shape) average velocity over [s, t]."""
LabelledMeanFlowFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
"""u(x, s, t, labels) -> (B, *shape): the same for the (B,) class labels of the rows (or None)."""


def meanflow_times(normals: Tensor, ratio: float, mean: float, std: float) -> tuple[Tensor, Tensor]:
    """(s, t) with s <= t per row from (B, 3) standard normals: two logit-normal(mean, std) draws
    sorted, and s = t for the rows whose third normal puts them outside the ``ratio`` share."""
    times = torch.sigmoid(mean + std * normals[:, :2])
    s, t = times.min(1).values, times.max(1).values
    apart = torch.special.ndtr(normals[:, 2]) < ratio
    return torch.where(apart, s, t), t


def _math_attention():
    """The math SDPA kernel, whose ops all have forward-mode AD (no-op where torch lacks the API)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def meanflow_target(u: MeanFlowFn, x_s: Tensor, s: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """u_tgt = w + (t − s) D with D the JVP of u at (x_s, s, t) along (w, 1, 0); no gradients.

    Args:
        u: the mean-flow function u(x, s, t).
        x_s: (B, *shape) points; s, t: (B,) times with s <= t; w: (B, *shape) the velocity at x_s
            (the pair's x1 − x0 in training, the marginal velocity in the identity test).
    """
    with torch.no_grad(), _math_attention():
        _, d = jvp(u, (x_s, s, t), (w, torch.ones_like(s), torch.zeros_like(t)))
    gap = (t - s).view(-1, *[1] * (x_s.dim() - 1))
    return w + gap * d


def meanflow_loss(
    forward: LabelledMeanFlowFn,
    bare: LabelledMeanFlowFn,
    x0: Tensor,
    x1: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    power: float,
    c: float,
    labels: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The adaptively weighted mean-flow loss of one batch and its metrics.

    Args:
        forward: u_θ(x, s, t, labels) through the training wrapper (gradients flow); bare: the same
            function on the bare module (for the JVP, which only sees the rows with s < t).
        x0, x1: (B, *shape) the coupling's pairs; s, t: (B,) times, s <= t.
        power, c: the adaptive weight ‖Δ‖² / (‖Δ‖² + c)^p (p = 0: plain squared error).
        labels: (B,) class labels of a conditional model, or None.

    Returns:
        (loss, {"mf_mse": mean ‖Δ‖² per coordinate, "mf_apart": share of rows with s < t}).
    """
    sb = s.view(-1, *[1] * (x0.dim() - 1))
    x_s = (1 - sb) * x0 + sb * x1
    w = x1 - x0
    target = w.clone()
    apart = s < t
    if bool(apart.any()):
        rows = apart.nonzero().squeeze(1)
        lab = None if labels is None else labels[rows]
        u = lambda x, a, b: bare(x, a, b, lab)  # noqa: E731
        target[rows] = meanflow_target(u, x_s[rows], s[rows], t[rows], w[rows]).to(target.dtype)
    pred = forward(x_s, s, t, labels).float()
    err = (pred - target).pow(2).flatten(1).sum(1)
    weight = (err.detach() + c).pow(-power) if power > 0 else torch.ones_like(err)
    loss = (weight * err).mean()
    return loss, {
        "mf_mse": float(err.detach().mean()) / x0[0].numel(),
        "mf_apart": float(apart.float().mean()),
    }


def meanflow_sample(u: MeanFlowFn, x0: Tensor, steps: int, return_trajectory: bool = False):
    """k-step mean-flow map on the uniform grid 0 = t_0 < ... < t_k = 1:
    x_{i+1} = x_i + (t_{i+1} − t_i) u(x_i, t_i, t_{i+1}). Returns (x1, trajectory or None)."""
    if steps < 1:
        raise ValueError(f"a mean-flow sampler needs at least 1 step, got {steps}")
    grid = torch.linspace(0.0, 1.0, steps + 1, device=x0.device)
    x, traj = x0, [x0] if return_trajectory else None
    with torch.no_grad():
        for i in range(steps):
            s = grid[i].expand(x.shape[0])
            t = grid[i + 1].expand(x.shape[0])
            x = x + (grid[i + 1] - grid[i]) * u(x, s, t)
            if traj is not None:
                traj.append(x)
    return x, None if traj is None else torch.stack(traj)


def as_meanflow(model: nn.Module, labels: Tensor | None = None) -> MeanFlowFn:
    """A horizon model as u(x, s, t) = model(s, x, labels, horizon = t − s)."""

    def u(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return model(s, x, labels, horizon=t - s)

    return u
