"""The maths a process owns (log-SNR and its inverse, the exact transition and posterior between any two times,
the training draw of t), checked against independent computations."""

import math

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Progressive
from diffusionlab.processes import SubVPSDE, VEChain, VESDE, VPChain, VPSDE
from diffusionlab.processes.sde import LinearSDE
from diffusionlab.schedules import cosine_betas, geometric_sigmas

F64 = torch.float64
SDES = [VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0), VESDE(0.01, 50.0)]


@pytest.mark.parametrize("proc", SDES, ids=["vp", "subvp", "ve"])
def test_inverse_logsnr_closed_forms_match_bisection(proc):
    """The closed forms of each SDE against the generic float64 bisection of the base class (the same answer to
    a few ulps of t; the bisection halves [0, 1] 100 times)."""
    t = torch.linspace(1e-3, 1.0, 41, dtype=F64)
    lam = proc.logsnr(t)
    generic = LinearSDE.time_at_logsnr(proc, lam)  # the base class's bisection on this process
    torch.testing.assert_close(proc.time_at_logsnr(lam), t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(generic, t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(proc.time_at_edm_sigma(proc.edm_sigma(t)), t, rtol=1e-12, atol=1e-14)


def test_chain_inverse_logsnr_is_the_nearest_step():
    chain = VPChain(cosine_betas(200))
    steps = torch.arange(1, 201)
    assert torch.equal(chain.time_at_logsnr(chain.logsnr(steps)), steps)
    lam = chain.logsnr(torch.tensor([10, 11], dtype=torch.long))
    mid_lo = 0.51 * lam[0] + 0.49 * lam[1]  # nearer step 10
    assert int(chain.time_at_logsnr(mid_lo)) == 10 and int(chain.time_at_logsnr(lam[1] + 1e-9)) == 11


@pytest.mark.parametrize("chain", [VPChain(cosine_betas(50)), VEChain(geometric_sigmas(30, 0.01, 5.0))],
                         ids=["vp", "ve"])
def test_posterior_between_consecutive_steps_is_the_chains_own(chain):
    """For consecutive steps the general posterior q(x_{t'} | x_t, x_0) is the chain's: A_t = a_t sigma_{t-1}^2 /
    sigma_t^2, B_t = s_{t-1} b_t^2 / sigma_t^2, V_t = b_t^2 sigma_{t-1}^2 / sigma_t^2 from its a_t, b_t."""
    t = torch.arange(1, chain.T + 1)
    A, B, V = chain.posterior_between(t, t - 1)
    s2 = chain.sigma**2
    A_ref = chain.a[1:] * s2[:-1] / s2[1:]
    B_ref = chain.mean_scale[:-1] * chain.b[1:] ** 2 / s2[1:]
    V_ref = chain.b[1:] ** 2 * s2[:-1] / s2[1:]
    for got, ref in ((A, A_ref), (B, B_ref), (V, V_ref)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)


def test_transition_composes_and_matches_monte_carlo():
    """x_t = a x_s + G z over two hops equals one hop (a multiplies, G^2 adds a^2-weighted), and the marginal of
    the hop from x_s ~ q(x_s | x_0) is q(x_t | x_0) (means and variances in closed form)."""
    proc = VPSDE(0.1, 20.0)
    t0, t1, t2 = torch.tensor(0.2, dtype=F64), torch.tensor(0.5, dtype=F64), torch.tensor(0.9, dtype=F64)
    a1, g1 = proc.transition(t1, t0)
    a2, g2 = proc.transition(t2, t1)
    a, g = proc.transition(t2, t0)
    torch.testing.assert_close(a, a1 * a2, rtol=1e-14, atol=0)
    torch.testing.assert_close(g, a2**2 * g1 + g2, rtol=1e-12, atol=0)
    s0, sig0 = proc.coeffs(t0)
    s2, sig2 = proc.coeffs(t2)
    torch.testing.assert_close(a * s0, s2, rtol=1e-14, atol=0)
    torch.testing.assert_close(a**2 * sig0**2 + g, sig2**2, rtol=1e-12, atol=0)


def test_posterior_between_any_two_times_by_gaussian_conditioning():
    """(A, B, V) against conditioning the joint Gaussian of (x_{t'}, x_t) given x_0 in closed form (scalar data)."""
    proc = SubVPSDE(0.1, 20.0)
    t, tp = torch.tensor(0.7, dtype=F64), torch.tensor(0.3, dtype=F64)
    A, B, V = proc.posterior_between(t, tp)
    s, sig = proc.coeffs(t)
    sp, sigp = proc.coeffs(tp)
    a, g2 = proc.transition(t, tp)
    cov_pt = a * sigp**2  # Cov(x_t', x_t | x_0)
    gain = cov_pt / sig**2
    torch.testing.assert_close(A, gain, rtol=1e-13, atol=0)
    torch.testing.assert_close(B, sp - gain * s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(V, sigp**2 - gain * cov_pt, rtol=1e-11, atol=1e-15)


def test_draw_t_ranges_and_devices():
    g = torch.Generator().manual_seed(0)
    tc = VPChain(cosine_betas(10)).draw_t(5000, g)
    assert tc.dtype == torch.long and int(tc.min()) == 1 and int(tc.max()) == 10
    ts = VESDE().draw_t(5000, g, t_min=0.25)
    assert ts.dtype == F64 and float(ts.min()) >= 0.25 and float(ts.max()) <= 1.0
    # uniform on [0.25, 1]: mean 0.625, sd 0.2165 / sqrt(5000) = 0.0031; 5 sd
    assert abs(float(ts.mean()) - 0.625) < 5 * 0.2165 / math.sqrt(5000)


def test_capabilities_and_refusals():
    chain, sde = VEChain(geometric_sigmas(5, 0.1, 1.0), cov=Progressive(1.0, 3, axis=1)), VPSDE()
    assert chain.discrete and chain.unit_scale and not chain.variance_preserving
    assert not sde.discrete and sde.variance_preserving and VESDE().unit_scale
    with pytest.raises(DiffusionLabError, match="continuous-time SDE"):
        chain.require_continuous("the thing")
    with pytest.raises(DiffusionLabError, match="discrete chain"):
        sde.require_discrete("the thing")
    with pytest.raises(DiffusionLabError, match="eps must lie"):
        sde.check_eps(1.5)
