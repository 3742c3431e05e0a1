"""VP, sub-VP and VE SDEs (Song et al. 2021) with frame-correlated noise ``g(t) L dW``.

(a) the closed-form marginal against the moment ODEs integrated numerically; (b) Euler-Maruyama paths with a
correlated C against the marginal's mean and cross-frame covariance; (c) the discrete chains converge to the
SDE at O(1/N) (VP: DDPM's linear betas; VE: NCSN's geometric levels exactly); (d) prior KL and log-densities
against dense / scipy computations; (e) bad parameters refused. ERRATA item 6 is shown to fail (a).
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import full_kl
from diffusionlab.noise.covariance import Dense, Mixed, Progressive
from diffusionlab.processes import SubVPSDE, VESDE, VPSDE
from diffusionlab.schedules import geometric_sigmas, linear_betas

F64 = torch.float64
F, D = 4, 2


def _spd(f, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(f, f, generator=g, dtype=F64)
    return a @ a.T / f + 0.3 * torch.eye(f, dtype=F64)


# ---- f(t) and g(t)^2 written out independently (Song et al. 2021, appendix B) ------------------------------
def _vp_beta(t, bmin, bmax):
    return bmin + t * (bmax - bmin)


def _vp_B(t, bmin, bmax):
    return bmin * t + 0.5 * (bmax - bmin) * t * t


def _f_g2(kind, params):
    """(f, g^2, v0): drift coefficient, squared diffusion, and the variance at t = 0."""
    if kind == "vp":
        bmin, bmax = params
        return (lambda t: -0.5 * _vp_beta(t, bmin, bmax)), (lambda t: _vp_beta(t, bmin, bmax)), 0.0
    if kind == "subvp":
        bmin, bmax = params
        return (
            (lambda t: -0.5 * _vp_beta(t, bmin, bmax)),
            (lambda t: _vp_beta(t, bmin, bmax) * (1 - math.exp(-2 * _vp_B(t, bmin, bmax)))),
            0.0,
        )
    smin, smax = params
    # sigma(t) = smin (smax/smin)^t, g^2 = d sigma^2 / dt; score_sde's VE convention: Var at t = 0 is smin^2
    return (lambda t: 0.0), (lambda t: 2 * math.log(smax / smin) * (smin * (smax / smin) ** t) ** 2), smin**2


SDES = {
    "vp": (lambda cov=None: VPSDE(0.1, 20.0, cov), ("vp", (0.1, 20.0))),
    "vp-small": (lambda cov=None: VPSDE(0.5, 5.0, cov), ("vp", (0.5, 5.0))),
    "subvp": (lambda cov=None: SubVPSDE(0.1, 20.0, cov), ("subvp", (0.1, 20.0))),
    "ve": (lambda cov=None: VESDE(0.01, 50.0, cov), ("ve", (0.01, 50.0))),
    "ve-narrow": (lambda cov=None: VESDE(0.2, 3.0, cov), ("ve", (0.2, 3.0))),
}
TIMES = [0.0, 0.05, 0.25, 0.5, 0.75, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# (a) closed form vs the moment ODEs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
def test_drift_and_diffusion_coefficients(name):
    make, (kind, params) = SDES[name]
    sde = make()
    f, g2, _ = _f_g2(kind, params)
    t = torch.tensor(TIMES, dtype=F64)
    assert torch.allclose(sde.drift_coef(t), torch.tensor([f(u) for u in TIMES], dtype=F64), rtol=1e-13, atol=1e-15)
    assert torch.allclose(sde.diffusion_sq(t), torch.tensor([g2(u) for u in TIMES], dtype=F64), rtol=1e-12,
                          atol=1e-15)
    assert torch.allclose(sde.diffusion(t) ** 2, sde.diffusion_sq(t), rtol=1e-14, atol=1e-15)
    x = torch.randn(3, F, D, dtype=F64)
    tb = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    ref = torch.stack([f(u) * x[i] for i, u in enumerate(tb.tolist())])
    assert torch.allclose(sde.drift(x, tb), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_matches_moment_odes(name):
    make, (kind, params) = SDES[name]
    sde = make()
    f, g2, v0 = _f_g2(kind, params)

    def rhs(t, y):  # d mean/dt = f mean, d var/dt = 2 f var + g^2
        return [f(t) * y[0], 2 * f(t) * y[1] + g2(t)]

    sol = integrate.solve_ivp(rhs, (0.0, 1.0), [1.0, v0], method="DOP853", t_eval=TIMES, rtol=1e-12, atol=1e-14)
    assert sol.success
    s, sigma = sde.coeffs(torch.tensor(TIMES, dtype=F64))
    # DOP853 at rtol 1e-12: the ODE solution is good to ~1e-10 relative; allow 1e-8
    assert np.allclose(s.numpy(), sol.y[0], rtol=1e-8, atol=1e-12)
    assert np.allclose(sigma.numpy() ** 2, sol.y[1], rtol=1e-8, atol=1e-12)


def test_erratum_6_drift_without_x_fails_the_moment_ode():
    """ERRATA 6 (seed 003): with drift -beta/2 dt (no X) the mean obeys dm/dt = -beta/2, not -beta m / 2."""
    sde = VPSDE()
    sol = integrate.solve_ivp(lambda t, y: [-0.5 * _vp_beta(t, 0.1, 20.0)], (0, 1), [1.0], t_eval=[0.5, 1.0],
                              rtol=1e-12, atol=1e-14)
    s, _ = sde.coeffs(torch.tensor([0.5, 1.0], dtype=F64))
    assert (np.abs(s.numpy() - sol.y[0]) > 0.5).all()


def test_ve_convention_variance_from_sigma_min():
    # started exactly at x_0 (variance 0 at t = 0) the VE variance would be sigma(t)^2 - sigma_min^2: the library
    # follows score_sde and reports sigma(t) = sigma_min (sigma_max / sigma_min)^t, which is sigma_min at t = 0
    sde = VESDE(0.2, 3.0)
    s, sigma = sde.coeffs(torch.tensor([0.0, 1.0], dtype=F64))
    assert s.tolist() == [1.0, 1.0]
    assert sigma[0].item() == pytest.approx(0.2, rel=1e-15) and sigma[1].item() == pytest.approx(3.0, rel=1e-14)


def test_vp_subvp_start_at_the_data():
    for sde in (VPSDE(), SubVPSDE()):
        s, sigma = sde.coeffs(torch.tensor(0.0, dtype=F64))
        assert s.item() == 1.0 and sigma.item() == 0.0
    # sub-VP variance is below VP's at every t > 0 (Song et al. 2021)
    t = torch.linspace(0.01, 1, 50, dtype=F64)
    assert (SubVPSDE().coeffs(t)[1] < VPSDE().coeffs(t)[1]).all()


# ---------------------------------------------------------------------------------------------------------------
# (b) Euler-Maruyama with correlated noise
# ---------------------------------------------------------------------------------------------------------------
def _frobenius_tolerance(C, n, k=4.0):
    """Relative Frobenius tolerance for an empirical covariance of n Gaussian rows: E||S - C||_F^2 =
    (||C||_F^2 + tr(C)^2) / n (Wishart moments); k = 4 times that RMS error."""
    return k * math.sqrt((C.square().sum() + C.trace() ** 2).item() / n) / torch.linalg.matrix_norm(C).item()


def _em_moments(f, g2, K, t_stop):
    """Exact mean factor and variance of the Euler-Maruyama recursion x <- (1 + f dt) x + g sqrt(dt) L z run from 0
    to t_stop with K steps per unit time (left-point coefficients): the scheme's own moments."""
    dt = 1.0 / K
    m, v = 1.0, 0.0  # EM is started at the data (no sigma_min^2 for VE)
    for k in range(round(t_stop * K)):
        t = k * dt
        m, v = (1 + f(t) * dt) * m, (1 + f(t) * dt) ** 2 * v + g2(t) * dt
    return m, v


