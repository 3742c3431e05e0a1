"""Gaussian log-densities, KLs (seed 002 eqs. 28-30) and the conjugate posterior (seed 002 eq. 14).

References: scipy's quadrature and ``multivariate_normal``, Monte Carlo with standard-error tolerances,
the dense expanded matrix ``var * (C (x) I)`` built with ``torch.kron``, and brute-force Bayes on a grid.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffusionlab.gaussian import (
    conjugate_posterior,
    full_kl,
    full_log_prob,
    normal_kl,
    normal_log_prob,
    structured_kl,
    structured_log_prob,
)
from diffusionlab.noise.covariance import Dense, Identity, Mixed, Progressive, toeplitz

F64 = torch.float64


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _expanded(C: torch.Tensor, sample_shape, pos: int) -> torch.Tensor:
    """``C (x) I`` for one sample of ``sample_shape`` with C on sample position ``pos`` (row-major flattening)."""
    before = int(np.prod(sample_shape[:pos])) if pos else 1
    after = int(np.prod(sample_shape[pos + 1:])) if pos + 1 < len(sample_shape) else 1
    return torch.kron(torch.eye(before, dtype=F64), torch.kron(C.contiguous(), torch.eye(after, dtype=F64)))


COVS = {
    "mixed": lambda f, axis: Mixed(0.7, f, axis),
    "progressive": lambda f, axis: Progressive(1.3, f, axis),
    "toeplitz": lambda f, axis: toeplitz([1.0, 0.4, -0.1], f, axis),
    "dense": lambda f, axis: Dense(_spd(f, 21), axis),
}


# ---------------------------------------------------------------------------------------------------------------
# 1-D: normal_kl and normal_log_prob against quadrature and scipy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mp,vp,mq,vq",
    [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.2, 2.0), (2.0, 4.0, 0.0, 0.25), (-1.0, 0.01, 1.0, 1.0), (0.0, 3.0, 0.1, 3.0)],
)
def test_normal_kl_matches_quadrature(mp, vp, mq, vq):
    sp = math.sqrt(vp)

    def integrand(x):
        return stats.norm.pdf(x, mp, sp) * (stats.norm.logpdf(x, mp, sp) - stats.norm.logpdf(x, mq, math.sqrt(vq)))

    ref, abserr = integrate.quad(integrand, mp - 30 * sp, mp + 30 * sp, epsabs=1e-12, epsrel=1e-12, limit=200)
    assert abserr < 1e-9
    got = normal_kl(torch.tensor(mp, dtype=F64), torch.tensor(vp, dtype=F64), torch.tensor(mq, dtype=F64),
                    torch.tensor(vq, dtype=F64)).item()
    assert got == pytest.approx(ref, rel=1e-8, abs=1e-9)


def test_normal_kl_broadcasts_and_is_asymmetric():
    mp = torch.tensor([[0.0, 1.0, -2.0]], dtype=F64)
    vp = torch.tensor([[1.0], [0.5]], dtype=F64)
    kl = normal_kl(mp, vp, 0.5, 2.0)
    assert kl.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            v = vp[i, 0].item()
            ref = 0.5 * (math.log(2.0 / v) + v / 2.0 - 1 + (mp[0, j].item() - 0.5) ** 2 / 2.0)
            assert kl[i, j].item() == pytest.approx(ref, rel=1e-13)
    # KL(p || q) != KL(q || p): the argument order matters, so a swapped implementation is caught
    a = normal_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(4.0)).item()
    b = normal_kl(torch.tensor(1.0), torch.tensor(4.0), torch.tensor(0.0), torch.tensor(1.0)).item()
    assert abs(a - b) > 0.5


def test_normal_log_prob_matches_scipy():
    x = _rand((7,), 1)
    mean = _rand((7,), 2)
    var = torch.linspace(0.1, 3.0, 7, dtype=F64)
    ref = stats.norm.logpdf(x.numpy(), mean.numpy(), var.sqrt().numpy())
    assert np.allclose(normal_log_prob(x, mean, var).numpy(), ref, rtol=1e-13, atol=1e-13)
    # Python-number parameters next to float64 tensors stay float64 (no float32 log(var) on the way)
    ref = stats.norm.logpdf(x.numpy(), 0.3, math.sqrt(2.7))
    got = normal_log_prob(x, 0.3, 2.7)
    assert got.dtype == F64 and np.allclose(got.numpy(), ref, rtol=1e-13, atol=1e-13)


def test_diagonal_normal_kl_summed_equals_full_kl():
    mp, mq = _rand((5,), 3), _rand((5,), 4)
    vp = torch.linspace(0.2, 2.0, 5, dtype=F64)
    vq = torch.linspace(1.5, 0.3, 5, dtype=F64)
    ref = full_kl(mp, torch.diag(vp), mq, torch.diag(vq))
    assert normal_kl(mp, vp, mq, vq).sum().item() == pytest.approx(ref.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# multi-D: full_kl / full_log_prob
# ---------------------------------------------------------------------------------------------------------------
def test_full_log_prob_matches_scipy_batched():
    d = 4
    S = torch.stack([_spd(d, 1), _spd(d, 2)])  # (2, d, d), batched over the leading axis
    mean = _rand((2, d), 5)
    x = _rand((2, d), 6)
    got = full_log_prob(x, mean, S)
    for i in range(2):
        ref = stats.multivariate_normal(mean[i].numpy(), S[i].numpy()).logpdf(x[i].numpy())
        assert got[i].item() == pytest.approx(ref, rel=1e-12)


def test_full_kl_matches_monte_carlo():
    d, n = 4, 100_000
    mp, mq = _rand((d,), 7), _rand((d,), 8)
    Sp, Sq = _spd(d, 9), _spd(d, 10)
    x = mp + _rand((n, d), 11) @ torch.linalg.cholesky(Sp).T  # x ~ p
    log_ratio = stats.multivariate_normal(mp.numpy(), Sp.numpy()).logpdf(x.numpy()) - stats.multivariate_normal(
        mq.numpy(), Sq.numpy()
    ).logpdf(x.numpy())
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    kl = full_kl(mp, Sp, mq, Sq).item()
    # 5 standard errors of a mean over n = 100000 draws
    assert abs(kl - mc) < 5 * se, (kl, mc, se)
    # the check has power: the reversed KL is many standard errors away
    assert abs(full_kl(mq, Sq, mp, Sp).item() - mc) > 20 * se
    assert full_kl(mp, Sp, mp, Sp).item() == pytest.approx(0.0, abs=1e-12)


def test_full_kl_batched():
    S = torch.stack([_spd(3, 1), _spd(3, 2)])
    m = _rand((2, 3), 3)
    kl = full_kl(m, S, m.flip(0), S.flip(0))
    assert kl.shape == (2,)
    assert kl[0].item() == pytest.approx(full_kl(m[0], S[0], m[1], S[1]).item(), rel=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# structured covariances var * (C (x) I) over one axis
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(COVS))
@pytest.mark.parametrize("shape,axis", [((3, 4, 2), 1), ((3, 2, 4, 3), -2)])
def test_structured_kl_equals_full_kl_on_expanded_matrix(name, shape, axis):
    cov = COVS[name](4, axis)
    C = cov.matrix()
    sample = shape[1:]
    full = _expanded(C, sample, (axis % len(shape)) - 1)
    B = shape[0]
    mean_p, mean_q = _rand(shape, 12), _rand(shape, 13)
    var_p = torch.tensor([0.3, 1.0, 2.5], dtype=F64)
    var_q = torch.tensor([1.0, 0.7, 0.2], dtype=F64)
    got = structured_kl(mean_p, var_p, mean_q, var_q, cov)
    assert got.shape == (B,)
    for b in range(B):
        ref = full_kl(mean_p[b].reshape(-1), var_p[b] * full, mean_q[b].reshape(-1), var_q[b] * full)
        assert got[b].item() == pytest.approx(ref.item(), rel=1e-10)
    # scalar variances broadcast over the batch
    got_s = structured_kl(mean_p, 0.5, mean_q, 2.0, cov)
    ref0 = full_kl(mean_p[0].reshape(-1), 0.5 * full, mean_q[0].reshape(-1), 2.0 * full)
    assert got_s[0].item() == pytest.approx(ref0.item(), rel=1e-10)


@pytest.mark.parametrize("name", ["mixed", "progressive", "dense"])
def test_structured_kl_matches_monte_carlo(name):
    F, d, n = 4, 2, 50_000
    cov = COVS[name](F, 1)
    full = _expanded(cov.matrix(), (F, d), 0)
    mean_p, mean_q = _rand((1, F, d), 14), _rand((1, F, d), 15)
    var_p, var_q = 0.6, 1.4
    g = torch.Generator().manual_seed(16)
    x = mean_p + math.sqrt(var_p) * cov.sample((n, F, d), generator=g, dtype=F64)  # x ~ p
    xf = x.reshape(n, -1).numpy()
    log_ratio = stats.multivariate_normal(mean_p.reshape(-1).numpy(), var_p * full.numpy()).logpdf(xf) - \
        stats.multivariate_normal(mean_q.reshape(-1).numpy(), var_q * full.numpy()).logpdf(xf)
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    kl = structured_kl(mean_p, var_p, mean_q, var_q, cov).item()
    assert abs(kl - mc) < 5 * se, (kl, mc, se)  # 5 standard errors of a mean over n = 50000 draws
    # ignoring C (the i.i.d. KL) is many standard errors off
    kl_iid = structured_kl(mean_p, var_p, mean_q, var_q, Identity()).item()
    assert abs(kl_iid - mc) > 10 * se


@pytest.mark.parametrize("name", list(COVS) + ["identity"])
def test_structured_log_prob_equals_full_and_scipy(name):
    shape, axis = (3, 2, 4, 3), 2
    cov = Identity(axis) if name == "identity" else COVS[name](4, axis)
    C = torch.eye(4, dtype=F64) if name == "identity" else cov.matrix()
    full = _expanded(C, shape[1:], axis - 1)
    x, mean = _rand(shape, 17), _rand(shape, 18)
    var = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    got = structured_log_prob(x, mean, var, cov)
    ref_full = full_log_prob(x.reshape(3, -1), mean.reshape(3, -1), var[:, None, None] * full)
    assert torch.allclose(got, ref_full, rtol=1e-11)
    for b in range(3):
        ref = stats.multivariate_normal(mean[b].reshape(-1).numpy(), (var[b] * full).numpy()).logpdf(
            x[b].reshape(-1).numpy()
        )
        assert got[b].item() == pytest.approx(ref, rel=1e-10)
    # scalar variance
    got_s = structured_log_prob(x, mean, 0.5, cov)
    assert got_s[0].item() == pytest.approx(got[0].item(), rel=1e-13)


def test_structured_log_prob_identity_default_is_sum_of_elementwise():
    x, mean = _rand((4, 3, 2), 19), _rand((4, 3, 2), 20)
    got = structured_log_prob(x, mean, 0.7)
    ref = normal_log_prob(x, mean, torch.tensor(0.7, dtype=F64)).reshape(4, -1).sum(1)
    assert torch.allclose(got, ref, rtol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# conjugate posterior (seed 002, eq. 14)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mu_x,var_x,mu_y,var_y,y",
    [(0.0, 1.0, 1.0, 1.0, 0.5), (1.5, 0.5, -0.7, 0.3, 2.0), (-2.0, 4.0, 0.95, 0.0975, -1.0), (0.3, 0.2, 2.0, 5.0, 3.0)],
)
def test_conjugate_posterior_matches_bayes_on_grid(mu_x, var_x, mu_y, var_y, y):
    # brute-force Bayes: prior * likelihood on a fine grid, normalised by the trapezoid rule (SciPy's: NumPy's
    # np.trapezoid needs NumPy >= 2.0, np.trapz is gone from NumPy 2.4)
    sx = math.sqrt(var_x)
    grid = np.linspace(mu_x - 14 * sx, mu_x + 14 * sx, 400_001)
    logp = stats.norm.logpdf(grid, mu_x, sx) + stats.norm.logpdf(y, mu_y * grid, math.sqrt(var_y))
    w = np.exp(logp - logp.max())
    z = integrate.trapezoid(w, grid)
    mean = integrate.trapezoid(w * grid, grid) / z
    var = integrate.trapezoid(w * (grid - mean) ** 2, grid) / z
    mu, v = conjugate_posterior(mu_x, var_x, mu_y, var_y, y)
    # trapezoid rule on a smooth, fully resolved integrand: error far below 1e-8
    assert float(mu) == pytest.approx(mean, rel=1e-8, abs=1e-9)
    assert float(v) == pytest.approx(var, rel=1e-8)


def test_conjugate_posterior_matches_regression():
    # the posterior mean is linear in y and the residual variance is the posterior variance:
    # simulate (x, y) from the joint and regress x on (1, y)
    mu_x, var_x, mu_y, var_y, n = 0.8, 1.3, -1.1, 0.4, 100_000
    g = torch.Generator().manual_seed(22)
    x = mu_x + math.sqrt(var_x) * torch.randn(n, generator=g, dtype=F64)
    y = mu_y * x + math.sqrt(var_y) * torch.randn(n, generator=g, dtype=F64)
    X = torch.stack([torch.ones(n, dtype=F64), y], 1)
    coef = torch.linalg.lstsq(X, x[:, None]).solution[:, 0]
    resid = x - X @ coef
    s2 = resid.square().sum().item() / (n - 2)
    se = (s2 * torch.linalg.inv(X.T @ X).diagonal()).sqrt()
    mu0, v = conjugate_posterior(mu_x, var_x, mu_y, var_y, 0.0)  # intercept = posterior mean at y = 0
    mu1, _ = conjugate_posterior(mu_x, var_x, mu_y, var_y, 1.0)
    slope = mu1 - mu0
    # 5 standard errors of the OLS coefficients over n = 100000 draws
    assert abs(coef[0].item() - mu0) < 5 * se[0].item()
    assert abs(coef[1].item() - slope) < 5 * se[1].item()
    # residual variance: its standard error is v * sqrt(2 / n) for Gaussian residuals; 5 of them
    assert abs(s2 - v) < 5 * v * math.sqrt(2 / n)


def test_conjugate_posterior_broadcasts_over_tensors():
    y = torch.tensor([-1.0, 0.0, 2.0], dtype=F64)
    var_y = torch.tensor([[0.5], [2.0]], dtype=F64)
    mu, v = conjugate_posterior(0.2, 1.0, 0.9, var_y, y)
    assert mu.shape == (2, 3) and v.shape == (2, 1)
    m11, v11 = conjugate_posterior(0.2, 1.0, 0.9, 2.0, 0.0)
    assert mu[1, 1].item() == pytest.approx(m11, rel=1e-14) and v[1, 0].item() == pytest.approx(v11, rel=1e-14)
