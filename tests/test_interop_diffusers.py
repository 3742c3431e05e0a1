"""diffusers interop (diffusionlab.interop.diffusers): a randomly initialised UNet2DModel saved in the test drives
diffusionlab's samplers and likelihoods; a diffusionlab U-Net run exports to a folder diffusers loads.
Skipped when diffusers is not installed (extra ``diffusers``)."""

import json

import numpy as np
import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.interop.optional import prepare_torchvision

prepare_torchvision()  # diffusers imports torchvision where it is installed (interop.optional)
pytest.importorskip("diffusers")
from diffusionlab.interop.diffusers import import_diffusers  # noqa: E402

diffusers = import_diffusers()

from diffusionlab.interop.diffusers import (  # noqa: E402
    DiffusersEps, betas_from_scheduler, c_noise_to_timestep, export_blockers, load_diffusers, load_diffusers_run,
    process_from_scheduler)

U32 = 2.0**-24  # float32 unit round-off


def _randomize(module, seed=0, std=0.05):
    """Replace every parameter by N(0, std^2) draws (a fresh UNet's zero-initialised output layers would make
    every comparison trivially 0 = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _unet(out_channels=1, seed=0):
    u = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(16, 32),
                              layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return _randomize(u, seed).eval()


def _save_pipeline(path, unet, **sched):
    scheduler = diffusers.DDPMScheduler(**sched)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return _save_pipeline(tmp_path_factory.mktemp("pipe") / "ddpm", _unet(), beta_schedule="linear")


def test_adapter_returns_the_unets_output_bit_for_bit(pipe_dir):
    model, info = load_diffusers(pipe_dir)
    unet = model.net.unet
    assert info["prediction"] == "eps" and info["T"] == 1000 and not model.scale_input
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for t in (1, 2, 500, 999, 1000):
            ref = unet(x, torch.full((3,), t - 1, dtype=torch.long)).sample  # diffusers' 0-based timestep
            assert torch.equal(model(x, t), ref)  # the very same operations: bit for bit
            assert torch.equal(model.predict(x, t).eps, ref)
        # a (B,) step tensor with mixed steps too
        t = torch.tensor([1, 400, 1000])
        ref = torch.cat([unet(x[i:i + 1], torch.tensor([int(t[i]) - 1])).sample for i in range(3)])
        assert torch.allclose(model(x, t), ref, rtol=0, atol=1e-6)  # batch of 1 vs 3: another reduction order


def test_timestep_mapping_is_exact_for_every_chain_step():
    for T in (1000, 4000, 7, 999):
        t = torch.arange(1, T + 1)
        c = t.to(torch.float32) * (1000.0 / T)  # DiffusionModel.c_noise
        assert torch.equal(c_noise_to_timestep(c, T, discrete=True), t - 1)


@pytest.mark.parametrize("sched", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "num_train_timesteps": 250, "beta_start": 4e-4, "beta_end": 0.08},
])
def test_schedules_agree_with_diffusers_alphas_cumprod(sched):
    """diffusers keeps betas and alphas_cumprod in float32 (each beta rounded, each 1 - beta and each product of
    the cumulative product rounded: at most 3 roundings per step, relative error <= 3 T u32 to first order, 1.8e-4
    for T = 1000); diffusionlab's chain is float64. The bound is rigorous to first order, so the test fails on any
    real schedule difference (a different beta_start shifts alpha-bar by ~1e-2)."""
    s = diffusers.DDPMScheduler(**sched)
    chain = process_from_scheduler(dict(s.config))
    T = chain.T
    ours, theirs = chain.alpha_bar[1:], s.alphas_cumprod.double()
    rel = ((ours - theirs).abs() / ours).max()
    assert rel <= 3 * T * U32
    # betas: float32 linspace computes start + i * step (the step rounded, then a product and a sum: ~3 u32);
    # scaled_linear squares that (doubling the relative error, plus one rounding): <= 7 u32; measured 1.8 and 3.7
    assert torch.allclose(chain.beta[1:], s.betas.double(), rtol=8 * U32, atol=0)


def test_unmappable_schedulers_and_unets_are_refused(tmp_path):
    with pytest.raises(DiffusionLabError, match="beta_schedule 'sigmoid'"):
        betas_from_scheduler({"beta_schedule": "sigmoid"})
    with pytest.raises(DiffusionLabError, match="rescale_betas_zero_snr"):
        betas_from_scheduler({"beta_schedule": "linear", "rescale_betas_zero_snr": True})
    with pytest.raises(DiffusionLabError, match="needs linear betas"):
        process_from_scheduler({"beta_schedule": "squaredcos_cap_v2"}, continuous=True)
    p = _save_pipeline(tmp_path / "learned", _unet(), variance_type="learned")
    with pytest.raises(DiffusionLabError, match="variance_type 'learned'"):
        load_diffusers(p)
    p = _save_pipeline(tmp_path / "pred", _unet(), prediction_type="flow")
    with pytest.raises(DiffusionLabError, match="prediction_type 'flow'"):
        load_diffusers(p)
    fourier = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                    layers_per_block=1, norm_num_groups=8, time_embedding_type="fourier",
                                    down_block_types=("DownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "UpBlock2D"))
    fourier.save_pretrained(str(tmp_path / "fourier"))
    with pytest.raises(DiffusionLabError, match="time_embedding_type 'fourier'"):
        load_diffusers(tmp_path / "fourier")
    with pytest.raises(DiffusionLabError, match="not a diffusers model folder"):
        load_diffusers(tmp_path)


def test_predictions_map_to_the_parametrization(tmp_path):
    """v_prediction and sample: diffusionlab's decoded x0 equals what diffusers' DDPMScheduler.step derives
    (pred_original_sample), both in float32 from the same output: a few ulps of O(1) values."""
    x = torch.randn(2, 1, 8, 8)
    for ptype in ("v_prediction", "sample", "epsilon"):
        p = _save_pipeline(tmp_path / ptype, _unet(seed=1), prediction_type=ptype, clip_sample=False)
        model, _ = load_diffusers(p)
        sched = diffusers.DDPMScheduler.from_pretrained(str(p / "scheduler"))
        with torch.no_grad():
            for tau in (10, 500, 990):
                out = model.net.unet(x, torch.tensor([tau])).sample
                x0_theirs = sched.step(out, tau, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
                x0_ours = model.predict(x, tau + 1).x0
                scale = max(1.0, float(x0_theirs.abs().max()))
                assert torch.allclose(x0_ours, x0_theirs, rtol=0, atol=1e-4 * scale), (ptype, tau)


def test_learned_range_gives_a_learned_variance(tmp_path):
    p = _save_pipeline(tmp_path / "lr", _unet(out_channels=2), variance_type="learned_range")
    model, info = load_diffusers(p)
    assert model.learn_variance and info["learn_variance"]


def test_diffusionlab_samplers_drive_the_unet_and_match_diffusers_ddim(pipe_dir):
    """10-step deterministic DDIM: diffusers' DDIMScheduler (trailing spacing, no clipping) and diffusionlab's ddim
    on the same grid from the same x_T; different code paths in float32: agreement to 1e-4."""
    from diffusionlab.samplers import get_sampler

    model, _ = load_diffusers(pipe_dir)
    unet = model.net.unet
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = diffusers.DDIMScheduler.from_pretrained(str(pipe_dir / "scheduler"), timestep_spacing="trailing",
                                                    clip_sample=False)
    sched.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for tau in sched.timesteps:
            x = sched.step(unet(x, tau).sample, tau, x, eta=0.0).prev_sample
        ours = get_sampler("ddim")(model, x_T.clone(), (sched.timesteps + 1).tolist(), clip_x0=False)
    assert torch.allclose(ours, x, rtol=0, atol=1e-4 * max(1.0, float(x.abs().max())))
    # the DiffusersEps adapter (the other direction) returns a diffusionlab model's eps at 0-based steps
    with torch.no_grad():
        assert torch.equal(DiffusersEps(model)(x_T, torch.tensor(5)), model.predict(x_T, 6).eps)


def test_cli_sample_and_evaluate_with_diffusers(pipe_dir, tmp_path, capsys):
    from diffusionlab.cli import main

    out = tmp_path / "s.npz"
    assert main(["sample", "--diffusers", str(pipe_dir), "--num", "6", "--steps", "4", "--out", str(out),
                 "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nfe_per_sample"] == 4 and np.load(out)["x"].shape == (6, 1, 8, 8)
    # continuous-time samplers get the VP-SDE of the linear schedule
    assert main(["sample", "--diffusers", str(pipe_dir), "--num", "2", "--steps", "4", "--sampler", "ode_euler",
                 "--out", str(tmp_path / "o.npy"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--diffusers", str(pipe_dir), "--num", "10", "--steps", "3", "--quiet"]) == 0
    assert "fd" in json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--diffusers", str(pipe_dir), "--metric", "nll", "--num", "2", "--data", "digits",
                 "--rtol", "1e-3", "--atol", "1e-3", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["process"] == "vp-sde" and np.isfinite(rep["bits_per_dim"])
    assert main(["evaluate", "--diffusers", str(pipe_dir), "--metric", "elbo", "--num", "1"]) == 2
    assert "needs the model's dataset" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path), "--diffusers", str(pipe_dir), "--out", str(out)]) == 2
    assert "exactly one of --run" in capsys.readouterr().err


def test_elbo_of_a_diffusers_model_uses_all_T_terms(tmp_path, capsys):
    from diffusionlab.cli import main

    p = _save_pipeline(tmp_path / "short", _unet(), num_train_timesteps=20)
    assert main(["evaluate", "--diffusers", str(p), "--metric", "elbo", "--num", "2", "--data", "digits",
                 "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["T"] == 20 and rep["network_evaluations_per_point"] == 20 and np.isfinite(rep["bits_per_dim"])


def test_data_shape_must_match_the_unet(pipe_dir, tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((4, 1, 16, 16), np.float32))
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"data:\n  name: array\n  path: {tmp_path / 'big.npy'}\n  range: unit\n")
    with pytest.raises(DiffusionLabError, match="takes \\(1, 8, 8\\)"):
        load_diffusers_run(pipe_dir, data=str(cfg), device="cpu")


# ---- export ----------------------------------------------------------------------------------------------------
def _run(root, name, **model):
    from diffusionlab.training.config import load_config
    from diffusionlab.training.trainer import train

    cfg = {"data": {"name": "digits"}, "process": {"name": "vp", "schedule": "cosine"},
           "model": {"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                     "attn_resolutions": [4], **model},
           "train": {"steps": 1, "batch_size": 4, "checkpoint_every": 1, "device": "cpu", "threads": 1}}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    train(load_config(path), root / name, progress=False, log=lambda *a: None)
    return root / name


def _randomize_run(run):
    """Random weights for the run's EMA file (a 1-step run's output conv is still 0)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(run / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(run / "model.safetensors"))


