"""A residual MLP for low-dimensional points ``(B, D)``.

Input ``Linear(D, hidden)``, then ``depth`` pre-norm residual blocks

    h <- h + W2 SiLU(W1 SiLU(LayerNorm h) + E SiLU(emb))

each adding the noise embedding (the DDPM ResBlock pattern of Ho et al. 2020 with linear layers instead of
convolutions), and an output ``Linear(hidden, out_mult * D)`` after ``SiLU(LayerNorm h)``. The output layer
and each block's ``W2`` are zero-initialised (improved-diffusion ``zero_module``), so the untrained network
returns zeros and each block starts as the identity. With ``num_classes`` the label embedding
(:class:`~diffusionlab.models.embedding.LabelEmbedding`) is added to the noise embedding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import positive_int
from diffusionlab.models.embedding import (
    LabelEmbedding,
    TimeEmbedding,
    check_c_noise,
    check_num_classes,
    conditional_embedding,
    zero_init,
)


class ResidualMLPBlock(nn.Module):
    """``h + W2 SiLU(W1 SiLU(LN h) + E SiLU(emb))`` with ``W2`` zero-initialised."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.fc2 = zero_init(nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(F.silu(r))


class MLP(nn.Module):
    """Noise-conditioned residual MLP: ``net(x (B, dim), c_noise (B,), labels=None) -> (B, out_mult * dim)``
    (``labels`` only with ``num_classes``: class labels ``0..num_classes``, the last one "no label").

    Args:
        dim: the points' dimension D (set from the data in a config; other sample shapes are flattened)
        hidden: width of the residual blocks
        depth: number of residual blocks
        emb_dim: width of the sinusoidal noise embedding and of its Linear-SiLU-Linear output added in each block (>= 2)
        out_mult: output width out_mult * dim (2 for a learned variance; set from the objective in a config)
        num_classes: class-conditional on labels 0..num_classes-1, index num_classes = "no label" for
            classifier-free guidance (Ho & Salimans 2022; trained by train.p_uncond); unset: unconditional
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128, out_mult: int = 1,
                 num_classes: int | None = None):
        super().__init__()
        self.dim = positive_int("dim", dim)
        positive_int("hidden", hidden)
        positive_int("depth", depth)
        positive_int("emb_dim", emb_dim, minimum=2)
        self.out_mult = positive_int("out_mult", out_mult)
        self.time = TimeEmbedding(emb_dim, emb_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = zero_init(nn.Linear(hidden, out_mult * dim))
        # created last, so the other layers draw the same initial weights as the unconditional net's
        self.num_classes = check_num_classes(num_classes)
        self.label = None if num_classes is None else LabelEmbedding(num_classes, emb_dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DiffusionLabError(f"MLP expects points of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = F.silu(conditional_embedding(self.time(check_c_noise(c_noise, x)), self.label, labels, x, "MLP"))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
