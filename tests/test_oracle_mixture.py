"""GaussianMixtureOracle: exact E[eps | x_t], E[x_0 | x_t], score for Gaussian mixtures, checked against
independent computations -- autograd of a torch.distributions mixture density (K = kron(C, I) built by hand),
GaussianOracle for one component, a NumPy/SciPy closed form on the VP chain, self-normalised Monte Carlo --
plus its draws, densities, component assignment and the JSON spec's validation."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Mixed, Progressive, make_covariance
from diffusionlab.oracles import GaussianOracle
from diffusionlab.oracles.mixture import GaussianMixtureOracle, load_spec, make_process
from diffusionlab.processes import SubVPSDE, VEChain, VESDE, VPChain, VPSDE
from diffusionlab.schedules import geometric_sigmas, linear_betas

F64 = torch.float64


def _random_mixture(k, d, g, spread=1.5, min_eig=0.05):
    w = 0.5 + torch.rand(k, generator=g, dtype=F64)
    m = spread * torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    s = a @ a.transpose(1, 2) / d * 0.3 + min_eig * torch.eye(d, dtype=F64)
    return w, m, s


def _cases():
    """(process, frames, D, K_noise): identity on 2-D points; C over frames (F, d) = (3, 2), K = kron(C, I_2)."""
    prog, mixed = Progressive(1.0, 3, axis=1), Mixed(0.7, 3, axis=1)
    kron = lambda c: torch.kron(c.matrix(3), torch.eye(2, dtype=F64))  # noqa: E731
    return [
        pytest.param(VPChain(linear_betas(100, 1e-3, 0.2)), None, 2, torch.eye(2, dtype=F64), id="vp-chain-iid"),
        pytest.param(VPChain(linear_betas(100, 1e-3, 0.2), cov=prog), 3, 6, kron(prog), id="vp-chain-progressive"),
        pytest.param(VEChain(geometric_sigmas(30, 0.01, 20.0), cov=mixed), 3, 6, kron(mixed), id="ve-chain-mixed"),
        pytest.param(VPSDE(), None, 2, torch.eye(2, dtype=F64), id="vp-sde-iid"),
        pytest.param(VPSDE(cov=prog), 3, 6, kron(prog), id="vp-sde-progressive"),
        pytest.param(SubVPSDE(cov=mixed), 3, 6, kron(mixed), id="subvp-sde-mixed"),
        pytest.param(VESDE(0.01, 20.0, cov=prog), 3, 6, kron(prog), id="ve-sde-progressive"),
    ]


def _times(process, b, g):
    if hasattr(process, "post_A"):
        return torch.randint(1, process.T + 1, (b,), generator=g)
    return 0.02 + 0.98 * torch.rand(b, generator=g, dtype=F64)


@pytest.mark.parametrize("process,frames,d,K", _cases())
def test_equals_autograd_of_mixture_marginal(process, frames, d, K):
    """score = grad log sum_k w_k N(x; s m_k, s^2 S_k + sigma^2 K) by autograd (torch.distributions, K built by
    kron); eps = -sigma K score (Tweedie); x0 from x = s x0 + sigma eps; c_score = K score; log p_t; mixed times."""
    g = torch.Generator().manual_seed(1)
    w, m, S = _random_mixture(3, d, g)
    oracle = GaussianMixtureOracle(w, m, S, process, frames=frames)
    shape = oracle.sample_shape
    b = 7
    t = _times(process, b, g)
    x = (2.5 * torch.randn(b, *shape, generator=g, dtype=F64)).requires_grad_(True)
    s, sigma = process.coeffs(t)
    logp = torch.stack([
        MixtureSameFamily(Categorical(probs=w / w.sum()),
                          MultivariateNormal(s[i] * m, s[i] ** 2 * S + sigma[i] ** 2 * K)).log_prob(x[i].reshape(-1))
        for i in range(b)
    ])
    (grad,) = torch.autograd.grad(logp.sum(), x)
    x = x.detach()
    grad = grad.reshape(b, -1)
    torch.testing.assert_close(oracle.score(x, t).reshape(b, -1), grad, rtol=1e-9, atol=1e-10)
    p = oracle.predict(x, t)
    torch.testing.assert_close(p.eps.reshape(b, -1), -sigma[:, None] * (grad @ K), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(p.x0.reshape(b, -1), (x.reshape(b, -1) - sigma[:, None] * p.eps.reshape(b, -1)) / s[:, None],
                               rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(oracle.c_score(x, t).reshape(b, -1), grad @ K, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(oracle.marginal_log_prob(x, t), logp.detach(), rtol=1e-11, atol=1e-10)
    # the same time for the whole batch (a 0-d t, the samplers' call) gives the same numbers row by row
    one = oracle.predict(x, t[0] if t.dtype.is_floating_point else int(t[0]))
    torch.testing.assert_close(one.eps[0], p.eps[0], rtol=1e-12, atol=1e-13)
    # explicit coefficients (what peers' schedulers use) agree too
    eps_at, x0_at = oracle.posterior_at(x[:1], float(s[0]), float(sigma[0]))
    torch.testing.assert_close(eps_at[0], p.eps[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x0_at[0], p.x0[0], rtol=1e-12, atol=1e-13)
    assert oracle.nfe == 5  # score, predict, c_score, predict, posterior_at: one evaluation each (densities: none)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_forward_encodes_the_prediction(prediction):
    """forward returns the raw output of the parametrization: decoding it gives back eps and x0."""
    from diffusionlab.parametrization import get_parametrization

    g = torch.Generator().manual_seed(2)
    w, m, S = _random_mixture(2, 2, g)
    oracle = GaussianMixtureOracle(w, m, S, VPSDE(), prediction=prediction)
    x = torch.randn(5, 2, generator=g, dtype=F64)
    t = torch.full((5,), 0.4, dtype=F64)
    out = oracle(x, t)
    _, s, sigma = oracle.coeffs(t, x)
    eps, x0 = get_parametrization(prediction).decode(out, x, s, sigma)
    p = oracle.predict(x, t)
    torch.testing.assert_close(eps, p.eps, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x0, p.x0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("process", [VPChain(linear_betas(50, 1e-3, 0.3), cov=Progressive(0.8, 3)),
                                     VPSDE(cov=Progressive(0.8, 3)), VESDE(0.02, 10.0, cov=Progressive(0.8, 3))],
                         ids=["vp-chain", "vp-sde", "ve-sde"])
def test_one_component_equals_gaussian_oracle(process):
    g = torch.Generator().manual_seed(3)
    ref = GaussianOracle.random((3, 2), process, generator=g)
    oracle = GaussianMixtureOracle([2.0], ref.mean_flat[None], ref.Sigma[None], process, frames=3)
    x = 2 * torch.randn(6, 3, 2, generator=g, dtype=F64)
    t = _times(process, 6, g)
    p, q = oracle.predict(x, t), ref.predict(x, t)
    torch.testing.assert_close(p.eps, q.eps, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(p.x0, q.x0, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(oracle.score(x, t), ref.score(x, t), rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(oracle.marginal_log_prob(x, t), ref.marginal_log_prob(x, t), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(oracle.log_prob(x), ref.data_log_prob(x), rtol=1e-12, atol=1e-11)


def test_vp_chain_integer_steps_equal_numpy_closed_form():
    """At integer steps of DDPM's chain (T = 1000, linear 1e-4 .. 0.02): alpha-bar by NumPy's cumprod, the
    responsibilities by SciPy's logpdf, E[x_0 | x_t] = sum_k gamma_k (m_k + sqrt(abar) S_k M_k^{-1} (x - sqrt(abar) m_k))
    by np.linalg.solve, E[eps | x_t] = (x - sqrt(abar) E[x_0 | x_t]) / sqrt(1 - abar)."""
    g = torch.Generator().manual_seed(4)
    w, m, S = _random_mixture(4, 3, g)
    oracle = GaussianMixtureOracle(w, m, S, make_process("vp"))
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    wn, mn, Sn = (w / w.sum()).numpy(), m.numpy(), S.numpy()
    for t in (1, 10, 250, 500, 999, 1000):
        a = abar[t - 1]
        x = np.sqrt(a) * mn[1] + np.sqrt(1 - a) * np.random.default_rng(t).standard_normal((5, 3))
        logc = np.stack([np.log(wn[k]) + multivariate_normal(np.sqrt(a) * mn[k], a * Sn[k] + (1 - a) * np.eye(3)).logpdf(x)
                         for k in range(4)], 1)
        gam = np.exp(logc - logc.max(1, keepdims=True))
        gam /= gam.sum(1, keepdims=True)
        x0 = sum(gam[:, k:k + 1] * (mn[k] + np.sqrt(a) * np.linalg.solve(a * Sn[k] + (1 - a) * np.eye(3),
                                                                          (x - np.sqrt(a) * mn[k]).T).T @ Sn[k])
                 for k in range(4))
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        p = oracle.predict(torch.as_tensor(x), t)
        np.testing.assert_allclose(p.x0.numpy(), x0, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(p.eps.numpy(), eps, rtol=1e-7, atol=1e-8)


def test_posterior_mean_by_monte_carlo():
    """E[x_0 | x_t] by self-normalised importance sampling from the data (weights N(x_t; s x_0, sigma^2 K)), with a
    correlated C. Tolerance: 5 standard errors of the weighted mean, sqrt(var_w(x_0) / ESS)."""
    g = torch.Generator().manual_seed(5)
    proc = VPSDE(cov=Mixed(1.0, 2, axis=1))
    w, m, S = _random_mixture(3, 2, g, spread=1.0, min_eig=0.2)
    oracle = GaussianMixtureOracle(w, m, S, proc)
    t = 0.3
    s, sigma = (float(v) for v in proc.coeffs(torch.tensor(t, dtype=F64)))
    x_t = oracle.sample_marginal(1, t, g)
    x0 = oracle.sample_data(400_000, g)
    K = oracle.K
    r = (x_t - s * x0) / sigma
    logw = -0.5 * (r * torch.linalg.solve(K, r.T).T).sum(1)
    wt = torch.softmax(logw, 0)
    est = (wt[:, None] * x0).sum(0)
    ess = 1.0 / (wt**2).sum()
    se = ((wt[:, None] * (x0 - est) ** 2).sum(0) / ess).sqrt()
    assert ess > 1000
    exact = oracle.x0(x_t, t)[0]
    assert ((est - exact).abs() < 5 * se).all(), (est, exact, se)


def test_draws_moments_components_and_densities():
    """sample_data: mean and covariance within 5 standard errors of mean()/covariance() (n = 200k), component
    frequencies within 5 binomial standard errors; log_prob equals SciPy's mixture density; sample_at adds
    sigma L z with covariance sigma^2 K."""
    g = torch.Generator().manual_seed(6)
    w, m, S = _random_mixture(3, 2, g)
    oracle = GaussianMixtureOracle(w, m, S, VPSDE())
    n = 200_000
    x, comp = oracle.sample_data(n, g, return_components=True)
    mu, cov = oracle.mean(), oracle.covariance()
    se_mu = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mu).abs() < 5 * se_mu).all()
    xc = x - mu
    emp = xc.T @ xc / n
    se_cov = ((xc[:, :, None] * xc[:, None, :]).var(0) / n).sqrt()
    assert ((emp - cov).abs() < 5 * se_cov).all()
    freq = torch.bincount(comp, minlength=3).to(F64) / n
    wn = w / w.sum()
    assert ((freq - wn).abs() < 5 * (wn * (1 - wn) / n).sqrt()).all()
    pts = x[:20]
    dens = sum(wn[k].item() * multivariate_normal(m[k].numpy(), S[k].numpy()).pdf(pts.numpy()) for k in range(3))
    np.testing.assert_allclose(oracle.log_prob(pts).numpy(), np.log(dens), rtol=1e-10)
    # noisy draws with a correlated C: sigma^2 K on top of the data covariance
    proc = VESDE(cov=Progressive(1.5, 2, axis=1))
    o2 = GaussianMixtureOracle([1.0], [[0.0, 0.0]], [[[1e-2, 0], [0, 1e-2]]], proc)
    y = o2.sample_at(n, 1.0, 2.0, g)
    expect = 1e-2 * torch.eye(2, dtype=F64) + 4.0 * o2.K
    # each entry of the empirical second moment has standard error <= var * sqrt(2 / n) (Gaussian); 5 of them
    np.testing.assert_allclose((y.T @ y / n).numpy(), expect.numpy(), rtol=0, atol=5 * 4.02 * math.sqrt(2 / n))


def test_component_of_is_the_bayes_classifier():
    """component_of = argmax_k w_k N(x; m_k, S_k), computed independently with SciPy; on well separated
    components it recovers the drawn component of (almost) every draw. Under p_t it is the same argmax with the
    noisy components N(s m_k, s^2 S_k + sigma^2 I).

    The argmax of two different computations is compared exactly: that is sound because every draw's best
    component beats the runner-up by far more than the rounding of the log-densities (checked: a margin of at
    least 1e-6 nats, against |log w_k N| < 2e3, i.e. rounding ~1e-12)."""
    g = torch.Generator().manual_seed(7)
    w, m, S = _random_mixture(4, 2, g, spread=6.0, min_eig=0.05)
    oracle = GaussianMixtureOracle(w, m, S, VPSDE())
    x, comp = oracle.sample_data(2000, g, return_components=True)
    wn = (w / w.sum()).numpy()

    def scipy_log_components(s, sig):
        logc = np.stack([np.log(wn[k]) + multivariate_normal(s * m[k].numpy(), s * s * S[k].numpy()
                                                             + sig * sig * np.eye(2)).logpdf(x.numpy())
                         for k in range(4)], 1)
        top2 = np.sort(logc, 1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-6 and np.abs(logc).max() < 2e3  # no near-tie (docstring)
        return logc

    np.testing.assert_array_equal(oracle.component_of(x).numpy(), scipy_log_components(1.0, 0.0).argmax(1))
    assert (oracle.component_of(x) == comp).double().mean() > 0.97
    # under p_t the classifier uses the noisy covariances
    t = torch.full((2000,), 0.5, dtype=F64)
    s, sig = (float(v) for v in VPSDE().coeffs(torch.tensor(0.5, dtype=F64)))
    want = scipy_log_components(s, sig).argmax(1)
    np.testing.assert_array_equal(oracle.component_of(x, t).numpy(), want)
    np.testing.assert_array_equal(oracle.component_at(x, s, sig).numpy(), want)


def test_edm_denoiser_is_the_scaled_posterior_mean():
    """D(y; sig) at y = x / s, sig = sigma / s equals E[x_0 | x_t] (the scaled variable of Karras et al.)."""
    g = torch.Generator().manual_seed(8)
    w, m, S = _random_mixture(3, 2, g)
    proc = VPSDE()
    oracle = GaussianMixtureOracle(w, m, S, proc)
    x = torch.randn(5, 2, generator=g, dtype=F64)
    for t in (0.01, 0.3, 0.9):
        s, sig = (float(v) for v in proc.coeffs(torch.tensor(t, dtype=F64)))
        torch.testing.assert_close(oracle.edm_denoiser(x / s, sig / s), oracle.x0(x, t), rtol=1e-10, atol=1e-11)
    mixed = oracle.edm_denoiser(x, torch.tensor([0.1, 0.1, 1.0, 1.0, 5.0], dtype=F64))
    torch.testing.assert_close(mixed[2], oracle.edm_denoiser(x[2:3], 1.0)[0], rtol=1e-12, atol=1e-13)


def test_spec_round_trip_frames_and_noise(tmp_path):
    """from_spec: weights normalised, frames make (F, d) samples with C over the frames (K = kron(C, I_d));
    to_spec / load_spec round-trip."""
    spec = {"weights": [1, 3], "means": [[0, 0, 0, 0], [1, 1, 1, 1]], "covs": [np.eye(4).tolist()] * 2, "frames": 2}
    oracle = GaussianMixtureOracle.from_spec(spec, "vp-sde", "progressive:1.0")
    assert oracle.sample_shape == (2, 2)
    torch.testing.assert_close(oracle.weights, torch.tensor([0.25, 0.75], dtype=F64))
    c = make_covariance("progressive:1.0", 2).matrix()
    torch.testing.assert_close(oracle.K, torch.kron(c, torch.eye(2, dtype=F64)))
    p = tmp_path / "spec.json"
    import json

    p.write_text(json.dumps(oracle.to_spec()))
    again = GaussianMixtureOracle.from_spec(load_spec(p), "ve")
    torch.testing.assert_close(again.means, oracle.means)
    assert isinstance(again.process, VEChain) and again.process.T == 232
    assert float(again.process.sigma[-1]) == pytest.approx(50.0) and float(again.process.sigma[1]) == pytest.approx(0.01)


@pytest.mark.parametrize("spec,process,noise,match", [
    ({"weights": [1], "means": [[0, 0]], "covs": [[[1, 0], [0, -1]]]}, "vp-sde", None, "not positive semi-definite"),
    ({"weights": [1], "means": [[0, 0]], "covs": [[[1, 2], [0, 1]]]}, "vp-sde", None, "not symmetric"),
    ({"weights": [1, 1], "means": [[0, 0]], "covs": [np.eye(2).tolist()]}, "vp-sde", None, "shape"),
    ({"weights": [1], "means": [[0, 0]], "covs": [np.eye(3).tolist()]}, "vp-sde", None, "shape"),
    ({"weights": [-1], "means": [[0, 0]], "covs": [np.eye(2).tolist()]}, "vp-sde", None, "positive"),
    ({"weights": [1], "means": [[0, 0]], "covs": [np.eye(2).tolist()], "colour": 1}, "vp-sde", None, "unknown key"),
    ({"weights": [1], "means": [[0, 0]]}, "vp-sde", None, "missing"),
    ({"weights": [1], "means": [[0, 0, 0]], "covs": [np.eye(3).tolist()], "frames": 2}, "vp-sde", None, "divide"),
    ({"weights": [1], "means": [[0, 0]], "covs": [np.eye(2).tolist()]}, "vp-ode", None, "unknown process"),
    ({"weights": [1], "means": [[0, 0]], "covs": [np.eye(2).tolist()]}, "vp-sde", "wobbly:1", "unknown noise"),
    ({"weights": [1], "means": [["a", 0]], "covs": [np.eye(2).tolist()]}, "vp-sde", None, "numbers"),
    ([1, 2, 3], "vp-sde", None, "JSON object"),
])
def test_spec_validation(spec, process, noise, match):
    with pytest.raises(DiffusionLabError, match=match):
        GaussianMixtureOracle.from_spec(spec, process, noise)


def test_bad_inputs(tmp_path):
    oracle = GaussianMixtureOracle([1.0], [[0.0, 0.0]], [np.eye(2).tolist()], VPSDE())
    with pytest.raises(DiffusionLabError, match="shape"):
        oracle.predict(torch.zeros(3, 3, dtype=F64), 0.5)
    with pytest.raises(DiffusionLabError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{weights: [1")
        load_spec(tmp_path / "bad.json")
    with pytest.raises(DiffusionLabError, match="not found"):
        load_spec(tmp_path / "missing.json")
    singular = GaussianMixtureOracle([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 0.0]]], VPSDE())
    with pytest.raises(DiffusionLabError, match="singular"):
        singular.log_prob(torch.zeros(1, 2, dtype=F64))
    # a singular data covariance is fine wherever sigma > 0, and draws still work
    assert torch.isfinite(singular.predict(torch.zeros(2, 2, dtype=F64), 0.5).eps).all()
    assert singular.sample_data(5, torch.Generator().manual_seed(0))[:, 1].abs().max() == 0
