"""Figures: image grids, 2-D scatter plots, loss curves (matplotlib with the Agg backend, imageio)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from diffusionlab.tiling import enlarge, image_grid


def _agg():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(x01, path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write a PNG grid of images in [0, 1], each pixel enlarged ``scale`` times (8x8 digits stay visible)."""
    import imageio.v3 as iio

    arr = enlarge(image_grid(x01, nrow), scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, arr)
    return path


def save_scatter(points, path, reference=None, title: str | None = None) -> Path:
    """Scatter plot of 2-D points (optionally over reference data in grey)."""
    plt = _agg()
    p = torch.as_tensor(points).detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    if reference is not None:
        r = torch.as_tensor(reference).detach().float().cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label="data")
    ax.scatter(p[:, 0], p[:, 1], s=2, c="C0", label="samples")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def save_samples(x_display, kind: str, path, reference=None) -> Path:
    """A grid for images, a frame grid for videos (rows = videos, columns = frames), a scatter for 2-D points
    (over the ``reference`` points in grey, e.g. the training data)."""
    if kind == "videos":
        from diffusionlab.video_io import save_frame_grid

        return save_frame_grid(x_display, path)
    if kind == "points":
        return save_scatter(x_display, path, reference=reference)
    return save_image_grid(x_display, path)


def plot_loss(log_csv, path) -> Path:
    """Training loss against step from a run's ``log.csv`` (log scale)."""
    plt = _agg()
    steps, losses = [], []
    with open(log_csv, newline="") as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
