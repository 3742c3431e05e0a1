"""Exact conditionals of Gaussian mixtures, Gaussian conditioning of frame noise, and the conditional methods
checked against them (also under frame-correlated noise C)."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffusionlab.conditioning import CONDITIONAL_METHODS, Known, NoiseConditioner, get_method, parse_method
from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import make_covariance
from diffusionlab.oracles.bench import anisotropic_spec, ring_spec
from diffusionlab.oracles.conditional import condition_mixture
from diffusionlab.oracles.gaussian import dense_noise_covariance
from diffusionlab.oracles.mixture import GaussianMixtureOracle

F64 = torch.float64


def _aniso(dim=6, k=3, frames=None, process="vp", noise=None, seed=2):
    spec = anisotropic_spec(dim=dim, k=k, seed=seed, mean_scale=1.0, eig_range=(0.05, 1.0))
    if frames:
        spec["frames"] = frames
    return GaussianMixtureOracle.from_spec(spec, process, noise)


# ---- the exact conditional ------------------------------------------------------------------------------------
def test_conditional_mixture_against_the_joint_density():
    """log p(x_u | x_k) = log p(x) - log p(x_k) (the known coordinates' marginal from torch.distributions), and the
    reweighted components are Bayes' rule on that marginal; one mask per row."""
    o = _aniso()
    g = torch.Generator().manual_seed(0)
    x = o.sample_data(6, g)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    for i, ks in enumerate([[0], [0, 1], [2, 5], [0, 1, 2, 3], [5], [1, 3, 4]]):
        mask[i, ks] = True
    c = condition_mixture(o, x, mask)
    for i in range(6):
        k = torch.nonzero(mask[i]).reshape(-1)
        comp = torch.stack([torch.log(o.weights[j]) + MultivariateNormal(o.means[j, k], o.covs[j][k][:, k]).log_prob(x[i, k])
                            for j in range(o.num_components)])
        assert torch.allclose(c.weights()[i], torch.softmax(comp, 0), rtol=1e-10, atol=1e-12)
        want = o.log_prob(x[i:i + 1])[0] - torch.logsumexp(comp, 0)
        assert torch.allclose(c.log_prob(x)[i], want, rtol=1e-10, atol=1e-10)


def test_conditional_draws_have_the_conditional_moments():
    """One component: the draws' mean and covariance are m_u + S_uk S_kk^-1 (y - m_k) and S_uu - S_uk S_kk^-1 S_ku
    (n = 40000: 5 standard errors)."""
    o = _aniso(k=1)
    y = o.sample_data(1, torch.Generator().manual_seed(1))
    mask = torch.tensor([True, False, True, False, False, False])
    c = condition_mixture(o, y, mask)
    n = 40000
    d = c.sample(torch.Generator().manual_seed(2), reps=n)
    assert torch.equal(d[:, mask], y[:, mask].expand(n, 2))
    k, u = torch.nonzero(mask).reshape(-1), torch.nonzero(~mask).reshape(-1)
    S, m = o.covs[0], o.means[0]
    gain = S[u][:, k] @ torch.linalg.inv(S[k][:, k])
    mu = m[u] + gain @ (y[0, k] - m[k])
    cov = S[u][:, u] - gain @ S[k][:, u]
    du = d[:, u]
    se = (torch.diagonal(cov) / n).sqrt()
    assert bool(((du.mean(0) - mu).abs() < 5 * se).all())
    emp = torch.cov(du.T)
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov**2) / n).sqrt()
    assert bool(((emp - cov).abs() < 5 * se_cov).all())


def test_noisy_draws_correlate_known_and_unknown_noise_only_when_joint():
    """p(x_t | x_0,k = y): with C = mixed:1 over 3 frames the known frame's noise is correlated with the unknown
    frames' (covariance sigma^2 K_ku); drawing them independently loses it."""
    o = _aniso(dim=6, k=1, frames=3, noise="mixed:1.0")
    y = o.sample_data(1, torch.Generator().manual_seed(3))
    mask = torch.zeros(3, 2, dtype=torch.bool)
    mask[0] = True
    c = condition_mixture(o, y, mask)
    n, sigma = 40000, 0.7
    K = o.K
    k, u = torch.nonzero(mask.reshape(-1)).reshape(-1), torch.nonzero(~mask.reshape(-1)).reshape(-1)
    for joint in (True, False):
        d = c.sample_noisy(1.0, sigma, torch.Generator().manual_seed(4), reps=n, joint=joint).reshape(n, 6)
        cross = ((d[:, k] - d[:, k].mean(0)).T @ (d[:, u] - d[:, u].mean(0))) / (n - 1)
        want = sigma**2 * K[k][:, u] if joint else torch.zeros(2, 4, dtype=F64)
        # var of a product of two O(1) variables / n: se <= 2 / sqrt(n) here (variances below 2)
        assert bool(((cross - want).abs() < 5 * 2 / math.sqrt(n)).all()), (joint, cross, want)
    assert float(K[k][:, u].abs().max()) > 0.4  # the test means something: mixed:1 has correlation 0.5


