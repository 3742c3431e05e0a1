"""The probability-flow ODE (Song et al. 2021, eq. 13) in the SDE's own time ``t``, with the covariance C::

    dX = [f(t) X - g(t)^2 C grad log p_t(X) / 2] dt         (:meth:`~diffusionlab.processes.LinearSDE.ode_drift`)

- ``ode-euler``, ``ode-heun``: fixed-grid Euler and Heun (Karras et al. 2022, Algorithm 1's Heun step, here in
  ``t``; the few-step solvers of :mod:`diffusionlab.samplers.fewstep` integrate the same ODE in the EDM level);
- ``ode-adaptive``: an adaptive solver (torchdiffeq, Dormand-Prince by default; score_sde's RK45 sampler).
"""

from __future__ import annotations

import torch

from diffusionlab.odeint import solve
from diffusionlab.processes.grid import as_grid
from diffusionlab.progress import progress as progress_display
from diffusionlab.samplers.catalogue import number, one_of, register_sampler
from diffusionlab.utils import bcast


def velocity(model, x: torch.Tensor, t) -> torch.Tensor:
    """The ODE's velocity at ``(x, t)`` (one evaluation)."""
    return model.process.ode_drift(x, t, model.c_score(x, t))


@register_sampler("ode-euler", "Euler's method on the probability-flow ODE in t", "Song et al. 2021, eq. 13",
                  requires=("continuous",), default_grid="uniform", default_steps=100)
def ode_euler(model, x: torch.Tensor, grid=None, progress: bool = False) -> torch.Tensor:
    """``x <- x + (t_{i+1} - t_i) v(x, t_i)``; one evaluation per step, first order."""
    model.process.require_continuous("ode-euler (the probability-flow ODE in t)")
    grid = as_grid(model.process, grid)
    model.process.cov.check(x)
    ts = grid.t.to(x.device)
    for i in progress_display(range(grid.steps), desc="ode-euler", enabled=progress):
        x = x + bcast((ts[i + 1] - ts[i]).to(x.dtype), x) * velocity(model, x, ts[i])
    return x


def _heun_nfe(grid, opts) -> int:
    return 2 * grid.steps - (1 if grid.times[-1] == 0.0 else 0)


@register_sampler("ode-heun", "Heun's method (trapezoid) on the probability-flow ODE in t",
                  "Karras et al. 2022, Algorithm 1", requires=("continuous",), default_grid="uniform",
                  default_steps=50, nfe=_heun_nfe,
                  steps_for_budget=lambda budget, process, opts: max(1, budget // 2))
def ode_heun(model, x: torch.Tensor, grid=None, progress: bool = False) -> torch.Tensor:
    """Heun's method on the probability-flow ODE, second order: ``x' = x + h v(x, t_i)``; if ``t_{i+1} != 0``:
    ``x <- x + h/2 (v(x, t_i) + v(x', t_{i+1}))``, else ``x <- x'`` (the score is singular at ``t = 0``). Two
    evaluations per step (one on a last step ending at 0)."""
    model.process.require_continuous("ode-heun (the probability-flow ODE in t)")
    grid = as_grid(model.process, grid)
    model.process.cov.check(x)
    ts = grid.t.to(x.device)
    for i in progress_display(range(grid.steps), desc="ode-heun", enabled=progress):
        h = bcast((ts[i + 1] - ts[i]).to(x.dtype), x)
        d = velocity(model, x, ts[i])
        x_euler = x + h * d
        x = x_euler if grid.times[i + 1] == 0.0 else x + 0.5 * h * (d + velocity(model, x_euler, ts[i + 1]))
    return x


ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5")


@register_sampler("ode-adaptive", "an adaptive Runge-Kutta solve of the probability-flow ODE (torchdiffeq)",
                  "Song et al. 2021, sec. 4.3 (RK45)",
                  options={"method": one_of(*ADAPTIVE, doc="torchdiffeq method"),
                           "rtol": number("relative tolerance", 0.0), "atol": number("absolute tolerance", 0.0)},
                  requires=("continuous",), default_grid="uniform", default_steps=1, nfe=lambda grid, opts: None,
                  steps_for_budget=lambda budget, process, opts: 1, adaptive=True)
def ode_adaptive(model, x: torch.Tensor, grid=None, progress: bool = False, method: str = "dopri5", rtol: float = 1e-5,
                 atol: float = 1e-5) -> torch.Tensor:
    """Solve the probability-flow ODE from the grid's first to its last time with torchdiffeq's ``odeint``
    (Dormand-Prince 5(4) by default, score_sde's RK45 sampler; ``rtol = atol = 1e-5`` as there). Only the grid's
    two ends are used. The solver's state stays in ``x``'s dtype (pass float64 ``x`` for tight tolerances); the
    model counts the evaluations (``model.nfe``); ``progress`` shows a running count of them."""
    model.process.require_continuous("ode-adaptive (the probability-flow ODE in t)")
    grid = as_grid(model.process, 1 if grid is None else grid)
    model.process.cov.check(x)
    bar = progress_display(desc=f"ode-{method} evaluations", enabled=progress)

    def f(t, y):
        bar.update(1)
        return velocity(model, y, t)

    try:
        return solve(f, x, grid.times[0], grid.times[-1], method, rtol, atol)
    finally:
        bar.close()
