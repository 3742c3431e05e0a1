"""Samplers: plain functions ``fn(model, x_T, timesteps=None, noise=None, progress=False, **options) -> x_0``.

:data:`SAMPLERS` maps names to functions (:func:`get_sampler` validates a name, :func:`register_sampler` adds
one); :func:`sample_in_chunks` draws many samples in bounded memory. Noise comes from a
:class:`~diffusionlab.samplers.noise.NoiseSource`; time grids from
:func:`~diffusionlab.samplers.timesteps.make_timesteps`.
"""

from __future__ import annotations

from typing import Callable

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.samplers.continuous import CONTINUOUS_SAMPLERS
from diffusionlab.samplers.discrete import annealed_langevin, ddim, ddpm, ve_ancestral, ve_reverse
from diffusionlab.samplers.fewstep import FEWSTEP_SAMPLERS
from diffusionlab.samplers.noise import NoiseSource
from diffusionlab.samplers.timesteps import check_timesteps, make_timesteps, respace

SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "ve_reverse": ve_reverse,
    "ve_ancestral": ve_ancestral,
    "annealed_langevin": annealed_langevin,
    **CONTINUOUS_SAMPLERS,  # euler_maruyama, pc, ode_euler, ode_heun, ode_adaptive (SDE processes)
    **FEWSTEP_SAMPLERS,  # euler, heun, dpmpp-2m, dpmpp-3m, unipc, ddim_continuous (SDEs and chains)
}


def register_sampler(name: str, fn: Callable) -> None:
    """Add a sampler ``fn(model, x, timesteps=None, noise=None, progress=False, **options)`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise DiffusionLabError(f"sampler name must be a non-empty string, got {name!r}")
    SAMPLERS[name] = fn


def get_sampler(name: str) -> Callable:
    """The sampler called ``name``; :class:`DiffusionLabError` listing the allowed names otherwise."""
    if name not in SAMPLERS:
        raise DiffusionLabError(f"unknown sampler {name!r}; allowed: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def sample_in_chunks(fn: Callable | str, model, shape, num: int, chunk: int | None = None, generator=None,
                     device=None, dtype=torch.float32, store_device=None, **options) -> torch.Tensor:
    """Draw ``num`` samples of per-sample ``shape`` in batches of at most ``chunk`` (memory bounded by one batch).

    Each batch starts from ``model.process.prior_sample`` (on ``device``, ``dtype``, with ``generator``) and runs
    ``fn(model, x_T, **options)`` (``fn`` a function or a registered name); the ``generator`` also seeds the
    sampler's noise unless ``options`` give a ``noise`` source. Batches are moved to ``store_device`` (e.g.
    ``"cpu"`` to keep accelerator memory bounded; None keeps them where they were made) and concatenated.
    """
    fn = get_sampler(fn) if isinstance(fn, str) else fn
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DiffusionLabError(f"number of samples must be an integer >= 1, got {num!r}")
    chunk = num if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise DiffusionLabError(f"chunk size must be an integer >= 1, got {chunk!r}")
    if "noise" not in options or options["noise"] is None:
        options = dict(options, generator=generator)
    out = []
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        x_T = model.process.prior_sample((n, *tuple(shape)), generator=generator, device=device, dtype=dtype)
        x = fn(model, x_T, **options)
        out.append(x if store_device is None else x.to(store_device))
    return torch.cat(out, 0)


__all__ = [
    "SAMPLERS", "get_sampler", "register_sampler", "sample_in_chunks", "NoiseSource", "make_timesteps",
    "check_timesteps", "respace", "ddpm", "ddim", "ve_reverse", "ve_ancestral", "annealed_langevin",
]
