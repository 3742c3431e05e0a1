"""EDM's training objective (Karras et al. 2022, sec. 5 and Table 1) for any process and any covariance C.

In the EDM level ``sig = sigma_t / s_t`` of the scaled state ``y = x_t / s_t = x_0 + sig eps`` (``eps ~ N(0, C)``),
the loss of a denoiser ``D`` is (Karras et al. 2022, eq. 8 with their weight ``lambda``)::

    loss = lambda(sig) ||D(y; sig) - x_0||^2_{C^{-1}} / D_dim,     lambda(sig) = (sig^2 + sd^2) / (sig sd)^2

with ``sd = sigma_data`` and ``ln(sig) ~ N(P_mean, P_std^2)`` (their log-normal level density; defaults
``P_mean = -1.2``, ``P_std = 1.2``, as for CIFAR-10). The norm is the whitened (Mahalanobis) one ``C^{-1}``
(``cov.mahalanobis``; the plain squared error for ``C = I``), so with correlated noise every direction of the
noise is weighted by its own scale. ``D_dim`` is the number of entries per sample (a per-dimension mean).

Any parametrization works: ``D - x_0`` is its :meth:`~diffusionlab.parametrization.Parametrization.x0_error`
``= -c (d_theta - d)``, so the loss is ``lambda c^2 ||d_theta - d||^2_{C^{-1}} / D_dim``; for the EDM
parametrization ``c = c_out = 1 / sqrt(lambda)`` and the weight is 1 (its output's squared error; sec. 5).

Levels and times: the model is evaluated at times, so a drawn level becomes the time whose level it is
(:meth:`~diffusionlab.processes.GaussianProcess.time_at_edm_sigma`): exactly on an SDE (clamped to
``[t_min, T]``), the nearest step on a chain (the density is then that of the nearest step, and a level beyond
the chain's ends lands on its end steps). ``density``:

- ``"lognormal"`` -- the above;
- ``"process"`` -- the process's own training draw of ``t`` (uniform steps or times), with EDM's weight;
- a callable ``density(batch, generator, device) -> sig`` (float64 ``(B,)``, positive): any given density.
"""

from __future__ import annotations

import torch

from diffusionlab.checks import real
from diffusionlab.errors import DiffusionLabError
from diffusionlab.objectives.common import noisy_inputs, training_output
from diffusionlab.parametrization import edm_weight
from diffusionlab.utils import per_sample_dim

_F64 = torch.float64
DENSITIES = ("lognormal", "process")


