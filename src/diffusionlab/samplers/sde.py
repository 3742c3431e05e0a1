"""The reverse-time SDE (Song et al. 2021, eq. 6) solved by Euler-Maruyama, with the covariance C.

In forward-time notation with a reverse-time Wiener process ``W-bar``::

    dX = [f(t) X - g(t)^2 C grad log p_t(X)] dt + g(t) L dW-bar         (L L^T = C)

``C grad log p_t = model.c_score = -E[eps | x_t] / sigma_t`` needs no solve; the drift is the process's
(:meth:`~diffusionlab.processes.LinearSDE.reverse_drift`). Injecting i.i.d. noise ``z`` instead of ``L z`` samples
the wrong distribution when ``C != I`` (the tests show it).
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import as_grid
from diffusionlab.progress import progress as progress_display
from diffusionlab.samplers.catalogue import one_of, register_sampler
from diffusionlab.samplers.noise import noise_source
from diffusionlab.utils import bcast

DENOISE = (False, True, "tweedie")


def check_denoise(denoise):
    if not any(denoise is d or (isinstance(denoise, str) and denoise == d) for d in DENOISE):
        raise DiffusionLabError(f"denoise must be one of False, True, 'tweedie'; got {denoise!r}")
    return denoise


def final_denoise(model, x: torch.Tensor, t_last, denoise) -> torch.Tensor:
    """``denoise="tweedie"``: replace the last iterate by ``E[x_0 | x_eps]`` (Tweedie; one more evaluation)."""
    return model.x0(x, t_last) if isinstance(denoise, str) and denoise == "tweedie" else x


def _em_nfe(grid, opts) -> int:
    return grid.steps + (1 if opts["denoise"] == "tweedie" else 0)


@register_sampler(
    "euler-maruyama", "Euler-Maruyama on the reverse SDE, noise g sqrt(dt) L z", "Song et al. 2021, eq. 6",
    options={"denoise": one_of(*DENOISE, doc="True: last step without its noise; False: keep it; "
                                             "'tweedie': keep it, then E[x_0 | x] (one more evaluation)")},
    requires=("continuous",), stochastic=True, default_grid="uniform", default_steps=None, nfe=_em_nfe,
)
def euler_maruyama(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False, denoise=True) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE from ``t_0`` down to ``t_N`` (one evaluation per step).

    With ``dt_i = t_i - t_{i+1} > 0`` and ``z ~ N(0, I)``::

        x <- x - [f(t_i) x - g(t_i)^2 C s_theta(x, t_i)] dt_i + g(t_i) sqrt(dt_i) L z

    ``denoise``: ``True`` (default, score_sde's ``noise_removal``) takes the last step without its noise (returns
    the step's mean); ``False`` keeps it (a draw of ``p_{t_N}`` itself); ``"tweedie"`` keeps it and then returns
    ``E[x_0 | x_{t_N}]`` (one more evaluation).
    """
    denoise = check_denoise(denoise)
    process = model.process
    process.require_continuous("euler-maruyama (the reverse SDE)")
    grid = as_grid(process, grid)
    process.cov.check(x)
    noise = noise_source(model, noise)
    ts = grid.t.to(x.device)
    dts = ts[:-1] - ts[1:]
    g2 = process.diffusion_sq(ts[:-1])
    n = grid.steps
    for i in progress_display(range(n), desc="euler-maruyama", enabled=progress):
        t = ts[i]
        dt = bcast(dts[i].to(x.dtype), x)
        x_mean = x - process.reverse_drift(x, t, model.c_score(x, t)) * dt
        if i == n - 1 and denoise is True:
            x = x_mean
        else:
            x = x_mean + bcast((g2[i] * dts[i]).sqrt().to(x.dtype), x) * noise(x)
    return final_denoise(model, x, ts[-1], denoise)
