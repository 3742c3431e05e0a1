"""Samplers built on the exact posterior between grid points: DDPM (ancestral), DDIM, and NCSN's VE reverse kernel.

Each walks a :class:`~diffusionlab.processes.grid.TimeGrid` ``p_0 > ... > p_N`` of any process (a chain's steps or an
SDE's times) using only ``(s, sigma)`` at the points, the exact transition ``x_{p_i} = a x_{p_{i+1}} + G L z`` and
the posterior ``q(x_{p_{i+1}} | x_{p_i}, x_0) = N(A x + B x_0, V C)`` of each step (on a chain's sub-sequence this is
improved-diffusion's respacing). Everything runs in ``x``'s dtype and device with float64 host coefficients (no
host-device synchronisation). Injected noise is ``L z`` from the sampler's noise source (covariance C).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import learned_log_variance
from diffusionlab.processes.grid import as_grid
from diffusionlab.progress import progress as progress_display
from diffusionlab.samplers.catalogue import flag, number, one_of, register_sampler
from diffusionlab.samplers.noise import noise_source, require_unit_scale

VARIANCES = ("beta", "beta_tilde", "learned")


def ancestral_variances(grid) -> tuple[list[float], list[float]]:
    """The two fixed reverse variances of each step of ``grid``: ``upper = G^2`` (Ho et al.'s ``sigma_t^2 =
    beta_t``: the forward step's variance) and ``lower = V`` (``beta-tilde``, the posterior's), the latter's 0 on a
    step to the data replaced by the previous step's (improved-diffusion's ``posterior_log_variance_clipped``; with
    one step, by ``G^2``) so that its log is finite."""
    upper, lower = [], []
    for i in range(grid.steps):
        upper.append(grid.transition(i)[1])
        lower.append(grid.posterior(i)[2])
    for i in range(grid.steps):
        if lower[i] <= 0.0:
            lower[i] = lower[i - 1] if i > 0 else upper[i]
    return upper, lower


def reverse_mean(model, x: torch.Tensor, pred, A: float, B: float, clip_x0: bool = False) -> torch.Tensor:
    """The reverse kernel's mean ``A x + B x_theta`` (the posterior mean at the predicted ``x_0``, Ho et al. 2020,
    eq. 7): with ``clip_x0`` at ``x_theta`` clamped to ``[-1, 1]``, else the parametrization's own well-conditioned
    form (:meth:`~diffusionlab.parametrization.Parametrization.posterior_mean`)."""
    if clip_x0:
        return A * x + B * pred.x0.clamp(-1.0, 1.0)
    return model.parametrization.posterior_mean(x, pred, A, B)


@register_sampler(
    "ddpm", "ancestral sampling x' ~ N(A x + B x_theta, v C) on any grid", "Ho et al. 2020, Algorithm 2",
    options={"variance": one_of(*VARIANCES, doc="reverse variance: beta (G^2), beta_tilde (V) or learned"),
             "clip_x0": flag("clamp x_theta to [-1, 1] before the posterior mean")},
    stochastic=True, default_grid="uniform", default_steps=None,
)
def ddpm(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False, variance: str = "beta",
         clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on any grid.

    ``x_{p_{i+1}} = mu_theta + sqrt(v) L z`` with ``mu_theta = A x + B x_theta(x, p_i)`` (the posterior mean at the
    predicted ``x_0``), ``v = G^2`` (``variance="beta"``: ``beta_t`` on DDPM's own steps), ``V`` (``"beta_tilde"``)
    or Nichol & Dhariwal's interpolation between their logs (``"learned"``, whitened-diagonal: ``L (sqrt(v) * z)``).
    On a chain's sub-sequence this is improved-diffusion's respaced sampler; on NCSN's chain with ``beta_tilde`` it
    is the VE posterior sampler. ``clip_x0`` clamps ``x_theta`` to ``[-1, 1]``. The last step adds no noise.
    """
    if variance not in VARIANCES:
        raise DiffusionLabError(f"unknown ddpm variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    if variance == "learned" and not model.learn_variance:
        raise DiffusionLabError("ddpm variance 'learned' needs a model with learn_variance=True")
    grid = as_grid(model.process, grid)
    model.process.cov.check(x)
    noise = noise_source(model, noise)
    upper, lower = ancestral_variances(grid)
    n = grid.steps
    for i in progress_display(range(n), desc="ddpm", enabled=progress):
        A, B, V = grid.posterior(i)
        pred = model.predict(x, grid.time(i, x))
        mean = reverse_mean(model, x, pred, A, B, clip_x0)
        if i == n - 1:
            x = mean
        elif variance == "learned":
            log_var = learned_log_variance(pred.v_var, math.log(upper[i]), math.log(lower[i]))
            x = mean + noise.color(torch.exp(0.5 * log_var) * noise.white(x))
        else:
            x = mean + math.sqrt(upper[i] if variance == "beta" else lower[i]) * noise(x)
    return x


def ddim_prediction(model, x: torch.Tensor, grid, i: int, clip_x0: bool = False):
    """``(x_theta, eps_theta)`` at point ``i`` of ``grid`` (one evaluation); ``clip_x0`` clamps ``x_theta`` to
    ``[-1, 1]`` and recomputes ``eps_theta = (x - s x_theta) / sigma`` to match it."""
    pred = model.predict(x, grid.time(i, x))
    if not clip_x0:
        return pred.x0, pred.eps
    x0 = pred.x0.clamp(-1.0, 1.0)
    return x0, (x - grid.s[i] * x0) / grid.sigma[i]


def ddim_update(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, s_next: float, sigma_next: float,
                c2: float = 0.0, noise=None) -> torch.Tensor:
    """One DDIM step (Song, Meng & Ermon 2021, eq. 12): ``s' x0 + sqrt(sigma'^2 - c^2) eps + c L z``."""
    out = s_next * x0 + math.sqrt(max(sigma_next**2 - c2, 0.0)) * eps
    return out + math.sqrt(c2) * noise(x) if c2 > 0 else out


@register_sampler(
    "ddim", "x' = s' x_theta + sqrt(sigma'^2 - c^2) eps_theta + c L z, c^2 = eta^2 V", "Song, Meng & Ermon 2021, eq. 12",
    options={"eta": number("0 deterministic, 1 ancestral with beta_tilde", 0.0, 1.0),
             "clip_x0": flag("clamp x_theta to [-1, 1] (eps recomputed)")},
    stochastic=lambda o: o["eta"] > 0, default_grid="uniform", default_steps=50,
)
def ddim(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False, eta: float = 0.0,
         clip_x0: bool = False) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) on any grid of any process: with ``c^2 = eta^2 V`` (the step's
    posterior variance)::

        x_{p_{i+1}} = s' x_theta + sqrt(sigma'^2 - c^2) eps_theta + c L z

    ``eta = 0`` is deterministic (the probability-flow ODE's first-order solver: equal to DPM-Solver++(1) and to
    EDM's Euler step in ``y = x / s``), ``eta = 1`` ancestral sampling with ``beta-tilde``. The formula keeps every
    marginal ``N(s x_0, sigma^2 C)``, so it holds for VP, VE, sub-VP, chains and SDEs. ``clip_x0`` clamps
    ``x_theta`` and recomputes ``eps_theta = (x - s x_theta) / sigma``.
    """
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"ddim eta must be a number in [0, 1], got {eta!r}") from None
    if not 0.0 <= eta <= 1.0:
        raise DiffusionLabError(f"ddim eta must lie in [0, 1], got {eta!r}")
    grid = as_grid(model.process, grid)
    model.process.cov.check(x)
    noise = noise_source(model, noise) if eta > 0 else None
    for i in progress_display(range(grid.steps), desc="ddim", enabled=progress):
        x0, eps = ddim_prediction(model, x, grid, i, clip_x0)
        c2 = eta**2 * grid.posterior(i)[2]
        x = ddim_update(x, x0, eps, grid.s[i + 1], grid.sigma[i + 1], c2, noise)
    return x


@register_sampler(
    "ve-reverse", "x' ~ N(x + g^2 C s_theta(x), g^2 C), g^2 = sigma^2 - sigma'^2", "Song & Ermon 2019, sec. 4.3",
    options={"denoise_last": flag("no noise on the last step (then Tweedie's E[x_0 | x])")},
    requires=("unit_scale",), stochastic=True, default_grid="uniform", default_steps=None,
)
def ve_reverse(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False,
               denoise_last: bool = True) -> torch.Tensor:
    """The first-order reverse kernel of a variance-exploding process (``s = 1``)::

        x' ~ N(x + g^2 C grad log p(x), g^2 C),   g^2 = sigma_{p_i}^2 - sigma_{p_{i+1}}^2

    (``C grad log p`` = ``model.c_score``): the Taylor approximation of the reverse transition, exact as the levels
    get dense (Song et al. 2021's reverse-diffusion predictor for the VE-SDE). With ``denoise_last`` the step to the
    data adds no noise: ``x_0 = x_1 + sigma_1^2 C s(x_1)`` is then Tweedie's ``E[x_0 | x_1]``.
    """
    require_unit_scale(model.process, "ve-reverse")
    grid = as_grid(model.process, grid)
    model.process.cov.check(x)
    noise = noise_source(model, noise)
    n = grid.steps
    for i in progress_display(range(n), desc="ve-reverse", enabled=progress):
        g2 = grid.transition(i)[1]
        x_new = x + g2 * model.predict(x, grid.time(i, x)).c_score
        if not (denoise_last and i == n - 1):
            x_new = x_new + math.sqrt(g2) * noise(x)
        x = x_new
    return x
