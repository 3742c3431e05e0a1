"""Long videos from a short-window model: the conditional frame noise (joint noising) and the sliding-window
extension, checked against Gaussian conditioning and on exact Gaussian video data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Mixed, Progressive
from diffusionlab.noise.conditional import ConditionalNoise
from diffusionlab.oracles import GaussianOracle
from diffusionlab.processes import VPChain
from diffusionlab.samplers.extend import conditional_window, extend_videos, window_starts
from diffusionlab.schedules import linear_betas

F64 = torch.float64


@pytest.mark.parametrize("known", [[0, 1, 2], [4, 5], [1, 3], []])
def test_conditional_noise_is_the_gaussian_conditional(known):
    c = Progressive(0.8, 6).matrix()
    cn = ConditionalNoise(c, known)
    a = c.numpy()
    u = [i for i in range(6) if i not in known]
    if known:  # an independent computation: numpy's explicit inverse
        gain = a[np.ix_(u, known)] @ np.linalg.inv(a[np.ix_(known, known)])
        cond = a[np.ix_(u, u)] - gain @ a[np.ix_(known, u)]
    else:
        gain, cond = np.zeros((6, 0)), a
    np.testing.assert_allclose(cn.gain.numpy(), gain, atol=1e-12)
    np.testing.assert_allclose(cn.cond_cov.numpy(), cond, atol=1e-12)
    np.testing.assert_allclose((cn.root @ cn.root.T).numpy(), cond, atol=1e-12)


def _joint_cov(x: torch.Tensor) -> torch.Tensor:
    v = torch.movedim(x.to(F64), 2, -1).reshape(-1, x.shape[2])  # every (sample, pixel) gives an F-vector
    return v.T @ v / v.shape[0]


def test_conditional_draws_keep_the_joint_law_and_independent_ones_do_not():
    """Known frames drawn from N(0, C_KK), the rest by the conditional: the window's empirical covariance is C.
    Tolerance: the sd of an entry of a sample covariance of n Gaussian vectors is sqrt((C_ii C_jj + C_ij^2) / n);
    5 of them for each of the 36 entries."""
    c = Mixed(1.5, 6).matrix()  # off-diagonal 0.69
    known = [0, 1, 2]
    n = 40000  # (n / 4 samples) x (2 x 2 pixels)
    g = torch.Generator().manual_seed(0)
    ek = ConditionalNoise(c[:3, :3], []).sample(torch.zeros(n // 4, 1, 0, 2, 2, dtype=F64), g)
    full = ConditionalNoise(c, known).sample(ek, g)
    assert torch.equal(full[:, :, :3], ek)
    tol = 5.0 * torch.sqrt((torch.outer(c.diagonal(), c.diagonal()) + c**2) / n)
    err = (_joint_cov(full) - c).abs()
    assert bool((err < tol).all()), (err / tol).max()
    # the independent draw has the right blocks but no cross-covariance: the check fails there by far
    fresh = ConditionalNoise(c[3:, 3:], []).sample(torch.zeros(n // 4, 1, 0, 2, 2, dtype=F64), g)
    indep = torch.cat([ek, fresh], dim=2)
    assert ((_joint_cov(indep) - c).abs() / tol).max() > 20


def test_conditional_noise_refuses_bad_input():
    with pytest.raises(DiffusionLabError, match="distinct indices"):
        ConditionalNoise(torch.eye(4), [0, 0])
    with pytest.raises(DiffusionLabError, match="distinct indices"):
        ConditionalNoise(torch.eye(4), [5])
    with pytest.raises(DiffusionLabError, match="square"):
        ConditionalNoise(torch.ones(3, 4), [0])
    with pytest.raises(DiffusionLabError, match="2 frames on axis 2"):
        ConditionalNoise(torch.eye(4), [0, 1]).sample(torch.zeros(1, 1, 3, 2, 2))


def test_window_starts_cover_the_video():
    assert window_starts(32, 8, 4) == [0, 4, 8, 12, 16, 20, 24]
    assert window_starts(8, 8, 4) == [0]
    assert window_starts(10, 8, 6) == [0, 2]
    for args, match in (((32, 8, 8), "overlap"), ((32, 8, 0), "overlap"), ((4, 8, 2), "frames")):
        with pytest.raises(DiffusionLabError, match=match):
            window_starts(*args)


# ---- on exact Gaussian videos --------------------------------------------------------------------------------
W, RHO = 4, 0.9  # the model's window; the data's AR(1) correlation between consecutive frames


def _oracle(noise_cov):
    i = torch.arange(W, dtype=F64)
    frames = RHO ** (i[:, None] - i[None, :]).abs()
    sigma = 0.25 * torch.kron(frames, torch.eye(4, dtype=F64))  # (1, W, 2, 2) videos, pixels independent
    return GaussianOracle(torch.zeros(1, W, 2, 2, dtype=F64), sigma, VPChain(linear_betas(200), cov=noise_cov))


def _lag_corr(x: torch.Tensor, a: int, b: int) -> float:
    u, v = x[:, :, a].reshape(-1), x[:, :, b].reshape(-1)
    return float(torch.corrcoef(torch.stack([u, v]))[0, 1])


def test_extension_continues_the_video_across_windows_with_joint_noising():
    """A 10-frame video from an exact model of 4-frame AR(1) videos (rho = 0.9) with progressive noise (AR(1),
    0.71): inside a window consecutive frames correlate like the data; across a window boundary replacement with
    joint noising keeps most of it (0.83 measured; replacement is not the exact conditional), while drawing the
    new frames' noise independently of the known frames' loses half of it (0.36-0.40 measured). 1000 videos x 4
    pixels: a correlation's standard error is about 0.005, so the margins below are > 5 of them."""
    model = _oracle(Progressive(1.0, W, axis=2))
    lag1 = {}
    for joint in (True, False):
        g = torch.Generator().manual_seed(0)
        x = extend_videos(model, 1000, 10, W, overlap=2, grid=50, eta=0.0, joint=joint, clip_x0=False, generator=g,
                          shape=(1, W, 2, 2), device="cpu", dtype=F64, chunk=500)
        assert x.shape == (1000, 1, 10, 2, 2) and x.dtype == F64
        # the data's marginal variance 0.25 kept within 0.04 (sd of a variance estimate of 4000 draws: 0.006).
        # Measured 0.223-0.269: the first window is 0.023 low because DDIM at eta = 0 (the probability-flow ODE's
        # first-order solver) shrinks it on 50 steps (0.012 still on all 200; 16000 draws), the later windows up
        # to 0.02 high because replacement is not the exact conditional
        if joint:
            var = x.var(dim=(0, 1, 3, 4))
            assert bool(((var - 0.25).abs() < 0.04).all()), var
        lag1[joint] = [_lag_corr(x, a, a + 1) for a in range(9)]
        for a in (0, 1, 2, 4, 6, 8):  # pairs inside a window
            assert lag1[joint][a] == pytest.approx(RHO, abs=0.05), (joint, a)
        if joint:
            assert _lag_corr(x, 3, 6) > 0.45  # across two boundaries (rho^3 = 0.73 for the exact conditional)
    for a in (3, 5, 7):  # the window boundaries
        assert lag1[True][a] > 0.78 and lag1[False][a] < 0.55, (a, lag1)
    # deterministic given the generator; with eta = 0 only the starting noise is random
    runs = [extend_videos(model, 6, 10, W, overlap=2, grid=50, generator=torch.Generator().manual_seed(3),
                          shape=(1, W, 2, 2), device="cpu", dtype=F64) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_conditional_window_keeps_the_known_frames_and_hands_on_their_noise():
    model = _oracle(Mixed(1.0, W, axis=2))
    g = torch.Generator().manual_seed(1)
    known = 0.5 * torch.randn(3, 1, 2, 2, 2, generator=g, dtype=F64)
    eps_k = torch.randn(3, 1, 2, 2, 2, generator=g, dtype=F64)
    for eta, resample in ((0.0, 1), (1.0, 3)):
        x, eps = conditional_window(model, known, eps_k, W, grid=20, eta=eta, resample=resample, generator=g)
        assert torch.equal(x[:, :, :2], known) and torch.equal(eps[:, :, :2], eps_k)
        assert x.shape == (3, 1, W, 2, 2) and bool(torch.isfinite(x).all())
    with pytest.raises(DiffusionLabError, match="known frames"):
        conditional_window(model, torch.zeros(1, 1, W, 2, 2, dtype=F64), torch.zeros(1, 1, W, 2, 2, dtype=F64), W)
    with pytest.raises(DiffusionLabError, match="resample"):
        conditional_window(model, known, eps_k, W, resample=0)


# ---- through the CLI -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    from diffusionlab.training.config import resolve
    from diffusionlab.training.trainer import train

    out = tmp_path_factory.mktemp("video_run")
    cfg = resolve({"data": {"name": "moving_digits", "num": 6, "frames": 4, "size": 8},
                   "process": {"name": "vp", "T": 50, "noise": "progressive:1.0"},
                   "model": {"name": "video_unet", "base_channels": 8, "channel_mults": [1, 2],
                             "temporal": "both", "temporal_attention": "spacetime"},
                   "train": {"steps": 2, "batch_size": 2, "warmup": 1, "device": "cpu"},
                   "sample": {"sampler": "ddim", "steps": 3}})
    train(cfg, out, progress=False, log=lambda m: None)
    return out


def test_sample_and_evaluate_longer_videos(video_run, tmp_path, capsys):
    from diffusionlab.cli import main

    out = tmp_path / "long.npz"
    assert main(["sample", "--run", str(video_run), "--frames", "10", "--overlap", "2", "--num", "3", "--out",
                 str(out), "--quiet"]) == 0
    x = np.load(out)["x"]
    assert x.shape == (3, 1, 10, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(video_run), "--frames", "10", "--num", "3", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["frames"] == 10 and m["num"] == 3 and "digit_all_same" in m
    assert main(["sample", "--run", str(video_run), "--frames", "3", "--out", str(out), "--quiet"]) == 2
    assert "at least the 4 frames" in capsys.readouterr().err
    assert main(["sample", "--run", str(video_run), "--frames", "10", "--sampler", "heun", "--out", str(out),
                 "--quiet"]) == 2


def test_longer_videos_of_a_class_conditional_run_keep_their_class(tmp_path, capsys):
    """A run whose sample section names classes (the video recipe's) makes longer videos with every window
    conditioned on its video's class: the guided network is called on the doubled batch in every window."""
    from diffusionlab.cli import main
    from diffusionlab.training.config import resolve
    from diffusionlab.training.sampling import extend_with_section, load_run
    from diffusionlab.training.trainer import train

    run = tmp_path / "run"
    cfg = resolve({"data": {"name": "moving_digits", "num": 6, "frames": 4, "size": 8},
                   "process": {"name": "vp", "T": 50},
                   "model": {"name": "video_unet", "base_channels": 8, "channel_mults": [1, 2], "num_classes": 10},
                   "train": {"steps": 2, "batch_size": 2, "warmup": 1, "device": "cpu", "p_uncond": 0.1},
                   "sample": {"sampler": "ddim", "steps": 3, "classes": [1, 7], "guidance": 2.0}})
    train(cfg, run, progress=False, log=lambda m: None)
    out = tmp_path / "long.npz"
    assert main(["sample", "--run", str(run), "--frames", "6", "--overlap", "2", "--num", "2", "--out", str(out),
                 "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert np.load(out)["x"].shape == (2, 1, 6, 8, 8) and line["classes"] == [1, 7] and line["guidance"] == 2.0
    _, _, model = load_run(run, device="cpu")
    seen = []
    model.net.register_forward_hook(lambda mod, args, res: seen.append(args[2].tolist()))
    x = extend_with_section(model, cfg["sample"], 3, 6, (1, 4, 8, 8), overlap=2, classes=[1, 7], guidance=2.0,
                            chunk=2)
    assert x.shape == (3, 1, 6, 8, 8) and len(seen) == 2 * 3 * 2  # 2 chunks x 3 steps x 2 windows
    assert seen[0] == [1, 1, 10, 10] and seen[-1] == [7, 10]  # conditional rows, then "no label" (index 10)


def test_extend_options_follow_the_sampler_and_refuse_other_steps():
    """The window updates take the sampler's own resolved options: DDIM's defaults where the section is silent
    (eta 0, no clipping), ddpm only with the posterior variance (DDIM at eta = 1); ddpm's default beta variance is
    not a DDIM step and is refused rather than silently replaced."""
    from diffusionlab.training.sampling import extend_options

    assert extend_options({"sampler": "ddim"}) == (0.0, False)
    assert extend_options({"sampler": "ddim", "eta": 0.5, "clip_x0": True}) == (0.5, True)
    assert extend_options({"sampler": "ddpm", "variance": "beta_tilde"}) == (1.0, False)
    with pytest.raises(DiffusionLabError, match="variance 'beta'"):
        extend_options({"sampler": "ddpm"})
    with pytest.raises(DiffusionLabError, match="'heun'"):
        extend_options({"sampler": "heun"})
    with pytest.raises(DiffusionLabError, match="no option"):
        extend_options({"sampler": "ddim", "variance": "beta"})


def test_extension_walks_the_sections_grid(monkeypatch):
    """The extension's grid is the sample section's, its ``sig_max`` and explicit ``times`` included (not rebuilt
    from steps alone)."""
    import diffusionlab.samplers.extend as extend
    from diffusionlab.processes import VPChain
    from diffusionlab.schedules import linear_betas
    from diffusionlab.training.sampling import extend_with_section

    seen = {}

    class Model(torch.nn.Module):
        process = VPChain(linear_betas(20, 1e-3, 0.2))

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

    def fake(model, num, frames, window, overlap, grid, *args, **kwargs):
        seen["times"], seen["sig"] = list(grid.times), list(grid.sig)
        return torch.zeros(())

    monkeypatch.setattr(extend, "extend_videos", fake)
    extend_with_section(Model(), {"sampler": "ddim", "times": [20, 12, 5, 0]}, 1, 8, (1, 4, 2, 2))
    assert seen["times"] == [20, 12, 5, 0]
    # sig_max 1: on this chain the nearest step is 12 (sig 1.040; step 11 has 0.917, T = 20 has 2.775)
    extend_with_section(Model(), {"sampler": "ddim", "steps": 4, "sig_max": 1.0}, 1, 8, (1, 4, 2, 2))
    assert seen["times"][0] == 12 and seen["sig"][0] == pytest.approx(1.0404, abs=1e-4) and len(seen["times"]) == 5
