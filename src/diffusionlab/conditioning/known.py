"""Known values under frame-correlated noise: Gaussian conditioning of the noise, and the known part's trajectory.

The forward noise of a sample is ``eps ~ N(0, K)``, ``K = C (x) I``: C correlates the entries along one axis (the
frames of a video, ``process.cov.axis``) and nothing else. With a mask of known entries ``k`` (the rest ``u``) the
noise of the unknown entries given that of the known ones is Gaussian (Bishop 2006, eqs. 2.81-2.82)::

    eps_u | eps_k ~ N(K_uk K_kk^{-1} eps_k, K_uu - K_uk K_kk^{-1} K_ku)

so noised known frames must be drawn *jointly* with the unknown frames' noise; drawing them independently gives
the state the block-diagonal noise ``diag(K_kk, K_uu)``, which the model never saw. :class:`NoiseConditioner`
applies this without forming the conditional covariance, by Matheron's rule (pathwise conditioning, Wilson et al.
2020, "Efficiently sampling functions from Gaussian process posteriors", eq. 8): if ``e ~ N(0, K)`` then
``e_u + K_uk K_kk^{-1} (a - e_k)`` is a draw of ``eps_u | eps_k = a``. Because ``K = C (x) I``, ``K_kk`` splits into
one small block per *fibre* (the F entries of one pixel / coordinate across the frames), so the work is one
``F x F`` matrix per distinct pattern of known frames in a fibre (precomputed; no dense ``D x D`` matrix).

:class:`Known` holds the known values ``y`` (model space) and the mask, and moves the known part down a time grid
along one forward trajectory: the bridge ``q(x_{p_{i+1}} | x_{p_i}, x_0 = y) = N(A x + B y, V C)``
(:meth:`~diffusionlab.processes.grid.TimeGrid.posterior`), whose marginals are ``q(x_p | x_0 = y)`` (score_sde's
noising of the known part at every time, Song et al. 2021, appendix I.2) and whose steps are those of a forward
path, as SMCDiff needs (Trippe et al. 2022, sec. 4).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.utils import as_mask

_F64 = torch.float64


class NoiseConditioner:
    """Gaussian conditioning of ``N(0, K)`` noise on the known entries of ``mask`` (module docstring).

    Args:
        cov: the process's noise covariance C (acting on ``cov.axis``; :class:`~diffusionlab.noise.Identity` makes
            every operation trivial).
        mask: bool ``(B, *sample_shape)``, True where known.

    :meth:`shift` is ``K_uk K_kk^{-1} r_k`` (placed on the unknown entries, zero on the known ones), :meth:`quad` the
    per-sample ``r_k^T K_kk^{-1} r_k``; both read only the known entries of ``r``.
    """

    def __init__(self, cov, mask: torch.Tensor):
        self.cov = cov
        self.mask = mask
        self.trivial = bool(getattr(cov, "is_identity", False)) or cov.size is None
        if self.trivial:
            return
        cov.check(mask)
        self.axis = cov.axis % mask.ndim
        c = cov.matrix().to(_F64)
        f = c.shape[0]
        if f > 62:
            raise DiffusionLabError(f"known-entry patterns over {f} correlated entries are not supported (at most 62)")
        fib = self._fibres(mask)  # (N, F) bool
        codes = (fib.to(torch.long) * (2 ** torch.arange(f, device=mask.device))).sum(1)
        self.groups = []
        for code in torch.unique(codes.cpu()).tolist():
            known = torch.tensor([(code >> j) & 1 for j in range(f)], dtype=torch.bool)
            if not known.any() or known.all():
                continue  # nothing known, or nothing unknown: no shift, and (all known) a plain quadratic form
            k, u = torch.nonzero(known).reshape(-1), torch.nonzero(~known).reshape(-1)
            c_kk = c[k][:, k]
            L, info = torch.linalg.cholesky_ex(c_kk)
            if int(info):
                raise DiffusionLabError("the noise covariance of the known frames is singular; conditioning on them "
                                        "needs a definite C")
            gain = torch.zeros(f, f, dtype=_F64)
            gain[u[:, None], k[None, :]] = torch.cholesky_solve(c[k][:, u], L).T  # C_uk C_kk^{-1}
            prec = torch.zeros(f, f, dtype=_F64)
            prec[k[:, None], k[None, :]] = torch.cholesky_inverse(L)
            rows = torch.nonzero(codes == code).reshape(-1)
            self.groups.append((rows, gain, prec))
        all_known = torch.tensor([(1 << f) - 1], device=codes.device)
        self.full_rows = torch.nonzero(codes == all_known).reshape(-1)
        self.c_inv = torch.linalg.inv(c) if self.full_rows.numel() else None

    def _fibres(self, x: torch.Tensor) -> torch.Tensor:
        xm = torch.movedim(x, self.axis, -1)
        return xm.reshape(-1, xm.shape[-1])

    def _unfibre(self, f: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = list(torch.movedim(like, self.axis, -1).shape)
        return torch.movedim(f.reshape(shape), -1, self.axis)

    def shift(self, r: torch.Tensor) -> torch.Tensor:
        """``K_uk K_kk^{-1} r_k`` on the unknown entries (zero elsewhere), shaped like ``r``."""
        if self.trivial:
            return torch.zeros_like(r)
        rf = self._fibres(r)
        out = torch.zeros_like(rf)
        for rows, gain, _ in self.groups:
            rows = rows.to(r.device)
            out[rows] = rf[rows] @ gain.to(r.device, r.dtype).T
        return self._unfibre(out, r)

    def quad(self, r: torch.Tensor) -> torch.Tensor:
        """``r_k^T K_kk^{-1} r_k`` per sample, ``(B,)`` in ``r``'s dtype."""
        b = r.shape[0]
        if self.trivial:
            return (r * r * self.mask.to(r.dtype)).reshape(b, -1).sum(1)
        rf = self._fibres(r)
        q = torch.zeros(rf.shape[0], dtype=r.dtype, device=r.device)
        for rows, _, prec in self.groups:
            rows = rows.to(r.device)
            v = rf[rows]
            q[rows] = ((v @ prec.to(r.device, r.dtype)) * v).sum(1)
        if self.full_rows.numel():
            rows = self.full_rows.to(r.device)
            v = rf[rows]
            q[rows] = ((v @ self.c_inv.to(r.device, r.dtype)) * v).sum(1)
        return q.reshape(b, -1).sum(1)

    def condition(self, e: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Matheron's rule: ``e`` (a draw of ``N(0, K)``) with its known entries set to ``target`` and its unknown
        entries moved to a draw of ``eps_u | eps_k = target_k``."""
        out = e + self.shift(target - e)
        return torch.where(self.mask, target, out)


class Known:
    """Known values ``y`` (model space, ``(B, *sample_shape)``) on ``mask`` (broadcastable, 1 = known), with the
    conditioner of the process's noise (module docstring). ``repeat(m)`` is the same for ``m`` consecutive copies of
    every row (particles)."""

    def __init__(self, known: torch.Tensor, mask, cov):
        if not torch.is_tensor(known) or not known.dtype.is_floating_point:
            raise DiffusionLabError("known values must be a floating-point tensor (B, *sample_shape)")
        if not bool(torch.isfinite(known).all()):
            raise DiffusionLabError("known values must be finite (put anything finite where the mask is 0)")
        self.y = known
        self.mask = as_mask(torch.as_tensor(mask, device=known.device), known.shape).to(known.device)
        self.cov = cov
        self.conditioner = NoiseConditioner(cov, self.mask)

    @property
    def num(self) -> int:
        return self.y.shape[0]

    def repeat(self, m: int) -> "Known":
        if m == 1:
            return self
        return Known(self.y.repeat_interleave(m, 0), self.mask.repeat_interleave(m, 0), self.cov)

    def impose(self, x: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with its known entries replaced by ``value`` (default ``y``)."""
        return torch.where(self.mask, self.y if value is None else value, x)

    def start(self, grid, noise) -> torch.Tensor:
        """The known part at the grid's first point: ``s_0 y + sigma_0 e``, ``e ~ N(0, C)`` (only the known entries
        are meaningful)."""
        return grid.s[0] * self.y + grid.sigma[0] * noise(self.y)

    def bridge(self, y_now: torch.Tensor, grid, i: int, noise) -> torch.Tensor:
        """The known part at point ``i + 1`` given its value ``y_now`` at point ``i``: a draw of
        ``q(x_{p_{i+1}} | x_{p_i}, x_0 = y) = N(A y_now + B y, V C)``, exactly ``y`` on a step to the data."""
        A, B, V = grid.posterior(i)
        out = A * y_now + B * self.y
        return out + math.sqrt(V) * noise(self.y) if V > 0 else out

    def forward(self, y_from: torch.Tensor, grid, i: int, noise) -> torch.Tensor:
        """The known part at point ``i`` from point ``i + 1``: a forward step ``a x + G L z``
        (:meth:`~diffusionlab.processes.grid.TimeGrid.transition`)."""
        a, g2 = grid.transition(i)
        return a * y_from + math.sqrt(g2) * noise(self.y)


__all__ = ["NoiseConditioner", "Known"]
