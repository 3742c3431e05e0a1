"""Few-step solvers (EDM Euler/Heun, DPM-Solver++ 2M/3M, UniPC, DDIM) on exact Gaussian-mixture oracles:
orders of convergence against an independent adaptive reference (torchdiffeq dopri5 in t, rtol = atol = 1e-12),
the noise floor reached with many steps (sliced W2 and weight error), NFE counts, chains, churn with C, and, when
diffusers is installed, step-for-step agreement with its schedulers."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Mixed
from diffusionlab.oracles.bench import Problem, weight_error
from diffusionlab.oracles.mixture import GaussianMixtureOracle, make_process
from diffusionlab.processes import VESDE, VPSDE
from diffusionlab.processes.grid import make_grid
from diffusionlab.samplers import SAMPLERS, ddim, get_sampler, ode_adaptive
from diffusionlab.samplers.fewstep import dpmpp_2m, dpmpp_3m, edm_euler, edm_heun, phi_weights, unipc


def time_grid(process, steps, kind="uniform"):
    """The float64 times of an SDE grid."""
    return make_grid(process, steps, kind).t


def chain_timesteps(chain, steps, kind="uniform"):
    """The integer steps of a chain grid (the data point 0 left out)."""
    return torch.tensor(make_grid(chain, steps, kind).times[:-1], dtype=torch.long)

F64 = torch.float64


def _smooth_mixture(process, frames=False):
    """Three overlapping components (the asymptotic regime of the solvers starts at a few tens of steps)."""
    if frames:
        g = torch.Generator().manual_seed(0)
        means = torch.tensor([[1.0, 0, -1, 0.5, 0, 0], [-1, 1, 0, 0, 0.5, -0.5], [0, -1, 1, 1, 0, 0]], dtype=F64)
        a = torch.randn(3, 6, 6, generator=g, dtype=F64)
        covs = a @ a.transpose(1, 2) / 6 * 0.3 + 0.05 * torch.eye(6, dtype=F64)
        return GaussianMixtureOracle([0.5, 0.3, 0.2], means, covs, process, frames=3)
    means = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=F64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.1], [-0.1, 0.25]]], dtype=F64)
    return GaussianMixtureOracle([0.5, 0.3, 0.2], means, covs, process)


def test_phi_weights_are_the_integrals():
    """A_k = int_0^h e^{-(h-u)} (u/h)^k du by quadrature, on both sides of the series/closed-form switch."""
    for h in (1e-3, 0.05, 0.4999, 0.5001, 1.0, 3.0, 12.0):
        ref = [quad(lambda u, k=k: math.exp(-(h - u)) * (u / h) ** k, 0, h, epsabs=0, epsrel=1e-13)[0] for k in range(3)]
        np.testing.assert_allclose(phi_weights(h), ref, rtol=1e-11)
    assert phi_weights(math.inf) == (1.0, 1.0, 1.0)
    with pytest.raises(DiffusionLabError):
        phi_weights(0.0)


def test_3m_weights_integrate_a_quadratic_exactly():
    """The 3M update y' = e^{-h} y + A1 D0 + A2 D1 + A3 D2 (D1 = d1_0 + r0 d2, D2 = d2 from the last three denoised
    values) is exact for dy/dlambda = D(lambda) - y with quadratic D; the reference codes' weight (A3 / 2 on D2,
    i.e. phi_3 = phi_2 / h - 1/2) is not: its error is h^3 D'' / 12."""
    def step(weight):
        lam = [0.0, 0.3, 0.5, 0.8]  # lambda_{i-2}, lambda_{i-1}, lambda_i, lambda_{i+1}: uneven steps
        D = lambda l: 1.0 - 2.0 * l + 3.0 * l**2  # noqa: E731
        h, r0, r1 = lam[3] - lam[2], (lam[2] - lam[1]) / (lam[3] - lam[2]), (lam[1] - lam[0]) / (lam[3] - lam[2])
        m0, m1, m2 = D(lam[2]), D(lam[1]), D(lam[0])
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d2 = (d1_0 - d1_1) / (r0 + r1)
        a1, a2, a3 = phi_weights(h)
        y = math.exp(-h) * 0.7 + a1 * m0 + a2 * (d1_0 + r0 * d2) + weight(h, a2, a3) * d2
        exact = math.exp(-h) * 0.7 + quad(lambda u: math.exp(-(lam[3] - u)) * D(u), lam[2], lam[3], epsrel=1e-14)[0]
        return y - exact, h

    err, _ = step(lambda h, a2, a3: a3)
    assert abs(err) < 1e-14
    err_ref, h = step(lambda h, a2, a3: -(a2 / h - 0.5))  # dpm-solver / diffusers / k-diffusion
    # it misses (A3 / 2) D2 with D2 = h^2 D'' / 2 = 3 h^2 (D'' = 6): h^3 D'' / 12 to leading order
    assert err_ref == pytest.approx(-phi_weights(h)[2] / 2 * 3 * h**2, rel=1e-10)
    assert abs(err_ref) == pytest.approx(h**3 * 6.0 / 12.0, rel=0.1)


def _reference(oracle, x):
    return ode_adaptive(oracle, x, time_grid(oracle.process, 1), rtol=1e-12, atol=1e-12)


def _coupled(out, ref):
    return (out - ref).reshape(out.shape[0], -1).norm(dim=1).pow(2).mean().sqrt().item()


def _median_error(out, ref):
    return (out - ref).reshape(out.shape[0], -1).norm(dim=1).median().item()


ORDERS = [("euler", edm_euler, {}, 1.0), ("heun", edm_heun, {}, 2.0), ("dpmpp-2m", dpmpp_2m, {}, 2.0),
          ("dpmpp-3m", dpmpp_3m, {}, 3.0), ("unipc-2 (with corrector: 3)", unipc, {"order": 2}, 3.0)]


@pytest.mark.parametrize("process,frames", [(VPSDE(), False), (VESDE(), False),
                                            (VPSDE(cov=Mixed(1.0, 3, axis=1)), True)],
                         ids=["vp-sde", "ve-sde", "vp-sde-mixed-C-frames"])
def test_orders_of_convergence(process, frames):
    """Coupled error (median over 48 paths of the distance to the dopri5 reference from the same start) on log-SNR
    grids of 16, 32, 64, 128 steps: the log-log slope is the order within 0.35 (Euler 1, Heun 2, DPM-Solver++(2M)
    2, (3M) 3, UniPC-bh2 with its corrector 3). The median, not the RMS: a path that passes near the watershed
    between two components is so sensitive that it reaches the asymptotic regime only at ~500 Euler steps and would
    dominate an RMS. The reference's error (~1e-10) is far below the smallest error measured."""
    oracle = _smooth_mixture(process, frames)
    g = torch.Generator().manual_seed(0)
    x = process.prior_sample((48, *oracle.sample_shape), generator=g, dtype=F64)
    ref = _reference(oracle, x)
    steps = [16, 32, 64, 128]
    for name, fn, opts, order in ORDERS:
        errs = [_median_error(fn(oracle, x, time_grid(process, n, "logsnr"), **opts), ref) for n in steps]
        slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
        assert abs(slope - order) <= 0.35, (name, errs, slope)
    errs = [_median_error(unipc(oracle, x, time_grid(process, n, "logsnr"), order=3), ref) for n in steps]
    assert -np.polyfit(np.log(steps), np.log(errs), 1)[0] > 3.3  # UniPC-3 with corrector: order 4 asymptotically


