"""Noise schedules in float64, validated.

- :func:`linear_betas` -- Ho et al. 2020 (DDPM): ``beta_t`` linear from ``beta_start`` to ``beta_end``;
- :func:`scaled_linear_betas` -- latent diffusion (Rombach et al. 2022): ``sqrt(beta_t)`` linear;
- :func:`cosine_betas` -- Nichol & Dhariwal 2021: ``alpha-bar(t) = f(t) / f(0)``,
  ``f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2)``, ``beta_t = min(1 - alpha-bar_t / alpha-bar_{t-1}, 0.999)``;
- :func:`geometric_sigmas` -- Song & Ermon 2019 (NCSN): ``sigma_1 < ... < sigma_L`` in geometric progression;
- :func:`rescale_zero_terminal_snr` -- Lin et al. 2024, Algorithm 1: betas rescaled so that ``alpha-bar_T = 0``;
- :func:`shift_snr` -- Hoogeboom et al. 2023 (simple diffusion): every step's SNR divided by ``shift^2``;
- :func:`as_betas`, :func:`as_sigmas` -- any user array, validated.

All return 1-D float64 tensors indexed by ``t - 1`` for ``t = 1..T`` (the chains pad index 0 themselves).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.checks import real
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


def as_betas(values, allow_final_one: bool = False) -> torch.Tensor:
    """Validate a user beta schedule: every ``beta_t`` strictly inside (0, 1); with ``allow_final_one`` the last may
    be 1 (a zero terminal SNR, :func:`rescale_zero_terminal_snr`)."""
    b = _as_1d(values, "betas")
    high = b >= 1
    if allow_final_one and b[-1] == 1.0:
        high[-1] = False
    bad = torch.nonzero((b <= 0) | high)
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


def log_alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """``log alpha-bar_t = sum_{s <= t} log(1 - beta_s)`` for ``t = 1..len(betas)`` (``-inf`` after a beta of 1)."""
    return torch.cumsum(torch.log1p(-betas), 0)


def betas_from_log_alpha_bar(log_ab: torch.Tensor) -> torch.Tensor:
    """The betas of a chain with ``log alpha-bar_t`` (``t = 1..T``): ``beta_1 = 1 - alpha-bar_1``,
    ``beta_t = 1 - alpha-bar_t / alpha-bar_{t-1}``, as ``-expm1`` of the log ratio (no cancellation; a last
    ``alpha-bar`` of 0, ``-inf``, gives a beta of exactly 1)."""
    return -torch.expm1(torch.cat([log_ab[:1], log_ab[1:] - log_ab[:-1]]))


def rescale_zero_terminal_snr(betas) -> torch.Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1: shift and
    scale ``sqrt(alpha-bar_t)`` so that it is 0 at ``t = T`` and unchanged at ``t = 1``, and read the betas back::

        a_t = sqrt(abar_t),   a_t <- (a_t - a_T) a_1 / (a_1 - a_T),   abar_t = a_t^2,
        beta_1 = 1 - abar_1,   beta_t = 1 - abar_t / abar_{t-1},   beta_T = 1

    A chain whose last step leaves signal (``abar_T > 0``: the cosine schedule's 2.4e-9, the linear one's 4e-5)
    trains on ``x_T`` that still carries ``s_T x_0`` but samples from pure noise; after the rescale ``x_T`` is pure
    noise in training too. The last beta is exactly 1 (``alpha-bar_T = 0``), so eps-prediction cannot decode at
    ``T``: use v- or x0-prediction (Lin et al. 2024, sec. 3.2)."""
    b = as_betas(betas)
    if b.numel() < 2:
        raise DiffusionLabError("zero terminal SNR needs a schedule of at least 2 steps")
    a = torch.exp(0.5 * log_alpha_bar(b))  # sqrt(alpha-bar_t), t = 1..T
    a1, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * (a1 / (a1 - aT))  # a_T is exactly 0, so its log is -inf and beta_T exactly 1
    return as_betas(betas_from_log_alpha_bar(2.0 * torch.log(a)), allow_final_one=True)


def shift_snr(betas, shift: float) -> torch.Tensor:
    """The shifted schedule of Hoogeboom et al. 2023 ("simple diffusion", the shifted cosine schedule), for any
    chain: the signal-to-noise ratio ``SNR_t = alpha-bar_t / (1 - alpha-bar_t)`` of every step divided by
    ``shift^2``::

        log SNR'_t = log SNR_t - 2 log(shift),   alpha-bar'_t = sigmoid(log SNR'_t),
        beta'_1 = 1 - alpha-bar'_1,   beta'_t = 1 - alpha-bar'_t / alpha-bar'_{t-1}

    ``shift > 1`` noises more at every step (their rule for an image ``d`` pixels wide against a 64-pixel base:
    ``shift = d / 64``; Chen 2023, "On the importance of noise scheduling", reaches the same by scaling the data by
    ``1 / shift``), ``shift < 1`` less, ``shift = 1`` returns the betas as they are. ``alpha-bar`` stays strictly
    decreasing, so the shifted betas stay in (0, 1); a zero-terminal-SNR chain (last beta 1) keeps
    ``alpha-bar_T = 0``."""
    b = as_betas(betas, allow_final_one=True)
    shift = real("snr_shift", shift, 0.0, open_low=True)
    if shift == 1.0:
        return b
    log_ab = log_alpha_bar(b)
    log_snr = log_ab - torch.log(-torch.expm1(log_ab)) - 2.0 * math.log(shift)
    return as_betas(betas_from_log_alpha_bar(torch.nn.functional.logsigmoid(log_snr)), allow_final_one=True)


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
