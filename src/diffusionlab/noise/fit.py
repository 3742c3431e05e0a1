"""A noise covariance fitted to the data: the frames' correlation matrix of a set of videos.

The noise priors of Ge et al. 2023 ("Preserve Your Own Correlation", PYoCo) -- mixed and progressive,
:class:`~diffusionlab.noise.Mixed` / :class:`~diffusionlab.noise.Progressive` -- are chosen by hand; here the
frame covariance ``C`` is estimated from the training videos instead and then made valid:

1. :func:`frame_correlation`: for videos ``(N, Ch, F, H, W)`` every (video, channel, pixel) gives one F-vector
   ``x`` (its value through the frames). Centering (``center``): ``"frame"`` subtracts each frame's mean over the
   whole set (the usual sample covariance of the F-vectors), ``"video"`` subtracts each vector's own temporal
   mean (the per-video, per-pixel mean over frames: what stays is motion, not the static part; the estimate
   then has the ones vector in its null space and the projection below decides what to make of it), ``"none"``
   uses raw second moments. ``S = mean x x^T`` (float64), then the correlation ``D^{-1/2} S D^{-1/2}``.
   Pixels of one video are not independent, so the effective sample size is below ``N Ch H W``.
2. :func:`nearest_correlation`: the nearest matrix (Frobenius norm) that is symmetric, has unit diagonal and
   eigenvalues ``>= min_eig`` (definite, so ``C^{-1}`` exists for the Mahalanobis loss), optionally also
   Toeplitz (stationary in time: the ``(a, b, c, ...)`` form of :func:`~diffusionlab.noise.toeplitz`). Higham 2002, "Computing the
   nearest correlation matrix -- a problem from finance" (IMA J. Numer. Anal. 22), Algorithm 3.3: alternating
   projections with Dykstra's correction between the convex set ``{X : lambda_min(X) >= min_eig}`` (projection:
   clip the eigenvalues) and the affine set of unit-diagonal (Toeplitz) matrices (projection: set the diagonal
   to 1; for Toeplitz, first average every diagonal). Both sets are closed and convex, so the iteration
   converges to the nearest point of their intersection; only the non-affine projection needs the correction.
3. :func:`fit_frame_covariance` does both and returns a :class:`~diffusionlab.noise.Dense` covariance.

:func:`save_covariance` / :func:`load_covariance` store a covariance with a run (safetensors, a float64
``matrix`` tensor, JSON metadata in the header: axis, name, how it was fitted). :func:`make_noise_covariance`
extends :func:`~diffusionlab.noise.make_covariance` with the spec ``file:PATH`` (a saved covariance), and
:func:`resolve_fitted_noise` turns a run config's ``process.noise: fitted[:toeplitz]`` into such a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import COVARIANCES, Covariance, Dense, check_psd, make_covariance

_F64 = torch.float64
CENTERS = ("frame", "video", "none")
DEFAULT_MIN_EIG = 1e-3
FORMAT = "diffusionlab.noise_covariance/1"


# ---- estimation ---------------------------------------------------------------------------------------------
def frame_vectors(videos: torch.Tensor, axis: int = 2) -> torch.Tensor:
    """Every F-vector of ``videos`` (frame axis ``axis``, batch first) as rows of an ``(M, F)`` float64 matrix."""
    if not torch.is_tensor(videos):
        videos = torch.as_tensor(videos)
    if videos.ndim < 2 or not (-videos.ndim <= axis < videos.ndim) or axis % videos.ndim == 0:
        raise DiffusionLabError(f"frame axis {axis} is not a non-batch axis of data shaped {tuple(videos.shape)}")
    if not videos.dtype.is_floating_point:
        videos = videos.to(_F64)
    if not bool(torch.isfinite(videos).all()):
        raise DiffusionLabError("videos to fit a frame covariance contain NaN or infinite values")
    f = videos.shape[axis]
    return torch.movedim(videos.detach().to(_F64), axis, -1).reshape(-1, f)


def frame_correlation(videos: torch.Tensor, axis: int = 2, center: str = "frame") -> torch.Tensor:
    """The ``F x F`` correlation matrix (float64) of the frames of ``videos`` (module docstring, step 1).

    Frames that never vary (zero variance after centering) get correlation 0 with the others and 1 with
    themselves, so the result always has a unit diagonal.
    """
    if center not in CENTERS:
        raise DiffusionLabError(f"unknown centering {center!r}; allowed: {', '.join(CENTERS)}")
    x = frame_vectors(videos, axis)
    if x.shape[0] < 2:
        raise DiffusionLabError(f"need at least 2 frame vectors to estimate a correlation, got {x.shape[0]}")
    if center == "frame":
        x = x - x.mean(0, keepdim=True)
    elif center == "video":
        x = x - x.mean(1, keepdim=True)
    s = x.T @ x / x.shape[0]
    d = torch.diagonal(s).clone()
    dead = d <= 1e-300
    inv = torch.where(dead, torch.zeros_like(d), d.clamp(min=1e-300).rsqrt())
    r = inv[:, None] * s * inv[None, :]
    r = 0.5 * (r + r.T)
    r.fill_diagonal_(1.0)
    return r


# ---- projection ---------------------------------------------------------------------------------------------
def toeplitz_average(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal (Frobenius) projection onto symmetric Toeplitz matrices: every diagonal replaced by the
    mean of that diagonal and of its mirror."""
    f = a.shape[0]
    i = torch.arange(f)
    lag = (i[:, None] - i[None, :]).abs()
    sums = torch.zeros(f, dtype=a.dtype).index_add_(0, lag.reshape(-1), a.reshape(-1))
    counts = torch.bincount(lag.reshape(-1), minlength=f).to(a.dtype)
    return (sums / counts)[lag]


