"""2-D toy distributions, generated deterministically from a seed (a CPU ``torch.Generator``).

All are roughly unit scale (per-axis standard deviation between about 0.5 and 1.2) and returned shuffled:

- ``ring``: a mixture of ``K`` isotropic Gaussians (std ``std``) centred on a circle of radius ``radius``;
- ``moons``: the two interleaving half circles of scikit-learn's ``make_moons``, centred, Gaussian noise ``noise``;
- ``swissroll``: the 2-D swiss roll ``t (cos t, sin t)``, ``t ~ U(1.5 pi, 4.5 pi)``, scaled by 1/7, plus noise;
- ``checkerboard``: uniform on the dark squares of a 4 x 4 board on ``[-2, 2]^2`` (the FFJORD toy, unscaled).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.data.arrays import ArrayDataset
from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import positive_int, real


def _gen(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DiffusionLabError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _points(name: str, x: torch.Tensor, g: torch.Generator) -> ArrayDataset:
    perm = torch.randperm(x.shape[0], generator=g)
    return ArrayDataset(x[perm].to(torch.float32).contiguous(), "points", name)


def ring(num: int = 20000, K: int = 8, radius: float = 1.0, std: float = 0.05, seed: int = 0) -> ArrayDataset:  # noqa: N803
    """``K`` Gaussians of std ``std`` at angles ``2 pi k / K`` on a circle of radius ``radius``.

    Args:
        num: number of points
        K: number of Gaussians (modes)
        radius: radius of the circle
        std: standard deviation of each Gaussian
    """
    positive_int("ring option num", num)
    positive_int("ring option K", K)
    real("ring option radius", radius, 0.0, open_low=True)
    real("ring option std", std, 0.0)
    g = _gen(seed)
    k = torch.randint(0, K, (num,), generator=g, dtype=torch.float64)
    angle = 2 * math.pi * k / K
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return _points("ring", centres + std * torch.randn(num, 2, generator=g, dtype=torch.float64), g)


def moons(num: int = 20000, noise: float = 0.05, seed: int = 0) -> ArrayDataset:
    """Two interleaving half circles (``make_moons`` geometry), centred at the origin.

    Args:
        num: number of points
        noise: standard deviation of the Gaussian noise added to each point
    """
    positive_int("moons option num", num)
    real("moons option noise", noise, 0.0)
    g = _gen(seed)
    t = math.pi * torch.rand(num, generator=g, dtype=torch.float64)
    inner = torch.arange(num) >= num // 2
    x = torch.where(inner, 1 - torch.cos(t), torch.cos(t)) - 0.5
    y = torch.where(inner, 0.5 - torch.sin(t), torch.sin(t)) - 0.25
    pts = torch.stack([x, y], dim=1)
    return _points("moons", pts + noise * torch.randn(num, 2, generator=g, dtype=torch.float64), g)


def swissroll(num: int = 20000, noise: float = 0.05, seed: int = 0) -> ArrayDataset:
    """``t (cos t, sin t) / 7`` with ``t ~ U(1.5 pi, 4.5 pi)``, plus Gaussian noise ``noise``.

    Args:
        num: number of points
        noise: standard deviation of the Gaussian noise added to each point
    """
    positive_int("swissroll option num", num)
    real("swissroll option noise", noise, 0.0)
    g = _gen(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(num, generator=g, dtype=torch.float64))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 7.0
    return _points("swissroll", pts + noise * torch.randn(num, 2, generator=g, dtype=torch.float64), g)


def checkerboard(num: int = 20000, seed: int = 0) -> ArrayDataset:
    """Uniform on the 8 dark unit squares of a 4 x 4 board on ``[-2, 2]^2``.

    Args:
        num: number of points
    """
    positive_int("checkerboard option num", num)
    g = _gen(seed)
    x1 = 4 * torch.rand(num, generator=g, dtype=torch.float64) - 2
    x2 = torch.rand(num, generator=g, dtype=torch.float64) - 2 * torch.randint(0, 2, (num,), generator=g)
    x2 = x2 + torch.remainder(torch.floor(x1), 2)
    return _points("checkerboard", torch.stack([x1, x2], dim=1), g)
