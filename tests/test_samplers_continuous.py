"""Continuous-time samplers with frame-correlated noise C, checked on Gaussian data with the exact score.

For Gaussian data ``x_0 ~ N(m, Sigma)`` the exact C-score is affine, ``C grad log p_t(x) = -K M_t^{-1}(x - s_t m)``
(``K = C (x) I`` dense, ``M_t = s_t^2 Sigma + sigma_t^2 K``), so every sampler here is an affine map plus Gaussian
noise and the law of its output is Gaussian with moments computable exactly. The tests recompute those moments
from the schemes' definitions with dense matrices (independent of the library's structured covariance code and
of the oracle), then check two things separately:

1. Monte Carlo: the sampler's output has the scheme's exact moments (sampling error only, ``Z = 4.5`` standard
   errors per whitened entry: mean ``1/sqrt(n)``, covariance diagonal ``sqrt(2/n)``, off-diagonal ``sqrt(1/n)``;
   27 entries for D = 6 give a family-wise false-alarm rate < 2e-4 per check);
2. Discretisation, deterministic: the scheme's exact moments are close to the target ``p_eps = N(s m, M_eps)``.

Injecting i.i.d. noise ``z`` instead of ``L z`` (``NoiseSource(Identity())``) must fail by a wide margin.
"""

import math

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import Identity, Progressive
from diffusionlab.oracles import GaussianOracle
from diffusionlab.processes import VPChain
from diffusionlab.processes.sde import SubVPSDE, VESDE, VPSDE
from diffusionlab.processes.base import bisect_decreasing
from diffusionlab.processes.grid import make_grid
from diffusionlab.samplers import euler_maruyama, ode_adaptive, ode_euler, ode_heun, reverse_diffusion_pc
from diffusionlab.samplers.langevin import langevin_corrector_step
from diffusionlab.samplers.noise import NoiseSource

F64 = torch.float64


def time_grid(process, steps, kind="uniform", eps=None):
    """The float64 times of an SDE grid (:func:`~diffusionlab.processes.grid.make_grid`)."""
    return make_grid(process, steps, kind, eps=eps).t


def logsnr(process, t):
    return process.logsnr(t)
Z = 4.5
SHAPE = (3, 2)  # F = 3 correlated frames, d = 2 entries each: D = 6
PROCESSES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}




def make_oracle(name, correlated=True, seed=1):
    cov, shape = (Progressive(1.0, SHAPE[0]), SHAPE) if correlated else (Identity(), (2,))
    proc = PROCESSES[name](cov=cov)
    return GaussianOracle.random(shape, proc, generator=torch.Generator().manual_seed(seed))


# ---- exact moments of the schemes (dense, from their definitions) ---------------------------------------------
def affine_cscore(orc, t):
    """``(P, q)`` with ``C grad log p_t(x) = P x + q`` for the oracle's Gaussian data."""
    s, sig = orc.process.coeffs(torch.tensor(t, dtype=F64))
    KMi = orc.K @ torch.linalg.inv(s**2 * orc.Sigma + sig**2 * orc.K)
    return -KMi, KMi @ (s * orc.mean_flat)


def sde_scheme_moments(orc, ts, kind="em", denoise=False):
    """Mean and covariance after Euler-Maruyama (``em``) or the exact-transition reverse-diffusion predictor
    (``pred``) from the prior ``N(0, prior_std^2 K)``."""
    p, D = orc.process, orc.dim
    eye = torch.eye(D, dtype=F64)
    mu, S = torch.zeros(D, dtype=F64), p.prior_std**2 * orc.K
    ts = ts.tolist()
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        P, q = affine_cscore(orc, t)
        if kind == "em":  # x - (f x - g2 C s) dt + sqrt(g2 dt) L z
            dt, f, g2 = t - tn, p.drift_coef(t).item(), p.diffusion_sq(t).item()
            A, b, Q = (1 - f * dt) * eye + g2 * dt * P, g2 * dt * q, g2 * dt * orc.K
        else:  # (2 - a) x + G2 C s + G L z, x_t = a x_t' + G L z exact
            (s, sg), (sn, sgn) = p.coeffs(torch.tensor(t, dtype=F64)), p.coeffs(torch.tensor(tn, dtype=F64))
            a = (s / sn).item()
            G2 = (sg**2 - a**2 * sgn**2).item()
            A, b, Q = (2 - a) * eye + G2 * P, G2 * q, G2 * orc.K
        mu, S = A @ mu + b, A @ S @ A.T + (0.0 if (denoise and i == len(ts) - 2) else Q)
    return mu, S


