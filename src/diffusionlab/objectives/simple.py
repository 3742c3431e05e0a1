"""``L_simple`` (Ho et al. 2020) with a noise covariance C, and its weightings.

For the model's prediction target ``d`` (eps, x0, v, or ``-eps`` for the score parametrization; see
:mod:`diffusionlab.parametrization`) the per-sample loss is the Mahalanobis norm per dimension::

    loss = w_t (d - d_theta)^T C^{-1} (d - d_theta) / D            (D = entries per sample)

which for ``C = I`` is the plain mean squared error (the identity's ``mahalanobis`` is the sum of squares, so the
loss is that sum divided by ``D``; a ``mean`` reduces in another order and agrees to rounding). ``weighting``:

- ``simple`` -- ``w_t = 1``;
- ``mse`` -- ignores C: plain ``||d - d_theta||^2 / D`` (to compare against the C-aware loss);
- ``min_snr`` -- Min-SNR-gamma (Hang et al. 2023), ``SNR = s_t^2 / sigma_t^2``: ``min(SNR, gamma) / SNR`` for
  eps (and score), ``min(SNR, gamma)`` for x0, ``min(SNR, gamma) / (SNR + 1)`` for v;
- ``elbo`` -- the exact ELBO weight, so the loss *is* the per-t KL term ``L_{t-1}`` with the reverse variance
  ``beta-tilde`` up to theta-free terms (nats, **not** divided by D); for eps (Ho et al. 2020, eq. 12, with C)::

      KL(q(x_{t-1} | x_t, x_0) || N(mu_theta, beta-tilde_t C))
          = beta_t / (2 alpha_t (1 - abar_{t-1})) ||eps - eps_theta||^2_{C^{-1}}

  in general ``B_t^2 c_t^2 / (2 beta-tilde_t)`` with ``x_theta - x_0 = -c_t (d_theta - d)`` (``c = sigma / s`` for
  eps, 1 for x0, ``sigma / sqrt(s^2 + sigma^2)`` for v). At ``t = 1`` (``beta-tilde_1 = 0``) it is the Gaussian
  decoder's weight ``c_1^2 / (2 beta-tilde_2)`` (improved-diffusion's clipped variance). ``T`` times the mean over
  ``t ~ U{1..T}`` is the bound's theta-dependent part.
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import Identity
from diffusionlab.objectives.common import noisy_inputs, require_chain, training_output
from diffusionlab.parametrization import get_parametrization, reverse_variances
from diffusionlab.utils import per_sample_dim

WEIGHTINGS = ("simple", "elbo", "mse", "min_snr")
_IDENTITY = Identity()


def elbo_weights(process, parametrization) -> torch.Tensor:
    """Float64 ``(T + 1,)`` weights ``w_t = B_t^2 c_t^2 / (2 v_t)`` making ``w_t ||d - d_theta||^2_{C^{-1}}`` the
    KL ``L_{t-1}`` with reverse variance ``v_t = beta-tilde_t`` (clipped at ``t = 1``; module docstring);
    ``parametrization`` a :class:`~diffusionlab.parametrization.Parametrization` or its name."""
    chain = require_chain(process, "the ELBO weighting")
    c2 = get_parametrization(parametrization).error_scale2(chain.mean_scale, chain.sigma)
    _, lower = reverse_variances(chain.b**2, chain.post_var)
    w = chain.post_B**2 * c2 / (2.0 * lower)
    w[0] = 0.0
    return w


class SimpleLoss:
    """``L_simple`` with covariance C; call ``(model, x0, generator=None, t=None, noise=None) -> (B,)``.

    ``t ~ U{1..T}`` on chains (``t ~ U(t_min, 1)`` on SDEs), ``x_t = s_t x0 + sigma_t eps``, ``eps ~ N(0, C)``.
    ``t`` and ``noise`` may be passed to fix them, ``labels`` reach a class-conditional model. A learned-variance
    model's variance half is ignored.

    Args:
        process: the diffusion process; its ``cov`` is C
        weighting: simple (w_t = 1, Ho et al. 2020), elbo (the exact ELBO weight: the loss is the KL L_{t-1} in nats,
            not divided by D; chains only), mse (plain squared error, ignoring C) or min_snr (Min-SNR-gamma, Hang
            et al. 2023); module docstring
        gamma: the SNR clip of min_snr, > 0 (5 in Hang et al. 2023; the other weightings ignore it)
        t_min: smallest training time on an SDE, t ~ U(t_min, T) (chains draw t ~ U{1..T} and ignore it)
    """

    self_conditioning = True  #: trains self-conditioned models (:func:`~diffusionlab.objectives.common.training_output`)

    def __init__(self, process, weighting: str = "simple", gamma: float = 5.0, t_min: float = 1e-5):
        if weighting not in WEIGHTINGS:
            raise DiffusionLabError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        try:
            gamma = float(gamma)
        except (TypeError, ValueError):
            raise DiffusionLabError(f"min_snr gamma must be a positive number, got {gamma!r}") from None
        if not gamma > 0:
            raise DiffusionLabError(f"min_snr gamma must be a positive number, got {gamma!r}")
        if weighting == "elbo":
            require_chain(process, "the ELBO weighting")
        self.process = process
        self.weighting = weighting
        self.gamma = gamma
        self.t_min = float(t_min)
        self._elbo_w: dict = {}

    def weight(self, parametrization, t: torch.Tensor, s: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weight ``(B,)`` (None for 1) for a model of ``parametrization``."""
        if self.weighting in ("simple", "mse"):
            return None
        param = get_parametrization(parametrization)
        if self.weighting == "min_snr":
            return param.min_snr_weight((s / sigma).reshape(-1) ** 2, self.gamma)
        key = (repr(param), t.device)  # the object's options (EDM's sigma_data) matter
        if key not in self._elbo_w:
            self._elbo_w[key] = elbo_weights(self.process, param).to(t.device)
        return self._elbo_w[key][t].to(s.dtype)

    def __call__(self, model, x0: torch.Tensor, generator=None, t=None, noise=None, labels=None,
                 self_cond_rows=None) -> torch.Tensor:
        t, eps, x_t, s, sigma = noisy_inputs(self.process, x0, generator, t, noise, self.t_min)
        out, _ = model.split(training_output(model, x_t, t, labels, self_cond_rows))
        diff = model.target(x0, eps, t) - out
        if self.weighting == "mse":
            return _IDENTITY.mahalanobis(diff) / per_sample_dim(x0)
        loss = self.process.cov.mahalanobis(diff)
        w = self.weight(model.parametrization, t, s, sigma)
        if self.weighting == "elbo":
            return w * loss
        loss = loss / per_sample_dim(x0)
        return loss if w is None else w * loss

