"""Tiling images into one array (shared by the figure writers of :mod:`diffusionlab.plotting` and
:mod:`diffusionlab.video_io`)."""

from __future__ import annotations

import math

import numpy as np
import torch


def image_grid(x01, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` in [0, 1] into one uint8 array ``(H', W')`` or ``(H', W', 3)``."""
    x = torch.as_tensor(x01).detach().float().cpu().clamp(0, 1)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = (grid.numpy() * 255 + 0.5).astype(np.uint8)
    return arr[0] if c == 1 else arr.transpose(1, 2, 0)


def enlarge(arr: np.ndarray, scale: int) -> np.ndarray:
    """Each pixel of an ``(H, W[, ...])`` array repeated ``scale x scale`` times (nearest neighbour)."""
    if scale <= 1:
        return arr
    return np.kron(arr, np.ones((scale, scale) + ((1,) * (arr.ndim - 2)), dtype=arr.dtype))
