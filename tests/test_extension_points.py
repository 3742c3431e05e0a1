"""Each row of docs/architecture.md's "to add a ... touch these files" table, done here with a toy: a process, a
covariance family, a dataset and a network, each one definition plus its registration, then used by a whole run
(config resolution, training, sampling) without touching the package. (The sampler row: test_sampler_contract.py.)"""

import math

import pytest
import torch
from torch import nn

from diffusionlab.cli import main
from diffusionlab.data import DATASETS, ArrayDataset, load_dataset
from diffusionlab.models import NETWORKS, build_network
from diffusionlab.noise import COVARIANCES, Dense, make_covariance
from diffusionlab.processes import PROCESSES, make_process
from diffusionlab.processes.sde import LinearSDE
from diffusionlab.training.config import resolve

F64 = torch.float64


# ---- a process: the "sigma = t" variance-exploding SDE (Karras et al. 2022's choice, sigma(t) = t) --------------
class SigmaIsT(LinearSDE):
    """``dX = sqrt(2 t) sigma_max L dW`` on ``[0, 1]``: ``s = 1``, ``sigma(t) = sigma_max t``."""

    unit_scale = True
    default_eps = 1e-3

    def __init__(self, sigma_max: float = 20.0, cov=None):
        super().__init__(cov)
        self.sigma_max = float(sigma_max)
        self.prior_std = self.sigma_max

    def _params(self):
        return f"sigma_max={self.sigma_max}"

    def drift_coef(self, t):
        return torch.zeros_like(torch.as_tensor(t, dtype=F64))

    def diffusion_sq(self, t):
        return 2.0 * self.sigma_max**2 * torch.as_tensor(t, dtype=F64)

    def coeffs(self, t):
        sig = self.sigma_max * torch.as_tensor(t, dtype=F64)
        return torch.ones_like(sig), sig


def _sigma_is_t(sigma_max: float = 20.0, cov=None):
    """The sigma = t VE-SDE (a test's toy).

    Args:
        sigma_max: sigma(1)
    """
    return SigmaIsT(sigma_max, cov)


# ---- a covariance family: exponential correlation exp(-|i - j| / ell) --------------------------------------------
def _exponential(ell: float, size=None, axis: int = 1):
    """exp(-|i - j| / ell) over the frames (a test's toy)."""
    i = torch.arange(size, dtype=F64)
    return Dense(torch.exp(-(i[:, None] - i[None, :]).abs() / ell), axis=axis, name=f"Exp({ell})")


# ---- a dataset: points on a line segment ------------------------------------------------------------------------
def _segment(num: int = 512, length: float = 2.0, seed: int = 0) -> ArrayDataset:
    """Points uniform on a segment of the x axis (a test's toy)."""
    u = torch.rand(num, generator=torch.Generator().manual_seed(seed)) - 0.5
    return ArrayDataset(torch.stack([length * u, torch.zeros(num)], 1), "points", "segment")


# ---- a network: a two-layer perceptron conditioned by concatenation ---------------------------------------------
class ConcatMLP(nn.Module):
    """``net(x, c_noise)``: an MLP on ``[x, c_noise / 1000]`` (a test's toy)."""

    def __init__(self, dim: int = 2, hidden: int = 32, out_mult: int = 1):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, out_mult * dim))

    def forward(self, x, c_noise):
        return self.f(torch.cat([x, (c_noise / 1000.0)[:, None].to(x.dtype)], 1))


@pytest.fixture(scope="module", autouse=True)
def registered():
    PROCESSES.register("sigma-is-t", context=("cov",))(_sigma_is_t)
    COVARIANCES.register("exp", context=("size", "axis"), parse=lambda arg: {"ell": float(arg)}, spec="exp:ELL")(
        _exponential)
    DATASETS.register("segment", context=("seed",), kind="points")(_segment)
    NETWORKS.register("concat-mlp", context=("sample_shape", "out_mult"), options_of=ConcatMLP,
                      inferred=("dim", "out_mult"))(lambda sample_shape, out_mult, **o: ConcatMLP(sample_shape[0],
                                                                                                 out_mult=out_mult, **o))
    yield
    PROCESSES.unregister("sigma-is-t")
    COVARIANCES.unregister("exp")
    DATASETS.unregister("segment")
    NETWORKS.unregister("concat-mlp")


def test_each_toy_is_found_through_its_catalogue():
    proc = make_process("sigma-is-t", sigma_max=5.0)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    torch.testing.assert_close(proc.time_at_logsnr(proc.logsnr(t)), t, rtol=1e-10, atol=1e-12)  # generic inverse
    cov = make_covariance("exp:2.0", 4, 1)
    torch.testing.assert_close(cov.matrix()[0, 1], torch.tensor(math.exp(-0.5), dtype=F64), rtol=1e-12, atol=0)
    assert len(load_dataset({"name": "segment", "num": 7})) == 7
    assert build_network({"name": "concat-mlp", "hidden": 8}, (2,), out_mult=2)(torch.zeros(3, 2),
                                                                                 torch.zeros(3)).shape == (3, 4)
    cfg = resolve({"data": {"name": "segment"}, "process": {"name": "sigma-is-t", "noise": "exp:1.5",
                                                            "noise_axis": 1},
                   "model": {"name": "concat-mlp"}})
    assert cfg["process"] == {"name": "sigma-is-t", "sigma_max": 20.0, "noise": "exp:1.5", "noise_axis": 1}
    assert cfg["model"] == {"name": "concat-mlp", "hidden": 32}
    with pytest.raises(Exception, match="unknown option"):
        resolve({"model": {"name": "concat-mlp", "width": 3}})


def test_the_toys_train_and_sample_through_the_cli(tmp_path, capsys):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(
        "data: {name: segment, num: 256}\n"
        "process: {name: sigma-is-t, sigma_max: 3.0, noise: 'exp:1.5', noise_axis: 1}\n"
        "model: {name: concat-mlp, hidden: 16}\n"
        "objective: {name: dsm}\n"
        "train: {steps: 3, batch_size: 32, warmup: 1, threads: 1, log_every: 1}\n"
        "sample: {sampler: heun, steps: 4}\n")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--quiet"]) == 0
    for sampler in ("heun", "euler-maruyama", "ddim", "ve-reverse"):
        assert main(["sample", "--run", str(run), "--sampler", sampler, "--steps", "5", "--num", "16",
                     "--out", str(tmp_path / f"{sampler}.npy"), "--quiet"]) == 0, sampler
    assert '"sampler": "ve-reverse"' in capsys.readouterr().out