def test_export_round_trips_through_diffusers(tmp_path):
    from diffusionlab.interop.diffusers import check_export, export_unet_run, load_unet
    from diffusionlab.training.sampling import load_run

    run = _run(tmp_path, "r", num_heads=2)
    _randomize_run(run)
    summary = export_unet_run(run, tmp_path / "exp")
    # both nets compute the sinusoid arguments tau f and (tau + 1) f in float32, which round differently by up
    # to ulp(1000) = 6e-5 absolute; the outputs then agree to ~1e-5 relative, a mis-mapped weight gives O(1)
    assert summary["check"]["max_rel_diff"] < 1e-3 and summary["check"]["max_abs_output"] > 0.1
    assert summary["unet_config"]["attention_head_dim"] == 8  # 16 channels at the attention levels / 2 heads
    # loaded back as a diffusionlab model: the same eps as the run's model, every diffusionlab sampler runs
    _, _, ours = load_run(run, "cpu")
    theirs, info = load_diffusers(tmp_path / "exp")
    assert info["beta_schedule"] == "squaredcos_cap_v2"
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for t in (1, 300, 1000):
            a, b = ours.predict(x, t).eps, theirs.predict(x, t).eps
            assert torch.allclose(a, b, rtol=0, atol=1e-3 * float(a.abs().max()))
    assert check_export(ours, load_unet(tmp_path / "exp" / "unet"))["max_rel_diff"] < 1e-3
    with pytest.raises(DiffusionLabError, match="exists"):
        export_unet_run(run, tmp_path / "exp")


