"""Likelihoods: exact log-likelihood through the probability-flow ODE, and bits per dimension.

- :func:`ode_log_likelihood`, :func:`dataset_log_likelihood` -- Song et al. 2021 (Appendix D), FFJORD's
  Hutchinson estimator (Grathwohl et al. 2019), with a noise covariance C;
- :func:`bpd_from_model_space_nll`, :func:`nats_to_bpd`, :func:`dequantize` -- 8-bit (or ``L``-level) data in
  ``[-1, 1]``;
- :mod:`diffusionlab.likelihood.evaluate` -- the ``evaluate --metric nll | elbo`` reports of a trained run.
"""

from diffusionlab.likelihood.bpd import (
    MODEL_SPACE_OFFSET_BITS,
    bpd_from_model_space_nll,
    check_levels,
    dequantize,
    nats_to_bpd,
    offset_bits,
    on_grid,
    to_levels,
)
from diffusionlab.likelihood.ode import (
    dataset_log_likelihood,
    drift_and_divergence,
    exact_divergence,
    hutchinson_divergence,
    ode_log_likelihood,
    sample_probes,
)

__all__ = [
    "ode_log_likelihood", "dataset_log_likelihood", "drift_and_divergence", "exact_divergence",
    "hutchinson_divergence", "sample_probes", "bpd_from_model_space_nll", "nats_to_bpd", "dequantize",
    "to_levels", "MODEL_SPACE_OFFSET_BITS", "offset_bits", "on_grid", "check_levels",
]