def _floor_problem(oracle, num=2000, seed=3):
    return Problem(oracle, num=num, seed=seed, projections=128, repeats=10)


@pytest.mark.parametrize("name,fn,steps,opts", [
    ("euler", edm_euler, 200, {}), ("heun", edm_heun, 60, {}), ("dpmpp-2m", dpmpp_2m, 60, {}),
    ("dpmpp-3m", dpmpp_3m, 60, {}), ("unipc", unipc, 60, {}), ("ddim", ddim, 200, {}),
    ("heun-churn", edm_heun, 60, {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 10.0}),
])
def test_many_steps_reach_the_noise_floor(name, fn, steps, opts):
    """Started from exact draws of p_T, with many steps: the sliced W2 to fresh exact draws of p_{t_end} (2000
    samples, 128 directions) is within the floor's mean + 3 standard deviations (10 pairs of exact sets), and so
    is the weight error. A wrong drift, a missing C or a bad step would move it far above (see the control)."""
    proc = VPSDE(cov=Mixed(0.8, 2, axis=1))
    oracle = _smooth_mixture(proc)
    pb = _floor_problem(oracle)
    grid = time_grid(proc, steps, "logsnr")
    s0, sg0 = (float(v) for v in proc.coeffs(grid[0]))
    s1, sg1 = (float(v) for v in proc.coeffs(grid[-1]))
    x = s0 * pb.start(sg0 / s0)
    noise = {"noise": torch.Generator().manual_seed(1)} if get_sampler(name.split("-churn")[0]).takes_noise else {}
    out = fn(oracle, x, grid, **noise, **opts) / s1
    fl = pb.floors(sg1 / s1)
    assert pb.sliced_w2(out, sg1 / s1) <= fl["sw2_floor"] + 3 * fl["sw2_floor_std"]
    assert weight_error(oracle, out, sg1 / s1) <= fl["weight_floor"] + 3 * fl["weight_floor_std"]