def test_export_time_rotation_is_exact_in_float64():
    """The folded rotation: fc1(emb(c + 1)) = (fc1 W R) emb(c) to float64 round-off."""
    from diffusionlab.interop.diffusers import time_rotation
    from diffusionlab.models.embedding import SinusoidalEmbedding

    emb = SinusoidalEmbedding(9)
    f = emb.freqs.double()
    c = torch.tensor([0.0, 1.0, 37.0, 998.0], dtype=torch.float64)

    def e(v):
        a = v[:, None] * f[None]
        return torch.nn.functional.pad(torch.cat([a.cos(), a.sin()], 1), (0, 1))

    r = time_rotation(emb.freqs, 9)
    assert torch.allclose(e(c) @ r.T, e(c + 1), rtol=0, atol=1e-12)


def test_export_names_every_option_that_does_not_map(tmp_path, capsys):
    from diffusionlab.cli import main
    from diffusionlab.training.sampling import load_run

    run = _run(tmp_path, "bad", conv_resample=False, channel_mults=[2, 2], groups=7)
    cfg, _, model = load_run(run, "cpu")
    bad = " | ".join(export_blockers(cfg, model))
    for word in ("conv_resample", "channel_mults", "groups = 7"):
        assert word in bad
    shifted = {**cfg, "process": {**cfg["process"], "snr_shift": 2.0}}
    assert any("snr_shift = 2.0" in line for line in export_blockers(shifted, model))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv_resample" in err and not (tmp_path / "x").exists()
