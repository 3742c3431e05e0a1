"""EDM preconditioning (Karras et al. 2022, Table 1) and EDM's loss: exact against the oracles and closed forms."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import make_covariance
from diffusionlab.objectives import OBJECTIVES, EDMLoss, make_objective
from diffusionlab.objectives.edm import edm_weight, expected_gaussian_loss
from diffusionlab.oracles.gaussian import dense_noise_covariance
from diffusionlab.oracles.mixture import GaussianMixtureOracle
from diffusionlab.parametrization import DiffusionModel, EDMPrediction, get_parametrization
from diffusionlab.processes import make_process

F64 = torch.float64
PROCESSES = [("vp", {"schedule": "cosine"}), ("ve", {}), ("vp-sde", {}), ("ve-sde", {}), ("subvp-sde", {})]


def _times(process):
    """A few times spread over the process's levels (chain steps or SDE times)."""
    if process.discrete:
        return [1, 10, process.T // 2, process.T - 3]
    return [torch.tensor(v, dtype=F64) for v in (1e-3, 0.05, 0.5, 0.97)]  # float64 times (a float is float32)


def _mixture(process, frames):
    g = np.random.default_rng(4)
    d = 6
    means = g.normal(0, 1.0, (2, d))
    a = g.normal(0, 1, (2, d, d))
    covs = a @ a.transpose(0, 2, 1) / d + 0.05 * np.eye(d)
    return GaussianMixtureOracle([0.3, 0.7], means, covs, process, frames=frames)


class IdealEDMNet(nn.Module):
    """The raw network EDM's preconditioning needs to reproduce ``oracle``: from its inputs ``(c_in y, c_noise)``
    it recovers ``sig = exp(4 c_noise / noise_scale)`` and ``y``, and returns ``F = (D(y; sig) - c_skip y) / c_out``
    with the oracle's exact denoiser ``D`` (Karras et al. 2022, eq. 7 solved for ``F``)."""

    def __init__(self, denoiser, param: EDMPrediction):
        super().__init__()
        self.denoiser, self.param = denoiser, param

    def forward(self, x_in, c_noise):
        sig = torch.exp(4.0 * c_noise.to(F64) / self.param.noise_scale)
        sb = sig.reshape(-1, *([1] * (x_in.dim() - 1)))
        y = x_in / self.param.c_in(sb)
        d = self.denoiser(y, sig)
        return (d - self.param.c_skip(sb) * y) / self.param.c_out(sb)


@pytest.mark.parametrize("name,opts", PROCESSES)
@pytest.mark.parametrize("noise", ["iid", "mixed:0.5"])
def test_edm_preconditioning_reproduces_the_oracle_denoiser(name, opts, noise):
    """With the ideal raw network, D = c_skip y + c_out F(c_in y, c_noise) is the oracle's E[x_0 | x_t] (and eps
    its E[eps | x_t]) at every time of every process, with i.i.d. and correlated (frame) noise: only rounding."""
    frames = 3
    process = make_process(name, make_covariance(noise, frames, axis=1), **opts)
    oracle = _mixture(process, frames)
    param = EDMPrediction(sigma_data=0.7)
    model = DiffusionModel(IdealEDMNet(oracle.edm_denoiser, param), process, prediction=param)
    g = torch.Generator().manual_seed(0)
    for t in _times(process):
        x_t = oracle.sample_marginal(64, t, generator=g)
        exact = oracle.predict(x_t, t)
        pred = model.predict(x_t, t)
        # float64 throughout: D is rebuilt from F through c_skip and c_out (relative rounding ~1e-15 times the
        # level's dynamic range, at most sig / sd ~ 2e4 on the cosine chain's last steps); eps = (y - D) / sig
        # carries D's rounding divided by sig, so it is compared as sig * eps = y - D
        torch.testing.assert_close(pred.x0, exact.x0, rtol=1e-10, atol=1e-10)
        sig = pred.sigma / pred.s
        torch.testing.assert_close(sig * pred.eps, sig * exact.eps, rtol=1e-10, atol=1e-10)


def test_table1_coefficients_and_the_v_prediction_special_case():
    """c_skip, c_out, c_in, c_noise and lambda are Table 1's (numbers computed by hand); with sd = 1 on a VP
    process the target F* is -v (Salimans & Ho 2022), and lambda = 1 / c_out^2."""
    p = EDMPrediction(sigma_data=0.5, noise_scale=4.0)  # noise_scale 4: c_noise = ln(sig) exactly
    sig = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    torch.testing.assert_close(p.c_skip(sig), 0.25 / (sig**2 + 0.25))
    torch.testing.assert_close(p.c_out(sig), sig * 0.5 / torch.sqrt(sig**2 + 0.25))
    torch.testing.assert_close(p.c_in(sig), 1 / torch.sqrt(sig**2 + 0.25))
    torch.testing.assert_close(p.c_noise(sig), torch.log(sig))
    assert abs(float(p.c_skip(torch.tensor(0.5, dtype=F64))) - 0.5) < 1e-15  # sig = sd: half skip
    torch.testing.assert_close(p.loss_weight(sig), 1 / p.c_out(sig) ** 2)
    torch.testing.assert_close(edm_weight(sig, 0.5), p.loss_weight(sig))
    vp = make_process("vp-sde")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    s, sigma = vp.coeffs(torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0], dtype=F64))
    s, sigma = s[:, None], sigma[:, None]
    one = EDMPrediction(sigma_data=1.0)
    torch.testing.assert_close(one.target(eps, x0, s, sigma), -get_parametrization("v").target(eps, x0, s, sigma))


