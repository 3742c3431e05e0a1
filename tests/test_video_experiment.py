"""The noise-prior experiment: training until the metric stops improving, the plan of arms, configs that
validate, the expected time stated first, results under --out and docs/ written only when asked."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.experiments import noise_prior as npx
from diffusionlab.experiments.video_runs import (converged, frames_as_videos, improved, sample_run,
                                                 train_until_converged)


def test_convergence_rule():
    assert improved(9.0, None, 0.05) and improved(9.0, 10.0, 0.05) and not improved(9.6, 10.0, 0.05)
    pts = [{"fvd": v} for v in (10.0, 8.0, 7.9, 7.8, 7.7)]  # gains under 5 % after step 2: three in a row
    assert converged(pts, "fvd", 3, 0.05) and not converged(pts[:4], "fvd", 3, 0.05)
    assert not converged(pts + [{"fvd": 5.0}], "fvd", 3, 0.05)  # a late gain resets the count


def _toy(tmp_path):
    return {"data": {"name": "ring", "num": 64}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
            "process": {"name": "vp", "T": 20}, "train": {"batch_size": 8, "warmup": 1, "device": "cpu"},
            "sample": {"sampler": "ddim", "steps": 2}}


def test_train_until_converged_stops_keeps_the_best_and_resumes(tmp_path):
    scores = iter([10.0, 8.0, 7.9, 7.95, 7.8, 1.0])
    calls = []

    def evaluate(run):
        calls.append(run)
        return {"fvd": next(scores)}

    rec = train_until_converged(_toy(tmp_path), tmp_path / "run", evaluate, eval_every=2, max_steps=20, patience=3,
                                min_delta=0.05, log=lambda m: None)
    assert [p["step"] for p in rec["curve"]] == [2, 4, 6, 8, 10] and rec["converged"] and rec["done"]
    assert rec["best_step"] == 10 and rec["steps"] == 10 and rec["train_cpu_s"] > 0
    # best.safetensors: the EMA weights at the lowest score (7.8 at step 10, the last one here)
    assert (tmp_path / "run" / "best.safetensors").read_bytes() == (tmp_path / "run" / "model.safetensors").read_bytes()
    again = train_until_converged(_toy(tmp_path), tmp_path / "run", evaluate, 2, 20, log=lambda m: None)
    assert again["curve"] == rec["curve"] and len(calls) == 5  # reused, nothing trained or evaluated again
    with pytest.raises(DiffusionLabError, match="eval_every"):
        train_until_converged(_toy(tmp_path), tmp_path / "other", evaluate, 0, 20)
    # the best weights sample on the device "auto" resolves to (the final scoring's path)
    x = sample_run(tmp_path / "run", {"sampler": "ddim", "steps": 2}, 4, 0, weights="best.safetensors", device="auto")
    assert x.shape == (4, 2) and torch.isfinite(x).all()


def test_segments_follow_one_lr_schedule_and_equal_one_uninterrupted_run(tmp_path):
    """A cosine schedule decays over max_steps, not over each segment: three segments of 2 steps give the weights
    of one 6-step run (the trainer resumes exactly; the two schedules' learning rates agree to a few ulps)."""
    from diffusionlab.io import load_weights
    from diffusionlab.training.config import resolve
    from diffusionlab.training.trainer import train

    user = _toy(tmp_path)
    user["train"].update(lr_schedule="cosine", warmup=2)
    scores = iter([10.0, 9.0, 8.0])
    rec = train_until_converged(user, tmp_path / "seg", lambda run: {"fvd": next(scores)}, eval_every=2,
                                max_steps=6, min_steps=6, log=lambda m: None)
    assert rec["steps"] == 6
    one = resolve({**user, "train": {**user["train"], "steps": 6}})
    train(one, tmp_path / "one", progress=False, log=lambda m: None)
    a, b = load_weights(tmp_path / "seg" / "model.safetensors"), load_weights(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    # both runs do the same float32 operations on the same machine; only the learning rate is computed two ways,
    # a few float64 ulps apart (the schedule test), which can flip at most the last bit of an update: a few float32
    # ulps after 6 Adam steps (measured: identical). rtol 1e-5 is ~80 ulps; the old behaviour is 1e-3 away.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    # the same run with the segment's own cosine (the old behaviour) ends elsewhere (measured: 1.2e-3 at weights of
    # size ~1), so the comparison above can fail
    bad = resolve({**user, "train": {**user["train"], "steps": 2}})
    train(bad, tmp_path / "bad", progress=False, log=lambda m: None)
    for s in (4, 6):
        train(dict(bad, train={**bad["train"], "steps": s}), tmp_path / "bad", resume=True, progress=False,
              log=lambda m: None)
    c = load_weights(tmp_path / "bad" / "model.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


def test_frames_as_videos():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(6, 1, 2, 2)
    v = frames_as_videos(x, 3)
    assert v.shape == (2, 1, 3, 2, 2) and torch.equal(v[1, :, 2], x[5])


def _options(argv):
    p = argparse.ArgumentParser()
    npx.add_arguments(p)
    return npx.options(p.parse_args(argv))


TINY = ["--set", "data.frames=4", "--set", "data.size=8", "--set", "model.base_channels=8",
        "--set", "model.channel_mults=[1,2]", "--set", "model.temporal_attn_resolutions=[4]",
        "--set", "train.batch_size=2", "--set", "train.warmup=1", "--max-steps", "2", "--eval-every", "1",
        "--min-steps", "2", "--pretrain-max-steps", "2", "--eval-num", "3", "--final-num", "3",
        "--sample-steps", "2", "--num-train", "6", "--device", "cpu"]


def test_plan_and_every_arm_config_validates(tmp_path):
    from diffusionlab.training.config import resolve

    o = _options(["--preset", "cpu"])
    arms = npx.plan(o)
    main = [a for a in arms if a["alpha"] == 1.0 and a["loss"] == "mahalanobis"]
    assert len(main) == 2 * 4 * 3 and len(o["seeds"]) >= 3
    names = {a["name"] for a in arms}
    assert {"mixed-a0.5", "progressive-a2", "mixed-mse", "fitted-mse"} <= names
    image = resolve(npx.image_config(o))
    assert image["model"]["name"] == "unet" and image["data"]["name"] == "moving_digit_frames"
    for arm in arms:
        cfg = resolve(npx.arm_config(arm, o, tmp_path / "pre"))
        assert cfg["train"]["seed"] == arm["seed"] and cfg["process"]["noise"].split(":")[0] in (
            "iid", "mixed", "progressive", "fitted")
        assert (cfg["train"]["init_from"] is not None) == (arm["setting"] == "finetune")
        assert cfg["objective"]["weighting"] == ("mse" if arm["loss"] == "mse" else "simple")
    q = _options(["--quick"])
    assert q["preset"] == "quick" and not q["sweep"]
    f = _options(["--preset", "cpu-finetune"])  # the one-sitting preset: the fine-tuned main grid, equal compute
    arms = npx.plan(f)
    assert {a["setting"] for a in arms} == {"finetune"} and len(arms) == 4 * 3 and f["min_steps"] == f["max_steps"]
    assert _options(["--preset", "cpu-finetune", "--settings", "scratch,finetune"])["settings"] == ["scratch",
                                                                                                      "finetune"]
    with pytest.raises(DiffusionLabError, match="unknown setting"):  # an empty --settings is an error, no fallback
        _options(["--preset", "cpu-finetune", "--settings", ""])
    with pytest.raises(DiffusionLabError, match="unknown noise prior"):
        _options(["--priors", "iid,pink"])


def test_experiment_end_to_end_tiny_writes_only_under_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = _options(["--quick", "--priors", "iid,mixed", "--seeds", "0", *TINY])
    msgs = []
    out = tmp_path / "exp"
    res = npx.run_experiment(o, out, None, log=msgs.append)
    assert "expect at most" in msgs[0]  # the time is stated before anything is trained
    assert not (tmp_path / "docs").exists()
    for name in ("results.json", "results.md", "curves.png", "samples_scratch_iid.gif",
                 "samples_finetune_mixed.png"):
        assert (out / name).is_file(), name
    table = res["table"]
    assert set(table) == {"scratch/iid", "scratch/mixed", "finetune/iid", "finetune/mixed"}
    assert res["pretrain"]["train_cpu_s"] > 0 and res["pretrain"]["curve"]
    fin = json.loads((out / "runs" / "finetune" / "mixed" / "seed0" / "final.json").read_text())
    assert fin["deterministic"]["fvd"] > 0 and fin["ancestral"]["fvd"] > 0 and len(fin["curve"]) == 2
    assert json.loads((out / "runs" / "finetune" / "mixed" / "seed0" / "init.json").read_text())["mode"] == "inflate"
    # asked for: the docs directory gets the table and the figures
    docs = tmp_path / "docs_out"
    npx.run_experiment(o, out, docs, log=lambda m: None, estimate=False)
    assert (docs / "noise_prior_results.md").is_file() and (docs / "noise_prior_curves.png").is_file()


def test_cli_help_names_the_options(capsys):
    from diffusionlab.cli import main

    with pytest.raises(SystemExit):
        main(["experiment", "noise-prior", "--help"])
    text = capsys.readouterr().out
    for flag in ("--quick", "--out", "--write-docs", "--jobs", "--settings", "--preset"):
        assert flag in text


def test_sittings_join_with_reuse_and_only_the_rest_trains(tmp_path, monkeypatch):
    """One sitting trains the scratch arms, a second the fine-tuned ones reusing the first's; the joined table is
    the first's numbers for its arms (nothing retrained); other options, or two sittings disagreeing on an arm,
    are refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    base = ["--quick", "--priors", "iid,mixed", "--seeds", "0", *TINY]
    a = npx.run_experiment(_options([*base, "--settings", "scratch"]), tmp_path / "a", None, log=lambda m: None,
                           estimate=False)
    assert a["pretrain"] is None and set(a["table"]) == {"scratch/iid", "scratch/mixed"}
    msgs = []
    both = _options([*base, "--settings", "scratch,finetune", "--reuse", str(tmp_path / "a" / "results.json")])
    b = npx.run_experiment(both, tmp_path / "b", None, log=msgs.append, estimate=False)
    assert any("2 of its 2 finished arms" in m for m in msgs)
    assert set(b["table"]) == {"scratch/iid", "scratch/mixed", "finetune/iid", "finetune/mixed"}
    for key in ("scratch/iid", "scratch/mixed"):  # reused, not retrained: the very same records
        assert npx._same(b["table"][key], a["table"][key])
        assert not (tmp_path / "b" / "runs" / key / "seed0" / "curve.json").exists()
    assert (tmp_path / "b" / "runs" / "finetune" / "mixed" / "seed0" / "curve.json").is_file()
    assert b["pretrain"]["train_cpu_s"] > 0 and [s["used"] for s in b["reused"]] == [2]
    # both sittings again: the same arm in both agrees, nothing is trained, the image model's record is b's
    again = _options([*base, "--settings", "scratch,finetune", "--reuse", str(tmp_path / "a" / "results.json"),
                      "--reuse", str(tmp_path / "b" / "results.json")])
    c = npx.run_experiment(again, tmp_path / "c", None, log=lambda m: None, estimate=False)
    assert npx._same(c["table"], b["table"]) and npx._same(c["pretrain"], b["pretrain"])
    assert not (tmp_path / "c" / "pretrain").exists()
    # refused, nothing written: other scoring options; an arm that differs between sittings
    with pytest.raises(DiffusionLabError, match=r"eval_num: 3 there, 4 here"):
        npx.run_experiment(_options([*base, "--eval-num", "4", "--reuse", str(tmp_path / "b" / "results.json")]),
                           tmp_path / "d", None, log=lambda m: None, estimate=False)
    payload = json.loads((tmp_path / "a" / "results.json").read_text())
    payload["finals"][0]["ancestral"]["fvd"] += 1.0
    (tmp_path / "e.json").write_text(json.dumps(payload))
    with pytest.raises(DiffusionLabError, match="differs between"):
        npx.run_experiment(_options([*base, "--reuse", str(tmp_path / "e.json"), "--reuse",
                                     str(tmp_path / "b" / "results.json")]),
                           tmp_path / "d", None, log=lambda m: None, estimate=False)
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(DiffusionLabError, match="not a noise-prior results.json"):
        _ = npx.run_experiment(_options([*base, "--reuse", str(tmp_path / "f.json")]), tmp_path / "d", None,
                               log=lambda m: None, estimate=False)
    assert not (tmp_path / "d").exists()
    with pytest.raises(DiffusionLabError, match="exclude each other"):
        _options([*base, "--sweep", "--no-sweep"])
    with pytest.raises(DiffusionLabError, match="--sweep varies the fine-tuned setting"):
        _options(["--preset", "cpu-finetune", "--sweep", "--settings", "scratch"])
    assert len(npx.plan(_options(["--preset", "cpu-finetune", "--sweep"]))) == 12 + 21
    part = npx.plan(_options(["--preset", "cpu-finetune", "--sweep", "--priors", "mixed"]))  # a sitting's part
    assert sorted({a["name"] for a in part}) == ["mixed", "mixed-a0.5", "mixed-a2", "mixed-mse"] and len(part) == 12


def _final(setting, prior, seed, fvd, ddim, same, alpha=1.0, loss="mahalanobis"):
    arm = {"setting": setting, "prior": prior, "alpha": alpha, "loss": loss, "seed": seed}
    arm["name"] = npx.arm_name(arm)
    anc = {"fvd": fvd, "frame_fd": 1.0, "digit_all_same": same, "digit_agreement": 0.5, "background_mean": 0.0,
           "speed": 1.0, "straightness": 0.5, "jump_fraction": 0.0}
    return {"arm": arm, "ancestral": anc, "deterministic": {"fvd": ddim, "digit_all_same": same / 2},
            "best_step": 10, "train_cpu_s": 1.0, "converged": False,
            "curve": [{"step": 5, "fvd": 2 * fvd}, {"step": 10, "fvd": fvd}]}


def test_the_sweep_is_read_against_its_own_prior_paired_by_seed(tmp_path):
    """A sweep variant's differences are to the same prior at alpha 1 with the C-aware loss and the same seed
    (a seed the base lacks is left out), next to its difference to iid; the main variants have no base; the
    sweep's curves get a panel of their own."""
    finals = [_final("finetune", "iid", s, 20.0 + s, 30.0, 0.1) for s in (0, 1, 2)]
    finals += [_final("finetune", "mixed", s, 25.0 + 2 * s, 28.0 - s, 0.2) for s in (0, 1)]
    finals += [_final("finetune", "mixed", s, 21.0 + s * s, 27.0, 0.3, loss="mse") for s in (0, 1, 2)]
    finals += [_final("finetune", "mixed", 0, 24.0, 26.0, 0.2, alpha=2.0)]
    table = npx.aggregate(finals)
    assert table["finetune/mixed"]["base"] is None and "vs_base" not in table["finetune/mixed"]
    mse = table["finetune/mixed-mse"]
    assert mse["base"] == "mixed" and mse["seeds"] == [0, 1, 2]
    d = mse["vs_base"]["fvd"]  # seeds 0, 1 only: (21 - 25, 22 - 27)
    assert d["values"] == [-4.0, -5.0] and d["mean"] == -4.5 and d["se"] == pytest.approx(0.5)
    assert mse["vs_base"]["fvd (DDIM eta 0)"]["values"] == [-1.0, 0.0]
    assert mse["vs_base"]["same digit all frames"]["values"] == pytest.approx([0.1, 0.1])
    assert mse["dfvd_ancestral"]["values"] == [1.0, 1.0, 3.0]  # to iid, all three seeds
    a2 = table["finetune/mixed-a2"]["vs_base"]["fvd"]
    assert a2["values"] == [-1.0] and a2["se"] != a2["se"]  # one seed: no standard error
    md = npx.markdown_table(table, {"num": 4})
    assert "| finetune | mixed-mse | mixed | 3 | -4.5 ± 0.5 | -0.5 ± 0.5 | 0.100 ± 0.000 | 0.000 ± 0.000 |" in md
    assert "| finetune | mixed-a2 | mixed | 1 | -1.0 | -2.0 |" in md
    assert npx.plot_curves(finals, None, tmp_path / "c.png").stat().st_size > 0
