"""What every forward process shares: a Gaussian marginal ``q(x_t | x_0) = N(s_t x_0, sigma_t^2 C)``.

A process is pure math with no state (like score_sde's ``sde_lib.py``) and owns all of its maths: subclasses
supply the mean scale ``s_t`` and the standard deviation ``sigma_t`` as float64 functions of ``t``; this base
turns them into the marginal and its sampler, the prior ``N(0, prior_std^2 C)`` with its sampler and log-density,
``KL(q(x_T | x_0) || prior)``, the log-SNR ``lambda(t) = log(s_t^2 / sigma_t^2)`` and its inverse, the EDM noise
level ``sigma_t / s_t`` (Karras et al. 2022, eq. 4 with ``s(t)``), the exact transition and posterior between
*any* two times, and the training-time draw of ``t``. The covariance C (identity by default) acts on ``cov.axis``.

Two kinds of time, one interface: a discrete chain (``discrete = True``) has integer steps ``0..T`` (0 the data);
a continuous SDE has float times in ``[0, T]`` and adds the drift ``f(t)``, the diffusion ``g(t)`` and the
reverse-time drifts. Code outside :mod:`diffusionlab.processes` asks a process for what it needs (``discrete``,
``unit_scale``, :meth:`GaussianProcess.require_continuous`) and never which class it is.

Exact transition and posterior between times ``t' < t`` (for a chain's consecutive steps they are the chain's own
``a_t, b_t`` and posterior; on a sub-sequence, improved-diffusion's respacing)::

    x_t = a x_{t'} + G z,        a = s_t / s_{t'},   G^2 = sigma_t^2 - a^2 sigma_{t'}^2     (z ~ N(0, C))
    q(x_{t'} | x_t, x_0) = N(A x_t + B x_0, V C),   A = a sigma_{t'}^2 / sigma_t^2,
                            B = s_{t'} G^2 / sigma_t^2,   V = G^2 sigma_{t'}^2 / sigma_t^2
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import structured_kl, structured_log_prob
from diffusionlab.noise.covariance import Covariance, Identity
from diffusionlab.utils import bcast

_F64 = torch.float64


def as_f64(t) -> torch.Tensor:
    """``t`` as a float64 tensor (Python floats keep all their digits)."""
    return t.to(_F64) if torch.is_tensor(t) else torch.as_tensor(t, dtype=_F64)


def transition_coefficients(s, sigma, s_prev, sigma_prev) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, G^2)`` of ``x_t = a x_{t'} + G z`` from the marginal coefficients at ``t`` and ``t' < t`` (module
    docstring); float64 tensors of any (common) shape."""
    a = s / s_prev
    return a, sigma**2 - (a * sigma_prev) ** 2


def posterior_coefficients_between(s, sigma, s_prev, sigma_prev):
    """``(A, B, V)`` of ``q(x_{t'} | x_t, x_0) = N(A x_t + B x_0, V C)`` from the coefficients at ``t`` and ``t' < t``
    (module docstring), float64. At ``t' = 0`` (``s' = 1``, ``sigma' = 0``): ``A = V = 0``, ``B = 1``."""
    a, g2 = transition_coefficients(s, sigma, s_prev, sigma_prev)
    s2 = sigma**2
    return a * sigma_prev**2 / s2, s_prev * g2 / s2, g2 * sigma_prev**2 / s2


