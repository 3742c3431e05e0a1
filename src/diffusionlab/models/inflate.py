"""Image-to-video inflation: load a 2-D U-Net's weights into the space-time U-Net.

The factorized space-time U-Net (:class:`~diffusionlab.models.video_unet.VideoUNet`) is the 2-D U-Net's layout
(:func:`~diffusionlab.models.unet.unet_layout`) with temporal layers added after the residual block of every
block; each spatial parameter has the very name it has in the 2-D :class:`~diffusionlab.models.unet.UNet` of the
same options, and every temporal layer is a zero-initialised residual (the identity). Loading every image weight
into its namesake and leaving the temporal layers at their initialisation therefore gives a video network that,
at initialisation, *is* the image network applied to each frame -- the starting point of image-to-video
fine-tuning (Ho et al. 2022, "Video diffusion models", Sec. 3: joint image-video training with the temporal layers
masked; Blattmann et al. 2023, "Align your latents", Sec. 3.1: a pretrained image model with temporal layers
inserted; Ge et al. 2023, "Preserve your own correlation", Sec. 4: fine-tuning an image model with correlated
noise).

:func:`inflate` checks that the two state dicts match exactly (every image tensor finds a spatial tensor of the
same name and shape, and every spatial tensor of the video network gets one), so nothing is silently left at
random initialisation.
"""

from __future__ import annotations

from typing import Mapping

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.models.video_unet import is_temporal_key


def split_keys(video_state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(spatial, temporal)`` keys of a space-time U-Net's state dict (or of a model wrapping one)."""
    temporal = [k for k in video_state if is_temporal_key(k)]
    return [k for k in video_state if not is_temporal_key(k)], temporal


def inflate(video: torch.nn.Module, image_state: Mapping[str, torch.Tensor]) -> dict:
    """Copy every tensor of ``image_state`` (a 2-D U-Net's, or a model wrapping one under the same prefix as
    ``video``) into the spatial tensor of the same name of ``video``; the temporal layers are left as they are.

    Raises :class:`DiffusionLabError` naming the tensors when a spatial tensor of ``video`` has no counterpart,
    an image tensor has no place, or shapes differ. Returns ``{"loaded", "loaded_parameters", "temporal",
    "temporal_parameters"}`` (tensor and scalar counts)."""
    state = video.state_dict()
    spatial, temporal = split_keys(state)
    missing = [k for k in spatial if k not in image_state]
    unused = [k for k in image_state if k not in state or is_temporal_key(k)]
    wrong = [f"{k} {tuple(image_state[k].shape)} vs {tuple(state[k].shape)}" for k in spatial
             if k in image_state and tuple(image_state[k].shape) != tuple(state[k].shape)]
    if missing or unused or wrong:
        parts = []
        for what, names in (("spatial tensors without an image weight", missing),
                            ("image tensors the video network has no place for", unused),
                            ("shape mismatches (image vs video)", wrong)):
            if names:
                parts.append(f"{len(names)} {what}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
        raise DiffusionLabError("cannot inflate the image model into the video network: " + "; ".join(parts) +
                                " (the image model must be a unet with the same options as the video_unet)")
    with torch.no_grad():
        for k in spatial:
            state[k].copy_(image_state[k].to(dtype=state[k].dtype, device=state[k].device))
    return {"loaded": len(spatial), "loaded_parameters": int(sum(state[k].numel() for k in spatial)),
            "temporal": len(temporal), "temporal_parameters": int(sum(state[k].numel() for k in temporal))}


def freeze_spatial(video: torch.nn.Module) -> int:
    """Set ``requires_grad = False`` on every spatial parameter of ``video`` (only the temporal layers train);
    returns the number of scalars still trainable."""
    trainable = 0
    for name, p in video.named_parameters():
        p.requires_grad_(is_temporal_key(name))
        trainable += p.numel() if p.requires_grad else 0
    return trainable
