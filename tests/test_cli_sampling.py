"""``sample`` and ``evaluate`` on trained runs use the one sampler catalogue: the run's own sampler by default, any
sampler on any process its maths allows (DDIM on an SDE run), any grid (``--grid karras``), options validated
against the sampler (unknown ones refused with one line naming the allowed options)."""

import json

import numpy as np
import pytest

from diffusionlab.cli import main

TINY_RING = ["--set", "train.steps=3", "--set", "data.num=256", "--set", "train.batch_size=32",
             "--set", "model.hidden=16", "--set", "model.depth=1", "--set", "train.threads=1", "--quiet"]
TINY_DIGITS = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "model.base_channels=8",
               "--set", "model.attn_resolutions=[]", "--set", "train.threads=1", "--set", "train.channels_last=false",
               "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "toy2d_sde", "--out", str(root / "sde"), *TINY_RING]) == 0
    assert main(["train", "toy2d_ncsn", "--out", str(root / "ncsn"), *TINY_RING]) == 0
    assert main(["train", "digits", "--out", str(root / "digits"), *TINY_DIGITS]) == 0
    return root


def _sample(capsys, run, out, *argv) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["sample", "--run", str(run), "--num", "8", "--out", str(out), "--quiet", *argv])
    cap = capsys.readouterr()
    return code, json.loads(cap.out) if code == 0 else None, cap.err


def test_the_run_s_own_sampler_is_the_default(runs, tmp_path, capsys):
    code, info, _ = _sample(capsys, runs / "ncsn", tmp_path / "a.npy", "--set", "n_steps_each=2")
    assert code == 0 and info["sampler"] == "annealed-langevin" and info["steps"] == 10
    assert info["nfe_per_sample"] == 10 * 2 + 1  # the run's 10 levels, 2 Langevin steps each, the denoising step
    code, info, _ = _sample(capsys, runs / "sde", tmp_path / "b.npy")
    assert code == 0 and info["sampler"] == "ode-heun" and info["steps"] == 50  # the run's config


def test_a_sampler_given_on_the_command_line_gets_its_own_defaults(runs, tmp_path, capsys):
    code, info, _ = _sample(capsys, runs / "sde", tmp_path / "a.npy", "--sampler", "euler-maruyama")
    assert code == 0 and info["steps"] == 1000  # the sampler's default, not the run's 50 ODE steps
    code, info, _ = _sample(capsys, runs / "ncsn", tmp_path / "b.npy", "--sampler", "ddpm")
    assert code == 0 and info["steps"] == 10  # every step of the 10-level chain


def test_ddim_on_an_sde_run_and_karras_dpmpp_on_digits(runs, tmp_path, capsys):
    code, info, _ = _sample(capsys, runs / "sde", tmp_path / "a.npy", "--sampler", "ddim", "--steps", "12")
    assert code == 0 and info["nfe_per_sample"] == 12 and np.isfinite(np.load(tmp_path / "a.npy")).all()
    code, info, _ = _sample(capsys, runs / "digits", tmp_path / "b.npz", "--sampler", "dpmpp-2m", "--grid", "karras",
                            "--steps", "10")
    assert code == 0 and info["grid"] == "karras" and info["nfe_per_sample"] == 10
    x = np.load(tmp_path / "b.npz")["x"]
    assert x.shape == (8, 1, 8, 8) and 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("argv,fragment", [
    (["--set", "no_such=1"], "unknown key sample.no_such for sampler 'ddim'; allowed: sampler, steps, grid, rho, "
                             "sig_max, times, num, classes, guidance, guidance_interval, known, mask, method, "
                             "clip_x0, eta"),
    (["--sampler", "dpmpp-2m", "--set", "eta=0.5"], "unknown key sample.eta for sampler 'dpmpp-2m'; allowed: "
                                                    "sampler, steps, grid, rho, sig_max, times, num, classes, "
                                                    "guidance, guidance_interval, known, mask, method, "
                                                    "lower_order_final, solver_type"),
    (["--set", "eta=2"], "sample.eta: sampler 'ddim' option eta must be a number in [0, 1], got 2"),
    (["--sampler", "euler-maruyama"], "sampler 'euler-maruyama' needs a continuous-time SDE"),
    (["--sampler", "nope"], "unknown sampler 'nope'; allowed: annealed-langevin, ddim, ddpm"),
    (["--grid", "cubic"], "argument --grid: must be one of uniform, trailing, quadratic, logsnr, karras, edm, "
                          "fitted, file:PATH, got 'cubic'"),
])
def test_bad_options_are_one_line_naming_what_is_allowed(runs, tmp_path, capsys, argv, fragment):
    code, _, err = _sample(capsys, runs / "digits", tmp_path / "x.npy", *argv)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "x.npy").exists()


def test_train_refuses_a_bad_sample_section_before_training(tmp_path, capsys):
    bare = tmp_path / "bare.yaml"
    bare.write_text("data: {name: ring}\nprocess: {name: ve, L: 10}\nmodel: {name: mlp}\n")
    for config, override, fragment in (
            ("toy2d_ncsn", ["--set", "sample.steps=50"], "must be <= T = 10"),
            ("toy2d_ncsn", ["--set", "sample.sampler=euler-maruyama"],
             "unknown key sample.n_steps_each for sampler 'euler-maruyama'"),  # the file's Langevin options
            (str(bare), ["--set", "sample.sampler=euler-maruyama"], "needs a continuous-time SDE"),
            ("toy2d_ncsn", ["--set", "sample.no_such=1"], "unknown key sample.no_such")):
        capsys.readouterr()
        assert main(["train", config, "--out", str(tmp_path / "r"), *TINY_RING, *override]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
        assert not (tmp_path / "r" / "checkpoints").exists()
