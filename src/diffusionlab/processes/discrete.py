"""Discrete Gaussian chains: ``x_t = a_t x_{t-1} + b_t eps_t``, ``eps_t ~ N(0, C)``, ``t = 1..T``.

Notation (docs/notation.md): time ``t`` is an integer in ``1..T`` as in the papers, and every schedule
array is padded so that index ``t`` holds the value at step ``t`` (index 0 is the data: ``s_0 = 1``,
``sigma_0 = 0``). ``alpha_t = 1 - beta_t`` and ``alpha-bar_t = prod_{s <= t} alpha_s`` (Ho et al. 2020's notation;
some texts write ``alpha_t`` for the product: docs/notation.md).

Closed forms, for any chain of this form with marginal ``q(x_t | x_0) = N(s_t x_0, sigma_t^2 C)``::

    s_t = prod_{k <= t} a_k,           sigma_t^2 = a_t^2 sigma_{t-1}^2 + b_t^2
    q(x_{t-1} | x_t, x_0) = N(A_t x_t + B_t x_0, C_t^2 C)
    A_t = a_t sigma_{t-1}^2 / sigma_t^2,   B_t = s_{t-1} b_t^2 / sigma_t^2,   C_t^2 = b_t^2 sigma_{t-1}^2 / sigma_t^2

which give the familiar coefficients (Ho et al. 2020, eqs. 6-7): VP (``a = sqrt(1 - beta)``, ``b^2 = beta``):
``A_t = sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t)``, ``B_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t)``,
``C_t^2 = beta-tilde_t = (1 - abar_{t-1}) beta_t / (1 - abar_t)`` (the ``x_t`` coefficient has ``sqrt(alpha_t)``, the
``x_0`` one ``sqrt(abar_{t-1})``);
VE (``a = 1``, ``b = g(t)``): ``A_t = sigma_{t-1}^2 / sigma_t^2``, ``B_t = 1 - A_t``,
``C_t^2 = sigma_{t-1}^2 g^2(t) / sigma_t^2``. The covariance C multiplies every variance.
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import Covariance
from diffusionlab.processes.base import GaussianProcess, as_f64, posterior_coefficients_between
from diffusionlab.schedules import as_betas, as_sigmas, log_alpha_bar
from diffusionlab.utils import bcast

_F64 = torch.float64


def _pad(values: torch.Tensor, first: float) -> torch.Tensor:
    return torch.cat([torch.tensor([first], dtype=_F64), values.to(_F64)])


class GaussianChain(GaussianProcess):
    """A discrete chain ``x_t = a_t x_{t-1} + b_t eps_t`` with ``eps_t ~ N(0, C)``.

    ``a`` and ``b`` are the per-step coefficients for ``t = 1..T``; ``prior_std`` defaults to ``sigma_T``.
    Use :class:`VPChain` and :class:`VEChain` for DDPM and NCSN; a bare chain is what
    :meth:`~diffusionlab.processes.sde.LinearSDE.discretize` returns for the sub-VP SDE.
    """

    discrete = True

    def __init__(self, a, b, cov: Covariance | None = None, prior_std: float | None = None):
        super().__init__(cov)
        a = torch.as_tensor(a, dtype=_F64).reshape(-1)
        b = torch.as_tensor(b, dtype=_F64).reshape(-1)
        if a.numel() < 1 or a.shape != b.shape:
            raise DiffusionLabError(f"chain coefficients a and b need equal lengths >= 1, got {a.numel()} and {b.numel()}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()) or (a[:-1] <= 0).any() or (b <= 0).any() \
                or float(a[-1]) < 0:
            raise DiffusionLabError("chain coefficients a_t and b_t must be finite and positive (a_T may be 0: a zero "
                                    "terminal SNR)")
        self.T = int(a.numel())
        self.a = _pad(a, 1.0)
        self.b = _pad(b, 0.0)
        s, sigma = self._closed_form_coeffs()
        self.mean_scale = s  # s_t, index 0..T
        self.sigma = sigma  # sigma_t, index 0..T
        self.prior_std = float(sigma[-1]) if prior_std is None else float(prior_std)
        # posterior coefficients of consecutive steps, index 1..T (index 0 unused: zeros)
        zero = torch.zeros(1, dtype=_F64)
        A, B, V = posterior_coefficients_between(s[1:], sigma[1:], s[:-1], sigma[:-1])
        self.post_A, self.post_B, self.post_var = (torch.cat([zero, v]) for v in (A, B, V))
        self._dev_cache: dict = {}

    def _closed_form_coeffs(self):
        """``(s_t, sigma_t)`` for t = 0..T by the recursion; subclasses use their closed forms."""
        s = torch.cumprod(self.a, 0)
        sigma2 = torch.zeros(self.T + 1, dtype=_F64)
        for t in range(1, self.T + 1):
            sigma2[t] = self.a[t] ** 2 * sigma2[t - 1] + self.b[t] ** 2
        return s, sigma2.sqrt()

    # -- indexing -------------------------------------------------------------------------------------------
    def _index(self, t, lo: int = 0) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise DiffusionLabError(f"discrete time steps must be integers in {lo}..{self.T}, got dtype {t.dtype}")
        # range check on CPU only: on an accelerator it would force a host-device sync every step
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < lo or int(t.max()) > self.T):
            raise DiffusionLabError(
                f"time step out of range {lo}..{self.T}: got {t.min().item()}..{t.max().item()}"
            )
        return t.long()

    def at(self, name: str, t, x: torch.Tensor, lo: int = 0) -> torch.Tensor:
        """Schedule array ``name`` (e.g. ``"alpha_bar"``) at steps ``t``, on ``x``'s device and dtype,
        shaped to broadcast against ``x``."""
        key = (name, x.device)
        arr = self._dev_cache.get(key)
        if arr is None:
            arr = self._dev_cache[key] = getattr(self, name).to(x.device)
        t = self._index(t, lo).to(x.device)
        return bcast(arr[t].to(x.dtype), x)

    def coeffs(self, t):
        t = self._index(t)
        return self.mean_scale[t], self.sigma[t]

    def coeffs_like(self, t, x):
        return self.at("mean_scale", t, x), self.at("sigma", t, x)

    def time_at_logsnr(self, lam) -> torch.Tensor:
        """The step ``1..T`` whose log-SNR is nearest to ``lam`` (int64, shaped like ``lam``)."""
        lam = as_f64(lam)
        table = self.logsnr(torch.arange(1, self.T + 1))  # decreasing in t
        return (lam.reshape(-1, 1) - table[None, :]).abs().argmin(1).reshape(lam.shape) + 1

    def draw_t(self, batch: int, generator: torch.Generator | None = None, device=None,
               t_min: float = 1e-5) -> torch.Tensor:
        """``t ~ U{1..T}`` (int64 ``(B,)``; ``t_min`` applies to SDEs only)."""
        dev = generator.device if generator is not None else device
        t = torch.randint(1, self.T + 1, (batch,), generator=generator, device=dev)
        return t if device is None else t.to(device)

    # -- the chain ------------------------------------------------------------------------------------------
    def forward_step(self, x_prev: torch.Tensor, t, noise: torch.Tensor | None = None, generator=None):
        """One forward step ``x_t = a_t x_{t-1} + b_t eps``, ``eps ~ N(0, C)``."""
        if noise is None:
            self.cov.check(x_prev)
            noise = self.cov.sample(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
        return self.at("a", t, x_prev) * x_prev + self.at("b", t, x_prev) * noise

    def posterior_coefficients(self, t):
        """``(A_t, B_t, C_t^2)`` of ``q(x_{t-1} | x_t, x_0) = N(A_t x_t + B_t x_0, C_t^2 C)`` (float64)."""
        t = self._index(t, lo=1)
        return self.post_A[t], self.post_B[t], self.post_var[t]

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t):
        """``q(x_{t-1} | x_t, x_0) = N(mean, var C)``: returns ``(mean, var)``, ``var`` broadcastable."""
        mean = self.at("post_A", t, x_t, lo=1) * x_t + self.at("post_B", t, x_t, lo=1) * x0
        return mean, self.at("post_var", t, x_t, lo=1)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether ``s_T = 0`` (``x_T`` is pure noise; Lin et al. 2024)."""
        return float(self.mean_scale[-1]) == 0.0

    def __repr__(self):
        return f"{type(self).__name__}(T={self.T}, cov={self.cov!r})"


