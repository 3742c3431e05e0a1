"""Noise with a covariance C across one axis (the frames of a video)."""

from diffusionlab.noise.covariance import (
    COVARIANCES,
    Covariance,
    Dense,
    Identity,
    Mixed,
    Progressive,
    check_psd,
    make_covariance,
    toeplitz,
)
from diffusionlab.noise import fit  # noqa: E402,F401 (registers the file: and fitted families)

__all__ = ["COVARIANCES", "Covariance", "Dense", "Identity", "Mixed", "Progressive", "check_psd", "make_covariance", "toeplitz"]
