"""ODE log-likelihood, Hutchinson's divergence estimator, and bits per dimension, against closed forms.

Gaussian data with the exact score (:class:`GaussianOracle`): the probability-flow ODE is affine, ``p_t`` is
known (``oracle.marginal_log_prob``), and the ODE's map ``x_eps -> x_T`` is integrated independently here with
scipy's DOP853 on the affine flow. The model density the ODE defines is ``p_eps`` exactly up to the prior
substitution at ``T``::

    log p_model(x) = log p_eps(x) + [log N(x_T; 0, prior_std^2 C) - log p_T(x_T)]

The bracket is ~1e-3 nats per dimension for the default VP (``s_T = 6.6e-3``, linear in ``x_T``) and VE
(``|m| / sigma_max``) processes, so the tight check includes it; with processes whose ``p_T`` matches the prior
(VP ``beta_max = 40``, VE ``sigma_max = 1000``) the ODE likelihood is compared with ``p_eps`` directly.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.stats import norm

from diffusionlab.errors import DiffusionLabError
from diffusionlab.likelihood import (
    MODEL_SPACE_OFFSET_BITS,
    bpd_from_model_space_nll,
    dataset_log_likelihood,
    dequantize,
    exact_divergence,
    hutchinson_divergence,
    nats_to_bpd,
    ode_log_likelihood,
    sample_probes,
    to_levels,
)
from diffusionlab.noise.covariance import Identity, Progressive
from diffusionlab.oracles import GaussianOracle
from diffusionlab.processes.sde import VESDE, VPSDE
from diffusionlab.samplers.ode import velocity as probability_flow_drift

F64 = torch.float64
EPS = 1e-5




def make_oracle(kind, correlated, seed=1, **proc_kw):
    cov, shape = (Progressive(1.0, 3), (3, 2)) if correlated else (Identity(), (2,))
    proc = (VPSDE if kind == "vp" else VESDE)(cov=cov, **proc_kw)
    return GaussianOracle.random(shape, proc, generator=torch.Generator().manual_seed(seed))


def exact_flow(orc, x, t0, t1):
    """The probability-flow ODE's map from ``t0`` to ``t1`` applied to ``x``, by scipy's DOP853 on
    ``dA/dt = F A``, ``db/dt = F b + c`` with ``v = F x + c`` built from dense matrices."""
    p, D = orc.process, orc.dim
    eye = torch.eye(D, dtype=F64)

    def rhs(t, y):
        s, sig = p.coeffs(torch.tensor(t, dtype=F64))
        KMi = orc.K @ torch.linalg.inv(s**2 * orc.Sigma + sig**2 * orc.K)
        f, g2 = p.drift_coef(t).item(), p.diffusion_sq(t).item()
        F, c = f * eye + 0.5 * g2 * KMi, -0.5 * g2 * KMi @ (s * orc.mean_flat)
        A, b = torch.from_numpy(y[: D * D]).reshape(D, D), torch.from_numpy(y[D * D:])
        return torch.cat([(F @ A).reshape(-1), F @ b + c]).numpy()

    y0 = torch.cat([eye.reshape(-1), torch.zeros(D, dtype=F64)]).numpy()
    y = torch.from_numpy(solve_ivp(rhs, (t0, t1), y0, method="DOP853", rtol=1e-11, atol=1e-12).y[:, -1])
    A, b = y[: D * D].reshape(D, D), y[D * D:]
    return (x.reshape(x.shape[0], D) @ A.T + b).reshape(x.shape)


def model_log_prob(orc, x):
    """``log p_eps(x)`` plus the prior substitution at ``T`` along the exact flow (module docstring)."""
    z = exact_flow(orc, x, EPS, orc.process.T)
    return orc.marginal_log_prob(x, EPS) + orc.process.prior_log_prob(z) - orc.marginal_log_prob(z, 1.0), z


# ---- (b) exact divergence: the ODE likelihood is the exact density ----------------------------------------------
@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("correlated", [False, True])
def test_ode_likelihood_exact_divergence(kind, correlated):
    orc = make_oracle(kind, correlated)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([orc.sample_data(24, generator=g), 3.0 * orc.sample_data(4, generator=g)])  # a few outliers
    out = ode_log_likelihood(orc, x, eps=EPS, rtol=1e-6, atol=1e-6)
    assert out["stderr_probes"] is None and out["nfe"] > 0
    ref, z = model_log_prob(orc, x)
    torch.testing.assert_close(out["z"], z, rtol=0, atol=1e-4 * orc.process.prior_std)
    err = (out["log_likelihood"] - ref).abs().max().item() / orc.dim
    assert err < 1e-4, err  # dopri5 at rtol = atol = 1e-6: measured 3e-6 .. 4e-5 nats / dim
    # the prior substitution is what separates it from p_eps: larger than the tolerance above (so needed here)
    assert (ref - orc.marginal_log_prob(x, EPS)).abs().max() / orc.dim > 1e-3


@pytest.mark.parametrize("kind,kw", [("vp", {"beta_max": 40.0}), ("ve", {"sigma_max": 1000.0})])
@pytest.mark.parametrize("correlated", [False, True])
def test_ode_likelihood_equals_marginal_density_when_prior_matches(kind, kw, correlated):
    """With ``p_T`` equal to the prior to < 1e-4 nats, the ODE log-likelihood is ``log p_eps`` (VE: data
    convolved with ``N(0, sigma(eps)^2 C)``, the exact marginal at ``eps``) within 1e-3 nats per dimension; for VP
    ``p_eps`` is the data density itself to 1e-5 per dimension."""
    orc = make_oracle(kind, correlated, **kw)
    x = orc.sample_data(16, generator=torch.Generator().manual_seed(3))
    out = ode_log_likelihood(orc, x, eps=EPS, rtol=1e-6, atol=1e-6)
    exact = orc.marginal_log_prob(x, EPS)
    assert (out["log_likelihood"] - exact).abs().max() / orc.dim < 1e-3
    if kind == "vp":
        assert (orc.data_log_prob(x) - exact).abs().max() / orc.dim < 1e-5


# ---- (c) Hutchinson's estimator -------------------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_divergence(probe):
    """For fixed points, the mean of ``e^T J e`` over 4000 probes matches the exact divergence within 4.5
    standard errors (estimated from the same probes; 8 points). The estimator's variance is not zero here
    (``J`` has off-diagonal entries: correlated C and data), so the check has power."""
    orc = make_oracle("vp", True)
    x = orc.sample_data(8, generator=torch.Generator().manual_seed(4))
    t, K = torch.tensor(0.3, dtype=F64), 4000
    xg = x.clone().requires_grad_(True)
    exact = exact_divergence(probability_flow_drift(orc, xg, t), xg).detach()
    # the K probes of each point as one batch of K * 8 copies: one model evaluation, one vector-Jacobian product
    xr = x.repeat(K, 1, 1).requires_grad_(True)
    probes = sample_probes((1, *xr.shape), probe, torch.Generator().manual_seed(5))
    est = hutchinson_divergence(probability_flow_drift(orc, xr, t), xr, probes)[0].detach().reshape(K, 8)
    mean, se = est.mean(0), est.std(0) / math.sqrt(K)
    assert (se > 1e-3 * exact.abs()).all()
    assert ((mean - exact).abs() <= 4.5 * se).all(), ((mean - exact) / se).tolist()
    if probe == "rademacher":  # Var = 1/2 sum_{i != j} (J_ij + J_ji)^2, exactly computable
        J = torch.autograd.functional.jacobian(lambda y: probability_flow_drift(orc, y[None], t)[0].reshape(-1),
                                               x[0]).reshape(orc.dim, orc.dim)
        Js = J + J.T
        var = 0.5 * (Js.square().sum() - Js.diagonal().square().sum())
        assert abs(est[:, 0].var().item() / var.item() - 1) < 0.1  # sd of a variance ratio ~ sqrt(2/K)*kurt: < 0.05


def test_hutchinson_ode_likelihood_within_probe_error_and_deterministic():
    orc = make_oracle("vp", True)
    x = orc.sample_data(12, generator=torch.Generator().manual_seed(6))
    ref, _ = model_log_prob(orc, x)
    kw = dict(eps=EPS, rtol=1e-5, atol=1e-5, divergence="hutchinson", num_probes=8)
    out = ode_log_likelihood(orc, x, generator=torch.Generator().manual_seed(7), **kw)
    se = out["stderr_probes"]
    assert se.shape == (12,) and (se > 0).all()
    # per point: 4.5 probe standard errors (8 probes: a t-statistic, but 4.5 is still beyond its 99.9% point)
    # plus the solver's error
    assert ((out["log_likelihood"] - ref).abs() <= 4.5 * se + 1e-3).all()
    again = ode_log_likelihood(orc, x, generator=torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(again["log_likelihood"], out["log_likelihood"], rtol=0, atol=0)
    gauss = ode_log_likelihood(orc, x, generator=torch.Generator().manual_seed(7), probe="gaussian", **kw)
    assert ((gauss["log_likelihood"] - ref).abs() <= 4.5 * gauss["stderr_probes"] + 1e-3).all()


def test_dataset_log_likelihood_batches_and_standard_errors():
    orc = make_oracle("vp", False)
    data = orc.sample_data(20, generator=torch.Generator().manual_seed(8))
    res = dataset_log_likelihood(orc, data, batch_size=8, eps=EPS, rtol=1e-6, atol=1e-6)
    ref, _ = model_log_prob(orc, data)
    torch.testing.assert_close(res["nll"], -ref, rtol=0, atol=1e-4)
    assert res["num_points"] == 20 and res["dim"] == 2 and res["stderr_probes"] is None
    assert res["mean_nll"] == pytest.approx(-ref.mean().item(), abs=1e-4)
    assert res["stderr"] == pytest.approx(ref.std().item() / math.sqrt(20), rel=1e-3)
    # an iterable of (x, label) batches gives the same numbers
    loader = [(data[:13], None), (data[13:], None)]
    res2 = dataset_log_likelihood(orc, loader, batch_size=8, progress=True, eps=EPS, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res2["nll"], res["nll"], rtol=0, atol=1e-6)
    hut = dataset_log_likelihood(orc, data, batch_size=10, eps=EPS, divergence="hutchinson", num_probes=4,
                                 generator=torch.Generator().manual_seed(9))
    assert hut["stderr_probes"] > 0 and hut["stderr"] > 0


def test_likelihood_validation():
    orc = make_oracle("vp", False)
    x = orc.sample_data(2)
    with pytest.raises(DiffusionLabError, match="divergence"):
        ode_log_likelihood(orc, x, divergence="trace")
    with pytest.raises(DiffusionLabError, match="probe"):
        ode_log_likelihood(orc, x, divergence="hutchinson", probe="sphere")
    with pytest.raises(DiffusionLabError, match="num_probes"):
        ode_log_likelihood(orc, x, divergence="hutchinson", num_probes=0)
    with pytest.raises(DiffusionLabError, match="eps"):
        ode_log_likelihood(orc, x, eps=0.0)
    with pytest.raises(DiffusionLabError, match="batch_size"):
        dataset_log_likelihood(orc, x, batch_size=0)


# ---- bits per dimension ---------------------------------------------------------------------------------------
def test_bpd_offset_is_seven_and_uniform_model_gives_eight_bits():
    """The uniform density on ``[-1, 1]^D`` (``nll = D ln 2``) gives every 8-bit value probability ``256^-D``:
    exactly 8 bits per dimension, and the dequantization bound is tight for it."""
    D = 3072
    assert MODEL_SPACE_OFFSET_BITS == 7.0
    assert bpd_from_model_space_nll(D * math.log(2.0), D) == pytest.approx(8.0, abs=1e-12)
    assert nats_to_bpd(D * math.log(2.0), D) == pytest.approx(1.0, abs=1e-12)
    t = torch.tensor([D * math.log(2.0), 0.0], dtype=F64)
    torch.testing.assert_close(bpd_from_model_space_nll(t, D), torch.tensor([8.0, 7.0], dtype=F64))
    with pytest.raises(DiffusionLabError, match="dimension"):
        nats_to_bpd(1.0, 0)


@pytest.mark.parametrize("std", [0.3, 1.0])
def test_bpd_bound_against_exact_discrete_probability(std):
    """A 1-D Gaussian model ``N(0.1, std^2)`` on model space: the exact probability of each level is a CDF
    difference over its cell ``[2k/256 - 1, (2k+2)/256 - 1)``; the dequantized bound (``E_u[-log p]`` by
    Gauss-Legendre quadrature over the cell, exact for the quadratic ``log p``, then ``+7``) is above it by
    Jensen's gap ``~ Var_u(log p) / 2 = (slope * 2/256)^2 / 24`` nats: at most ~4e-4 bits (std 0.3, slope
    ``|x - 0.1| / std^2 <= 12`` at the edges)."""
    k = torch.arange(256, dtype=F64)
    lo, hi = 2 * k / 256 - 1, (2 * k + 2) / 256 - 1
    p_exact = norm.cdf(hi.numpy(), 0.1, std) - norm.cdf(lo.numpy(), 0.1, std)
    exact_bits = -torch.log2(torch.from_numpy(p_exact))
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(16))
    u, w = (nodes + 1) / 2, weights / 2  # Gauss-Legendre on [0, 1]
    x = 2 * (k[:, None] + u[None]) / 256 - 1
    nll = -torch.distributions.Normal(torch.tensor(0.1, dtype=F64), torch.tensor(std, dtype=F64)).log_prob(x)
    bound = bpd_from_model_space_nll((nll * w).sum(1), 1)
    assert (bound >= exact_bits - 1e-12).all()
    assert (bound - exact_bits).max() < 1e-3


def test_dequantize_cells_and_levels():
    g = torch.Generator().manual_seed(11)
    k = torch.randint(0, 256, (4000, 3), generator=g)
    x = 2 * k.to(torch.float32) / 255 - 1
    assert torch.equal(to_levels(x), k)
    y = dequantize(x, torch.Generator().manual_seed(12))
    assert y.dtype == torch.float32 and y.shape == x.shape
    lo = 2 * k.to(F64) / 256 - 1
    assert ((y.to(F64) >= lo - 1e-6) & (y.to(F64) < lo + 2 / 256 + 1e-6)).all()
    # u = 256 (y + 1) / 2 - k is U[0, 1): mean 1/2, sd 1/sqrt(12), 12000 draws -> se 0.0026
    u = 128 * (y.to(F64) + 1) - k
    assert abs(u.mean().item() - 0.5) < 4.5 * (1 / math.sqrt(12)) / math.sqrt(u.numel())
    torch.testing.assert_close(dequantize(x, torch.Generator().manual_seed(12)), y, rtol=0, atol=0)
    with pytest.raises(DiffusionLabError, match="8-bit"):
        dequantize(torch.tensor([0.123]))
    with pytest.raises(DiffusionLabError, match="8-bit"):
        dequantize(torch.tensor([1.5]))
