"""The one map between display space and model space.

Display space is ``[0, 1]`` (what images are shown and saved in); model space is ``[-1, 1]`` (what the
diffusion models see, as in DDPM, Ho et al. 2020, Sec. 3.3: "image data consisting of integers in
{0, ..., 255} scaled linearly to [-1, 1]"). Every other module imports these helpers rather than
re-deriving the affine map.
"""

from __future__ import annotations

import numpy as np
import torch


def to_model(x01):
    """``[0, 1] -> [-1, 1]``: ``2 x - 1`` (tensors or arrays)."""
    return x01 * 2 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1] -> [0, 1]``: ``(x + 1) / 2`` clamped to ``[0, 1]`` (model samples may overshoot)."""
    return ((x + 1) / 2).clamp(0, 1)


def from_uint8(u8, device: torch.device | str | None = None) -> torch.Tensor:
    """Bytes ``0..255`` (tensor or array) to a float32 model-space tensor: ``to_model(u8 / 255)``."""
    if isinstance(u8, np.ndarray):  # converted in numpy: works for read-only buffers (np.frombuffer)
        t = torch.from_numpy(np.asarray(u8, dtype=np.float32))
    else:
        t = torch.as_tensor(u8).to(torch.float32)
    return to_model(t.to(device) / 255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A model-space tensor to display bytes ``0..255``: ``round(255 to_unit(x))``."""
    return (to_unit(x) * 255).round().to(torch.uint8)


def unit_to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """A display-space tensor ``[0, 1]`` to bytes (clamped, rounded)."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8)
