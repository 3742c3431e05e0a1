"""Writing videos: ``.npz`` arrays, animated GIF, MP4 (when an imageio ffmpeg/pyav plugin is installed) and a
frame-grid PNG (one row per video, one column per frame).

Every writer takes videos in display space, ``(N, C, F, H, W)`` in ``[0, 1]`` (a dataset's ``to_display`` of
model-space samples; ``C`` = 1 or 3), also a single video ``(C, F, H, W)``; values are clamped to ``[0, 1]``.
Files are written to a temporary name and renamed, so a failed write leaves nothing half-written.
:func:`save_videos` picks the writer from the suffix.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.io import atomic_path
from diffusionlab.tiling import enlarge, image_grid

VIDEO_SUFFIXES = (".npz", ".npy", ".gif", ".mp4", ".png")


def as_videos(x) -> torch.Tensor:
    """``x`` as a float32 CPU tensor ``(N, C, F, H, W)`` clamped to ``[0, 1]`` (a single ``(C, F, H, W)`` gets N = 1)."""
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to("cpu", torch.float32)
    if t.ndim == 4:
        t = t[None]
    if t.ndim != 5 or t.shape[1] not in (1, 3) or min(t.shape) < 1:
        raise DiffusionLabError(f"videos must have shape (N, C, F, H, W) with C = 1 or 3, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise DiffusionLabError("videos contain NaN or infinite values")
    return t.clamp(0, 1)


def _atomic(path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary next to ``path`` (it keeps the suffix, for imageio), then rename it
    to ``path`` (:func:`diffusionlab.io.atomic_path`)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as e:
        raise DiffusionLabError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def tile_frames(videos, ncol: int | None = None, scale: int = 4, pad: int = 1) -> np.ndarray:
    """One uint8 image per frame, the ``N`` videos tiled ``ncol`` per row (default ``ceil(sqrt(N))``):
    ``(F, H', W')`` for grey, ``(F, H', W', 3)`` for colour; pixels enlarged ``scale`` times."""
    v = as_videos(videos)
    ncol = ncol or max(1, math.ceil(math.sqrt(v.shape[0])))
    frames = [enlarge(image_grid(v[:, :, f], nrow=ncol, pad=pad), scale) for f in range(v.shape[2])]
    return np.stack(frames)


def frame_grid(videos, scale: int = 4, pad: int = 1) -> np.ndarray:
    """A uint8 image with one row per video and one column per frame (``(H', W')`` or ``(H', W', 3)``)."""
    v = as_videos(videos)
    n, c, f, h, w = v.shape
    flat = v.transpose(1, 2).reshape(n * f, c, h, w)  # row-major: video n, frame k at index n * F + k
    return enlarge(image_grid(flat, nrow=f, pad=pad), scale)


def save_frame_grid(videos, path, scale: int = 4) -> Path:
    """PNG of :func:`frame_grid` (rows = videos, columns = frames)."""
    import imageio.v3 as iio

    arr = frame_grid(videos, scale)
    return _atomic(path, lambda p: iio.imwrite(p, arr))


def save_gif(videos, path, fps: float = 4.0, ncol: int | None = None, scale: int = 4) -> Path:
    """Animated GIF (looping) of the videos tiled in a grid (:func:`tile_frames`), ``fps`` frames per second."""
    import imageio.v3 as iio

    if not (isinstance(fps, (int, float)) and fps > 0):
        raise DiffusionLabError(f"fps must be a positive number, got {fps!r}")
    frames = tile_frames(videos, ncol, scale)
    return _atomic(path, lambda p: iio.imwrite(p, frames, extension=".gif", duration=1000.0 / fps, loop=0))


def mp4_available() -> bool:
    """Whether imageio can write MP4 here (the ``imageio-ffmpeg`` or ``av`` package is installed)."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "av"))


def save_mp4(videos, path, fps: float = 4.0, ncol: int | None = None, scale: int = 4) -> Path:
    """MP4 of the tiled videos; needs imageio's ffmpeg (``pip install imageio[ffmpeg]``) or pyav plugin, otherwise
    a :class:`DiffusionLabError` saying so (write ``.gif`` instead). Sides are padded to even sizes (H.264)."""
    if not mp4_available():
        raise DiffusionLabError(f"cannot write {path}: MP4 needs an imageio plugin (pip install imageio[ffmpeg] or "
                                "imageio[pyav]); none is installed -- write a .gif instead")
    import imageio.v3 as iio

    frames = tile_frames(videos, ncol, scale)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=255)
    return _atomic(path, lambda p: iio.imwrite(p, frames, extension=".mp4", fps=fps))


def save_npz(videos, path, **extra) -> Path:
    """Compressed ``.npz`` with key ``x`` (float32 ``(N, C, F, H, W)`` in ``[0, 1]``) and any ``extra`` arrays."""
    arr = as_videos(videos).numpy()

    def write(p):
        buf = io.BytesIO()
        np.savez_compressed(buf, x=arr, **{k: np.asarray(v) for k, v in extra.items()})
        Path(p).write_bytes(buf.getvalue())

    return _atomic(path, write)


def load_npz(path) -> np.ndarray:
    """The ``x`` array of a file written by :func:`save_npz` (never unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise DiffusionLabError(f"video file {str(p)!r} not found")
    with np.load(p, allow_pickle=False) as f:
        if "x" not in f.files:
            raise DiffusionLabError(f"{str(p)!r} holds no array 'x' (it holds: {', '.join(f.files)})")
        return f["x"]


def save_videos(videos, path, fps: float = 4.0, scale: int = 4) -> Path:
    """Write videos by suffix: ``.npz`` (key ``x``), ``.npy``, ``.gif``, ``.mp4`` or ``.png`` (frame grid)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return save_npz(videos, path)
    if suffix == ".npy":
        arr = as_videos(videos).numpy()
        return _atomic(path, lambda p: np.save(p, arr))
    if suffix == ".gif":
        return save_gif(videos, path, fps=fps, scale=scale)
    if suffix == ".mp4":
        return save_mp4(videos, path, fps=fps, scale=scale)
    if suffix == ".png":
        return save_frame_grid(videos, path, scale=scale)
    raise DiffusionLabError(f"video output must end in one of {', '.join(VIDEO_SUFFIXES)}, got {path}")
