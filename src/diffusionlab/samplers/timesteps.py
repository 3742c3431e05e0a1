"""Time grids of the discrete samplers and the coefficients of a respaced chain.

:func:`make_timesteps` gives DDIM-style sub-sequences ``T = tau_K > ... > tau_1 >= 1``; :func:`respace` gives the
chain that jumps between them (improved-diffusion's respacing, generalised to any ``q(x_t | x_0) =
N(s_t x_0, sigma_t^2 C)``): step ``k`` goes from ``tau_k`` to ``tau_{k-1}`` (``tau_0 = 0``, the data) with::

    a'_k = s_{tau_k} / s_{tau_{k-1}},   b'_k^2 = sigma_{tau_k}^2 - a'_k^2 sigma_{tau_{k-1}}^2

(VP: ``b'^2 = 1 - abar_{tau_k} / abar_{tau_{k-1}}``, the respaced ``beta``; VE: ``b'^2 = sigma_{tau_k}^2 -
sigma_{tau_{k-1}}^2``, the respaced ``g^2``), and the posterior ``q(x_{tau_{k-1}} | x_{tau_k}, x_0) =
N(A'_k x + B'_k x_0, beta-tilde'_k C)`` of :class:`~diffusionlab.processes.GaussianChain`. On the full grid these
are the chain's own coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import reverse_variances

KINDS = ("uniform", "quadratic", "trailing")
_F64 = torch.float64


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise DiffusionLabError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def make_timesteps(T: int, steps: int | None = None, kind: str = "uniform") -> torch.Tensor:
    """``steps`` distinct integer steps from ``T`` down (descending int64; ``steps=None`` means all ``T``).

    ``uniform``: ``round(1 + (T - 1) k / (steps - 1))``, from ``T`` to 1; ``quadratic`` (DDIM, Song et al. 2021):
    ``1 + (T - 1) (k / (steps - 1))^2``, denser near the data, pushed apart where rounding would repeat a step;
    ``trailing`` (Lin et al. 2024, table 2): ``round(T k / steps)``, ``k = steps .. 1``, from ``T`` to ``T / steps``:
    the same spacing all the way to the data, with no evaluation spent at ``t = 1`` (where the sample is already
    the data up to ``sigma_1``). On the full grid all three are ``T .. 1``.
    """
    T = _check_int("number of chain steps T", T, 1)
    steps = T if steps is None else _check_int("number of sampling steps", steps, 1)
    if steps > T:
        raise DiffusionLabError(f"number of sampling steps must be <= T = {T}, got {steps}")
    if kind not in KINDS:
        raise DiffusionLabError(f"unknown timestep spacing {kind!r}; allowed: {', '.join(KINDS)}")
    if steps == 1:
        return torch.tensor([T], dtype=torch.long)
    if kind == "trailing":  # T k / steps >= k and steps apart by >= 1 since steps <= T
        k = torch.arange(steps, 0, -1, dtype=_F64)
        return torch.floor(T * k / steps + 0.5).long()
    q = torch.arange(steps, dtype=_F64) / (steps - 1)
    if kind == "quadratic":
        q = q**2
    ts = torch.floor(1.0 + (T - 1) * q + 0.5).long().tolist()  # ascending; floor(x + 1/2) keeps spacing >= 1
    for k in range(1, steps):  # make strictly increasing (quadratic crowds the low end)
        ts[k] = max(ts[k], ts[k - 1] + 1)
    for k in range(steps - 1, -1, -1):  # and keep the top at T
        ts[k] = min(ts[k], T - (steps - 1 - k))
    return torch.tensor(ts[::-1], dtype=torch.long)


def check_timesteps(timesteps, T: int, spacing: str = "uniform") -> torch.Tensor:
    """Validate a sampler's grid: ``None`` (all of ``T..1``), an int (that many steps spaced as ``spacing``, one of
    :data:`KINDS`) or a sequence of strictly decreasing integers in ``1..T``. Returns a CPU int64 tensor."""
    if timesteps is None:
        return make_timesteps(T)
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        return make_timesteps(T, timesteps, spacing)
    try:
        ts = torch.as_tensor(timesteps).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise DiffusionLabError(f"timesteps must be a sequence of integers, got {timesteps!r}") from None
    if ts.dtype.is_floating_point or ts.dtype == torch.bool or ts.ndim != 1 or ts.numel() < 1:
        raise DiffusionLabError(f"timesteps must be a non-empty 1-D sequence of integers, got {timesteps!r}")
    ts = ts.long()
    if int(ts.min()) < 1 or int(ts.max()) > T:
        raise DiffusionLabError(f"timesteps must lie in 1..{T}, got {ts.min().item()}..{ts.max().item()}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise DiffusionLabError(f"timesteps must be strictly decreasing (from T towards 1), got {ts.tolist()}")
    return ts


@dataclass
class Respaced:
    """Per-step float64 coefficients ``(K,)`` in *sampling order* (step ``k`` maps ``t[k]`` to ``t_prev[k]``)."""

    t: torch.Tensor
    t_prev: torch.Tensor
    s: torch.Tensor
    sigma: torch.Tensor
    s_prev: torch.Tensor
    sigma_prev: torch.Tensor
    b2: torch.Tensor  # b'^2: respaced beta (VP) / g^2 (VE)
    A: torch.Tensor
    B: torch.Tensor
    post_var: torch.Tensor  # beta-tilde'
    upper: torch.Tensor  # b'^2
    lower: torch.Tensor  # beta-tilde', clipped where it is 0 (the step to the data)


def respace(chain, timesteps: torch.Tensor) -> Respaced:
    """Coefficients of ``chain`` respaced to ``timesteps`` (descending; module docstring)."""
    ts = timesteps.cpu().long()
    prev = torch.cat([ts[1:], torch.zeros(1, dtype=torch.long)])
    s, sig = chain.mean_scale[ts], chain.sigma[ts]
    s_p, sig_p = chain.mean_scale[prev], chain.sigma[prev]
    a = s / s_p
    b2 = sig**2 - a**2 * sig_p**2
    A = a * sig_p**2 / sig**2
    B = s_p * b2 / sig**2
    post_var = b2 * sig_p**2 / sig**2
    # reverse_variances works on arrays padded at index 0 in increasing time: flip, pad, clip, flip back
    pad = torch.zeros(1, dtype=_F64)
    up, lo = reverse_variances(torch.cat([pad, b2.flip(0)]), torch.cat([pad, post_var.flip(0)]))
    return Respaced(ts, prev, s, sig, s_p, sig_p, b2, A, B, post_var, up[1:].flip(0), lo[1:].flip(0))
