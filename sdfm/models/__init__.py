"""Velocity networks v(t, x, labels=None, horizon=None) and the weight EMA used to sample from them."""

from __future__ import annotations

import math

from torch import Tensor, nn

from sdfm.config import ModelConfig
from sdfm.errors import UserError
from sdfm.models.ema import EMA
from sdfm.models.mlp import MLP
from sdfm.models.unet import CIFAR10_UNET, UNet

__all__ = ["CIFAR10_UNET", "EMA", "MLP", "UNet", "FlatMLP", "build_model", "parameter_count"]

KINDS = ("auto", "mlp", "unet")


class FlatMLP(nn.Module):
    """An MLP on data of any shape: flattens (B, *shape) to (B, prod(shape)) and back."""

    def __init__(self, shape: tuple[int, ...], net: MLP):
        super().__init__()
        self.shape = tuple(shape)
        self.net = net

    def forward(
        self, t: Tensor, x: Tensor, labels: Tensor | None = None, horizon: Tensor | None = None
    ) -> Tensor:
        """Velocity (B, *shape) at times t (B,) and states x (B, *shape)."""
        return self.net(t, x.flatten(1), labels, horizon).view_as(x)


def build_model(cfg: ModelConfig, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the network of the [model] config for data of the given shape.

    Args:
        cfg: the [model] section (kind 'auto': U-Net for (C, H, W) images, MLP otherwise).
        shape: shape of one sample, without the batch dimension.
        num_classes: classes for a conditional model, 0 for an unconditional one.

    Returns:
        A module with ``forward(t (B,), x (B, *shape), labels (B,) | None, horizon (B,) | None)``
        returning (B, *shape).

    Raises:
        UserError: an unknown kind, a U-Net on non-image data, or sizes the network cannot take.
    """
    kind = cfg.kind
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
        levels = len(cfg.channel_mult)
        if height != width or height < 2 ** (levels - 1):
            raise UserError(
                f"model.kind='unet' needs square images of side at least {2 ** (levels - 1)} for "
                f"{levels} levels (model.channel_mult), got {height}x{width}; use fewer levels or model.kind='mlp'"
            )
        if cfg.channels < 8 or cfg.channels % 8:
            raise UserError(f"model.channels must be a positive multiple of 8, got {cfg.channels}")
        return UNet(
            in_channels=channels_in,
            image_size=height,
            channels=cfg.channels,
            channel_mult=tuple(cfg.channel_mult),
            num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=tuple(cfg.attention_resolutions),
            dropout=cfg.dropout,
            head_channels=cfg.head_channels,
            num_classes=num_classes,
            horizon_input=cfg.horizon_input,
        )
    if cfg.hidden < 2 or cfg.depth < 1:
        raise UserError(f"model.hidden must be >= 2 and model.depth >= 1, got {cfg.hidden} and {cfg.depth}")
    net = MLP(
        math.prod(shape),
        hidden=cfg.hidden,
        depth=cfg.depth,
        num_classes=num_classes,
        horizon_input=cfg.horizon_input,
    )
    return net if len(shape) == 1 else FlatMLP(shape, net)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
