"""Objectives against independent computations: L_simple by hand, the sum of squares (MSE) for C = I, the
thesis's ELBO weight equals the KL, the Monte Carlo VLB of the exact oracle equals its closed form and lies below
log p, the discretized decoder normalises, NCSN by hand and in its C form, the hybrid's stop-gradient."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import full_kl
from diffusionlab.noise import Identity, Progressive
from diffusionlab.objectives import (
    HybridLoss,
    NCSNLoss,
    SimpleLoss,
    VLBLoss,
    discretized_gaussian_log_prob,
    full_vlb,
    make_objective,
    vlb_terms,
)
from diffusionlab.oracles import GaussianOracle
from diffusionlab.parametrization import DiffusionModel
from diffusionlab.processes import VEChain, VPChain, VPSDE
from diffusionlab.schedules import geometric_sigmas, linear_betas
from nets import ChannelNet as _ChannelNet
from rounding import sum_rtol

F64 = torch.float64




def ChannelNet(channels, out_mult=1, dtype=F64, seed=0):
    """The shared tiny net (tests/nets.py) with a small c_noise bias."""
    return _ChannelNet(channels, out_mult, dtype, seed, bias_scale=0.1)


def _vp(T=50, cov=None):
    return VPChain(linear_betas(T, 1e-3, 0.3), cov=cov)


def _inputs(shape, dtype=F64, seed=0, T=50):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.randint(1, T + 1, (shape[0],), generator=g)
    return x0, eps, t


# -- L_simple ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_simple_by_hand(prediction):
    """Ho et al.'s x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, target eps / x0 / v = sqrt(abar) eps - sqrt(1-abar) x0,
    loss = mean over entries of (target - net(x_t, 1000 t / T))^2 (c_in = 1 on VP)."""
    chain = _vp()
    net = ChannelNet(3)
    model = DiffusionModel(net, chain, prediction=prediction)
    x0, eps, t = _inputs((6, 3, 4, 4))
    ab = chain.alpha_bar[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    out = net(x_t, 1000.0 * t.to(F64) / 50)
    expected = ((target - out) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(SimpleLoss(chain)(model, x0, t=t, noise=eps), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 2), (4, 3, 4, 4), (3, 2, 4, 3, 3)])
def test_identity_mahalanobis_is_the_sum_of_squares_and_equals_mse(dtype, shape):
    """For C = I the loss is the sum of squares over D, bit for bit (the very same operations: the same network
    evaluation, the identity's ``mahalanobis`` is ``square().sum(1)``), and so is the ``mse`` weighting (the same
    code once more). Against torch's ``mse_loss(...).mean(1)``, a mean -- another reduction, whose order and
    final ``* (1 / D)`` depend on the CPU's vector width -- it agrees to rounding: :func:`rounding.sum_rtol`."""
    chain = _vp()
    net = ChannelNet(shape[1], dtype=dtype)
    model = DiffusionModel(net, chain)
    x0, eps, t = _inputs(shape, dtype)
    maha = SimpleLoss(chain)(model, x0, t=t, noise=eps)
    mse_opt = SimpleLoss(chain, weighting="mse")(model, x0, t=t, noise=eps)
    s, sigma = chain.at("mean_scale", t, x0), chain.at("sigma", t, x0)
    with torch.no_grad():
        out = model(s * x0 + sigma * eps, t)  # the model's own evaluation (input scaling included)
    D = x0[0].numel()
    assert torch.equal(maha, (eps - out).reshape(shape[0], -1).square().sum(1) / D)
    assert torch.equal(mse_opt, maha)
    plain = nn.functional.mse_loss(out, eps, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(maha, plain, rtol=sum_rtol(D, dtype), atol=0)


def test_simple_with_correlated_C_is_dense_mahalanobis_and_mse_ignores_C():
    cov = Progressive(1.0, 4, axis=2)
    chain = _vp(cov=cov)
    model = DiffusionModel(ChannelNet(3), chain)
    x0, eps, t = _inputs((5, 3, 4, 2))
    loss = SimpleLoss(chain)(model, x0, t=t, noise=eps)
    d = (eps - model(chain.at("mean_scale", t, x0) * x0 + chain.at("sigma", t, x0) * eps, t))
    Cinv = torch.linalg.inv(cov.matrix())
    dense = torch.einsum("bcfw,fg,bcgw->b", d, Cinv, d) / d[0].numel()
    torch.testing.assert_close(loss, dense, rtol=1e-11, atol=0)
    mse = SimpleLoss(chain, weighting="mse")(model, x0, t=t, noise=eps)
    torch.testing.assert_close(mse, d.square().flatten(1).mean(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights(prediction):
    """Hang et al. 2023: min(SNR, 5)/SNR (eps), min(SNR, 5) (x0), min(SNR, 5)/(SNR + 1) (v), SNR = abar/(1-abar)."""
    chain = _vp()
    model = DiffusionModel(ChannelNet(2), chain, prediction=prediction)
    x0, eps, t = _inputs((50, 2))
    base = SimpleLoss(chain)(model, x0, t=t, noise=eps)
    snr = chain.alpha_bar[t] / (1 - chain.alpha_bar[t])
    w = {"eps": snr.clamp(max=5) / snr, "x0": snr.clamp(max=5), "v": snr.clamp(max=5) / (snr + 1)}[prediction]
    got = make_objective({"name": "simple", "weighting": "min_snr", "gamma": 5}, chain)(model, x0, t=t, noise=eps)
    torch.testing.assert_close(got, w * base, rtol=1e-12, atol=0)
    assert (snr > 5).any() and (snr < 5).any()  # both branches exercised


@pytest.mark.parametrize("cov", [Identity(), Progressive(1.0, 4, axis=1)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_seed003_elbo_weight_equals_kl(cov, prediction):
    """Thesis eq. 3: beta_t / (2 alpha_t (1 - abar_{t-1})) (eps - eps_theta)^T C^{-1} (eps - eps_theta) is exactly
    KL(q(x_{t-1}|x_t,x_0) || N(mu_theta, beta-tilde_t C)) for t >= 2; the elbo weighting reproduces it for every
    parametrization."""
    chain = _vp(cov=cov)
    model = DiffusionModel(ChannelNet(4), chain, prediction=prediction)
    x0, eps, _ = _inputs((8, 4, 2))
    t = torch.tensor([2, 3, 5, 10, 20, 30, 49, 50])
    kl = vlb_terms(model, x0, t, noise=eps, variance="beta_tilde")
    weighted = SimpleLoss(chain, weighting="elbo")(model, x0, t=t, noise=eps)
    torch.testing.assert_close(weighted, kl, rtol=1e-10, atol=0)
    # the thesis's formula by hand, with eps_theta decoded from the model
    s, sigma = chain.at("mean_scale", t, x0), chain.at("sigma", t, x0)
    eps_theta = model.eps(s * x0 + sigma * eps, t)
    beta, alpha, ab_prev = chain.beta[t], chain.alpha[t], chain.alpha_bar[t - 1]
    thesis = beta / (2 * alpha * (1 - ab_prev)) * cov.mahalanobis(eps - eps_theta)
    torch.testing.assert_close(kl, thesis, rtol=1e-10, atol=0)
    # against a dense computation: equal covariances, so KL = ||mu - mu_theta||^2_{C^-1} / (2 beta-tilde)
    mu_diff = chain.at("post_B", t, x0, lo=1) * (model.x0(s * x0 + sigma * eps, t) - x0)
    K = torch.kron(cov.matrix(4), torch.eye(2, dtype=F64))
    d = mu_diff.flatten(1)
    dense = torch.einsum("bi,ij,bj->b", d, torch.linalg.inv(K), d) / (2 * chain.beta_tilde[t])
    torch.testing.assert_close(kl, dense, rtol=1e-9, atol=0)


def test_elbo_weight_at_t1_is_the_gaussian_decoder():
    """At t = 1 (beta-tilde_1 = 0) the elbo weighting is the Gaussian decoder's theta-dependent part:
    L_0 = w_1 ||d - d_theta||^2_{C^-1} + (D log(2 pi v_1) + log det(C (x) I)) / 2 with v_1 = beta-tilde_2."""
    cov = Progressive(1.0, 4, axis=1)
    chain = _vp(cov=cov)
    model = DiffusionModel(ChannelNet(4), chain)
    x0, eps, _ = _inputs((5, 4, 2), seed=3)
    t = torch.ones(5, dtype=torch.long)
    weighted = SimpleLoss(chain, weighting="elbo")(model, x0, t=t, noise=eps)
    dec = vlb_terms(model, x0, t, noise=eps, variance="beta_tilde")
    v1 = chain.beta_tilde[2]
    const = 0.5 * (8 * math.log(2 * math.pi * v1) + 2 * cov.logdet())
    torch.testing.assert_close(dec, weighted + const, rtol=1e-10, atol=1e-10)


# -- the variational bound -----------------------------------------------------------------------------------
def _oracle(cov, shape):
    chain = VPSDE(cov=cov).discretize(100)[0]  # linear betas 0.001 .. 0.2, T = 100
    return GaussianOracle.random(shape, chain, generator=torch.Generator().manual_seed(0))


CASES = [(Identity(), (2,)), (Progressive(1.0, 4, axis=1), (4, 2))]


@pytest.mark.parametrize("cov,shape", CASES)
@pytest.mark.parametrize("variance", ["beta", "fixed_large", "beta_tilde"])
def test_monte_carlo_vlb_of_oracle_matches_closed_form(cov, shape, variance):
    """full_vlb (one x_t draw per term) averaged over R = 300 repeats of 4 data points agrees with the closed-form
    ELBO within 5 standard errors of the mean (se = sample std / sqrt(R))."""
    oracle = _oracle(cov, shape)
    g = torch.Generator().manual_seed(1)
    x0 = oracle.sample_data(4, g)
    R = 300
    total = full_vlb(oracle, x0.repeat(R, *[1] * len(shape)), variance=variance, generator=g).reshape(R, 4)
    mc, se = -total.mean(0), total.std(0) / math.sqrt(R)
    closed = oracle.elbo_closed_form(x0, variance=variance)
    assert ((mc - closed).abs() < 5 * se).all(), ((mc - closed) / se)
    # the comparison has power: se < 0.5 nat, while beta and beta_tilde bounds differ by several nats
    assert (se < 0.5).all()
    other = oracle.elbo_closed_form(x0, variance="beta" if variance == "beta_tilde" else "beta_tilde")
    assert ((other - closed).abs() > 2.0).all()


def test_fixed_large_differs_from_beta_only_in_the_decoder():
    """improved-diffusion's FIXED_LARGE is beta_t at t >= 2 and beta-tilde_2 at t = 1: every term L_{t-1}, t >= 2,
    is the same as with "beta" (the very same variance values), the decoder L_0 is not, and it is exactly the
    Gaussian NLL with variance beta-tilde_2."""
    from diffusionlab.gaussian import LOG_2PI

    oracle = _oracle(*CASES[0])
    x0 = oracle.sample_data(5, torch.Generator().manual_seed(2))
    _, tb, _ = oracle.elbo_closed_form(x0, variance="beta", return_terms=True)
    _, tl, _ = oracle.elbo_closed_form(x0, variance="fixed_large", return_terms=True)
    assert torch.equal(tb[:, 1:], tl[:, 1:])
    assert (tb[:, 0] - tl[:, 0]).abs().min() > 1e-3
    chain = oracle.process
    v1 = float(chain.post_var[2])
    dec = oracle.elbo_closed_form(x0, variance="fixed_large", return_terms=True)[1][:, 0]
    # L_0 = E[-log N(x0; E[x0 | x1], v C)] = (E|e|^2 / v + D log(2 pi v)) / 2 (C = I here): E|e|^2 from the beta run
    d, b1 = x0.shape[1], float(chain.b[1] ** 2)
    e2 = (2 * tb[:, 0] - d * (LOG_2PI + math.log(b1))) * b1
    expected = 0.5 * (e2 / v1 + d * (LOG_2PI + math.log(v1)))
    torch.testing.assert_close(dec, expected, rtol=1e-9, atol=1e-9)


def _model_log_likelihood(oracle, x0):
    """Exact log p_theta(x0) of the oracle-mean reverse chain with variance beta (linear-Gaussian recursion:
    x_T ~ N(0, K); x_{t-1} = A_t x + B_t E[x0|x] + N(0, beta_t K); x_0 = E[x0|x_1] + N(0, beta_1 K))."""
    chain, S, K, m = oracle.process, oracle.Sigma, oracle.K, oracle.mean_flat
    D = oracle.dim
    mu, V = torch.zeros(D, dtype=F64), K.clone()
    for t in range(chain.T, 0, -1):
        s, sig = chain.mean_scale[t], chain.sigma[t]
        Gx = s * S @ torch.linalg.inv(s**2 * S + sig**2 * K)  # E[x0|x] = m + Gx (x - s m)
        A, B = chain.post_A[t], chain.post_B[t]
        P = A * torch.eye(D, dtype=F64) + B * Gx
        mu = P @ mu + B * (m - s * Gx @ m)
        V = P @ V @ P.T + chain.beta[t] * K
    return MultivariateNormal(mu, V).log_prob(x0.reshape(x0.shape[0], -1))


@pytest.mark.parametrize("cov,shape", CASES)
def test_elbo_is_below_log_likelihood(cov, shape):
    """ELBO <= log p_theta(x0) pointwise (exact likelihood of the oracle-mean chain), and on average over data
    E[ELBO] <= E log p_data(x0) (the exact Gaussian density): 20000 draws, mean gap plus 5 standard errors < 0."""
    oracle = _oracle(cov, shape)
    g = torch.Generator().manual_seed(2)
    x0 = oracle.sample_data(20000, g)
    elbo = oracle.elbo_closed_form(x0, variance="beta")
    gap = elbo - oracle.data_log_prob(x0)
    assert gap.mean() + 5 * gap.std() / math.sqrt(x0.shape[0]) < 0
    far = torch.cat([x0[:200], 3.0 * x0[:200]])  # typical and atypical points
    assert (oracle.elbo_closed_form(far, variance="beta") <= _model_log_likelihood(oracle, far)).all()


def test_vlb_estimator_is_unbiased():
    """VLBLoss = T L_{t-1} + L_T with t ~ U{1..T}: its mean over n = 40000 draws (one x0, repeated) equals the
    closed-form bound within 5 standard errors."""
    oracle = _oracle(Progressive(1.0, 4, axis=1), (4, 2))
    g = torch.Generator().manual_seed(3)
    x0 = oracle.sample_data(1, g)
    n = 40000
    est = VLBLoss(oracle.process, variance="beta")(oracle, x0.repeat(n, 1, 1), generator=g)
    closed = -oracle.elbo_closed_form(x0, variance="beta")
    assert (est.mean() - closed).abs() < 5 * est.std() / math.sqrt(n)


def test_gaussian_decoder_by_hand():
    """L_0 = -log N(x0; x_theta(x_1, 1), beta_1 K) with a dense MultivariateNormal."""
    oracle = _oracle(Progressive(1.0, 4, axis=1), (4, 2))
    chain = oracle.process
    g = torch.Generator().manual_seed(4)
    x0, eps = oracle.sample_data(5, g), chain.cov.sample((5, 4, 2), generator=g, dtype=F64)
    got = vlb_terms(oracle, x0, 1, noise=eps, variance="beta")
    x1 = chain.mean_scale[1] * x0 + chain.sigma[1] * eps
    mean = oracle.x0(x1, 1).reshape(5, -1)
    nll = -MultivariateNormal(mean, chain.beta[1] * oracle.K).log_prob(x0.reshape(5, -1))
    torch.testing.assert_close(got, nll, rtol=1e-10, atol=1e-10)


# -- the discretized decoder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 0.2), (-0.95, 1e-3), (1.7, 0.5), (0.0, 5.0), (0.5, 1e-4),
                                      (-0.6, 0.001)])
def test_discretized_decoder_sums_to_one(mean, std):
    x = torch.linspace(-1, 1, 256, dtype=F64)  # the 256 bin centres (2k/255 - 1)
    logp = discretized_gaussian_log_prob(x, torch.tensor(mean, dtype=F64), torch.tensor(std, dtype=F64))
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # an interior bin against the plain cdf difference
    from scipy.stats import norm

    i = 100
    direct = norm.cdf((x[i].item() + 1 / 255 - mean) / std) - norm.cdf((x[i].item() - 1 / 255 - mean) / std)
    if direct > 1e-250:
        assert logp[i].item() == pytest.approx(math.log(direct), rel=1e-9)
    else:  # beyond double precision of the plain difference: compare with scipy's log-cdf
        lo, hi = (x[i].item() - 1 / 255 - mean) / std, (x[i].item() + 1 / 255 - mean) / std
        if lo + hi > 0:  # right of the mean: mass = sf(lo) - sf(hi)
            expected = norm.logsf(lo) + math.log(-math.expm1(norm.logsf(hi) - norm.logsf(lo)))
        else:
            expected = norm.logcdf(hi) + math.log(-math.expm1(norm.logcdf(lo) - norm.logcdf(hi)))
        assert logp[i].item() == pytest.approx(expected, rel=1e-9)


def test_discretized_decoder_needs_identity():
    oracle = _oracle(Progressive(1.0, 4, axis=1), (4, 2))
    x0 = torch.zeros(2, 4, 2, dtype=F64)
    with pytest.raises(DiffusionLabError, match="discretized decoder"):
        vlb_terms(oracle, x0, 1, decoder="discretized")
    oracle2 = _oracle(Identity(), (2,))
    x = torch.tensor([[-1.0, 1.0], [0.2, -0.2]], dtype=F64)
    assert torch.isfinite(vlb_terms(oracle2, x, 1, decoder="discretized")).all()


# -- learned variance and the hybrid loss --------------------------------------------------------------------
class LearnedVarianceNet(nn.Module):
    """Mean half and variance half with separate parameters (so gradients can be told apart)."""

    def __init__(self, channels):
        super().__init__()
        self.mean = ChannelNet(channels, seed=1)
        self.var = ChannelNet(channels, seed=2)

    def forward(self, x, c):
        return torch.cat([self.mean(x, c), torch.tanh(self.var(x, c))], 1)


def test_learned_variance_kl_matches_dense_and_endpoints():
    """With Sigma_theta = L diag(v) L^T the KL equals a dense full_kl; v_var = -1 gives the beta-tilde KL."""
    cov = Progressive(1.0, 4, axis=1)
    chain = _vp(cov=cov)
    model = DiffusionModel(LearnedVarianceNet(4), chain, learn_variance=True)
    x0, eps, _ = _inputs((3, 4, 2), seed=5)
    t = torch.tensor([2, 17, 50])
    got = vlb_terms(model, x0, t, noise=eps)  # variance None -> learned
    s, sigma = chain.at("mean_scale", t, x0), chain.at("sigma", t, x0)
    p = model.predict(s * x0 + sigma * eps, t)
    lo, up = chain.beta_tilde[t].reshape(-1, 1, 1), chain.beta[t].reshape(-1, 1, 1)
    frac = (p.v_var + 1) / 2
    var = torch.exp(frac * up.log() + (1 - frac) * lo.log()).reshape(3, -1)
    Lk = torch.kron(cov._L, torch.eye(2, dtype=F64))  # the Cholesky factor of C (x) I
    K = Lk @ Lk.T
    B = chain.post_B[t][:, None]
    mu_q = B * (p.x0 - x0).reshape(3, -1)
    for i in range(3):
        dense = full_kl(torch.zeros(8, dtype=F64), chain.beta_tilde[t[i]] * K, mu_q[i], Lk @ torch.diag(var[i]) @ Lk.T)
        assert got[i].item() == pytest.approx(dense.item(), rel=1e-9)


def test_hybrid_value_and_stop_gradient():
    chain = _vp(cov=Progressive(1.0, 4, axis=1))
    net = LearnedVarianceNet(4)
    model = DiffusionModel(net, chain, learn_variance=True)
    x0, eps, t = _inputs((6, 4, 2), seed=6)
    hybrid = HybridLoss(chain)(model, x0, t=t, noise=eps)
    simple = SimpleLoss(chain)(model, x0, t=t, noise=eps)
    vlb = vlb_terms(model, x0, t, noise=eps, variance="learned")
    torch.testing.assert_close(hybrid, simple + 0.001 * 50 * vlb / 8, rtol=1e-12, atol=0)
    # the mean parameters get gradient from L_simple only; the variance parameters from L_vlb only
    g_h = torch.autograd.grad(HybridLoss(chain)(model, x0, t=t, noise=eps).sum(), list(net.mean.parameters()))
    g_s = torch.autograd.grad(SimpleLoss(chain)(model, x0, t=t, noise=eps).sum(), list(net.mean.parameters()))
    for a, b in zip(g_h, g_s):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    g_v = torch.autograd.grad(HybridLoss(chain)(model, x0, t=t, noise=eps).sum(), list(net.var.parameters()))
    assert all(v.abs().sum() > 0 for v in g_v)
    with pytest.raises(DiffusionLabError, match="learn_variance=True"):
        HybridLoss(chain)(DiffusionModel(ChannelNet(4), chain), x0)


# -- NCSN ----------------------------------------------------------------------------------------------------
def test_ncsn_by_hand_identity():
    """Seed 004: sigma_t^2 ||s_theta(x_t) + eps / sigma_t||^2 / D with x_t = x0 + sigma_t eps, score net
    s_theta = net / sigma (NCSN's parametrization)."""
    chain = VEChain(geometric_sigmas(10, 0.01, 10.0))
    net = ChannelNet(3)
    model = DiffusionModel(net, chain, prediction="score")
    x0, eps, _ = _inputs((7, 3, 2), seed=7)
    t = torch.tensor([1, 2, 3, 5, 7, 9, 10])
    sig = chain.sigma[t].reshape(-1, 1, 1)
    x_t = x0 + sig * eps
    s_theta = net(x_t / (1 + sig**2).sqrt(), 1000.0 * t.to(F64) / 10) / sig
    expected = (sig**2 * (s_theta + eps / sig) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(NCSNLoss(chain)(model, x0, t=t, noise=eps), expected, rtol=1e-11, atol=0)


def test_ncsn_c_form():
    """||sigma C s_theta + eps||^2_{C^-1} = sigma^2 (s_theta - grad log q)^T C (s_theta - grad log q),
    grad log q = -C^{-1} eps / sigma, checked with dense matrices."""
    cov = Progressive(1.0, 4, axis=1)
    chain = VEChain(geometric_sigmas(10, 0.01, 10.0), cov=cov)
    model = DiffusionModel(ChannelNet(4), chain, prediction="eps")
    x0, eps, _ = _inputs((5, 4, 2), seed=8)
    t = torch.tensor([1, 3, 5, 8, 10])
    got = NCSNLoss(chain)(model, x0, t=t, noise=eps)
    sig = chain.sigma[t].reshape(-1, 1)
    K = torch.kron(cov.matrix(), torch.eye(2, dtype=F64))
    x_t = x0 + sig.reshape(-1, 1, 1) * eps
    s_theta = model.score(x_t, t).reshape(5, -1)
    grad_q = -torch.linalg.solve(K, eps.reshape(5, -1).T).T / sig
    d = s_theta - grad_q
    expected = sig[:, 0] ** 2 * torch.einsum("bi,ij,bj->b", d, K, d) / 8
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


# -- configuration -------------------------------------------------------------------------------------------
def test_make_objective_and_errors():
    chain = _vp()
    assert isinstance(make_objective({"name": "simple"}, chain), SimpleLoss)
    assert isinstance(make_objective("vlb", chain), VLBLoss)
    assert make_objective({"name": "hybrid", "lambda": 0.01}, chain).lam == 0.01
    assert isinstance(make_objective({"name": "ncsn"}, VEChain(geometric_sigmas(5))), NCSNLoss)
    with pytest.raises(DiffusionLabError, match="unknown objective 'l2'.*simple, vlb, hybrid, ncsn"):
        make_objective({"name": "l2"}, chain)
    with pytest.raises(DiffusionLabError, match="unknown option.*'gama'"):
        make_objective({"name": "simple", "gama": 5}, chain)
    with pytest.raises(DiffusionLabError, match="unknown weighting 'snr'"):
        make_objective({"name": "simple", "weighting": "snr"}, chain)
    with pytest.raises(DiffusionLabError, match="unknown decoder"):
        make_objective({"name": "vlb", "decoder": "laplace"}, chain)
    with pytest.raises(DiffusionLabError, match="discrete chain"):
        make_objective({"name": "vlb"}, VPSDE())
    with pytest.raises(DiffusionLabError, match="learn_variance=True"):
        vlb_terms(DiffusionModel(ChannelNet(2), chain), torch.zeros(2, 2, dtype=F64), 3, variance="learned")


def test_simple_on_sde_and_random_draws_are_seeded():
    """On an SDE t ~ U(t_min, 1); the same generator seed gives the same loss."""
    sde = VPSDE()
    model = DiffusionModel(ChannelNet(2), sde)
    x0 = torch.randn(16, 2, dtype=F64)
    a = SimpleLoss(sde)(model, x0, generator=torch.Generator().manual_seed(0))
    b = SimpleLoss(sde)(model, x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (16,) and torch.isfinite(a).all()


def test_full_vlb_builds_no_graph():
    """The whole bound is an evaluation: no autograd graph even with a network that requires gradients."""
    from diffusionlab.parametrization import DiffusionModel
    from nets import ChannelNet

    model = DiffusionModel(ChannelNet(2, dtype=torch.float64), VPChain(torch.linspace(1e-3, 0.2, 20, dtype=torch.float64)))
    out = full_vlb(model, torch.zeros(3, 2, dtype=torch.float64))
    assert not out.requires_grad


def test_clipping_x0_in_the_bound_is_the_clipped_samplers_model():
    """With clip_x0 the bound uses clamp(x_theta, -1, 1) in every reverse mean: for data inside [-1, 1] a prediction
    clipped towards the data can only shrink each Gaussian KL's mean difference, so every term is <= the unclipped
    one; and without any prediction outside [-1, 1] the two are the very same numbers."""
    from diffusionlab.objectives import vlb_terms

    oracle = _oracle(*CASES[0])
    x0 = oracle.sample_data(256, torch.Generator().manual_seed(3)).clamp(-1, 1)
    t = torch.randint(1, oracle.process.T + 1, (256,), generator=torch.Generator().manual_seed(4))
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain = vlb_terms(oracle, x0, t, noise=noise)
    clipped = vlb_terms(oracle, x0, t, noise=noise, clip_x0=True)
    assert (clipped <= plain + 1e-12).all() and (clipped < plain - 1e-6).any()
    small = oracle.sample_data(64, torch.Generator().manual_seed(6)) * 1e-3  # predictions stay inside [-1, 1]
    t1 = torch.full((64,), 3)
    n1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1e-3
    assert torch.equal(vlb_terms(oracle, small, t1, noise=n1), vlb_terms(oracle, small, t1, noise=n1, clip_x0=True))
