"""Datasets read one sample at a time: what the streaming loader (:mod:`diffusionlab.data.stream`) serves and what
the in-memory loaders are built from, so that both decode every sample by the very same operations.

A :class:`Source` knows its length, its sample shape and how to :meth:`~Source.load` sample ``i`` as a float32
tensor in model space (decoding, cropping and resizing it); it holds only paths and small arrays (memory maps are
opened lazily in each process), so it can be sent to data-loader worker processes.

Bad files, one documented rule (``data.bad_files``):

- **before training** every file of a folder is checked from its header (nothing decoded: unreadable files, a
  mode other than grey/RGB/palette (+ alpha) at 8 or 16 bits, a decompression bomb -- more pixels than
  :data:`~diffusionlab.data.images.MAX_IMAGE_PIXELS` --, a video with too few frames, a ``.npy`` that is not one);
  with ``bad_files: error`` (the default) any such file is refused with one line naming it (and counting the
  others), before anything is written; with ``bad_files: skip`` it is left out and reported with its path. A
  folder with no good file is refused either way.
- **during training** a file that passed its header check but does not decode (a truncated body) is, with
  ``error``, a clean stop: the trainer writes a checkpoint at the step it was about to take and names the file;
  with ``skip`` its place in the batch is taken by the next file in sorted order that loads
  (:func:`load_or_next`; deterministic for the same files) and it is reported once with its path. In-memory
  loading decodes every file up front, so there the same rule applies at start-up.
"""

from __future__ import annotations

import torch

from diffusionlab.checks import choice
from diffusionlab.data.arrays import first_line, to_display, value_range
from diffusionlab.errors import DiffusionLabError

#: what ``data.bad_files`` may be
BAD_FILE_RULES = ("error", "skip")
#: how many following files :func:`load_or_next` tries in place of one that does not load
MAX_SUBSTITUTES = 8
#: how many bad files a message lists by name
SHOWN = 10


class DataError(DiffusionLabError):
    """A sample that cannot be loaded during training (the message names the file)."""


def check_rule(rule: str, what: str) -> str:
    return choice(f"{what} option bad_files", rule, BAD_FILE_RULES)


class Source:
    """A dataset read sample by sample (module docstring). Subclasses set the fields and :meth:`load`."""

    kind: str = "images"
    name: str = "dataset"
    sample_shape: tuple = ()
    levels: int | None = None
    num_classes: int | None = None
    bad_files: str = "error"

    def __init__(self):
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> torch.Tensor:
        """Sample ``i``: float32 ``sample_shape`` in model space (a :class:`DiffusionLabError` for a bad file)."""
        raise NotImplementedError

    def where(self, i: int) -> str:
        """What sample ``i`` is read from (a path, for messages)."""
        return f"sample {i} of {self.name}"

    @property
    def value_range(self):
        return value_range(self.kind)

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        return to_display(self.kind, x)

    def nbytes(self) -> int:
        """The bytes of the whole set decoded to float32 (what in-memory loading would hold)."""
        n = 4 * len(self)
        for d in self.sample_shape:
            n *= d
        return n

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` samples that load (the checks before training), stacked."""
        out, i = [], 0
        while len(out) < min(n, len(self)) and i < len(self):
            out.append(load_or_next(self, i)[0])
            i += 1
        return torch.stack(out)


def scan(files: list[str], check, what: str, rule: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``(good, skipped)``: ``check(path)`` (a header check raising :class:`DiffusionLabError`) on every file; the
    bad ones refused (``rule`` error: one line naming the first, counting the rest) or skipped (module docstring)."""
    good, bad = [], []
    for f in files:
        try:
            check(f)
        except DiffusionLabError as e:
            bad.append((f, first_line(e)))
            continue
        good.append(f)
    refuse(bad, len(files), what, rule, good_left=len(good))
    return good, bad


def refuse(bad: list[tuple[str, str]], total: int, what: str, rule: str, good_left: int) -> None:
    """Raise for the ``bad`` files when the rule says so, or when no good file is left."""
    if not bad:
        return
    first = bad[0][1]
    others = f" (and {len(bad) - 1} other file(s) of the {total})" if len(bad) > 1 else ""
    if not good_left:
        raise DiffusionLabError(f"{what}: no file of the {total} can be used: {first}{others}")
    if rule == "error":
        raise DiffusionLabError(f"{what}: {first}{others}; set data.bad_files=skip to train without the bad "
                                "files (each is reported with its path)")


def describe_skipped(skipped: list[tuple[str, str]], what: str) -> list[str]:
    """Warning lines for files left out by ``bad_files: skip`` (the first :data:`SHOWN` by name)."""
    if not skipped:
        return []
    lines = [f"diffusionlab: warning: {what}: skipped {reason}" for _, reason in skipped[:SHOWN]]
    if len(skipped) > SHOWN:
        lines.append(f"diffusionlab: warning: {what}: skipped {len(skipped) - SHOWN} more bad file(s) "
                     f"({len(skipped)} in all)")
    return lines


def load_or_next(source: Source, i: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """``(sample, failures)``: sample ``i``, or under ``bad_files: skip`` the first of the next
    :data:`MAX_SUBSTITUTES` samples (in file order, wrapping) that loads; ``failures`` lists ``(path, reason)`` of
    those that did not. A :class:`DataError` when the rule is ``error`` or none of them loads."""
    failures = []
    n = len(source)
    for k in range(MAX_SUBSTITUTES + 1 if source.bad_files == "skip" else 1):
        j = (i + k) % n
        try:
            return source.load(j), failures
        except DataError:
            raise
        except DiffusionLabError as e:
            failures.append((source.where(j), first_line(e)))
    first = failures[0][1]
    if source.bad_files == "error":
        raise DataError(f"{first}; set data.bad_files=skip to go on without it (each bad file is reported)")
    raise DataError(f"{first}, and the {MAX_SUBSTITUTES} files after it do not load either (is the data's disk "
                    "still there?)")


def read_all(source: Source, what: str) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Every sample of ``source`` decoded and stacked (in-memory loading), the files that do not decode refused or
    skipped by the rule; returns ``(data, skipped)`` (``skipped`` includes the header scan's)."""
    out, bad = [], []
    for i in range(len(source)):
        try:
            out.append(source.load(i))
        except DiffusionLabError as e:
            bad.append((source.where(i), first_line(e)))
    refuse(bad, len(source) + len(source.skipped), what, source.bad_files, good_left=len(out))
    return torch.stack(out), [*source.skipped, *bad]


class ArraySource(Source):
    """A dataset already in memory (an :class:`~diffusionlab.data.arrays.ArrayDataset`) served sample by sample:
    the streaming path of the sets that have no file reader of their own."""

    def __init__(self, ds):
        super().__init__()
        self.ds = ds
        self.kind, self.name, self.levels, self.num_classes = ds.kind, ds.name, ds.levels, ds.num_classes
        self.sample_shape = tuple(ds.sample_shape)
        self.skipped = list(ds.skipped)

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int) -> torch.Tensor:
        return self.ds.data[i]
