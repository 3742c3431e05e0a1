"""Noise with a covariance C across one axis (the frames of a video)."""

from diffusionlab.noise.covariance import (
    Covariance,
    Dense,
    Identity,
    Mixed,
    Progressive,
    check_psd,
    make_covariance,
    toeplitz,
)

__all__ = ["Covariance", "Dense", "Identity", "Mixed", "Progressive", "check_psd", "make_covariance", "toeplitz"]
