"""Discrete-time samplers: plain functions ``fn(model, x, timesteps=None, noise=None, progress=False, **options)``.

``x`` is the starting point (``x_T`` from ``process.prior_sample``), ``timesteps`` the grid (None: every step
``T..1``; an int: that many uniform steps; or a strictly decreasing sequence, see
:func:`~diffusionlab.samplers.timesteps.check_timesteps`), ``noise`` a
:class:`~diffusionlab.samplers.noise.NoiseSource` (None: ``N(0, C)`` of the model's process, seeded by the
``generator`` option). Everything is computed in ``x``'s dtype and device (float64 works); per-step
coefficients are float64 host numbers, so the loop has no host-device synchronisation. The model counts its
own evaluations (``model.nfe``).

- :func:`ddpm` -- ancestral sampling, Ho et al. 2020 Algorithm 2, on any sub-sequence (respaced chain);
- :func:`ddim` -- Song et al. 2021 eq. 12 with ``eta`` in ``[0, 1]``;
- :func:`ve_reverse` -- seed 000's VE reverse kernel ``N(x_t + g^2(t) C s(x_t), g^2(t) C)`` (ERRATA 10);
- :func:`ve_ancestral` -- ``x_{t-1} ~ q(x_{t-1} | x_t, x_theta)`` on a VE chain;
- :func:`annealed_langevin` -- Song & Ermon 2019 Algorithm 1 (seed 004, ERRATA 11).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import learned_log_variance
from diffusionlab.processes.discrete import GaussianChain, VEChain
from diffusionlab.samplers.noise import NoiseSource
from diffusionlab.samplers.timesteps import check_timesteps, respace

VARIANCES = ("beta", "beta_tilde", "learned")


def _chain(model, what: str, kind=GaussianChain):
    process = model.process
    if not isinstance(process, kind):
        raise DiffusionLabError(f"sampler {what!r} needs a {kind.__name__}, got {process!r}")
    return process


def _noise(model, noise, generator):
    return noise if noise is not None else NoiseSource(model.process.cov, generator)


def _t(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _steps(n: int, progress: bool, desc: str):
    return tqdm(range(n), disable=not progress, desc=desc, leave=False)


def _ancestral(model, x, timesteps, noise, progress, variance, clip_x0, generator, name, kind=GaussianChain,
               spacing="uniform"):
    """``x_{t'} ~ N(A' x_t + B' x_theta, v C)`` over the respaced chain; no noise on the step to the data."""
    chain = _chain(model, name, kind)
    if variance not in VARIANCES:
        raise DiffusionLabError(f"unknown ddpm variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    if variance == "learned" and not model.learn_variance:
        raise DiffusionLabError("ddpm variance 'learned' needs a model with learn_variance=True")
    chain.cov.check(x)
    ts = check_timesteps(timesteps, chain.T, spacing)
    r = respace(chain, ts)
    noise = _noise(model, noise, generator)
    t_l, A, B, s, sig = r.t.tolist(), r.A.tolist(), r.B.tolist(), r.s.tolist(), r.sigma.tolist()
    up, lo, pv = r.upper.tolist(), r.lower.tolist(), r.post_var.tolist()
    use_x0 = clip_x0 or model.prediction == "x0"
    for k in _steps(len(t_l), progress, name):
        pred = model.predict(x, _t(x, t_l[k]))
        if use_x0:
            x0 = pred.x0.clamp(-1.0, 1.0) if clip_x0 else pred.x0
            mean = A[k] * x + B[k] * x0
        else:  # the same mean through eps, well conditioned where s_t is small: (A + B/s) x - (B sigma / s) eps
            mean = (A[k] + B[k] / s[k]) * x - (B[k] * sig[k] / s[k]) * pred.eps
        if k == len(t_l) - 1:
            x = mean
        elif variance == "learned":
            log_var = learned_log_variance(pred.v_var, math.log(up[k]), math.log(lo[k]))
            x = mean + noise.color(torch.exp(0.5 * log_var) * noise.white(x))
        else:
            var = up[k] if variance == "beta" else pv[k]
            x = mean + math.sqrt(var) * noise(x)
    return x


def ddpm(model, x, timesteps=None, noise=None, progress=False, variance="beta", clip_x0=False, generator=None,
         spacing="uniform"):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on a discrete chain.

    ``x_{t-1} = mu_theta(x_t, t) + sqrt(v_t) L z`` with ``mu_theta = A_t x_t + B_t x_theta(x_t, t)`` (the posterior
    mean at the predicted ``x_0``), ``v_t = beta_t`` (``variance="beta"``), ``beta-tilde_t`` (``"beta_tilde"``) or
    Nichol & Dhariwal's interpolation (``"learned"``, whitened-diagonal: ``L (sqrt(v) * z)``). On a sub-sequence
    the chain is respaced (:func:`~diffusionlab.samplers.timesteps.respace`: betas of the sub-sequence from
    ``alpha-bar``, as improved-diffusion; an int ``timesteps`` is spaced as ``spacing``, see
    :func:`~diffusionlab.samplers.timesteps.make_timesteps`). ``clip_x0`` clamps ``x_theta`` to ``[-1, 1]`` before
    the posterior mean. The last step (to the data) adds no noise.
    """
    return _ancestral(model, x, timesteps, noise, progress, variance, clip_x0, generator, "ddpm", spacing=spacing)


def ve_ancestral(model, x, timesteps=None, noise=None, progress=False, clip_x0=False, generator=None):
    """Ancestral sampling on a VE chain: ``x_{t-1} ~ q(x_{t-1} | x_t, x_theta(x_t, t))`` =
    ``N(A_t x_t + B_t x_theta, beta-tilde_t C)`` with ``A_t = sigma_{t-1}^2 / sigma_t^2``, ``B_t = 1 - A_t``,
    ``beta-tilde_t = sigma_{t-1}^2 g^2(t) / sigma_t^2`` (seed 000, task 1); no noise on the last step."""
    return _ancestral(model, x, timesteps, noise, progress, "beta_tilde", clip_x0, generator, "ve_ancestral", VEChain)


def ddim(model, x, timesteps=None, noise=None, progress=False, eta=0.0, clip_x0=False, generator=None,
         spacing="uniform"):
    """DDIM (Song et al. 2021, eq. 12) on any sub-sequence: with ``c^2 = eta^2 beta-tilde'_t`` (respaced)::

        x_{t'} = s_{t'} x_theta + sqrt(sigma_{t'}^2 - c^2) eps_theta + c L z

    (VP: ``s = sqrt(abar)``, ``sigma^2 = 1 - abar``, exactly eq. 12). ``eta = 0`` is deterministic, ``eta = 1`` is
    ancestral sampling with ``beta-tilde``. The formula keeps every marginal ``N(s x_0, sigma^2 C)``, so it holds
    for any chain (VE included). With correlated C the injected noise is ``L z``. ``clip_x0`` clamps ``x_theta``
    and recomputes ``eps_theta = (x_t - s x_theta) / sigma``. An int ``timesteps`` is spaced as ``spacing``
    (``uniform``, ``quadratic``, ``trailing``: :func:`~diffusionlab.samplers.timesteps.make_timesteps`).
    """
    chain = _chain(model, "ddim")
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"ddim eta must be a number in [0, 1], got {eta!r}") from None
    if not 0.0 <= eta <= 1.0:
        raise DiffusionLabError(f"ddim eta must lie in [0, 1], got {eta!r}")
    chain.cov.check(x)
    ts = check_timesteps(timesteps, chain.T, spacing)
    r = respace(chain, ts)
    noise = _noise(model, noise, generator)
    t_l, s, sig, s_p, sig_p = r.t.tolist(), r.s.tolist(), r.sigma.tolist(), r.s_prev.tolist(), r.sigma_prev.tolist()
    c2 = (eta**2 * r.post_var).tolist()
    for k in _steps(len(t_l), progress, "ddim"):
        pred = model.predict(x, _t(x, t_l[k]))
        x0, eps = pred.x0, pred.eps
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - s[k] * x0) / sig[k]
        x_new = s_p[k] * x0 + math.sqrt(max(sig_p[k] ** 2 - c2[k], 0.0)) * eps
        if c2[k] > 0:
            x_new = x_new + math.sqrt(c2[k]) * noise(x)
        x = x_new
    return x


def ve_reverse(model, x, timesteps=None, noise=None, progress=False, denoise_last=True, generator=None):
    """Seed 000 task 2's reverse kernel on a VE chain (ERRATA 10; C from the thesis)::

        x_{t-1} ~ N(x_t + g^2(t) C grad log p_t(x_t), g^2(t) C),   g^2(t) = sigma_t^2 - sigma_{t-1}^2

    (``C grad log p_t`` = ``model.c_score``; on a sub-sequence ``g^2`` is the respaced jump). It is the
    first-order (Taylor) approximation of the reverse transition, exact as the levels get dense. With
    ``denoise_last`` the step to the data adds no noise: ``x_0 = x_1 + sigma_1^2 C s(x_1)`` is then Tweedie's
    ``E[x_0 | x_1]``.
    """
    chain = _chain(model, "ve_reverse", VEChain)
    chain.cov.check(x)
    ts = check_timesteps(timesteps, chain.T)
    r = respace(chain, ts)
    noise = _noise(model, noise, generator)
    t_l, g2 = r.t.tolist(), r.b2.tolist()
    for k in _steps(len(t_l), progress, "ve_reverse"):
        pred = model.predict(x, _t(x, t_l[k]))
        x_new = x + g2[k] * pred.c_score
        if not (denoise_last and k == len(t_l) - 1):
            x_new = x_new + math.sqrt(g2[k]) * noise(x)
        x = x_new
    return x


DEFAULT_STEP_LR = 2e-5
DEFAULT_STEPS_EACH = 100


def annealed_langevin(model, x, timesteps=None, noise=None, progress=False, n_steps_each=DEFAULT_STEPS_EACH,
                      step_lr=DEFAULT_STEP_LR, denoise=True, generator=None):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; seed 004) with noise covariance C.

    For each level ``sigma_i`` from the largest to the smallest of ``timesteps`` (levels of a VE chain),
    ``n_steps_each`` steps of::

        x <- x + (eta_i / 2) C s_theta(x, sigma_i) + sqrt(eta_i) L z,   eta_i = step_lr sigma_i^2 / sigma_min^2

    (ERRATA 11; ``sigma_min`` the smallest level of the grid; C on the drift and ``L z`` as noise keep
    ``p_sigma`` stationary, as in the reverse SDE). The defaults ``step_lr = 2e-5`` and ``n_steps_each = 100`` are
    Song & Ermon's CIFAR-10 settings (levels 1 .. 0.01); tune ``step_lr`` with the levels (it is the step at
    ``sigma_min``, relative to ``sigma_min^2``: ``step_lr / sigma_min^2`` is the step per unit variance). With
    ``denoise`` a final step ``x + sigma_min^2 C s_theta(x, sigma_min)`` (Tweedie's denoiser; Jolicoeur-Martineau
    et al. 2021) removes the last level's noise.
    """
    chain = _chain(model, "annealed_langevin", VEChain)
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise DiffusionLabError(f"n_steps_each must be an integer >= 1, got {n_steps_each!r}")
    try:
        step_lr = float(step_lr)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"step_lr must be a positive number, got {step_lr!r}") from None
    if not (step_lr > 0 and math.isfinite(step_lr)):
        raise DiffusionLabError(f"step_lr must be a positive number, got {step_lr!r}")
    chain.cov.check(x)
    ts = check_timesteps(timesteps, chain.T)
    noise = _noise(model, noise, generator)
    sig = chain.sigma[ts]
    sig_min2 = float(sig.min()) ** 2
    etas = (step_lr * sig**2 / sig_min2).tolist()
    t_l = ts.tolist()
    bar = tqdm(total=len(t_l) * n_steps_each, disable=not progress, desc="annealed_langevin", leave=False)
    for t, eta in zip(t_l, etas):
        tb = _t(x, t)
        for _ in range(n_steps_each):
            x = x + (0.5 * eta) * model.predict(x, tb).c_score + math.sqrt(eta) * noise(x)
            bar.update(1)
    bar.close()
    if denoise:
        x = x + sig_min2 * model.predict(x, _t(x, t_l[-1])).c_score
    return x
