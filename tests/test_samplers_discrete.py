"""Discrete samplers driven by the exact Gaussian oracle return the data Gaussian.

Two data sets: 2-D points with i.i.d. noise, and (F, d) = (4, 2) samples with AR(1) noise across the frames
(Progressive(1.0), rho = 0.71, on axis 1). Moments are compared entrywise with tolerance 5 standard errors of
the Monte Carlo estimate over n draws (Gaussian: se(mean_i) = sqrt(V_ii / n), se(cov_ij) = sqrt((V_ii V_jj +
V_ij^2) / n)); with at most 44 entries the chance of a false failure is < 44 * 6e-7.

Where a sampler is exact only in the limit (DDIM with few steps, the VE kernels, Langevin), the test computes
the sampler's *exact* output law by a linear-Gaussian recursion written from the papers' equations (the oracle is
affine in x, so every step maps N(mu, V) to N(P mu + c, P V P^T + q K)); samples must match that law within
5 standard errors (the implementation check), and that law must be close to the data (the method's bias, stated
and bounded in each test).
"""

import math

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Identity, Progressive
from diffusionlab.oracles import GaussianOracle
from diffusionlab.processes import VEChain, VPChain
from diffusionlab.processes.grid import TimeGrid, make_grid
from diffusionlab.samplers import (
    SAMPLERS,
    NoiseSource,
    annealed_langevin,
    ddim,
    ddpm,
    get_sampler,
    sample_in_chunks,
    ve_reverse,
)
from diffusionlab.schedules import geometric_sigmas, linear_betas

F64 = torch.float64


N2D, NFD = 10000, 5000  # draws for the 2-D and the (4, 2) data


# -- data and moment checks ----------------------------------------------------------------------------------
def _oracle(kind: str, process):
    if kind == "2d":
        return GaussianOracle(torch.tensor([0.6, -0.4], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64),
                              process)
    return GaussianOracle.random((4, 2), process, generator=torch.Generator().manual_seed(0))


def _cov(kind: str):
    return Identity() if kind == "2d" else Progressive(1.0, 4, axis=1)


def _n(kind: str) -> int:
    return N2D if kind == "2d" else NFD


def _z_scores(x, mean, V):
    """Max |z| of the sample mean and covariance against the law N(mean, V) (flattened)."""
    xf = x.reshape(x.shape[0], -1).to(F64)
    n = xf.shape[0]
    d = torch.diagonal(V)
    z_mean = (xf.mean(0) - mean) / (d / n).sqrt()
    z_cov = (torch.cov(xf.T) - V) / ((d[:, None] * d[None, :] + V**2) / n).sqrt()
    return z_mean.abs().max().item(), z_cov.abs().max().item()


def _assert_law(x, mean, V, n_se=5.0):
    zm, zc = _z_scores(x, mean, V)
    assert zm < n_se and zc < n_se, f"mean z = {zm:.2f}, cov z = {zc:.2f} (tolerance {n_se})"


def _prior(oracle, n, seed):
    g = torch.Generator().manual_seed(seed)
    return oracle.process.prior_sample((n, *oracle.sample_shape), generator=g, dtype=F64), g


# -- exact output laws (linear-Gaussian recursions from the papers' equations) -----------------------------
def _affine(oracle, s, sigma):
    """eps(x) = Ge (x - s m), x0(x) = m + Gx (x - s m), C score(x) = -Gs (x - s m) for the oracle at (s, sigma)."""
    S, K = oracle.Sigma, oracle.K
    Minv = torch.linalg.inv(s**2 * S + sigma**2 * K)
    return sigma * K @ Minv, s * S @ Minv, K @ Minv


class Law:
    def __init__(self, oracle):
        self.o = oracle
        self.mu = torch.zeros(oracle.dim, dtype=F64)
        self.V = oracle.process.prior_std**2 * oracle.K.clone()
        self.I = torch.eye(oracle.dim, dtype=F64)

    def step(self, P, c, q=0.0):
        """x -> P x + c + sqrt(q) L z."""
        self.mu = P @ self.mu + c
        self.V = P @ self.V @ P.T + q * self.o.K
        return self

    def error(self):
        """Largest deviation of the law from the data, (|mean - m|, |V - Sigma|)."""
        return (self.mu - self.o.mean_flat).abs().max().item(), (self.V - self.o.Sigma).abs().max().item()