class EDMLoss:
    """EDM's denoising loss; call ``(model, x0, generator=None, t=None, noise=None) -> (B,)`` (module docstring).

    Args:
        process: any process (chain or SDE); its ``cov`` is C.
        sigma_data: the data's standard deviation in the weight (default: the model's EDM ``sigma_data`` when it
            has one, else 0.5).
        P_mean: mean of ``ln(sig)``.
        P_std: standard deviation of ``ln(sig)``.
        density: ``lognormal``, ``process`` or a callable (module docstring).
        t_min: smallest time on an SDE (the levels below it are clamped).
    """

    self_conditioning = True  #: trains self-conditioned models (:func:`~diffusionlab.objectives.common.training_output`)

    def __init__(self, process, sigma_data: float | None = None, P_mean: float = -1.2, P_std: float = 1.2,
                 density="lognormal", t_min: float = 1e-5):
        if sigma_data is not None:
            sigma_data = real("objective.sigma_data", sigma_data, 0.0, open_low=True)
        self.P_mean = real("objective.P_mean", P_mean)
        self.P_std = real("objective.P_std", P_std, 0.0, open_low=True)
        if not callable(density) and density not in DENSITIES:
            raise DiffusionLabError(f"unknown objective.density {density!r}; allowed: {', '.join(DENSITIES)} "
                                    "(or a callable drawing levels)")
        self.process = process
        self.sigma_data = sigma_data
        self.density = density
        self.t_min = float(t_min)
        if not process.discrete:
            self.t_min = process.check_eps(self.t_min)

    # -- levels and times ------------------------------------------------------------------------------------
    def sample_sig(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``(B,)`` float64 levels from the density (on the generator's device)."""
        dev = generator.device if generator is not None else device
        if callable(self.density):
            sig = torch.as_tensor(self.density(batch, generator, dev), dtype=_F64)
            if sig.shape != (batch,) or not bool(torch.isfinite(sig).all()) or bool((sig <= 0).any()):
                raise DiffusionLabError(f"the objective's density must return {batch} positive finite levels, got "
                                        f"shape {tuple(sig.shape)}")
            return sig
        z = torch.randn(batch, generator=generator, device=dev, dtype=_F64)
        return torch.exp(self.P_mean + self.P_std * z)

    def time_of(self, sig: torch.Tensor) -> torch.Tensor:
        """The process's times at levels ``sig``: the nearest step on a chain, clamped to ``[t_min, T]`` on an SDE."""
        t = self.process.time_at_edm_sigma(sig.cpu())
        if self.process.discrete:
            return t.long().clamp(1, self.process.T)
        return t.to(_F64).clamp(self.t_min, float(self.process.T))

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``(B,)`` training times (the trainer draws them through this, :func:`~diffusionlab.training.trainer`)."""
        if self.density == "process":
            dev = generator.device if generator is not None else device
            t = self.process.draw_t(batch, generator, dev, self.t_min)
        else:
            t = self.time_of(self.sample_sig(batch, generator, device))
        return t.to(device) if device is not None else t

    # -- the loss ------------------------------------------------------------------------------------------
    def _sigma_data(self, model) -> float:
        if self.sigma_data is not None:
            return self.sigma_data
        return float(getattr(model.parametrization, "sigma_data", 0.5))

    def weight(self, model, s: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``(B,)``: ``lambda(sig) c^2`` for the model's output error (``c^2`` its ``error_scale2``)."""
        sig = (sigma / s).reshape(-1)
        c2 = model.parametrization.error_scale2(s, sigma).reshape(-1)
        return edm_weight(sig, self._sigma_data(model)) * c2

    def __call__(self, model, x0: torch.Tensor, generator: torch.Generator | None = None, t=None,
                 noise: torch.Tensor | None = None, labels=None, self_cond_rows=None) -> torch.Tensor:
        if t is None:
            t = self.sample_t(x0.shape[0], generator, x0.device)
        tb, eps, x_t, s, sigma = noisy_inputs(self.process, x0, generator, t, noise)
        out, _ = model.split(training_output(model, x_t, tb, labels, self_cond_rows))  # labels: class-conditional
        diff = model.target(x0, eps, tb) - out
        return self.weight(model, s, sigma) * self.process.cov.mahalanobis(diff) / per_sample_dim(x0)

    def __repr__(self) -> str:
        return (f"EDMLoss(sigma_data={self.sigma_data}, P_mean={self.P_mean}, P_std={self.P_std}, "
                f"density={self.density!r}, process={self.process!r})")


def expected_gaussian_loss(mean_flat: torch.Tensor, Sigma: torch.Tensor, K: torch.Tensor, sig: float,
                           sigma_data: float) -> float:
    """EDM's loss of the ideal denoiser at level ``sig`` for Gaussian data ``N(m, Sigma)`` and noise covariance
    ``K`` (dense, flattened; float64), in closed form: with ``y = x_0 + sig eps``, ``D* = E[x_0 | y]`` and
    ``Cov[x_0 | y] = Sigma - Sigma (Sigma + sig^2 K)^{-1} Sigma``::

        E lambda ||D* - x_0||^2_{K^{-1}} / D = lambda(sig) tr(K^{-1} Cov[x_0 | y]) / D
    """
    d = Sigma.shape[0]
    M = Sigma + sig**2 * K
    post = Sigma - Sigma @ torch.linalg.solve(M, Sigma)
    tr = torch.trace(torch.linalg.solve(K, post))
    return float(edm_weight(torch.tensor(sig, dtype=_F64), sigma_data) * tr / d)


__all__ = ["EDMLoss", "edm_weight", "expected_gaussian_loss", "DENSITIES"]
