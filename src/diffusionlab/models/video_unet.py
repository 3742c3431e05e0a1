"""A factorized space-time U-Net for videos ``(B, C, F, H, W)``: ``net(x, c_noise) -> (B, out_mult * C, F, H, W)``.

Factorized as in video diffusion models (Ho et al. 2022, "Video diffusion models"; Ge et al. 2023, PYoCo,
whose noise priors this library pairs it with): every spatial layer is the 2-D U-Net's own layer
(:mod:`diffusionlab.models.unet`, imported, not copied; the layout is the shared
:func:`~diffusionlab.models.unet.unet_layout`) applied to each frame separately by folding the frames into the
batch, ``(B, C, F, H, W) -> (B * F, C, H, W)``; frames interact only through temporal layers placed right after
the residual block of every block:

- :class:`TemporalConv` -- ``GroupNorm, SiLU`` and a 1-D convolution across frames (kernel 3, zero padding) for
  every pixel (a ``(k, 1, 1)`` 3-D convolution, computed as a matrix product), zero-initialised and residual;
- :class:`TemporalAttention` -- multi-head self-attention across the ``F`` frames of every pixel, with a learned
  frame-position embedding, zero-initialised output projection, residual.

``temporal`` chooses ``"conv"``, ``"attention"`` or ``"both"`` (conv then attention), ``temporal_attn_resolutions``
where the attention goes and ``temporal_attention`` its kind (``"spacetime"``: joint attention over all positions
of all frames, for objects that move). Spatial self-attention (the 2-D U-Net's
:class:`~diffusionlab.models.unet.AttentionBlock`, per frame) runs at the heights listed in ``attn_resolutions``
and in the middle. The noise embedding is the DDPM one (:class:`~diffusionlab.models.embedding.TimeEmbedding`),
shared by the frames of a video. The output conv is zero-initialised, so an untrained network predicts 0, and
every temporal layer starts as the identity.

**Image-to-video inflation.** Every spatial parameter has the name it has in the 2-D
:class:`~diffusionlab.models.unet.UNet` of the same options (the temporal ones live under ``.temporal.``,
:func:`is_temporal_key`), so an image model's state dict loads into the space-time U-Net completely, and at
initialisation the inflated network *is* the image network applied frame by frame
(:mod:`diffusionlab.models.inflate`; Ho et al. 2022, Sec. 3; Blattmann et al. 2023, "Align your latents").
 With
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
    _image_hw,
    check_unet_options,
    conv3x3,
    group_norm,
    input_channels,
    unet_layout,
)

TEMPORAL = ("conv", "attention", "both")
TEMPORAL_ATTENTION = ("frames", "spacetime")  #: per-pixel attention across frames, or joint over space and time


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W) -> (B * F, C, H, W)``: frames folded into the batch (frame index fastest). A video in
    ``torch.channels_last_3d`` memory gives a channels-last view (no copy); a contiguous one is copied."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def from_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of :func:`to_frames`: ``(B * F, C, H, W) -> (B, C, F, H, W)`` (a view)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).transpose(1, 2)


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in the memory format of the 4-D ``x`` (so a residual sum runs on matching layouts)."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


class TemporalConv(nn.Module):
    """``x + Conv_t(SiLU(GroupNorm(x)))`` on ``(B * F, C, H, W)``: a 1-D convolution across frames (kernel ``k``,
    zero padding) at every pixel, i.e. a ``(k, 1, 1)`` 3-D convolution, computed as one matrix product of the ``k``
    frame-shifted copies with ``mix`` (``Linear(k C, C)``; input block ``j`` is frame offset ``j - k // 2``), which
    is faster on the CPU than a 3-D convolution with a ``(k, 1, 1)`` kernel and runs in either memory format.
    GroupNorm pools over the whole video. ``mix`` is zero-initialised, so the layer starts as the identity."""

    def __init__(self, channels: int, groups: int, kernel: int = 3):
        super().__init__()
        if kernel % 2 != 1:
            raise DiffusionLabError(f"temporal kernel must be odd, got {kernel!r}")
        self.kernel = kernel
        self.norm = group_norm(channels, groups)
        self.mix = zero_init(nn.Linear(kernel * channels, channels))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        v = F.silu(self.norm(from_frames(x, frames))).permute(0, 2, 3, 4, 1)  # (B, F, H, W, C)
        p = self.kernel // 2
        if p:
            v = F.pad(v, (0, 0, 0, 0, 0, 0, p, p))
        taps = torch.cat([v[:, j:j + frames] for j in range(self.kernel)], dim=-1)  # (B, F, H, W, k C)
        y = self.mix(taps).permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)
        return x + _like(to_frames(y), x)


class TemporalAttention(nn.Module):
    """Self-attention across frames, with a learned frame-position embedding (up to ``max_frames``),
    zero-initialised output projection, residual. ``joint=False``: the ``F`` frames of each pixel attend to each
    other (the factorized temporal attention of Ho et al. 2022); ``joint=True``: all ``F H W`` positions of a video
    attend to each other (joint space-time attention, Bertasius et al. 2021, "Is space-time attention all you
    need?", Sec. 3), which lets a frame find an object wherever it has moved -- affordable at low resolution."""

    def __init__(self, channels: int, num_heads: int, groups: int, max_frames: int, joint: bool = False):
        super().__init__()
        if channels % num_heads:
            raise DiffusionLabError(f"num_heads {num_heads} must divide the {channels} channels of temporal attention")
        self.heads = num_heads
        self.joint = bool(joint)
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
        tokens = v.permute(0, 3, 4, 2, 1) + self.pos[:f]  # (B, H, W, F, C)
        if self.joint:
            tokens = tokens.permute(0, 3, 1, 2, 4)  # (B, F, H, W, C): one sequence of F H W per video
        n, length = (b, f * h * w) if self.joint else (b * h * w, f)
        q, k, val = self.qkv(tokens.reshape(n, length, c)).reshape(n, length, 3, self.heads, c // self.heads) \
            .permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, val)  # (n, heads, length, C / heads)
        o = self.proj(o.transpose(1, 2).reshape(n, length, c))
        if self.joint:
            o = o.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)
        else:
            o = o.reshape(b, h, w, f, c).permute(0, 4, 3, 1, 2)
        return x + _like(to_frames(o), x)


class SpaceTimeBlock(nn.Module):
    """One block of the space-time U-Net on ``(B * F, C, H, W)``: the 2-D U-Net's layers, registered under the
    names ``"0"``, ``"1"``, ... exactly as in the 2-D U-Net's block (so an image model's weights load by name),
    and the temporal layers under ``temporal``, run right after the first (residual) layer."""

    def __init__(self, spatial: list[nn.Module], temporal: list[nn.Module]):
        super().__init__()
        for i, layer in enumerate(spatial):
            self.add_module(str(i), layer)
        self.num_spatial = len(spatial)
        self.temporal = nn.ModuleList(temporal)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
        for i in range(self.num_spatial):
            layer = self._modules[str(i)]
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
            if i == 0:
                for t in self.temporal:
                    x = t(x, frames)
        return x


def is_temporal_key(name: str) -> bool:
    """Whether a state-dict key of a :class:`VideoUNet` (or a model wrapping one) belongs to a temporal layer."""
    return ".temporal." in f".{name}"


class VideoUNet(nn.Module):
    """Factorized space-time U-Net (module docstring): ``net(x (B, C, F, H, W), c_noise (B,))``.

    The layout is :class:`~diffusionlab.models.unet.UNet`'s (:func:`~diffusionlab.models.unet.unet_layout`: same
    options, same validation of sizes, heads and attention resolutions, and the same parameter names for every
    spatial layer) with temporal layers after the residual block of every block (``temporal``; ``temporal_kernel``
    for the conv). ``temporal_attn_resolutions`` lists the heights where temporal attention is placed (``None``:
    every level); the middle always has it when ``temporal`` includes attention; with ``"both"`` the other levels
    keep the conv. ``temporal_attention``: ``"frames"`` (each pixel across frames) or ``"spacetime"`` (all
    positions of all frames; :class:`TemporalAttention`). A video in ``torch.channels_last_3d`` memory runs every
    spatial layer channels-last.

    Args:
        in_channels: the videos' channels C (set from the data in a config)
        frames: the most frames temporal attention takes (its frame-position table; set from the data in a config)
        image_size: the frames' side, or (H, W) (set from the data in a config)
        base_channels: channels of the first level; level i has channel_mults[i] * base_channels, the noise
            embedding 4 * base_channels
        channel_mults: channel multiplier per level, one level per entry; each level after the first halves H and
            W (both must divide by 2**(levels - 1))
        num_res_blocks: residual blocks per level on the way down (num_res_blocks + 1 on the way up)
        attn_resolutions: the heights at which spatial self-attention (per frame) follows each residual block ([]:
            none; unset: DDPM's 16 where the network visits it); the middle always has one
        dropout: dropout probability in [0, 1) inside each residual block, before its second conv (DDPM: 0.1 on
            CIFAR-10)
        groups: the most GroupNorm groups (Wu & He 2018) of each norm, which takes the largest count <= groups that
            divides its channels (improved-diffusion: 32)
        num_heads: heads of each self-attention block (they must divide its channels)
        out_mult: output channels out_mult * in_channels (2 for a learned variance; set from the objective in a config)
        scale_shift: the FiLM-style scale/shift of the noise embedding in each residual block, GroupNorm(h) (1 + s)
            + b, as in improved-diffusion (Nichol & Dhariwal 2021, use_scale_shift_norm); false: DDPM's
            GroupNorm(h + emb)
        conv_resample: resample with convs (stride-2 3x3 conv down; nearest x2, then a 3x3 conv up: DDPM's
            resamp_with_conv); false: 2x2 average pooling and plain nearest neighbour, without convs (at 8x8 this
            saves the costliest conv of the network, the up-sampling one at full resolution)
        temporal: the temporal layers after each block's residual block: conv, attention (only where
            temporal_attn_resolutions says and in the middle) or both (the conv everywhere, then that attention)
        temporal_kernel: frames the temporal conv spans, odd (3: each frame and its two neighbours, zero-padded)
        temporal_attn_resolutions: the heights at which temporal attention is placed (unset: every level); the middle
            always has it
        temporal_attention: frames (each pixel attends across the F frames, Ho et al. 2022) or spacetime (all F H W
            positions of a video attend jointly, Bertasius et al. 2021)
        num_classes: class-conditional on labels 0..num_classes-1 (the label embedding added to the noise
            embedding, as in guided-diffusion), index num_classes = "no label" for classifier-free guidance (Ho &
            Salimans 2022; trained by train.p_uncond); unset: unconditional
        cond_channels: extra input channels appended to the C video channels (the self-conditioning estimate of
            x_0, Chen et al. 2022; set from parametrization.self_condition in a config); the output keeps
            out_mult * C channels
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
        temporal_attn_resolutions: Sequence[int] | None = None,
        temporal_attention: str = "frames",
        num_classes: int | None = None,
        cond_channels: int = 0,
    ):
        super().__init__()
        mults = check_unet_options(in_channels, base_channels, channel_mults, num_res_blocks, dropout, groups,
                                   num_heads, out_mult, scale_shift, conv_resample)
        self.in_channels, self.out_mult = in_channels, out_mult
        self.cond_channels = positive_int("cond_channels", cond_channels, minimum=0)
        self.frames = positive_int("frames", frames)
        positive_int("temporal_kernel", temporal_kernel)
        if temporal not in TEMPORAL:
            raise DiffusionLabError(f"temporal must be one of {', '.join(TEMPORAL)}; got {temporal!r}")
        if temporal_attention not in TEMPORAL_ATTENTION:
            raise DiffusionLabError(f"temporal_attention must be one of {', '.join(TEMPORAL_ATTENTION)}; got "
                                    f"{temporal_attention!r}")
        self.image_hw = _image_hw(image_size)
        resolutions = UNet._resolutions(self.image_hw, len(mults))
        attn = UNet._attention_at(attn_resolutions, resolutions)
        UNet._check_heads(num_heads, base_channels, mults, resolutions, attn)
        t_attn = set(resolutions) if temporal_attn_resolutions is None else \
            UNet._attention_at(temporal_attn_resolutions, resolutions)

        emb_dim = 4 * base_channels
        self.time = TimeEmbedding(base_channels, emb_dim)
        block = dict(emb_dim=emb_dim, dropout=dropout, groups=groups, scale_shift=scale_shift)

        def temporal_layers(ch: int, height: int | None) -> list[nn.Module]:
            attention = temporal in ("attention", "both") and (height is None or height in t_attn)
            out: list[nn.Module] = []
            if temporal in ("conv", "both"):
                out.append(TemporalConv(ch, groups, temporal_kernel))
            if attention:
                out.append(TemporalAttention(ch, num_heads, groups, self.frames, temporal_attention == "spacetime"))
            return out

        self.inp = conv3x3(in_channels + self.cond_channels, base_channels)
        self.down, self.mid, self.up, ch = unet_layout(
            base_channels, mults, num_res_blocks, resolutions, attn, block, num_heads, groups, conv_resample,
            seq=SpaceTimeBlock, extra=temporal_layers)
        self.out_norm = group_norm(ch, groups)
        self.out = zero_init(conv3x3(ch, out_mult * in_channels))
        # created last, so the other layers draw the same initial weights as the unconditional net's
        self.num_classes = check_num_classes(num_classes)
        self.label = None if num_classes is None else LabelEmbedding(num_classes, emb_dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        c = self.in_channels + self.cond_channels
        if x.ndim != 5 or x.shape[1] != c or tuple(x.shape[3:]) != self.image_hw:
            raise DiffusionLabError(
                f"VideoUNet expects videos of shape (B, {input_channels(self)}, F, {self.image_hw[0]}, "
                f"{self.image_hw[1]}), got "
                f"{tuple(x.shape)}"
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
                      "num_heads", "scale_shift", "conv_resample", "temporal", "temporal_kernel",
                      "temporal_attn_resolutions", "temporal_attention", "num_classes")


def build_video_unet(opts: dict, sample_shape: Sequence[int], out_mult: int = 1, cond_channels: int = 0) -> VideoUNet:
    """A :class:`VideoUNet` for samples ``(C, F, H, W)`` from the options of a ``video_unet`` network config
    (without ``name``); ``in_channels``, ``frames`` and ``image_size`` come from ``sample_shape``, ``cond_channels``
    from the model (self-conditioning)."""
    opts = dict(opts)
    opts.pop("name", None)
    check_keys(opts, VIDEO_UNET_OPTIONS, "network 'video_unet'")
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 4:
        raise DiffusionLabError(f"video_unet needs videos (C, F, H, W), got sample shape {shape}")
    for key in ("channel_mults", "attn_resolutions", "temporal_attn_resolutions"):
        if isinstance(opts.get(key), list):
            opts[key] = tuple(opts[key])
    c, f, h, w = shape
    return VideoUNet(in_channels=c, frames=f, image_size=(h, w), out_mult=out_mult, cond_channels=cond_channels,
                     **opts)
