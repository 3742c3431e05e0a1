"""DDPM's variational bound in nats (Ho et al. 2020, eq. 5, with frame noise C), and the hybrid loss.

The negative ELBO of one sample is ``L_T + sum_{t=2}^T L_{t-1} + L_0`` (the prior term conditions on ``x_0``, and
the decoder term depends on theta and is kept)::

    L_T     = KL(q(x_T | x_0) || N(0, prior_std^2 C))                         (process.prior_kl)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),   x_t ~ q(x_t | x_0)
    L_0     = -log p_theta(x_0 | x_1)

with ``q(x_{t-1} | x_t, x_0) = N(A_t x_t + B_t x_0, beta-tilde_t C)`` and
``p_theta = N(A_t x_t + B_t x_theta(x_t, t), Sigma_theta)``, so the means differ by ``B_t (x_theta - x_0)``.
Reverse covariance ``variance``: ``"beta"`` (``b_t^2 C``: ``beta_t C`` on VP), ``"beta_tilde"``
(``beta-tilde_t C``) -- both through :func:`~diffusionlab.gaussian.structured_kl` -- or ``"learned"``
(``L diag(v) L^T``, Nichol & Dhariwal's interpolation, diagonal in whitened coordinates; the KL is then
elementwise after ``cov.whiten``). Variances at ``t = 1`` follow
:func:`~diffusionlab.parametrization.reverse_variances` (``beta-tilde_1 = 0`` clipped to ``beta-tilde_2``).

Decoders ``p_theta(x_0 | x_1)``, mean ``x_theta(x_1, 1)`` (``A_1 = 0``, ``B_1 = 1``) and the reverse variance at
``t = 1``:

- ``"gaussian"`` -- continuous ``log N(x_0; x_theta, v_1 C)`` for non-grid data (a density, any C);
- ``"discretized"`` -- Ho et al. 2020's discretized Gaussian for 8-bit data scaled to ``[-1, 1]``: each entry's
  probability is the Gaussian mass of its bin ``[x - 1/255, x + 1/255]``, the edge bins extended to
  ``-inf``/``+inf``. Defined for independent entries only: a correlated C raises.
"""

from __future__ import annotations

import weakref

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import LOG_2PI, structured_kl, structured_log_prob
from diffusionlab.objectives.common import label_kwargs, noisy_inputs, require_chain
from diffusionlab.parametrization import (
    Prediction,
    batch_t,
    fixed_large_variance,
    learned_log_variance,
    reverse_variances,
)
from diffusionlab.utils import per_sample_dim, sum_except_batch

#: reverse variances: ``beta`` (``b_t^2`` at every step, ``beta_1`` at ``t = 1``), ``fixed_large`` (the same but
#: ``beta-tilde_2`` at ``t = 1``: Ho et al.'s code and improved-diffusion's FIXED_LARGE, to reproduce their figures),
#: ``beta_tilde`` (the posterior's, clipped at ``t = 1``), ``learned`` (Nichol & Dhariwal's interpolation)
VARIANCES = ("beta", "fixed_large", "beta_tilde", "learned")
DECODERS = ("gaussian", "discretized")


def _check_choice(what: str, value, allowed) -> str:
    if value not in allowed:
        raise DiffusionLabError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def resolve_variance(variance: str | None, model) -> str:
    """``None`` means ``"learned"`` for a learned-variance model, ``"beta"`` otherwise."""
    if variance is None:
        return "learned" if model.learn_variance else "beta"
    _check_choice("reverse variance", variance, VARIANCES)
    if variance == "learned" and not model.learn_variance:
        raise DiffusionLabError("variance 'learned' needs a model with learn_variance=True")
    return variance


_VARIANCE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _variance_arrays(chain, device):
    """Float64 ``(log upper, log lower, lower, log fixed_large)`` arrays ``(T + 1,)`` of the chain on ``device``
    (cached per chain and device, so a training step copies nothing from the host)."""
    per_chain = _VARIANCE_CACHE.setdefault(chain, {})
    key = torch.device(device)
    if key not in per_chain:
        upper, lower = reverse_variances(chain.b**2, chain.post_var)
        upper[0] = lower[0]  # index 0 is never used; keep its log finite
        large = fixed_large_variance(chain.b**2, chain.post_var)
        per_chain[key] = tuple(a.to(key) for a in (upper.log(), lower.log(), lower, large.log()))
    return per_chain[key]


