"""diffusionlab: diffusion generative models with noise correlated across an axis.

The layers, bottom up (docs/notation.md fixes the symbols):

- :mod:`diffusionlab.noise` -- covariances C acting on one axis of a tensor (frames of a video);
- :mod:`diffusionlab.schedules` -- beta schedules and sigma levels, validated, in float64;
- :mod:`diffusionlab.gaussian` -- Gaussian log-densities, KL divergences, conjugate posteriors;
- :mod:`diffusionlab.processes` -- discrete VP/VE chains and VP / sub-VP / VE SDEs (pure math, no state).
"""

__version__ = "0.1.0"

from diffusionlab.errors import DiffusionLabError

__all__ = ["__version__", "DiffusionLabError"]
