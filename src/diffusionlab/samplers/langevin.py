"""Langevin dynamics with the preconditioner C: annealed Langevin (NCSN) and predictor-corrector sampling.

``x <- x + e C s_theta(x) + sqrt(2 e) L z`` leaves ``p_t`` invariant for any constant SPD C (preconditioned Langevin
dynamics; for ``C = I`` the papers' step): the drift uses the C-score ``model.c_score`` and the noise ``L z``, which
is why a model trained with correlated noise is sampled with correlated Langevin noise.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import as_grid
from diffusionlab.progress import progress as progress_display
from diffusionlab.samplers.catalogue import flag, integer, number, one_of, register_sampler
from diffusionlab.samplers.noise import noise_source, require_unit_scale
from diffusionlab.samplers.sde import DENOISE, check_denoise, final_denoise
from diffusionlab.utils import bcast

DEFAULT_STEP_LR = 2e-5
DEFAULT_STEPS_EACH = 100
STEP_CONVENTIONS = ("paper", "reference")


def langevin_levels(grid) -> list[int]:
    """Indices of the grid points annealed Langevin visits: every point with ``sigma > 0`` (on a chain all but the
    final data point; on an SDE grid all of them)."""
    return [i for i, v in enumerate(grid.sigma) if v > 0.0]


def _langevin_nfe(grid, opts) -> int:
    return len(langevin_levels(grid)) * opts["n_steps_each"] + (1 if opts["denoise"] else 0)


def _langevin_budget(budget: int, process, opts) -> int:
    levels = (budget - (1 if opts["denoise"] else 0)) // opts["n_steps_each"]
    steps = levels if process.discrete else levels - 1
    if steps < 1:
        raise DiffusionLabError(
            f"a budget of {budget} evaluations is too small for annealed Langevin with n_steps_each = "
            f"{opts['n_steps_each']} (one level per n_steps_each evaluations, plus the denoising step)")
    return steps


@register_sampler(
    "annealed-langevin", "n_steps_each Langevin steps at each noise level, largest to smallest, then Tweedie",
    "Song & Ermon 2019, Algorithm 1",
    options={"n_steps_each": integer("Langevin steps per level", 1),
             "step_lr": number("the step at the smallest level, relative to sigma_min^2", 0.0),
             "denoise": flag("a final Tweedie step x + sigma_min^2 C s_theta"),
             "step_convention": one_of(*STEP_CONVENTIONS,
                                       doc="paper: Algorithm 1's alpha_i = step_lr sigma_i^2 / sigma_L^2; reference: "
                                           "the released NCSN code's step, twice that for the same step_lr")},
    requires=("unit_scale",), stochastic=True, default_grid="uniform", default_steps=None,
    nfe=_langevin_nfe, steps_for_budget=_langevin_budget,
)
def annealed_langevin(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False,
                      n_steps_each: int = DEFAULT_STEPS_EACH, step_lr: float = DEFAULT_STEP_LR, denoise: bool = True,
                      step_convention: str = "paper") -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with noise covariance C.

    For each level ``sigma_i`` of the grid (:func:`langevin_levels`), from the largest to the smallest,
    ``n_steps_each`` steps of::

        x <- x + (alpha_i / 2) C s_theta(x, sigma_i) + sqrt(alpha_i) L z,   alpha_i = step_lr sigma_i^2 / sigma_min^2

    (``sigma_min`` the smallest level of the grid; C on the drift and ``L z`` as noise keep ``p_sigma`` stationary, as
    in the reverse SDE). ``step_convention="reference"`` takes the released NCSN code's step instead (its
    ``step_size = step_lr sigma_i^2 / sigma_L^2`` enters as ``x + step_size s + sqrt(2 step_size) z``, i.e.
    ``alpha_i`` twice the paper's for the same ``step_lr``). The defaults ``step_lr = 2e-5`` and ``n_steps_each =
    100`` are Song & Ermon's CIFAR-10 settings (levels 1 .. 0.01); ``step_lr / sigma_min^2`` is the step per unit
    variance. With ``denoise`` a final step ``x + sigma_min^2 C s_theta(x, sigma_min)`` (Tweedie's denoiser;
    Jolicoeur-Martineau et al. 2021) removes the last level's noise.
    """
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise DiffusionLabError(f"n_steps_each must be an integer >= 1, got {n_steps_each!r}")
    try:
        step_lr = float(step_lr)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"step_lr must be a positive number, got {step_lr!r}") from None
    if not (step_lr > 0 and math.isfinite(step_lr)):
        raise DiffusionLabError(f"step_lr must be a positive number, got {step_lr!r}")
    if step_convention not in STEP_CONVENTIONS:
        raise DiffusionLabError(f"unknown step_convention {step_convention!r}; allowed: {', '.join(STEP_CONVENTIONS)}")
    require_unit_scale(model.process, "annealed-langevin")
    grid = as_grid(model.process, grid)
    model.process.cov.check(x)
    noise = noise_source(model, noise)
    levels = langevin_levels(grid)
    sig = [grid.sigma[i] for i in levels]
    sig_min2 = min(sig) ** 2
    factor = 2.0 if step_convention == "reference" else 1.0
    alphas = [factor * step_lr * v**2 / sig_min2 for v in sig]
    bar = progress_display(total=len(levels) * n_steps_each, desc="annealed-langevin", enabled=progress)
    for i, alpha in zip(levels, alphas):
        t = grid.time(i, x)
        for _ in range(n_steps_each):
            x = x + (0.5 * alpha) * model.predict(x, t).c_score + math.sqrt(alpha) * noise(x)
            bar.update(1)
    bar.close()
    if denoise:
        x = x + sig_min2 * model.predict(x, grid.time(levels[-1], x)).c_score
    return x