@pytest.mark.parametrize("name", ["vp", "subvp", "ve-narrow"])
def test_euler_maruyama_reproduces_marginal_with_correlated_noise(name):
    make, (kind, params) = SDES[name]
    cov = Progressive(1.5, F, 1)
    C = cov.matrix()
    sde = make(cov)
    f, g2, v0 = _f_g2(kind, params)
    n, K = 4_000, 200  # 8000 frame vectors; dt = 0.005
    dt = 1.0 / K
    g = torch.Generator().manual_seed(7)
    x0 = torch.linspace(-1.0, 2.0, F * D, dtype=F64).reshape(1, F, D)
    x = x0.expand(n, F, D).clone()
    checks = {round(0.5 * K): 0.5, K: 1.0}
    # vectorised: the SDE's coefficients on the whole left-point grid, and all K noise draws L z at once
    t_grid = torch.arange(K, dtype=F64) * dt
    drift_factor = (1 + sde.drift_coef(t_grid) * dt).tolist()  # x + f(t) x dt
    noise_scale = (sde.diffusion(t_grid) * math.sqrt(dt)).tolist()  # g(t) sqrt(dt)
    noise = sde.cov.sample((K * n, F, D), generator=g, dtype=F64).reshape(K, n, F, D)
    for k in range(K):
        x.mul_(drift_factor[k]).add_(noise[k], alpha=noise_scale[k])
        if k + 1 in checks:
            t_chk = checks[k + 1]
            s, sigma = (c.item() for c in sde.coeffs(t_chk))
            var = sigma**2 - v0  # started at x_0: no sigma_min^2 for VE
            m_em, v_em = _em_moments(f, g2, K, t_chk)
            # mean: 5 standard errors over n paths + the scheme's own bias |m_EM - s| |x_0|
            se = math.sqrt(v_em) * C.diagonal().sqrt()[:, None] / math.sqrt(n)
            tol = 5 * se + abs(m_em - s) * x0[0].abs() + 1e-12
            assert ((x.mean(0) - s * x0[0]).abs() < tol).all(), (name, t_chk)
            # cross-frame covariance (sample mean removed): Frobenius MC bound + relative discretisation error
            r = (x - x.mean(0)).movedim(1, -1).reshape(-1, F)
            S = r.T @ r / (r.shape[0] - 1)
            target = var * C
            err = (torch.linalg.matrix_norm(S - target) / torch.linalg.matrix_norm(target)).item()
            disc = abs(v_em - var) / var
            assert disc < 0.05  # the scheme at K = 200 is close to the SDE (so the test keeps its power)
            tol_c = _frobenius_tolerance(target, r.shape[0]) + disc
            assert err < tol_c, (name, t_chk, err, tol_c)
            # power: i.i.d. noise (z in place of L z) would give var * I, far outside the tolerance
            wrong = (torch.linalg.matrix_norm(var * torch.eye(F, dtype=F64) - target)
                     / torch.linalg.matrix_norm(target)).item()
            assert wrong > 4 * tol_c


