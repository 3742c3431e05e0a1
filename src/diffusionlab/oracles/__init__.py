"""Exact oracles: models whose predictions are known in closed form (test oracles across the project).

- :class:`GaussianOracle` -- Gaussian data ``N(m, Sigma)`` of any sample shape;
- :class:`GaussianMixtureOracle` -- Gaussian mixtures with full covariances, optionally on ``(F, d)`` points
  with a frame covariance C.

Both are :class:`~diffusionlab.parametrization.DiffusionModel` subclasses, exact under every process.
"""

from diffusionlab.oracles.gaussian import GaussianOracle, dense_noise_covariance
from diffusionlab.oracles.mixture import GaussianMixtureOracle

__all__ = ["GaussianOracle", "GaussianMixtureOracle", "dense_noise_covariance"]