def ddpm_law(oracle, ts, variance):
    """Ho et al. 2020 Alg. 2 on the sub-sequence: alpha'_k = abar_t / abar_prev, beta' = 1 - alpha',
    x' = (x - beta' / sqrt(1 - abar_t) eps(x)) / sqrt(alpha') + sigma z, sigma^2 = beta' or beta-tilde'."""
    law, ab, m = Law(oracle), oracle.process.alpha_bar, oracle.mean_flat
    ts = ts.tolist()
    for k, t in enumerate(ts):
        tp = ts[k + 1] if k + 1 < len(ts) else 0
        alpha = float(ab[t] / ab[tp])
        beta = 1 - alpha
        s, sig = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        Ge, _, _ = _affine(oracle, s, sig)
        coef = beta / sig
        P = (law.I - coef * Ge) / math.sqrt(alpha)
        c = coef * Ge @ (s * m) / math.sqrt(alpha)
        q = 0.0 if tp == 0 else (beta if variance == "beta" else (1 - ab[tp]) / (1 - ab[t]) * beta)
        law.step(P, c, float(q))
    return law


def ddim_law(oracle, ts, eta):
    """Song et al. 2021 eq. 12: x' = sqrt(abar_p) x0(x) + sqrt(1 - abar_p - c^2) eps(x) + c z,
    c = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p)."""
    law, ab, m = Law(oracle), oracle.process.alpha_bar, oracle.mean_flat
    ts = ts.tolist()
    for k, t in enumerate(ts):
        tp = ts[k + 1] if k + 1 < len(ts) else 0
        a_t, a_p = float(ab[t]), float(ab[tp])
        c2 = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        s = math.sqrt(a_t)
        Ge, Gx, _ = _affine(oracle, s, math.sqrt(1 - a_t))
        u, w = math.sqrt(a_p), math.sqrt(max(1 - a_p - c2, 0.0))
        P = u * Gx + w * Ge
        c = u * (m - Gx @ (s * m)) - w * Ge @ (s * m)
        law.step(P, c, c2)
    return law


def ve_reverse_law(oracle, denoise_last=True):
    """Seed 000: x' = x + g^2 C score(x) + g z, g^2 = sigma_t^2 - sigma_{t-1}^2 (no noise at the last step)."""
    law, chain, m = Law(oracle), oracle.process, oracle.mean_flat
    for t in range(chain.T, 0, -1):
        sig, sp = float(chain.sigma[t]), float(chain.sigma[t - 1])
        g2 = sig**2 - sp**2
        _, _, Gs = _affine(oracle, 1.0, sig)
        law.step(law.I - g2 * Gs, g2 * Gs @ m, 0.0 if (t == 1 and denoise_last) else g2)
    return law


def ve_ancestral_law(oracle):
    """Seed 000 task 1, VE: A = sigma_{t-1}^2 / sigma_t^2, B = 1 - A, C_t^2 = sigma_{t-1}^2 g^2 / sigma_t^2."""
    law, chain, m = Law(oracle), oracle.process, oracle.mean_flat
    for t in range(chain.T, 0, -1):
        sig, sp = float(chain.sigma[t]), float(chain.sigma[t - 1])
        _, Gx, _ = _affine(oracle, 1.0, sig)
        A = sp**2 / sig**2
        law.step(A * law.I + (1 - A) * Gx, (1 - A) * (m - Gx @ m), sp**2 * (sig**2 - sp**2) / sig**2)
    return law


def langevin_law(oracle, n_each, step_lr, denoise=True):
    """Song & Ermon Alg. 1: x' = x + eta/2 C score(x) + sqrt(eta) z, eta_i = step_lr sigma_i^2 / sigma_min^2;
    then x + sigma_min^2 C score(x)."""
    law, chain, m = Law(oracle), oracle.process, oracle.mean_flat
    smin = float(chain.sigma[1])
    for t in range(chain.T, 0, -1):
        sig = float(chain.sigma[t])
        eta = step_lr * sig**2 / smin**2
        _, _, Gs = _affine(oracle, 1.0, sig)
        for _ in range(n_each):
            law.step(law.I - 0.5 * eta * Gs, 0.5 * eta * Gs @ m, eta)
    if denoise:
        _, _, Gs = _affine(oracle, 1.0, smin)
        law.step(law.I - smin**2 * Gs, smin**2 * Gs @ m)
    return law


