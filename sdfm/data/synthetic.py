"""Synthetic 2-D distributions, drawn with an explicit generator.

Scales follow the conventions of the OT-CFM benchmarks (torchcfm): 8 gaussians on a circle of radius
5 with covariance sqrt(0.1)*I, moons scaled by 3 and shifted by -1, so published numbers are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2) samples of 8 gaussians with centers 5*(cos, sin)(k*pi/4)."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * (math.pi / 4)
    centers = 5.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + math.sqrt(math.sqrt(0.1)) * torch.randn(n, 2, generator=generator)


def moons(n: int, generator: torch.Generator, noise: float = 0.2) -> Tensor:
    """(n, 2) two interleaving half circles with gaussian noise, scaled by 3 and shifted by -1."""
    upper = torch.rand(n, generator=generator) < 0.5
    s = torch.rand(n, generator=generator) * math.pi
    outer = torch.stack([torch.cos(s), torch.sin(s)], dim=1)
    inner = torch.stack([1 - torch.cos(s), 0.5 - torch.sin(s)], dim=1)
    x = torch.where(upper[:, None], outer, inner) + noise * torch.randn(n, 2, generator=generator)
    return 3 * x - 1


def checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2) uniform on the black squares of a 4x4 checkerboard over [-4, 4]^2."""
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2 = torch.rand(n, generator=generator) - 2 * torch.randint(0, 2, (n,), generator=generator).float()
    x2 = x2 + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=1)


def circles(n: int, generator: torch.Generator, noise: float = 0.08) -> Tensor:
    """(n, 2) two concentric circles of radius 4 and 2 with gaussian noise."""
    radius = torch.where(torch.rand(n, generator=generator) < 0.5, 4.0, 2.0)
    s = torch.rand(n, generator=generator) * 2 * math.pi
    x = radius[:, None] * torch.stack([torch.cos(s), torch.sin(s)], dim=1)
    return x + noise * radius[:, None] * torch.randn(n, 2, generator=generator)


SETS = {"8gaussians": eight_gaussians, "moons": moons, "checkerboard": checkerboard, "circles": circles}


@dataclass(frozen=True)
class Source:
    """The source distribution p0 of x0 (``data.source``).

    Attributes:
        name: 'normal' (standard normal), a 2-D set ('moons', '8gaussians'), or 'file'.
        points: for 'file', the (M, *shape) source dataset, sampled with replacement (an empirical,
            discrete source that can be drawn afresh at every step, as every coupling needs).
    """

    name: str = "normal"
    points: Tensor | None = None

    def draw(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """(n, *shape) source samples drawn with ``generator``."""
        if self.name == "file":
            if self.points is None:
                raise ValueError("a file source needs its points")
            return self.points[torch.randint(len(self.points), (n,), generator=generator)]
        return sample_source(self.name, n, shape, generator)


def sample_source(name: str, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Draw (n, *shape) source samples x0: standard normal, or a 2-D set for 2-D data."""
    if name == "normal":
        return torch.randn((n, *shape), generator=generator)
    if shape != (2,):
        raise ValueError(f"source '{name}' is 2-D only; data shape is {shape}")
    return SETS[name](n, generator)
