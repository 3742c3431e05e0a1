"""The DDPM / improved-diffusion U-Net (Ho et al. 2020; Nichol & Dhariwal 2021) for images ``(B, C, H, W)``.

Layout (improved-diffusion ``UNetModel``):

- noise embedding: sinusoids of width ``base_channels`` -> ``Linear, SiLU, Linear`` to ``4 * base_channels``;
- a 3x3 input conv, then per level ``num_res_blocks`` residual blocks (self-attention after each block at the
  listed resolutions) and a stride-2 conv down-sampling between levels;
- a middle of ResBlock, attention, ResBlock;
- the mirrored up path with ``num_res_blocks + 1`` blocks per level, each taking the concatenated skip from the
  down path, nearest-neighbour x2 up-sampling followed by a 3x3 conv between levels;
- ``GroupNorm, SiLU`` and a zero-initialised 3x3 output conv to ``out_mult * in_channels`` channels.

A residual block is ``GroupNorm, SiLU, conv3x3, + embedding (or scale-shift: GroupNorm(h) (1 + s) + b),
SiLU, dropout, conv3x3 (zero-init)`` plus a 1x1 skip conv when the channel count changes. Attention uses
:func:`torch.nn.functional.scaled_dot_product_attention` and a zero-initialised output projection, so each
block starts as the identity. GroupNorm uses at most ``groups`` groups, the largest count that divides the
channels. Inputs in ``torch.channels_last`` memory format work unchanged. With ``num_classes`` a label
embedding is added to the noise embedding (guided-diffusion's ``label_emb``; index ``num_classes`` = no label), and
the net is called ``net(x, c_noise, labels)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import int_tuple, positive_int, real
from diffusionlab.models.embedding import (
    LabelEmbedding,
    TimeEmbedding,
    check_c_noise,
    check_num_classes,
    conditional_embedding,
    zero_init,
)


def group_count(channels: int, groups: int) -> int:
    """The largest number of GroupNorm groups ``<= groups`` that divides ``channels``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, groups), channels)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """DDPM residual block conditioned on the (already SiLU-activated) noise embedding ``emb``."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(cin, groups)
        self.conv1 = conv3x3(cin, cout)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = group_norm(cout, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = zero_init(conv3x3(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions, residual, zero-initialised projection."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv, or 2x2 average pooling (DDPM ``downsample``, ``with_conv``)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then a 3x3 conv when ``with_conv`` (DDPM ``upsample``)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbSequential(nn.Sequential):
    """A sequence of layers; :class:`ResBlock` s also receive the noise embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2:
            raise DiffusionLabError(f"image_size must be an int or (H, W), got {image_size!r}")
        return positive_int("image_size[0]", image_size[0]), positive_int("image_size[1]", image_size[1])
    s = positive_int("image_size", image_size)
    return s, s


def check_unet_options(in_channels, base_channels, channel_mults, num_res_blocks, dropout, groups, num_heads,
                       out_mult, scale_shift, conv_resample) -> tuple[int, ...]:
    """Validate the options the U-Nets (2-D and space-time) share; returns ``channel_mults`` as a tuple."""
    positive_int("in_channels", in_channels)
    positive_int("base_channels", base_channels)
    mults = int_tuple("channel_mults", channel_mults)
    positive_int("num_res_blocks", num_res_blocks)
    real("dropout", dropout, 0.0, 1.0, open_high=True)
    positive_int("groups", groups)
    positive_int("num_heads", num_heads)
    positive_int("out_mult", out_mult)
    for flag, value in (("scale_shift", scale_shift), ("conv_resample", conv_resample)):
        if not isinstance(value, bool):
            raise DiffusionLabError(f"{flag} must be true or false, got {value!r}")
    return mults