# -- time grids ----------------------------------------------------------------------------------------------
def make_timesteps(T: int, steps=None, kind: str = "uniform") -> torch.Tensor:
    """The integer steps of a chain grid (the final data point 0 left out)."""
    return torch.tensor(make_grid(VPChain(linear_betas(T)), steps, kind).times[:-1], dtype=torch.long)


def ve_ancestral(oracle, x, grid=None, noise=None):
    """NCSN's posterior sampler: DDPM with the posterior variance on the VE chain."""
    return ddpm(oracle, x, grid, noise=noise, variance="beta_tilde")


@pytest.mark.parametrize("kind", ["uniform", "quadratic"])
@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 100), (1000, 1000), (10, 9), (7, 2), (5, 1), (1000, 999)])
def test_make_timesteps(kind, T, steps):
    ts = make_timesteps(T, steps, kind)
    assert ts.dtype == torch.int64 and ts.numel() == steps and int(ts[0]) == T
    assert steps == 1 or int(ts[-1]) == 1
    assert bool((ts[1:] < ts[:-1]).all())


@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 10), (1000, 1000), (10, 9), (7, 3), (5, 1), (1000, 999)])
def test_trailing_timesteps_end_at_T_over_steps(T, steps):
    ts = make_timesteps(T, steps, "trailing")
    assert ts.dtype == torch.int64 and ts.numel() == steps and int(ts[0]) == T
    assert bool((ts[1:] < ts[:-1]).all()) and int(ts[-1]) >= 1
    assert abs(int(ts[-1]) - T / steps) <= 0.5  # no evaluation spent at t = 1 unless steps = T
    gaps = (ts[:-1] - ts[1:]).tolist() + [int(ts[-1])]  # the last jump goes to the data, t = 0
    assert max(gaps) - min(gaps) <= 1


def test_trailing_timesteps_values():
    assert make_timesteps(1000, 10, "trailing").tolist() == list(range(1000, 0, -100))
    assert make_timesteps(7, 3, "trailing").tolist() == [7, 5, 2]
    assert torch.equal(make_timesteps(50, 50, "trailing"), make_timesteps(50))
    assert make_grid(VPChain(linear_betas(1000)), 4, "trailing").times == [1000, 750, 500, 250, 0]


def test_timestep_validation():
    chain = VPChain(linear_betas(10))
    assert torch.equal(make_timesteps(4), torch.tensor([4, 3, 2, 1]))
    assert torch.equal(make_timesteps(1000, 4), torch.tensor([1000, 667, 334, 1]))
    for bad, msg in [(11, "<= T = 10"), (0, ">= 1"), (2.5, "integer")]:
        with pytest.raises(DiffusionLabError, match=msg):
            make_grid(chain, bad)
    with pytest.raises(DiffusionLabError, match="unknown time grid 'log'"):
        make_grid(chain, 5, "log")
    with pytest.raises(DiffusionLabError, match="strictly decreasing"):
        TimeGrid(chain, [5, 5, 1])
    with pytest.raises(DiffusionLabError, match="lie in 1..10"):
        TimeGrid(chain, [11, 1])
    with pytest.raises(DiffusionLabError, match="integer steps"):
        TimeGrid(chain, [5.5, 1.0])
    assert TimeGrid(chain, [5, 3, 1]).times == [5, 3, 1, 0] == TimeGrid(chain, [5, 3, 1, 0]).times


