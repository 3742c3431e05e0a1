"""Where each training step's batch comes from: the whole set in the device's memory, or a streaming ``DataLoader``
(:mod:`diffusionlab.data.stream`); both choose the samples of step ``k`` by
:func:`diffusionlab.data.order.step_indices`, so for the same seed they give the same batches, and both are
exactly resumable from a step number.

``data.stream: auto`` keeps the set in memory unless its float32 decoding would exceed
:data:`~diffusionlab.data.stream.AUTO_STREAM_FRACTION` of the host's memory or of the CUDA device's: in memory a
step only gathers rows, while streaming decodes every batch again (docs/benchmarks.md, "Streaming", measures the
two on a folder of PNGs).
"""

from __future__ import annotations

import torch

from diffusionlab.data.order import flip_mask, step_indices
from diffusionlab.data.sources import DataError, describe_skipped
from diffusionlab.data.stream import AUTO_STREAM_FRACTION, StepBatches, flip_batch, step_loader, worker_count
from diffusionlab.errors import DiffusionLabError


class MemoryBatches:
    """Batches gathered from ``data`` (the whole set, on the training device)."""

    streaming = False

    def __init__(self, data: torch.Tensor, seed: int, batch: int, part: slice, flip: bool):
        self.data, self.seed, self.batch, self.part, self.flip = data, seed, batch, part, flip

    def __len__(self) -> int:
        return self.data.shape[0]

    def indices(self, step: int) -> torch.Tensor:
        """The dataset indices of the rank's slice of the global batch of ``step``."""
        return step_indices(self.seed, step, self.batch, self.data.shape[0], self.part)

    def get(self, step: int) -> torch.Tensor:
        """The rank's slice of the global batch of ``step``."""
        idx = self.indices(step)
        x = self.data[idx.to(self.data.device, non_blocking=True)]
        if self.flip:
            x = flip_batch(x, flip_mask(self.seed, step, self.batch, self.part))
        return x

    def close(self) -> None:
        pass


class StreamBatches:
    """Batches from a :func:`~diffusionlab.data.stream.step_loader` started at the first step asked for (and
    started again if the steps asked for jump); files that did not decode are reported once each."""

    streaming = True

    def __init__(self, source, seed: int, batch: int, part: slice, flip: bool, workers: int, prefetch: int,
                 device: torch.device, log=print):
        self.source, self.device, self.log = source, device, log
        self.workers, self.prefetch = workers, prefetch
        self.batches = StepBatches(source, seed, batch, part, flip)
        self.it, self.next_step = None, None
        self.reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _start(self, step: int) -> None:
        self.close()
        loader = step_loader(self.batches, step, self.workers, self.prefetch, pin_memory=self.device.type == "cuda")
        self.it, self.next_step = iter(loader), step

    def get(self, step: int) -> torch.Tensor:
        """The rank's slice of the global batch of ``step`` on the device; a :class:`DataError` when it cannot be
        read (the rule of :mod:`diffusionlab.data.sources`)."""
        if self.it is None or step != self.next_step:
            self._start(step)
        try:
            item = next(self.it)
        except RuntimeError as e:  # a worker killed (out of memory, a signal): the run stops with a checkpoint
            self.close()
            raise DataError(f"the data loader failed: {str(e).strip().splitlines()[0] if str(e).strip() else e}") \
                from None
        self.next_step = step + 1
        if item["step"] != step:
            raise DiffusionLabError(f"internal error: the data loader returned step {item['step']} for step {step}")
        for path, reason in item["failures"]:
            if path not in self.reported:
                self.reported.add(path)
                self.log(f"diffusionlab: warning: {reason}; step {step + 1} took the next file in its place "
                         "(data.bad_files: skip)")
        if "error" in item:
            raise DataError(item["error"])
        return item["x"].to(self.device, non_blocking=True)

    def close(self) -> None:
        """Shut the workers down (the next :meth:`get` starts them again)."""
        it, self.it = self.it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def memory_budget(device: torch.device) -> int | None:
    """:data:`AUTO_STREAM_FRACTION` of the host's memory, and of the CUDA device's (None where unknown)."""
    from diffusionlab.data.arrays import physical_memory

    sizes = [physical_memory()]
    if device.type == "cuda":
        sizes.append(torch.cuda.get_device_properties(device).total_memory)
    sizes = [s for s in sizes if s]
    return int(AUTO_STREAM_FRACTION * min(sizes)) if sizes else None


def choose_stream(dcfg: dict, device: torch.device, seed: int):
    """``(stream, source)``: whether training streams the data of ``dcfg`` (``data.stream``; module docstring)
    and the opened source when it was opened to decide (or to stream); ``seed`` (``train.seed``) generates the
    generated sets, as on the in-memory path."""
    from diffusionlab.data import has_source, open_source

    if dcfg["stream"] is False:
        return False, None
    if dcfg["stream"] == "auto" and not has_source(dcfg):
        return False, None
    source = open_source(dcfg, seed)
    if dcfg["stream"] is True:
        return True, source
    budget = memory_budget(device)
    return budget is not None and source.nbytes() > budget, source


def open_training_data(cfg: dict, device: torch.device, batch: int, part: slice, log=print):
    """``(ds, batches, first)``: the dataset (an in-memory :class:`~diffusionlab.data.arrays.ArrayDataset`, or the
    streamed :class:`~diffusionlab.data.sources.Source`), its batch provider and a few training samples (the
    checks before training). Files a folder skipped are reported through ``log``."""
    from diffusionlab.training.build import build_dataset

    dcfg, seed = cfg["data"], cfg["train"]["seed"]
    stream, source = choose_stream(dcfg, device, seed)
    if stream:
        ds = source
        first = source.head(8)
        batches = StreamBatches(source, seed, batch, part, dcfg["flip"], worker_count(dcfg["workers"]),
                                dcfg["prefetch"], device, log)
    else:
        ds = build_dataset(cfg)
        first = ds.data[:8]
        batches = None
    if dcfg["flip"] and ds.kind == "points":
        raise DiffusionLabError(f"data.flip mirrors images and videos; {ds.name!r} holds 2-D points")
    for line in describe_skipped(list(ds.skipped), f"{dcfg['name']} {dcfg.get('path', '')!s}".strip()):
        log(line)
    if stream and len(source) < 1:
        raise DiffusionLabError(f"dataset {ds.name!r} is empty")
    if batches is None:
        batches = MemoryBatches(ds.data.to(device), seed, batch, part, dcfg["flip"])
    return ds, batches, first
