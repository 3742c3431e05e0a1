"""Likelihoods: exact log-likelihood through the probability-flow ODE, and bits per dimension.

- :func:`ode_log_likelihood`, :func:`dataset_log_likelihood` -- Song et al. 2021 (Appendix D), FFJORD's
  Hutchinson estimator (Grathwohl et al. 2019), with a noise covariance C;
- :func:`bpd_from_model_space_nll`, :func:`nats_to_bpd`, :func:`dequantize` -- 8-bit data in ``[-1, 1]``.
"""

from diffusionlab.likelihood.bpd import (
    MODEL_SPACE_OFFSET_BITS,
    bpd_from_model_space_nll,
    dequantize,
    nats_to_bpd,
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
    "to_levels", "MODEL_SPACE_OFFSET_BITS",
]
