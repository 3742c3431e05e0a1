"""What every forward process shares: a Gaussian marginal ``q(x_t | x_0) = N(s_t x_0, sigma_t^2 C)``.

A process is pure math with no state (like score_sde's ``sde_lib.py``): subclasses supply the mean scale
``s_t`` and the standard deviation ``sigma_t`` as float64 functions of ``t``; this base turns them into the
marginal, its sampler, the prior ``N(0, prior_std^2 C)`` with its sampler and log-density, and
``KL(q(x_T | x_0) || prior)``. The covariance C (identity by default) acts on ``cov.axis``.
"""

from __future__ import annotations

import torch

from diffusionlab.gaussian import structured_kl, structured_log_prob
from diffusionlab.noise.covariance import Covariance, Identity
from diffusionlab.utils import bcast


class GaussianProcess:
    """Base of the discrete chains and the SDEs. Subclasses define :meth:`coeffs`, ``T`` and ``prior_std``."""

    T: float | int
    prior_std: float

    def __init__(self, cov: Covariance | None = None):
        self.cov = cov if cov is not None else Identity()

    # -- to be supplied -------------------------------------------------------------------------------------
    def coeffs(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_t, sigma_t)`` as float64 tensors shaped like ``t``."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------
    def coeffs_like(self, t, x: torch.Tensor):
        """``(s_t, sigma_t)`` in ``x``'s dtype and device, shaped to broadcast against ``x``."""
        s, sigma = self.coeffs(t)
        return (bcast(s.to(device=x.device, dtype=x.dtype), x), bcast(sigma.to(device=x.device, dtype=x.dtype), x))

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ``s_t^2 / sigma_t^2`` (float64)."""
        s, sigma = self.coeffs(t)
        return (s / sigma) ** 2

    def marginal(self, x0: torch.Tensor, t):
        """``q(x_t | x_0) = N(mean, std^2 C)``: returns ``(mean, std)``, ``std`` broadcastable against ``x0``."""
        s, sigma = self.coeffs_like(t, x0)
        return s * x0, sigma

    def sample_marginal(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None, generator=None):
        """Draw ``x_t = s_t x_0 + sigma_t eps`` with ``eps ~ N(0, C)``; returns ``(x_t, eps)``."""
        self.cov.check(x0)
        if noise is None:
            noise = self.cov.sample(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        mean, std = self.marginal(x0, t)
        return mean + std * noise, noise

    def marginal_log_prob(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """``log q(x_t | x_0)`` per sample."""
        mean, std = self.marginal(x0, t)
        var = std.reshape(-1) ** 2 if std.ndim else std**2
        return structured_log_prob(x_t, mean, var, self.cov)

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Draw from the prior ``N(0, prior_std^2 C)``."""
        return self.prior_std * self.cov.sample(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, prior_std^2 C)`` per sample."""
        self.cov.check(x)
        return structured_log_prob(x, torch.zeros((), dtype=x.dtype, device=x.device), self.prior_std**2, self.cov)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """``KL(q(x_T | x_0) || N(0, prior_std^2 C))`` per sample (nats)."""
        self.cov.check(x0)
        mean, std = self.marginal(x0, self.T)
        return structured_kl(mean, std.reshape(()) ** 2, torch.zeros_like(x0), self.prior_std**2, self.cov)
