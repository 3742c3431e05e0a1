"""Exact oracles: models whose predictions are known in closed form (test oracles across the project)."""

from diffusionlab.oracles.gaussian import GaussianOracle, dense_noise_covariance

__all__ = ["GaussianOracle", "dense_noise_covariance"]
