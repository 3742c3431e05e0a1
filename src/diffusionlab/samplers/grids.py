"""Time grids for the continuous-time samplers: ``steps + 1`` float64 times from ``T`` down to ``eps``.

Every grid starts at ``process.T`` (= 1 for the SDEs), ends exactly at ``eps`` and is strictly decreasing;
``steps`` is the number of intervals (an ``N``-step sampler evaluates the model ``N`` times per stage).

=============  ================================================================================================
``uniform``    ``t_i = T + (i / N)(eps - T)`` (score_sde, Song et al. 2021)
``quadratic``  ``t_i = eps + (T - eps) (1 - i / N)^2``: denser near ``eps`` (the "quadratic" skip of DDIM,
               Song, Meng & Ermon 2021)
``logsnr``     uniform in ``lambda = log SNR(t) = log(s_t^2 / sigma_t^2)`` between ``lambda(T)`` and
               ``lambda(eps)`` (the DPM-Solver grid, Lu et al. 2022), mapped back to ``t``
``karras``     EDM's grid (Karras et al. 2022, eq. 5), ``rho = 7``, in the EDM noise level of the scaled
               variable ``x / s_t``: ``sigma_edm = sigma_t / s_t = exp(-lambda / 2)``;
               ``sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` with
               ``sigma_max = sigma_edm(T)``, ``sigma_min = sigma_edm(eps)``, mapped back to ``t``. For VE
               ``s = 1`` and this is EDM's grid in ``sigma`` itself.
=============  ================================================================================================

Both ``logsnr`` and ``karras`` need the inverse of ``lambda(t)`` (:func:`t_from_logsnr`): in closed form for
VP, sub-VP and VE (see there), by bisection in float64 for any other process whose ``lambda`` is
decreasing in ``t``.

Default ``eps`` (:func:`default_eps`): ``1e-5`` for VE, ``1e-3`` otherwise (score_sde's sampling ends).
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.base import bisect_decreasing

_F64 = torch.float64
GRIDS = ("uniform", "quadratic", "logsnr", "karras")


def default_eps(process) -> float:
    """The time a sampler stops at by default (the process's ``default_eps``)."""
    return process.default_eps


def check_continuous(process) -> None:
    """Refuse a process that is not a continuous linear SDE (a discrete chain has integer times)."""
    process.require_continuous("continuous-time sampling")


def _check_steps_eps(process, steps, eps) -> tuple[int, float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DiffusionLabError(f"number of steps must be an integer >= 1, got {steps!r}")
    return steps, check_eps(process, default_eps(process) if eps is None else eps)


def check_eps(process, eps) -> float:
    """The smallest time ``eps`` as a float in ``(0, T)``; :class:`DiffusionLabError` otherwise."""
    return process.check_eps(eps)


def logsnr(process, t) -> torch.Tensor:
    """``lambda(t) = log(s_t^2 / sigma_t^2)`` in float64."""
    return process.logsnr(torch.as_tensor(t, dtype=_F64))


def t_from_logsnr(process, lam, lo: float = 0.0, hi: float | None = None) -> torch.Tensor:
    """The time ``t`` with ``logsnr(process, t) = lam`` (float64): :meth:`time_at_logsnr` of the process."""
    return process.time_at_logsnr(lam)


def time_grid(process, steps: int, kind: str = "uniform", eps: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """``steps + 1`` float64 times, strictly decreasing from ``process.T`` to ``eps`` (module docstring).

    Args:
        process: a continuous SDE (VP, sub-VP, VE).
        steps: number of intervals ``N >= 1``.
        kind: ``"uniform" | "quadratic" | "logsnr" | "karras"``.
        eps: last time (default :func:`default_eps`).
        rho: EDM's exponent for ``kind="karras"``.
    """
    check_continuous(process)
    steps, eps = _check_steps_eps(process, steps, eps)
    T = float(process.T)
    u = torch.arange(steps + 1, dtype=_F64) / steps  # 0 .. 1
    if kind == "uniform":
        t = T + u * (eps - T)
    elif kind == "quadratic":
        t = eps + (T - eps) * (1.0 - u) ** 2
    elif kind in ("logsnr", "karras"):
        lam_T, lam_eps = logsnr(process, T), logsnr(process, eps)
        if kind == "logsnr":
            lam = lam_T + u * (lam_eps - lam_T)
        else:
            rho = float(rho)
            if not rho > 0:
                raise DiffusionLabError(f"karras grid needs rho > 0, got {rho!r}")
            smax, smin = torch.exp(-0.5 * lam_T), torch.exp(-0.5 * lam_eps)
            sig = (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            lam = -2.0 * torch.log(sig)
        t = t_from_logsnr(process, lam, lo=eps, hi=T)
    else:
        raise DiffusionLabError(f"unknown time grid {kind!r}; allowed: {', '.join(GRIDS)}")
    t[0], t[-1] = T, eps  # exact ends whatever the rounding of the inverse
    return t
