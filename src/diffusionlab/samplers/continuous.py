"""Continuous-time samplers: the reverse SDE, predictor-corrector, and the probability-flow ODE, all with C.

Every sampler is a plain function ``fn(model, x, times=None, noise=None, progress=False, **opts) -> x`` of a
:class:`~diffusionlab.parametrization.DiffusionModel` on a continuous SDE (``VPSDE``, ``SubVPSDE``,
``VESDE``), a start ``x`` (a prior draw at ``times[0]``, e.g. ``process.prior_sample``), a decreasing float64
time grid (:func:`~diffusionlab.samplers.grids.time_grid`; ``None`` means 1000 uniform steps, an int that many;
``timesteps=`` is accepted as an alias, the registry's common keyword) and a noise source (default
``NoiseSource(model.process.cov, generator)``, i.e. ``L z`` with ``L L^T = C``). No hidden state; the model
counts its own evaluations (``model.nfe``). Everything runs in ``x``'s dtype and device (pass float64 ``x`` for float64
sampling); the grid's coefficients are computed once in float64 on that device, so the loops never
synchronise with an accelerator.

The equations, in forward-time notation with a reverse-time Wiener process ``W-bar`` (Song et al. 2021,
"Score-based generative modeling through stochastic differential equations"; seed 003 with ERRATA 8)::

    reverse SDE             dX = [f(t) X - g(t)^2 C grad log p_t(X)] dt + g(t) L dW-bar
    probability-flow ODE    dX = [f(t) X - g(t)^2 C grad log p_t(X) / 2] dt

``C grad log p_t = model.c_score = -E[eps | x_t] / sigma_t`` needs no solve. Injecting i.i.d. noise ``z``
instead of ``L z`` samples the wrong distribution when ``C != I`` (the tests show it).

- :func:`euler_maruyama` -- Euler-Maruyama on the reverse SDE;
- :func:`reverse_diffusion_pc` -- predictor-corrector sampling (Song et al. 2021, Algorithms 2-3): the
  reverse-diffusion predictor and C-preconditioned Langevin corrector;
- :func:`ode_euler`, :func:`ode_heun` -- fixed-grid Euler and Heun (Karras et al. 2022, "Elucidating the design
  space of diffusion-based generative models", Algorithm 1) on the probability-flow ODE;
- :func:`ode_adaptive` -- an adaptive solver (torchdiffeq ``odeint``, Dormand-Prince by default) on the ODE.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.samplers.grids import check_continuous, time_grid
from diffusionlab.samplers.noise import NoiseSource
from diffusionlab.utils import bcast

_F64 = torch.float64
DENOISE = (False, True, "tweedie")


# ---- shared pieces --------------------------------------------------------------------------------------------
def check_times(times) -> torch.Tensor:
    """A sampler's grid as a float64 CPU tensor: at least two finite times, strictly decreasing, last > 0
    (the SDE's score is singular at ``t = 0`` for VP; stop at a small ``eps``)."""
    try:
        ts = torch.as_tensor(times, dtype=_F64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise DiffusionLabError(f"time grid must be a sequence of numbers, got {times!r}") from None
    if ts.numel() < 2:
        raise DiffusionLabError(f"time grid needs at least 2 times (start and end), got {ts.tolist()}")
    if not torch.isfinite(ts).all():
        raise DiffusionLabError(f"time grid has a non-finite time: {ts.tolist()}")
    if not (ts[1:] < ts[:-1]).all():
        i = int(torch.nonzero(ts[1:] >= ts[:-1])[0])
        raise DiffusionLabError(
            f"time grid must be strictly decreasing, but t[{i}] = {ts[i].item()} <= t[{i + 1}] = {ts[i + 1].item()}"
        )
    if ts[-1] < 0:
        raise DiffusionLabError(f"time grid must end at a time >= 0, got {ts[-1].item()}")
    return ts


DEFAULT_STEPS = 1000  # score_sde's N for the reverse SDE and PC samplers


def resolve_times(process, times) -> torch.Tensor:
    """A sampler's grid: ``None`` (``DEFAULT_STEPS`` uniform steps to the default ``eps``), an int (that many
    uniform steps, :func:`~diffusionlab.samplers.grids.time_grid`) or a decreasing sequence of times."""
    if times is None:
        return time_grid(process, DEFAULT_STEPS)
    if isinstance(times, int) and not isinstance(times, bool):
        return time_grid(process, times)
    return check_times(times)


def _setup(model, x: torch.Tensor, times, noise, generator=None, timesteps=None):
    """``(process, times on x's device (float64), host list of times, noise source)``.

    ``timesteps`` is an alias of ``times`` (the samplers registry's common keyword); ``generator`` seeds the
    default noise source ``NoiseSource(process.cov, generator)``."""
    process = model.process
    check_continuous(process)
    process.cov.check(x)
    if timesteps is not None:
        if times is not None:
            raise DiffusionLabError("give the time grid once: as times or as timesteps, not both")
        times = timesteps
    ts = resolve_times(process, times)
    noise = NoiseSource(process.cov, generator) if noise is None else noise
    return process, ts.to(x.device), ts.tolist(), noise


def _steps(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def _check_denoise(denoise):
    if not any(denoise is d or (isinstance(denoise, str) and denoise == d) for d in DENOISE):
        raise DiffusionLabError(f"denoise must be one of False, True, 'tweedie'; got {denoise!r}")
    return denoise


def _g2(process, t, x: torch.Tensor) -> torch.Tensor:
    """``g(t)^2`` broadcast against ``x`` in its dtype."""
    return bcast(process.diffusion_sq(t).to(device=x.device, dtype=x.dtype), x)


def _scalar(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 0-d (or ``(B,)``) coefficient in ``x``'s dtype, broadcast against ``x``."""
    return bcast(v.to(dtype=x.dtype), x)


def reverse_sde_drift(model, x: torch.Tensor, t) -> torch.Tensor:
    """The reverse SDE's drift at ``(x, t)`` (one evaluation): :meth:`~diffusionlab.processes.LinearSDE.reverse_drift`."""
    return model.process.reverse_drift(x, t, model.c_score(x, t))


def probability_flow_drift(model, x: torch.Tensor, t) -> torch.Tensor:
    """The probability-flow ODE's velocity at ``(x, t)`` (one evaluation): :meth:`~diffusionlab.processes.LinearSDE.ode_drift`."""
    return model.process.ode_drift(x, t, model.c_score(x, t))


def _final(model, x: torch.Tensor, t_last, denoise) -> torch.Tensor:
    """``denoise="tweedie"``: replace the last iterate by ``E[x_0 | x_eps]`` (Tweedie; one more evaluation)."""
    return model.x0(x, t_last) if isinstance(denoise, str) and denoise == "tweedie" else x


# ---- reverse SDE ----------------------------------------------------------------------------------------------
def euler_maruyama(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, denoise=True,
                   generator: torch.Generator | None = None, timesteps=None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE from ``times[0]`` down to ``times[-1]`` (one evaluation per step).

    With ``dt_i = t_i - t_{i+1} > 0`` and ``z ~ N(0, I)``::

        x <- x - [f(t_i) x - g(t_i)^2 C s_theta(x, t_i)] dt_i + g(t_i) sqrt(dt_i) L z

    ``denoise``: ``True`` (default, score_sde's ``noise_removal``) takes the last step without its noise
    (returns the step's mean); ``False`` keeps it (a draw of ``p_{t_N}`` itself); ``"tweedie"`` keeps it and
    then returns ``E[x_0 | x_{t_N}]`` (one more evaluation).
    """
    denoise = _check_denoise(denoise)
    process, ts, _, noise = _setup(model, x, times, noise, generator, timesteps)
    dts = ts[:-1] - ts[1:]
    g2 = process.diffusion_sq(ts[:-1])
    n = dts.numel()
    for i in _steps(n, progress, "euler-maruyama"):
        t = ts[i]
        x_mean = x - reverse_sde_drift(model, x, t) * _scalar(dts[i], x)
        if i == n - 1 and denoise is True:
            x = x_mean
        else:
            x = x_mean + _scalar((g2[i] * dts[i]).sqrt(), x) * noise(x)
    return _final(model, x, ts[-1], denoise)


# ---- predictor-corrector --------------------------------------------------------------------------------------
def transition_coeffs(process, t, t_next) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, G^2)`` of the exact forward transition from ``t_next`` to ``t`` (:meth:`~diffusionlab.processes.GaussianProcess.transition`)."""
    return process.transition(t, t_next)


def langevin_corrector_step(model, x: torch.Tensor, t, noise, snr: float = 0.16, alpha=1.0):
    """One Langevin corrector step at time ``t`` with preconditioner C (Song et al. 2021, Algorithms 4-5).

    ``x <- x + e C s_theta + sqrt(2 e) L z`` leaves ``p_t`` invariant for any constant SPD C (preconditioned
    Langevin dynamics; for ``C = I`` the paper's step). Step size by the signal-to-noise rule
    ``e = 2 alpha (snr ||z|| / ||s||)^2`` with both norms in C's metric, so that ``snr`` is the ratio of the
    drift's to the noise's length in whitened coordinates: ``||s|| = ||C s||_{C^{-1}} = sqrt(s^T C s)`` and
    ``||z|| = ||L z||_{C^{-1}}``. As in the reference implementation (score_sde ``LangevinCorrector``) the two
    norms are batch means of per-sample norms: a per-sample step ``~ ||z_b||^2 / ||s_b||^2`` would correlate the
    step with its own noise and with the state, which biases the stationary law in low dimension.
    Returns ``(x, x_mean)``.
    """
    cov = model.process.cov
    g = model.c_score(x, t)
    z = noise(x)
    g_norm = cov.mahalanobis(g).sqrt().mean()
    z_norm = cov.mahalanobis(z).sqrt().mean()
    step = 2.0 * alpha * (snr * z_norm / g_norm) ** 2
    x_mean = x + step * g
    return x_mean + (2.0 * step).sqrt() * z, x_mean


def reverse_diffusion_pc(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, snr: float = 0.16,
                         n_corrector: int = 1, denoise=True, discretization: str = "exact",
                         generator: torch.Generator | None = None, timesteps=None) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1; Alg. 2 for VE, Alg. 3 for VP), with C.

    At each grid time ``t_i`` (in the reference implementation's order, score_sde ``pc_sampler``):
    ``n_corrector`` Langevin steps (:func:`langevin_corrector_step`, ``alpha_i = (s_{t_i} / s_{t_{i+1}})^2``:
    ``1 - beta_i`` for VP / sub-VP, 1 for VE), then the reverse-diffusion predictor to ``t_{i+1}``. The
    predictor inverts the forward step ``x_t = a x_{t'} + G L z`` (the paper's Appendix E, reverse diffusion:
    ``x_i = x_{i+1} - f_{i+1}(x_{i+1}) + G G^T s_theta + G z``, here with ``f(x) = (a - 1) x`` and ``G -> G L``)::

        x <- (2 - a) x + G^2 C s_theta(x, t_i) + G L z

    ``discretization="exact"`` uses the exact transition of the SDE between grid times
    (:func:`transition_coeffs`; VP's ``2 - sqrt(1 - beta_i)`` and ``beta_i``, VE's ``sigma_i^2 - sigma_{i-1}^2``
    of Algorithms 2-3); ``"euler"`` uses ``a = 1 + f(t) dt``, ``G^2 = g(t)^2 dt`` (score_sde's default for
    other SDEs), which makes the predictor Euler-Maruyama. ``denoise`` as in :func:`euler_maruyama`
    (``True``: the last predictor step without noise). ``(1 + n_corrector)`` evaluations per step.
    """
    denoise = _check_denoise(denoise)
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise DiffusionLabError(f"n_corrector must be an integer >= 0, got {n_corrector!r}")
    try:
        snr = float(snr)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"corrector snr must be a positive number, got {snr!r}") from None
    if not (math.isfinite(snr) and snr > 0):
        raise DiffusionLabError(f"corrector snr must be a positive number, got {snr!r}")
    if discretization not in ("exact", "euler"):
        raise DiffusionLabError(f"unknown predictor discretization {discretization!r}; allowed: exact, euler")
    process, ts, _, noise = _setup(model, x, times, noise, generator, timesteps)
    a_exact, G2_exact = transition_coeffs(process, ts[:-1], ts[1:])
    if discretization == "exact":
        a, G2 = a_exact, G2_exact
    else:
        dts = ts[:-1] - ts[1:]
        a, G2 = 1.0 + process.drift_coef(ts[:-1]) * dts, process.diffusion_sq(ts[:-1]) * dts
    alpha = a_exact**2
    n = ts.numel() - 1
    for i in _steps(n, progress, "predictor-corrector"):
        t = ts[i]
        for _ in range(n_corrector):
            x, _ = langevin_corrector_step(model, x, t, noise, snr, _scalar(alpha[i], x))
        x_mean = _scalar(2.0 - a[i], x) * x + _scalar(G2[i], x) * model.c_score(x, t)
        if i == n - 1 and denoise is True:
            x = x_mean
        else:
            x = x_mean + _scalar(G2[i].sqrt(), x) * noise(x)
    return _final(model, x, ts[-1], denoise)


# ---- probability-flow ODE -------------------------------------------------------------------------------------
def ode_euler(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, generator=None,
              timesteps=None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE: ``x <- x + (t_{i+1} - t_i) v(x, t_i)``, ``v`` the ODE
    velocity (:func:`probability_flow_drift`); one evaluation per step, first order. ``noise`` and ``generator``
    are unused (accepted for the common signature)."""
    _, ts, _, _ = _setup(model, x, times, noise, None, timesteps)
    hs = ts[1:] - ts[:-1]
    for i in _steps(hs.numel(), progress, "ode-euler"):
        x = x + _scalar(hs[i], x) * probability_flow_drift(model, x, ts[i])
    return x


def ode_heun(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, generator=None,
             timesteps=None) -> torch.Tensor:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1), second order.

    ``x' = x + h v(x, t_i)``; if ``t_{i+1} != 0``: ``x <- x + h/2 (v(x, t_i) + v(x', t_{i+1}))`` (trapezoid),
    else ``x <- x'`` (Euler, the score being singular at ``t = 0``). Two evaluations per step (one on a last
    step ending at 0). ``noise`` and ``generator`` are unused.
    """
    _, ts, host, _ = _setup(model, x, times, noise, None, timesteps)
    hs = ts[1:] - ts[:-1]
    for i in _steps(hs.numel(), progress, "ode-heun"):
        h = _scalar(hs[i], x)
        d = probability_flow_drift(model, x, ts[i])
        x_euler = x + h * d
        if host[i + 1] == 0.0:
            x = x_euler
        else:
            x = x + 0.5 * h * (d + probability_flow_drift(model, x_euler, ts[i + 1]))
    return x


def ode_adaptive(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, method: str = "dopri5",
                 rtol: float = 1e-5, atol: float = 1e-5, options: dict | None = None, return_nfe: bool = False,
                 generator=None, timesteps=None):
    """Solve the probability-flow ODE from ``times[0]`` to ``times[-1]`` with torchdiffeq's ``odeint``
    (Dormand-Prince 5(4) by default, score_sde's RK45 sampler; rtol = atol = 1e-5 as there).

    Only the grid's two ends are used (``times=None``: ``T`` to the default ``eps``). The solver's state stays
    in ``x``'s dtype (pass float64 ``x`` for tight tolerances). Returns ``x``, or ``(x, nfe)`` with ``return_nfe``, ``nfe`` the model evaluations this call
    made (read from ``model.nfe``). ``noise`` and ``generator`` are unused; ``progress`` shows a running count
    of evaluations.
    """
    from torchdiffeq import odeint

    _, ts, _, _ = _setup(model, x, time_grid(model.process, 1) if times is None and timesteps is None else times,
                         noise, None, timesteps)
    span = torch.stack([ts[0], ts[-1]])
    start = model.nfe
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"ode-{method} evaluations", leave=False)

    def velocity(t, y):
        if bar is not None:
            bar.update(1)
        return probability_flow_drift(model, y, t)

    try:
        opts = stop_at_end(options, span, method)
        out = odeint(velocity, x, span, method=method, rtol=rtol, atol=atol, options=opts)[-1]
    finally:
        if bar is not None:
            bar.close()
    return (out, model.nfe - start) if return_nfe else out


from diffusionlab.odeint import stop_at_end  # noqa: E402,F401 (the bench imports it from here until it moves)

CONTINUOUS_SAMPLERS = {
    "euler_maruyama": euler_maruyama,
    "pc": reverse_diffusion_pc,
    "ode_euler": ode_euler,
    "ode_heun": ode_heun,
    "ode_adaptive": ode_adaptive,
}
