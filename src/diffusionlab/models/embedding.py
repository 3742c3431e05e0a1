"""Noise-level conditioning shared by every network.

Every network is called as ``net(x, c_noise)`` with ``c_noise`` a float tensor ``(B,)``: the noise-conditioning
value the parametrization passes (``1000 * t / T`` for the chains, so values in ``[0, 1000]``). It is embedded
by the Transformer sinusoids (Vaswani et al. 2017) as in DDPM (Ho et al. 2020) and improved-diffusion
(Nichol & Dhariwal 2021), ``timestep_embedding``:

    freqs_i = max_period^(-i / half),  i = 0 .. half - 1,    emb = [cos(c * freqs), sin(c * freqs)]

followed by a two-layer MLP (``Linear, SiLU, Linear``), :class:`TimeEmbedding`.

Class-conditional networks (``num_classes = K``) add a learned label embedding to it, as guided-diffusion does
(Dhariwal & Nichol 2021, sec. 4: ``emb = emb + label_emb(y)``), with one extra row, index ``K``, for "no label":
the unconditional model that classifier-free guidance needs and that label dropout trains (Ho & Salimans 2022,
Algorithm 1), :class:`LabelEmbedding`. Such a net is called ``net(x, c_noise, labels)``; ``labels=None`` is the
no-label index for the whole batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusionlab.utils import as_labels, per_batch
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


class LabelEmbedding(nn.Module):
    """Class labels ``0..K-1`` and the no-label index ``K`` to ``(B, dim)`` vectors (module docstring): an
    ``nn.Embedding`` of ``K + 1`` rows with torch's default ``N(0, 1)`` initialisation (guided-diffusion's)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = positive_int("num_classes", num_classes)
        self.table = nn.Embedding(num_classes + 1, positive_int("embedding dim", dim))

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels, x: torch.Tensor) -> torch.Tensor:
        """The embedding of ``labels`` (None: the no-label index) for the batch of ``x``."""
        if labels is None:
            idx = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        else:
            idx = as_labels(labels, x, self.num_classes)
        return self.table(idx)


def conditional_embedding(time_emb: torch.Tensor, label: "LabelEmbedding | None", labels, x: torch.Tensor,
                          net: str) -> torch.Tensor:
    """``time_emb + label(labels)`` for a class-conditional net; ``time_emb`` itself for an unconditional one, which
    refuses labels (``net`` names it in the error)."""
    if label is None:
        if labels is not None:
            from diffusionlab.errors import DiffusionLabError

            raise DiffusionLabError(f"this {net} was built without num_classes and takes no labels")
        return time_emb
    return time_emb + label(labels, x).to(time_emb.dtype)


def check_num_classes(num_classes) -> int | None:
    """``num_classes``: None (unconditional) or an integer >= 1."""
    return None if num_classes is None else positive_int("num_classes", num_classes)
