"""Where samplers get their noise: :class:`NoiseSource`, ``N(0, C)`` noise shaped like a tensor.

Samplers take ``noise=None`` meaning ``NoiseSource(model.process.cov)``; passing another source (for instance
``NoiseSource(Identity())`` to inject i.i.d. noise into a model trained with correlated noise, or one with a
seeded generator) changes nothing else.
"""

from __future__ import annotations

import torch

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