def test_grid_steps_on_the_full_chain_are_the_chains_own_and_subgrid_betas_come_from_alpha_bar():
    """The grid's transition and posterior of each step: on every step of the chain its own beta, A, B and
    beta-tilde; on a sub-sequence, the respaced beta 1 - abar_t / abar_t' (improved-diffusion)."""
    chain = VPChain(linear_betas(100, 1e-3, 0.2))
    g = make_grid(chain)
    t = torch.arange(100, 0, -1)
    post = torch.tensor([g.posterior(i) for i in range(g.steps)], dtype=F64)
    b2 = torch.tensor([g.transition(i)[1] for i in range(g.steps)], dtype=F64)
    for got, want in [(post[:, 0], chain.post_A[t]), (post[:, 1], chain.post_B[t]), (post[:, 2], chain.beta_tilde[t]),
                      (b2, chain.beta[t])]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)
    g = make_grid(chain, 7, "quadratic")
    ts = torch.tensor(g.times, dtype=torch.long)
    b2 = torch.tensor([g.transition(i)[1] for i in range(g.steps)], dtype=F64)
    torch.testing.assert_close(b2, 1 - chain.alpha_bar[ts[:-1]] / chain.alpha_bar[ts[1:]], rtol=1e-12, atol=0)


def test_registry():
    assert set(SAMPLERS) >= {"ddpm", "ddim", "ve-reverse", "annealed-langevin"}
    assert get_sampler("ddim").fn is ddim and get_sampler("annealed_langevin").name == "annealed-langevin"
    with pytest.raises(DiffusionLabError, match="unknown sampler 'no-such-sampler'; allowed: .*ddim.*ddpm"):
        get_sampler("no-such-sampler")


def test_noise_source_has_covariance_C():
    """Sample covariance of n = 20000 draws of (4, 2) noise equals kron(C, I) within 5 standard errors."""
    cov = Progressive(1.0, 4, axis=1)
    src = NoiseSource(cov, torch.Generator().manual_seed(0))
    like = torch.empty(20000, 4, 2, dtype=F64)
    z = src(like)
    assert z.shape == like.shape and z.dtype == F64
    K = torch.kron(cov.matrix(), torch.eye(2, dtype=F64))
    _assert_law(z, torch.zeros(8, dtype=F64), K)
    w = NoiseSource(Identity(), torch.Generator().manual_seed(0))(like)
    _assert_law(w, torch.zeros(8, dtype=F64), torch.eye(8, dtype=F64))


# -- VP samplers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,variance", [("2d", "beta"), ("2d", "beta_tilde"), ("fd", "beta")])
def test_ddpm_full_chain_returns_the_data(kind, variance):
    """Full chain, T = 1000 linear: the samples match N(m, Sigma) within 5 se. (The exact law of this chain
    differs from the data by < 0.03 in any covariance entry, under 1 se at these n: asserted too.)"""
    oracle = _oracle(kind, VPChain(linear_betas(1000), cov=_cov(kind)))
    law = ddpm_law(oracle, make_timesteps(1000), variance)
    assert law.error()[1] < 0.03
    x, g = _prior(oracle, _n(kind), 1)
    x = ddpm(oracle, x, variance=variance, noise=g)
    _assert_law(x, oracle.mean_flat, oracle.Sigma)
    assert oracle.nfe == 1000


def test_ddim_on_a_trailing_grid_follows_its_exact_law():
    """DDIM eta = 0 on 20 trailing steps (correlated C): the samples match the exact law of that deterministic
    chain, and the catalogue's grid kind gives the very grid passed explicitly."""
    oracle = _oracle("fd", VPChain(linear_betas(1000), cov=_cov("fd")))
    ts = make_timesteps(1000, 20, "trailing")
    law = ddim_law(oracle, ts, 0.0)
    x, _ = _prior(oracle, _n("fd"), 4)
    a = get_sampler("ddim").run(oracle, x, 20, kind="trailing", eta=0.0)
    assert oracle.nfe == 20
    _assert_law(a, law.mu, law.V)
    assert torch.equal(ddim(oracle, x, ts, eta=0.0), a)  # the very same steps


