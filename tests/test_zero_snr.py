"""Zero terminal SNR (Lin et al. 2024, Algorithm 1): the rescaled schedule, the chain, refusals, and sampling on it."""

import math

import numpy as np
import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.objectives import make_objective
from diffusionlab.oracles.gaussian import GaussianOracle
from diffusionlab.parametrization import DiffusionModel
from diffusionlab.processes import make_process
from diffusionlab.processes.grid import make_grid
from diffusionlab.samplers import get_sampler, sample_in_chunks
from diffusionlab.schedules import cosine_betas, linear_betas, rescale_zero_terminal_snr
from diffusionlab.training.config import resolve

F64 = torch.float64


@pytest.mark.parametrize("betas", [linear_betas(1000), cosine_betas(1000), linear_betas(10, 0.05, 0.4)])
def test_rescale_matches_algorithm_1_in_numpy(betas):
    """Against Lin et al.'s Algorithm 1 written out in NumPy: sqrt(alpha-bar) shifted to 0 at T and scaled back to
    its value at t = 1; the betas read back from the ratios; the last beta is 1."""
    b = betas.numpy()
    ab_sqrt = np.sqrt(np.cumprod(1.0 - b))
    a0, aT = ab_sqrt[0], ab_sqrt[-1]
    ab_sqrt = (ab_sqrt - aT) * a0 / (a0 - aT)
    ab = ab_sqrt**2
    ref = 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    out = rescale_zero_terminal_snr(betas).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-15)  # cumprod vs exp(cumsum(log1p)): a few ulps x T
    assert out[-1] == 1.0 and out[0] == pytest.approx(b[0], rel=1e-12)


def test_the_chain_is_pure_noise_at_T_and_unchanged_at_1():
    plain = make_process("vp", schedule="cosine")
    zero = make_process("vp", schedule="cosine", zero_terminal_snr=True)
    assert zero.zero_terminal_snr and not plain.zero_terminal_snr
    s, sigma = zero.coeffs(torch.tensor([1, zero.T]))
    assert float(s[1]) == 0.0 and float(sigma[1]) == 1.0
    assert float(s[0]) == pytest.approx(float(plain.coeffs(torch.tensor(1))[0]), rel=1e-12)
    assert float(zero.prior_kl(torch.randn(3, 2, dtype=F64)).abs().max()) < 1e-12  # q(x_T | x_0) is the prior
    cfg = resolve({"process": {"name": "vp", "zero_terminal_snr": True}, "parametrization": {"prediction": "v"}})
    assert cfg["process"]["zero_terminal_snr"] is True


def test_eps_prediction_is_refused_and_v_trains_at_T():
    zero = make_process("vp", schedule="cosine", zero_terminal_snr=True)
    for pred in ("eps", "score", "edm"):
        with pytest.raises(DiffusionLabError, match="zero-terminal-SNR chain.*use prediction v or x0"):
            DiffusionModel(None, zero, prediction=pred)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3).to(F64)
    model = DiffusionModel(lambda x, c: net(x), zero, prediction="v")
    loss = make_objective("simple", zero)(model, torch.randn(4, 3, dtype=F64), t=torch.full((4,), zero.T))
    assert bool(torch.isfinite(loss).all())


def _oracle():
    zero = make_process("vp", T=200, schedule="cosine", zero_terminal_snr=True)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    return GaussianOracle(0.5 * torch.randn(3, generator=g, dtype=F64), a @ a.T / 3 + 0.1 * torch.eye(3, dtype=F64),
                          zero, prediction="v")


@pytest.mark.parametrize("name,grid", [("ddim", 200), ("ddpm", None), ("dpmpp-2m", 30), ("unipc", 30)])
def test_samplers_from_pure_noise_reach_the_data(name, grid):
    """From x_T ~ N(0, I) (exact at zero terminal SNR) DDIM and DDPM start at T itself; the y = x / s solvers
    start on their default grid ('edm', below T). Sample moments match the data's within 5 standard errors
    (4000 samples; the solvers' discretisation error at these step counts is far smaller)."""
    oracle = _oracle()
    spec = get_sampler(name)
    g = spec.grid(oracle.process, grid)
    assert (g.times[0] == oracle.process.T) == (name in ("ddim", "ddpm"))
    n = 4000
    x = sample_in_chunks(spec, oracle, (3,), n, generator=torch.Generator().manual_seed(1), dtype=F64, grid=g)
    assert bool(torch.isfinite(x).all())
    var = torch.diagonal(oracle.Sigma)
    se = (var / n).sqrt()
    assert bool(((x.mean(0) - oracle.mean_flat).abs() < 5 * se).all())
    # and the variances (Gaussian data: a sample variance's se is var sqrt(2 / n); measured within 2 se)
    assert bool(((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()), (x.var(0), var)


def test_solvers_in_y_refuse_a_start_at_zero_snr_and_grids_skip_the_infinite_level():
    oracle = _oracle()
    with pytest.raises(DiffusionLabError, match="cannot start at t = 200, where s = 0"):
        get_sampler("dpmpp-2m").run(oracle, torch.randn(2, 3, dtype=F64), make_grid(oracle.process, 10, "uniform"))
    for kind in ("logsnr", "karras"):
        g = make_grid(oracle.process, 10, kind)
        assert g.times[0] == oracle.process.T - 1 and all(np.isfinite(g.sig))
