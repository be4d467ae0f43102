"""A small two-level U-Net velocity network for single-channel images (28x28, 8x8, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdfm.models.mlp import ConditionEmbedding

GROUPS = 8


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time/label embedding added in between, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Map x (B, in, H, W) with emb (B, emb_dim) (already activated) to (B, out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """Velocity network v(t, x[, label]) for images of shape (in_channels, image_size, image_size).

    Resolutions: image_size -> /2 (channels c) -> /4 (channels 2c), a middle block at /4, then back
    up with skip connections (28 -> 14 -> 7, 8 -> 4 -> 2).

    Args:
        in_channels: image channels.
        image_size: height and width; must be divisible by 4.
        channels: base width c; must be a multiple of 8 (GroupNorm with 8 groups).
        num_classes: number of classes for a conditional model, 0 for an unconditional one.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, channels: int = 32, num_classes: int = 0):
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"UNet image_size must be a positive multiple of 4, got {image_size}")
        if channels < GROUPS or channels % GROUPS:
            raise ValueError(f"UNet channels must be a positive multiple of {GROUPS}, got {channels}")
        c = channels
        self.in_channels = in_channels
        self.image_size = image_size
        self.embed = ConditionEmbedding(4 * c, num_classes)
        emb_dim = 4 * c

        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb_dim)
        self.pool1 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2 = ResBlock(c, 2 * c, emb_dim)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * c, 2 * c, emb_dim)
        self.up2 = ResBlock(4 * c, 2 * c, emb_dim)
        self.up1 = ResBlock(3 * c, c, emb_dim)
        self.norm_out = nn.GroupNorm(GROUPS, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Velocity at (t, x).

        Args:
            t: (B,) times in [0, 1].
            x: (B, in_channels, image_size, image_size) states.
            labels: (B,) int64 classes in [0, num_classes] (num_classes = null), or None.

        Returns:
            (B, in_channels, image_size, image_size) velocities.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"UNet expects x of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        emb = F.silu(self.embed(t, labels))
        h = self.conv_in(x)
        skip1 = self.down1(h, emb)  # (B, c, H, W)
        skip2 = self.down2(self.pool1(skip1), emb)  # (B, 2c, H/2, W/2)
        h = self.mid(self.pool2(skip2), emb)  # (B, 2c, H/4, W/4)
        h = self.up2(torch.cat([_upsample(h, skip2), skip2], dim=1), emb)
        h = self.up1(torch.cat([_upsample(h, skip1), skip1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _upsample(h: Tensor, like: Tensor) -> Tensor:
    """Nearest-neighbour upsampling of h to the spatial size of ``like``."""
    return F.interpolate(h, size=like.shape[-2:], mode="nearest")
