"""Noise covariances C acting on one axis of a tensor (the frames of a video).

A covariance here is an ``F x F`` symmetric positive (semi-)definite matrix ``C`` applied along one chosen
axis of a tensor of any rank, and the identity along every other axis: for a video batch
``(B, Ch, F, H, W)`` with ``axis=2`` the noise of one sample has covariance ``C (x) I`` -- frames are
correlated, pixels and channels are not. C is any symmetric positive semi-definite matrix (not only a diagonal
one); its square root ``L`` exists through the spectral decomposition ``C = V S V^T``.

Every covariance offers the same operations, each O(F) or O(F^2) per vector and never an explicit inverse:

=================  ==========================================================
``apply(x)``       ``C x``
``solve(x)``       ``C^{-1} x``
``unwhiten(x)``    ``L x`` with ``L L^T = C`` (``sample`` is ``unwhiten(z)``)
``whiten(x)``      ``L^{-1} x``
``mahalanobis(x)`` ``x^T C^{-1} x`` summed over one sample, shape ``(B,)``
``logdet()``       ``log det C`` of the ``F x F`` matrix (float64)
=================  ==========================================================

The identity costs nothing: its operations return their input.

Families (the first two are the noise priors of Ge et al. 2023, "Preserve Your Own Correlation"):

- :class:`Identity` -- i.i.d. noise;
- :class:`Mixed` -- compound symmetric, 1 on the diagonal and ``alpha^2 / (1 + alpha^2)`` off it
  (Sherman-Morrison solve, closed-form symmetric square root);
- :class:`Progressive` -- AR(1), ``rho^|i-j|`` with ``rho = alpha / sqrt(1 + alpha^2)``
  (tridiagonal inverse, bidiagonal whitening);
- :func:`toeplitz` -- the symmetric Toeplitz matrix with first row ``(a, b, c, ...)`` (stationary frame noise);
- :class:`Dense` -- any symmetric PSD matrix (Cholesky when definite, ``V sqrt(S)`` otherwise).
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch

from diffusionlab.configuration import Catalogue
from diffusionlab.errors import DiffusionLabError

_F64 = torch.float64


def _matmul_axis(m: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Multiply ``x`` by the ``F x F`` matrix ``m`` along ``axis``: ``y[..., i, ...] = sum_j m[i, j] x[..., j, ...]``."""
    xm = torch.movedim(x, axis, -1)
    return torch.movedim(xm @ m.transpose(0, 1), -1, axis)


