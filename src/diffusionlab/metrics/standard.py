"""The standard sample-quality metrics of image generative models, computed on features of any extractor.

- **FID** (Heusel et al. 2017, eq. 6): the Frechet distance between Gaussians fitted to the two feature sets,
  :func:`~diffusionlab.metrics.frechet.frechet_distance` (float64);
- **KID** (Binkowski et al. 2018, Sec. 3): the unbiased estimator of the squared MMD (Gretton et al. 2012,
  Lemma 6, eq. 3) with the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3``,

      MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
                - 2 sum_{i, j} k(x_i, y_j) / (m n),

  averaged over ``subsets`` random subsets of ``subset_size`` points of each set, drawn without replacement
  (torch-fidelity's and Binkowski et al.'s defaults: 100 subsets of 1000); ``kid_std`` is the standard
  deviation over subsets (``ddof = 0``, as torch-fidelity reports it);
- **precision and recall** (Kynkaanniemi et al. 2019, Sec. 2, eqs. 1-2): each set's manifold is the union of
  balls centred on its points with radius the distance to the point's ``k``-th nearest neighbour in the same
  set (the point itself excluded; ``k = 3``); precision is the share of generated features inside the real
  manifold, recall the share of real features inside the generated manifold (a point on a ball's boundary is
  inside: ``<=``).

A **feature extractor** is any object called as ``extractor(images)`` with ``images`` a ``(B, 3, H, W)``
``torch.uint8`` tensor (values 0..255) that returns ``(B, D)`` features, and with a string attribute
``identity`` that names it and its weights (it keys cached reference statistics). :func:`to_uint8_rgb` turns
display-space images (``[0, 1]``, 1 or 3 channels) into that input: values rounded to bytes as images are
stored, grey replicated to 3 channels (as pytorch-fid and torch-fidelity do with grey inputs). Resizing is the
extractor's business: the FID Inception network (:mod:`diffusionlab.interop.inception`) resizes to 299 x 299
itself, as the reference implementations do.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.metrics.frechet import _as_f64, feature_statistics, frechet_distance

_F64 = torch.float64
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3


# ---- features ------------------------------------------------------------------------------------------------
def to_uint8_rgb(images01: torch.Tensor) -> torch.Tensor:
    """Display-space images ``(N, C, H, W)`` in ``[0, 1]`` (C = 1 or 3) as ``(N, 3, H, W)`` bytes: clamped,
    ``round(255 x)``, grey replicated to three channels."""
    x = torch.as_tensor(images01)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DiffusionLabError(f"images must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        u8 = x
    else:
        if not bool(torch.isfinite(x).all()):
            raise DiffusionLabError("images contain NaN or infinite values")
        u8 = (x.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def extractor_device(extractor) -> torch.device:
    """Where ``extractor`` runs: its ``device`` attribute, else the device of its first parameter, else CPU."""
    dev = getattr(extractor, "device", None)
    if dev is not None:
        return torch.device(dev)
    params = getattr(extractor, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def extract_features(extractor, images01: torch.Tensor, batch_size: int = 50, progress: bool = False) -> torch.Tensor:
    """Features ``(N, D)`` (float64, CPU) of display-space images ``(N, C, H, W)`` by any feature extractor
    (module docstring), ``batch_size`` images at a time on the extractor's device, without gradients."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DiffusionLabError(f"batch size must be an integer >= 1, got {batch_size!r}")
    x = torch.as_tensor(images01)
    n = x.shape[0] if x.ndim else 0
    if n < 2:
        raise DiffusionLabError(f"need at least 2 images for feature statistics, got {n}")
    dev = extractor_device(extractor)
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="features", leave=False)
    out = []
    with torch.no_grad():
        for s in batches:
            f = extractor(to_uint8_rgb(x[s:s + batch_size]).to(dev))
            if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] != min(batch_size, n - s):
                raise DiffusionLabError(
                    f"a feature extractor must return a (B, D) tensor; got {type(f).__name__} "
                    f"{tuple(f.shape) if torch.is_tensor(f) else ''} for a batch of {min(batch_size, n - s)}")
            out.append(f.detach().to("cpu", _F64))
    return torch.cat(out)


