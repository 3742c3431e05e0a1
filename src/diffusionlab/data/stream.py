"""Streaming training data: a torch ``DataLoader`` whose items are whole training batches, one per step.

The loader's "indices" are step numbers: item ``k`` is the rank's slice of the global batch of step ``k``, its
samples chosen by :func:`diffusionlab.data.order.step_indices` (a pure function of the seed and ``k``), each
decoded, cropped and resized by the :class:`~diffusionlab.data.sources.Source` in a worker process, mirrored by
:func:`~diffusionlab.data.order.flip_mask` when ``data.flip`` is on, stacked there and (on CUDA) copied to pinned
memory. Workers prefetch ``prefetch`` batches each; since no random state is carried from one step to the next,
the prefetched batches never get ahead of what a checkpoint saves (its step), and a resumed run starts the loader
at its step. Batches come back in step order whatever the number of workers, so ``workers = 0`` (everything in
the training process) and ``workers = 4`` give the very same batches.

Bad files follow :mod:`diffusionlab.data.sources`: an item carries the ``(path, reason)`` of every file that did
not decode (reported once by the trainer) and, when the rule stops training, an error message instead of a
batch. Workers ignore SIGINT and SIGTERM: a Ctrl-C or a scheduler's SIGTERM reaches the training process, which
stops cleanly after its step (:mod:`diffusionlab.training.stop`) and then shuts the workers down.

The generic keys of every ``data:`` section (:func:`loading_options`) choose between this loader and the
in-memory path.
"""

from __future__ import annotations

import os
import signal

import torch

from diffusionlab.checks import brief
from diffusionlab.data.order import flip_mask, step_indices
from diffusionlab.data.sources import DataError, load_or_next
from diffusionlab.errors import DiffusionLabError

#: the keys every ``data:`` section takes besides its dataset's own options
LOADING_KEYS = ("stream", "workers", "prefetch", "flip")
#: ``stream: auto`` streams a set whose float32 decoding would exceed this fraction of the host's memory (or of a
#: CUDA device's): below it the in-memory path is faster per step (docs/benchmarks.md, "Streaming")
AUTO_STREAM_FRACTION = 0.25


def loading_options(stream: bool | str = "auto", workers: int | str = "auto", prefetch: int = 2,
                    flip: bool = False) -> dict:
    """How training reads the data (every ``data:`` section takes these keys).

    Args:
        stream: true (decode batches in DataLoader workers as training goes), false (decode the whole set into
            the training device's memory first) or auto (in memory unless the decoded set would exceed a quarter
            of the host's or the device's memory; sets without a file reader are always in memory)
        workers: loader worker processes when streaming (0: in the training process; auto: one per CPU core
            beyond the first, at most 4)
        prefetch: batches each worker prepares ahead
        flip: mirror each training sample left-right with probability 1/2, decided by train.seed and the step
            (images and videos; refused for points)
    """
    if stream not in (True, False, "auto"):
        raise DiffusionLabError(f"data.stream must be true, false or auto, got {brief(stream)}")
    if not (workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and 0 <= workers <= 256)):
        raise DiffusionLabError(f"data.workers must be an integer in [0, 256] or auto, got {brief(workers)}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 64:
        raise DiffusionLabError(f"data.prefetch must be an integer in [1, 64], got {brief(prefetch)}")
    if not isinstance(flip, bool):
        raise DiffusionLabError(f"data.flip must be true or false, got {brief(flip)}")
    return {"stream": stream, "workers": workers, "prefetch": prefetch, "flip": flip}


def worker_count(workers: int | str) -> int:
    """``data.workers`` as a number (``auto``: one per CPU core beyond the first, at most 4)."""
    if workers != "auto":
        return int(workers)
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def flip_batch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the samples where ``mask`` is true mirrored along the last (width) axis."""
    return torch.where(mask.to(x.device).view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


class StepBatches(torch.utils.data.Dataset):
    """Item ``k``: ``{"step": k, "x": batch, "failures": [...]}`` (or ``"error"`` instead of ``"x"``), the rank's
    ``part`` of the global batch of step ``k`` (module docstring)."""

    def __init__(self, source, seed: int, batch: int, part: slice, flip: bool):
        self.source, self.seed, self.batch, self.part, self.flip = source, seed, batch, part, flip

    def __getitem__(self, step: int) -> dict:
        idx = step_indices(self.seed, step, self.batch, len(self.source), self.part)
        xs, failures = [], []
        try:
            for i in idx.tolist():
                x, failed = load_or_next(self.source, i)
                xs.append(x)
                failures += failed
        except DataError as e:
            return {"step": step, "error": str(e), "failures": failures}
        x = torch.stack(xs)
        if self.flip:
            x = flip_batch(x, flip_mask(self.seed, step, self.batch, self.part))
        return {"step": step, "x": x, "failures": failures}


def _quiet_worker(_: int) -> None:
    """Workers leave SIGINT and SIGTERM to the training process (module docstring)."""
    for name in ("SIGINT", "SIGTERM"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def step_loader(batches: StepBatches, first: int, workers: int, prefetch: int = 2,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over steps ``first, first + 1, ...`` of ``batches`` (module docstring)."""
    kw = {}
    if workers:
        kw = {"prefetch_factor": prefetch, "worker_init_fn": _quiet_worker}
    # a generator of its own: a DataLoader iterator draws its workers' base seed from it, which would otherwise
    # advance torch's global RNG (dropout's) at every (re)start of the loader and break an exact resume
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(first, first + (1 << 62)),
                                       num_workers=workers, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(0), **kw)
