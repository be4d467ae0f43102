"""A U-Net velocity network for images, in the layout of the ADM / guided-diffusion U-Net that the
OT-CFM (TorchCFM) CIFAR-10 experiments train: residual blocks conditioned on the time embedding,
self-attention at chosen resolutions, channel multipliers per level and dropout.

The TorchCFM CIFAR-10 model is ``UNet(3, 32, channels=128, channel_mult=(1, 2, 2, 2),
num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, head_channels=64)`` (``CIFAR10_UNET``):
about 35.7M parameters, as TorchCFM reports for its network. The same class scales down to a CPU
model (for example channels 32, channel_mult (1, 2), one block per level, no attention).

Structure, for L levels of widths c * channel_mult[l]:

- in: 3x3 convolution to c channels;
- down: at each level ``num_res_blocks`` residual blocks (each followed by attention when the
  feature map's side is in ``attention_resolutions``), then a stride-2 convolution (not after the last);
- middle: residual block, attention, residual block;
- up: at each level, in reverse, ``num_res_blocks + 1`` residual blocks on the concatenation with
  the matching skip connection (attention where the side matches), then nearest upsampling to the
  skip's size and a 3x3 convolution (not after the first level);
- out: GroupNorm, SiLU, a zero-initialized 3x3 convolution.

Residual blocks and attention end in zero-initialized layers, so every block starts as the
identity (as in ADM). Sides need not be powers of two: 28 -> 14 -> 7 -> 4 and back, upsampling to
the skip's own size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdfm.models.embedding import ConditionEmbedding

CIFAR10_UNET = dict(
    channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1
)
"""The OT-CFM / TorchCFM CIFAR-10 network (with head_channels 64, the default)."""


def groups(channels: int) -> int:
    """GroupNorm groups: 32 as in ADM, fewer for narrow CPU-sized models (channels must divide)."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected embedding, then GroupNorm-SiLU-dropout-conv (zero
    initialized), added to the input (through a 1x1 convolution when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups(in_channels), in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups(out_channels), out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, in, H, W), emb (B, emb_dim) -> (B, out, H, W)."""
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, heads of ``head_channels`` channels, added to
    the input through a zero-initialized projection."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention over {channels} channels cannot use {self.heads} heads")
        self.norm = nn.GroupNorm(groups(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c / heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h * w)).reshape(b, c, h, w)


class UNet(nn.Module):
    """Velocity network v(t, x[, label]) for images of shape (in_channels, image_size, image_size), or
    a mean-flow network u(x, t, t + h) with ``horizon_input`` (see the module docstring).

    Args:
        in_channels: image channels.
        image_size: height and width (at least 2 ** (levels - 1)).
        channels: base width c.
        channel_mult: width of each level in units of c; its length is the number of levels.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sides at which blocks are followed by self-attention.
        dropout: dropout rate inside the residual blocks.
        head_channels: channels per attention head.
        num_classes: classes of a conditional model, 0 for an unconditional one.
        horizon_input: take a second time input, the horizon h (mean-flow models).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        head_channels: int = 64,
        num_classes: int = 0,
        horizon_input: bool = False,
    ):
        super().__init__()
        if channels < 2 or channels % 2 or not channel_mult or min(channel_mult) < 1 or num_res_blocks < 1:
            raise ValueError(
                f"UNet needs an even channels >= 2, channel multipliers >= 1 and num_res_blocks >= 1; got "
                f"channels={channels}, channel_mult={tuple(channel_mult)}, num_res_blocks={num_res_blocks}"
            )
        if image_size < 2 ** (len(channel_mult) - 1):
            raise ValueError(f"UNet image_size {image_size} is too small for {len(channel_mult)} levels")
        if not 0 <= dropout < 1:
            raise ValueError(f"UNet dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.image_size = in_channels, image_size
        c = channels
        emb_dim = 4 * c
        self.embed = ConditionEmbedding(emb_dim, num_classes, freq_dim=c, horizon_input=horizon_input)
        attend = set(attention_resolutions)

        def block(cin: int, cout: int, side: int) -> nn.ModuleList:
            layers = [ResBlock(cin, cout, emb_dim, dropout)]
            if side in attend:
                layers.append(Attention(cout, head_channels))
            return nn.ModuleList(layers)

        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, width, sides = [c], c, [image_size]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(width, c * mult, sides[level]))
                width = c * mult
                skips.append(width)
            if level < len(channel_mult) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                sides.append((sides[level] + 1) // 2)  # a stride-2, padding-1 convolution
                skips.append(width)
        self.middle = nn.ModuleList(
            [
                ResBlock(width, width, emb_dim, dropout),
                Attention(width, head_channels),
                ResBlock(width, width, emb_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(width + skips.pop(), c * mult, sides[level]))
                width = c * mult
            if level > 0:
                self.upsample.append(nn.Conv2d(width, width, 3, padding=1))
        self.levels, self.blocks = len(channel_mult), num_res_blocks
        self.out = nn.Sequential(
            nn.GroupNorm(groups(width), width), nn.SiLU(), _zero(nn.Conv2d(width, in_channels, 3, padding=1))
        )

    def forward(
        self, t: Tensor, x: Tensor, labels: Tensor | None = None, horizon: Tensor | None = None
    ) -> Tensor:
        """Velocity at (t, x).

        Args:
            t: (B,) times in [0, 1].
            x: (B, in_channels, image_size, image_size) states.
            labels: (B,) int64 classes in [0, num_classes] (num_classes = null), or None.
            horizon: (B,) horizons h in [0, 1] of a mean-flow model (None: 0, the instantaneous velocity).

        Returns:
            (B, in_channels, image_size, image_size) velocities.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"UNet expects x of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        emb = self.embed(t, labels, horizon)
        h = self.conv_in(x)
        skips = [h]
        blocks = iter(self.down)
        for level in range(self.levels):
            for _ in range(self.blocks):
                h = _run(next(blocks), h, emb)
                skips.append(h)
            if level < self.levels - 1:
                h = self.downsample[level](h)
                skips.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)
        blocks = iter(self.up)
        for i, level in enumerate(reversed(range(self.levels))):
            for _ in range(self.blocks + 1):
                h = _run(next(blocks), torch.cat([h, skips.pop()], dim=1), emb)
            if level > 0:
                h = self.upsample[i](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.out(h)


def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
    """A residual block and its optional attention."""
    h = layers[0](h, emb)
    return layers[1](h) if len(layers) > 1 else h
