"""The trainer's plumbing: gradient accumulation, fp16 with a gradient scaler, learning-rate schedules, TensorBoard,
periodic sample grids and the throughput in the summary."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffusionlab.cli import main
from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.config import resolve
from diffusionlab.training.schedule import lr_at
from diffusionlab.training.trainer import build_parts, draw_inputs, train, train_step
from rounding import sum_rtol, unit_roundoff

TINY = {"data": {"name": "ring", "num": 512}, "process": {"name": "vp", "T": 100},
        "model": {"name": "mlp", "hidden": 32, "depth": 2, "emb_dim": 16},
        "train": {"steps": 10, "batch_size": 32, "lr": 1e-3, "warmup": 0, "seed": 3, "device": "cpu", "threads": 1,
                  "grad_clip": 0.0, "log_every": 5, "checkpoint_every": 5},
        "sample": {"sampler": "ddim", "steps": 4}}


def _cli(args) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in args])
    return rc, err.getvalue().strip().splitlines()


def _cfg_file(tmp: Path, cfg: dict) -> Path:
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# ---- gradient accumulation ------------------------------------------------------------------------------------
def _per_sample_magnitude(p, step: int, noise_state: torch.Tensor) -> list[torch.Tensor]:
    """``S = sum_i |grad l_i| / B`` per parameter element at the weights of ``p``: the scale of the rounding of a
    sum of the B per-sample gradients (they have both signs)."""
    x0 = p.batches.get(step)
    t, noise = draw_inputs(p.objective, p.process, x0, torch.Generator().set_state(noise_state))
    model = copy.deepcopy(p.model)
    out = [torch.zeros_like(q) for q in model.parameters()]
    for i in range(len(x0)):
        model.zero_grad()
        p.objective(model, x0[i:i + 1], t=t[i:i + 1], noise=noise[i:i + 1]).float().mean().backward()
        for s, q in zip(out, model.parameters()):
            s += q.grad.abs() / len(x0)
    return out


@pytest.mark.parametrize("k", [4, 32])
def test_accumulated_gradient_is_the_large_batch_gradient_to_rounding(k):
    """At the same weights and the same batch, k micro-batches of 32 / k give the gradient of one batch of 32, up
    to the order in which the 32 per-sample gradients are summed: two orders of a sum of B terms of either sign
    differ by at most 2 (B - 1) u sum_i |g_i| (Higham 2002, eq. 4.4), within rounding.sum_rtol(B) * S. A wrong scale
    (no 1 / k), another batch or other noise would be off by the size of the gradient itself."""
    a, b = build_parts(resolve(TINY)), build_parts(resolve(TINY, [f"train.accumulate={k}"]))
    for step in range(5):  # away from the zero-initialised output layers
        train_step(a, step)
    b.model.load_state_dict(a.model.state_dict())
    state = a.generators["noise"].get_state()
    b.generators["noise"].set_state(state)
    scale = _per_sample_magnitude(a, 5, state)
    la, lb = train_step(a, 5), train_step(b, 5)
    # the losses: a mean of 32 non-negative terms against a mean of k means
    torch.testing.assert_close(lb[0], la[0], rtol=sum_rtol(32, torch.float32), atol=0)
    tol = sum_rtol(32, torch.float32)
    for s, qa, qb in zip(scale, a.model.parameters(), b.model.parameters()):
        assert bool(((qa.grad - qb.grad).abs() <= tol * s + unit_roundoff(torch.float32) * qa.grad.abs()).all())
    assert max(float(q.grad.abs().max()) for q in a.model.parameters()) > 100 * tol  # the bound is not vacuous


def test_accumulation_follows_the_large_batch_trajectory(tmp_path):
    """10 AdamW steps with accumulate 4 stay within 1e-3 lr per step of the plain run in every weight; rounding-level
    gradient differences (above) move AdamW's normalised update by a like relative amount, while one step on another
    batch moves weights by about lr (the control)."""
    runs = {}
    for name, extra in (("plain", []), ("acc", ["train.accumulate=4"]), ("other", ["train.seed=4"])):
        train(resolve(TINY, extra), tmp_path / name, progress=False, log=lambda m: None)
        runs[name] = load_file(str(tmp_path / name / "model_raw.safetensors"))
    lr, steps = TINY["train"]["lr"], TINY["train"]["steps"]
    diff = max(float((runs["plain"][k] - runs["acc"][k]).abs().max()) for k in runs["plain"])
    other = max(float((runs["plain"][k] - runs["other"][k]).abs().max()) for k in runs["plain"])
    assert diff <= 1e-3 * lr * steps < other, (diff, other)


def test_accumulate_must_divide_the_batch():
    with pytest.raises(DiffusionLabError, match="does not divide into train.accumulate = 3"):
        resolve(TINY, ["train.accumulate=3"])
    with pytest.raises(DiffusionLabError, match="train.accumulate must be an integer"):
        resolve(TINY, ["train.accumulate=0"])


# ---- fp16 with a gradient scaler ----------------------------------------------------------------------------------
def _poison_steps(monkeypatch, calls: set[int], factor: float):
    """Multiply the training loss of the given calls by ``factor``."""
    import diffusionlab.objectives as objectives

    real, n = objectives.make_objective, {"calls": 0}

    def poisoned(cfg, process):
        obj = real(cfg, process)

        def some_huge(model, x0, **kw):
            loss = obj(model, x0, **kw)
            if torch.is_grad_enabled():
                n["calls"] += 1
                if n["calls"] in calls:
                    return loss * factor
            return loss

        return some_huge

    monkeypatch.setattr(objectives, "make_objective", poisoned)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_fp16_overflow_steps_are_skipped_and_reported(tmp_path, monkeypatch, precision):
    """Steps 3 and 7 get a loss 1e8 times too large: finite in float32, but its gradient overflows float16 (max
    65504) once scaled -- fp16 skips those two steps, counts and reports them (the warning names the scaler and its
    halved scale), and the scaler's scale ends at 2^16 / 4; under fp32 the same steps are taken (clipped), none
    skipped."""
    _poison_steps(monkeypatch, {3, 7}, 1e8)
    cfg = copy.deepcopy(TINY)
    cfg["train"].update(precision=precision, grad_clip=1.0, steps=10, log_every=10)
    run = tmp_path / "run"
    rc, lines = _cli(["train", _cfg_file(tmp_path, cfg), "--out", run, "--quiet"])
    assert rc == 0, lines
    summary = json.loads((run / "train_summary.json").read_text())
    if precision == "fp32":
        assert summary["skipped_steps"] == 0 and "grad_scale" not in summary
        return
    assert summary["skipped_steps"] == 2 and summary["grad_scale"] == 2.0 ** 14
    warn = [line for line in lines if "were skipped" in line]
    assert len(warn) == 1 and "2 of the 10 steps up to step 10" in warn[0], lines
    assert "overflowed the gradient scaler's scale (now 16384)" in warn[0], warn
    assert lines[-1].endswith(f"(2 skipped: non-finite loss or gradient); weights: {run / 'model.safetensors'}")


def test_an_overflowing_step_changes_nothing_but_the_scale():
    p = build_parts(resolve(TINY, ["train.precision=fp16"]))
    for k in range(3):
        assert train_step(p, k)[2].item() == 1.0
    weights = [q.detach().clone() for q in p.params]
    ema = {k: v.clone() for k, v in p.ema.state_dict().items()}
    p.scaler.update(2.0 ** 60)  # any gradient overflows float16 at this scale
    stats = train_step(p, 3)
    assert stats[2].item() == 0.0 and math.isfinite(stats[0].item())  # a finite loss: an overflow, not a NaN
    assert all(torch.equal(a, b) for a, b in zip(weights, p.params))
    assert all(torch.equal(ema[k], v) for k, v in p.ema.state_dict().items())
    assert p.scaler.get_scale() == 2.0 ** 59


# ---- learning-rate schedules ---------------------------------------------------------------------------------------
def test_a_list_schedule_interpolates_its_knots_by_their_shapes():
    knots = [[0, 0.0], [10, 1e-3, "cosine"], [20, 1e-4, "constant"], [30, 5e-5]]
    cfg = resolve(TINY, [f"train.lr_schedule={json.dumps(knots)}", "train.steps=100"])["train"]
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(5e-4)  # linear from 0 to 1e-3
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(15, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 2)))  # half a cosine
    assert lr_at(19, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at(20, cfg) == lr_at(29, cfg) == pytest.approx(1e-4)  # a step
    assert lr_at(30, cfg) == lr_at(99, cfg) == 5e-5  # the last value afterwards
    warm = dict(cfg, warmup=4)
    assert lr_at(11, warm) == lr_at(11, cfg) and lr_at(1, warm) == pytest.approx(lr_at(1, cfg) * 2 / 4)


def test_a_named_schedule_over_a_horizon_is_the_same_schedule_whatever_train_steps_says():
    from diffusionlab.training.schedule import over_horizon

    for name in ("cosine", "linear"):
        for warm in (0, 7):
            cfg = resolve(TINY, [f"train.warmup={warm}", "train.steps=50", f"train.lr_schedule={name}"])["train"]
            pinned = dict(cfg, lr_schedule=over_horizon(cfg, 50), steps=10)  # a segment's train.steps
            for step in range(60):  # lr (1 - f) as lr - lr f: a few ulps of lr apart at most
                assert abs(lr_at(step, pinned) - lr_at(step, cfg)) <= 4 * unit_roundoff(torch.float64) * cfg["lr"], \
                    (name, warm, step)
            assert lr_at(10, dict(cfg, steps=10)) == 0.0 < lr_at(10, pinned)  # what the segment alone would do
    const = resolve(TINY, ["train.lr_schedule=constant"])["train"]
    assert over_horizon(const, 50) == "constant"
    with pytest.raises(DiffusionLabError, match="exceed train.warmup"):
        over_horizon(resolve(TINY, ["train.warmup=10", "train.lr_schedule=cosine"])["train"], 10)


def test_named_schedules_after_the_warm_up():
    cfg = resolve(TINY, ["train.warmup=10", "train.steps=110", "train.lr_schedule=linear"])["train"]
    assert lr_at(4, cfg) == pytest.approx(5e-4) and lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5e-4) and lr_at(110, cfg) == 0.0
    cos = dict(cfg, lr_schedule="cosine")
    assert lr_at(60, cos) == pytest.approx(5e-4) and lr_at(35, cos) == pytest.approx(1e-3 * 0.5 * (1 + 2 ** -0.5))


@pytest.mark.parametrize("value, fragment", [
    ("[[1, 1e-3]]", "the first knot must be at step 0"),
    ("[[0, 1e-3], [5, 1e-4], [5, 1e-5]]", "the steps must increase"),
    ("[[0, 1e-3], [5, 2.0]]", "the learning rate must be a number in [0, 1)"),
    ("[[0, 1e-3, wiggly]]", "the shape must be one of linear, cosine, constant"),
    ("[[0]]", "must be [step, lr] or [step, lr, shape]"),
    ("[]", "a non-empty list"),
    ("exponential", "must be one of constant, cosine, linear"),
])
def test_bad_schedules_are_refused_naming_the_knot(value, fragment):
    with pytest.raises(DiffusionLabError, match="train.lr_schedule") as e:
        resolve(TINY, [f"train.lr_schedule={value}"])
    assert fragment in str(e.value)


def test_the_log_records_the_schedules_learning_rate(tmp_path):
    knots = [[0, 1e-3], [10, 1e-4]]
    cfg = resolve(TINY, [f"train.lr_schedule={json.dumps(knots)}"])
    train(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    logged = {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows}
    assert logged == {5: pytest.approx(lr_at(4, cfg["train"]), rel=1e-5), 10: pytest.approx(lr_at(9, cfg["train"]),
                                                                                         rel=1e-5)}


# ---- TensorBoard ---------------------------------------------------------------------------------------------------
def _events(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return {"scalars": {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]},
            "images": {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}}


def test_tensorboard_events_match_the_csv_log_and_continue_after_a_resume(tmp_path):
    """Scalars at every log row (equal to log.csv's), the sample grids as images; a run resumed from step 5 after
    its step-10 events were written (a crash before the step-10 checkpoint) replaces them: one value per step."""
    pytest.importorskip("tensorboard")
    import shutil

    run = tmp_path / "run"
    over = ["train.tensorboard=true", "train.sample_every=5"]
    train(resolve(TINY, over), run, progress=False, log=lambda m: None)
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    train(resolve(TINY, over), run, resume=True, progress=False, log=lambda m: None)
    ev = _events(run)
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert [s for s, _ in ev["scalars"]["train/loss"]] == [int(r[0]) for r in rows] == [5, 10]
    for (_, v), r in zip(ev["scalars"]["train/loss"], rows):
        assert v == pytest.approx(float(r[1]), rel=1e-5)
    assert {"train/lr", "train/grad_norm", "train/skipped_steps", "train/samples_per_second"} <= set(ev["scalars"])
    assert ev["images"]["samples"] == [5, 10]


def test_tensorboard_without_the_package_is_one_warning(tmp_path, monkeypatch):
    import diffusionlab.training.tensorboard as tb

    monkeypatch.setattr(tb, "tensorboard_available", lambda: False)
    lines = []
    train(resolve(TINY, ["train.tensorboard=true", "train.steps=2"]), tmp_path / "run", progress=False,
          log=lines.append)
    assert [line for line in lines if "tensorboard" in line] == [
        "diffusionlab: warning: train.tensorboard is on but the tensorboard package is not installed (pip install "
        "diffusionlab[tensorboard]); training goes on with log.csv only"]
    assert (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "tensorboard").exists()


# ---- periodic samples and the summary ------------------------------------------------------------------------------
SAMPLED = {
    "points": {"data": {"name": "ring", "num": 64}, "model": {"name": "mlp", "hidden": 8, "depth": 1, "emb_dim": 8},
               "sample": {"sampler": "dpmpp-2m", "steps": 3, "num": 16}},
    "images": {"data": {"name": "digits"}, "model": {"name": "unet", "base_channels": 8, "channel_mults": [1],
                                                     "num_res_blocks": 1, "attn_resolutions": []},
               "sample": {"sampler": "ddpm", "steps": 3, "num": 4}},
    "videos": {"data": {"name": "moving_digits", "num": 8, "frames": 3, "size": 8},
               "model": {"name": "video_unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1,
                         "attn_resolutions": []},
               "sample": {"sampler": "unipc", "steps": 3, "num": 3}},
}


@pytest.mark.parametrize("kind", sorted(SAMPLED))
def test_sample_grids_every_n_steps_are_written_atomically(tmp_path, kind):
    import imageio.v3 as iio

    cfg = {**SAMPLED[kind], "process": {"name": "vp", "T": 20},
           "train": {"steps": 4, "batch_size": 4, "sample_every": 2, "device": "cpu", "threads": 1}}
    run = tmp_path / "run"
    summary = train(resolve(cfg), run, progress=False, log=lambda m: None)
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step_00000002.png", "step_00000004.png"], grids
    for g in grids:
        arr = np.asarray(iio.imread(run / "samples" / g))
        assert arr.ndim in (2, 3) and min(arr.shape[:2]) > 8
    assert not [p for p in run.rglob("*") if p.name.startswith(".dltmp.")]
    assert summary["samples_per_second"] > 0 and summary["data"] == "in memory"
