"""Continuous linear SDEs ``dX = f(t) X dt + g(t) L dW``, ``L L^T = C`` (Song et al. 2021, with frame noise C).

With correlated noise the Wiener increment is ``L dW`` (``L = V sqrt(S)`` for ``C = V S V^T``); the marginal is
``q(x_t | x_0) = N(s(t) x_0, sigma(t)^2 C)`` with ``s(t) = exp(int_0^t f)`` and
``sigma(t)^2 = s(t)^2 int_0^t g^2 / s^2``. In terms of ``B(t) = int_0^t beta``:

=========  ====================  ==========================  =================  ========================
SDE        f(t)                  g(t)^2                      s(t)               sigma(t)
=========  ====================  ==========================  =================  ========================
VP         -beta(t)/2            beta(t)                     exp(-B/2)          sqrt(1 - exp(-B))
sub-VP     -beta(t)/2            beta(t)(1 - exp(-2B))       exp(-B/2)          1 - exp(-B)
VE         0                     d sigma^2/dt                1                  sigma_min (sigma_max/sigma_min)^t
=========  ====================  ==========================  =================  ========================

with ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``t in [0, 1]`` (the drift is ``-beta X / 2``: linear in
``X``).

VE convention (as in score_sde): ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` is the marginal std of
the SDE run from ``t = -inf`` (where ``sigma -> 0``), i.e. the data at ``t = 0`` already carries
``sigma_min`` noise; started exactly at ``x_0`` the variance would be ``sigma(t)^2 - sigma_min^2``. This keeps
the VE-SDE the exact limit of the NCSN chain with geometric levels.

Reverse-time SDE and probability-flow ODE in forward-time notation (Song et al. 2021, eqs. 6 and 13, with the
covariance C: the score enters as ``C grad log p_t``), :meth:`LinearSDE.reverse_drift` and
:meth:`LinearSDE.ode_drift`::

    dX = [f(t) X - g(t)^2 C grad log p_t(X)] dt + g(t) L dW-bar,       dX = [f(t) X - g(t)^2 C grad log p_t(X) / 2] dt

The inverse of the log-SNR ``lambda(t) = log(s^2 / sigma^2)`` (:meth:`time_at_logsnr`) is in closed form for the
three SDEs: VP ``lambda = -log(expm1(B))``, so ``B = softplus(-lambda)``; sub-VP ``lambda = B - 2 log(expm1(B))``,
so with ``c = exp(-lambda)``, ``y = e^B`` solves ``(y - 1)^2 = c y`` and ``B = log1p((c + sqrt(c (c + 4))) / 2)``;
then ``t`` from the quadratic ``B(t) = B``; VE ``lambda = -2 log sigma(t)``. Any other linear SDE: bisection.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import Covariance
from diffusionlab.processes.base import GaussianProcess, as_f64, bisect_decreasing, check_time_fraction
from diffusionlab.processes.discrete import GaussianChain, VEChain, VPChain
from diffusionlab.schedules import geometric_sigmas
from diffusionlab.utils import bcast

_F64 = torch.float64


def _positive(name: str, v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"{name} must be a positive number, got {v!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise DiffusionLabError(f"{name} must be a positive finite number, got {v!r}")
    return v


class LinearSDE(GaussianProcess):
    """Base of the linear SDEs on ``t in [0, T]`` (T = 1). Subclasses define ``drift_coef``,
    ``diffusion_sq`` and :meth:`coeffs`; everything else is shared."""

    T = 1.0
    #: the time samplers stop at by default (score_sde's sampling ``eps``: 1e-3 for VP / sub-VP, 1e-5 for VE)
    default_eps = 1e-3

    def drift_coef(self, t) -> torch.Tensor:
        """``f(t)`` with drift ``f(t) x`` (float64)."""
        raise NotImplementedError

    def diffusion_sq(self, t) -> torch.Tensor:
        """``g(t)^2`` (float64)."""
        raise NotImplementedError

    def diffusion(self, t) -> torch.Tensor:
        """``g(t)`` (float64); the noise is ``g(t) L dW``."""
        return self.diffusion_sq(t).sqrt()

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        """Forward drift ``f(t) x``."""
        return bcast(self.drift_coef(t).to(device=x.device, dtype=x.dtype), x) * x

    def _g2_like(self, t, x: torch.Tensor) -> torch.Tensor:
        return bcast(self.diffusion_sq(t).to(device=x.device, dtype=x.dtype), x)

    def reverse_drift(self, x: torch.Tensor, t, c_score: torch.Tensor) -> torch.Tensor:
        """``f(t) x - g(t)^2 C grad log p_t(x)``: the reverse SDE's drift in forward-time notation, from the
        C-score ``c_score = C grad log p_t(x)`` (Song et al. 2021, eq. 6)."""
        return self.drift(x, t) - self._g2_like(t, x) * c_score

    def ode_drift(self, x: torch.Tensor, t, c_score: torch.Tensor) -> torch.Tensor:
        """``f(t) x - g(t)^2 C grad log p_t(x) / 2``: the probability-flow ODE's velocity (Song et al. 2021,
        eq. 13) from the C-score."""
        return self.drift(x, t) - 0.5 * self._g2_like(t, x) * c_score

    def check_eps(self, eps) -> float:
        """The smallest time ``eps`` as a float in ``(0, T)``; :class:`DiffusionLabError` otherwise."""
        return check_time_fraction("eps", eps, self.T)

    def time_at_logsnr(self, lam) -> torch.Tensor:
        """The time in ``[0, T]`` whose log-SNR is ``lam``: float64 bisection (subclasses: closed forms)."""
        lam = as_f64(lam)
        return bisect_decreasing(self.logsnr, lam, 0.0, float(self.T))

    def draw_t(self, batch: int, generator: torch.Generator | None = None, device=None,
               t_min: float = 1e-5) -> torch.Tensor:
        """``t ~ U(t_min, T)`` (float64 ``(B,)``)."""
        dev = generator.device if generator is not None else device
        T = float(self.T)
        t = t_min + (T - t_min) * torch.rand(batch, generator=generator, device=dev, dtype=_F64)
        return t if device is None else t.to(device)

    def discretize(self, N: int):
        """The discrete chain this SDE is the limit of, with the SDE time of each chain step.

        Returns ``(chain, times)``: ``times[i]`` (float64, index ``0..N``) is the SDE time matched to chain
        step ``i`` (``times[0] = 0``). As ``N`` grows, the chain's marginal at step ``i`` tends to the SDE's at
        ``times[i]``.
        """
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self._params()}, cov={self.cov!r})"


class VPSDE(LinearSDE):
    """Variance-preserving SDE ``dX = -beta(t) X / 2 dt + sqrt(beta(t)) L dW``, prior ``N(0, C)``.

    The limit of DDPM's chain: :meth:`discretize` with ``N = 1000`` and the defaults gives exactly the linear
    betas from 1e-4 to 0.02.
    """

    variance_preserving = True

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, cov: Covariance | None = None):
        super().__init__(cov)
        self.beta_min = _positive("beta_min", beta_min)
        self.beta_max = _positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise DiffusionLabError(f"beta_max = {beta_max} must be >= beta_min = {beta_min}")
        self.prior_std = 1.0

    def _params(self):
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"

    def beta(self, t) -> torch.Tensor:
        return self.beta_min + as_f64(t) * (self.beta_max - self.beta_min)

    def integral_beta(self, t) -> torch.Tensor:
        """``B(t) = int_0^t beta(s) ds``."""
        t = as_f64(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def diffusion_sq(self, t):
        return self.beta(t)

    def coeffs(self, t):
        B = self.integral_beta(t)
        return torch.exp(-0.5 * B), torch.sqrt(-torch.expm1(-B))

    def time_at_integral_beta(self, B: torch.Tensor) -> torch.Tensor:
        """The ``t`` with ``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 = B`` (the stable root)."""
        a = 0.5 * (self.beta_max - self.beta_min)
        b = self.beta_min
        if a == 0.0:
            return B / b
        return 2.0 * B / (b + torch.sqrt(b * b + 4.0 * a * B))

    def time_at_logsnr(self, lam) -> torch.Tensor:
        """Closed form (module docstring): ``B = softplus(-lambda)``."""
        return self.time_at_integral_beta(torch.nn.functional.softplus(-as_f64(lam)))

    def discretize(self, N: int):
        """DDPM's chain: ``beta_i = beta(tau_i) / N``, ``tau_i = (i - 1) / (N - 1)`` (score_sde), matched to
        time ``i / N``."""
        N = int(N)
        betas = torch.linspace(self.beta_min / N, self.beta_max / N, N, dtype=_F64)
        return VPChain(betas, cov=self.cov), torch.arange(N + 1, dtype=_F64) / N


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021): ``dX = -beta X / 2 dt + sqrt(beta (1 - exp(-2 B(t)))) L dW``.

    Same mean as VP, std ``1 - exp(-B(t))`` (variance below VP's at every t), prior ``N(0, C)``.
    """

    variance_preserving = False

    def diffusion_sq(self, t):
        return self.beta(t) * -torch.expm1(-2.0 * self.integral_beta(t))

    def coeffs(self, t):
        B = self.integral_beta(t)
        return torch.exp(-0.5 * B), -torch.expm1(-B)

    def time_at_logsnr(self, lam) -> torch.Tensor:
        """Closed form (module docstring): ``B = log1p((c + sqrt(c (c + 4))) / 2)``, ``c = exp(-lambda)``."""
        c = torch.exp(-as_f64(lam))
        return self.time_at_integral_beta(torch.log1p(0.5 * (c + torch.sqrt(c * (c + 4.0)))))

    def discretize(self, N: int):
        """No classical discrete chain exists; this is the Euler-Maruyama chain
        ``x_i = (1 + f(t_{i-1}) / N) x_{i-1} + sqrt(int_{t_{i-1}}^{t_i} g^2) eps``, matched to ``t_i = i / N``
        (the step's integral of ``g^2`` rather than ``g(t_{i-1})^2 / N``, since ``g(0) = 0``)."""
        N = int(N)
        t_prev = torch.arange(N, dtype=_F64) / N
        a = 1.0 + self.drift_coef(t_prev) / N
        # g(0) = 0 for sub-VP; use the step's mean of g^2 so every b_i > 0 (the same limit as N grows)
        t_grid = torch.arange(N + 1, dtype=_F64) / N
        g2_mean = (self.integral_g2(t_grid[1:]) - self.integral_g2(t_grid[:-1]))
        return GaussianChain(a, g2_mean.sqrt(), cov=self.cov, prior_std=1.0), t_grid

    def integral_g2(self, t) -> torch.Tensor:
        """``int_0^t g^2 = B(t) + (exp(-2 B(t)) - 1) / 2``."""
        B = self.integral_beta(t)
        return B + 0.5 * torch.expm1(-2.0 * B)


