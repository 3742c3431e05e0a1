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


class TrainedLikeOracle(nn.Module):
    """A trained network's errors on top of an exact oracle: ``eps_hat = E[eps | x_t] + delta(x_t, t)`` with
    ``delta = scale * (bias + tanh(W x_in + b)) / rms``, ``x_in = x_t / sqrt(s^2 + sigma^2)`` (the net's input),
    fixed random ``bias``, ``W``, ``b``: an error of RMS ``scale`` at every level, part of it a bias, as measured on
    the digits U-Net of configs/digits.yaml (3000 steps; against the Gaussian posterior at sig >= 16, where it is
    exact to < 1e-3: RMS 0.015-0.021, of which an x-independent part 0.004-0.014). ``x0`` is decoded from it as an
    eps-prediction network's is, so its error is ``sig`` times the eps error. Wraps ``oracle`` (its process, its
    counter ``nfe``); every sampler runs on it unchanged."""

    def __init__(self, oracle, scale: float = 0.02, bias_share: float = 0.6, seed: int = 0):
        super().__init__()
        from diffusionlab.parametrization import Prediction

        self._prediction = Prediction
        self.oracle = oracle
        d = oracle.dim
        g = torch.Generator().manual_seed(seed)
        self.bias = bias_share * torch.randn(d, generator=g, dtype=F64)
        self.W = torch.randn(d, d, generator=g, dtype=F64) / d**0.5
        self.b = torch.randn(d, generator=g, dtype=F64)
        self.scale = scale

    @property
    def process(self):
        return self.oracle.process

    @property
    def sample_shape(self):
        return self.oracle.sample_shape

    @property
    def parametrization(self):
        return self.oracle.parametrization

    @property
    def nfe(self):
        return self.oracle.nfe

    @nfe.setter
    def nfe(self, v):
        self.oracle.nfe = v

    @property
    def learn_variance(self):
        return False

    def _delta(self, x_t, s, sigma):
        xf = x_t.reshape(x_t.shape[0], -1).to(F64)
        x_in = xf / (s * s + sigma * sigma).sqrt().reshape(-1, 1).to(F64)
        raw = self.bias + torch.tanh(x_in @ self.W.T + self.b)
        rms = raw.square().mean(1, keepdim=True).sqrt()
        return (self.scale * raw / rms).reshape(x_t.shape).to(x_t.dtype)

    def predict(self, x_t, t):
        p = self.oracle.predict(x_t, t)
        eps = p.eps + self._delta(x_t, p.s.reshape(-1), p.sigma.reshape(-1))
        x0 = (x_t - p.sigma * eps) / p.s
        return self._prediction(eps=eps, x0=x0, out=eps, s=p.s, sigma=p.sigma, v_var=None)
