"""Tiny networks shared by the tests."""

import torch
from torch import nn

F64 = torch.float64


class ChannelNet(nn.Module):
    """A tiny rank-agnostic net: a 1x1 linear map over dim 1 plus a ``c_noise``-dependent bias (``bias_scale`` times
    a standard normal draw); ``out_mult`` widens the output for a learned variance. ``record=True`` keeps every
    input in ``seen``."""

    def __init__(self, channels: int, out_mult: int = 1, dtype=F64, seed: int = 0, bias_scale: float = 1.0,
                 record: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(channels * out_mult, channels, generator=g, dtype=dtype) / channels**0.5)
        self.b = nn.Parameter(bias_scale * torch.randn(channels * out_mult, generator=g, dtype=dtype))
        self.record = record
        self.seen = []

    def forward(self, x, c_noise):
        if self.record:
            self.seen.append((x.detach().clone(), c_noise.detach().clone()))
        y = torch.movedim(torch.movedim(x, 1, -1) @ self.w.T, -1, 1)
        lift = [1] * (x.ndim - 2)
        return y + self.b.reshape(1, -1, *lift) * (c_noise / 1000.0).reshape(x.shape[0], 1, *lift)