# ---------------------------------------------------------------------------------------------------------------
# (c) discrete chains -> SDE
# ---------------------------------------------------------------------------------------------------------------
def test_vp_discretize_1000_is_ddpm_linear_betas():
    chain, times = VPSDE().discretize(1000)
    # bit for bit: 0.1 / 1000 and 20 / 1000 round to the very doubles 1e-4 and 0.02, so both are the same linspace
    assert torch.equal(chain.beta[1:], linear_betas(1000))
    assert torch.equal(times, torch.arange(1001, dtype=F64) / 1000)


@pytest.mark.parametrize("cls,const_s,const_sigma", [(VPSDE, 1.0, 1.35), (SubVPSDE, 0.71, 2.7)])
def test_chain_marginals_converge_at_rate_one_over_n(cls, const_s, const_sigma):
    sde = cls()
    errs = {}
    for n in (250, 1000):
        chain, times = sde.discretize(n)
        assert chain.T == n and times.shape == (n + 1,)
        s, sigma = sde.coeffs(times)
        errs[n] = ((chain.mean_scale - s).abs().max().item(), (chain.sigma - sigma).abs().max().item())
    for k in range(2):
        # O(1/N): quadrupling N divides the worst error over the steps by ~4 (first-order Euler/Riemann sums)
        ratio = errs[250][k] / errs[1000][k]
        assert 3.5 < ratio < 4.5, (cls.__name__, k, ratio)
    # and the constants are the expected size (error * N ~ const; measured 0.99 / 1.32 VP, 0.71 / 2.64 sub-VP)
    assert errs[1000][0] * 1000 < 1.2 * const_s and errs[1000][1] * 1000 < 1.2 * const_sigma


