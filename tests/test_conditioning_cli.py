"""The conditioning flags of ``sample``, ``oracle sample`` and ``bench samplers``, and the config keys."""

import json

import numpy as np
import pytest
import torch

from diffusionlab.cli import main
from diffusionlab.oracles.bench import ring_spec
from diffusionlab.training.config import dump, resolve
from diffusionlab.training.trainer import train

TINY = {
    "data": {"name": "digits", "split": "train"},
    "process": {"name": "vp", "T": 20},
    "model": {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1, "attn_resolutions": [],
              "num_classes": 10},
    "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup": 1, "checkpoint_every": 3, "log_every": 1,
              "seed": 0, "device": "cpu", "p_uncond": 0.2},
    "sample": {"sampler": "ddim", "steps": 4, "num": 4},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "run"
    train(resolve(TINY), out, progress=False)
    return out


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sample_with_classes_and_guidance(run, tmp_path, capsys):
    out = tmp_path / "g.npz"
    assert main(["sample", "--run", str(run), "--class", "3,7", "--guidance", "2", "--num", "4", "--out", str(out),
                 "--quiet"]) == 0
    rec = _json(capsys)
    assert rec["classes"] == [3, 7] and rec["guidance"] == 2.0
    assert rec["network_calls"] == 4 and rec["evaluations_by_kind"]["doubled"] == 4  # one doubled call per step
    assert "doubled batch" in rec["nfe_note"]
    assert np.load(out)["x"].shape == (4, 1, 8, 8)
    png = tmp_path / "grid.png"
    assert main(["sample", "--run", str(run), "--class", "0,1", "--num", "6", "--out", str(png), "--quiet",
                 "--guidance-interval", "0.5,20", "--guidance", "3"]) == 0
    rec = _json(capsys)
    kinds = rec["evaluations_by_kind"]
    assert kinds["doubled"] + kinds["conditional"] == 4 and kinds["conditional"] >= 1  # the interval skips some
    assert png.stat().st_size > 0


def test_sample_with_known_values(run, tmp_path, capsys):
    x = np.random.default_rng(0).uniform(0, 1, size=(3, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "known.npz", x=x)
    m = np.zeros((1, 1, 8, 8))
    m[..., :3] = 1
    np.savez(tmp_path / "mask.npz", mask=m)
    out = tmp_path / "f.npz"
    assert main(["sample", "--run", str(run), "--known", str(tmp_path / "known.npz"), "--mask",
                 str(tmp_path / "mask.npz"), "--method", "smc:particles=2", "--steps", "3", "--out", str(out),
                 "--quiet"]) == 0
    rec = _json(capsys)
    assert rec["method"] == "smc" and rec["nfe_per_sample"] == 6 and rec["network_calls"] == 3 and rec["num"] == 3
    y = np.load(out)["x"]
    # model space [-1, 1] and back to [0, 1] in float32: a few ulps
    assert np.allclose(y[..., :3], x[..., :3], atol=1e-6)
    assert main(["sample", "--run", str(run), "--known", str(tmp_path / "known.npz"), "--mask",
                 str(tmp_path / "mask.npz"), "--method", "repaint", "--set", "jump=1", "--set", "resample=2",
                 "--steps", "2", "--class", "4", "--guidance", "1.5", "--out", str(out), "--quiet"]) == 0
    rec = _json(capsys)
    assert rec["nfe_per_sample"] == 4 and rec["evaluations_by_kind"]["doubled"] == 4


@pytest.mark.parametrize("argv,message", [
    (["--guidance", "2"], "needs classes"),
    (["--guidance", "nan"], "finite number"),
    (["--class", "1", "--guidance", "inf"], "finite number"),
    (["--class", "12"], "not a class of this model"),
    (["--class", "1.5"], "integers"),
    (["--method", "smc"], "needs --known and --mask"),
    (["--class", "1", "--guidance-interval", "3,1"], "0 <= lo < hi"),
    (["--known", "K"], "go together"),
])
def test_sample_refuses_bad_conditioning(run, tmp_path, capsys, argv, message):
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "x.npz"), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_sample_refuses_bad_known_files(run, tmp_path, capsys):
    np.savez(tmp_path / "k.npz", x=np.zeros((2, 1, 4, 4)))
    np.save(tmp_path / "m.npy", np.ones((1, 8, 8)))
    argv = ["sample", "--run", str(run), "--out", str(tmp_path / "x.npz"), "--quiet", "--known", str(tmp_path / "k.npz"),
            "--mask", str(tmp_path / "m.npy")]
    assert main(argv) == 2 and "has shape (2, 1, 4, 4)" in capsys.readouterr().err
    np.savez(tmp_path / "k.npz", x=np.full((2, 1, 8, 8), 3.0))
    assert main(argv) == 2 and "display space" in capsys.readouterr().err
    np.savez(tmp_path / "k.npz", x=np.zeros((2, 1, 8, 8)))
    np.save(tmp_path / "m.npy", np.full((1, 8, 8), 0.5))
    assert main(argv) == 2 and "0 (unknown) and 1 (known)" in capsys.readouterr().err
    np.save(tmp_path / "m.npy", np.ones((1, 8, 8)))
    assert main(argv + ["--sampler", "ddpm"]) == 2 and "--sampler does not apply" in capsys.readouterr().err
    assert main(argv + ["--num", "5"]) == 2 and "disagrees" in capsys.readouterr().err