def bisect_decreasing(fn, target: torch.Tensor, lo: float, hi: float, iters: int = 100) -> torch.Tensor:
    """Solve ``fn(t) = target`` for a decreasing ``fn`` on ``[lo, hi]`` by vectorised float64 bisection."""
    a = torch.full_like(target, lo)
    b = torch.full_like(target, hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        above = fn(mid) > target  # fn decreasing: the root lies to the right of mid
        a = torch.where(above, mid, a)
        b = torch.where(above, b, mid)
    return 0.5 * (a + b)


class GaussianProcess:
    """Base of the discrete chains and the SDEs. Subclasses define :meth:`coeffs`, ``T`` and ``prior_std``.

    Attributes:
        discrete: integer steps (a chain) rather than float times (an SDE).
        unit_scale: ``s_t = 1`` at every ``t`` (variance exploding: NCSN's chain, the VE-SDE).
        variance_preserving: ``s_t^2 + sigma_t^2 = 1`` at every ``t`` (DDPM's chain, the VP-SDE).
        zero_terminal_snr: ``s_T = 0`` (a rescaled chain, Lin et al. 2024).
    """

    T: float | int
    prior_std: float
    discrete: bool = False
    unit_scale: bool = False
    variance_preserving: bool = False
    #: ``s_T = 0``: the last time carries no signal (Lin et al. 2024); the chains say so from their coefficients
    zero_terminal_snr: bool = False

    def __init__(self, cov: Covariance | None = None):
        self.cov = cov if cov is not None else Identity()

    # -- to be supplied -------------------------------------------------------------------------------------
    def coeffs(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_t, sigma_t)`` as float64 tensors shaped like ``t``."""
        raise NotImplementedError

    def time_at_logsnr(self, lam) -> torch.Tensor:
        """The time whose log-SNR is ``lam`` (float64; chains: the nearest step)."""
        raise NotImplementedError

    def draw_t(self, batch: int, generator: torch.Generator | None = None, device=None,
               t_min: float = 1e-5) -> torch.Tensor:
        """Training times ``(B,)``: ``U{1..T}`` on a chain (int64), ``U(t_min, T)`` on an SDE (float64); drawn on
        the generator's device, then moved to ``device``."""
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

    def logsnr(self, t) -> torch.Tensor:
        """``lambda(t) = log(s_t^2 / sigma_t^2)`` in float64 (``+inf`` at the data)."""
        s, sigma = self.coeffs(t)
        return 2.0 * (torch.log(s) - torch.log(sigma))

    def edm_sigma(self, t) -> torch.Tensor:
        """Karras et al.'s noise level of the scaled variable ``x / s_t``: ``sigma_t / s_t = exp(-lambda / 2)``."""
        s, sigma = self.coeffs(t)
        return sigma / s

    def time_at_edm_sigma(self, sig) -> torch.Tensor:
        """The time whose EDM level ``sigma_t / s_t`` is ``sig`` (> 0)."""
        return self.time_at_logsnr(-2.0 * torch.log(as_f64(sig)))

    def transition(self, t, t_prev) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, G^2)`` of the exact forward transition ``x_t = a x_{t'} + G L z`` from ``t' = t_prev`` to ``t``
        (float64; module docstring). VP: ``G^2 = 1 - a^2``, the DDPM step of the pair; VE: ``a = 1``,
        ``G^2 = sigma_t^2 - sigma_{t'}^2``, NCSN's step."""
        s, sigma = self.coeffs(t)
        s_p, sigma_p = self.coeffs(t_prev)
        return transition_coefficients(s, sigma, s_p, sigma_p)

    def posterior_between(self, t, t_prev):
        """``(A, B, V)`` of ``q(x_{t'} | x_t, x_0) = N(A x_t + B x_0, V C)`` for ``t' = t_prev < t`` (float64)."""
        s, sigma = self.coeffs(t)
        s_p, sigma_p = self.coeffs(t_prev)
        return posterior_coefficients_between(s, sigma, s_p, sigma_p)

    def require_continuous(self, what: str) -> None:
        """Raise unless this is a continuous-time SDE (``what`` names the caller in the message)."""
        if self.discrete:
            raise DiffusionLabError(
                f"{what} needs a continuous-time SDE (vp-sde, subvp-sde, ve-sde), got the discrete chain {self!r}"
            )

    def require_discrete(self, what: str) -> None:
        """Raise unless this is a discrete chain (``what`` names the caller in the message)."""
        if not self.discrete:
            raise DiffusionLabError(f"{what} needs a discrete chain (vp, ve), got the continuous-time SDE {self!r}")

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


def check_time_fraction(name: str, value, upper: float) -> float:
    """``value`` as a float in ``(0, upper)`` (an SDE's smallest sampling or training time)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"{name} must be a number in (0, T), got {value!r}") from None
    if not (0.0 < v < float(upper)) or math.isnan(v):
        raise DiffusionLabError(f"{name} must lie in (0, T = {upper}), got {value!r}")
    return v