def unet_layout(base_channels: int, mults, num_res_blocks: int, resolutions: list[int], attn: set[int], block: dict,
                num_heads: int, groups: int, conv_resample: bool, seq, extra=None):
    """DDPM's U-Net layout (Ho et al. 2020, appendix B), shared by :class:`UNet` and the space-time U-Net:
    ``(down, mid, up, out_channels)``. Per level ``num_res_blocks`` residual blocks (``num_res_blocks + 1`` on the way
    up, each taking a skip), attention where ``resolutions[level]`` is in ``attn``, resampling between levels; the
    middle is ResBlock, attention, ResBlock.

    ``seq(spatial, temporal)`` wraps each block: ``spatial`` is the list of the 2-D layers (so a block's parameter
    names are the same in every network built from this layout) and ``temporal`` the layers ``extra(ch, height)``
    returns for a block that starts with a residual block (``height`` is the level's, ``None`` in the middle; the
    space-time U-Net runs them right after that residual block), empty for resampling blocks and without
    ``extra``."""
    extra = extra or (lambda ch, height: [])
    down = nn.ModuleList()
    skips, ch = [base_channels], base_channels
    for level, mult in enumerate(mults):
        for _ in range(num_res_blocks):
            layers = [ResBlock(ch, mult * base_channels, **block)]
            ch = mult * base_channels
            if resolutions[level] in attn:
                layers.append(AttentionBlock(ch, num_heads, groups))
            down.append(seq(layers, extra(ch, resolutions[level])))
            skips.append(ch)
        if level != len(mults) - 1:
            down.append(seq([Downsample(ch, conv_resample)], []))
            skips.append(ch)
    mid = seq([ResBlock(ch, ch, **block), AttentionBlock(ch, num_heads, groups), ResBlock(ch, ch, **block)],
              extra(ch, None))
    up = nn.ModuleList()
    for level in reversed(range(len(mults))):
        for i in range(num_res_blocks + 1):
            layers = [ResBlock(ch + skips.pop(), mults[level] * base_channels, **block)]
            ch = mults[level] * base_channels
            if resolutions[level] in attn:
                layers.append(AttentionBlock(ch, num_heads, groups))
            if level and i == num_res_blocks:
                layers.append(Upsample(ch, conv_resample))
            up.append(seq(layers, extra(ch, resolutions[level])))
    return down, mid, up, ch


def input_channels(net) -> str:
    """The input channels of ``net`` for an error message: ``C``, or ``C + K`` naming the self-conditioning input."""
    if not net.cond_channels:
        return str(net.in_channels)
    return f"{net.in_channels} + {net.cond_channels} (the self-conditioning x_0 estimate)"


