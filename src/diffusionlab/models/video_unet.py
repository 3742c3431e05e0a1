"""A factorized space-time U-Net for videos ``(B, C, F, H, W)``: ``net(x, c_noise) -> (B, out_mult * C, F, H, W)``.

Factorized as in video diffusion models (Ho et al. 2022, "Video diffusion models"; Ge et al. 2023, PYoCo,
whose noise priors this library pairs it with): every spatial layer is the 2-D U-Net's own layer
(:mod:`diffusionlab.models.unet`, imported, not copied) applied to each frame separately by folding the frames
into the batch, ``(B, C, F, H, W) -> (B * F, C, H, W)``; frames interact only through temporal layers placed
after each residual block:

- :class:`TemporalConv` -- ``GroupNorm, SiLU`` and a 1-D convolution across frames (kernel 3, zero padding) for
  every pixel (a ``(k, 1, 1)`` 3-D convolution), zero-initialised and residual;
- :class:`TemporalAttention` -- multi-head self-attention across the ``F`` frames of every pixel, with a learned
  frame-position embedding, zero-initialised output projection, residual.

``temporal`` chooses ``"conv"``, ``"attention"`` or ``"both"`` (conv then attention). Spatial self-attention
(the 2-D U-Net's :class:`~diffusionlab.models.unet.AttentionBlock`, per frame) runs at the heights listed in
``attn_resolutions`` and in the middle. The noise embedding is the DDPM one
(:class:`~diffusionlab.models.embedding.TimeEmbedding`), shared by the frames of a video. The output conv is
zero-initialised, so an untrained network predicts 0 and every temporal layer starts as the identity. With
``num_classes`` a label embedding (one per video, e.g. the moving digit's class) is added to the noise embedding, as in
the 2-D U-Net.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import check_keys, positive_int
from diffusionlab.models.embedding import (
    LabelEmbedding,
    TimeEmbedding,
    check_c_noise,
    check_num_classes,
    conditional_embedding,
    zero_init,
)
from diffusionlab.models.unet import (
    ResBlock,
    UNet,
    check_unet_options,
    conv3x3,
    group_norm,
    unet_layout,
)

TEMPORAL = ("conv", "attention", "both")


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W) -> (B * F, C, H, W)``: frames folded into the batch (frame index fastest)."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def from_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of :func:`to_frames`: ``(B * F, C, H, W) -> (B, C, F, H, W)``."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).transpose(1, 2)


class TemporalConv(nn.Module):
    """``x + Conv_t(SiLU(GroupNorm(x)))`` on ``(B * F, C, H, W)``: a 1-D conv across frames at every pixel."""

    def __init__(self, channels: int, groups: int, kernel: int = 3):
        super().__init__()
        if kernel % 2 != 1:
            raise DiffusionLabError(f"temporal kernel must be odd, got {kernel!r}")
        self.norm = group_norm(channels, groups)
        self.conv = zero_init(nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0)))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        v = from_frames(x, frames)  # (B, C, F, H, W); GroupNorm pools over the whole video
        return x + to_frames(self.conv(F.silu(self.norm(v))))


class TemporalAttention(nn.Module):
    """Self-attention across the frames of each pixel, with a learned frame-position embedding (up to
    ``max_frames``), zero-initialised output projection, residual."""

    def __init__(self, channels: int, num_heads: int, groups: int, max_frames: int):
        super().__init__()
        if channels % num_heads:
            raise DiffusionLabError(f"num_heads {num_heads} must divide the {channels} channels of temporal attention")
        self.heads = num_heads
        self.norm = group_norm(channels, groups)
        self.pos = nn.Parameter(torch.zeros(max_frames, channels))
        nn.init.normal_(self.pos, std=0.02)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        if frames > self.pos.shape[0]:
            raise DiffusionLabError(f"temporal attention was built for at most {self.pos.shape[0]} frames, got {frames}")
        v = self.norm(from_frames(x, frames))  # (B, C, F, H, W)
        b, c, f, h, w = v.shape
        seq = v.permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c) + self.pos[:f]
        q, k, val = self.qkv(seq).reshape(b * h * w, f, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, val)  # (BHW, heads, F, C / heads)
        o = self.proj(o.transpose(1, 2).reshape(b * h * w, f, c))
        o = o.reshape(b, h, w, f, c).permute(0, 4, 3, 1, 2)  # (B, C, F, H, W)
        return x + to_frames(o)


class SpaceTimeSequential(nn.ModuleList):
    """Layers applied in order to ``(B * F, C, H, W)``: residual blocks get the per-frame embedding, temporal
    layers the frame count, the rest only ``x``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (TemporalConv, TemporalAttention)):
                x = layer(x, frames)
            else:
                x = layer(x)
        return x