class VESDE(LinearSDE):
    """Variance-exploding SDE ``dX = sqrt(d sigma^2(t) / dt) L dW``, ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``,
    prior ``N(0, sigma_max^2 C)``; the limit of the NCSN chain with geometric levels (see the module note)."""

    unit_scale = True
    default_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, cov: Covariance | None = None):
        super().__init__(cov)
        self.sigma_min = _positive("sigma_min", sigma_min)
        self.sigma_max = _positive("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise DiffusionLabError(f"sigma_max = {sigma_max} must exceed sigma_min = {sigma_min}")
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _params(self):
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"

    def sigma(self, t) -> torch.Tensor:
        return self.sigma_min * torch.exp(as_f64(t) * self._log_ratio)

    def drift_coef(self, t):
        return torch.zeros_like(as_f64(t))

    def diffusion_sq(self, t):
        return self.sigma(t) ** 2 * (2.0 * self._log_ratio)

    def coeffs(self, t):
        sig = self.sigma(t)
        return torch.ones_like(sig), sig

    def time_at_logsnr(self, lam) -> torch.Tensor:
        """Closed form: ``lambda = -2 log sigma(t)``."""
        return (-0.5 * as_f64(lam) - math.log(self.sigma_min)) / self._log_ratio

    def discretize(self, N: int):
        """NCSN's chain with ``N`` geometric levels ``sigma_min .. sigma_max``, level ``i`` matched to
        ``t = (i - 1) / (N - 1)``; the clean data (index 0) is matched to ``t = -inf``, where ``sigma = 0``."""
        N = int(N)
        if N < 2:
            raise DiffusionLabError(f"VE-SDE discretization needs N >= 2 levels, got {N}")
        chain = VEChain(geometric_sigmas(N, self.sigma_min, self.sigma_max), cov=self.cov)
        times = torch.cat([torch.full((1,), -math.inf, dtype=_F64), torch.arange(N, dtype=_F64) / (N - 1)])
        return chain, times