class UNet(nn.Module):
    """Noise-conditioned U-Net: ``net(x (B, C, H, W), c_noise (B,), labels=None) -> (B, out_mult * C, H, W)``.

    Args:
        in_channels: the images' channels C (set from the data in a config)
        base_channels: channels of the first level; level i has channel_mults[i] * base_channels, the noise
            embedding 4 * base_channels
        channel_mults: channel multiplier per level, one level per entry; each level after the first halves H and
            W (both must divide by 2**(levels - 1))
        num_res_blocks: residual blocks per level on the way down (num_res_blocks + 1 on the way up)
        attn_resolutions: the heights at which a self-attention block follows each residual block ([]: none; unset:
            DDPM's 16 where the network visits it); the middle always has one
        dropout: dropout probability in [0, 1) inside each residual block, before its second conv (DDPM: 0.1 on
            CIFAR-10)
        groups: the most GroupNorm groups (Wu & He 2018) of each norm, which takes the largest count <= groups that
            divides its channels (improved-diffusion: 32)
        num_heads: heads of each self-attention block (they must divide its channels)
        out_mult: output channels out_mult * in_channels (2 for a learned variance; set from the objective in a config)
        image_size: the side, or (H, W) (set from the data in a config)
        scale_shift: the FiLM-style scale/shift of the noise embedding in each residual block, GroupNorm(h) (1 + s)
            + b, as in improved-diffusion (Nichol & Dhariwal 2021, use_scale_shift_norm); false: DDPM's
            GroupNorm(h + emb)
        conv_resample: resample with convs (stride-2 3x3 conv down; nearest x2, then a 3x3 conv up: DDPM's
            resamp_with_conv); false: 2x2 average pooling and plain nearest neighbour, without convs (at 8x8 this
            saves the costliest conv of the network, the up-sampling one at full resolution)
        num_classes: class-conditional on labels 0..num_classes-1 (the label embedding added to the noise
            embedding, as in guided-diffusion), index num_classes = "no label" for classifier-free guidance (Ho &
            Salimans 2022; trained by train.p_uncond); unset: unconditional
        cond_channels: extra input channels appended to the C image channels (the self-conditioning estimate of
            x_0, Chen et al. 2022; set from parametrization.self_condition in a config); the output keeps
            out_mult * C channels
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] | None = None,
        dropout: float = 0.0,
        groups: int = 8,
        num_heads: int = 1,
        out_mult: int = 1,
        image_size: int | Sequence[int] = 32,
        scale_shift: bool = True,
        conv_resample: bool = True,
        num_classes: int | None = None,
        cond_channels: int = 0,
    ):
        super().__init__()
        mults = check_unet_options(in_channels, base_channels, channel_mults, num_res_blocks, dropout, groups,
                                   num_heads, out_mult, scale_shift, conv_resample)
        self.in_channels, self.out_mult = in_channels, out_mult
        self.cond_channels = positive_int("cond_channels", cond_channels, minimum=0)
        self.image_hw = _image_hw(image_size)
        resolutions = self._resolutions(self.image_hw, len(mults))
        attn = self._attention_at(attn_resolutions, resolutions)
        self._check_heads(num_heads, base_channels, mults, resolutions, attn)

        emb_dim = 4 * base_channels
        self.time = TimeEmbedding(base_channels, emb_dim)
        block = dict(emb_dim=emb_dim, dropout=dropout, groups=groups, scale_shift=scale_shift)

        self.inp = conv3x3(in_channels + self.cond_channels, base_channels)
        self.down, self.mid, self.up, ch = unet_layout(
            base_channels, mults, num_res_blocks, resolutions, attn, block, num_heads, groups, conv_resample,
            seq=lambda spatial, temporal: EmbSequential(*spatial))
        self.out_norm = group_norm(ch, groups)
        self.out = zero_init(conv3x3(ch, out_mult * in_channels))
        # created last, so the other layers draw the same initial weights as the unconditional net's
        self.num_classes = check_num_classes(num_classes)
        self.label = None if num_classes is None else LabelEmbedding(num_classes, emb_dim)

    @staticmethod
    def _resolutions(hw: tuple[int, int], levels: int) -> list[int]:
        """Heights visited per level; each down-sampling must halve both sides exactly."""
        factor = 2 ** (levels - 1)
        for side, name in zip(hw, ("height", "width")):
            if side % factor:
                raise DiffusionLabError(
                    f"image {name} {side} is not divisible by 2**(levels-1) = {factor} for {levels} levels "
                    f"(channel_mults has {levels} entries); use fewer levels or an image size divisible by {factor}"
                )
        return [hw[0] // 2**i for i in range(levels)]

    @staticmethod
    def _attention_at(attn_resolutions, resolutions: list[int]) -> set[int]:
        if attn_resolutions is None:
            return {16} & set(resolutions)
        attn = set(int_tuple("attn_resolutions", attn_resolutions, allow_empty=True))
        bad = sorted(attn - set(resolutions))
        if bad:
            raise DiffusionLabError(
                f"attn_resolutions {list(attn_resolutions)} contains {bad}, which this U-Net never visits; "
                f"allowed: {resolutions} (the height at each level)"
            )
        return attn

    @staticmethod
    def _check_heads(num_heads: int, base: int, mults: tuple[int, ...], resolutions: list[int],
                     attn: set[int]) -> None:
        """Every attention block (the listed levels and the middle) splits its channels into heads."""
        for level, m in enumerate(mults):
            if (resolutions[level] in attn or level == len(mults) - 1) and (m * base) % num_heads:
                raise DiffusionLabError(
                    f"num_heads {num_heads} must divide the channels of every attention block; "
                    f"{m} * base_channels = {m * base} is not divisible by it"
                )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        c = self.in_channels + self.cond_channels
        if x.ndim != 4 or x.shape[1] != c or tuple(x.shape[2:]) != self.image_hw:
            raise DiffusionLabError(
                f"UNet expects images of shape (B, {input_channels(self)}, {self.image_hw[0]}, {self.image_hw[1]}), got "
                f"{tuple(x.shape)}"
            )
        emb = F.silu(conditional_embedding(self.time(check_c_noise(c_noise, x)), self.label, labels, x, "UNet"))
        h = self.inp(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))