# ---- Gaussian conditioning of the noise ----------------------------------------------------------------------
COVS = ["iid", "mixed:0.7", "progressive:1.0", "toeplitz:1,0.5,0.2"]


@pytest.mark.parametrize("spec", COVS)
@pytest.mark.parametrize("shape,axis", [((4, 2), 1), ((1, 4, 2, 3), 2)])
def test_noise_conditioner_against_dense_gaussian_conditioning(spec, shape, axis):
    cov = make_covariance(spec, 4, axis=axis)
    g = torch.Generator().manual_seed(5)
    b = 3
    mask = torch.rand(b, *shape, generator=g) < 0.4
    mask[0] = False
    mask[0].reshape(-1)[0] = True  # rows with different patterns, and fibres all known / none known
    mask[1].reshape(-1)[:] = True
    mask[1].reshape(-1)[-1] = False
    cond = NoiseConditioner(cov, mask)
    K = dense_noise_covariance(cov, shape)
    r = torch.randn(b, *shape, generator=g, dtype=F64)
    shift, quad = cond.shift(r), cond.quad(r)
    for i in range(b):
        m = mask[i].reshape(-1)
        k, u = torch.nonzero(m).reshape(-1), torch.nonzero(~m).reshape(-1)
        ri = r[i].reshape(-1)
        want = torch.zeros_like(ri)
        if k.numel() and u.numel():
            want[u] = K[u][:, k] @ torch.linalg.solve(K[k][:, k], ri[k])
        assert torch.allclose(shift[i].reshape(-1), want, rtol=1e-10, atol=1e-12)
        q = ri[k] @ torch.linalg.solve(K[k][:, k], ri[k]) if k.numel() else torch.zeros((), dtype=F64)
        assert torch.allclose(quad[i], q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", COVS[1:])
def test_matheron_update_has_the_conditional_covariance(spec):
    """``condition(e, a)`` is affine in ``e``: its covariance ``M K M^T`` (M read off the basis) is exactly
    ``K_uu - K_uk K_kk^-1 K_ku`` on the unknown entries, and its mean shift ``K_uk K_kk^-1 a_k``."""
    shape = (5, 2)
    cov = make_covariance(spec, 5, axis=1)
    mask = torch.zeros(1, *shape, dtype=torch.bool)
    mask[0, :2] = True
    mask[0, 4, 1] = True
    cond = NoiseConditioner(cov, mask)
    K = dense_noise_covariance(cov, shape)
    d = 10
    basis = torch.eye(d, dtype=F64).reshape(d, *shape)
    a = torch.randn(1, *shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    zero = cond.condition(torch.zeros(1, *shape, dtype=F64), a).reshape(-1)
    cols = torch.stack([(NoiseConditioner(cov, mask).condition(basis[j:j + 1], a).reshape(-1) - zero)
                        for j in range(d)], 1)  # M
    m = mask.reshape(-1)
    k, u = torch.nonzero(m).reshape(-1), torch.nonzero(~m).reshape(-1)
    got = (cols @ K @ cols.T)[u][:, u]
    want = K[u][:, u] - K[u][:, k] @ torch.linalg.solve(K[k][:, k], K[k][:, u])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(zero[u], K[u][:, k] @ torch.linalg.solve(K[k][:, k], a.reshape(-1)[k]), atol=1e-12)
    assert torch.equal(zero[k], a.reshape(-1)[k])


# ---- the methods ------------------------------------------------------------------------------------------------
def test_catalogue_metadata_and_options():
    assert sorted(CONDITIONAL_METHODS) == ["dps", "repaint", "replace", "smc"]
    spec, opts = parse_method("smc:particles=8,coupling=independent")
    assert opts == {"particles": 8, "coupling": "independent"}
    g = spec.grid(GaussianMixtureOracle.from_spec(ring_spec(), "vp").process, 50)
    assert spec.count(g, opts) == 400 and spec.steps_for_budget(400, None, spec.resolve(opts)) == 50
    assert get_method("repaint").count(g, {"resample": 3}) == 150
    assert "asymptotically exact" in spec.describe()
    with pytest.raises(DiffusionLabError, match="takes no option"):
        parse_method("replace:particles=3")
    with pytest.raises(DiffusionLabError, match="allowed: dps, repaint, replace, smc"):
        get_method("inpaint")


@pytest.mark.parametrize("name", sorted(CONDITIONAL_METHODS))
@pytest.mark.parametrize("process,noise,frames", [("vp", None, None), ("vp-sde", "progressive:1.0", 3),
                                                  ("ve", "mixed:0.5", 3)])
def test_methods_keep_the_known_part_exactly(name, process, noise, frames):
    o = _aniso(dim=6, k=2, frames=frames, process=process, noise=noise)
    x = o.sample_data(5, torch.Generator().manual_seed(7))
    mask = torch.zeros(o.sample_shape, dtype=torch.bool)
    mask.reshape(-1)[:2] = True
    opts = {"particles": 3} if name == "smc" else {"jump": 2, "resample": 2} if name == "repaint" else {}
    spec = get_method(name)
    o.nfe = 0
    with torch.no_grad():
        out = spec.run(o, x, mask, 8, noise=torch.Generator().manual_seed(8), **opts)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert torch.equal(out[:, mask], x[:, mask])
    assert not torch.allclose(out[:, ~mask], x[:, ~mask])
    assert o.nfe == spec.count(spec.grid(o.process, 8), opts) // (opts.get("particles", 1))  # one call per step


def _mode_stats(o, x, label_of):
    comp = o.component_of(x)
    return torch.bincount(label_of(comp), minlength=2).to(F64) / x.shape[0]


def test_smc_splits_the_modes_exactly_where_replace_does_not():
    """A 2-D mixture of two equal-weight components, one correlated and one narrow in x: given x = 0.45 the exact
    conditional puts 0.69 of the mass in the upper mode. SMC (16 twisted particles, 400 steps: its step bias,
    measured about 0.01 here, is below the binomial sd 0.019 of n = 600) matches it within 4.5 sd; the replacement
    method and RePaint follow the prior's 1:1 split (> 6 sd off)."""
    spec = {"weights": [0.5, 0.5], "means": [[0.0, 1.5], [0.0, -1.5]],
            "covs": [[[0.3, 0.25], [0.25, 0.3]], [[0.05, 0.0], [0.0, 0.3]]]}
    o = GaussianMixtureOracle.from_spec(spec, "vp")
    y = torch.tensor([[0.45, 0.0]], dtype=F64)
    mask = torch.tensor([True, False])
    p_up = float(condition_mixture(o, y, mask).weights()[0, 0])
    assert 0.65 < p_up < 0.75  # an asymmetric split the methods must get right
    n = 600
    sd = math.sqrt(p_up * (1 - p_up) / n)
    results = {}
    for name, opts, steps in (("smc", {"particles": 16}, 400), ("replace", {}, 100),
                              ("repaint", {"jump": 5, "resample": 4}, 50)):
        with torch.no_grad():
            x = get_method(name).run(o, y.expand(n, 2), mask, steps, noise=torch.Generator().manual_seed(9), **opts)
        results[name] = float((x[:, 1] > 0).to(F64).mean())
    assert abs(results["smc"] - p_up) < 4.5 * sd, results
    assert abs(results["replace"] - p_up) > 6 * sd, results
    assert abs(results["repaint"] - p_up) > 6 * sd, results


@pytest.mark.parametrize("noise", ["mixed:1.0", "progressive:1.0"])
def test_correlated_frames_need_the_joint_noise(noise):
    """ring8 on 2 frames of 1 coordinate, C correlated across the frames, the first frame known: the two modes of
    the second frame have exact weights 1/2 each. SMC with the jointly drawn noise splits them to binomial noise;
    substituting independently noised known frames does not (> 5 sd off; measured 7.3 and 8.8 sd)."""
    spec = ring_spec()
    spec["frames"] = 2
    o = GaussianMixtureOracle.from_spec(spec, "vp", noise)
    y = o.sample_data(1, torch.Generator().manual_seed(11))  # x = 1.46: the components at angles +-45 degrees
    mask = torch.tensor([[True], [False]])
    ex = condition_mixture(o, y, mask)
    w = ex.weights()[0]
    p_up = float(w[1])
    assert abs(p_up - 0.5) < 1e-5 and float(w[1] + w[7]) > 1 - 1e-5
    n = 600
    sd = math.sqrt(0.25 / n)
    frac = {}
    for coupling in ("joint", "independent"):
        with torch.no_grad():
            x = get_method("smc").run(o, y.expand(n, 2, 1), mask, 100, noise=torch.Generator().manual_seed(12),
                                      particles=8, coupling=coupling)
        frac[coupling] = float((x[:, 1, 0] > 0).to(F64).mean())
    assert abs(frac["joint"] - p_up) < 4.5 * sd, frac
    assert abs(frac["independent"] - p_up) > 5 * sd, frac


def test_smc_reaches_the_exact_conditional_in_6d_where_replace_fails():
    """A 6-D, 3-component anisotropic mixture, 3 coordinates known: the mean exact log-density log p(x_u | x_k = y)
    of the samples equals that of exact draws for SMC (5 standard errors; measured 0.3) and is far below it for
    replace (measured -8 standard errors)."""
    o = _aniso()
    y = o.sample_data(1, torch.Generator().manual_seed(13))
    mask = torch.tensor([True, True, True, False, False, False])
    n = 400
    ex = condition_mixture(o, y.expand(n, 6), mask)
    exact = ex.sample(torch.Generator().manual_seed(14))
    ref = ex.log_prob(exact)
    out = {}
    for name, opts in (("smc", {"particles": 16}), ("replace", {})):
        with torch.no_grad():
            x = get_method(name).run(o, y.expand(n, 6), mask, 100, noise=torch.Generator().manual_seed(15), **opts)
        lp = ex.log_prob(x)
        se = math.sqrt(float(lp.var()) / n + float(ref.var()) / n)
        out[name] = (float(lp.mean() - ref.mean()), se)
    assert abs(out["smc"][0]) < 5 * out["smc"][1], out
    assert out["replace"][0] < -6 * out["replace"][1], out


def test_known_values_are_checked():
    o = _aniso()
    x = o.sample_data(2, torch.Generator().manual_seed(0))
    spec = get_method("replace")
    with pytest.raises(DiffusionLabError, match="0 \\(unknown\\) and 1"):
        spec.run(o, x, torch.full((6,), 2), 5)
    with pytest.raises(DiffusionLabError, match="does not broadcast"):
        spec.run(o, x, torch.ones(3, dtype=torch.bool), 5)
    with pytest.raises(DiffusionLabError, match="finite"):
        spec.run(o, x * float("nan"), torch.ones(6, dtype=torch.bool), 5)
    with pytest.raises(DiffusionLabError, match="coupling"):
        spec.run(o, x, torch.ones(6, dtype=torch.bool), 5, coupling="both")
    assert isinstance(Known(x, torch.ones(6), o.process.cov).mask, torch.Tensor)


@pytest.mark.parametrize("name,opts", [("replace", {}), ("smc", {"particles": 4}), ("dps", {"scale": 0.2})])
def test_video_prediction_on_an_exact_gaussian_video_model(name, opts):
    """Videos (B, C, F, H, W) whose frames are strongly correlated (AR(1), rho = 0.95, across 4 frames of 2 x 2
    pixels), noise C = progressive:1 across the frames, the first 2 frames known: the predicted frames' mean over
    draws is the exact conditional mean Sigma_uk Sigma_kk^-1 y for SMC (Gaussian conditioning; 400 draws: 5 standard
    errors of the conditional sd); replace and DPS predict from the known frames too (their mean points the exact
    way: cosine > 0.95) but shrink towards the prior (measured up to 0.5 conditional sd off)."""
    from diffusionlab.oracles.gaussian import GaussianOracle
    from diffusionlab.processes import make_process

    f, shape = 4, (1, 4, 2, 2)
    rho = 0.95
    frames = torch.tensor([[rho ** abs(i - j) for j in range(f)] for i in range(f)], dtype=F64)
    sigma = torch.kron(frames, torch.eye(4, dtype=F64)) * 0.5  # (F x F) (x) (H W): flattened (C, F, H, W)
    process = make_process("vp", make_covariance("progressive:1.0", f, axis=2))
    o = GaussianOracle(torch.zeros(shape, dtype=F64), sigma, process)
    y = o.sample_data(1, torch.Generator().manual_seed(16))
    mask = torch.zeros(1, *shape, dtype=torch.bool)
    mask[:, :, :2] = True
    n = 400
    with torch.no_grad():
        x = get_method(name).run(o, y.expand(n, *shape), mask, 100, noise=torch.Generator().manual_seed(17), **opts)
    m = mask.reshape(-1)
    k, u = torch.nonzero(m).reshape(-1), torch.nonzero(~m).reshape(-1)
    gain = sigma[u][:, k] @ torch.linalg.inv(sigma[k][:, k])
    want = gain @ y.reshape(-1)[k]
    sd = torch.diagonal(sigma[u][:, u] - gain @ sigma[k][:, u]).sqrt()
    got = x.reshape(n, -1)[:, u].mean(0)
    assert torch.equal(x.reshape(n, -1)[:, k], y.reshape(-1)[k].expand(n, -1))
    if name == "smc":
        assert bool(((got - want).abs() < 5 / math.sqrt(n) * sd).all()), (got - want) / sd
    else:
        assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) > 0.95
