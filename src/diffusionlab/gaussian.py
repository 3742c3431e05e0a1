"""Gaussian log-densities, KL divergences and the conjugate posterior (Bishop 2006, secs. 2.3.3 and 1.6.1).

Three covariance shapes are covered, each by one function:

- elementwise (scalar or diagonal) variances: :func:`normal_kl`, :func:`normal_log_prob`;
- structured ``var * (C (x) I)`` with a :class:`~diffusionlab.noise.Covariance` ``C`` over one axis and a
  per-sample scalar ``var`` (the forms every process here produces): :func:`structured_kl`,
  :func:`structured_log_prob`;
- full dense covariances: :func:`full_kl`, :func:`full_log_prob`.

KL(N(mu_p, S_p) || N(mu_q, S_q)) = 1/2 [log det S_q / det S_p - d + tr(S_q^{-1} S_p) + (mu_q - mu_p)^T S_q^{-1} (mu_q - mu_p)]
(the dense KL in closed form).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.noise.covariance import Covariance, Identity

LOG_2PI = math.log(2 * math.pi)


def _as_tensors(*values):
    """Tensors from a mix of tensors and Python numbers; the numbers take the tensors' floating dtype and device,
    so a Python ``2.0`` next to float64 tensors is not computed (e.g. logged) in float32 first."""
    tensors = [v for v in values if torch.is_tensor(v)]
    floats = [v.dtype for v in tensors if v.dtype.is_floating_point]
    dtype = floats[0] if floats else torch.get_default_dtype()
    for dt in floats[1:]:
        dtype = torch.promote_types(dtype, dt)
    device = tensors[0].device if tensors else None
    return tuple(v if torch.is_tensor(v) else torch.as_tensor(v, dtype=dtype, device=device) for v in values)


def normal_kl(mean_p, var_p, mean_q, var_q) -> torch.Tensor:
    """Elementwise KL(N(mean_p, var_p) || N(mean_q, var_q)) for scalar or diagonal variances (broadcasting).

    ``1/2 (log(var_q / var_p) + var_p / var_q - 1) + (mean_p - mean_q)^2 / (2 var_q)``.
    Sum the result over the dimensions you need.
    """
    mean_p, var_p, mean_q, var_q = _as_tensors(mean_p, var_p, mean_q, var_q)
    return 0.5 * (torch.log(var_q) - torch.log(var_p) + var_p / var_q - 1.0 + (mean_p - mean_q) ** 2 / var_q)


def normal_log_prob(x, mean, var) -> torch.Tensor:
    """Elementwise ``log N(x; mean, var)`` (scalar or diagonal variance)."""
    x, mean, var = _as_tensors(x, mean, var)
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def structured_log_prob(x: torch.Tensor, mean, var, cov: Covariance | None = None) -> torch.Tensor:
    """``log N(x; mean, var * (C (x) I))`` per sample, ``(B, ...) -> (B,)``.

    ``var`` is a scalar or a per-sample ``(B,)`` tensor; ``C`` acts on ``cov.axis`` (identity if None).
    """
    cov = cov or Identity()
    d = x[0].numel()
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    var_b = var if var.ndim == 1 else var.expand(x.shape[0])
    maha = cov.mahalanobis(x - mean) / var_b
    return -0.5 * (maha + d * (LOG_2PI + torch.log(var_b)) + cov.logdet_for(x))


def structured_kl(mean_p, var_p, mean_q, var_q, cov: Covariance | None = None) -> torch.Tensor:
    """KL(N(mean_p, var_p C) || N(mean_q, var_q C)) per sample, ``(B, ...) -> (B,)``.

    Both covariances share ``C (x) I``, so its determinant cancels:
    ``1/2 [d (var_p / var_q - 1 - log(var_p / var_q)) + ||mean_p - mean_q||^2_{C^{-1}} / var_q]``.
    ``var_p`` and ``var_q`` are scalars or per-sample ``(B,)`` tensors.
    """
    cov = cov or Identity()
    diff = torch.as_tensor(mean_p) - torch.as_tensor(mean_q)
    d = diff[0].numel()
    b = diff.shape[0]
    var_p = torch.as_tensor(var_p, dtype=diff.dtype, device=diff.device).expand(b)
    var_q = torch.as_tensor(var_q, dtype=diff.dtype, device=diff.device).expand(b)
    ratio = var_p / var_q
    return 0.5 * (d * (ratio - 1.0 - torch.log(ratio)) + cov.mahalanobis(diff) / var_q)


def full_log_prob(x: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, S)`` for dense ``S`` (``(..., d, d)``), batched over leading axes, by Cholesky."""
    L = torch.linalg.cholesky(covariance)
    diff = (x - mean).unsqueeze(-1)
    z = torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)
    d = x.shape[-1]
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (z.square().sum(-1) + logdet + d * LOG_2PI)


def full_kl(mean_p, cov_p, mean_q, cov_q) -> torch.Tensor:
    """KL(N(mean_p, cov_p) || N(mean_q, cov_q)) for dense covariances, by Cholesky."""
    Lq = torch.linalg.cholesky(cov_q)
    Lp = torch.linalg.cholesky(cov_p)
    d = mean_p.shape[-1]
    # tr(S_q^{-1} S_p) = ||L_q^{-1} L_p||_F^2
    m = torch.linalg.solve_triangular(Lq, Lp, upper=False)
    tr = m.square().sum((-2, -1))
    z = torch.linalg.solve_triangular(Lq, (mean_q - mean_p).unsqueeze(-1), upper=False).squeeze(-1)
    logdet_q = 2.0 * torch.log(torch.diagonal(Lq, dim1=-2, dim2=-1)).sum(-1)
    logdet_p = 2.0 * torch.log(torch.diagonal(Lp, dim1=-2, dim2=-1)).sum(-1)
    return 0.5 * (logdet_q - logdet_p - d + tr + z.square().sum(-1))


def conjugate_posterior(mu_x, var_x, mu_y, var_y, y):
    """The Gaussian-conjugate posterior (Bishop 2006, eq. 2.116): prior ``x ~ N(mu_x, var_x)``, likelihood ``y | x ~ N(mu_y x, var_y)``.

    Returns the posterior ``(mu, var)`` of ``x | y``: ``var = (1 / var_x + mu_y^2 / var_y)^{-1}``,
    ``mu = var (mu_x / var_x + mu_y y / var_y)`` (eq. 14). Elementwise, broadcasting.
    """
    var = 1.0 / (1.0 / var_x + mu_y**2 / var_y)
    return var * (mu_x / var_x + mu_y * y / var_y), var