def langevin_corrector_step(model, x: torch.Tensor, t, noise, snr: float = 0.16, alpha=1.0):
    """One Langevin corrector step at time ``t`` with preconditioner C (Song et al. 2021, Algorithms 4-5).

    ``x <- x + e C s_theta + sqrt(2 e) L z``; step size by the signal-to-noise rule ``e = 2 alpha (snr ||z|| /
    ||s||)^2`` with both norms in C's metric, so that ``snr`` is the ratio of the drift's to the noise's length in
    whitened coordinates: ``||s|| = ||C s||_{C^{-1}} = sqrt(s^T C s)`` and ``||z|| = ||L z||_{C^{-1}}``. As in the
    reference implementation (score_sde ``LangevinCorrector``) the two norms are batch means of per-sample norms: a
    per-sample step ``~ ||z_b||^2 / ||s_b||^2`` would correlate the step with its own noise and with the state,
    which biases the stationary law in low dimension. Returns ``(x, x_mean)``.
    """
    cov = model.process.cov
    g = model.c_score(x, t)
    z = noise(x)
    g_norm = cov.mahalanobis(g).sqrt().mean()
    z_norm = cov.mahalanobis(z).sqrt().mean()
    step = 2.0 * alpha * (snr * z_norm / g_norm) ** 2
    x_mean = x + step * g
    return x_mean + (2.0 * step).sqrt() * z, x_mean


def _pc_nfe(grid, opts) -> int:
    return (1 + opts["n_corrector"]) * grid.steps + (1 if opts["denoise"] == "tweedie" else 0)


def _pc_budget(budget: int, process, opts) -> int:
    per = 1 + opts["n_corrector"]
    if budget < per:
        raise DiffusionLabError(f"pc needs a budget of at least {per} evaluations (a predictor and "
                                f"{opts['n_corrector']} corrector evaluations per step), got {budget}")
    return budget // per


@register_sampler(
    "pc", "reverse-diffusion predictor and C-preconditioned Langevin corrector",
    "Song et al. 2021, Algorithms 1-3",
    options={"snr": number("corrector signal-to-noise ratio", 0.0), "n_corrector": integer("corrector steps", 0),
             "denoise": one_of(*DENOISE, doc="True: last predictor step without noise; 'tweedie': E[x_0 | x]"),
             "discretization": one_of("exact", "euler", doc="predictor: the exact transition, or Euler-Maruyama")},
    requires=("continuous",), stochastic=True, default_grid="uniform", default_steps=None,
    nfe=_pc_nfe, steps_for_budget=_pc_budget,
)
def reverse_diffusion_pc(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False, snr: float = 0.16,
                         n_corrector: int = 1, denoise=True, discretization: str = "exact") -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1; Alg. 2 for VE, Alg. 3 for VP), with C.

    At each grid time ``t_i`` (in the reference implementation's order, score_sde ``pc_sampler``): ``n_corrector``
    Langevin steps (:func:`langevin_corrector_step`, ``alpha_i = (s_{t_i} / s_{t_{i+1}})^2``: ``1 - beta_i`` for
    VP / sub-VP, 1 for VE), then the reverse-diffusion predictor to ``t_{i+1}``. The predictor inverts the forward
    step ``x_t = a x_{t'} + G L z`` (the paper's Appendix E, reverse diffusion: ``x_i = x_{i+1} - f_{i+1}(x_{i+1}) +
    G G^T s_theta + G z``, here with ``f(x) = (a - 1) x`` and ``G -> G L``)::

        x <- (2 - a) x + G^2 C s_theta(x, t_i) + G L z

    ``discretization="exact"`` uses the exact transition of the SDE between grid times (VP's ``2 - sqrt(1 -
    beta_i)`` and ``beta_i``, VE's ``sigma_i^2 - sigma_{i-1}^2`` of Algorithms 2-3); ``"euler"`` uses ``a = 1 +
    f(t) dt``, ``G^2 = g(t)^2 dt`` (score_sde's default for other SDEs), which makes the predictor Euler-Maruyama.
    ``denoise`` as in :func:`~diffusionlab.samplers.sde.euler_maruyama`. ``(1 + n_corrector)`` evaluations per step.
    """
    denoise = check_denoise(denoise)
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
    process = model.process
    process.require_continuous("pc (predictor-corrector on the reverse SDE)")
    grid = as_grid(process, grid)
    process.cov.check(x)
    noise = noise_source(model, noise)
    ts = grid.t.to(x.device)
    a_exact, g2_exact = process.transition(ts[:-1], ts[1:])
    if discretization == "exact":
        a, g2 = a_exact, g2_exact
    else:
        dts = ts[:-1] - ts[1:]
        a, g2 = 1.0 + process.drift_coef(ts[:-1]) * dts, process.diffusion_sq(ts[:-1]) * dts
    alpha = a_exact**2
    n = grid.steps

    def scalar(v):
        return bcast(v.to(dtype=x.dtype), x)

    for i in progress_display(range(n), desc="pc", enabled=progress):
        t = ts[i]
        for _ in range(n_corrector):
            x, _ = langevin_corrector_step(model, x, t, noise, snr, scalar(alpha[i]))
        x_mean = scalar(2.0 - a[i]) * x + scalar(g2[i]) * model.c_score(x, t)
        if i == n - 1 and denoise is True:
            x = x_mean
        else:
            x = x_mean + scalar(g2[i].sqrt()) * noise(x)
    return final_denoise(model, x, ts[-1], denoise)
