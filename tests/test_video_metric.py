"""The moving-digits video metric (diffusionlab.metrics.video_digits, docs/video_metric.md).

Separation margins are set from the calibration table (10 seeds of 64 videos, docs/video_metric.md): each
threshold sits many standard deviations away from the measured value on both sides, so the tests can fail only
if the metric stops separating. Exact values (0 background, 0 jumps) are exact by construction for real videos
and proved in the module docstring.
"""

import json
import math

import numpy as np
import pytest
import torch

from diffusionlab.cli import main
from diffusionlab.data.video import moving_digits, render
from diffusionlab.errors import DiffusionLabError
from diffusionlab.metrics import video_digits as vd
from diffusionlab.metrics.digits import load_digits_split
from diffusionlab.metrics.video import GLYPH_CENTRE, digit_crops, digit_windows

F64 = torch.float64


def _real(n=64, split="test", seed=1, **kw):
    ds = moving_digits(num=n, split=split, seed=seed, **kw)
    return ds.to_display(ds.data), ds.labels


@pytest.fixture(scope="module")
def calibration():
    """Every calibration case at N = 64 (seed 0), without the real-value sets."""
    return {name: vd.evaluate_videos(x, real=False) for name, x in vd.calibration_cases(64, seed=0).items()}


def _v(table, case, figure):
    return table[case][figure]["value"]


