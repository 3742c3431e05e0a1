"""Discrete VP / VE chains with frame-correlated noise: marginals and posteriors against brute force.

- ``q(x_t | x_0)``: the closed form against many chains simulated step by step with ``transition``
  (mean and full cross-frame covariance), identity and correlated C, user (non-monotone) schedules too;
- ``q(x_{t-1} | x_t, x_0)``: the coefficients against seed 000's formulas written out here, and against a
  least-squares regression of simulated ``x_{t-1}`` on ``(x_t, x_0)`` (coefficients and residual covariance);
- seed 004's epsilon reparametrisation of mu-tilde; ERRATA items 1, 2, 3 and 5 shown to fail these checks.

Notation: alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s (seed 000 writes alpha_t for the product).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import full_kl
from diffusionlab.noise.covariance import Dense, Identity, Mixed, Progressive, toeplitz
from diffusionlab.processes import GaussianChain, VEChain, VPChain
from diffusionlab.schedules import cosine_betas, geometric_sigmas

F64 = torch.float64
F, D = 4, 2  # frames, and independent copies of each frame vector per sample
N = 10_000  # simulated chains per configuration: N * D = 20000 frame vectors

# non-monotone user schedules (T = 12 and T = 10)
USER_BETAS = [0.05, 0.3, 0.01, 0.2, 0.1, 0.4, 0.02, 0.15, 0.25, 0.08, 0.5, 0.12]
USER_G = [0.3, 1.0, 0.2, 0.7, 1.5, 0.4, 2.0, 0.1, 0.9, 1.2]


def _spd(f, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(f, f, generator=g, dtype=F64)
    return a @ a.T / f + 0.3 * torch.eye(f, dtype=F64)


COVS = {
    "identity": lambda: Identity(1),
    "mixed": lambda: Mixed(0.8, F, 1),
    "progressive": lambda: Progressive(1.5, F, 1),
    "toeplitz": lambda: toeplitz([1.0, 0.5, 0.25], F, 1),
    "dense": lambda: Dense(_spd(F, 5), 1),
}
CHAINS = {
    "vp-user": lambda cov: VPChain(USER_BETAS, cov),
    "vp-cosine": lambda cov: VPChain(cosine_betas(10), cov),
    "ve-user-g": lambda cov: VEChain.from_g(USER_G, cov),
    "ve-geometric": lambda cov: VEChain(geometric_sigmas(10, 0.1, 5.0), cov),
}


def _cmat(cov):
    return torch.eye(F, dtype=F64) if cov.is_identity else cov.matrix()


def _frame_rows(x):
    """(n, F, D) -> (n * D, F): one row per frame vector."""
    return x.movedim(1, -1).reshape(-1, F)


def _frobenius_tolerance(C, n, k=4.0):
    """Relative Frobenius tolerance for an empirical covariance of n Gaussian rows about a known mean:
    E||S - C||_F^2 = (||C||_F^2 + tr(C)^2) / n (Wishart moments); k = 4 times that RMS error."""
    return k * math.sqrt((C.square().sum() + C.trace() ** 2).item() / n) / torch.linalg.matrix_norm(C).item()


def _rel_frob(S, C):
    return (torch.linalg.matrix_norm(S - C) / torch.linalg.matrix_norm(C)).item()


def _vp_reference(betas):
    """Independent float64 bookkeeping: lists alpha, abar indexed by t = 0..T (abar_0 = 1)."""
    alpha, abar = [1.0], [1.0]
    for b in betas:
        alpha.append(1.0 - b)
        abar.append(abar[-1] * (1.0 - b))
    return alpha, abar


def _x0_fixed():
    return torch.linspace(-1.5, 2.0, F * D, dtype=F64).reshape(1, F, D).expand(N, F, D)


# ---------------------------------------------------------------------------------------------------------------
# closed-form marginal coefficients
# ---------------------------------------------------------------------------------------------------------------
def test_vp_closed_form_coefficients():
    chain = VPChain(USER_BETAS)
    alpha, abar = _vp_reference(USER_BETAS)
    T = len(USER_BETAS)
    t = torch.arange(T + 1)
    s, sigma = chain.coeffs(t)
    assert s.dtype == F64 and sigma.dtype == F64
    assert torch.allclose(s, torch.tensor([math.sqrt(a) for a in abar], dtype=F64), rtol=1e-14)
    assert torch.allclose(sigma, torch.tensor([math.sqrt(1 - a) for a in abar], dtype=F64), rtol=1e-13, atol=0)
    assert torch.allclose(chain.alpha_bar, torch.tensor(abar, dtype=F64), rtol=1e-14)
    assert torch.allclose(chain.alpha, torch.tensor(alpha, dtype=F64), rtol=1e-15)
    assert chain.prior_std == 1.0


def test_ve_closed_form_coefficients():
    chain = VEChain.from_g(USER_G)
    sig2 = np.concatenate([[0.0], np.cumsum(np.square(USER_G))])
    s, sigma = chain.coeffs(torch.arange(len(USER_G) + 1))
    assert torch.equal(s, torch.ones_like(s))
    assert np.allclose(sigma.numpy(), np.sqrt(sig2), rtol=1e-14)
    assert np.allclose(chain.g2[1:].numpy(), np.square(USER_G), rtol=1e-12)
    assert chain.prior_std == pytest.approx(math.sqrt(sig2[-1]), rel=1e-14)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=1e-4, max_value=0.9), min_size=1, max_size=12))
def test_property_vp_closed_form_equals_generic_recursion(betas):
    vp = VPChain(betas)
    b = torch.tensor(betas, dtype=F64)
    generic = GaussianChain(torch.sqrt(1 - b), torch.sqrt(b))  # sigma_t^2 = a_t^2 sigma_{t-1}^2 + b_t^2
    assert torch.allclose(vp.mean_scale, generic.mean_scale, rtol=1e-12)
    assert torch.allclose(vp.sigma, generic.sigma, rtol=1e-10, atol=1e-12)
    assert torch.allclose(vp.post_A, generic.post_A, rtol=1e-9, atol=1e-12)
    assert torch.allclose(vp.post_B, generic.post_B, rtol=1e-9, atol=1e-12)
    assert torch.allclose(vp.post_var, generic.post_var, rtol=1e-9, atol=1e-12)
    # variance preserved: s_t^2 + sigma_t^2 = 1
    assert torch.allclose(vp.mean_scale**2 + vp.sigma**2, torch.ones_like(vp.sigma), atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(
    a=st.lists(st.floats(min_value=0.2, max_value=1.5), min_size=1, max_size=10),
    seed=st.integers(0, 1000),
)
def test_property_posterior_marginalises_to_the_marginal(a, seed):
    # integrating q(x_{t-1} | x_t, x_0) against q(x_t | x_0) must give q(x_{t-1} | x_0):
    # A_t s_t + B_t = s_{t-1} and A_t^2 sigma_t^2 + C_t^2 = sigma_{t-1}^2
    b = torch.rand(len(a), generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.05
    ch = GaussianChain(a, b)
    A, B, V = ch.post_A[1:], ch.post_B[1:], ch.post_var[1:]
    s, sig = ch.mean_scale, ch.sigma
    assert torch.allclose(A * s[1:] + B, s[:-1], rtol=1e-10, atol=1e-12)
    assert torch.allclose(A**2 * sig[1:] ** 2 + V, sig[:-1] ** 2, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# q(x_t | x_0) against step-by-step simulation
# ---------------------------------------------------------------------------------------------------------------
# the user (non-monotone) schedules with every C; the library schedules with the identity and one correlated C
_MARGINAL_CASES = [(ch, c) for ch in CHAINS for c in COVS if "user" in ch or c in ("identity", "progressive")]


@pytest.mark.parametrize("chain_name,cov_name", _MARGINAL_CASES)
def test_marginal_matches_simulated_chain(chain_name, cov_name):
    cov = COVS[cov_name]()
    chain = CHAINS[chain_name](cov)
    C = _cmat(cov)
    g = torch.Generator().manual_seed(100)
    x0 = _x0_fixed()
    x = x0
    n_rows = N * D
    for t in range(1, chain.T + 1):
        x = chain.forward_step(x, t, generator=g)
        mean, std = chain.marginal(x0, t)
        std = float(std.reshape(-1)[0])
        # mean of each entry: 5 standard errors sigma_t sqrt(C_ff) / sqrt(N) over N chains (the run is seeded;
        # with ~100 entries per configuration a 5-SE miss by chance has probability ~6e-5)
        se = std * C.diagonal().sqrt()[:, None] / math.sqrt(N)
        assert ((x.mean(0) - mean[0]).abs() < 5 * se).all(), (t, (x.mean(0) - mean[0]).abs() / se)
        # cross-frame covariance about the known mean: sigma_t^2 C
        r = _frame_rows(x - mean)
        S = r.T @ r / n_rows
        target = std**2 * C
        assert _rel_frob(S, target) < _frobenius_tolerance(target, n_rows), (t, S, target)


def test_marginal_check_has_power_against_iid_noise():
    # with a correlated C, i.i.d. noise (z in place of L z) is far outside the tolerance used above
    for name in ("mixed", "progressive", "toeplitz", "dense"):
        C = _cmat(COVS[name]())
        assert _rel_frob(torch.eye(F, dtype=F64), C) > 5 * _frobenius_tolerance(C, N * D)


def test_erratum_1_forward_mean_sqrt_abar():
    """ERRATA 1 (seed 004): x_t = sqrt(1 - abar_t) x_0 + ... is wrong; the mean is sqrt(abar_t) x_0."""
    chain = VPChain(USER_BETAS, Mixed(0.8, F, 1))
    _, abar = _vp_reference(USER_BETAS)
    g = torch.Generator().manual_seed(101)
    x0 = _x0_fixed()
    x = x0
    for t in range(1, chain.T + 1):
        x = chain.forward_step(x, t, generator=g)
    T = chain.T
    se = math.sqrt(1 - abar[T]) / math.sqrt(N)  # C has unit diagonal
    emp = x.mean(0)
    assert ((emp - math.sqrt(abar[T]) * x0[0]).abs() < 5 * se).all()
    assert ((emp - chain.marginal(x0, T)[0][0]).abs() < 5 * se).all()  # the library's closed form
    wrong = math.sqrt(1 - abar[T]) * x0[0]
    assert (emp - wrong).abs().max() > 20 * se


def test_sample_marginal_matches_and_returns_its_noise():
    cov = Progressive(1.5, F, 1)
    chain = VPChain(USER_BETAS, cov)
    x0 = _x0_fixed()
    t = 7
    xt, eps = chain.sample_marginal(x0, t, generator=torch.Generator().manual_seed(102))
    mean, std = chain.marginal(x0, t)
    assert torch.allclose(xt, mean + std * eps, atol=1e-14)
    r = _frame_rows(eps)
    S = r.T @ r / r.shape[0]
    assert _rel_frob(S, cov.matrix()) < _frobenius_tolerance(cov.matrix(), r.shape[0])


def test_transition_with_given_noise_and_per_sample_steps():
    chain = VPChain(USER_BETAS, Mixed(0.5, 3, 2))
    x = torch.randn(4, 2, 3, 2, 2, dtype=F64)
    z = torch.randn(4, 2, 3, 2, 2, dtype=F64)
    t = torch.tensor([1, 5, 12, 3])
    out = chain.forward_step(x, t, noise=z)
    for i, ti in enumerate(t.tolist()):
        b = USER_BETAS[ti - 1]
        assert torch.allclose(out[i], math.sqrt(1 - b) * x[i] + math.sqrt(b) * z[i], atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# q(x_{t-1} | x_t, x_0): coefficients against seed 000 written out here
# ---------------------------------------------------------------------------------------------------------------
def test_vp_posterior_coefficients_equal_seed_000():
    chain = VPChain(USER_BETAS)
    alpha, abar = _vp_reference(USER_BETAS)
    T = len(USER_BETAS)
    A, B, V = chain.posterior_coefficients(torch.arange(1, T + 1))
    for t in range(1, T + 1):
        beta = USER_BETAS[t - 1]
        A_ref = math.sqrt(1 - beta) * (1 - abar[t - 1]) / (1 - abar[t])
        B_ref = math.sqrt(abar[t - 1]) * beta / (1 - abar[t])
        V_ref = (1 - abar[t - 1]) * beta / (1 - abar[t])
        assert A[t - 1].item() == pytest.approx(A_ref, rel=1e-12, abs=1e-15)
        assert B[t - 1].item() == pytest.approx(B_ref, rel=1e-12)
        assert V[t - 1].item() == pytest.approx(V_ref, rel=1e-12, abs=1e-15)
        assert chain.beta_tilde[t].item() == pytest.approx(V_ref, rel=1e-12, abs=1e-15)


def test_ve_posterior_coefficients_equal_seed_000():
    chain = VEChain.from_g(USER_G)
    sig2 = [0.0]
    for gg in USER_G:
        sig2.append(sig2[-1] + gg**2)
    T = len(USER_G)
    A, B, V = chain.posterior_coefficients(torch.arange(1, T + 1))
    for t in range(1, T + 1):
        A_ref = sig2[t - 1] / sig2[t]
        assert A[t - 1].item() == pytest.approx(A_ref, rel=1e-12, abs=1e-15)
        assert B[t - 1].item() == pytest.approx(1 - A_ref, rel=1e-12)
        assert V[t - 1].item() == pytest.approx(sig2[t - 1] * USER_G[t - 1] ** 2 / sig2[t], rel=1e-12, abs=1e-15)


def test_posterior_api_broadcasts_per_sample_steps():
    chain = VPChain(USER_BETAS, Mixed(0.5, 3, 2))
    xt = torch.randn(4, 2, 3, 2, 2, dtype=F64)
    x0 = torch.randn(4, 2, 3, 2, 2, dtype=F64)
    t = torch.tensor([1, 5, 12, 3])
    mean, var = chain.posterior(xt, x0, t)
    for i, ti in enumerate(t.tolist()):
        A, B, V = (c.item() for c in chain.posterior_coefficients(ti))
        assert torch.allclose(mean[i], A * xt[i] + B * x0[i], atol=1e-14)
        assert var.reshape(-1)[i].item() == pytest.approx(V, rel=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# q(x_{t-1} | x_t, x_0) against regression on simulated triples
# ---------------------------------------------------------------------------------------------------------------
def _posterior_regression(chain, t, seed):
    """Simulate x0 (random), x_{t-1} ~ q(. | x0), x_t ~ transition; regress each frame of x_{t-1} on *all* frames of
    (x_t, x0). Returns (coef (2F, F), its standard errors, residual covariance (F, F), number of rows)."""
    g = torch.Generator().manual_seed(seed)
    x0 = 1.3 * torch.randn(N, F, D, generator=g, dtype=F64)
    x_prev, _ = chain.sample_marginal(x0, t - 1, generator=g)
    x_t = chain.forward_step(x_prev, t, generator=g)
    X = torch.cat([_frame_rows(x_t), _frame_rows(x0)], 1)  # (N D, 2F)
    Y = _frame_rows(x_prev)  # (N D, F)
    coef = torch.linalg.lstsq(X, Y).solution
    R = Y - X @ coef
    n = X.shape[0]
    S = R.T @ R / (n - 2 * F)
    se = (torch.linalg.inv(X.T @ X).diagonal()[:, None] * S.diagonal()[None, :]).clamp(min=0).sqrt()
    return coef, se, S, n


@pytest.mark.parametrize("cov_name", list(COVS))
@pytest.mark.parametrize("chain_name", ["vp-user", "ve-user-g"])
def test_posterior_matches_regression(chain_name, cov_name):
    cov = COVS[cov_name]()
    chain = CHAINS[chain_name](cov)
    C = _cmat(cov)
    eye = torch.eye(F, dtype=F64)
    for k, t in enumerate((1, chain.T // 2 + 1, chain.T)):
        coef, se, S, n = _posterior_regression(chain, t, seed=200 + k)
        A, B, V = (c.item() for c in chain.posterior_coefficients(t))
        expected = torch.cat([A * eye, B * eye], 0)  # no cross-frame terms in the posterior mean
        # 5 standard errors of each OLS coefficient (+1e-9 for t = 1, where x_{t-1} = x_0 exactly and se = 0)
        assert ((coef - expected).abs() <= 5 * se + 1e-9).all(), (t, (coef - expected) / se)
        if V == 0.0:
            assert t == 1 and S.abs().max() < 1e-20
            continue
        target = V * C  # residual covariance C_t^2 C, across frames
        assert _rel_frob(S, target) < _frobenius_tolerance(target, n - 2 * F), (t, S, target)


def test_posterior_regression_refutes_errata_2_3_5():
    """The regression of x_{t-1} on (x_t, x_0) rejects the seeds' wrong mu-tilde coefficients:
    ERRATA 2 (seed 004): x_t coefficient sqrt(abar_t)(1 - abar_{t-1})/(1 - abar_t);
    ERRATA 5 (seed 003): x_t coefficient sqrt(abar_t (1 - abar_{t-1}))/(1 - abar_t);
    ERRATA 3 (seed 002 eq. 16): x_0 coefficient sqrt(alpha_{t-1}) beta_t/(1 - abar_t) (should be sqrt(abar_{t-1}))."""
    chain = VPChain(USER_BETAS, Mixed(0.8, F, 1))
    alpha, abar = _vp_reference(USER_BETAS)
    t = chain.T
    beta = USER_BETAS[t - 1]
    coef, se, _, _ = _posterior_regression(chain, t, seed=300)
    A_hat, B_hat = coef[:F].diagonal(), coef[F:].diagonal()
    A_se, B_se = se[:F].diagonal(), se[F:].diagonal()
    A_right = math.sqrt(alpha[t]) * (1 - abar[t - 1]) / (1 - abar[t])
    B_right = math.sqrt(abar[t - 1]) * beta / (1 - abar[t])
    assert ((A_hat - A_right).abs() < 5 * A_se).all() and ((B_hat - B_right).abs() < 5 * B_se).all()
    A_err2 = math.sqrt(abar[t]) * (1 - abar[t - 1]) / (1 - abar[t])
    A_err5 = math.sqrt(abar[t] * (1 - abar[t - 1])) / (1 - abar[t])
    B_err3 = math.sqrt(alpha[t - 1]) * beta / (1 - abar[t])
    # each wrong formula is more than 20 standard errors from every fitted coefficient
    assert ((A_hat - A_err2).abs() > 20 * A_se).all()
    assert ((A_hat - A_err5).abs() > 20 * A_se).all()
    assert ((B_hat - B_err3).abs() > 20 * B_se).all()


# ---------------------------------------------------------------------------------------------------------------
# seed 004's epsilon reparametrisation of mu-tilde (erratum-corrected)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("betas", [USER_BETAS, cosine_betas(30).tolist()])
def test_mu_tilde_epsilon_reparametrisation(betas):
    cov = Mixed(0.6, 3, 2)
    chain = VPChain(betas, cov)
    alpha, abar = _vp_reference(betas)
    T = len(betas)
    g = torch.Generator().manual_seed(400)
    B = 3 * T
    t = torch.arange(B) % T + 1  # every step, three times
    x0 = torch.randn(B, 2, 3, 2, 2, generator=g, dtype=F64)
    eps = cov.sample(x0.shape, generator=g, dtype=F64)
    x_t, eps_back = chain.sample_marginal(x0, t, noise=eps)
    assert eps_back is eps
    mean, _ = chain.posterior(x_t, x0, t)
    a = torch.tensor([alpha[i] for i in t.tolist()], dtype=F64).reshape(B, 1, 1, 1, 1)
    ab = torch.tensor([abar[i] for i in t.tolist()], dtype=F64).reshape(B, 1, 1, 1, 1)
    # mu-tilde = (1 / sqrt(alpha_t)) (x_t - beta_t / sqrt(1 - abar_t) eps)  (beta_t = 1 - alpha_t)
    ref = (x_t - (1 - a) / torch.sqrt(1 - ab) * eps) / torch.sqrt(a)
    assert torch.allclose(mean, ref, rtol=1e-10, atol=1e-10)
    # with 1/sqrt(abar_t) in place of 1/sqrt(alpha_t) it is far off at every t >= 2
    wrong = (x_t - (1 - a) / torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    diff = (mean - wrong).reshape(B, -1).abs().amax(1)
    assert (diff[t >= 2] > 1e-3).all()


# ---------------------------------------------------------------------------------------------------------------
# log-densities and the prior term of the chains
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chain_name", ["vp-user", "ve-user-g"])
def test_chain_log_probs_and_prior_kl_against_dense(chain_name):
    cov = Dense(_spd(F, 6), 1)
    chain = CHAINS[chain_name](cov)
    full = torch.kron(cov.matrix(), torch.eye(D, dtype=F64))
    g = torch.Generator().manual_seed(500)
    x0 = torch.randn(3, F, D, generator=g, dtype=F64)
    x = torch.randn(3, F, D, generator=g, dtype=F64)
    t = 5
    s, sig = (c.item() for c in chain.coeffs(t))
    lp = chain.marginal_log_prob(x, x0, t)
    lp_prior = chain.prior_log_prob(x)
    kl = chain.prior_kl(x0)
    sT = chain.mean_scale[-1].item()
    sigT = chain.sigma[-1].item()
    for b in range(3):
        ref = stats.multivariate_normal(s * x0[b].reshape(-1).numpy(), sig**2 * full.numpy()).logpdf(x[b].reshape(-1))
        assert lp[b].item() == pytest.approx(ref, rel=1e-10)
        ref = stats.multivariate_normal(np.zeros(F * D), chain.prior_std**2 * full.numpy()).logpdf(x[b].reshape(-1))
        assert lp_prior[b].item() == pytest.approx(ref, rel=1e-10)
        ref = full_kl(sT * x0[b].reshape(-1), sigT**2 * full, torch.zeros(F * D, dtype=F64),
                      chain.prior_std**2 * full)
        assert kl[b].item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_chain_input_errors():
    chain = VPChain(USER_BETAS)
    x = torch.zeros(2, F, D, dtype=F64)
    with pytest.raises(DiffusionLabError, match=r"out of range 1\.\.12: got 0\.\.0"):
        chain.posterior(x, x, 0)
    with pytest.raises(DiffusionLabError, match=r"out of range 0\.\.12: got 13\.\.13"):
        chain.marginal(x, 13)
    with pytest.raises(DiffusionLabError, match=r"integers.*float"):
        chain.marginal(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(DiffusionLabError, match=r"beta_2 \(index 1\) = 1\.2"):
        VPChain([0.1, 1.2])
    with pytest.raises(DiffusionLabError, match="g\\(t\\) must be finite and positive"):
        VEChain.from_g([0.5, 0.0])
    with pytest.raises(DiffusionLabError, match=r"sigma_2 = 0\.5 is not above sigma_1 = 1"):
        VEChain([1.0, 0.5])
    with pytest.raises(DiffusionLabError, match="equal lengths"):
        GaussianChain([0.9, 0.9], [0.1])
    with pytest.raises(DiffusionLabError, match="has 3 entries"):
        VPChain(USER_BETAS, Mixed(0.5, F, 1)).forward_step(torch.zeros(2, 3, D), 1)
