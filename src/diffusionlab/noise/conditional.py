"""Noise on some frames given its values on the others: the Gaussian conditional of ``N(0, C)`` across frames.

For frame noise ``e ~ N(0, C)`` (``C`` an ``F x F`` covariance on one axis, the identity on the rest) split into
known frames ``K`` and unknown frames ``U``, the unknown part given the known part is (Rasmussen & Williams 2006,
"Gaussian processes for machine learning", eq. A.6; the Schur complement)::

    e_U | e_K  ~  N(M e_K, S),    M = C_UK C_KK^{-1},    S = C_UU - C_UK C_KK^{-1} C_KU

Drawing ``e_U`` so keeps the joint law ``N(0, C)`` of the whole window exactly. This is how a video longer than
the model's window gets noise that is correlated across the windows' overlap ("joint noising"): the frames a new
window shares with the previous one keep their noise and the new frames' noise is drawn given it. With ``C = I``
the unknown noise is independent of the known one (``M = 0``, ``S = I``).

Everything is float64 on the host; :meth:`ConditionalNoise.sample` applies ``M`` and a square root of ``S`` along
the frame axis of a tensor of any dtype and device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffusionlab.errors import DiffusionLabError

_F64 = torch.float64


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """A square root ``R`` with ``R R^T = s`` of a symmetric PSD matrix (eigenvalues clipped at 0: a Schur
    complement of a singular ``C`` may round slightly negative)."""
    s = 0.5 * (s + s.T)
    vals, vecs = torch.linalg.eigh(s)
    return vecs * vals.clamp_min(0.0).sqrt()


class ConditionalNoise:
    """The conditional of ``N(0, C)`` on the frames ``known`` (module docstring).

    Args:
        matrix: the ``F x F`` covariance ``C`` (any symmetric positive definite matrix; its ``C_KK`` must be
            invertible).
        known: indices of the known frames (distinct, in ``0 .. F - 1``; may be empty).
        axis: the frame axis of the tensors :meth:`sample` works on (2 for videos ``(B, C, F, H, W)``).
    """

    def __init__(self, matrix: torch.Tensor, known: Sequence[int], axis: int = 2):
        c = torch.as_tensor(matrix, dtype=_F64)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise DiffusionLabError(f"the covariance must be a square matrix, got shape {tuple(c.shape)}")
        f = c.shape[0]
        known = [int(k) for k in known]
        if len(set(known)) != len(known) or any(not 0 <= k < f for k in known):
            raise DiffusionLabError(f"known frames must be distinct indices in 0..{f - 1}, got {known}")
        if not isinstance(axis, int) or axis == 0:
            raise DiffusionLabError(f"the frame axis must be a non-batch axis (an int other than 0), got {axis!r}")
        self.size, self.axis = f, axis
        self.known = known
        self.unknown = [i for i in range(f) if i not in set(known)]
        K, U = self.known, self.unknown
        if K:
            ckk = c[K][:, K]
            try:
                chol = torch.linalg.cholesky(ckk)
            except RuntimeError:
                raise DiffusionLabError("the known frames' covariance C_KK is not positive definite") from None
            cuk = c[U][:, K]
            self.gain = torch.cholesky_solve(cuk.T, chol).T  # M = C_UK C_KK^{-1}, (|U|, |K|)
            self.cond_cov = c[U][:, U] - self.gain @ cuk.T  # S = C_UU - M C_KU
        else:
            self.gain = torch.zeros(len(U), 0, dtype=_F64)
            self.cond_cov = c.clone()
        self.root = _psd_sqrt(self.cond_cov)

    def _along(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``m`` (rows, len(x's axis)) applied along the frame axis of ``x``."""
        xm = torch.movedim(x, self.axis, -1)
        return torch.movedim(xm @ m.to(dtype=x.dtype, device=x.device).T, -1, self.axis)

    def mean(self, known_noise: torch.Tensor) -> torch.Tensor:
        """``M e_K``: the conditional mean of the unknown frames' noise (``|U|`` frames along the axis)."""
        self._check(known_noise, len(self.known), "known_noise")
        return self._along(self.gain, known_noise)

    def sample(self, known_noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The whole window's noise (``F`` frames along the axis): ``known_noise`` at the known frames, a draw of
        ``N(M e_K, S)`` at the unknown ones."""
        self._check(known_noise, len(self.known), "known_noise")
        shape = list(known_noise.shape)
        shape[self.axis] = len(self.unknown)
        z = torch.randn(shape, generator=generator, dtype=known_noise.dtype, device=known_noise.device)
        unknown = self._along(self.gain, known_noise) + self._along(self.root, z)
        return self.assemble(known_noise, unknown)

    def assemble(self, known: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
        """The ``F``-frame tensor with ``known`` at the known frames and ``unknown`` at the others."""
        shape = list(unknown.shape)
        shape[self.axis] = self.size
        out = torch.empty(shape, dtype=unknown.dtype, device=unknown.device)
        idx_k = torch.tensor(self.known, dtype=torch.long, device=unknown.device)
        idx_u = torch.tensor(self.unknown, dtype=torch.long, device=unknown.device)
        out.index_copy_(self.axis, idx_u, unknown)
        if self.known:
            out.index_copy_(self.axis, idx_k, known.to(unknown.dtype))
        return out

    def _check(self, x: torch.Tensor, frames: int, name: str) -> None:
        if x.ndim <= self.axis or x.shape[self.axis] != frames:
            raise DiffusionLabError(f"{name} must have {frames} frames on axis {self.axis}, got shape {tuple(x.shape)}")
