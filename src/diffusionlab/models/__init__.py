"""Noise-conditioned networks: ``net(x, c_noise)`` with ``x (B, *sample_shape)`` and ``c_noise (B,)``.

Every network returns the shape of ``x`` with dim 1 (channels, or the feature dim of points) multiplied by
``out_mult`` (2 when the model also predicts the variance interpolation of Nichol & Dhariwal 2021).

- :class:`SinusoidalEmbedding`, :class:`TimeEmbedding` -- the DDPM noise-level embedding both networks use;
- :class:`MLP` -- residual MLP for points ``(B, D)``;
- :class:`UNet` -- the DDPM / improved-diffusion U-Net for images;
- :func:`build_network` -- from a config dict and the data's sample shape; :func:`count_parameters`.
"""

from diffusionlab.models.builder import (
    DIGITS_UNET,
    NETWORKS,
    Reshaped,
    build_network,
    count_parameters,
    default_network_config,
)
from diffusionlab.models.embedding import SinusoidalEmbedding, TimeEmbedding
from diffusionlab.models.mlp import MLP
from diffusionlab.models.unet import UNet

__all__ = [
    "DIGITS_UNET",
    "MLP",
    "NETWORKS",
    "Reshaped",
    "SinusoidalEmbedding",
    "TimeEmbedding",
    "UNet",
    "build_network",
    "count_parameters",
    "default_network_config",
]