class VideoUNet(nn.Module):
    """Factorized space-time U-Net (module docstring): ``net(x (B, C, F, H, W), c_noise (B,))``.

    The layout mirrors :class:`~diffusionlab.models.unet.UNet` (same options, same validation of sizes, heads
    and attention resolutions) with a temporal layer after every residual block (``temporal``; ``temporal_kernel``
    for the conv) and in the middle.
    """

    def __init__(
        self,
        in_channels: int = 1,
        frames: int = 8,
        image_size: int | Sequence[int] = 16,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] | None = None,
        dropout: float = 0.0,
        groups: int = 8,
        num_heads: int = 1,
        out_mult: int = 1,
        scale_shift: bool = True,
        conv_resample: bool = True,
        temporal: str = "conv",
        temporal_kernel: int = 3,
        num_classes: int | None = None,
    ):
        super().__init__()
        mults = check_unet_options(in_channels, base_channels, channel_mults, num_res_blocks, dropout, groups,
                                   num_heads, out_mult, scale_shift, conv_resample)
        self.in_channels, self.out_mult = in_channels, out_mult
        self.frames = positive_int("frames", frames)
        positive_int("temporal_kernel", temporal_kernel)
        if temporal not in TEMPORAL:
            raise DiffusionLabError(f"temporal must be one of {', '.join(TEMPORAL)}; got {temporal!r}")
        if isinstance(image_size, (list, tuple)):
            if len(image_size) != 2:
                raise DiffusionLabError(f"image_size must be an int or (H, W), got {image_size!r}")
            hw = (positive_int("image_size[0]", image_size[0]), positive_int("image_size[1]", image_size[1]))
        else:
            hw = (positive_int("image_size", image_size),) * 2
        self.image_hw = hw
        resolutions = UNet._resolutions(hw, len(mults))
        attn = UNet._attention_at(attn_resolutions, resolutions)
        UNet._check_heads(num_heads, base_channels, mults, resolutions, attn)

        emb_dim = 4 * base_channels
        self.time = TimeEmbedding(base_channels, emb_dim)
        block = dict(emb_dim=emb_dim, dropout=dropout, groups=groups, scale_shift=scale_shift)

        def temporal_layers(ch: int) -> list[nn.Module]:
            out: list[nn.Module] = []
            if temporal in ("conv", "both"):
                out.append(TemporalConv(ch, groups, temporal_kernel))
            if temporal in ("attention", "both"):
                out.append(TemporalAttention(ch, num_heads, groups, self.frames))
            return out

        self.inp = conv3x3(in_channels, base_channels)
        self.down, self.mid, self.up, ch = unet_layout(
            base_channels, mults, num_res_blocks, resolutions, attn, block, num_heads, groups, conv_resample,
            seq=SpaceTimeSequential, extra=temporal_layers)
        self.out_norm = group_norm(ch, groups)
        self.out = zero_init(conv3x3(ch, out_mult * in_channels))
        # created last, so the other layers draw the same initial weights as the unconditional net's
        self.num_classes = check_num_classes(num_classes)
        self.label = None if num_classes is None else LabelEmbedding(num_classes, emb_dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[3:]) != self.image_hw:
            raise DiffusionLabError(
                f"VideoUNet expects videos of shape (B, {self.in_channels}, F, {self.image_hw[0]}, "
                f"{self.image_hw[1]}), got {tuple(x.shape)}"
            )
        frames = x.shape[2]
        if frames > self.frames and any(isinstance(m, TemporalAttention) for m in self.modules()):
            raise DiffusionLabError(f"VideoUNet was built for at most {self.frames} frames, got {frames}")
        emb = F.silu(conditional_embedding(self.time(check_c_noise(c_noise, x)), self.label, labels, x, "VideoUNet"))
        emb = emb.repeat_interleave(frames, dim=0)  # one embedding per frame, frame index fastest
        h = self.inp(to_frames(x))
        skips = [h]
        for layer in self.down:
            h = layer(h, emb, frames)
            skips.append(h)
        h = self.mid(h, emb, frames)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb, frames)
        return from_frames(self.out(F.silu(self.out_norm(h))), frames)


#: options of ``{"name": "video_unet", ...}`` (the sizes are inferred from the data)
VIDEO_UNET_OPTIONS = ("base_channels", "channel_mults", "num_res_blocks", "attn_resolutions", "dropout", "groups",
                      "num_heads", "scale_shift", "conv_resample", "temporal", "temporal_kernel", "num_classes")


def build_video_unet(opts: dict, sample_shape: Sequence[int], out_mult: int = 1) -> VideoUNet:
    """A :class:`VideoUNet` for samples ``(C, F, H, W)`` from the options of a ``video_unet`` network config
    (without ``name``); ``in_channels``, ``frames`` and ``image_size`` come from ``sample_shape``."""
    opts = dict(opts)
    opts.pop("name", None)
    check_keys(opts, VIDEO_UNET_OPTIONS, "network 'video_unet'")
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 4:
        raise DiffusionLabError(f"video_unet needs videos (C, F, H, W), got sample shape {shape}")
    for key in ("channel_mults", "attn_resolutions"):
        if isinstance(opts.get(key), list):
            opts[key] = tuple(opts[key])
    c, f, h, w = shape
    return VideoUNet(in_channels=c, frames=f, image_size=(h, w), out_mult=out_mult, **opts)
