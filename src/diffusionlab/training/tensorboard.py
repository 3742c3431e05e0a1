"""TensorBoard event files of a training run (``train.tensorboard: true``), besides ``log.csv``.

Written by rank 0 to ``RUN/tensorboard/`` through :class:`torch.utils.tensorboard.SummaryWriter`, which needs the
optional ``tensorboard`` package (``pip install diffusionlab[tensorboard]``); without it training goes on with one
warning. At every ``log.csv`` row the scalars ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/skipped_steps`` and ``train/samples_per_second``; at every periodic sample grid the image
``samples``. A resumed run opens the writer with ``purge_step`` just after its checkpoint's step, so TensorBoard drops the
events the interrupted run wrote after that checkpoint and the curves continue without a fold.
"""

from __future__ import annotations

import math
from pathlib import Path

TB_DIR = "tensorboard"


class Board:
    """A thin writer over ``SummaryWriter`` (module docstring)."""

    def __init__(self, writer):
        self.writer = writer

    def scalars(self, step: int, **values) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(f"train/{name}", float(value), step)
        self.writer.flush()

    def image(self, step: int, png: Path) -> None:
        import imageio.v3 as iio
        import numpy as np

        arr = np.asarray(iio.imread(png))
        if arr.ndim == 2:
            arr = arr[:, :, None]
        self.writer.add_image("samples", arr[:, :, :3], step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def open_tensorboard(run_dir: Path, start: int, log=print) -> Board | None:
    """The run's :class:`Board`, or None (with one warning) when the ``tensorboard`` package is not installed."""
    if not tensorboard_available():
        log("diffusionlab: warning: train.tensorboard is on but the tensorboard package is not installed "
            "(pip install diffusionlab[tensorboard]); training goes on with log.csv only")
        return None
    from torch.utils.tensorboard import SummaryWriter

    return Board(SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR), purge_step=start + 1 if start else None))