def test_sample_grid_from_a_config_reaches_the_sampler():
    """``sample.grid`` is validated and ``generate`` passes it on: the same draws as DDIM on the explicit grid."""
    from diffusionlab.training.config import resolve
    from diffusionlab.training.sampling import generate

    with pytest.raises(DiffusionLabError, match="sample.grid must be one of uniform, trailing, quadratic"):
        resolve({"data": {"name": "ring"}}, ["sample.grid=log"])
    with pytest.raises(DiffusionLabError, match="renamed sample.grid"):
        resolve({"data": {"name": "ring"}}, ["sample.spacing=trailing"])
    oracle = _oracle("2d", VPChain(linear_betas(1000)))
    scfg = {"sampler": "ddim", "steps": 8, "eta": 0.0, "clip_x0": False, "grid": "trailing"}
    got = generate(oracle, scfg, num=64, seed=3, device="cpu", shape=(2,))
    want = sample_in_chunks(ddim, oracle, (2,), 64, generator=torch.Generator().manual_seed(3), device="cpu",
                            grid=make_timesteps(1000, 8, "trailing"), eta=0.0, clip_x0=False)
    assert torch.equal(got, want.cpu())  # the same sampler, integer grid, chunk and seed: the same operations
    uniform = generate(oracle, dict(scfg, grid="uniform"), num=64, seed=3, device="cpu", shape=(2,))
    assert not torch.allclose(got, uniform)


@pytest.mark.parametrize("kind", ["2d", "fd"])
def test_ddim_deterministic_converges(kind):
    """DDIM eta = 0 on 50 and 100 uniform steps: samples match the exact law of the deterministic chain; that law
    is a first-order approximation of the data (max |V - Sigma| < 0.2 at 50 steps, < 0.1 at 100 steps, and the
    error halves, ratio < 0.6, when the steps double)."""
    oracle = _oracle(kind, VPChain(linear_betas(1000), cov=_cov(kind)))
    errs = []
    for steps in (50, 100):
        ts = make_timesteps(1000, steps)
        law = ddim_law(oracle, ts, 0.0)
        x, _ = _prior(oracle, _n(kind), 2)
        x = ddim(oracle, x, ts, eta=0.0)
        _assert_law(x, law.mu, law.V)
        errs.append(law.error()[1])
    assert errs[0] < 0.2 and errs[1] < 0.1 and errs[1] < 0.6 * errs[0], errs


def test_ddim_eta_one_is_ancestral_beta_tilde():
    """eta = 1: samples match the exact law of eq. 12; and with the same noise it is DDPM with beta-tilde."""
    oracle = _oracle("fd", VPChain(linear_betas(1000), cov=_cov("fd")))
    ts = make_timesteps(1000, 100, "quadratic")
    law = ddim_law(oracle, ts, 1.0)
    x_T, g = _prior(oracle, NFD, 3)
    x = ddim(oracle, x_T, ts, eta=1.0, noise=torch.Generator().manual_seed(9))
    _assert_law(x, law.mu, law.V)
    y = ddpm(oracle, x_T, ts, variance="beta_tilde", noise=torch.Generator().manual_seed(9))
    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_identity_noise_with_correlated_C_fails():
    """DDPM (100 respaced steps, beta) matches its exact law with the process's noise L z, and is far off (> 20 se)
    when the noise source is i.i.d. although the model's C is correlated."""
    oracle = _oracle("fd", VPChain(linear_betas(1000), cov=_cov("fd")))
    ts = make_timesteps(1000, 100)
    law = ddpm_law(oracle, ts, "beta")
    x_T, g = _prior(oracle, NFD, 4)
    _assert_law(ddpm(oracle, x_T, ts, noise=g), law.mu, law.V)
    wrong = ddpm(oracle, x_T, ts, noise=NoiseSource(Identity(), g))
    assert _z_scores(wrong, law.mu, law.V)[1] > 20
    assert _z_scores(wrong, oracle.mean_flat, oracle.Sigma)[1] > 20


