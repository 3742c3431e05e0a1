"""Continuous-time DSM with a noise covariance C: by hand on small inputs, and in expectation against the closed
form for Gaussian data with the exact score (the DSM constant).

For ``x_0 ~ N(m, Sigma)`` and the exact C-score, ``sigma C s* + eps = eps - E[eps | x_t]``, so at fixed ``t``::

    E ||sigma C s* + eps||^2_{K^{-1}} = tr(K^{-1} Cov(eps | x_t)) = D - sigma^2 tr(M_t^{-1} K)

(``K = C (x) I`` dense, ``M_t = s^2 Sigma + sigma^2 K``) and the objective's expectation is
``J = (T - eps)^{-1} int_eps^T lambda(t) / sigma^2 (D - sigma^2 tr(M_t^{-1} K)) / D dt``, integrated here with
scipy's adaptive quadrature in ``log t``.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import Progressive
from diffusionlab.objectives import make_objective
from diffusionlab.objectives.continuous import ContinuousDSM
from diffusionlab.oracles import GaussianOracle, dense_noise_covariance
from diffusionlab.parametrization import DiffusionModel
from diffusionlab.processes import VPChain
from diffusionlab.processes.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64
SHAPE = (3, 2)
PROCESSES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}




class LinearNet(nn.Module):
    """A fixed affine map of ``x`` plus a time feature: an imperfect "network" for any parametrization."""

    def __init__(self, d, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
        self.c = torch.randn(d, generator=g, dtype=F64)

    def forward(self, x, c_noise):
        b = x.shape[0]
        y = x.reshape(b, -1) @ self.W.T + (c_noise[:, None] / 1000.0) * self.c
        return y.reshape(x.shape)


# ---- by hand ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_loss_by_hand_in_the_C_metric(name, prediction, weighting):
    """``lambda (s_theta - target)^T C (s_theta - target) / D`` with ``target = -C^{-1} eps / sigma``, computed
    with the dense C and ``model.score`` (which solves with C), equals the loss (which never solves with the
    score: it uses ``c_score`` and a Mahalanobis norm)."""
    cov = Progressive(1.0, SHAPE[0])
    proc = PROCESSES[name](cov=cov)
    model = DiffusionModel(LinearNet(6), proc, prediction=prediction)
    obj = ContinuousDSM(proc, weighting=weighting)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, *SHAPE, generator=g, dtype=F64)
    t = torch.tensor([1e-3, 0.1, 0.37, 0.8, 1.0], dtype=F64)
    noise = cov.sample(x0.shape, generator=g, dtype=F64)
    got = obj.loss_at(model, x0, t, noise)
    K = dense_noise_covariance(cov, SHAPE)
    s, sigma = proc.coeffs(t)
    x_t = s[:, None, None] * x0 + sigma[:, None, None] * noise
    score = model.score(x_t, t).reshape(5, 6)
    target = -torch.linalg.solve(K, noise.reshape(5, 6).T).T / sigma[:, None]
    diff = score - target
    lam = sigma**2 if weighting == "sigma2" else proc.diffusion_sq(t)
    want = lam * torch.einsum("bi,ij,bj->b", diff, K, diff) / 6
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_identity_C_is_the_plain_loss():
    """C = I: ``lambda ||s_theta + eps / sigma||^2 / D`` with plain sums of squares; sigma2 weighting with an
    eps-prediction model is exactly ``||eps - eps_theta||^2 / D``."""
    proc = VPSDE()
    model = DiffusionModel(LinearNet(4, seed=3), proc, prediction="eps")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(7, 4, generator=g, dtype=F64)
    noise = torch.randn(7, 4, generator=g, dtype=F64)
    t = torch.rand(7, generator=g, dtype=F64) * 0.9 + 0.05
    s, sigma = proc.coeffs(t)
    x_t = s[:, None] * x0 + sigma[:, None] * noise
    plain = ((model.score(x_t, t) + noise / sigma[:, None]) ** 2).sum(1) / 4
    torch.testing.assert_close(ContinuousDSM(proc, "likelihood").loss_at(model, x0, t, noise),
                               proc.diffusion_sq(t) * plain)
    torch.testing.assert_close(ContinuousDSM(proc, "sigma2").loss_at(model, x0, t, noise),
                               ((noise - model.eps(x_t, t)) ** 2).sum(1) / 4)


def test_loss_backpropagates_and_accepts_given_t_and_noise():
    proc = VESDE(cov=Progressive(0.5, 3))
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 6)).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = net

        def forward(self, x, c):
            return self.lin(x).reshape(x.shape)

    model = DiffusionModel(Net(), proc, prediction="eps")
    obj = ContinuousDSM(proc, "likelihood", "importance")
    x0 = torch.randn(8, *SHAPE, dtype=F64)
    loss = obj(model, x0, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (8,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0
    t = obj.sample_t(8, torch.Generator().manual_seed(1))
    noise = proc.cov.sample(x0.shape, dtype=F64)
    torch.testing.assert_close(obj(model, x0, t=t, noise=noise),
                               obj.importance_weight(t) * obj.loss_at(model, x0, t, noise))


# ---- in expectation --------------------------------------------------------------------------------------------
def dsm_constant(orc, obj):
    """The exact objective value ``J`` of the exact score (module docstring), float64 quadrature in log t."""
    p, K, Sig, D = orc.process, orc.K.numpy(), orc.Sigma.numpy(), orc.dim

    def integrand(u):
        t = math.exp(u)
        s, sig = (v.item() for v in p.coeffs(torch.tensor(t, dtype=F64)))
        M = s**2 * Sig + sig**2 * K
        resid = D - sig**2 * np.trace(np.linalg.solve(M, K))
        return obj.weight_over_sigma2(torch.tensor(t, dtype=F64)).item() * resid / D * t  # dt = t du

    val, _ = integrate.quad(integrand, math.log(obj.eps), math.log(obj.T), limit=200, epsabs=1e-12, epsrel=1e-10)
    return val / (obj.T - obj.eps)


N_MC = 20_000


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_expected_loss_is_the_dsm_constant_for_every_time_sampling(name, weighting):
    """Monte Carlo mean of the loss with the exact oracle = ``J`` within 4.5 standard errors (estimated from the
    20000 per-sample losses, i.i.d. for uniform/importance; the stratified estimate's spread is at most that of
    i.i.d. draws, so its sample-variance SE is conservative). Importance sampling cuts the likelihood
    weighting's variance (its ``1/t`` spike)."""
    proc = PROCESSES[name](cov=Progressive(1.0, SHAPE[0]))
    orc = GaussianOracle.random(SHAPE, proc, generator=torch.Generator().manual_seed(3))
    x0 = orc.sample_data(N_MC, generator=torch.Generator().manual_seed(4))
    ses = {}
    for k, sampling in enumerate(["uniform", "stratified", "importance"]):
        obj = ContinuousDSM(proc, weighting=weighting, t_sampling=sampling)
        J = dsm_constant(orc, obj) if k == 0 else J
        loss = obj(orc, x0, generator=torch.Generator().manual_seed(5 + k))
        mean, se = loss.mean().item(), loss.std().item() / math.sqrt(N_MC)
        ses[sampling] = se
        assert abs(mean - J) <= 4.5 * se, (sampling, mean, J, se)
    if weighting == "likelihood" and name != "ve":  # VE: g^2 / sigma^2 is constant, importance = uniform
        assert ses["importance"] < 0.5 * ses["uniform"]


