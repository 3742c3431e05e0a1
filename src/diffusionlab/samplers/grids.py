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

import math

import torch

from diffusionlab.errors import DiffusionLabError

_F64 = torch.float64
GRIDS = ("uniform", "quadratic", "logsnr", "karras")


def default_eps(process) -> float:
    """The time a sampler stops at by default: ``1e-5`` for the VE-SDE, ``1e-3`` for VP / sub-VP (score_sde)."""
    from diffusionlab.processes.sde import VESDE

    return 1e-5 if isinstance(process, VESDE) else 1e-3


def check_continuous(process) -> None:
    """Refuse a process that is not a continuous linear SDE (a discrete chain has integer times)."""
    from diffusionlab.processes.sde import LinearSDE

    if not isinstance(process, LinearSDE):
        raise DiffusionLabError(
            f"continuous-time sampling needs an SDE process (VPSDE, SubVPSDE, VESDE), got {type(process).__name__}"
        )


def _check_steps_eps(process, steps, eps) -> tuple[int, float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DiffusionLabError(f"number of steps must be an integer >= 1, got {steps!r}")
    return steps, check_eps(process, default_eps(process) if eps is None else eps)


def check_eps(process, eps) -> float:
    """The smallest time ``eps`` as a float in ``(0, T)``; :class:`DiffusionLabError` otherwise."""
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"eps must be a number in (0, T), got {eps!r}") from None
    if not (0.0 < eps < float(process.T)):
        raise DiffusionLabError(f"eps must lie in (0, T = {process.T}), got {eps!r}")
    return eps


def logsnr(process, t) -> torch.Tensor:
    """``lambda(t) = log(s_t^2 / sigma_t^2)`` in float64."""
    s, sigma = process.coeffs(torch.as_tensor(t, dtype=_F64))
    return 2.0 * (torch.log(s) - torch.log(sigma))


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


def _t_from_integral_beta(process, B: torch.Tensor) -> torch.Tensor:
    """VP / sub-VP: the ``t`` with ``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 = B`` (stable root)."""
    a = 0.5 * (process.beta_max - process.beta_min)
    b = process.beta_min
    if a == 0.0:
        return B / b
    return 2.0 * B / (b + torch.sqrt(b * b + 4.0 * a * B))


def t_from_logsnr(process, lam, lo: float = 0.0, hi: float | None = None) -> torch.Tensor:
    """The time ``t`` with ``logsnr(process, t) = lam`` (float64).

    Closed forms: VP ``lambda = -log(expm1(B))``, so ``B = softplus(-lambda)``; sub-VP
    ``lambda = B - 2 log(expm1(B))``, so with ``c = exp(-lambda)``, ``y = e^B`` solves ``(y - 1)^2 = c y`` and
    ``B = log1p((c + sqrt(c (c + 4))) / 2)``; then ``t`` from the quadratic ``B(t) = B``. VE
    ``lambda = -2 log sigma(t)``. Any other process: bisection on ``[lo, hi]`` (``hi = T`` by default).
    """
    from diffusionlab.processes.sde import SubVPSDE, VESDE, VPSDE

    lam = torch.as_tensor(lam, dtype=_F64)
    if isinstance(process, SubVPSDE):
        c = torch.exp(-lam)
        return _t_from_integral_beta(process, torch.log1p(0.5 * (c + torch.sqrt(c * (c + 4.0)))))
    if isinstance(process, VPSDE):
        return _t_from_integral_beta(process, torch.nn.functional.softplus(-lam))
    if isinstance(process, VESDE):
        return (-0.5 * lam - math.log(process.sigma_min)) / process._log_ratio
    hi = float(process.T) if hi is None else hi
    return bisect_decreasing(lambda t: logsnr(process, t), lam, lo, hi)


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