class VPChain(GaussianChain):
    """Variance-preserving chain (DDPM): ``x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps``, prior ``N(0, C)``.

    ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) C)``. Attributes (index ``t = 0..T``): ``beta``,
    ``alpha``, ``alpha_bar``, ``beta_tilde`` (the posterior variance factor ``C_t^2``).
    """

    variance_preserving = True

    def __init__(self, betas, cov: Covariance | None = None):
        betas = as_betas(betas, allow_final_one=True)  # beta_T = 1: zero terminal SNR (Lin et al. 2024)
        self.beta = _pad(betas, 0.0)
        self.alpha = 1.0 - self.beta
        log_ab = log_alpha_bar(self.beta)
        self.alpha_bar = torch.exp(log_ab)
        self._one_minus_ab = -torch.expm1(log_ab)  # 1 - abar_t without cancellation
        self._one_minus_ab[0] = 0.0  # -expm1(0) is -0.0
        super().__init__(torch.sqrt(1.0 - betas), torch.sqrt(betas), cov=cov, prior_std=1.0)
        self.beta_tilde = self.post_var

    def _closed_form_coeffs(self):
        return torch.sqrt(self.alpha_bar), torch.sqrt(self._one_minus_ab)


class VEChain(GaussianChain):
    """Variance-exploding chain (NCSN, Song & Ermon 2019): ``x_t = x_{t-1} + g(t) eps``, ``sigma_t^2 = sum_{s<=t} g^2(s)``.

    Built from the levels ``sigma_1 < ... < sigma_T`` (``g^2(t) = sigma_t^2 - sigma_{t-1}^2``, ``sigma_0 = 0``)
    or, with :meth:`from_g`, from ``g``. ``q(x_t | x_0) = N(x_0, sigma_t^2 C)``, prior ``N(0, sigma_T^2 C)``.
    """

    unit_scale = True

    def __init__(self, sigmas, cov: Covariance | None = None):
        sig = as_sigmas(sigmas)
        self._levels = _pad(sig, 0.0)
        self.g2 = torch.cat([torch.zeros(1, dtype=_F64), self._levels[1:] ** 2 - self._levels[:-1] ** 2])
        super().__init__(torch.ones_like(sig), self.g2[1:].sqrt(), cov=cov, prior_std=float(sig[-1]))

    @classmethod
    def from_g(cls, g, cov: Covariance | None = None) -> "VEChain":
        """The chain ``x_t = x_{t-1} + g(t) eps`` from ``g(1..T)`` (each positive)."""
        g = torch.as_tensor(g, dtype=_F64).reshape(-1)
        if g.numel() < 1 or not torch.isfinite(g).all() or (g <= 0).any():
            raise DiffusionLabError("g(t) must be finite and positive for every t")
        return cls(torch.cumsum(g**2, 0).sqrt(), cov=cov)

    def _closed_form_coeffs(self):
        return torch.ones(self.T + 1, dtype=_F64), self._levels.clone()