def test_dsm_constant_closed_form_cross_check():
    """The quadrature ``J`` against a direct Monte Carlo of ``||eps - E[eps | x_t]||^2_{K^-1}`` at one ``t``
    with dense matrices (no library loss code): ``D - sigma^2 tr(M^-1 K)`` per sample on average."""
    proc = VPSDE(cov=Progressive(1.0, 3))
    orc = GaussianOracle.random(SHAPE, proc, generator=torch.Generator().manual_seed(6))
    t = 0.2
    s, sig = (v.item() for v in proc.coeffs(torch.tensor(t, dtype=F64)))
    K, M = orc.K, s**2 * orc.Sigma + sig**2 * orc.K
    g = torch.Generator().manual_seed(7)
    x0 = orc.sample_data(N_MC, generator=g).reshape(N_MC, 6)
    eps = torch.randn(N_MC, 6, generator=g, dtype=F64) @ torch.linalg.cholesky(K).T
    xt = s * x0 + sig * eps
    post = sig * (xt - s * orc.mean_flat) @ torch.linalg.solve(M, K)  # E[eps | x_t] = sigma K M^-1 (x_t - s m)
    r = eps - post
    q = torch.einsum("bi,bi->b", r, torch.linalg.solve(K, r.T).T)
    want = 6 - sig**2 * torch.trace(torch.linalg.solve(M, K)).item()
    assert abs(q.mean().item() - want) <= 4.5 * q.std().item() / math.sqrt(N_MC)
    obj = ContinuousDSM(proc)
    lib = obj.loss_at(orc, x0.reshape(N_MC, *SHAPE), torch.full((N_MC,), t, dtype=F64), eps.reshape(N_MC, *SHAPE))
    torch.testing.assert_close(lib, q / 6, rtol=1e-9, atol=1e-12)