def test_the_floor_test_can_fail():
    """Control for the test above: two Euler steps, or the right solver with i.i.d. churn noise of the wrong size,
    land far above the floor."""
    proc = VPSDE(cov=Mixed(0.8, 2, axis=1))
    oracle = _smooth_mixture(proc)
    pb = _floor_problem(oracle)
    grid = time_grid(proc, 2, "logsnr")
    s0, sg0 = (float(v) for v in proc.coeffs(grid[0]))
    s1, sg1 = (float(v) for v in proc.coeffs(grid[-1]))
    out = edm_euler(oracle, s0 * pb.start(sg0 / s0), grid) / s1
    fl = pb.floors(sg1 / s1)
    assert pb.sliced_w2(out, sg1 / s1) > fl["sw2_floor"] + 5 * fl["sw2_floor_std"]
    grid = time_grid(proc, 60, "logsnr")
    out = edm_heun(oracle, s0 * pb.start(sg0 / s0), grid, s_churn=30.0, s_noise=3.0,
                   noise=torch.Generator().manual_seed(1)) / s1
    assert pb.sliced_w2(out, sg1 / s1) > fl["sw2_floor"] + 5 * fl["sw2_floor_std"]


def test_chain_many_steps_reach_the_data():
    """On DDPM's chain (integer grid, last step to the data) the solvers land on the data distribution."""
    proc = make_process("vp")
    oracle = _smooth_mixture(proc)
    pb = _floor_problem(oracle)
    sT, sgT = float(proc.mean_scale[1000]), float(proc.sigma[1000])
    fl = pb.floors(0.0)
    for fn in (edm_heun, dpmpp_2m, dpmpp_3m, unipc):
        out = fn(oracle, sT * pb.start(sgT / sT), chain_timesteps(proc, 60, "logsnr"))
        assert pb.sliced_w2(out, 0.0) <= fl["sw2_floor"] + 3 * fl["sw2_floor_std"], fn.__name__


