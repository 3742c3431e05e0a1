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


def as_labels(labels, x: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Class labels (an int, a 0-d or ``(B,)`` integer tensor) as a ``(B,)`` int64 tensor on ``x``'s device for the
    batch of ``x``. With ``num_classes`` the values must lie in ``0..num_classes`` (``num_classes`` is the "no label"
    index); they are checked on the CPU only, so an accelerator never waits for the host."""
    from diffusionlab.errors import DiffusionLabError

    if isinstance(labels, bool) or not (isinstance(labels, int) or torch.is_tensor(labels)):
        raise DiffusionLabError(f"labels must be an int or an integer tensor, got {labels!r}")
    lab = torch.as_tensor(labels, device=x.device)
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.is_complex():
        raise DiffusionLabError(f"labels must be integers, got dtype {lab.dtype}")
    lab = per_batch(lab.to(torch.long), x, "labels")
    if num_classes is not None and lab.device.type == "cpu" and lab.numel():
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi > num_classes:
            raise DiffusionLabError(f"labels must lie in 0..{num_classes} ({num_classes} classes, {num_classes} = no "
                                    f"label), got {lo}..{hi}")
    return lab


def as_mask(mask, shape) -> torch.Tensor:
    """A mask (1 = known, 0 = unknown; bool or numbers) broadcast to ``shape`` as a bool tensor on its own device;
    entries other than 0 and 1 are refused."""
    from diffusionlab.errors import DiffusionLabError

    m = torch.as_tensor(mask)
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise DiffusionLabError("a mask holds 0 (unknown) and 1 (known) only")
        m = m != 0
    try:
        return torch.broadcast_to(m, tuple(shape)).clone()
    except RuntimeError:
        raise DiffusionLabError(f"a mask of shape {tuple(m.shape)} does not broadcast to the samples' shape "
                                f"{tuple(shape)}") from None