def ode_scheme_map(orc, ts, heun=False):
    """``(A, b)``: the Euler / Heun map of the probability-flow ODE, ``x_N = A x_0 + b``."""
    p, D = orc.process, orc.dim
    eye = torch.eye(D, dtype=F64)

    def velocity(t):  # f x - g2/2 C s = F x + c
        P, q = affine_cscore(orc, t)
        f, g2 = p.drift_coef(t).item(), p.diffusion_sq(t).item()
        return f * eye - 0.5 * g2 * P, -0.5 * g2 * q

    A, b = eye.clone(), torch.zeros(D, dtype=F64)
    ts = ts.tolist()
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        F1, c1 = velocity(ts[i])
        if heun:
            F2, c2 = velocity(ts[i + 1])
            Ai, bi = eye + h / 2 * (F1 + F2 @ (eye + h * F1)), h / 2 * (c1 + F2 @ (h * c1) + c2)
        else:
            Ai, bi = eye + h * F1, h * c1
        A, b = Ai @ A, Ai @ b + bi
    return A, b


def exact_ode_map(orc, ts):
    """The probability-flow ODE's exact map ``x_eps = A x_T + b`` (``dA/dt = F A``, ``db/dt = F b + c``),
    solved by scipy's DOP853 (an integrator independent of torchdiffeq) to rtol 1e-11."""
    from scipy.integrate import solve_ivp

    p, D = orc.process, orc.dim
    eye = torch.eye(D, dtype=F64)

    def rhs(t, y):
        P, q = affine_cscore(orc, t)
        f, g2 = p.drift_coef(t).item(), p.diffusion_sq(t).item()
        F, c = f * eye - 0.5 * g2 * P, -0.5 * g2 * q
        A, b = torch.from_numpy(y[: D * D]).reshape(D, D), torch.from_numpy(y[D * D:])
        return torch.cat([(F @ A).reshape(-1), F @ b + c]).numpy()

    y0 = torch.cat([eye.reshape(-1), torch.zeros(D, dtype=F64)]).numpy()
    sol = solve_ivp(rhs, (float(ts[0]), float(ts[-1])), y0, method="DOP853", rtol=1e-11, atol=1e-12)
    y = torch.from_numpy(sol.y[:, -1])
    return y[: D * D].reshape(D, D), y[D * D:]


def ode_scheme_moments(orc, ts, heun=False):
    A, b = ode_scheme_map(orc, ts, heun)
    return b, orc.process.prior_std**2 * A @ orc.K @ A.T


# ---- comparisons ----------------------------------------------------------------------------------------------
def whiten_pair(mu, S, mean, M):
    """Mean and covariance ``(mu, S)`` in the coordinates where ``N(mean, M)`` is standard."""
    L = torch.linalg.cholesky(M)
    w = torch.linalg.solve_triangular(L, (mu - mean)[:, None], upper=False)[:, 0]
    Sw = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, S, upper=False).T, upper=False)
    return w, Sw - torch.eye(len(mean), dtype=F64)


def sample_errors(x, mean, M):
    """Whitened sample mean and (sample covariance - I) of ``x`` against ``N(mean, M)``."""
    xf = x.reshape(x.shape[0], -1).to(F64)
    mu = xf.mean(0)
    S = torch.cov(xf.T)
    return whiten_pair(mu, S, mean, M)


