"""Noise schedules in float64, validated.

- :func:`linear_betas` -- Ho et al. 2020 (DDPM): ``beta_t`` linear from ``beta_start`` to ``beta_end``;
- :func:`scaled_linear_betas` -- latent diffusion (Rombach et al. 2022): ``sqrt(beta_t)`` linear;
- :func:`cosine_betas` -- Nichol & Dhariwal 2021: ``alpha-bar(t) = f(t) / f(0)``,
  ``f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2)``, ``beta_t = min(1 - alpha-bar_t / alpha-bar_{t-1}, 0.999)``;
- :func:`geometric_sigmas` -- Song & Ermon 2019 (NCSN): ``sigma_1 < ... < sigma_L`` in geometric progression;
- :func:`as_betas`, :func:`as_sigmas` -- any user array, validated.

All return 1-D float64 tensors indexed by ``t - 1`` for ``t = 1..T`` (the chains pad index 0 themselves).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError

_F64 = torch.float64


def _check_length(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DiffusionLabError(f"{what} must be an integer >= 1, got {n!r}")
    return n


def _as_1d(values, what: str) -> torch.Tensor:
    try:
        v = torch.as_tensor(values, dtype=_F64).detach().clone()
    except (TypeError, ValueError, RuntimeError) as e:
        raise DiffusionLabError(f"{what} must be a 1-D array of numbers: {e}") from None
    if v.ndim != 1 or v.numel() < 1:
        raise DiffusionLabError(f"{what} must be a non-empty 1-D array, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        i = int(torch.nonzero(~torch.isfinite(v))[0])
        raise DiffusionLabError(f"{what}[{i}] = {v[i].item()} is not finite")
    return v


def as_betas(values) -> torch.Tensor:
    """Validate a user beta schedule: every ``beta_t`` strictly inside (0, 1)."""
    b = _as_1d(values, "betas")
    bad = torch.nonzero((b <= 0) | (b >= 1))
    if bad.numel():
        i = int(bad[0])
        raise DiffusionLabError(f"betas must lie in (0, 1); beta_{i + 1} (index {i}) = {b[i].item():.6g}")
    return b


def as_sigmas(values) -> torch.Tensor:
    """Validate user noise levels: positive and strictly increasing, ``sigma_1 < ... < sigma_L``."""
    s = _as_1d(values, "sigmas")
    bad = torch.nonzero(s <= 0)
    if bad.numel():
        i = int(bad[0])
        raise DiffusionLabError(f"sigmas must be positive; sigma_{i + 1} (index {i}) = {s[i].item():.6g}")
    if s.numel() > 1:
        bad = torch.nonzero(s[1:] <= s[:-1])
        if bad.numel():
            i = int(bad[0]) + 1
            raise DiffusionLabError(
                f"sigmas must be strictly increasing (sigma_1 < ... < sigma_L); sigma_{i + 1} = {s[i].item():.6g} "
                f"is not above sigma_{i} = {s[i - 1].item():.6g}"
            )
    return s


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020): ``beta_t`` from ``beta_start`` (t = 1) to ``beta_end`` (t = T)."""
    T = _check_length(T, "number of steps T")
    return as_betas(torch.linspace(float(beta_start), float(beta_end), T, dtype=_F64))


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022; diffusers' ``scaled_linear``): ``sqrt(beta_t)`` linear
    from ``sqrt(beta_start)`` (t = 1) to ``sqrt(beta_end)`` (t = T)."""
    T = _check_length(T, "number of steps T")
    return as_betas(torch.linspace(float(beta_start) ** 0.5, float(beta_end) ** 0.5, T, dtype=_F64) ** 2)


def cosine_alpha_bar(t, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's ``alpha-bar`` at continuous ``t`` in [0, 1]: ``f(t) / f(0)``."""
    t = torch.as_tensor(t, dtype=_F64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17) with their clipping ``beta_t <= max_beta``."""
    T = _check_length(T, "number of steps T")
    if not (0 < max_beta < 1):
        raise DiffusionLabError(f"max_beta must lie in (0, 1), got {max_beta!r}")
    if not (s >= 0):
        raise DiffusionLabError(f"cosine offset s must be >= 0, got {s!r}")
    ab = cosine_alpha_bar(torch.arange(T + 1, dtype=_F64) / T, s)
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    return as_betas(betas)


def geometric_sigmas(L: int = 10, sigma_min: float = 0.01, sigma_max: float = 1.0) -> torch.Tensor:
    """NCSN levels (Song & Ermon 2019): ``sigma_i = sigma_min (sigma_max / sigma_min)^((i - 1) / (L - 1))``,
    increasing (NCSN's code stores them decreasing)."""
    L = _check_length(L, "number of noise levels L")
    if not (sigma_min > 0):
        raise DiffusionLabError(f"sigma_min must be positive, got {sigma_min!r}")
    if not (sigma_max > sigma_min) and L > 1:
        raise DiffusionLabError(f"sigma_max must exceed sigma_min = {sigma_min!r}, got {sigma_max!r}")
    if L == 1:
        return as_sigmas([float(sigma_min)])
    return as_sigmas(torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), L, dtype=_F64)))


def make_betas(name: str, T: int, **kwargs) -> torch.Tensor:
    """Schedule by name (``linear`` or ``cosine``), for configs."""
    makers = {"linear": linear_betas, "cosine": cosine_betas}
    if name not in makers:
        raise DiffusionLabError(f"unknown beta schedule {name!r}; allowed: {', '.join(makers)}")
    return makers[name](T, **kwargs)
