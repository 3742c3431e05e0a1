"""The Frechet (2-Wasserstein) distance between two Gaussians fitted to feature sets, in float64.

For Gaussians ``N(mu1, S1)`` and ``N(mu2, S2)``::

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

(this is the *squared* 2-Wasserstein distance, the quantity called FID when the features come from an
Inception network). ``S1 S2`` is not symmetric, so instead of a general matrix square root
(``scipy.linalg.sqrtm``, which can return spurious imaginary parts and fails on singular products) the trace
term is computed in the symmetric form

    tr((S1 S2)^{1/2}) = tr((A S2 A)^{1/2}) = sum_i sqrt(lambda_i(A S2 A)),   A = S1^{1/2},

which holds because ``S1 S2 = A (A S2 A) A^{-1}`` (a similarity, when S1 is definite; by continuity
otherwise), so both products have the same eigenvalues, all real and non-negative. ``A`` and the
eigenvalues come from ``numpy.linalg.eigh`` of symmetric matrices; eigenvalues below zero (round-off on
singular covariances, e.g. a collapsed sample set) are clipped to zero. The result is clipped at zero too.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusionlab.errors import DiffusionLabError


def _as_f64(x, name: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DiffusionLabError(f"{name} must be a real numeric array, got {type(x).__name__}: {e}") from None
    if not np.all(np.isfinite(arr)):
        raise DiffusionLabError(f"{name} contains NaN or infinite values; only finite values are allowed")
    return arr


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (``ddof=1``), in float64, of features ``(N, D)``, N >= 2."""
    f = _as_f64(features, "features")
    if f.ndim != 2:
        raise DiffusionLabError(f"features must have shape (N, D), got shape {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise DiffusionLabError(f"need at least 2 feature vectors for a covariance, got N={f.shape[0]}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance ``||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`` between two Gaussians.

    Means have shape ``(D,)``, covariances ``(D, D)`` symmetric PSD (tensors or arrays; computed in float64).
    """
    mu1, mu2 = _as_f64(mu1, "mu1"), _as_f64(mu2, "mu2")
    s1, s2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise DiffusionLabError(
            f"means must both have shape (D,), got mu1 {tuple(mu1.shape)} and mu2 {tuple(mu2.shape)}"
        )
    d = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise DiffusionLabError(f"{name} must have shape ({d}, {d}) to match the means, got {tuple(s.shape)}")
        scale = max(1.0, float(np.abs(s).max()))
        if not np.allclose(s, s.T, rtol=0.0, atol=1e-8 * scale):
            raise DiffusionLabError(f"{name} must be symmetric; max |S - S^T| = {np.abs(s - s.T).max():.3g}")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def frechet_distance_features(features1, features2) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets ``(N, D)``."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    if mu1.shape != mu2.shape:
        raise DiffusionLabError(
            f"feature sets must have the same dimension D, got {mu1.shape[0]} and {mu2.shape[0]}"
        )
    return frechet_distance(mu1, s1, mu2, s2)