@pytest.mark.parametrize("n", [2, 10, 100])
def test_ve_discretize_matches_at_every_level(n):
    sde = VESDE(0.01, 50.0)
    chain, times = sde.discretize(n)
    assert torch.allclose(chain.sigma[1:], geometric_sigmas(n, 0.01, 50.0), rtol=1e-14)
    s, sigma = sde.coeffs(times)  # times[0] = -inf: sigma = 0, the clean data
    assert times[0].item() == -math.inf and sigma[0].item() == 0.0
    assert torch.equal(s, chain.mean_scale)
    assert torch.allclose(sigma, chain.sigma, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# (d) prior KL and log-densities against dense computations
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("cov_name", ["mixed", "dense"])
def test_prior_kl_and_log_probs_against_dense(name, cov_name):
    cov = Mixed(0.7, F, 1) if cov_name == "mixed" else Dense(_spd(F, 3), 1)
    sde = SDES[name][0](cov)
    full = torch.kron(cov.matrix(), torch.eye(D, dtype=F64))
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(3, F, D, generator=g, dtype=F64)
    x = 2.0 * torch.randn(3, F, D, generator=g, dtype=F64)
    s1, sig1 = (c.item() for c in sde.coeffs(1.0))
    kl = sde.prior_kl(x0)
    lp_prior = sde.prior_log_prob(x)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)  # per-sample times
    lp = sde.marginal_log_prob(x, x0, t)
    s_t, sig_t = sde.coeffs(t)
    for b in range(3):
        ref = full_kl(s1 * x0[b].reshape(-1), sig1**2 * full, torch.zeros(F * D, dtype=F64), sde.prior_std**2 * full)
        assert kl[b].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-11)
        ref = stats.multivariate_normal(np.zeros(F * D), sde.prior_std**2 * full.numpy()).logpdf(x[b].reshape(-1))
        assert lp_prior[b].item() == pytest.approx(ref, rel=1e-11)
        ref = stats.multivariate_normal((s_t[b] * x0[b]).reshape(-1).numpy(), sig_t[b].item() ** 2 * full.numpy())
        assert lp[b].item() == pytest.approx(ref.logpdf(x[b].reshape(-1)), rel=1e-10)


def test_prior_kl_is_small_for_vp_and_not_for_a_short_vp():
    # VP(0.1, 20) ends at s(1) = exp(-5.05): the prior term is tiny; VP(0.1, 1) does not reach the prior
    x0 = torch.ones(2, F, D, dtype=F64)
    assert (VPSDE(0.1, 20.0).prior_kl(x0) < 1e-3).all()
    assert (VPSDE(0.1, 1.0).prior_kl(x0) > 0.5).all()


def test_prior_sample_covariance():
    cov = Mixed(0.7, F, 1)
    sde = VESDE(0.01, 5.0, cov)
    x = sde.prior_sample((20_000, F, D), generator=torch.Generator().manual_seed(9), dtype=F64)
    r = x.movedim(1, -1).reshape(-1, F)
    S = r.T @ r / r.shape[0]
    target = 25.0 * cov.matrix()
    err = (torch.linalg.matrix_norm(S - target) / torch.linalg.matrix_norm(target)).item()
    assert err < _frobenius_tolerance(target, r.shape[0])


def test_sample_marginal_per_sample_time_rank5():
    cov = Progressive(1.0, 3, axis=2)
    sde = VPSDE(cov=cov)
    x0 = torch.randn(4, 2, 3, 2, 2, dtype=F64)
    z = torch.randn(4, 2, 3, 2, 2, dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=F64)
    xt, eps = sde.sample_marginal(x0, t, noise=z)
    s, sigma = sde.coeffs(t)
    for i in range(4):
        assert torch.allclose(xt[i], s[i] * x0[i] + sigma[i] * z[i], atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# (e) bad parameters
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,pattern",
    [
        (lambda: VPSDE(beta_min=-0.1), r"beta_min must be a positive finite number, got -0\.1"),
        (lambda: VPSDE(beta_min=0.0), r"beta_min must be a positive finite number, got 0\.0"),
        (lambda: VPSDE(0.1, float("nan")), r"beta_max must be a positive finite number, got nan"),
        (lambda: VPSDE(1.0, 0.5), r"beta_max = 0\.5 must be >= beta_min = 1\.0"),
        (lambda: SubVPSDE(beta_min=-2), r"beta_min.*got -2"),
        (lambda: VESDE(1.0, 1.0), r"sigma_max = 1\.0 must exceed sigma_min = 1\.0"),
        (lambda: VESDE(1.0, 0.5), r"sigma_max = 0\.5 must exceed sigma_min = 1\.0"),
        (lambda: VESDE(0.0, 1.0), r"sigma_min must be a positive finite number, got 0\.0"),
        (lambda: VESDE(0.01, "big"), r"sigma_max must be a positive number, got 'big'"),
        (lambda: VESDE().discretize(1), r"N >= 2 levels, got 1"),
    ],
)
def test_bad_parameters_refused(build, pattern):
    with pytest.raises(DiffusionLabError, match=pattern):
        build()
