"""Small shared helpers: broadcasting per-sample values against tensors of any rank, the standard error."""

from __future__ import annotations

import math

import torch


def bcast(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample value ``v`` (a scalar or shape ``(B,)``) so that it broadcasts against ``x``.

    ``x`` has shape ``(B, ...)`` of any rank: 2-D points ``(B, D)``, images ``(B, C, H, W)`` and videos
    ``(B, C, F, H, W)`` share every code path through this one helper. The result keeps ``v``'s dtype.
    """
    if not torch.is_tensor(v):
        return torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v
    if v.ndim != 1:
        raise ValueError(f"bcast expects a scalar or a (B,) tensor, got shape {tuple(v.shape)}")
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def mean_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def per_sample_dim(x: torch.Tensor) -> int:
    """Number of scalar entries in one sample of a batch ``(B, ...)``."""
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n


def per_batch(v: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    """A scalar or ``(B,)`` tensor ``v`` as ``(B,)`` for the batch of ``x``; ``what`` names it in the error."""
    if v.ndim == 0:
        return v.expand(x.shape[0])
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        from diffusionlab.errors import DiffusionLabError

        raise DiffusionLabError(
            f"{what} must be a scalar or a ({x.shape[0]},) tensor for a batch of {x.shape[0]}, "
            f"got shape {tuple(v.shape)}"
        )
    return v


def mean_and_stderr(values) -> tuple[float, float | None]:
    """Mean and standard error of the mean of a set of values (a tensor, array or sequence): the sample standard
    deviation (``N - 1``) over ``sqrt(N)``; None for a single value (so that JSON stays valid)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        from diffusionlab.errors import DiffusionLabError

        raise DiffusionLabError("mean_and_stderr got no values")
    return v.mean().item(), (v.std() / math.sqrt(n)).item() if n > 1 else None