def assert_moments(x, mean, M, extra=0.0):
    """``x`` has mean ``mean`` and covariance ``M`` within ``Z`` standard errors per whitened entry (+ ``extra``)."""
    n, D = x.shape[0], len(mean)
    w, E = sample_errors(x, mean, M)
    se = ((1.0 + torch.eye(D, dtype=F64)) / n).sqrt()  # sqrt(2/n) on the diagonal, sqrt(1/n) off it
    assert (w.abs() <= Z / math.sqrt(n) + extra).all(), f"whitened mean error {w.tolist()}"
    assert (E.abs() <= Z * se + extra).all(), f"whitened covariance error max {E.abs().max().item():.4f}"
    return E.abs().max().item()


def target(orc, ts):
    return orc.marginal_moments(float(ts[-1]))


def prior(orc, n, g):
    return orc.process.prior_sample((n, *orc.sample_shape), generator=g, dtype=F64)


# ---- grids ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("kind", ["uniform", "quadratic", "logsnr", "karras"])
def test_grids_shape_ends_and_spacing(name, kind):
    proc = PROCESSES[name]()
    ts = time_grid(proc, 20, kind)
    assert ts.dtype == F64 and ts.shape == (21,)
    assert ts[0] == proc.T and ts[-1] == proc.default_eps
    assert (ts[1:] < ts[:-1]).all()
    if kind == "uniform":
        torch.testing.assert_close(ts[:-1] - ts[1:], torch.full((20,), (1 - ts[-1].item()) / 20, dtype=F64))
    if kind == "logsnr":  # equal steps in log-SNR
        lam = logsnr(proc, ts)
        torch.testing.assert_close(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(20), rtol=1e-9, atol=1e-9)
    if kind == "karras":  # EDM: sigma_edm^(1/rho) = exp(-lam/2)^(1/7) equally spaced
        r = torch.exp(-0.5 * logsnr(proc, ts)) ** (1 / 7)
        torch.testing.assert_close(r[1:] - r[:-1], (r[1] - r[0]).expand(20), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("proc", [VPSDE(), VPSDE(0.1, 0.1), VESDE(0.01, 50.0), SubVPSDE(), SubVPSDE(0.5, 0.5)])
def test_logsnr_inverse(proc):
    """The closed-form inverses recover t from lambda(t), and agree with plain bisection on lambda."""
    t = torch.cat([torch.tensor([1e-5], dtype=F64), torch.linspace(1e-4, 1.0, 57, dtype=F64)])
    lam = logsnr(proc, t)
    torch.testing.assert_close(proc.time_at_logsnr(lam), t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bisect_decreasing(lambda u: logsnr(proc, u), lam, 0.0, 1.0), t, rtol=1e-9, atol=1e-12)


def test_grid_and_time_validation():
    with pytest.raises(DiffusionLabError, match="steps"):
        time_grid(VPSDE(), 0)
    with pytest.raises(DiffusionLabError, match="unknown time grid"):
        time_grid(VPSDE(), 10, "cosine")
    with pytest.raises(DiffusionLabError, match="eps"):
        time_grid(VPSDE(), 10, eps=1.5)
    with pytest.raises(DiffusionLabError, match="steps must be <= T = 2"):
        time_grid(VPChain([0.1, 0.2]), 10)
    chain_oracle = GaussianOracle.random((2,), VPChain([0.1, 0.2]), generator=torch.Generator().manual_seed(0))
    with pytest.raises(DiffusionLabError, match="continuous-time SDE"):
        euler_maruyama(chain_oracle, torch.zeros(3, 2, dtype=F64), 2)
    orc = make_oracle("vp")
    x = prior(orc, 4, None)
    with pytest.raises(DiffusionLabError, match="strictly decreasing"):
        euler_maruyama(orc, x, [1.0, 0.5, 0.7])
    with pytest.raises(DiffusionLabError, match="denoise"):
        euler_maruyama(orc, x, [1.0, 0.5], denoise="yes")
    with pytest.raises(DiffusionLabError, match="snr"):
        reverse_diffusion_pc(orc, x, [1.0, 0.5], snr=-1)
    with pytest.raises(DiffusionLabError, match="n_corrector"):
        reverse_diffusion_pc(orc, x, [1.0, 0.5], n_corrector=1.5)


# ---- reverse SDE ----------------------------------------------------------------------------------------------
N_SDE, STEPS_EM = 4000, 250
N_BAD = 1000  # the i.i.d.-noise failures are > 0.5 whitened, 10x the n = 1000 tolerance
DELTA_EM = 0.01  # deterministic whitened error of EM at 250 steps (measured: <= 0.006 for VP / sub-VP, 4e-4 VE)


@pytest.mark.parametrize("name,correlated", [("vp", True), ("subvp", True), ("ve", True), ("vp", False)])
def test_euler_maruyama_samples_data_gaussian(name, correlated):
    orc = make_oracle(name, correlated)
    g = torch.Generator().manual_seed(2)
    ts = time_grid(orc.process, STEPS_EM)
    mean, M = target(orc, ts)
    # 2. the scheme itself is close to p_eps (deterministic; the default denoise drops the last step's noise)
    mu_s, S_s = sde_scheme_moments(orc, ts, "em", denoise=True)
    w, E = whiten_pair(mu_s, S_s, mean, M)
    assert w.abs().max() < DELTA_EM and E.abs().max() < DELTA_EM
    # 1. the sampler realises the scheme: Monte Carlo error only
    orc.nfe = 0
    x = euler_maruyama(orc, prior(orc, N_SDE, g), ts, noise=NoiseSource(orc.process.cov, g))
    assert orc.nfe == STEPS_EM
    assert_moments(x, mu_s, S_s)
    if correlated:  # i.i.d. noise instead of L z: the covariance is far off
        x_bad = euler_maruyama(orc, prior(orc, N_BAD, g), ts, noise=NoiseSource(Identity(), g))
        _, E_bad = sample_errors(x_bad, mean, M)
        assert E_bad.abs().max() > 0.5


def test_euler_maruyama_denoise_options():
    """``denoise=False`` keeps the last noise; ``"tweedie"`` is then ``E[x_0 | x_eps]`` of that very draw."""
    orc = make_oracle("vp")
    ts = time_grid(orc.process, 20)
    x1 = prior(orc, 64, torch.Generator().manual_seed(3))
    a = euler_maruyama(orc, x1, ts, noise=NoiseSource(orc.process.cov, torch.Generator().manual_seed(4)), denoise=False)
    b = euler_maruyama(orc, x1, ts, noise=NoiseSource(orc.process.cov, torch.Generator().manual_seed(4)),
                       denoise="tweedie")
    torch.testing.assert_close(b, orc.x0(a, ts[-1]))
    c = euler_maruyama(orc, x1, ts, noise=NoiseSource(orc.process.cov, torch.Generator().manual_seed(4)), denoise=True)
    assert not torch.allclose(a, c)
    d = euler_maruyama(orc, x1, ts, noise=NoiseSource(orc.process.cov, torch.Generator().manual_seed(4)), denoise=True,
                       progress=True)
    torch.testing.assert_close(d, c, rtol=0, atol=0)  # the progress bar changes nothing


# ---- predictor-corrector --------------------------------------------------------------------------------------
STEPS_PC = 300


@pytest.mark.parametrize("name", list(PROCESSES))
def test_reverse_diffusion_predictor_realises_its_scheme(name):
    """``n_corrector=0``: the reverse-diffusion predictor alone (VP: DDPM's ancestral-like step, VE: NCSN's)."""
    orc = make_oracle(name)
    g = torch.Generator().manual_seed(5)
    ts = time_grid(orc.process, STEPS_EM)
    mu_s, S_s = sde_scheme_moments(orc, ts, "pred", denoise=False)
    mean, M = target(orc, ts)
    w, E = whiten_pair(mu_s, S_s, mean, M)
    assert w.abs().max() < 0.05 and E.abs().max() < 0.05  # first order: measured <= 0.035 at 250 steps
    x = reverse_diffusion_pc(orc, prior(orc, N_SDE, g), ts, noise=NoiseSource(orc.process.cov, g), n_corrector=0,
                             denoise=False)
    assert_moments(x, mu_s, S_s)


def ula_inflation(orc, t, snr, alpha=1.0):
    """Largest relative covariance inflation of the C-preconditioned unadjusted Langevin step on ``p_t``.

    In whitened coordinates (``K = L L^T``) the step is ``w <- w - e A (w - mu) + sqrt(2 e) z`` with
    ``A = (L^{-1} M_t L^{-T})^{-1}`` of eigenvalues ``1 / lam_i``; its stationary law has variances
    ``lam_i / (1 - e / (2 lam_i))``. ``e = 2 alpha snr^2 E||z||^2 / E||s||^2 = 2 alpha snr^2 D / sum(1 / lam)``.
    """
    s, sig = orc.process.coeffs(torch.tensor(t, dtype=F64))
    M = s**2 * orc.Sigma + sig**2 * orc.K
    LK = torch.linalg.cholesky(orc.K)
    Mw = torch.linalg.solve_triangular(LK, torch.linalg.solve_triangular(LK, M, upper=False).T, upper=False)
    lam = torch.linalg.eigvalsh(Mw)
    e = 2 * alpha * snr**2 * orc.dim / (1 / lam).sum()
    return (e / (2 * lam - e)).max().item()


def test_langevin_corrector_keeps_p_t_only_with_correlated_noise():
    """100 corrector steps started at exact draws of p_t stay at p_t up to ULA's step bias; with i.i.d. noise
    the chain drifts to a different law (stationary covariance S solving K M^-1 S + S M^-1 K = 2 I, not M)."""
    orc = make_oracle("vp")
    t, n, snr = 0.3, 4000, 0.16
    g = torch.Generator().manual_seed(6)
    mean, M = orc.marginal_moments(t)
    x0 = mean + torch.randn(n, orc.dim, generator=g, dtype=F64) @ torch.linalg.cholesky(M).T
    x0 = x0.reshape(n, *SHAPE)
    bias = 1.25 * ula_inflation(orc, t, snr)  # 25% slack: the batch-mean norms' ratio differs from the rms ratio
    for noise, ok in ((NoiseSource(orc.process.cov, g), True), (NoiseSource(Identity(), g), False)):
        x = x0
        for _ in range(100):
            x, _ = langevin_corrector_step(orc, x, t, noise, snr)
        if ok:
            assert_moments(x, mean, M, extra=bias)
        else:
            _, E = sample_errors(x, mean, M)
            assert E.abs().max() > 0.5


@pytest.mark.parametrize("name", list(PROCESSES))
def test_pc_sampler_samples_data_gaussian(name):
    """Full PC (1 corrector step, snr 0.16): within Monte Carlo error + the predictor's deterministic bias +
    ULA's inflation at the last corrector time; i.i.d. noise fails."""
    orc = make_oracle(name)
    g = torch.Generator().manual_seed(7)
    ts = time_grid(orc.process, STEPS_PC)
    mean, M = target(orc, ts)
    mu_s, S_s = sde_scheme_moments(orc, ts, "pred", denoise=True)
    w, E = whiten_pair(mu_s, S_s, mean, M)
    pred_bias = max(w.abs().max().item(), E.abs().max().item())
    allowance = pred_bias + 1.25 * ula_inflation(orc, float(ts[-2]), 0.16)
    orc.nfe = 0
    x = reverse_diffusion_pc(orc, prior(orc, N_SDE, g), ts, noise=NoiseSource(orc.process.cov, g))
    assert orc.nfe == 2 * STEPS_PC
    assert_moments(x, mean, M, extra=allowance)
    if name == "vp":
        x_bad = reverse_diffusion_pc(orc, prior(orc, N_BAD, g), ts, noise=NoiseSource(Identity(), g))
        _, E_bad = sample_errors(x_bad, mean, M)
        assert E_bad.abs().max() > 0.5


# ---- pathwise: the samplers are exactly their schemes -----------------------------------------------------------
class RecordingNoise(NoiseSource):
    """A noise source that keeps what it hands out, so a dense re-implementation can replay the same path."""

    def __init__(self, cov, generator):
        super().__init__(cov, generator)
        self.draws = []

    def __call__(self, like):
        n = super().__call__(like)
        self.draws.append(n.reshape(n.shape[0], -1).clone())
        return n


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("sampler", ["em", "pc"])
def test_sampler_paths_replayed_with_dense_matrices(name, sampler):
    """Same noise, same path: the library's samplers against the schemes written out with dense ``K``,
    ``P = -K M_t^-1`` (the exact C-score's linear part) and ``K^-1`` norms for the corrector's step size
    (``2 alpha (snr mean||L z||_{K^-1} / mean||C s||_{K^-1})^2``), to 1e-9."""
    orc = make_oracle(name)
    p, n_pts = orc.process, 16
    ts = time_grid(p, 30)
    x = prior(orc, n_pts, torch.Generator().manual_seed(11))
    noise = RecordingNoise(p.cov, torch.Generator().manual_seed(12))
    if sampler == "em":
        out = euler_maruyama(orc, x, ts, noise=noise, denoise=True)
    else:
        out = reverse_diffusion_pc(orc, x, ts, noise=noise, snr=0.2, n_corrector=2, denoise=True)
    Kinv = torch.linalg.inv(orc.K)
    y, draws = x.reshape(n_pts, -1).clone(), iter(noise.draws)
    host = ts.tolist()
    for i in range(len(host) - 1):
        t, tn = host[i], host[i + 1]
        last = i == len(host) - 2
        if sampler == "em":
            P, q = affine_cscore(orc, t)
            dt, f, g2 = t - tn, p.drift_coef(t).item(), p.diffusion_sq(t).item()
            y = y - (f * y - g2 * (y @ P.T + q)) * dt
            if not last:
                y = y + math.sqrt(g2 * dt) * next(draws)
            continue
        (s, sg), (sn, sgn) = p.coeffs(torch.tensor(t, dtype=F64)), p.coeffs(torch.tensor(tn, dtype=F64))
        a = (s / sn).item()
        G2 = (sg**2 - a**2 * sgn**2).item()
        P, q = affine_cscore(orc, t)
        for _ in range(2):  # corrector
            cs, z = y @ P.T + q, next(draws)
            norm = lambda v: torch.einsum("bi,ij,bj->b", v, Kinv, v).sqrt().mean()  # noqa: E731
            e = 2 * a**2 * (0.2 * norm(z) / norm(cs)) ** 2
            y = y + e * cs + torch.sqrt(2 * e) * z
        y = (2 - a) * y + G2 * (y @ P.T + q)  # predictor
        if not last:
            y = y + math.sqrt(G2) * next(draws)
    assert next(draws, None) is None  # every draw used, none missing
    torch.testing.assert_close(out.reshape(n_pts, -1), y, rtol=1e-9, atol=1e-9)


# ---- probability-flow ODE -------------------------------------------------------------------------------------
N_ODE = 1000
# (steps, grid, deterministic whitened bound): Euler is first order and slow on VE's uniform grid
ODE_CASES = {
    ("vp", "euler"): (500, "uniform", 0.01), ("subvp", "euler"): (500, "uniform", 0.01),
    ("ve", "euler"): (1000, "karras", 0.05),
    ("vp", "heun"): (100, "uniform", 0.01), ("subvp", "heun"): (100, "uniform", 0.01),
    ("ve", "heun"): (100, "karras", 0.01),
}


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fixed_step_ode_samplers_map_prior_to_data(name, method):
    orc = make_oracle(name)
    steps, kind, bound = ODE_CASES[(name, method)]
    ts = time_grid(orc.process, steps, kind)
    mean, M = target(orc, ts)
    mu_s, S_s = ode_scheme_moments(orc, ts, heun=method == "heun")
    w, E = whiten_pair(mu_s, S_s, mean, M)
    # the prior N(0, prior_std^2 K) differs from p_T (mean s_T m, covariance + s_T^2 Sigma); the ODE carries that
    # mismatch to eps: whitened ~3e-3 for VP, ~1e-2 for VE (|m| / sigma_max)
    assert w.abs().max() < 0.015 and E.abs().max() < bound
    x = prior(orc, N_ODE, torch.Generator().manual_seed(8))
    orc.nfe = 0
    y = (ode_euler if method == "euler" else ode_heun)(orc, x, ts)
    assert orc.nfe == steps * (1 if method == "euler" else 2)
    # deterministic map: the output is exactly A x + b
    A, b = ode_scheme_map(orc, ts, heun=method == "heun")
    torch.testing.assert_close(y.reshape(N_ODE, -1), x.reshape(N_ODE, -1) @ A.T + b, rtol=1e-9, atol=1e-9)
    assert_moments(y, mean, M, extra=max(bound, 0.015))


@pytest.mark.parametrize("name", list(PROCESSES))
def test_adaptive_ode_sampler(name):
    orc = make_oracle(name)
    proc = orc.process
    ts = time_grid(proc, 1)
    mean, M = target(orc, ts)
    x = prior(orc, N_ODE, torch.Generator().manual_seed(9))
    seen = []
    c_score = orc.c_score

    def spy(x_t, t):
        seen.append(float(torch.as_tensor(t).min()))
        return c_score(x_t, t)

    orc.c_score = spy
    orc.nfe = 0
    y = ode_adaptive(orc, x, ts, rtol=1e-7, atol=1e-7)
    nfe = orc.nfe
    assert nfe == len(seen) and 10 < nfe < 2000
    assert min(seen) >= ts[-1].item() * (1 - 1e-9)  # never evaluated past eps (VP has no sigma at t < 0)
    # against the exact ODE map, integrated independently (scipy's DOP853 on the affine flow, rtol 1e-11)
    A, b = exact_ode_map(orc, ts)
    err = (y.reshape(N_ODE, -1) - (x.reshape(N_ODE, -1) @ A.T + b)).abs().max().item()
    assert err < 2e-5, err  # global error of dopri5 at rtol = atol = 1e-7: measured 2.4e-6 (VP), 3e-7 (VE)
    assert_moments(y, mean, M, extra=0.015)


def test_ode_orders_heun_2_euler_1():
    """Coupled error at the end against a tight dopri5 reference from the same start: halving the step divides
    Heun's error by ~4 and Euler's by ~2 (VP, uniform grid, exact score)."""
    orc = make_oracle("vp")
    x = prior(orc, 64, torch.Generator().manual_seed(10))
    ref = ode_adaptive(orc, x, time_grid(orc.process, 1), rtol=1e-11, atol=1e-11)

    def err(fn, steps):
        return (fn(orc, x, time_grid(orc.process, steps)) - ref).abs().max().item()

    e_heun = [err(ode_heun, n) for n in (40, 80, 160)]
    e_euler = [err(ode_euler, n) for n in (40, 80, 160)]
    for e in (e_heun, e_euler):
        assert e[0] > e[1] > e[2]
    r_heun = [e_heun[i] / e_heun[i + 1] for i in range(2)]
    r_euler = [e_euler[i] / e_euler[i + 1] for i in range(2)]
    assert all(3.3 < r < 4.7 for r in r_heun), r_heun
    assert all(1.7 < r < 2.3 for r in r_euler), r_euler


def test_grid_forms_and_the_noise_channel():
    """A grid may be omitted (1000 uniform steps), an int, explicit times or a TimeGrid; a generator passed as
    ``noise`` seeds the default source N(0, C), exactly as that source would; the catalogue entry runs the same
    function with its default grid and steps."""
    from diffusionlab.samplers import get_sampler

    orc = make_oracle("vp")
    x = prior(orc, 8, torch.Generator().manual_seed(13))
    orc.nfe = 0
    ode_euler(orc, x)
    assert orc.nfe == 1000
    a = euler_maruyama(orc, x, 20, noise=torch.Generator().manual_seed(14))
    b = euler_maruyama(orc, x, time_grid(orc.process, 20), noise=torch.Generator().manual_seed(14))
    c = euler_maruyama(orc, x, make_grid(orc.process, 20), noise=NoiseSource(orc.process.cov,
                                                                           torch.Generator().manual_seed(14)))
    assert torch.equal(a, b) and torch.equal(a, c)  # the very same operations
    spec = get_sampler("euler_maruyama")
    d = spec.run(orc, x, 20, noise=torch.Generator().manual_seed(14))
    assert torch.equal(a, d)
    orc.nfe = 0
    y = ode_adaptive(orc, x)
    assert torch.isfinite(y).all() and orc.nfe > 0