# ---- FID --------------------------------------------------------------------------------------------------------
def fid_from_features(fake, real=None, real_stats=None) -> float:
    """FID between the Gaussians fitted to ``fake`` features and to ``real`` features (or to ``real_stats``,
    a ``(mu, sigma)`` pair computed once for a reference set)."""
    mu, sigma = feature_statistics(fake)
    if real_stats is None:
        if real is None:
            raise DiffusionLabError("fid_from_features needs real features or real_stats")
        real_stats = feature_statistics(real)
    return frechet_distance(mu, sigma, *real_stats)


# ---- KID --------------------------------------------------------------------------------------------------------
def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """``(x y^T / d + coef0)^degree`` (Binkowski et al. 2018's kernel with ``gamma = 1 / d``)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """The unbiased squared-MMD estimator (Gretton et al. 2012, eq. 3; module docstring) in float64."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise DiffusionLabError(f"the unbiased MMD needs at least 2 points per set, got {m} and {n}")
    kxx = polynomial_kernel(x, x, degree, coef0)
    kyy = polynomial_kernel(y, y, degree, coef0)
    kxy = polynomial_kernel(x, y, degree, coef0)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.sum() / (m * n))


def kid(fake, real, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
        degree: int = 3, coef0: float = 1.0) -> dict:
    """KID (module docstring): ``{"kid_mean", "kid_std", "kid_subsets", "kid_subset_size"}``; the subset size is
    ``min(subset_size, N_fake, N_real)``; subsets drawn by ``numpy.random.default_rng(seed)``."""
    f, r = _as_f64(fake, "fake features"), _as_f64(real, "real features")
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
        raise DiffusionLabError(f"feature sets must be (N, D) with the same D, got {f.shape} and {r.shape}")
    for name, v in (("subsets", subsets), ("subset_size", subset_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DiffusionLabError(f"KID {name} must be an integer >= 1, got {v!r}")
    size = min(subset_size, f.shape[0], r.shape[0])
    if size < 2:
        raise DiffusionLabError(f"KID needs at least 2 features per set, got {f.shape[0]} and {r.shape[0]}")
    rng = np.random.default_rng(seed)
    vals = np.array([mmd2_unbiased(f[rng.choice(f.shape[0], size, replace=False)],
                                   r[rng.choice(r.shape[0], size, replace=False)], degree, coef0)
                     for _ in range(subsets)])
    return {"kid_mean": float(vals.mean()), "kid_std": float(vals.std()), "kid_subsets": subsets,
            "kid_subset_size": size}


# ---- precision and recall ------------------------------------------------------------------------------------------
def _block_min_ok(query: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each query point: is it within ``radii[j]`` of some ``centres[j]`` (``<=``)?"""
    inside = torch.zeros(query.shape[0], dtype=torch.bool)
    for s in range(0, query.shape[0], block):
        d = torch.cdist(query[s:s + block], centres)
        inside[s:s + block] = (d <= radii[None, :]).any(1)
    return inside


def knn_radii(x: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Distance of each point of ``x`` to its ``k``-th nearest neighbour in ``x``, itself excluded."""
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise DiffusionLabError(f"k must be an integer in [1, {n - 1}] for {n} points, got {k!r}")
    out = torch.empty(n, dtype=x.dtype)
    for s in range(0, n, block):
        d = torch.cdist(x[s:s + block], x)
        # the k+1 smallest include the point itself (distance 0; duplicates of it count as neighbours)
        out[s:s + block] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def precision_recall(fake, real, k: int = PR_K, block: int = 1024) -> dict:
    """Kynkaanniemi et al.'s improved precision and recall (module docstring), distances in float64:
    ``{"precision", "recall", "pr_k"}``."""
    f = torch.as_tensor(_as_f64(fake, "fake features"))
    r = torch.as_tensor(_as_f64(real, "real features"))
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
        raise DiffusionLabError(f"feature sets must be (N, D) with the same D, got {tuple(f.shape)} and {tuple(r.shape)}")
    precision = _block_min_ok(f, r, knn_radii(r, k, block), block).double().mean()
    recall = _block_min_ok(r, f, knn_radii(f, k, block), block).double().mean()
    return {"precision": float(precision), "recall": float(recall), "pr_k": k}


def image_scores(fake, real, real_stats=None, kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                 pr_k: int = PR_K, seed: int = 0) -> dict:
    """FID, KID and precision/recall of ``fake`` features against ``real`` features (``real_stats``: their
    ``(mu, sigma)`` if already computed)."""
    out = {"fid": fid_from_features(fake, real, real_stats)}
    out.update(kid(fake, real, kid_subsets, kid_subset_size, seed))
    out.update(precision_recall(fake, real, pr_k))
    return out