def test_ddim_is_dpm_solver_1_and_euler():
    """DDIM (eta = 0) = DPM-Solver++(1) = EDM Euler algebraically, on an SDE and on a chain (the same DDIM runs on
    both): EDM Euler without churn takes the very DDIM step, DPM-Solver++(1) is written in y = x / s."""
    from diffusionlab.samplers.fewstep import _multistep

    proc = VPSDE()
    oracle = _smooth_mixture(proc)
    x = proc.prior_sample((16, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    for p, orc in ((proc, oracle), (make_process("vp"), _smooth_mixture(make_process("vp")))):
        grid = make_grid(p, 12, "karras")
        a = ddim(orc, x, grid)
        assert torch.equal(edm_euler(orc, x, grid), a)  # the same operations
        torch.testing.assert_close(_multistep(orc, x, grid, False, 1), a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("process_name", ["vp-sde", "ve-sde", "vp", "ve"])
def test_nfe_counts_and_registry(process_name):
    proc = make_process(process_name)
    oracle = _smooth_mixture(proc)
    chain = process_name in ("vp", "ve")
    x = proc.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    for name in ("euler", "heun", "dpmpp-2m", "dpmpp-3m", "unipc", "ddim"):
        spec = get_sampler(name)
        assert SAMPLERS[name] is spec
        for steps in (1, 2, 7):
            oracle.nfe = 0
            grid = make_grid(proc, steps, "logsnr")
            out = spec.run(oracle, x, grid)
            assert torch.isfinite(out).all()
            expected = 2 * steps - (1 if chain else 0) if name == "heun" else steps
            assert oracle.nfe == spec.count(grid) == expected, (name, steps)


@pytest.mark.parametrize("kind", ["uniform", "quadratic", "logsnr", "karras"])
def test_chain_timesteps(kind):
    chain = make_process("vp")
    for steps in (1, 2, 5, 20, 200, 1000):
        ts = chain_timesteps(chain, steps, kind)
        assert ts.numel() == steps and int(ts[0]) == 1000 and int(ts[-1]) >= 1
        assert bool((ts[1:] < ts[:-1]).all())
    if kind == "logsnr":  # nearly uniform in log sig where the chain's steps are dense enough
        ts = chain_timesteps(chain, 10, kind)
        ls = torch.log(chain.sigma[ts] / chain.mean_scale[ts])
        gaps = ls[:-1] - ls[1:]
        assert float(gaps.max() / gaps.min()) < 1.3
    with pytest.raises(DiffusionLabError):
        chain_timesteps(chain, 1001, kind)


def test_bad_options():
    proc = make_process("vp")
    oracle = _smooth_mixture(proc)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(DiffusionLabError, match="churn"):
        edm_heun(oracle, x, 5, s_churn=1.0)
    with pytest.raises(DiffusionLabError, match="s_noise must be a number >= 0"):
        get_sampler("heun").run(oracle, x, 5, s_noise=-1)
    with pytest.raises(DiffusionLabError, match="order"):
        unipc(oracle, x, 5, order=4)
    with pytest.raises(DiffusionLabError, match="order must be an integer in"):
        get_sampler("unipc").run(oracle, x, 5, order=4)
    with pytest.raises(DiffusionLabError, match="solver_type"):
        dpmpp_2m(oracle, x, 5, solver_type="rk4")
    with pytest.raises(DiffusionLabError, match="takes no option eta; its options: lower_order_final, solver_type"):
        get_sampler("dpmpp-2m").run(oracle, x, 5, eta=0.5)


@pytest.mark.parametrize("name", ["unipc", "dpmpp-2m"])
def test_step_for_step_agreement_with_diffusers(name):
    """On DDPM's chain with diffusers' "trailing" timesteps (last step to the data), our UniPC-bh2 and DPM-Solver++
    2M equal diffusers' UniPCMultistepScheduler and DPMSolverMultistepScheduler (float32 inside diffusers: 1e-4).
    Skipped without diffusers (the optional bench extra)."""
    diffusers = pytest.importorskip("diffusers")
    chain = make_process("vp")
    oracle = _smooth_mixture(chain)
    x = chain.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    steps = 12
    if name == "unipc":
        sched = diffusers.UniPCMultistepScheduler(timestep_spacing="trailing")
        ours = lambda ts: unipc(oracle, x, ts)  # noqa: E731
    else:
        sched = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing", solver_order=2)
        ours = lambda ts: dpmpp_2m(oracle, x, ts)  # noqa: E731
    sched.set_timesteps(steps)
    ts = sched.timesteps.long() + 1  # diffusers' index t is our step t + 1
    sample = x.clone()
    for t in sched.timesteps:
        eps = oracle.predict(sample, int(t) + 1).eps
        sample = sched.step(eps, t, sample).prev_sample.to(F64)
    err = _coupled(ours(ts), sample)
    assert err < 1e-4, err
    assert _coupled(sample, x) > 0.3  # and the comparison is not vacuous (the samples moved)


def test_float32_through_sample_in_chunks():
    """The catalogue's common call (training.sampling.generate: a number of steps, generator, float32 prior draws) works
    for every few-step solver on a chain and an SDE; a float32 run stays within float32 rounding (the scaled state
    y = x / s reaches ~150) of the float64 run from the same start."""
    from diffusionlab.samplers import sample_in_chunks

    for proc_name in ("vp", "vp-sde"):
        proc = make_process(proc_name)
        oracle = _smooth_mixture(proc)
        x = proc.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
        for name in ("euler", "heun", "dpmpp-2m", "dpmpp-3m", "unipc"):
            out = sample_in_chunks(name, oracle, (2,), 64, chunk=32, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float32, grid=12)
            assert out.dtype == torch.float32 and out.shape == (64, 2) and torch.isfinite(out).all()
            spec = get_sampler(name)
            out32, out64 = spec.run(oracle, x.float(), 12), spec.run(oracle, x, 12)
            assert out32.dtype == torch.float32
            torch.testing.assert_close(out32.double(), out64, rtol=0, atol=2e-4)
