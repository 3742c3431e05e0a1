"""Noise-level conditioning shared by every network.

Every network is called as ``net(x, c_noise)`` with ``c_noise`` a float tensor ``(B,)``: the noise-conditioning
value the parametrization passes (``1000 * t / T`` for the chains, so values in ``[0, 1000]``). It is embedded
by the Transformer sinusoids (Vaswani et al. 2017) as in DDPM (Ho et al. 2020) and improved-diffusion
(Nichol & Dhariwal 2021), ``timestep_embedding``:

    freqs_i = max_period^(-i / half),  i = 0 .. half - 1,    emb = [cos(c * freqs), sin(c * freqs)]

followed by a two-layer MLP (``Linear, SiLU, Linear``), :class:`TimeEmbedding`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusionlab.utils import per_batch
from diffusionlab.checks import positive_int, real


def check_c_noise(c_noise, x: torch.Tensor) -> torch.Tensor:
    """Return ``c_noise`` as a ``(B,)`` tensor on ``x``'s device (a scalar is expanded to the batch).

    Checks shapes only (no host-device synchronisation).
    """
    if not torch.is_tensor(c_noise):
        c_noise = torch.as_tensor(c_noise, dtype=torch.float32, device=x.device)
    return per_batch(c_noise, x, "c_noise")


class SinusoidalEmbedding(nn.Module):
    """The DDPM / Transformer sinusoidal embedding ``(B,) -> (B, dim)`` (cosines first, zero-padded if odd)."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = positive_int("embedding dim", dim, minimum=2)
        real("max_period", max_period, 0.0, open_low=True)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        args = c_noise.to(torch.float32)[:, None] * self.freqs.to(torch.float32)[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        if self.dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb


class TimeEmbedding(nn.Module):
    """``c_noise (B,) -> (B, out_dim)``: sinusoids of width ``sin_dim``, then ``Linear, SiLU, Linear`` (DDPM)."""

    def __init__(self, sin_dim: int, out_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.sinusoid = SinusoidalEmbedding(sin_dim, max_period)
        self.fc1 = nn.Linear(sin_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        e = self.sinusoid(c_noise).to(self.fc1.weight.dtype)
        return self.fc2(nn.functional.silu(self.fc1(e)))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (improved-diffusion ``zero_module``): the layer starts as a no-op."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
