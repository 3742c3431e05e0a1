"""NCSN's denoising score matching (Song & Ermon 2019, eq. 2) with a noise covariance C.

Levels ``sigma_1 < ... < sigma_L`` of a :class:`~diffusionlab.processes.VEChain`, ``t ~ U{1..L}``,
``x_t = x_0 + sigma_t eps`` with ``eps ~ N(0, C)``, so ``grad log q(x_t | x_0) = -C^{-1} eps / sigma_t``. Song & Ermon's
loss ``sigma_t^2 ||s_theta(x_t) - grad log q(x_t | x_0)||^2`` (``lambda(sigma) = sigma^2``) is taken in the metric
of C, where it needs no inverse of C on the score side::

    sigma_t^2 (s_theta - grad log q)^T C (s_theta - grad log q) = ||sigma_t C s_theta + eps||^2_{C^{-1}}

(``= sigma^2 ||s_theta + eps / sigma||^2`` for ``C = I``), divided by ``D`` like ``simple``. With any model
parametrization ``sigma_t C s_theta = -eps_theta``, so this is the eps-form Mahalanobis loss; the ``"score"``
parametrization (net output ``sigma_t C s_theta``) is NCSN's. Any discrete chain (or SDE, ``t ~ U(t_min, 1)``)
works; on VP chains it is denoising score matching at ``x_t = s_t x_0 + sigma_t eps``.
"""

from __future__ import annotations

import torch

from diffusionlab.objectives.common import label_kwargs, noisy_inputs
from diffusionlab.utils import per_sample_dim


class NCSNLoss:
    """``||sigma_t C s_theta(x_t) + eps||^2_{C^{-1}} / D`` per sample; call ``(model, x0, generator=None, t=None,
    noise=None) -> (B,)``.

    Args:
        process: a discrete chain (NCSN's: a VEChain of levels sigma_1 < ... < sigma_L) or an SDE; its ``cov`` is C
        t_min: smallest training time on an SDE, t ~ U(t_min, T) (chains draw t ~ U{1..T} and ignore it)
    """

    def __init__(self, process, t_min: float = 1e-5):
        self.process = process
        self.t_min = float(t_min)

    def __call__(self, model, x0: torch.Tensor, generator=None, t=None, noise=None, labels=None) -> torch.Tensor:
        t, eps, x_t, _, sigma = noisy_inputs(self.process, x0, generator, t, noise, self.t_min)
        pred = model.predict(x_t, t, **label_kwargs(labels))
        sigma_c_score = sigma * pred.c_score  # sigma_t C s_theta(x_t) = -eps_theta
        return self.process.cov.mahalanobis(sigma_c_score + eps) / per_sample_dim(x0)

