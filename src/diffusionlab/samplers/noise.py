"""Where stochastic samplers get their noise: :class:`NoiseSource`, the one injected channel of randomness.

A stochastic sampler takes ``noise``: a :class:`NoiseSource`, a ``torch.Generator`` (seeding the default source),
or None (the default source, unseeded). The default source draws ``N(0, C)`` of the model's process, ``L z`` with
``L L^T = C``; passing another one (for instance ``NoiseSource(Identity())`` to inject i.i.d. noise into a model
trained with correlated noise) changes nothing else. Deterministic samplers take no noise at all.
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import Covariance, Identity


class NoiseSource:
    """Noise ``L z``, ``z ~ N(0, I)``, with covariance ``C (x) I`` (``cov`` acting on its axis).

    ``noise(like)`` draws it shaped like ``like`` on its device and dtype; :meth:`white` draws ``z`` alone and
    :meth:`color` maps ``z -> L z`` (samplers with a learned, whitened-diagonal variance scale ``z`` between the
    two). The generator, if given, must live on the device of the tensors drawn for.
    """

    def __init__(self, cov: Covariance | None = None, generator: torch.Generator | None = None):
        self.cov = cov if cov is not None else Identity()
        self.generator = generator

    def white(self, like: torch.Tensor) -> torch.Tensor:
        """``z ~ N(0, I)`` shaped like ``like``."""
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def color(self, z: torch.Tensor) -> torch.Tensor:
        """``L z`` with ``L L^T = C``."""
        self.cov.check(z)
        return self.cov.unwhiten(z)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.cov.sample(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def __repr__(self) -> str:
        return f"NoiseSource({self.cov!r})"


def noise_source(model, noise) -> NoiseSource:
    """The source a stochastic sampler uses: ``noise`` itself, one seeded by a generator, or the default
    ``N(0, C)`` of the model's process."""
    if noise is None or isinstance(noise, torch.Generator):
        return NoiseSource(model.process.cov, noise)
    if not callable(noise):
        raise DiffusionLabError(f"noise must be a NoiseSource, a torch.Generator or None, got {noise!r}")
    return noise


def require_unit_scale(process, what: str) -> None:
    """Raise unless ``process`` is variance exploding (``s_t = 1``), as NCSN's kernels need."""
    if not process.unit_scale:
        raise DiffusionLabError(f"{what} needs a variance-exploding process (ve, ve-sde: s_t = 1), got {process!r}")