# ---- the shipped network ------------------------------------------------------------------------------------
def test_shipped_weights_load_and_keep_their_stated_accuracy(tmp_path):
    meta = vd.read_metadata()
    assert meta["seed"] == str(vd.DEFAULT_SEED) and meta["steps"] == str(vd.DEFAULT_STEPS)
    net = vd.load_feature_net("cpu")
    assert sum(p.numel() for p in net.parameters()) == int(meta["parameters"])
    held = vd.heldout_figures(net, num=400)
    # stated on 2000 held-out videos in the metadata; on 400 the binomial sd is <= 0.011 (class) and 0.018 (kind)
    assert held["class_accuracy"] > float(meta["heldout_class_accuracy"]) - 0.04
    assert held["kind_accuracy"] > float(meta["heldout_kind_accuracy"]) - 0.06
    assert held["motion_rmse"] < 0.15
    with pytest.raises(DiffusionLabError, match="not found"):
        vd.load_feature_net("cpu", tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(DiffusionLabError, match="do not load"):
        vd.load_feature_net("cpu", bad)


def test_training_is_deterministic_by_seed(tmp_path):
    a = vd.train_feature_net(seed=3, steps=2, batch_size=8)
    b = vd.train_feature_net(seed=3, steps=2, batch_size=8)
    c = vd.train_feature_net(seed=4, steps=2, batch_size=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the very same operations: bit-identical
    assert not torch.equal(sa["fc.weight"], sc["fc.weight"])
    path = vd.save_feature_net(a, tmp_path / "net.safetensors", {"seed": 3})
    back = vd.load_feature_net("cpu", path)
    assert all(torch.equal(back.state_dict()[k], sa[k]) for k in sa)
    assert vd.read_metadata(path) == {"seed": "3"}
    with pytest.raises(DiffusionLabError, match="steps"):
        vd.train_feature_net(steps=0)


# ---- synthetic training videos --------------------------------------------------------------------------------
def test_render_matches_the_data_renderer():
    glyphs, _, _ = vd._glyphs("train")
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 9, (3, 5, 2), generator=g)
    ours = vd.render_videos(glyphs[:3, None].expand(3, 5, 8, 8), pos, 16)
    for i in range(3):  # pure copies of the same float32 values: equal bit for bit
        ref = render(glyphs[i:i + 1].numpy(), pos[i][:, None].numpy(), 16)
        assert torch.equal(ours[i, 0], torch.from_numpy(ref))


def test_synthetic_kinds_are_what_they_claim():
    b = vd.synthetic_videos(256, torch.Generator().manual_seed(1), split="test", noise=False)
    fm = vd.frame_measurements(b["videos"])
    steps = (fm["track"][:, 1:] - fm["track"][:, :-1]).norm(dim=-1)
    speed = b["motion"].double().norm(dim=1)
    kind = b["kind"]
    coherent = kind == 0
    # a rounded bouncing track moves at most speed + sqrt(2) per frame (module docstring)
    assert bool((steps[coherent].amax(1) <= speed[coherent] + math.sqrt(2) + 1e-9).all())
    assert bool((steps[kind == 1].amax(1) >= vd.MIN_TELEPORT - 1e-9).all())
    # a moved glyph keeps its multiset of pixel values; another glyph (almost surely) does not
    values = b["videos"][:, 0].flatten(2).sort(dim=2).values  # (N, F, S * S)
    changed = (values[:, 1:] != values[:, :1]).any(2).any(1)
    assert bool(changed[kind == 2].all()) and not bool(changed[kind != 2].any())
    assert bool((b["class_mask"] == (kind != 2)).all()) and bool((b["motion_mask"] == coherent).all())
    assert set(kind.tolist()) == {0, 1, 2, 3}


# ---- windows, tracks, motion ------------------------------------------------------------------------------------
def test_glyph_centre_and_centred_windows():
    x, _ = load_digits_split("train")
    r = torch.arange(8, dtype=F64)
    m = x[:, 0].double()
    ink = m.sum((1, 2))
    assert (m.sum(2) @ r / ink).mean().item() == pytest.approx(GLYPH_CENTRE[0], abs=1e-3)
    assert (m.sum(1) @ r / ink).mean().item() == pytest.approx(GLYPH_CENTRE[1], abs=1e-3)
    glyph = torch.zeros(8, 8)
    glyph[1:7, 1:7] = torch.rand(6, 6) + 0.1  # blank border: several windows hold all of its ink
    frames = torch.zeros(3, 1, 16, 16)
    for k, (rr, cc) in enumerate([(0, 0), (4, 3), (8, 8)]):
        frames[k, 0, rr:rr + 8, cc:cc + 8] = glyph
    rows, cols, best = digit_windows(frames, centred=True)
    assert rows.tolist() == [0, 4, 8] and cols.tolist() == [0, 3, 8]  # aligned as placed (centre 3.5 ~ 3.49, 3.58)
    torch.testing.assert_close(best, torch.full((3,), glyph.double().sum().item(), dtype=F64))
    first, _, _ = digit_windows(frames)
    assert first.tolist() == [0, 3, 7]  # raster order: the first window holding all ink (one row up)


def test_motion_statistics_on_known_tracks():
    f = torch.arange(6, dtype=F64)
    line = torch.stack([2 + 0.6 * f, 1 + 0.8 * f], 1)[None]  # speed 1, straight
    m = vd.motion_statistics(line)
    assert m["speed"] == pytest.approx(1.0) and m["straightness"] == pytest.approx(1.0)
    assert m["acceleration"] == pytest.approx(0.0, abs=1e-12) and m["jump_fraction"] == 0
    assert m["static_fraction"] == 0
    bounce = torch.tensor([[[0.0, 0], [1, 0], [2, 0], [1, 0]]], dtype=F64)  # out 2, back 1
    m = vd.motion_statistics(bounce)
    assert m["straightness"] == pytest.approx(1 / 3) and m["acceleration"] == pytest.approx(1.0)
    jump = torch.tensor([[[0.0, 0], [0, 1], [5, 1], [5, 2]]], dtype=F64)  # steps 1, 5, 1: one above 3 px
    assert vd.motion_statistics(jump)["jump_fraction"] == pytest.approx(1 / 3)
    still = torch.tensor([[[3.0, 3], [3.2, 3], [3, 3.3]]], dtype=F64)
    m = vd.motion_statistics(still)
    assert m["static_fraction"] == 1.0
    assert vd.motion_statistics(torch.zeros(2, 4, 2, dtype=F64))["straightness"] is None


@pytest.mark.parametrize("speed", [0.3, 1.0, 1.7, 2.6])
def test_real_tracks_never_jump(speed):
    """The jump bound of the module docstring, on real videos: no step is longer than speed + sqrt 2."""
    x, _ = _real(200, speed=speed, seed=2)
    track = vd.frame_measurements(vd.check_videos(x))["track"]
    assert (track[:, 1:] - track[:, :-1]).norm(dim=-1).max().item() <= speed + math.sqrt(2) + 1e-9
    assert vd.motion_statistics(track, speed)["jump_fraction"] == 0.0


# ---- separation and floor ---------------------------------------------------------------------------------------
REAL = "real held-out (test digits, other seed)"


def test_real_held_out_is_clean_consistent_and_moving(calibration):
    r = calibration[REAL]
    assert r["fvd"]["value"] < 10  # measured 4.5 +- 0.1
    assert r["frame_fd"]["value"] < 8  # 4.0 +- 0.3
    assert r["digit_all_same"]["value"] >= 0.95 and r["digit_agreement"]["value"] >= 0.99  # 1.0, 1.0
    assert r["background_mean"]["value"] == 0.0 and r["background_fraction"]["value"] == 0.0  # exact: no ink outside
    assert r["jump_fraction"]["value"] == 0.0 and r["static_fraction"]["value"] == 0.0  # exact (docstring bound)
    assert abs(r["speed"]["value"] - 1.09) < 0.05  # 1.093 +- 0.005
    assert r["empty_frames"]["value"] == 0.0 and r["class_coverage"]["value"] == 1.0


@pytest.mark.parametrize("case", ["frames shuffled across videos", "static (first frame repeated)",
                                  "jumping (position resampled every frame)", "uniform noise U[0, 1]",
                                  "Gaussian N(0.5, 0.5^2), clipped",
                                  "independent frames (same class, other videos)"])
def test_fvd_separates_broken_videos(calibration, case):
    # real held-out 4.5, a perfect model 8.3 +- 1.6; the broken sets measure 52 (static) to 680
    assert _v(calibration, case, "fvd") > 35 and _v(calibration, case, "fvd") > 5 * _v(calibration, REAL, "fvd")


def test_each_figure_flags_its_own_defect(calibration):
    c = calibration
    assert _v(c, "frames shuffled across videos", "digit_all_same") < 0.1  # 0.00
    assert _v(c, "frames shuffled across videos", "digit_agreement") < 0.5  # 0.31
    for case in ("jumping (position resampled every frame)", "frames shuffled across videos",
                 "independent frames (same class, other videos)"):
        assert _v(c, case, "jump_fraction") > 0.4  # 0.68-0.73, real 0
        assert _v(c, case, "acceleration") > 4  # 7-8, real 0.9
        assert _v(c, case, "speed") > 3  # 4.1-4.7, real 1.09
    static = "static (first frame repeated)"
    assert _v(c, static, "static_fraction") == 1.0 and _v(c, static, "speed") == 0.0
    for case in ("uniform noise U[0, 1]", "Gaussian N(0.5, 0.5^2), clipped"):
        assert _v(c, case, "background_mean") > 0.3 and _v(c, case, "frame_fd") > 25  # 0.48, 39-49
    assert _v(c, "perfect model + N(0, 0.1^2) pixel noise, clipped", "background_mean") > 0.02  # 0.039, real 0
    assert _v(c, "perfect model, frames blurred (Gaussian, sigma = 1 px)", "frame_fd") > 25  # 42, real 4-6
    # an image model without temporal coherence: crisp frames (frame FD as real), the motion gives it away
    indep = "independent frames (same class, other videos)"
    assert _v(c, indep, "frame_fd") < 2 * _v(c, REAL, "frame_fd")


def test_real_values_and_a_perfect_model_sit_at_the_floor():
    x, _ = _real(64, split="train", seed=123)
    m = vd.evaluate_videos(x)
    json.dumps(m, allow_nan=False)
    assert m["calibrated"] is True and m["num"] == 64 and m["data_speed"] == 1.0
    fvd = m["fvd"]
    # a new set of train-split videos against the real values (mean, sd of 5 such sets); sd ~ 1.6 at N = 64
    assert fvd["real_sd"] > 0 and abs(fvd["value"] - fvd["real"]) < 4 * fvd["real_sd"] + 1.0
    assert abs(m["speed"]["value"] - m["speed"]["real"]) < 0.05
    assert m["digit_all_same"]["real"] == 1.0 and m["jump_fraction"]["real"] == 0.0


# ---- shapes, devices, bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("frames,size", [(2, 16), (3, 9), (4, 8)])
def test_other_shapes(frames, size):
    x, _ = _real(8, frames=frames, size=size, seed=5)
    m = vd.evaluate_videos(x.double(), device=torch.device("cpu"), real=False)
    json.dumps(m, allow_nan=False)
    assert m["calibrated"] is False and m["frames"] == frames and m["size"] == size
    assert (m["acceleration"]["value"] is None) == (frames == 2)
    assert (m["background_mean"]["value"] is None) == (size == 8)
    assert m["digit_all_same"]["value"] == 1.0 and m["fvd"]["real"] is None


def test_same_result_for_array_and_tensor_input():
    x, _ = _real(8, seed=6)
    a = vd.evaluate_videos(x, real=False)
    b = vd.evaluate_videos(x.numpy().astype(np.float64), device="cpu", real=False)
    for k in ("fvd", "frame_fd", "speed", "digit_agreement"):
        assert a[k]["value"] == pytest.approx(b[k]["value"], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(4, 1, 16, 16), "rank 5"),
    (torch.zeros(4, 3, 8, 16, 16), "grey"),
    (torch.zeros(1, 1, 8, 16, 16), "at least 2 videos"),
    (torch.zeros(4, 1, 1, 16, 16), "at least 2 frames"),
    (torch.zeros(4, 1, 8, 16, 12), "square"),
    (torch.zeros(4, 1, 8, 6, 6), "at least 8x8"),
    (torch.full((4, 1, 8, 16, 16), 1.5), "must lie in \\[0, 1\\]"),
    (torch.full((4, 1, 8, 16, 16), -0.2), "must lie in \\[0, 1\\]"),
    (torch.full((4, 1, 8, 16, 16), float("nan")), "NaN"),
    (torch.zeros(4, 1, 8, 16, 16, dtype=torch.complex64), "real numbers"),
    (np.array([["a"]] * 4), "real numbers"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(DiffusionLabError, match=match):
        vd.evaluate_videos(bad, real=False)


def test_bad_options_are_clear_errors():
    x, _ = _real(4, seed=7)
    with pytest.raises(DiffusionLabError, match="speed"):
        vd.evaluate_videos(x, speed=-1)
    with pytest.raises(DiffusionLabError, match="device"):
        vd.evaluate_videos(x, device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(DiffusionLabError, match="not available"):
            vd.evaluate_videos(x, device="cuda")


# ---- the CLI ----------------------------------------------------------------------------------------------------
def _tiny_video_run(run, capsys, *extra: str):
    """The packaged video recipe (class-conditional) shrunk to 2 steps on 8 short videos, trained into ``run``."""
    sets = ["data.num=8", "data.frames=4", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
            "train.log_every=1", "train.device=cpu", "model.base_channels=8", "model.channel_mults=[1, 2]",
            "model.temporal_attn_resolutions=[8]", "sample.steps=3", *extra]
    argv = ["train", "video", "--out", str(run), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    capsys.readouterr()


def test_evaluate_prints_the_video_metric_for_a_tiny_video_run(tmp_path, capsys):
    run = tmp_path / "run"
    _tiny_video_run(run, capsys)
    assert main(["evaluate", "--run", str(run), "--num", "4", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("fvd", "frame_fd", "digit_all_same", "digit_agreement", "background_mean", "speed", "straightness",
              "jump_fraction", "static_fraction"):
        assert set(out[k]) == {"value", "real", "real_sd"}
    assert out["num"] == 4 and out["frames"] == 4 and out["sampler"] == "ddim" and out["steps"] == 3
    assert out["calibrated"] is False  # 4 frames


def test_evaluate_samples_a_class_conditional_run_with_its_classes_and_guidance(tmp_path, capsys):
    """The sample section's classes (or --class / --guidance) reach evaluate's sampling; a doubled guidance batch
    is one network call per step."""
    run = tmp_path / "run"
    _tiny_video_run(run, capsys, "sample.guidance=1")  # the recipe's classes, no guidance
    assert main(["evaluate", "--run", str(run), "--num", "4", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == list(range(10)) and out["guidance"] == 1.0 and out["network_calls"] == 3
    assert main(["evaluate", "--run", str(run), "--num", "4", "--quiet", "--class", "3", "--guidance", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == [3] and out["guidance"] == 2.0 and out["network_calls"] == 3  # 3 doubled calls
    assert main(["evaluate", "--run", str(run), "--metric", "elbo", "--class", "3"]) == 2
    assert "--class applies to --metric digits" in capsys.readouterr().err


def test_video_branch_refuses_two_digit_runs():
    from diffusionlab.commands import _video_speed

    class DS:
        name = "moving_digits"

    assert _video_speed({"data": {"name": "moving_digits", "speed": 1.5}}, DS, "r") == 1.5
    assert _video_speed({"data": {"name": "moving_digits"}}, DS, "r") == 1.0
    with pytest.raises(DiffusionLabError, match="one-digit"):
        _video_speed({"data": {"name": "moving_digits", "num_digits": 2}}, DS, "r")


def test_calibration_table_and_module_cli(capsys):
    table = vd.calibration_table(n=4, seeds=1)
    assert len(table) == 10 and all(len(v) == 1 for row in table.values() for v in row.values())
    text = vd.format_table(table, 4)
    assert text.count("\n") == 11 and "static (first frame repeated) | 4 |" in text
    assert vd.main(["--train", "--steps", "0"]) == 2
    assert "steps must be an int >= 1" in capsys.readouterr().err
