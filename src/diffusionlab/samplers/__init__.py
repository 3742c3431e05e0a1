"""Samplers: plain functions ``fn(model, x, grid, noise=None, progress=False, **options) -> x_0`` in one catalogue.

Every sampler walks one :class:`~diffusionlab.processes.grid.TimeGrid` (chains and SDEs alike), calls only the model
interface (:class:`~diffusionlab.parametrization.DiffusionModel`) and, if stochastic, takes its randomness from one
injected ``noise`` source (:class:`~diffusionlab.samplers.noise.NoiseSource`, or a ``torch.Generator`` seeding it).
:data:`SAMPLERS` maps each name to its :class:`~diffusionlab.samplers.catalogue.SamplerSpec` (options, processes it
runs on, evaluations, default grid and steps); :func:`get_sampler` validates a name, :func:`register_sampler` adds
one, :func:`sample_in_chunks` draws many samples in bounded memory.

=================== ==============================================================================================
``ddpm``            ancestral sampling (Ho et al. 2020, Alg. 2), any grid, variances beta / beta_tilde / learned
``ddim``            DDIM (Song, Meng & Ermon 2021, eq. 12), ``eta`` in [0, 1]
``ve-reverse``      the VE reverse kernel ``N(x + g^2 C s, g^2 C)`` (Song & Ermon 2019)
``annealed-langevin`` Song & Ermon 2019, Alg. 1, with C-preconditioned Langevin steps
``euler-maruyama``  the reverse SDE (Song et al. 2021)
``pc``              predictor-corrector (Song et al. 2021, Alg. 1-3)
``ode-euler``, ``ode-heun``, ``ode-adaptive``  the probability-flow ODE in t (fixed grid; torchdiffeq)
``euler``, ``heun`` EDM (Karras et al. 2022, Alg. 1-2) in the EDM level, with churn
``dpmpp-2m``, ``dpmpp-3m``, ``unipc``  multistep exponential integrators (Lu et al. 2022; Zhao et al. 2023)
=================== ==============================================================================================
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import GRID_KINDS, TimeGrid, as_grid, make_grid
from diffusionlab.samplers.catalogue import (
    SAMPLERS,
    Option,
    SamplerSpec,
    canonical,
    get_sampler,
    parse_sampler,
    register_sampler,
    sampler_names,
    spec_of,
    unregister_sampler,
)
from diffusionlab.samplers.noise import NoiseSource

# importing the modules registers their samplers
from diffusionlab.samplers.ancestral import ddim, ddpm, ve_reverse  # noqa: E402
from diffusionlab.samplers.sde import euler_maruyama  # noqa: E402
from diffusionlab.samplers.langevin import annealed_langevin, reverse_diffusion_pc  # noqa: E402
from diffusionlab.samplers.ode import ode_adaptive, ode_euler, ode_heun  # noqa: E402
from diffusionlab.samplers.fewstep import dpmpp_2m, dpmpp_3m, edm_euler, edm_heun, unipc  # noqa: E402


def sample_in_chunks(sampler, model, shape, num: int, chunk: int | None = None, generator=None, device=None,
                     dtype=torch.float32, store_device=None, grid=None, kind: str | None = None, noise=None,
                     progress: bool = False, **options) -> torch.Tensor:
    """Draw ``num`` samples of per-sample ``shape`` in batches of at most ``chunk`` (memory bounded by one batch).

    ``sampler`` is a :class:`SamplerSpec`, a registered name or a registered function; ``grid`` / ``kind`` as in
    :meth:`SamplerSpec.grid` (built once); ``options`` are the sampler's. Each batch starts from the grid's
    :meth:`~diffusionlab.processes.grid.TimeGrid.start_sample` (on ``device``, ``dtype``, with ``generator``: the
    prior, scaled to ``N(0, sigma_0^2 C)`` when the grid starts below ``T``), and the ``generator`` also seeds the
    sampler's noise unless a ``noise`` source is given. Batches are moved to ``store_device`` (e.g. ``"cpu"`` to keep
    accelerator memory bounded; None keeps them where they were made) and concatenated.
    """
    spec = spec_of(sampler)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DiffusionLabError(f"number of samples must be an integer >= 1, got {num!r}")
    chunk = num if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise DiffusionLabError(f"chunk size must be an integer >= 1, got {chunk!r}")
    spec.validate(options)
    spec.check_process(model.process)
    g = spec.grid(model.process, grid, kind)
    noise = NoiseSource(model.process.cov, generator) if noise is None else noise
    out = []
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        x_T = g.start_sample((n, *tuple(shape)), generator=generator, device=device, dtype=dtype)
        x = spec.run(model, x_T, g, noise=noise, progress=progress, **options)
        out.append(x if store_device is None else x.to(store_device))
    return torch.cat(out, 0)


__all__ = [
    "SAMPLERS", "SamplerSpec", "Option", "get_sampler", "register_sampler", "unregister_sampler", "sampler_names",
    "parse_sampler", "canonical", "sample_in_chunks", "NoiseSource", "TimeGrid", "make_grid", "as_grid", "GRID_KINDS",
    "ddpm", "ddim", "ve_reverse", "annealed_langevin", "euler_maruyama", "reverse_diffusion_pc", "ode_euler",
    "ode_heun", "ode_adaptive", "edm_euler", "edm_heun", "dpmpp_2m", "dpmpp_3m", "unipc",
]
