"""Training end to end on tiny configs: exact resume (also after SIGKILL), NaN guard, sampling from a run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusionlab.cli import main
from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.config import resolve
from diffusionlab.training.trainer import train

from ports import free_port

TINY = {
    "data": {"name": "ring", "num": 2000},
    "process": {"name": "vp", "T": 100},
    "model": {"name": "mlp", "hidden": 32, "depth": 2, "emb_dim": 16},
    "train": {"steps": 40, "batch_size": 64, "lr": 1e-3, "warmup": 5, "checkpoint_every": 10, "log_every": 5,
              "seed": 3, "device": "cpu"},
    "sample": {"sampler": "ddpm", "steps": 100, "num": 16},
}


def _weights(run) -> dict:
    return load_file(str(Path(run) / "model.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def test_resume_reaches_the_same_weights_bit_for_bit(tmp_path):
    full = tmp_path / "full"
    train(resolve(TINY), full, progress=False)
    # "interrupted" run: the same config, stopped after 20 of 40 steps by a NaN-free early exit is not
    # possible without a kill, so train a 20-step prefix of the same trajectory (constant LR after warm-up,
    # so the first 20 steps are identical) and then resume it with the full step count.
    part = tmp_path / "part"
    train(resolve(TINY, ["train.steps=20"]), part, progress=False)
    (part / "model.safetensors").unlink()
    train(resolve(TINY), part, resume=True, progress=False)
    _assert_same_weights(full, part)
    raw_a = load_file(str(full / "model_raw.safetensors"))
    raw_b = load_file(str(part / "model_raw.safetensors"))
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    # and the loss log has one row per logged step, none duplicated by the resume
    steps = [int(line.split(",")[0]) for line in (part / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(5, 41, 5))


def test_different_seed_gives_different_weights(tmp_path):
    train(resolve(TINY, ["train.steps=10"]), tmp_path / "a", progress=False)
    train(resolve(TINY, ["train.steps=10", "train.seed=4"]), tmp_path / "b", progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    train(resolve(TINY, ["train.steps=5"]), tmp_path / "r", progress=False)
    with pytest.raises(DiffusionLabError, match="already holds a run"):
        train(resolve(TINY, ["train.steps=5"]), tmp_path / "r", progress=False)


def test_nan_steps_are_skipped_then_stop_with_intact_checkpoint(tmp_path, monkeypatch):
    import diffusionlab.objectives as objectives

    real = objectives.make_objective
    calls = {"n": 0}

    def poisoned(cfg, process):
        obj = real(cfg, process)

        def wrapped(model, x0, generator=None, **kw):
            if torch.is_grad_enabled():  # count training steps, not the trainer's no-grad shape check
                calls["n"] += 1
            loss = obj(model, x0, generator=generator, **kw)
            # steps 13, 14 and from 21 on produce NaN
            return loss * float("nan") if calls["n"] in (13, 14) or calls["n"] >= 21 else loss

        return wrapped

    monkeypatch.setattr(objectives, "make_objective", poisoned)
    cfg = resolve(TINY, ["train.max_bad_steps=3"])
    with pytest.raises(DiffusionLabError, match="3 consecutive steps with a non-finite loss") as e:
        train(cfg, tmp_path / "nan", progress=False)
    assert "last checkpoint (step 20) is intact" in str(e.value)
    ck = tmp_path / "nan" / "checkpoints" / "step_00000020"
    weights = load_file(str(ck / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    log = (tmp_path / "nan" / "log.csv").read_text().splitlines()
    assert log[-1].split(",")[-1] == "2"  # the two isolated NaN steps were skipped and counted by step 20


def _write_config(path: Path, overrides: dict) -> Path:
    import yaml

    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in overrides.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    cfg = _write_config(tmp_path / "cfg.yaml", {"train": {"steps": 1000, "checkpoint_every": 50, "log_every": 50}})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "diffusionlab", "train", str(cfg), "--quiet", "--set", "train.threads=1"]
    ref = tmp_path / "ref"
    subprocess.run(cmd + ["--out", str(ref)], env=env, check=True, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckdir = run / "checkpoints"
    while time.time() < deadline:
        done = [p for p in ckdir.glob("step_*")] if ckdir.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"
    res = subprocess.run(cmd + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    _assert_same_weights(ref, run)


def test_sample_cli_writes_npz_and_png(tmp_path, capsys):
    run = tmp_path / "run"
    train(resolve(TINY, ["train.steps=5"]), run, progress=False)
    out = tmp_path / "s.npz"
    assert main(["sample", "--run", str(run), "--sampler", "ddim", "--steps", "10", "--num", "7", "--seed", "1",
                 "--out", str(out), "--quiet"]) == 0
    x = np.load(out)["x"]
    assert x.shape == (7, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert main(["sample", "--run", str(run), "--sampler", "ddpm", "--num", "5", "--out", str(tmp_path / "s.png"),
                 "--quiet"]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    # same seed, same samples
    out2 = tmp_path / "s2.npz"
    main(["sample", "--run", str(run), "--sampler", "ddim", "--steps", "10", "--num", "7", "--seed", "1",
          "--out", str(out2), "--quiet"])
    assert np.array_equal(np.load(out2)["x"], x)


def _losses(run) -> list[float]:
    return [float(line.split(",")[1]) for line in (Path(run) / "log.csv").read_text().splitlines()[1:]]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch follows the 1-process loss trajectory."""
    cfg = _write_config(tmp_path / "cfg.yaml", {"train": {"steps": 30, "log_every": 5, "checkpoint_every": 10}})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = ["-m", "diffusionlab", "train", str(cfg), "--quiet", "--set", "train.threads=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *base, "--out", str(one)], env=env, check=True, capture_output=True, timeout=600)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), *base, "--out", str(two)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6  # one row per logged step: rank 1 wrote nothing
    # float tolerance: the all-reduce sums the two half-batch gradients in another order than one process does
    assert np.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)
    assert json_load(two / "train_summary.json")["world_size"] == 2
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]
    wa, wb = _weights(one), _weights(two)
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
    # the same with each rank streaming its slice of the batch through a loader worker and accumulating it in two
    # micro-batches (DDP all-reduces once per step, after the second): the same trajectory to the same tolerance
    # (accumulation reorders the gradient sum once more, by as little)
    three = tmp_path / "three"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), *base, "--set", "data.stream=true", "--set",
                          "data.workers=1", "--set", "train.accumulate=2", "--out", str(three)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json_load(three / "train_summary.json")["data"] == "streamed"
    assert np.allclose(a, _losses(three), rtol=1e-4, atol=1e-6), (a, _losses(three))
    wc = _weights(three)
    assert all(torch.allclose(wa[k], wc[k], rtol=1e-4, atol=1e-6) for k in wa)


def test_batch_must_divide_by_world_size():
    from diffusionlab.training.distributed import Distributed

    with pytest.raises(DiffusionLabError, match="does not divide by the 3 processes"):
        Distributed(world_size=3).local_batch(64)


def json_load(path):
    import json

    return json.loads(Path(path).read_text())
