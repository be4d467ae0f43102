"""Velocity networks v(t, x, labels=None) and the weight EMA used to sample from them."""

from __future__ import annotations

import math

from torch import Tensor, nn

from sdfm.errors import UserError
from sdfm.models.ema import EMA
from sdfm.models.mlp import MLP
from sdfm.models.unet import GROUPS, UNet

__all__ = ["EMA", "MLP", "UNet", "FlatMLP", "build_model"]

KINDS = ("auto", "mlp", "unet")


class FlatMLP(nn.Module):
    """An MLP on data of any shape: flattens (B, *shape) to (B, prod(shape)) and back."""

    def __init__(self, shape: tuple[int, ...], net: MLP):
        super().__init__()
        self.shape = tuple(shape)
        self.net = net

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Velocity (B, *shape) at times t (B,) and states x (B, *shape)."""
        return self.net(t, x.flatten(1), labels).view_as(x)


def build_model(
    kind: str, shape: tuple[int, ...], num_classes: int, hidden: int, depth: int, channels: int
) -> nn.Module:
    """Build the velocity network for data of the given shape.

    Args:
        kind: 'auto' (U-Net for (C, H, W) images, MLP otherwise), 'mlp' or 'unet'.
        shape: shape of one sample, without the batch dimension.
        num_classes: classes for a conditional model, 0 for an unconditional one.
        hidden: MLP width.
        depth: MLP hidden layers.
        channels: U-Net base channels.

    Returns:
        A module with ``forward(t (B,), x (B, *shape), labels (B,) | None) -> (B, *shape)``.

    Raises:
        UserError: an unknown kind, a U-Net on non-image data, or sizes the network cannot take.
    """
    if kind not in KINDS:
        raise UserError(f"model.kind={kind!r} is not one of {', '.join(KINDS)}")
    shape = tuple(int(s) for s in shape)
    is_image = len(shape) == 3
    if kind == "auto":
        kind = "unet" if is_image else "mlp"
    if kind == "unet":
        if not is_image:
            raise UserError(
                f"model.kind='unet' needs image data of shape (C, H, W), but samples have shape {shape}; "
                "use model.kind='mlp' or 'auto'"
            )
        channels_in, height, width = shape
        if height != width or height % 4:
            raise UserError(
                f"model.kind='unet' needs square images with a side divisible by 4, got {height}x{width}; "
                "use model.kind='mlp'"
            )
        if channels < GROUPS or channels % GROUPS:
            raise UserError(f"model.channels must be a positive multiple of {GROUPS}, got {channels}")
        return UNet(in_channels=channels_in, image_size=height, channels=channels, num_classes=num_classes)
    if hidden < 2 or depth < 1:
        raise UserError(f"model.hidden must be >= 2 and model.depth >= 1, got {hidden} and {depth}")
    net = MLP(math.prod(shape), hidden=hidden, depth=depth, num_classes=num_classes)
    return net if len(shape) == 1 else FlatMLP(shape, net)
