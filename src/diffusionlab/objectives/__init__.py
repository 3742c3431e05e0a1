"""Training objectives: callables ``obj(model, x0, generator=None, t=None, noise=None, labels=None) -> (B,)`` per-sample
losses (the caller reduces); ``labels`` are a class-conditional model's (passed to its evaluation).

Every objective takes the process's noise covariance C (``process.cov``), uses ``cov.mahalanobis`` for every
``C^{-1}`` norm (never an explicit inverse) and reduces to the usual loss for ``C = I``:

- ``simple`` -- :class:`SimpleLoss`, ``L_simple`` (Ho et al. 2020), weightings ``simple | elbo | mse | min_snr``;
- ``vlb`` -- :class:`VLBLoss`, DDPM's variational bound in nats (:func:`vlb_terms`, :func:`full_vlb`);
- ``hybrid`` -- :class:`HybridLoss`, Nichol & Dhariwal 2021;
- ``ncsn`` -- :class:`NCSNLoss`, Song & Ermon 2019;
- ``dsm`` -- :class:`ContinuousDSM`, continuous-time denoising score matching for the SDEs (Song et al. 2021);
- ``edm`` -- :class:`EDMLoss`, Karras et al. 2022's loss: log-normal noise levels (or a given density), weight
  ``lambda(sig) = (sig^2 + sd^2) / (sig sd)^2`` on the denoiser's whitened error, any process.

Build one from a config dict with :func:`make_objective`, e.g. ``{"name": "simple", "weighting": "min_snr",
"gamma": 5}``.
"""

from __future__ import annotations

from diffusionlab.configuration import Catalogue
from diffusionlab.objectives.continuous import ContinuousDSM
from diffusionlab.objectives.edm import EDMLoss
from diffusionlab.objectives.ncsn import NCSNLoss
from diffusionlab.objectives.simple import WEIGHTINGS, SimpleLoss, elbo_weights
from diffusionlab.objectives.vlb import (
    DECODERS,
    VARIANCES,
    HybridLoss,
    VLBLoss,
    discretized_gaussian_log_prob,
    full_vlb,
    reverse_log_variance,
    vlb_from_prediction,
    vlb_terms,
)

#: the objective catalogue: an ``objective:`` section is ``{"name": N, **options}`` with the options of the loss
#: class (its constructor's defaults are the defaults; the process is the run's)
OBJECTIVES = Catalogue("objective", "objective")
for _name, _cls, _aliases in (("simple", SimpleLoss, {}), ("vlb", VLBLoss, {}), ("hybrid", HybridLoss, {"lambda": "lam"}),
                              ("ncsn", NCSNLoss, {}), ("dsm", ContinuousDSM, {}),
                              ("edm", EDMLoss, {})):
    OBJECTIVES.register(_name, context=("process",), options_of=_cls, aliases=_aliases)(_cls)


def make_objective(cfg: dict | str, process):
    """An objective from ``{"name": ..., **options}`` (or just its name); unknown names/options raise
    :class:`DiffusionLabError` listing what is allowed."""
    return OBJECTIVES.build(cfg, process=process)


__all__ = [
    "OBJECTIVES", "make_objective", "ContinuousDSM", "EDMLoss", "SimpleLoss", "VLBLoss", "HybridLoss", "NCSNLoss", "WEIGHTINGS", "VARIANCES",
    "DECODERS", "elbo_weights", "vlb_terms", "vlb_from_prediction", "full_vlb", "discretized_gaussian_log_prob",
    "reverse_log_variance",
]