# ---- time sampling -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROCESSES))
def test_time_sampling_laws(name):
    proc = PROCESSES[name]()
    strat = ContinuousDSM(proc, t_sampling="stratified").sample_t(64, torch.Generator().manual_seed(8))
    edges = 1e-5 + (1 - 1e-5) * torch.arange(65, dtype=F64) / 64
    idx = torch.bucketize(strat, edges) - 1
    assert sorted(idx.tolist()) == list(range(64))  # exactly one per stratum
    assert not torch.equal(idx, torch.arange(64))  # and shuffled over the batch
    imp = ContinuousDSM(proc, t_sampling="importance")
    t = imp.sample_t(4000, torch.Generator().manual_seed(9))
    assert t.min() >= 1e-5 and t.max() <= 1.0
    # CDF of the importance law: (lambda(T) - lambda(t)) / (lambda(T) - lambda(eps)); KS at the 1e-4 level
    lam = proc.logsnr
    cdf = ((lam(1.0) - lam(t)) / (lam(1.0) - lam(1e-5))).numpy()
    assert stats.kstest(cdf, "uniform").pvalue > 1e-4
    uni = ContinuousDSM(proc).sample_t(4000, torch.Generator().manual_seed(10))
    assert stats.kstest(((uni - 1e-5) / (1 - 1e-5)).numpy(), "uniform").pvalue > 1e-4


def test_validation_and_config():
    proc = VPSDE()
    with pytest.raises(DiffusionLabError, match="weighting"):
        ContinuousDSM(proc, weighting="elbo")
    with pytest.raises(DiffusionLabError, match="time sampling"):
        ContinuousDSM(proc, t_sampling="sobol")
    with pytest.raises(DiffusionLabError, match="eps"):
        ContinuousDSM(proc, eps=0)
    with pytest.raises(DiffusionLabError, match="SDE"):
        ContinuousDSM(VPChain([0.1, 0.2]))
    obj = make_objective({"name": "dsm", "weighting": "likelihood", "t_sampling": "importance"}, proc)
    assert obj.weighting == "likelihood" and obj.t_sampling == "importance"
    with pytest.raises(DiffusionLabError, match="unknown option"):
        make_objective({"name": "dsm", "gamma": 5}, proc)
    with pytest.raises(DiffusionLabError):
        ContinuousDSM(VESDE(cov=Progressive(1.0, 3)))(None, torch.zeros(2, 4, 2))  # wrong frame count
