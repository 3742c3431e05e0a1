"""The order in which training reads its data: counter-based, so the batch of step ``k`` is a pure function of
``(seed, k)``.

Every epoch is a fresh random permutation of the ``N`` samples, and the global batches of ``B`` samples are
consecutive runs of the concatenated epochs: step ``k`` takes the samples at positions ``k B, ..., k B + B - 1`` of
that endless sequence (position ``p`` is sample ``perm_e[p mod N]`` of epoch ``e = p div N``; a batch may straddle
two epochs). Each epoch's permutation and each step's flip decisions come from their own
:class:`torch.Generator` seeded by a hash of ``(seed, stream, counter)`` -- the counter-based design of
Salmon et al. 2011 ("Parallel random numbers: as easy as 1, 2, 3"), the hash being SplitMix64 (Steele, Lea & Flood
2014, "Fast splittable pseudorandom number generators", the ``mix64`` finaliser) -- so no generator state is
carried from step to step: a resumed run, a data-loader worker that prefetches step ``k + 8`` and the in-memory
path all compute the very same indices from the step number alone, and the position in the data stream saved in
a checkpoint is simply its step.

The indices of step ``k`` are those of the *global* batch; under data parallelism each rank takes its slice of
them (:func:`step_indices` with ``part``), so N processes read between them exactly what one process reads.
"""

from __future__ import annotations

import functools

import torch

_MASK = (1 << 64) - 1
#: the streams of random numbers drawn from (seed, stream, counter)
PERMUTATION, FLIP = 0x5045524D, 0x464C4950


def mix64(x: int) -> int:
    """SplitMix64's finaliser of a 64-bit integer (Steele, Lea & Flood 2014): a bijection that scrambles every bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def counter_key(seed: int, stream: int, counter: int) -> int:
    """A 64-bit generator seed for draw ``counter`` of ``stream`` under ``seed`` (each hashed in turn)."""
    return mix64(mix64(mix64(int(seed) & _MASK) ^ stream) ^ (int(counter) & _MASK))


def counter_generator(seed: int, stream: int, counter: int) -> torch.Generator:
    """A CPU generator seeded by :func:`counter_key` (a fresh one per call: nothing is carried over)."""
    return torch.Generator().manual_seed(counter_key(seed, stream, counter))


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the ``n`` samples in ``epoch`` (int64, read-only use: it is cached)."""
    return torch.randperm(n, generator=counter_generator(seed, PERMUTATION, epoch))


def step_indices(seed: int, step: int, batch: int, n: int, part: slice | None = None) -> torch.Tensor:
    """The dataset indices of the global batch of ``step`` (``batch`` samples of a set of ``n``), or of its
    ``part`` (a rank's slice): positions ``step * batch + j`` of the epoch sequence (module docstring)."""
    lo, hi = step * batch, (step + 1) * batch
    if part is not None:
        lo, hi = lo + (part.start or 0), lo + (batch if part.stop is None else part.stop)
    out = []
    pos = lo
    while pos < hi:
        epoch, offset = divmod(pos, n)
        take = min(hi - pos, n - offset)
        out.append(epoch_permutation(seed, epoch, n)[offset:offset + take])
        pos += take
    return torch.cat(out) if len(out) != 1 else out[0].clone()


def flip_mask(seed: int, step: int, batch: int, part: slice | None = None) -> torch.Tensor:
    """Which samples of the global batch of ``step`` are mirrored left-right (each with probability 1/2; bool),
    or of its ``part``."""
    mask = torch.randint(0, 2, (batch,), generator=counter_generator(seed, FLIP, step)).bool()
    return mask if part is None else mask[part]


def epoch_of(step: int, batch: int, n: int) -> float:
    """How many epochs the first ``step`` steps have read (a fraction)."""
    return step * batch / n