def test_edm_conditioning_is_the_level_so_vp_and_ve_agree():
    """An EDM network means the same at equal levels of any process: on the VP-SDE at x_t = s y and on the
    VE-SDE at y, with sig equal, the same raw network gives the same denoised value."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3)).to(F64)

    class Net(nn.Module):
        def forward(self, x, c):
            return net(x) * torch.cos(c[:, None] / 400.0)

    vp, ve = make_process("vp-sde"), make_process("ve-sde", sigma_min=0.01, sigma_max=80.0)
    m_vp = DiffusionModel(Net(), vp, prediction="edm", sigma_data=0.6)
    m_ve = DiffusionModel(Net(), ve, prediction="edm", sigma_data=0.6)
    y = torch.randn(4, 3, dtype=F64)
    for t_vp in (0.05, 0.3, 0.7):
        t = torch.tensor(t_vp, dtype=F64)
        s, sigma = vp.coeffs(t)
        t_ve = ve.time_at_edm_sigma(sigma / s)
        a = m_vp.predict(y * s, t).x0
        b = m_ve.predict(y, t_ve).x0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _gaussian_denoiser(m, Sigma, K):
    """Closed-form E[x_0 | y = x_0 + sig eps], eps ~ N(0, K): m + Sigma (Sigma + sig^2 K)^{-1} (y - m), per row."""

    def d(y, sig):
        yf = y.reshape(y.shape[0], -1)
        out = torch.empty_like(yf)
        for v in torch.unique(sig).tolist():
            rows = (sig == v).reshape(-1)
            M = Sigma + v * v * K
            out[rows] = m + torch.linalg.solve(M, (yf[rows] - m).T).T @ Sigma
        return out.reshape(y.shape)

    return d


def _gaussian_setup(noise: str, process_name="ve-sde", **opts):
    frames = 4
    cov = make_covariance(noise, frames, axis=1)
    process = make_process(process_name, cov, **opts)
    g = torch.Generator().manual_seed(5)
    shape = (frames, 2)
    dim = frames * 2
    m = 0.3 * torch.randn(dim, generator=g, dtype=F64)
    a = torch.randn(dim, dim, generator=g, dtype=F64)
    Sigma = a @ a.T / dim + 0.05 * torch.eye(dim, dtype=F64)
    K = dense_noise_covariance(cov, shape)
    return process, shape, m, Sigma, K


def _draw_data(n, m, Sigma, shape, g):
    L = torch.linalg.cholesky(Sigma)
    return (m + torch.randn(n, m.numel(), generator=g, dtype=F64) @ L.T).reshape(n, *shape)


@pytest.mark.parametrize("noise", ["iid", "mixed:0.5"])
def test_edm_loss_of_the_ideal_denoiser_equals_the_closed_form(noise):
    """At each level the Monte Carlo mean of EDM's loss of the ideal (oracle) denoiser equals
    lambda(sig) tr(K^{-1} Cov[x_0 | y]) / D (exact for Gaussian data; whitened norm for correlated C), within 4
    standard errors of the mean; and no perturbed denoiser does better on the same draws."""
    process, shape, m, Sigma, K = _gaussian_setup(noise, sigma_min=1e-3, sigma_max=100.0)
    param = EDMPrediction(sigma_data=0.8)
    model = DiffusionModel(IdealEDMNet(_gaussian_denoiser(m, Sigma, K), param), process, prediction=param)
    loss_fn = EDMLoss(process)
    g = torch.Generator().manual_seed(6)
    n = 20000
    for sig in (0.01, 0.3, 1.0, 5.0):
        t = process.time_at_edm_sigma(torch.tensor(sig, dtype=F64))
        x0 = _draw_data(n, m, Sigma, shape, g)
        noise_draw = process.cov.sample(x0.shape, generator=g, dtype=F64)
        loss = loss_fn(model, x0, t=t, noise=noise_draw)
        exact = expected_gaussian_loss(m, Sigma, K, sig, 0.8)
        se = float(loss.std() / math.sqrt(n))
        assert abs(float(loss.mean()) - exact) < 4 * se, (sig, float(loss.mean()), exact, se)
        # the optimum: a perturbed output (a shifted denoiser) has a larger loss on the same draws
        bumped = DiffusionModel(_Shifted(model.net, 0.05), process, prediction=param)
        assert float(loss_fn(bumped, x0, t=t, noise=noise_draw).mean()) > float(loss.mean())


class _Shifted(nn.Module):
    def __init__(self, net, delta):
        super().__init__()
        self.net, self.delta = net, delta

    def forward(self, x, c):
        return self.net(x, c) + self.delta


def test_edm_loss_over_the_lognormal_density_equals_quadrature():
    """The objective's own level draws: its Monte Carlo mean equals the closed-form loss integrated over
    ln(sig) ~ N(P_mean, P_std^2) by 60-point Gauss-Hermite quadrature (the VE-SDE's range 1e-3..100 holds all but
    ~1e-6 of the density), within 4 standard errors."""
    process, shape, m, Sigma, K = _gaussian_setup("mixed:0.5", sigma_min=1e-3, sigma_max=100.0)
    param = EDMPrediction(sigma_data=0.8)
    model = DiffusionModel(IdealEDMNet(_gaussian_denoiser(m, Sigma, K), param), process, prediction=param)
    loss_fn = make_objective({"name": "edm", "P_mean": -0.8, "P_std": 1.0}, process)
    g = torch.Generator().manual_seed(7)
    n = 20000
    x0 = _draw_data(n, m, Sigma, shape, g)
    loss = loss_fn(model, x0, generator=g)
    z, w = np.polynomial.hermite_e.hermegauss(60)
    exact = sum(wi * expected_gaussian_loss(m, Sigma, K, math.exp(-0.8 + 1.0 * zi), 0.8)
                for zi, wi in zip(z, w)) / math.sqrt(2 * math.pi)
    se = float(loss.std() / math.sqrt(n))
    assert abs(float(loss.mean()) - exact) < 4 * se, (float(loss.mean()), exact, se)


def test_edm_loss_weights_any_parametrization_by_its_x0_error():
    """For an eps-prediction model the EDM loss is lambda ||x_theta - x_0||^2 / D computed from the decoded x0."""
    process = make_process("vp", schedule="cosine")
    torch.manual_seed(2)
    net = nn.Conv1d(3, 3, 1).to(F64)
    model = DiffusionModel(lambda x, c: net(x), process, prediction="eps")
    x0 = torch.randn(6, 3, 4, dtype=F64)
    noise = torch.randn(6, 3, 4, dtype=F64)
    t = torch.tensor([1, 5, 100, 400, 800, 990])
    loss = EDMLoss(process, sigma_data=0.5)(model, x0, t=t, noise=noise)
    s, sigma = process.coeffs(t)
    x_t = s[:, None, None] * x0 + sigma[:, None, None] * noise
    x0_hat = model.predict(x_t, t).x0
    direct = edm_weight(sigma / s, 0.5) * (x0_hat - x0).square().mean((1, 2))
    torch.testing.assert_close(loss, direct, rtol=1e-8, atol=0)


def test_edm_objective_options_and_densities():
    chain = make_process("vp", schedule="cosine")
    assert "edm" in OBJECTIVES
    loss = make_objective({"name": "edm"}, chain)
    g = torch.Generator().manual_seed(0)
    t = loss.sample_t(4000, g)
    assert t.dtype == torch.int64 and int(t.min()) >= 1 and int(t.max()) <= chain.T
    # the drawn steps' levels follow the log-normal (nearest step): median of ln(sig) near P_mean = -1.2
    med = float(torch.log(chain.edm_sigma(t)).median())
    assert abs(med - (-1.2)) < 0.1  # SE of the median ~ 1.25 * 1.2 / sqrt(4000) = 0.024, plus the steps' spacing
    proc = make_objective({"name": "edm", "density": "process"}, chain).sample_t(50, g)
    assert proc.dtype == torch.int64
    custom = EDMLoss(make_process("ve-sde"), density=lambda b, gen, dev: torch.full((b,), 2.0, dtype=F64))
    torch.testing.assert_close(custom.sample_t(3, g), make_process("ve-sde").time_at_edm_sigma(torch.full((3,), 2.0, dtype=F64)))
    with pytest.raises(DiffusionLabError, match="unknown objective.density 'flat'"):
        make_objective({"name": "edm", "density": "flat"}, chain)
    with pytest.raises(DiffusionLabError, match="P_std"):
        make_objective({"name": "edm", "P_std": 0.0}, chain)
    with pytest.raises(DiffusionLabError, match="sigma_data applies to prediction 'edm' only"):
        DiffusionModel(None, chain, prediction="eps", sigma_data=0.5)
    with pytest.raises(DiffusionLabError, match="sigma_data"):
        DiffusionModel(None, chain, prediction="edm", sigma_data=-1.0)
