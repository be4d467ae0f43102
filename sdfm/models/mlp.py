"""A time-conditioned MLP velocity network for vectors."""

from __future__ import annotations

from torch import Tensor, nn

from sdfm.models.embedding import ConditionEmbedding


class MLP(nn.Module):
    """Velocity network v(t, x[, label]) for vectors (or a mean-flow network u(x, t, t + h) with
    ``horizon_input``).

    Each hidden layer adds its own projection of the time/label embedding before the activation, so
    the conditioning reaches every layer rather than only the input.

    Args:
        dim: data dimension.
        hidden: width of the hidden layers and of the embedding.
        depth: number of hidden layers.
        num_classes: number of classes for a conditional model, 0 for an unconditional one.
        horizon_input: take a second time input, the horizon h (mean-flow models).
    """

    def __init__(
        self, dim: int, hidden: int = 256, depth: int = 3, num_classes: int = 0, horizon_input: bool = False
    ):
        super().__init__()
        if dim < 1 or hidden < 2 or depth < 1 or num_classes < 0:
            raise ValueError(
                f"MLP needs dim >= 1, hidden >= 2, depth >= 1, num_classes >= 0; "
                f"got dim={dim}, hidden={hidden}, depth={depth}, num_classes={num_classes}"
            )
        self.dim = dim
        self.embed = ConditionEmbedding(hidden + hidden % 2, num_classes, horizon_input=horizon_input)
        emb_dim = self.embed.dim
        self.layers = nn.ModuleList(nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth))
        self.cond = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(depth))
        self.act = nn.SiLU()
        self.out = nn.Linear(hidden, dim)

    def forward(
        self, t: Tensor, x: Tensor, labels: Tensor | None = None, horizon: Tensor | None = None
    ) -> Tensor:
        """Velocity at (t, x).

        Args:
            t: (B,) times in [0, 1].
            x: (B, dim) states.
            labels: (B,) int64 classes in [0, num_classes] (num_classes = null), or None.
            horizon: (B,) horizons h in [0, 1] of a mean-flow model (None: 0, the instantaneous velocity).

        Returns:
            (B, dim) velocities.
        """
        emb = self.act(self.embed(t, labels, horizon))
        h = x
        for layer, cond in zip(self.layers, self.cond, strict=True):
            h = self.act(layer(h) + cond(emb))
        return self.out(h)