def test_unconditional_run_refuses_classes(tmp_path, capsys):
    cfg = {**TINY, "model": {k: v for k, v in TINY["model"].items() if k != "num_classes"},
           "train": {**TINY["train"], "p_uncond": 0.0, "steps": 1}}
    train(resolve(cfg), tmp_path / "plain", progress=False)
    assert main(["sample", "--run", str(tmp_path / "plain"), "--class", "1", "--out", str(tmp_path / "x.npz"),
                 "--quiet"]) == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_config_keys_are_the_defaults(run, tmp_path, capsys):
    import shutil

    other = tmp_path / "run2"
    shutil.copytree(run, other)
    cfg = resolve({**TINY, "sample": {**TINY["sample"], "classes": [2], "guidance": 2.0}})
    (other / "config.yaml").write_text(dump(cfg))
    assert main(["sample", "--run", str(other), "--num", "2", "--out", str(tmp_path / "x.npz"), "--quiet"]) == 0
    rec = _json(capsys)
    assert rec["classes"] == [2] and rec["guidance"] == 2.0
    from diffusionlab.errors import DiffusionLabError

    # the run's explicit times are the grid of a class-conditional sample too (not rebuilt from steps)
    cfg = resolve({**TINY, "sample": {"sampler": "ddim", "times": [20, 9, 2], "classes": [2], "num": 2}})
    (other / "config.yaml").write_text(dump(cfg))
    assert main(["sample", "--run", str(other), "--out", str(tmp_path / "y.npz"), "--quiet"]) == 0
    rec = _json(capsys)
    assert rec["steps"] == 3 and rec["network_calls"] == 3 and rec["grid"] == "explicit"

    with pytest.raises(DiffusionLabError, match="needs classes"):
        resolve({**TINY, "sample": {**TINY["sample"], "guidance": 2.0}})
    with pytest.raises(DiffusionLabError, match="unknown conditional method"):
        resolve({**TINY, "sample": {**TINY["sample"], "method": "paint"}})


def test_oracle_sample_conditional(tmp_path, capsys):
    spec = ring_spec(6)
    spec["classes"] = [0, 1, 2, 0, 1, 2]
    (tmp_path / "cls.json").write_text(json.dumps(spec))
    out = tmp_path / "o.npy"
    assert main(["oracle", "sample", "--gmm", str(tmp_path / "cls.json"), "--class", "1", "--guidance", "2",
                 "--sampler", "ddim", "--nfe", "10", "--num", "6", "--out", str(out)]) == 0
    rec = _json(capsys)
    assert rec["evaluations_by_kind"]["doubled"] == 10 and np.load(out).shape == (6, 2)
    known = np.random.default_rng(1).normal(size=(5, 2))
    np.save(tmp_path / "k.npy", known)
    np.save(tmp_path / "m.npy", np.array([1, 0]))
    assert main(["oracle", "sample", "--gmm", "ring8", "--known", str(tmp_path / "k.npy"), "--mask",
                 str(tmp_path / "m.npy"), "--method", "smc:particles=3", "--nfe", "30", "--out", str(out)]) == 0
    rec = _json(capsys)
    assert rec["steps"] == 10 and rec["nfe_per_sample"] == 30
    assert np.array_equal(np.load(out)[:, 0], known[:, 0])
    spec8 = ring_spec()
    spec8["frames"] = 2
    (tmp_path / "f.json").write_text(json.dumps(spec8))
    np.save(tmp_path / "k2.npy", known.reshape(5, 2, 1))
    np.save(tmp_path / "m2.npy", np.array([[1], [0]]))
    assert main(["oracle", "sample", "--gmm", str(tmp_path / "f.json"), "--noise", "mixed:1.0", "--known",
                 str(tmp_path / "k2.npy"), "--mask", str(tmp_path / "m2.npy"), "--method", "replace", "--nfe", "20",
                 "--out", str(out)]) == 0
    assert np.load(out).shape == (5, 2, 1)
    assert main(["oracle", "sample", "--gmm", "ring8", "--known", str(tmp_path / "k.npy"), "--mask",
                 str(tmp_path / "m.npy"), "--out", str(out)]) == 2
    assert "needs --nfe" in capsys.readouterr().err
    assert main(["oracle", "sample", "--gmm", "ring8", "--class", "0", "--sampler", "ddim", "--nfe", "5",
                 "--out", str(out)]) == 2
    assert "needs \"classes\"" in capsys.readouterr().err


def test_bench_samplers_conditional(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "samplers", "--gmm", "ring8", "--process", "vp", "--mask", "first:1", "--methods",
                 "replace,smc:particles=2", "--nfe", "8,16", "--num", "20", "--known-rows", "2", "--json",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "| replace |" in text and "floor (exact vs exact)" in text
    rec = json.loads(out.read_text())["records"]
    assert len(rec) == 4 and all(r["ratio"] > 0 for r in rec)
    assert {(r["method"], r["steps"]) for r in rec} == {("replace", 8), ("replace", 16), ("smc:particles=2", 4),
                                                        ("smc:particles=2", 8)}
    assert main(["bench", "samplers", "--gmm", "ring8", "--mask", "first:2", "--nfe", "8"]) == 2
    assert "leave some" in capsys.readouterr().err
    assert main(["bench", "samplers", "--gmm", "ring8", "--methods", "smc", "--nfe", "8"]) == 2


def test_export_refuses_a_class_conditional_unet(run, tmp_path, capsys):
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 2
    assert "model.num_classes = 10" in capsys.readouterr().err and not (tmp_path / "exp").exists()
