"""Build a network from a config dict and the data's sample shape.

``cfg = {"name": "mlp" | "unet", **constructor options}``. The input size (``dim``, ``in_channels``,
``image_size``) is inferred from ``sample_shape``:

- ``mlp``: points ``(D,)`` directly; any other sample shape is flattened to ``prod(sample_shape)`` features;
- ``unet``: images ``(C, H, W)``; videos ``(C, F, H, W)`` with the frames folded into channels (a 2-D U-Net
  on ``C * F`` channels, so frames interact through every convolution).

Whatever the wrapping, the output keeps the calling convention: the same shape as ``x`` except dim 1 times
``out_mult``, laid out as ``out_mult`` consecutive blocks of the input's dim-1 size (``out.chunk(out_mult, 1)``
gives the per-head outputs).
"""

from __future__ import annotations

import inspect
import math
from typing import Mapping, Sequence

import torch
from torch import nn

from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import positive_int
from diffusionlab.configuration import Catalogue
from diffusionlab.models.mlp import MLP
from diffusionlab.models.unet import UNet
from diffusionlab.models.video_unet import VideoUNet, build_video_unet

#: the network catalogue: a ``model:`` section is ``{"name": N, **options}`` with the options of the network
#: class (their defaults are the class's); the sizes (``dim``, ``in_channels``, ``image_size``, ``frames``) come
#: from the data's sample shape and ``out_mult`` from the parametrization
NETWORKS = Catalogue("network", "model")
_INFERRED = ("dim", "in_channels", "image_size", "frames", "out_mult", "cond_channels")

#: The recommended U-Net for 8x8 digits: 399,913 parameters, 0.98 GMAC per forward pass of a batch of 128.
#: A training step (batch 128, forward + backward + AdamW) measured ~150 ms on one CPU thread (AMD EPYC,
#: ``python -m diffusionlab.models.bench``); two idle threads should take roughly 90 ms. ``base_channels`` 16
#: takes ~95 ms on one thread (178,801 parameters) and 32 with ``conv_resample`` ~230 ms (755,009).
DIGITS_UNET = {"name": "unet", "base_channels": 24, "channel_mults": [1, 2], "num_res_blocks": 1,
               "attn_resolutions": [4], "conv_resample": False}


class Reshaped(nn.Module):
    """Run ``inner`` on ``x.reshape(B, *inner_shape)`` and reshape its output back to the sample layout.

    ``inner`` returns ``(B, out_mult * inner_shape[0], *inner_shape[1:])``; with row-major reshapes the
    result is ``(B, out_mult * sample_shape[0], *sample_shape[1:])`` with the same block layout.
    """

    def __init__(self, inner: nn.Module, sample_shape: Sequence[int], inner_shape: Sequence[int], out_mult: int):
        super().__init__()
        self.inner = inner
        self.sample_shape = tuple(sample_shape)
        self.inner_shape = tuple(inner_shape)
        self.out_mult = out_mult

    @property
    def num_classes(self) -> int | None:
        """The inner network's number of classes (None: unconditional)."""
        return getattr(self.inner, "num_classes", None)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise DiffusionLabError(f"network expects samples of shape {self.sample_shape}, got {tuple(x.shape[1:])}")
        b = x.shape[0]
        xi = x.reshape(b, *self.inner_shape)
        y = self.inner(xi, c_noise) if labels is None else self.inner(xi, c_noise, labels)
        return y.reshape(b, self.out_mult * self.sample_shape[0], *self.sample_shape[1:])


def _sample_shape(sample_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in sample_shape)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"sample_shape must be a tuple of positive ints, got {sample_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise DiffusionLabError(f"sample_shape must be a non-empty tuple of positive ints, got {sample_shape!r}")
    return shape


def _no_conditioning_input(name: str, cond_channels: int) -> None:
    if cond_channels:
        raise DiffusionLabError(f"parametrization.self_condition needs a network that takes extra input channels "
                                f"(unet on images, video_unet); {name} does not")


@NETWORKS.register("mlp", context=("sample_shape", "out_mult"), options_of=MLP, inferred=_INFERRED)
def _build_mlp(sample_shape: tuple[int, ...], out_mult: int, cond_channels: int = 0, **opts) -> nn.Module:
    _no_conditioning_input("mlp", cond_channels)
    shape = sample_shape
    if len(shape) == 1:
        return MLP(shape[0], out_mult=out_mult, **opts)
    flat = math.prod(shape)
    return Reshaped(MLP(flat, out_mult=out_mult, **opts), shape, (flat,), out_mult)


