"""A time-conditioned MLP velocity network, and the time/label embedding shared with the U-Net."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Fourier features of times in [0, 1].

    Args:
        t: (B,) times in [0, 1].
        dim: embedding width (even).

    Returns:
        (B, dim) cosines and sines of t at geometrically spaced frequencies.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    # Scale [0, 1] to the [0, 1000] range of diffusion step indices, so that the highest frequency
    # separates nearby times and the lowest one varies slowly across the whole interval.
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(t.dtype)


class ConditionEmbedding(nn.Module):
    """Embeds the time, and the class label when the model is conditional, into one vector.

    Label index ``num_classes`` is a learned "null" class: it stands for "no label" so that the same
    network can be trained with label dropout and queried unconditionally (classifier-free guidance).
    """

    def __init__(self, dim: int, num_classes: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding width must be even, got {dim}")
        self.dim = dim
        self.num_classes = num_classes
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None

    def forward(self, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Embed (B,) times and optional (B,) int64 labels in [0, num_classes] into (B, dim)."""
        emb = self.time(sinusoidal_embedding(t, self.dim))
        if self.label is None:
            if labels is not None:
                raise ValueError("labels were given to a model built with num_classes=0")
            return emb
        if labels is None:
            labels = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
        return emb + self.label(labels)


class MLP(nn.Module):
    """Velocity network v(t, x[, label]) for vectors.

    Each hidden layer adds its own projection of the time/label embedding before the activation, so
    the conditioning reaches every layer rather than only the input.

    Args:
        dim: data dimension.
        hidden: width of the hidden layers and of the embedding.
        depth: number of hidden layers.
        num_classes: number of classes for a conditional model, 0 for an unconditional one.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, num_classes: int = 0):
        super().__init__()
        if dim < 1 or hidden < 2 or depth < 1 or num_classes < 0:
            raise ValueError(
                f"MLP needs dim >= 1, hidden >= 2, depth >= 1, num_classes >= 0; "
                f"got dim={dim}, hidden={hidden}, depth={depth}, num_classes={num_classes}"
            )
        self.dim = dim
        self.embed = ConditionEmbedding(hidden + hidden % 2, num_classes)
        emb_dim = self.embed.dim
        self.layers = nn.ModuleList(nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth))
        self.cond = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(depth))
        self.act = nn.SiLU()
        self.out = nn.Linear(hidden, dim)

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Velocity at (t, x).

        Args:
            t: (B,) times in [0, 1].
            x: (B, dim) states.
            labels: (B,) int64 classes in [0, num_classes] (num_classes = null), or None.

        Returns:
            (B, dim) velocities.
        """
        emb = self.act(self.embed(t, labels))
        h = x
        for layer, cond in zip(self.layers, self.cond, strict=True):
            h = self.act(layer(h) + cond(emb))
        return self.out(h)
