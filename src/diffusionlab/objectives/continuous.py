"""Continuous-time denoising score matching (Song et al. 2021) for the VP, sub-VP and VE SDEs, with C.

With ``x_t = s_t x_0 + sigma_t eps``, ``eps ~ N(0, C)``, the conditional score is
``grad log q(x_t | x_0) = -C^{-1} eps / sigma_t`` and the loss (Song et al. 2021, "Score-based generative
modeling through stochastic differential equations", eq. 7) in the metric that the noise ``g L dW`` induces::

    lambda(t) (s_theta - grad log q)^T C (s_theta - grad log q) / D
      = lambda(t) ||C s_theta + eps / sigma_t||^2_{C^{-1}} / D
      = lambda(t) / sigma_t^2 * ||sigma_t C s_theta + eps||^2_{C^{-1}} / D

computed from ``model.c_score`` (``C s_theta``; any parametrization) and ``cov.mahalanobis``, in the last form so
that no ``1 / sigma`` is formed at small ``t``. ``D`` is the number of entries per sample: the loss is a
per-dimension mean, comparable across resolutions (for ``C = I`` and ``lambda = sigma^2`` it is the plain
``||eps - eps_theta||^2 / D``). Weightings ``lambda``:

- ``"sigma2"`` -- ``lambda = sigma_t^2`` (Song et al. 2021's default; eps-prediction's ``L_simple``);
- ``"likelihood"`` -- ``lambda = g(t)^2`` (Song, Durkan, Murray & Ermon 2021, "Maximum likelihood training of
  score-based diffusion models"): then ``D (T - eps) / 2`` times the expected loss is the score-matching part
  of their bound on ``-log p`` (the C-metric makes it the KL of the two path measures, by Girsanov with
  diffusion ``g L``).

The objective is the uniform-time average ``E_{t ~ U[eps, T]} E_{x_0, eps}[loss]``. ``t_sampling``:

- ``"uniform"`` -- ``t ~ U[eps, T]`` per sample;
- ``"stratified"`` -- one ``t`` per equal stratum of ``[eps, T]``, strata randomly assigned to the batch
  (unbiased, lower variance);
- ``"importance"`` -- ``t`` with density ``p(t) ~ g(t)^2 / sigma_t^2`` on ``[eps, T]`` and each loss multiplied
  by ``1 / ((T - eps) p(t))`` so the estimator stays unbiased for the same objective (Song et al. 2021, MLE
  paper, Sec. 5). For any linear SDE ``g^2 / sigma^2 = -d lambda_snr / dt`` with ``lambda_snr = log(s^2 / sigma^2)``
  (from ``d sigma^2 / dt = 2 f sigma^2 + g^2``), so this density is *uniform in log-SNR*: ``t`` is the inverse
  log-SNR (:meth:`~diffusionlab.processes.GaussianProcess.time_at_logsnr`) of a uniform draw, and the weight is
  ``(lambda_snr(eps) - lambda_snr(T)) sigma^2 / ((T - eps) g^2)``. With ``weighting="likelihood"`` the weighted
  loss is then ``sigma^2``-weighted times a constant, removing the ``1/t`` spike of ``g^2 / sigma^2``.
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.objectives.common import draw_noise, label_kwargs
from diffusionlab.parametrization import batch_t
from diffusionlab.utils import bcast, per_sample_dim

_F64 = torch.float64
WEIGHTINGS = ("sigma2", "likelihood")
T_SAMPLINGS = ("uniform", "stratified", "importance")


class ContinuousDSM:
    """Continuous-time DSM; call ``(model, x0, generator=None, t=None, noise=None) -> (B,)`` (module docstring).

    Args:
        process: a continuous SDE (``VPSDE``, ``SubVPSDE``, ``VESDE``); its ``cov`` is C.
        weighting: ``"sigma2"`` or ``"likelihood"``.
        t_sampling: ``"uniform"``, ``"stratified"`` or ``"importance"``.
        eps: smallest time (1e-5 for every SDE, as score_sde's training ``eps``).

    ``t`` and ``noise`` may be given to fix them; the importance weight of ``t_sampling="importance"`` is
    applied to a given ``t`` too (pass ``t`` drawn by :meth:`sample_t`).
    """

    def __init__(self, process, weighting: str = "sigma2", t_sampling: str = "uniform", eps: float = 1e-5):
        process.require_continuous("continuous-time denoising score matching")
        if weighting not in WEIGHTINGS:
            raise DiffusionLabError(f"unknown DSM weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        if t_sampling not in T_SAMPLINGS:
            raise DiffusionLabError(f"unknown time sampling {t_sampling!r}; allowed: {', '.join(T_SAMPLINGS)}")
        eps = process.check_eps(eps)
        self.process = process
        self.weighting = weighting
        self.t_sampling = t_sampling
        self.eps = eps
        self.T = float(process.T)
        self._lam_T = float(process.logsnr(self.T))
        self._lam_eps = float(process.logsnr(eps))

    # -- time -----------------------------------------------------------------------------------------------
    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``(B,)`` float64 times by the ``t_sampling`` rule, drawn on the generator's device, then moved."""
        dev = generator.device if generator is not None else device
        u = torch.rand(batch, generator=generator, device=dev, dtype=_F64)
        if self.t_sampling == "stratified":
            perm = torch.randperm(batch, generator=generator, device=dev).to(_F64)
            u = (perm + u) / batch
        if self.t_sampling == "importance":
            lam = self._lam_T + u * (self._lam_eps - self._lam_T)  # uniform in log-SNR
            t = self.process.time_at_logsnr(lam).clamp(self.eps, self.T)
        else:
            t = self.eps + (self.T - self.eps) * u
        return t.to(device) if device is not None else t

    def importance_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """``1 / ((T - eps) p(t))`` for importance sampling (float64 ``(B,)``); None otherwise."""
        if self.t_sampling != "importance":
            return None
        _, sigma = self.process.coeffs(t)
        return (self._lam_eps - self._lam_T) * sigma**2 / ((self.T - self.eps) * self.process.diffusion_sq(t))

    def weight_over_sigma2(self, t: torch.Tensor) -> torch.Tensor:
        """``lambda(t) / sigma_t^2`` (float64): 1 for ``sigma2``, ``g^2 / sigma^2`` for ``likelihood``."""
        if self.weighting == "sigma2":
            return torch.ones_like(t, dtype=_F64)
        _, sigma = self.process.coeffs(t)
        return self.process.diffusion_sq(t) / sigma**2

    # -- loss -----------------------------------------------------------------------------------------------
    def loss_at(self, model, x0: torch.Tensor, t, noise: torch.Tensor, labels=None) -> torch.Tensor:
        """``lambda(t) ||C s_theta(x_t, t) + noise / sigma_t||^2_{C^{-1}} / D`` per sample at given ``t`` and
        ``noise`` (no importance weight)."""
        self.process.cov.check(x0)
        tb = batch_t(t, x0).to(_F64)
        s, sigma = self.process.coeffs(tb)
        s_b = bcast(s.to(x0.dtype), x0)
        sig_b = bcast(sigma.to(x0.dtype), x0)
        x_t = s_b * x0 + sig_b * noise
        resid = sig_b * model.c_score(x_t, tb, **label_kwargs(labels)) + noise  # sigma C s_theta + eps = eps - eps_theta
        w = self.weight_over_sigma2(tb).to(x0.dtype)
        return w * self.process.cov.mahalanobis(resid) / per_sample_dim(x0)

    def __call__(self, model, x0: torch.Tensor, generator: torch.Generator | None = None, t=None,
                 noise: torch.Tensor | None = None, labels=None) -> torch.Tensor:
        self.process.cov.check(x0)
        if t is None:
            t = self.sample_t(x0.shape[0], generator, x0.device)
        t = batch_t(t, x0).to(_F64)
        if noise is None:
            noise = draw_noise(self.process, x0, generator)
        loss = self.loss_at(model, x0, t, noise, labels)
        iw = self.importance_weight(t)
        return loss if iw is None else iw.to(loss.dtype) * loss


    def __repr__(self) -> str:
        return (f"ContinuousDSM(weighting={self.weighting!r}, t_sampling={self.t_sampling!r}, eps={self.eps}, "
                f"process={self.process!r})")
