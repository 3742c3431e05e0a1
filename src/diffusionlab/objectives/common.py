"""What every objective shares: drawing ``t`` and the noise, and the ``x_0`` error of a prediction.

Every objective takes ``labels=None``: the class labels of a class-conditional model's batch (``(B,)``, the no-label
index where label dropout removed them), passed on to the model's evaluation (:func:`label_kwargs`). The objectives
that evaluate the network through :func:`training_output` train self-conditioned models too (their class says
``self_conditioning = True``).
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import batch_t, coeffs_like


def require_chain(process, what: str):
    """``process`` if it is a discrete chain; :class:`DiffusionLabError` naming ``what`` otherwise."""
    process.require_discrete(what)
    return process


def draw_t(process, x0: torch.Tensor, generator: torch.Generator | None = None, t_min: float = 1e-5) -> torch.Tensor:
    """Training times for the batch ``x0`` (:meth:`~diffusionlab.processes.GaussianProcess.draw_t`): ``U{1..T}`` on
    a chain, ``U(t_min, T)`` on an SDE; drawn on the generator's device, then moved to ``x0``'s."""
    return process.draw_t(x0.shape[0], generator, x0.device, t_min)


def draw_noise(process, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``eps ~ N(0, C)`` shaped like ``x0`` (``L z``; drawn on the generator's device, then moved)."""
    dev = generator.device if generator is not None else x0.device
    return process.cov.sample(x0.shape, generator=generator, device=dev, dtype=x0.dtype).to(x0.device)


def noisy_inputs(process, x0: torch.Tensor, generator=None, t=None, noise=None, t_min: float = 1e-5):
    """``(t, eps, x_t, s, sigma)`` with ``x_t = s_t x0 + sigma_t eps``; ``t`` and ``noise`` are drawn unless given."""
    process.cov.check(x0)
    tb = draw_t(process, x0, generator, t_min) if t is None else batch_t(t, x0)
    eps = draw_noise(process, x0, generator) if noise is None else noise
    s, sigma = coeffs_like(process, tb, x0)
    return tb, eps, s * x0 + sigma * eps, s, sigma


def label_kwargs(labels) -> dict:
    """``{"labels": labels}`` for a class-conditional batch, ``{}`` otherwise (a model is then called as it always
    was, so models that take no labels keep working)."""
    return {} if labels is None else {"labels": labels}


def training_output(model, x_t: torch.Tensor, t: torch.Tensor, labels=None, self_cond_rows=None) -> torch.Tensor:
    """The raw output ``model(x_t, t)`` as it is trained: labels passed on, and a self-conditioned model
    (``parametrization.self_condition``) fed its own no-grad ``x_0`` estimate on ``self_cond_rows`` (a ``(B,)``
    mask, the trainer's slice of the global batch's; default the first half of this batch)
    (:meth:`~diffusionlab.parametrization.DiffusionModel.self_condition_estimate`; Chen et al. 2022, Fig. 3)."""
    kw = label_kwargs(labels)
    estimate = getattr(model, "self_condition_estimate", None)
    cond = None if estimate is None else estimate(x_t, t, rows=self_cond_rows, **kw)
    return model(x_t, t, **kw) if cond is None else model(x_t, t, x0_cond=cond, **kw)
