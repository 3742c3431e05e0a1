"""Grids fitted to a model (diffusionlab.samplers.fitgrid): the reference solve, never worse than the start, the CLI."""

import json

import numpy as np
import pytest
import torch

from diffusionlab.cli import main
from diffusionlab.errors import DiffusionLabError
from diffusionlab.oracles.gaussian import GaussianOracle
from diffusionlab.processes import make_process
from diffusionlab.samplers import get_sampler
from diffusionlab.samplers.fitgrid import coupled_error, fit_grid, reference_solve
from nets import TrainedLikeOracle

F64 = torch.float64


def _gaussian(process, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = 0.2 * torch.randn(d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return GaussianOracle(m, 0.08 * a @ a.T / d + 0.02 * torch.eye(d, dtype=F64), process)


def _sqrtm(a):
    w, v = torch.linalg.eigh(a)
    return (v * w.sqrt()) @ v.T


def test_reference_solve_is_the_exact_gaussian_flow():
    """For Gaussian data and C = I the probability-flow ODE is linear: y(sig) - m = M(sig)^(1/2) M(sig_0)^(-1/2)
    (y_0 - m), M = Sigma + sig^2 I. The reference solve (UniPC-3, 200 log-SNR steps) reproduces it on the VP-SDE
    to 1e-5 (data of scale 0.3; measured 1.4e-6), and its own error estimate (the distance to the 100-step
    solve: about (2^p - 1) times the error of an order-p method) bounds the true error."""
    process = make_process("vp-sde")
    oracle = _gaussian(process)
    start = get_sampler("dpmpp-2m").grid(process, 10)
    x = start.start_sample((256, *oracle.sample_shape), torch.Generator().manual_seed(1), "cpu", F64)
    ref, est = reference_solve(oracle, x, start, 200)
    y0, y1 = x / start.s[0], ref / start.s[-1]
    eye = torch.eye(oracle.dim, dtype=F64)
    m0, m1 = oracle.Sigma + start.sig[0] ** 2 * eye, oracle.Sigma + start.sig[-1] ** 2 * eye
    exact = oracle.mean_flat + (y0 - oracle.mean_flat) @ torch.linalg.solve(_sqrtm(m0), _sqrtm(m1))
    err = coupled_error(y1, exact)
    assert err < 1e-5 and err <= est < 1e-3, (err, est)


CASES = [("vp", {"schedule": "cosine"}, "dpmpp-2m", 5), ("vp", {"schedule": "cosine"}, "unipc", 8),
         ("vp", {"schedule": "cosine"}, "euler", 5), ("vp-sde", {}, "dpmpp-2m", 5), ("ve-sde", {}, "dpmpp-3m", 6)]


@pytest.mark.parametrize("name,opts,sampler,steps", CASES)
def test_fitted_grid_never_does_worse_than_its_start(name, opts, sampler, steps):
    """On a trained-like model (the oracle plus a calibrated eps error, tests/nets.py) the fitted grid's coupled
    error is at most its start's on the trajectories it was fitted to (only improvements are accepted), and on
    256 fresh trajectories of the same model it is no worse either (2% slack for the fresh draws' noise; the
    measured gains on fresh trajectories are 1.4x to 8x). The ends stay."""
    process = make_process(name, **opts)
    model = TrainedLikeOracle(_gaussian(process), scale=0.02)
    r = fit_grid(model, sampler, steps, num=128, dtype=F64, ref_steps=150)
    assert r.error <= r.error_start
    assert r.grid.times[0] == r.start.times[0] and r.grid.times[-1] == r.start.times[-1]
    assert r.grid.steps == steps
    x = r.start.start_sample((256, *model.sample_shape), torch.Generator().manual_seed(11), "cpu", F64)
    ref, _ = reference_solve(model, x, r.start, 150)
    spec = get_sampler(sampler)
    held_start = coupled_error(spec.run(model, x, r.start), ref)
    held_fit = coupled_error(spec.run(model, x, r.grid), ref)
    assert held_fit <= 1.02 * held_start, (held_start, held_fit)


def test_fit_grid_refuses_what_it_cannot_fit():
    process = make_process("vp", T=50)
    model = _gaussian(process)
    with pytest.raises(DiffusionLabError, match="deterministic fixed-step sampler"):
        fit_grid(model, "ddpm", 5)
    with pytest.raises(DiffusionLabError, match="deterministic fixed-step sampler"):
        fit_grid(model, "ddim:eta=0.5", 5)
    with pytest.raises(DiffusionLabError, match="no interior point"):
        fit_grid(model, "dpmpp-2m", 1)


TINY = {
    "data": {"name": "ring", "num": 500},
    "process": {"name": "vp", "T": 50},
    "model": {"name": "mlp", "hidden": 16, "depth": 1, "emb_dim": 8},
    "train": {"steps": 3, "batch_size": 16, "checkpoint_every": 3, "log_every": 1, "device": "cpu"},
    "sample": {"sampler": "ddim", "steps": 5},
}


def test_cli_fit_grid_then_sample_with_it(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["fit-grid", "--run", str(run), "--sampler", "dpmpp-2m", "--steps", "4", "--num", "32",
                 "--ref-steps", "30", "--sweeps", "2", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "grids" / "dpmpp-2m-4.json").read_text())
    assert saved["times"] == out["times"] and out["error"] <= out["error_start"] and len(out["times"]) == 5
    assert main(["sample", "--run", str(run), "--sampler", "dpmpp-2m", "--steps", "4", "--grid", "fitted",
                 "--num", "8", "--out", str(tmp_path / "x.npy"), "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["steps"] == 4 and line["nfe_per_sample"] == 4 and np.isfinite(np.load(tmp_path / "x.npy")).all()
    # an explicit-times file gives the same samples
    (tmp_path / "times.json").write_text(json.dumps(out["times"]))
    assert main(["sample", "--run", str(run), "--sampler", "dpmpp-2m", "--grid", f"file:{tmp_path / 'times.json'}",
                 "--num", "8", "--out", str(tmp_path / "y.npy"), "--quiet"]) == 0
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.load(tmp_path / "y.npy"))
    # the run samples with it by default once asked to
    assert main(["fit-grid", "--run", str(run), "--sampler", "dpmpp-2m", "--steps", "4", "--num", "32",
                 "--ref-steps", "30", "--sweeps", "2", "--make-default", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--num", "8", "--out", str(tmp_path / "z.npy"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == "dpmpp-2m"
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.load(tmp_path / "z.npy"))
    # errors: no fitted grid for these steps; a stochastic sampler
    assert main(["sample", "--run", str(run), "--sampler", "unipc", "--steps", "3", "--grid", "fitted", "--out",
                 str(tmp_path / "w.npy"), "--quiet"]) == 2
    assert "no fitted grid for sampler 'unipc' with 3 steps" in capsys.readouterr().err
    assert main(["fit-grid", "--run", str(run), "--sampler", "ddpm", "--steps", "4", "--quiet"]) == 2
    assert "deterministic fixed-step sampler" in capsys.readouterr().err
