"""diffusionlab: diffusion generative models with noise correlated across an axis (the frames of a video).

The layers, bottom up (docs/architecture.md; docs/notation.md fixes the symbols):

- :mod:`diffusionlab.noise` -- covariances C acting on one axis of a tensor (frames of a video);
- :mod:`diffusionlab.schedules` -- beta schedules and sigma levels, validated, in float64;
- :mod:`diffusionlab.gaussian` -- Gaussian log-densities, KL divergences, conjugate posteriors;
- :mod:`diffusionlab.processes` -- discrete VP/VE chains and VP / sub-VP / VE SDEs, and the time grid;
- :mod:`diffusionlab.parametrization` -- the model interface every objective and sampler sees;
- :mod:`diffusionlab.objectives`, :mod:`diffusionlab.likelihood`, :mod:`diffusionlab.samplers`, ... .

The names most used from Python are importable from the top (loaded on first use):
``load_run``, ``generate``, ``sample_in_chunks``, ``get_sampler``, ``make_process``, ``make_grid``,
``DiffusionModel``, ``load_config``, ``train``.
"""

__version__ = "0.1.0"

from diffusionlab.errors import DiffusionLabError

_LAZY = {
    "load_run": "diffusionlab.training.sampling",
    "generate": "diffusionlab.training.sampling",
    "sample_in_chunks": "diffusionlab.samplers",
    "get_sampler": "diffusionlab.samplers",
    "make_process": "diffusionlab.processes",
    "make_grid": "diffusionlab.processes",
    "DiffusionModel": "diffusionlab.parametrization",
    "load_config": "diffusionlab.training.config",
    "train": "diffusionlab.training.trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffusionlab' has no attribute {name!r}")


__all__ = ["__version__", "DiffusionLabError", *_LAZY]