def _project_unit(a: torch.Tensor, toeplitz: bool) -> torch.Tensor:
    """Projection onto the affine set of unit-diagonal (Toeplitz) symmetric matrices."""
    y = toeplitz_average(a) if toeplitz else 0.5 * (a + a.T)
    y = y.clone()
    y.fill_diagonal_(1.0)
    return y


def _project_eig(a: torch.Tensor, min_eig: float) -> torch.Tensor:
    """Projection onto ``{X symmetric : lambda_min(X) >= min_eig}``: clip the eigenvalues (Higham 2002, Thm 3.2
    for ``min_eig = 0``; the same argument holds for any floor)."""
    s, v = torch.linalg.eigh(0.5 * (a + a.T))
    x = (v * s.clamp(min=min_eig)[None, :]) @ v.T
    return 0.5 * (x + x.T)


def nearest_correlation(a, min_eig: float = DEFAULT_MIN_EIG, toeplitz: bool = False, tol: float = 1e-12,
                        max_iter: int = 10000, return_info: bool = False):
    """The nearest (Frobenius norm) symmetric matrix to ``a`` with unit diagonal and eigenvalues ``>= min_eig``
    (also Toeplitz with ``toeplitz=True``): Higham 2002, Algorithm 3.3 (module docstring), float64.

    Stops when successive iterates change by less than ``tol`` (relative, Frobenius). The returned matrix is the
    last projection onto the unit-diagonal set, so its diagonal is exactly 1; its smallest eigenvalue is
    ``min_eig`` up to ``tol``. A valid input (already a correlation matrix with ``lambda_min >= min_eig``, and
    Toeplitz when asked) is returned unchanged up to round-off. ``return_info`` adds
    ``{"iterations", "converged", "distance"}``.
    """
    try:
        a = torch.as_tensor(a, dtype=_F64).clone()
    except (TypeError, ValueError, RuntimeError) as e:
        raise DiffusionLabError(f"nearest_correlation needs a square matrix of numbers: {e}") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise DiffusionLabError(f"nearest_correlation needs a square matrix, got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise DiffusionLabError("nearest_correlation got a matrix with NaN or infinite entries")
    min_eig = float(min_eig)
    if not (0.0 <= min_eig <= 1.0):
        raise DiffusionLabError(f"min_eig must lie in [0, 1] (a correlation matrix has trace F), got {min_eig!r}")
    a = 0.5 * (a + a.T)
    y = a.clone()
    ds = torch.zeros_like(a)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        r = y - ds
        x = _project_eig(r, min_eig)
        ds = x - r
        y_new = _project_unit(x, toeplitz)
        change = torch.linalg.norm(y_new - y) / max(1.0, torch.linalg.norm(y).item())
        y = y_new
        if change < tol and torch.linalg.norm(x - y) / max(1.0, torch.linalg.norm(y).item()) < math.sqrt(tol):
            converged = True
            break
    if return_info:
        return y, {"iterations": it, "converged": converged, "distance": torch.linalg.norm(y - a).item()}
    return y


# ---- the fitted covariance ------------------------------------------------------------------------------------
def fit_frame_covariance(videos: torch.Tensor, axis: int = 2, center: str = "frame", toeplitz: bool = False,
                         min_eig: float = DEFAULT_MIN_EIG, cov_axis: int | None = None) -> Dense:
    """The frame covariance fitted to ``videos`` (module docstring): correlation estimate, then the nearest valid
    (definite, unit-diagonal, optionally Toeplitz) matrix, as a :class:`Dense` covariance acting on ``cov_axis``
    (default ``axis``: the frame axis of the batches the model sees, 2 for ``(B, C, F, H, W)``)."""
    r = frame_correlation(videos, axis, center)
    c, info = nearest_correlation(r, min_eig=min_eig, toeplitz=toeplitz, return_info=True)
    if not info["converged"]:
        raise DiffusionLabError(f"nearest-correlation projection did not converge in {info['iterations']} iterations")
    name = f"Fitted(center={center}, toeplitz={bool(toeplitz)}, min_eig={min_eig:g})"
    cov = Dense(c, axis=axis if cov_axis is None else cov_axis, name=name)
    cov.fit_info = {"center": center, "toeplitz": bool(toeplitz), "min_eig": float(min_eig),
                    "raw_correlation": r.tolist(), "projection_distance": info["distance"],
                    "iterations": info["iterations"], "num_vectors": int(videos.numel() // r.shape[0])}
    return cov


def toeplitz_spec(cov: Covariance) -> str:
    """The spec ``toeplitz:1,r1,...`` that :func:`~diffusionlab.noise.make_covariance` turns back into this
    (Toeplitz) covariance exactly (17 significant digits round-trip float64); refuses a non-Toeplitz matrix."""
    m = cov.matrix(getattr(cov, "size", None))
    if not torch.allclose(toeplitz_average(m), m, rtol=0, atol=1e-12):
        raise DiffusionLabError(f"{cov!r} is not Toeplitz; save it with save_covariance and use the spec file:PATH")
    return "toeplitz:" + ",".join(repr(float(v)) for v in m[0])


# ---- persistence --------------------------------------------------------------------------------------------
def save_covariance(cov: Covariance, path, size: int | None = None, meta: dict | None = None) -> Path:
    """Write ``cov`` to ``path`` (safetensors: float64 ``matrix``; JSON metadata ``axis``, ``name``, ``size``
    and, for a fitted covariance, how it was fitted, plus ``meta``). Atomic: written to a temporary file, then
    renamed, under a unique name (every rank of a torchrun job may write the same file). ``size`` is needed only
    for the identity."""
    from diffusionlab.io import save_safetensors_atomic

    m = cov.matrix(size if size is not None else cov.size).to(_F64).contiguous()
    info = {"format": FORMAT, "axis": cov.axis, "name": getattr(cov, "name", type(cov).__name__),
            "size": int(m.shape[0])}
    fit = getattr(cov, "fit_info", None)
    if fit:
        info["fit"] = {k: v for k, v in fit.items() if k != "raw_correlation"}
    if meta:
        info.update(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic({"matrix": m}, path, metadata={"diffusionlab": json.dumps(info)})
    return path


def read_covariance_meta(path) -> dict:
    """The JSON metadata :func:`save_covariance` wrote."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DiffusionLabError(f"noise covariance file {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("diffusionlab", "{}")
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise DiffusionLabError(f"cannot read noise covariance file {str(path)!r}: {e}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise DiffusionLabError(f"noise covariance file {str(path)!r} has malformed metadata") from None


def load_covariance(path, axis: int | None = None) -> Dense:
    """Read a covariance written by :func:`save_covariance` as a :class:`Dense` (validated symmetric PSD),
    acting on ``axis`` (default: the axis saved with it)."""
    from safetensors.torch import load_file

    meta = read_covariance_meta(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise DiffusionLabError(f"cannot read noise covariance file {str(path)!r}: {e}") from None
    if "matrix" not in tensors:
        raise DiffusionLabError(f"noise covariance file {str(path)!r} holds no 'matrix' tensor "
                                f"(it holds: {', '.join(tensors) or 'nothing'})")
    ax = int(meta.get("axis", 1)) if axis is None else axis
    m = check_psd(tensors["matrix"], what=f"noise covariance in {str(path)!r}")
    return Dense(m, axis=ax, name=str(meta.get("name", "Dense")))


@COVARIANCES.register("file", context=("size", "axis"), parse=lambda arg: {"path": arg}, spec="file:PATH")
def _file(path: str, size=None, axis: int = 1) -> Covariance:
    """A covariance saved with :func:`save_covariance` (its size must match the data's frames)."""
    cov = load_covariance(os.path.expanduser(path), axis=axis)
    if size is not None and cov.size != size:
        raise DiffusionLabError(f"noise covariance in {path!r} is {cov.size}x{cov.size}, but the data has {size} "
                                f"entries on axis {axis}")
    return cov


@COVARIANCES.register("fitted", context=("size", "axis"), parse=lambda arg: {"options": arg},
                      spec="fitted[:toeplitz,frame|video|none,min_eig=V]")
def _fitted(options: str = "", size=None, axis: int = 1) -> Covariance:
    """The training videos' own frame correlation: resolved against the data when training starts
    (:func:`resolve_fitted_noise`), which writes it to the run and uses ``file:``."""
    raise DiffusionLabError("noise covariance 'fitted' needs the training data: it is resolved when training "
                            "starts (resolve_fitted_noise); give file:PATH to use a saved one")


def make_noise_covariance(spec, size: int | None = None, axis: int = 1) -> Covariance:
    """:func:`~diffusionlab.noise.make_covariance` (every registered family, ``file:PATH`` included)."""
    return make_covariance(spec, size, axis)


FITTED_FILE = "noise_covariance.safetensors"


def parse_fitted_spec(spec: str) -> dict:
    """Options of ``fitted[:opt,opt...]`` with ``opt`` in ``toeplitz``, ``video`` / ``frame`` / ``none``
    (centering), ``min_eig=V``: e.g. ``fitted:toeplitz,min_eig=0.01``."""
    kind, _, arg = str(spec).strip().partition(":")
    if kind.lower() != "fitted":
        raise DiffusionLabError(f"not a fitted noise spec: {spec!r}")
    opts = {"center": "frame", "toeplitz": False, "min_eig": DEFAULT_MIN_EIG}
    for item in filter(None, (a.strip() for a in arg.split(","))):
        key, eq, val = item.partition("=")
        if item == "toeplitz":
            opts["toeplitz"] = True
        elif item in CENTERS:
            opts["center"] = item
        elif key == "min_eig" and eq:
            try:
                opts["min_eig"] = float(val)
            except ValueError:
                raise DiffusionLabError(f"min_eig must be a number, got {val!r} in {spec!r}") from None
        else:
            raise DiffusionLabError(f"unknown option {item!r} in noise spec {spec!r}; allowed: toeplitz, "
                                    f"{', '.join(CENTERS)}, min_eig=V")
    return opts


def is_fitted_spec(spec) -> bool:
    return isinstance(spec, str) and spec.strip().lower().partition(":")[0] == "fitted"


def _noise_axis(cfg: dict, sample_ndim: int) -> int:
    axis = (cfg.get("process") or {}).get("noise_axis")
    return (2 if sample_ndim == 4 else 1) if axis is None else int(axis)


def fit_noise(cfg: dict, data: torch.Tensor, out_dir) -> tuple[dict, Covariance | None]:
    """``(cfg, cov)``: if ``cfg["process"]["noise"]`` is ``fitted[:...]``, the frame covariance fitted to ``data``
    (the training set, ``(N, *sample_shape)``) and a copy of ``cfg`` whose spec is ``file:<out_dir>/`` +
    :data:`FITTED_FILE`, where :func:`save_fitted_noise` writes it; otherwise ``(cfg, None)``. Nothing is
    written, so a run whose other input is bad leaves no file behind."""
    import copy

    spec = (cfg.get("process") or {}).get("noise")
    if not is_fitted_spec(spec):
        return cfg, None
    opts = parse_fitted_spec(spec)
    cov = fit_frame_covariance(data, axis=_noise_axis(cfg, data.ndim - 1), **opts)
    cov.fitted_spec = spec
    cfg = copy.deepcopy(cfg)
    cfg["process"]["noise"] = f"file:{Path(os.path.abspath(out_dir)) / FITTED_FILE}"
    return cfg, cov


def save_fitted_noise(cov: Covariance, out_dir) -> Path:
    """Write a covariance of :func:`fit_noise` to ``out_dir/`` :data:`FITTED_FILE` (atomic), its spec in the
    metadata (so ``--resume`` can tell whether the run's file answers the same spec)."""
    return save_covariance(cov, Path(out_dir) / FITTED_FILE, meta={"spec": getattr(cov, "fitted_spec", "fitted")})


def resolve_fitted_noise(cfg: dict, data: torch.Tensor, out_dir, log=None) -> dict:
    """:func:`fit_noise`, then :func:`save_fitted_noise` at once (for callers outside the trainer); returns the
    config naming the file."""
    cfg, cov = fit_noise(cfg, data, out_dir)
    if cov is not None:
        path = save_fitted_noise(cov, out_dir)
        if log is not None:
            log(f"diffusionlab: fitted noise covariance saved to {path}")
    return cfg


__all__ = [
    "CENTERS", "DEFAULT_MIN_EIG", "FITTED_FILE", "fit_frame_covariance", "frame_correlation", "frame_vectors",
    "load_covariance", "make_noise_covariance", "nearest_correlation", "parse_fitted_spec", "read_covariance_meta",
    "resolve_fitted_noise", "save_covariance", "toeplitz_average", "toeplitz_spec", "fit_noise", "save_fitted_noise",
    "is_fitted_spec",
]