class Covariance:
    """Base class: a covariance over one axis of a tensor; see the module docstring.

    ``axis`` indexes the full tensor, batch axis included (``axis=2`` for ``(B, C, F, H, W)``;
    negative values count from the end, ``axis=-3`` for the same videos).
    """

    size: int | None = None
    is_identity: bool = False

    def __init__(self, axis: int = 1):
        if not isinstance(axis, int) or axis == 0:
            raise DiffusionLabError(f"covariance axis must be a non-batch axis (an int other than 0), got {axis!r}")
        self.axis = axis
        self._cache: dict = {}

    # ---- helpers ------------------------------------------------------------------------------------------
    def _cached(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The float64 master ``name`` cast once to ``like``'s dtype and device."""
        key = (name, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(dtype=like.dtype, device=like.device)
        return self._cache[key]

    def check(self, x: torch.Tensor) -> None:
        """Raise a clear error if ``x`` has no axis of length F where this covariance acts."""
        if self.size is None:
            return
        if x.ndim < 2 or not (-x.ndim <= self.axis < x.ndim):
            raise DiffusionLabError(
                f"noise covariance acts on axis {self.axis}, but the tensor has shape {tuple(x.shape)}"
            )
        if x.shape[self.axis] != self.size:
            raise DiffusionLabError(
                f"noise covariance is {self.size}x{self.size} over axis {self.axis}, but the tensor has "
                f"{x.shape[self.axis]} entries there (shape {tuple(x.shape)})"
            )

    def numel_per_frame(self, x: torch.Tensor) -> int:
        """How many independent copies of the F-vector one sample of ``x`` holds (numel / F)."""
        n = 1
        for s in x.shape[1:]:
            n *= s
        return n if self.size is None else n // self.size

    # ---- operations (overridden) --------------------------------------------------------------------------
    def matrix(self, size: int | None = None) -> torch.Tensor:
        """The dense ``F x F`` matrix in float64 (``size`` is needed only for the identity)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unwhiten(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logdet(self) -> float:
        raise NotImplementedError

    # ---- derived ------------------------------------------------------------------------------------------
    def sample(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
        """Draw ``L z``, ``z ~ N(0, I)`` of ``shape``: noise with covariance C along ``axis``."""
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        self.check(z)
        return self.unwhiten(z)

    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis norm ``x^T (C (x) I)^{-1} x`` of each sample: ``(B, ...) -> (B,)``."""
        return (x * self.solve(x)).reshape(x.shape[0], -1).sum(dim=1)

    def logdet_for(self, x: torch.Tensor) -> float:
        """``log det (C (x) I)`` for one sample shaped like ``x[0]``: ``logdet(C) * numel / F``."""
        return self.logdet() * self.numel_per_frame(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, axis={self.axis})"


class Identity(Covariance):
    """I.i.d. noise. Every operation returns its input: the identity costs nothing extra."""

    is_identity = True

    def matrix(self, size: int | None = None) -> torch.Tensor:
        if size is None:
            raise DiffusionLabError("Identity.matrix needs the size F")
        return torch.eye(size, dtype=_F64)

    def check(self, x: torch.Tensor) -> None:  # any shape
        return None

    def apply(self, x):
        return x

    def solve(self, x):
        return x

    def unwhiten(self, x):
        return x

    def whiten(self, x):
        return x

    def mahalanobis(self, x):
        return x.reshape(x.shape[0], -1).square().sum(dim=1)

    def logdet(self) -> float:
        return 0.0

    def sample(self, shape, generator=None, device=None, dtype=torch.float32):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DiffusionLabError(f"covariance size F must be an integer >= 1, got {size!r}")
    return size


#: the largest noise-prior alpha: beyond it the frames' noise is numerically one draw (``1 - r = 1 / (1 + alpha^2)``
#: below 1e-6, so ``C^{-1}`` amplifies by more than 1e6 and float32 training loses every digit)
MAX_ALPHA = 1e3
#: the range of a Toeplitz covariance's diagonal ``a`` (the noise variance relative to i.i.d. noise): outside it
#: ``C^{-1}`` or ``C`` overflows float32 arithmetic (``toeplitz:1e-300`` gives non-finite losses at every step)
TOEPLITZ_DIAGONAL = (1e-6, 1e6)


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError, OverflowError):
        raise DiffusionLabError(f"noise-prior alpha must be a number >= 0, got {alpha!r}") from None
    if not math.isfinite(a) or a < 0:
        raise DiffusionLabError(f"noise-prior alpha must be finite and >= 0, got {alpha!r}")
    if a > MAX_ALPHA:
        raise DiffusionLabError(f"noise-prior alpha must be at most {MAX_ALPHA:g} (beyond it the frames share one noise "
                                f"draw to float precision: 1 - r = 1 / (1 + alpha^2) < 1e-6), got {alpha!r}")
    return a


class Mixed(Covariance):
    """Compound-symmetric ("mixed") noise: ``C = (1 - r) I + r 1 1^T`` with ``r = alpha^2 / (1 + alpha^2)``.

    Ge et al. 2023: ``eps_i = (alpha eps_shared + eps_ind_i) / sqrt(1 + alpha^2)``. Eigenvalues are ``1 - r``
    (on the complement of ``1``) and ``1 - r + r F`` (along ``1``), so with ``P = 1 1^T / F``::

        C^{+-1/2} = (1 - r)^{+-1/2} (I - P) + (1 - r + r F)^{+-1/2} P

    and ``C^{-1} x = (x - r / (1 - r + r F) * sum(x)) / (1 - r)`` (Sherman-Morrison).
    """

    def __init__(self, alpha: float, size: int, axis: int = 1):
        super().__init__(axis)
        self.alpha = _check_alpha(alpha)
        self.size = _check_size(size)
        self.r = self.alpha**2 / (1.0 + self.alpha**2)
        self.lam_perp = 1.0 - self.r  # eigenvalue on the complement of the ones vector
        self.lam_one = 1.0 - self.r + self.r * self.size  # eigenvalue along the ones vector

    def matrix(self, size=None):
        f = self.size
        return (1 - self.r) * torch.eye(f, dtype=_F64) + self.r * torch.ones(f, f, dtype=_F64)

    def _split(self, x):
        mean = x.mean(dim=self.axis, keepdim=True)
        return x - mean, mean

    def _spectral(self, x, power: float):
        perp, mean = self._split(x)
        return perp * self.lam_perp**power + mean * self.lam_one**power

    def apply(self, x):
        return self._spectral(x, 1.0)

    def solve(self, x):
        return self._spectral(x, -1.0)

    def unwhiten(self, x):
        return self._spectral(x, 0.5)

    def whiten(self, x):
        return self._spectral(x, -0.5)

    def logdet(self) -> float:
        return (self.size - 1) * math.log(self.lam_perp) + math.log(self.lam_one)

    def __repr__(self):
        return f"Mixed(alpha={self.alpha}, size={self.size}, axis={self.axis})"


class _MatrixBacked(Covariance):
    """A covariance that keeps its dense ``C`` (``_C``) and a square root ``L`` (``_L``) in float64: ``C x`` and
    ``L x`` are one small matmul along the axis (O(F^2) per vector, negligible next to a network)."""

    _C: torch.Tensor
    _L: torch.Tensor

    def matrix(self, size=None):
        return self._C.clone()

    def apply(self, x):
        return _matmul_axis(self._cached("_C", x), x, self.axis)

    def unwhiten(self, x):
        return _matmul_axis(self._cached("_L", x), x, self.axis)


class Progressive(_MatrixBacked):
    """AR(1) ("progressive") noise: ``C_ij = rho^|i-j|`` with ``rho = alpha / sqrt(1 + alpha^2)``.

    Ge et al. 2023: ``eps_0 = z_0``, ``eps_i = rho eps_{i-1} + sqrt(1 - rho^2) z_i``. That recursion is the
    Cholesky factor L; its inverse is bidiagonal and ``C^{-1}`` is tridiagonal::

        (C^{-1} x)_i = ((1 + rho^2) x_i - rho (x_{i-1} + x_{i+1})) / (1 - rho^2)   (interior i)
        (C^{-1} x)_0 = (x_0 - rho x_1) / (1 - rho^2),  likewise at i = F - 1.

    ``log det C = (F - 1) log(1 - rho^2)``.
    """

    def __init__(self, alpha: float, size: int, axis: int = 1):
        super().__init__(axis)
        self.alpha = _check_alpha(alpha)
        self.size = _check_size(size)
        self.rho = self.alpha / math.sqrt(1.0 + self.alpha**2)
        self.one_m_rho2 = 1.0 / (1.0 + self.alpha**2)  # 1 - rho^2, computed without cancellation
        i = torch.arange(self.size, dtype=_F64)
        lag = (i[:, None] - i[None, :])
        self._C = self.rho ** lag.abs()
        # Cholesky factor: L_ij = rho^(i-j) * (1 if j == 0 else sqrt(1 - rho^2)) for i >= j.
        col = torch.full((self.size,), math.sqrt(self.one_m_rho2), dtype=_F64)
        col[0] = 1.0
        self._L = torch.where(lag >= 0, self.rho ** lag.clamp(min=0), torch.zeros((), dtype=_F64)) * col[None, :]

    def whiten(self, x):
        xm = torch.movedim(x, self.axis, -1)
        w = xm.clone()
        w[..., 1:] = (xm[..., 1:] - self.rho * xm[..., :-1]) / math.sqrt(self.one_m_rho2)
        return torch.movedim(w, -1, self.axis)

    def solve(self, x):
        if self.size == 1:  # C = [[1]]
            return x.clone()
        xm = torch.movedim(x, self.axis, -1)
        rho = self.rho
        y = xm * (1.0 + rho**2)
        y[..., 0] = xm[..., 0]
        y[..., -1] = xm[..., -1]
        y[..., 1:] -= rho * xm[..., :-1]
        y[..., :-1] -= rho * xm[..., 1:]
        return torch.movedim(y / self.one_m_rho2, -1, self.axis)

    def logdet(self) -> float:
        return (self.size - 1) * math.log(self.one_m_rho2)

    def __repr__(self):
        return f"Progressive(alpha={self.alpha}, size={self.size}, axis={self.axis})"


def check_psd(matrix, what: str = "noise covariance", rtol: float = 1e-10) -> torch.Tensor:
    """Validate a symmetric positive semi-definite matrix; return it as float64.

    Raises :class:`DiffusionLabError` naming the offending entry or eigenvalue.
    """
    try:
        c = torch.as_tensor(matrix, dtype=_F64).clone()
    except (TypeError, ValueError, RuntimeError) as e:
        raise DiffusionLabError(f"{what} must be a square matrix of numbers: {e}") from None
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
        raise DiffusionLabError(f"{what} must be a non-empty square matrix, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        bad = torch.nonzero(~torch.isfinite(c))[0].tolist()
        raise DiffusionLabError(f"{what} has a non-finite entry {c[bad[0], bad[1]].item()} at {tuple(bad)}")
    asym = (c - c.T).abs()
    scale = c.abs().max().clamp(min=1e-300)
    if asym.max() > 1e-9 * scale:
        i, j = divmod(int(asym.argmax()), c.shape[0])
        raise DiffusionLabError(
            f"{what} is not symmetric: C[{i},{j}] = {c[i, j].item():.6g} but C[{j},{i}] = {c[j, i].item():.6g}"
        )
    c = 0.5 * (c + c.T)
    eig = torch.linalg.eigvalsh(c)
    tol = rtol * max(1.0, eig.abs().max().item())
    if eig[0] < -tol:
        raise DiffusionLabError(
            f"{what} is not positive semi-definite: it has eigenvalue {eig[0].item():.6g} < 0 "
            f"(all eigenvalues: {[round(v, 6) for v in eig.tolist()]})"
        )
    return c


class Dense(_MatrixBacked):
    """Any symmetric positive semi-definite ``F x F`` matrix.

    Positive definite: ``L`` is the Cholesky factor and solves are triangular. Singular (semi-definite):
    ``L = V sqrt(S)`` from the spectral decomposition ``C = V S V^T`` (``V sqrt(S)``), which still
    samples; ``solve``, ``whiten``, ``mahalanobis`` and ``logdet`` then raise, since they need ``C^{-1}``.
    """

    def __init__(self, matrix, axis: int = 1, name: str | None = None):
        super().__init__(axis)
        self._C = check_psd(matrix)
        self.size = self._C.shape[0]
        self.name = name or "Dense"
        self._L, info = torch.linalg.cholesky_ex(self._C)
        self.definite = bool(info == 0)
        if self.definite:
            self._Linv = torch.linalg.solve_triangular(self._L, torch.eye(self.size, dtype=_F64), upper=False)
            self._Cinv = self._Linv.T @ self._Linv  # F x F, formed once from triangular solves
        else:
            s, v = torch.linalg.eigh(self._C)
            self._L = v * s.clamp(min=0).sqrt()[None, :]

    def _need_definite(self, op: str):
        if not self.definite:
            eig = torch.linalg.eigvalsh(self._C)[0].item()
            raise DiffusionLabError(
                f"{op} needs a positive-definite noise covariance, but this {self.name} covariance is singular "
                f"(smallest eigenvalue {eig:.3g})"
            )

    def whiten(self, x):
        self._need_definite("whiten")
        return _matmul_axis(self._cached("_Linv", x), x, self.axis)

    def solve(self, x):
        self._need_definite("solve")
        return _matmul_axis(self._cached("_Cinv", x), x, self.axis)

    def logdet(self) -> float:
        self._need_definite("logdet")
        return 2.0 * torch.log(torch.diagonal(self._L)).sum().item()

    def __repr__(self):
        return f"{self.name}(size={self.size}, axis={self.axis})"


def toeplitz(coeffs: Sequence[float], size: int, axis: int = 1) -> Dense:
    """The symmetric Toeplitz covariance with first row ``(a, b, c, ...)``, zeros past its end (stationary in time).

    ``C_ij = coeffs[|i - j|]`` (0 where ``|i - j| >= len(coeffs)``). Refused if it is not PSD.
    """
    size = _check_size(size)
    try:
        c = [float(v) for v in coeffs]
    except (TypeError, ValueError):
        raise DiffusionLabError(f"Toeplitz coefficients must be numbers, got {coeffs!r}") from None
    if len(c) < 1:
        raise DiffusionLabError("Toeplitz covariance needs at least one coefficient (the diagonal a)")
    if not all(math.isfinite(v) for v in c):
        raise DiffusionLabError(f"Toeplitz coefficients must be finite numbers, got {c}")
    lo, hi = TOEPLITZ_DIAGONAL
    if not lo <= c[0] <= hi:
        raise DiffusionLabError(f"Toeplitz covariance diagonal a = {c[0]:g} must lie in [{lo:g}, {hi:g}] (the noise "
                                "variance relative to i.i.d. noise; outside it float32 training overflows)")
    if len(c) > size:
        raise DiffusionLabError(f"Toeplitz covariance has {len(c)} coefficients but only {size} frames")
    row = torch.zeros(size, dtype=_F64)
    row[: len(c)] = torch.tensor(c, dtype=_F64)
    i = torch.arange(size)
    return Dense(row[(i[:, None] - i[None, :]).abs()], axis=axis, name=f"Toeplitz{tuple(c)}")


# ---- the catalogue of covariance families (config specs ``family:argument``) ------------------------------------
#: ``process.noise`` specs: ``family`` or ``family:argument``; each family's ``parse`` turns the argument into the
#: constructor's options (``size`` and ``axis`` come from the data)
COVARIANCES = Catalogue("noise covariance", "process.noise")


def _one_number(what: str):
    def parse(arg: str) -> dict:
        try:
            return {what: float(arg)}
        except ValueError:
            raise DiffusionLabError(f"noise covariance parameter {what} must be a number, got {arg!r}") from None
    return parse


def _numbers(arg: str) -> dict:
    try:
        return {"coeffs": [float(v) for v in arg.split(",")]}
    except ValueError:
        raise DiffusionLabError(f"toeplitz coefficients must be numbers, got {arg!r}") from None


@COVARIANCES.register("iid", context=("size", "axis"), parse=lambda arg: {}, spec="iid")
def _iid(size=None, axis: int = 1) -> Covariance:
    """Independent noise, C = I (also written ``identity``)."""
    return Identity(axis)


@COVARIANCES.register("mixed", context=("size", "axis"), parse=_one_number("alpha"), spec="mixed:ALPHA")
def _mixed(alpha: float, size=None, axis: int = 1) -> Covariance:
    """Ge et al. 2023's mixed noise: 1 on the diagonal, alpha^2 / (1 + alpha^2) off it."""
    return Mixed(alpha, _frames(size, "mixed"), axis)


@COVARIANCES.register("progressive", context=("size", "axis"), parse=_one_number("alpha"),
                      spec="progressive:ALPHA")
def _progressive(alpha: float, size=None, axis: int = 1) -> Covariance:
    """Ge et al. 2023's progressive noise: AR(1) with rho = alpha / sqrt(1 + alpha^2)."""
    return Progressive(alpha, _frames(size, "progressive"), axis)


@COVARIANCES.register("toeplitz", context=("size", "axis"), parse=_numbers, spec="toeplitz:a,b,c,...")
def _toeplitz(coeffs: list, size=None, axis: int = 1) -> Covariance:
    """The symmetric Toeplitz matrix with first row (a, b, c, ...), zeros beyond."""
    return toeplitz(coeffs, _frames(size, "toeplitz"), axis)


def _frames(size, family: str) -> int:
    if size is None:
        raise DiffusionLabError(f"noise covariance {family!r} needs a frame axis, but the data has no frames")
    return size


def parse_covariance_spec(spec) -> tuple:
    """``(entry, options)`` of a spec string ``family[:argument]`` (``None``, ``iid``, ``identity``: independent)."""
    s = "" if spec is None else str(spec).strip()
    kind, sep, arg = s.partition(":")
    kind = kind.lower()
    if kind in ("", "identity", "none"):
        kind = "iid"
    if kind not in COVARIANCES:
        allowed = ", ".join(e.meta.get("spec", e.name) for e in COVARIANCES.entries.values())
        raise DiffusionLabError(f"unknown noise covariance {spec!r}; allowed: {allowed}")
    entry = COVARIANCES.get(kind)
    params = list(entry.parameters())
    required = [k for k, v in entry.parameters().items() if v.default is inspect.Parameter.empty]
    if required and not arg:
        raise DiffusionLabError(f"noise covariance {spec!r} needs a parameter: {entry.meta.get('spec', kind)}")
    if arg and not params:
        raise DiffusionLabError(f"noise covariance {kind!r} takes no parameter, got {spec!r}")
    return entry, entry.meta["parse"](arg) if arg else {}


def make_covariance(spec: str | None, size: int | None = None, axis: int = 1) -> Covariance:
    """Build a covariance from a CLI/config spec (the :data:`COVARIANCES` families: ``iid``, ``mixed:ALPHA``,
    ``progressive:ALPHA``, ``toeplitz:a,b,c,...``, and ``file:PATH`` once :mod:`diffusionlab.noise.fit` is loaded)
    with ``size`` frames along ``axis``."""
    entry, opts = parse_covariance_spec(spec)
    return entry.build(opts, size=size, axis=axis)
