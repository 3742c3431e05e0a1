"""The few-step solvers' default grids on a trained-like model: at 10 steps each is at least as good as DDIM.

On a trained eps-prediction network a data-prediction solver started where sigma_T / s_T = 2e4 (the cosine chain's
last step) multiplies the network's eps error by 2e4: the old defaults (quadratic / karras grids from t = T) gave
FD 27 on the digits run, where DDIM with its x0 clipping gave 2.5. The model here is the exact Gaussian oracle
plus a calibrated eps error (tests/nets.py: TrainedLikeOracle, RMS 0.02 as measured on the digits U-Net), on the
same cosine chain; quality is the exact Frechet distance of 10000 samples to the data Gaussian, averaged over three
draws of the error (as the digits criterion averages three seeds)."""

import pytest
import torch

from diffusionlab.oracles.gaussian import GaussianOracle
from diffusionlab.processes import make_process
from diffusionlab.processes.grid import make_grid
from diffusionlab.samplers import parse_sampler, sample_in_chunks
from nets import TrainedLikeOracle

F64 = torch.float64
SOLVERS = ("euler", "heun", "dpmpp-2m", "dpmpp-3m", "unipc")


def _sqrtm(a):
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_to_gaussian(x, m, S) -> float:
    """Exact Frechet distance between the samples' Gaussian fit and N(m, S)."""
    x = x.reshape(x.shape[0], -1).to(F64)
    mu, c = x.mean(0), torch.cov(x.T)
    r = _sqrtm(c)
    return float((mu - m).square().sum() + torch.trace(c + S - 2 * _sqrtm(r @ S @ r)))


@pytest.fixture(scope="module")
def setting():
    process = make_process("vp", schedule="cosine")
    g = torch.Generator().manual_seed(0)
    d = 8
    m = 0.2 * torch.randn(d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64)
    S = 0.08 * a @ a.T / d + 0.02 * torch.eye(d, dtype=F64)  # data within [-1, 1] (DDIM's clip is harmless)
    oracle = GaussianOracle(m, S, process)
    models = [TrainedLikeOracle(oracle, scale=0.02, seed=k) for k in range(3)]

    def fd(name, grid=10):
        spec, opts = parse_sampler(name)
        vals = [frechet_to_gaussian(sample_in_chunks(spec, model, (d,), 10000, generator=torch.Generator().manual_seed(1),
                                                     dtype=F64, grid=grid, **opts), m, S) for model in models]
        return sum(vals) / len(vals)

    fd.process = process
    return fd


def test_every_few_step_solver_at_its_default_grid_is_as_good_as_ddim(setting):
    """DDIM as the digits run samples (uniform grid from T, clip_x0) against each solver with nothing but its name
    and 10 steps. Measured (mean over the three error draws): DDIM 0.058; euler 0.031, heun 0.046, dpmpp-2m 0.011,
    dpmpp-3m 0.012, unipc 0.022. The FD of 10000 exact samples is ~3e-4, far below the gaps."""
    ddim = setting("ddim:clip_x0=true")
    for name in SOLVERS:
        assert setting(name) <= ddim, name


def test_the_old_defaults_fail_on_the_same_model(setting):
    """The test's power: the grids the solvers had before (from t = T) are catastrophically worse here, as on the
    digits run (FD ~27 against DDIM's 2.5)."""
    ddim = setting("ddim:clip_x0=true")
    old = {"dpmpp-2m": "quadratic", "unipc": "quadratic", "heun": "karras"}  # started at t = T
    for name, kind in old.items():
        assert setting(name, make_grid(setting.process, 10, kind)) > 100 * ddim, name