def test_clip_x0_and_learned_variance_paths():
    oracle = _oracle("2d", VPChain(linear_betas(1000)))
    x_T, _ = _prior(oracle, 500, 5)
    x = ddpm(oracle, x_T, 20, clip_x0=True, noise=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0  # the last step returns the clamped x0 prediction
    y = ddim(oracle, x_T, 20, clip_x0=True)
    assert y.abs().max() <= 1.0

    class Learned:  # the oracle with a learned-variance head saying "use beta" (v_var = 1)
        process, parametrization, learn_variance = oracle.process, oracle.parametrization, True

        def predict(self, x, t):
            p = oracle.predict(x, t)
            p.v_var = torch.ones_like(p.eps)
            return p

    a = ddpm(Learned(), x_T, 20, variance="learned", noise=torch.Generator().manual_seed(1))
    b = ddpm(oracle, x_T, 20, variance="beta", noise=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(DiffusionLabError, match="learn_variance=True"):
        ddpm(oracle, x_T, 20, variance="learned")
    with pytest.raises(DiffusionLabError, match="unknown ddpm variance"):
        ddpm(oracle, x_T, 20, variance="small")
    with pytest.raises(DiffusionLabError, match=r"eta must lie in \[0, 1\]"):
        ddim(oracle, x_T, 20, eta=1.5)


def test_float32_and_sample_in_chunks():
    oracle = _oracle("fd", VPChain(linear_betas(1000), cov=_cov("fd")))
    x = sample_in_chunks("ddim", oracle, (4, 2), num=10, chunk=4, generator=torch.Generator().manual_seed(0),
                         grid=5, store_device="cpu", progress=True)
    assert x.shape == (10, 4, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert oracle.nfe == 3 * 5  # 3 chunks of 5 steps
    a = sample_in_chunks(ddpm, oracle, (4, 2), num=3, generator=torch.Generator().manual_seed(0), grid=5,
                         dtype=F64)
    b = sample_in_chunks(ddpm, oracle, (4, 2), num=3, generator=torch.Generator().manual_seed(0), grid=5,
                         dtype=F64)
    assert torch.equal(a, b)


# -- VE samplers ---------------------------------------------------------------------------------------------
def _ve(kind, L=200, smin=0.01, smax=20.0):
    return _oracle(kind, VEChain(geometric_sigmas(L, smin, smax), cov=_cov(kind)))


@pytest.mark.parametrize("kind", ["2d", "fd"])
def test_ve_reverse_kernel(kind):
    """Seed 000's kernel on 200 geometric levels 0.01..20: samples match its exact law; the law is within 0.12 of
    the data covariance (first order in the level spacing delta = log(2000)/199 = 0.038: the error halves when the
    levels double)."""
    oracle = _ve(kind)
    law = ve_reverse_law(oracle)
    x, g = _prior(oracle, _n(kind), 6)
    _assert_law(ve_reverse(oracle, x, noise=g), law.mu, law.V)
    e200 = law.error()[1]
    e400 = ve_reverse_law(_ve(kind, L=400)).error()[1]
    assert e200 < 0.12 and e400 < 0.6 * e200, (e200, e400)


@pytest.mark.parametrize("kind", ["2d", "fd"])
def test_ve_ancestral(kind):
    """x_{t-1} ~ q(x_{t-1} | x_t, x0_theta) on the same levels: exact law matched; law within 0.12 of the data."""
    oracle = _ve(kind)
    law = ve_ancestral_law(oracle)
    x, g = _prior(oracle, _n(kind), 7)
    _assert_law(ve_ancestral(oracle, x, noise=g), law.mu, law.V)
    assert law.error()[1] < 0.12


@pytest.mark.parametrize("kind", ["2d", "fd"])
def test_annealed_langevin(kind):
    """10 geometric levels 0.05..5, 40 steps each, step_lr = sigma_min^2 (eta_i = sigma_i^2): samples match the
    exact law of the Langevin chain; it converges only approximately -- the law's covariance is within 0.1 of
    Sigma (4% of its largest eigenvalue): the variance sigma_i^2 K added at high levels is shed only while the
    chain still mixes in each direction, plus the unadjusted-Langevin bias eta / (4 lambda), both shrinking with
    more steps per level (checked: 160 steps per level leave < 0.4 of the error)."""
    oracle = _ve(kind, L=10, smin=0.05, smax=5.0)
    lr = 0.05**2
    law = langevin_law(oracle, 40, lr)
    x, g = _prior(oracle, _n(kind), 8)
    x = annealed_langevin(oracle, x, n_steps_each=40, step_lr=lr, noise=g)
    _assert_law(x, law.mu, law.V)
    err = law.error()[1]
    assert err < 0.1 and langevin_law(oracle, 160, lr).error()[1] < 0.4 * err
    assert oracle.nfe == 10 * 40 + 1
    with pytest.raises(DiffusionLabError, match="needs a variance-exploding process"):
        annealed_langevin(_oracle("2d", VPChain(linear_betas(10))), x[:, :2].reshape(-1, 2))