@NETWORKS.register("unet", context=("sample_shape", "out_mult"), options_of=UNet, inferred=_INFERRED)
def _build_unet(sample_shape: tuple[int, ...], out_mult: int, cond_channels: int = 0, **opts) -> nn.Module:
    shape = sample_shape
    if len(shape) == 3:
        c, h, w = shape
        return UNet(in_channels=c, image_size=(h, w), out_mult=out_mult, cond_channels=cond_channels, **opts)
    if len(shape) == 4:
        _no_conditioning_input("unet on videos (frames folded into channels)", cond_channels)
        c, f, h, w = shape
        inner = UNet(in_channels=c * f, image_size=(h, w), out_mult=out_mult, **opts)
        return Reshaped(inner, shape, (c * f, h, w), out_mult)
    raise DiffusionLabError(
        f"unet needs images (C, H, W) or videos (C, F, H, W), got sample shape {shape}; use name: mlp for points"
    )


NETWORKS.register("video_unet", context=("sample_shape", "out_mult"), options_of=VideoUNet,
                  inferred=_INFERRED)(lambda sample_shape, out_mult, cond_channels=0, **opts:
                                      build_video_unet(opts, sample_shape, out_mult, cond_channels))


def build_network(cfg: Mapping, sample_shape: Sequence[int], out_mult: int = 1,
                  device: torch.device | str | None = None, self_condition: bool = False) -> nn.Module:
    """Build the network ``cfg`` names for samples of ``sample_shape`` (moved to ``device`` when given); with
    ``self_condition`` it takes the sample's channels twice (``x_t`` and the x_0 estimate fed back, Chen et al.
    2022; :class:`~diffusionlab.parametrization.DiffusionModel`)."""
    if not isinstance(cfg, Mapping):
        raise DiffusionLabError(f"network config must be a mapping with a 'name' ({', '.join(NETWORKS)}), got {cfg!r}")
    entry, opts = NETWORKS.split(dict(cfg))
    inferred = [k for k in opts if k in _INFERRED]
    if inferred:
        raise DiffusionLabError(
            f"network option(s) {', '.join(inferred)} are set by diffusionlab (the size from the data's sample "
            f"shape, out_mult from the objective); remove them. Allowed for {entry.name}: "
            f"{', '.join(entry.parameters())}"
        )
    opts = entry.resolve(opts)
    for key in ("channel_mults", "attn_resolutions", "temporal_attn_resolutions"):
        if isinstance(opts.get(key), list):
            opts[key] = tuple(opts[key])
    shape = _sample_shape(sample_shape)
    positive_int("out_mult", out_mult)
    # Only a self-conditioned model passes cond_channels, so a registered network that never heard of it still
    # builds; one that cannot take it is refused by name rather than by a TypeError from deep inside.
    if not self_condition:
        net = entry.factory(shape, out_mult, **opts)
    else:
        params = inspect.signature(entry.factory).parameters.values()
        if not any(q.name == "cond_channels" or q.kind is q.VAR_KEYWORD for q in params):
            _no_conditioning_input(entry.name, shape[0])
        try:
            net = entry.factory(shape, out_mult, cond_channels=shape[0], **opts)
        except TypeError as e:  # a **opts factory that hands cond_channels to a class without it
            if "cond_channels" not in str(e):
                raise
            _no_conditioning_input(entry.name, shape[0])
    return net.to(device) if device is not None else net


def default_network_config(sample_shape: Sequence[int]) -> dict:
    """A sensible config for ``sample_shape``: the MLP for points, :data:`DIGITS_UNET` at 8x8, else a
    DDPM-like U-Net (``channel_mults`` (1, 2, 2) when the size allows two halvings, (1, 2) otherwise)."""
    shape = _sample_shape(sample_shape)
    if len(shape) == 1:
        return {"name": "mlp"}
    if len(shape) in (3, 4) and shape[-2:] == (8, 8):
        return dict(DIGITS_UNET)
    if len(shape) in (3, 4):
        h, w = shape[-2:]
        mults = [1, 2, 2] if h % 4 == 0 and w % 4 == 0 else [1, 2] if h % 2 == 0 and w % 2 == 0 else [1]
        return {"name": "unet", "base_channels": 64, "channel_mults": mults, "num_res_blocks": 2}
    return {"name": "mlp"}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` when asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