def _gather(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return arr[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def reverse_log_variance(chain, t: torch.Tensor, x: torch.Tensor, variance: str, v_var=None) -> torch.Tensor:
    """``log`` of the reverse variance at steps ``t`` (``(B,)``): per sample ``(B, 1, ...)`` for the fixed
    choices, elementwise (shape of ``x``) for ``"learned"``."""
    log_up, log_lo, _, log_large = _variance_arrays(chain, x.device)
    if variance == "beta":
        return _gather(log_up, t, x)
    if variance == "fixed_large":
        return _gather(log_large, t, x)
    if variance == "beta_tilde":
        return _gather(log_lo, t, x)
    if v_var is None:
        raise DiffusionLabError("variance 'learned' needs the model's v_var output (learn_variance=True)")
    return learned_log_variance(v_var, _gather(log_up, t, x), _gather(log_lo, t, x))


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of 8-bit data in ``[-1, 1]`` (256 bins, width ``2/255``) under the
    discretized Gaussian of Ho et al. 2020: ``log [Phi((x + 1/255 - mean) / std) - Phi((x - 1/255 - mean) / std)]``
    with the lower edge at ``-inf`` for ``x = -1`` and the upper edge at ``+inf`` for ``x = 1``.

    Computed in log space so that no tail underflows: with ``l_hi = log Phi(b)``, ``l_lo = log Phi(a)`` (``log_ndtr``),
    ``log(Phi(b) - Phi(a)) = l_hi + log(-expm1(l_lo - l_hi))``, mirrored (``Phi(-a) - Phi(-b)``) for bins right of
    the mean so that the subtraction is always between the two small tail masses."""
    half = 1.0 / 255.0
    a = (x - half - mean) / std  # lower edge, standardized
    b = (x + half - mean) / std  # upper edge
    right = (a + b) > 0
    hi = torch.where(right, -a, b)  # the edge farther from the tail
    lo = torch.where(right, -b, a)
    l_hi, l_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    log_mid = l_hi + torch.log(-torch.expm1(l_lo - l_hi))
    lo_edge = torch.special.log_ndtr(b)  # x = -1: P(X <= x + 1/255)
    hi_edge = torch.special.log_ndtr(-a)  # x = +1: P(X >= x - 1/255)
    return torch.where(x < -1.0 + 1e-3, lo_edge, torch.where(x > 1.0 - 1e-3, hi_edge, log_mid))


def _kl_term(chain, diff, t, log_var_q, variance, x0) -> torch.Tensor:
    """``KL(N(mu, beta-tilde_t C) || N(mu + diff, Sigma_theta))`` per sample; ``beta-tilde_1`` clipped (the
    ``t = 1`` value is discarded by the caller but must stay finite)."""
    lower = _variance_arrays(chain, x0.device)[2]
    var_p = _gather(lower, t, x0)
    cov = chain.cov
    if variance != "learned":
        return structured_kl(torch.zeros_like(diff), var_p.reshape(-1), diff, log_var_q.exp().reshape(-1), cov)
    w = cov.whiten(diff)
    log_var_p = var_p.log()
    elementwise = log_var_q - log_var_p + torch.exp(log_var_p - log_var_q) - 1.0 + w * w * torch.exp(-log_var_q)
    return 0.5 * sum_except_batch(elementwise)


def _decoder_nll(chain, x0, err, log_var, variance, decoder) -> torch.Tensor:
    """``-log p_theta(x_0 | x_1)`` per sample, mean ``x_theta = x0 + err``."""
    cov = chain.cov
    if decoder == "discretized":
        if not cov.is_identity:
            raise DiffusionLabError(
                f"the discretized decoder needs independent entries (identity noise covariance), got {cov!r}; "
                "use decoder 'gaussian'"
            )
        std = torch.exp(0.5 * log_var)
        return -sum_except_batch(discretized_gaussian_log_prob(x0, x0 + err, std).expand_as(x0))
    if variance != "learned":
        return -structured_log_prob(x0, x0 + err, log_var.exp().reshape(-1), cov)
    w = cov.whiten(err)
    return 0.5 * (sum_except_batch(w * w * torch.exp(-log_var) + LOG_2PI + log_var) + cov.logdet_for(x0))


def vlb_from_prediction(model, pred: Prediction, x0, eps, t, variance=None, decoder="gaussian",
                        detach_mean: bool = False, clip_x0: bool = False) -> torch.Tensor:
    """The bound's term for each sample's own step: ``L_{t-1}`` for ``t >= 2``, ``L_0`` for ``t = 1`` (nats, ``(B,)``).

    ``pred`` is the model's prediction at ``x_t = s_t x0 + sigma_t eps``. ``detach_mean`` stops the gradient
    through the mean (Nichol & Dhariwal's hybrid loss trains only the variance through this term). ``clip_x0``
    clamps ``x_theta`` to ``[-1, 1]`` in every reverse mean: the bound of the model as a sampler with ``clip_x0``
    draws from it (improved-diffusion's ``calc_bpd_loop`` with ``clip_denoised=True``).

    Each branch sees only its own rows: the decoder gets the ``x_0`` error of the ``t = 1`` rows and zeros
    elsewhere, the KL that of the ``t >= 2`` rows. Selecting afterwards is not enough, since the backward pass of
    ``where`` multiplies the discarded branch's gradient by zero, and ``0 * inf = nan``: at ``t = T`` of the
    cosine schedule (``s_T = 4.9e-5``) the error reaches ``1e5``, and in float32 the discretized decoder's two bin
    edges then round to the same ``log_ndtr`` value (``log(-expm1(0)) = -inf``). Zeros keep both branches finite
    without a host synchronisation (no boolean indexing)."""
    chain = require_chain(model.process, "the variational bound")
    variance = resolve_variance(variance, model)
    _check_choice("decoder", decoder, DECODERS)
    err = model.parametrization.x0_error(pred, x0, eps)
    if clip_x0:
        err = (x0 + err).clamp(-1.0, 1.0) - x0
    if detach_mean:
        err = err.detach()
    log_var = reverse_log_variance(chain, t, x0, variance, pred.v_var)
    B = chain.at("post_B", t, x0, lo=1)
    first = (t == 1).reshape(-1, *([1] * (x0.ndim - 1)))
    zero = torch.zeros_like(err)
    kl = _kl_term(chain, B * torch.where(first, zero, err), t, log_var, variance, x0)
    dec = _decoder_nll(chain, x0, torch.where(first, err, zero), log_var, variance, decoder)
    return torch.where(t == 1, dec, kl)


def vlb_terms(model, x0: torch.Tensor, t, noise=None, generator=None, variance=None,
              decoder="gaussian", clip_x0: bool = False) -> torch.Tensor:
    """``L_{t-1}`` (``L_0``, the decoder NLL, where ``t = 1``) at steps ``t`` for ``x_t ~ q(x_t | x_0)``, one
    draw each; ``(B,)`` nats. ``t`` an int or ``(B,)``; ``noise`` fixes ``eps ~ N(0, C)``; ``clip_x0`` as in
    :func:`vlb_from_prediction`."""
    require_chain(model.process, "the variational bound")
    tb, eps, x_t, _, _ = noisy_inputs(model.process, x0, generator, batch_t(t, x0), noise)
    pred = model.predict(x_t, tb)
    return vlb_from_prediction(model, pred, x0, eps, tb, variance, decoder, clip_x0=clip_x0)


def vlb_chunk(batch: int, t_chunk: int | None = None) -> int:
    """Steps ``t`` per network call of :func:`full_vlb`: about 8192 samples per call unless ``t_chunk`` is given."""
    return max(1, 8192 // max(batch, 1)) if t_chunk is None else int(t_chunk)


@torch.no_grad()
def full_vlb(model, x0: torch.Tensor, variance=None, decoder="gaussian", generator=None, t_chunk: int | None = None,
             return_terms: bool = False, bar=None, clip_x0: bool = False):
    """The whole bound ``L_T + sum_{t=1}^T L_{t-1}`` per sample (nats, ``(B,)``; ``-ELBO >= -log p_theta(x_0)``),
    every term evaluated (one ``x_t`` draw per term), batched over ``t`` in chunks of ``t_chunk`` steps
    (default: about 8192 samples per network call, :func:`vlb_chunk`). No gradients (evaluation). ``bar`` (a
    progress display) is advanced by one per network call; ``clip_x0`` clamps ``x_theta`` in every term
    (:func:`vlb_from_prediction`).

    With ``return_terms``: ``(total, terms, prior)``, ``terms`` ``(B, T)`` with ``terms[:, t-1] = L_{t-1}``."""
    chain = require_chain(model.process, "the variational bound")
    b, T = x0.shape[0], chain.T
    chunk = vlb_chunk(b, t_chunk)
    if chunk < 1:
        raise DiffusionLabError(f"t_chunk must be >= 1, got {t_chunk!r}")
    terms = torch.empty(b, T, dtype=x0.dtype, device=x0.device)
    reps = [1] * (x0.ndim - 1)
    for t0 in range(1, T + 1, chunk):
        ts = torch.arange(t0, min(t0 + chunk, T + 1), device=x0.device)
        xs = x0.repeat(ts.numel(), *reps)
        tb = ts.repeat_interleave(b)
        terms[:, t0 - 1 : t0 - 1 + ts.numel()] = vlb_terms(model, xs, tb, generator=generator, variance=variance,
                                                           decoder=decoder, clip_x0=clip_x0).reshape(ts.numel(), b).T
        if bar is not None:
            bar.update(1)
    prior = chain.prior_kl(x0)
    total = terms.sum(1) + prior
    return (total, terms, prior) if return_terms else total


class VLBLoss:
    """Unbiased one-term estimator of the bound for training: ``T L_{t-1} + L_T``, ``t ~ U{1..T}`` (nats per
    sample, ``(B,)``; divided by D with ``per_dim``). Call ``(model, x0, generator=None, t=None, noise=None)``.

    Args:
        process: a discrete chain; its ``cov`` is C
        variance: the reverse variance: beta (b_t^2 C, Ho et al. 2020's sigma_t^2 = beta_t), fixed_large (beta but
            beta-tilde_2 at t = 1, as Ho et al.'s code), beta_tilde (the posterior's) or learned (Nichol & Dhariwal
            2021's interpolation; needs learn_variance); unset: learned for a learned-variance model, beta otherwise
        decoder: L_0 = -log p(x_0 | x_1): gaussian (a density, any C) or discretized (Ho et al. 2020's for 8-bit
            data in [-1, 1]; identity C only)
        per_dim: divide the loss by D, the entries per sample (nats per dimension; false: nats per sample)
    """

    def __init__(self, process, variance: str | None = None, decoder: str = "gaussian", per_dim: bool = False):
        require_chain(process, "the variational bound")
        if variance is not None:
            _check_choice("reverse variance", variance, VARIANCES)
        self.process = process
        self.variance = variance
        self.decoder = _check_choice("decoder", decoder, DECODERS)
        self.per_dim = bool(per_dim)

    def __call__(self, model, x0, generator=None, t=None, noise=None, labels=None) -> torch.Tensor:
        t, eps, x_t, _, _ = noisy_inputs(self.process, x0, generator, t, noise)
        pred = model.predict(x_t, t, **label_kwargs(labels))
        loss = self.process.T * vlb_from_prediction(model, pred, x0, eps, t, self.variance, self.decoder)
        loss = loss + self.process.prior_kl(x0)
        return loss / per_sample_dim(x0) if self.per_dim else loss



class HybridLoss:
    """Nichol & Dhariwal 2021: ``L_simple + lambda L_vlb`` (``lambda = 0.001``), one network evaluation.

    ``L_simple`` is the Mahalanobis loss per dimension (:mod:`~diffusionlab.objectives.simple`);
    ``L_vlb = T L_{t-1} / D`` in nats per dimension at the same ``t`` and noise, with the learned variance and a
    stop-gradient on the mean, so the vlb part trains only the variance (improved-diffusion's ``vb`` term;
    it measures bits, which rescales lambda by ``1 / ln 2``). Needs ``model.learn_variance``.

    Args:
        process: a discrete chain; its ``cov`` is C
        lam: the weight lambda >= 0 of the vlb term (improved-diffusion's lambda = 0.001; config key lam or lambda)
        decoder: L_0 = -log p(x_0 | x_1) of the vlb term: gaussian (a density, any C) or discretized (Ho et al.
            2020's for 8-bit data in [-1, 1]; identity C only)
    """

    def __init__(self, process, lam: float = 0.001, decoder: str = "gaussian"):
        require_chain(process, "the hybrid loss")
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise DiffusionLabError(f"hybrid lambda must be a number >= 0, got {lam!r}") from None
        if not lam >= 0:
            raise DiffusionLabError(f"hybrid lambda must be a number >= 0, got {lam!r}")
        self.process = process
        self.lam = lam
        self.decoder = _check_choice("decoder", decoder, DECODERS)

    def __call__(self, model, x0, generator=None, t=None, noise=None, labels=None) -> torch.Tensor:
        if not model.learn_variance:
            raise DiffusionLabError("the hybrid objective needs a model with learn_variance=True")
        t, eps, x_t, _, _ = noisy_inputs(self.process, x0, generator, t, noise)
        pred = model.predict(x_t, t, **label_kwargs(labels))
        d = per_sample_dim(x0)
        simple = self.process.cov.mahalanobis(model.target(x0, eps, t) - pred.out) / d
        vlb = vlb_from_prediction(model, pred, x0, eps, t, "learned", self.decoder, detach_mean=True)
        return simple + self.lam * self.process.T * vlb / d

