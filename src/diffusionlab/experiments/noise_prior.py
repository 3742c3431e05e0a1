"""``diffusionlab experiment noise-prior``: does noise correlated across frames help a video diffusion model?

Two settings (Ge et al. 2023, "Preserve your own correlation", claim the benefit for the second):

- ``scratch`` -- the video model (``configs/video.yaml``: the factorized space-time U-Net) trained from random
  weights;
- ``finetune`` -- an image model of the same spatial layers trained on single frames of the same videos
  (:func:`image_config`, as ``configs/video_frames.yaml``: ``moving_digit_frames``), inflated into the video
  model (every image weight loaded, temporal layers at the identity; :mod:`diffusionlab.training.init`) and
  fine-tuned on the videos. The image model is trained once (seed 0; its cost is reported apart) and every
  fine-tuned arm starts from it.

times four frame covariances ``C`` of the forward noise (:mod:`diffusionlab.noise`):

- ``iid`` -- ``C = I``;
- ``mixed`` -- compound symmetric, ``alpha^2 / (1 + alpha^2)`` off the diagonal (Ge et al. 2023, eq. 4);
- ``progressive`` -- AR(1), ``rho = alpha / sqrt(1 + alpha^2)`` (Ge et al. 2023, eq. 5);
- ``fitted`` -- the training videos' own frame correlation, projected to the nearest definite Toeplitz
  correlation matrix (:mod:`diffusionlab.noise.fit`, ``process.noise: fitted:toeplitz``),

each with at least three seeds (a seed sets the weights, the data order, the noise and the training videos). The
loss is the C-aware ``L_simple`` (Mahalanobis norm ``||d - d_theta||^2_{C^{-1}}``); a sweep on the fine-tuned
setting varies the prior's strength ``alpha`` and replaces the loss by the plain MSE that ignores ``C``.

Every arm is trained until the video metric stops improving (:func:`~diffusionlab.experiments.video_runs.
train_until_converged`: FVD of 64 ancestral samples after every ``eval_every`` steps; stop after ``patience``
evaluations without a relative gain of ``min_delta``), so the curves show convergence and what equal compute
buys. The best EMA weights of each arm are then scored on more samples with ancestral sampling (DDPM, injected
noise ``L z`` with the arm's ``C``) and, as a control that tells correlated sampler noise from better content,
with deterministic DDIM (``eta = 0``; only the start ``N(0, C)`` is random), next to real held-out videos.
Results: ``results.json``, ``results.md`` (mean and standard error over seeds; differences to ``iid`` paired by
seed, and a sweep variant's to its own prior at alpha 1 with the C-aware loss), ``curves.png`` and sample GIFs
under ``--out``; ``--write-docs DIR`` also copies the figures and the table there (never by default). The
expected time is printed before anything is trained; finished arms are reused, so an interrupted experiment
continues where it stopped, and ``--reuse RESULTS_JSON`` takes the finished arms of an earlier sitting (another
``--out``, another day), checked to have been trained and scored with the same options, so an experiment longer
than one sitting runs in parts and its table joins them (:func:`reuse_results`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.io import atomic_write_bytes

PRIORS = ("iid", "mixed", "progressive", "fitted")
SETTINGS = ("scratch", "finetune")
LOSSES = ("mahalanobis", "mse")
EVAL_SEED = 4242  #: sampling seed of every evaluation (common random numbers across arms and steps)
TEST_SEED = 10_000  #: moving_digits seed of the real held-out videos

PRESETS = {
    # 2 CPU cores, one thread per run (docs/video.md has the measured cost)
    "cpu": {"settings": list(SETTINGS), "num_train": 2000, "max_steps": 4000, "eval_every": 500, "min_steps": 1000,
            "patience": 3, "min_delta": 0.05, "pretrain_max_steps": 4000, "eval_num": 64, "final_num": 128,
            "sample_steps": 50, "seeds": [0, 1, 2], "sweep_seeds": [0, 1, 2], "alphas": [0.5, 2.0], "sweep": True,
            "overrides": []},
    # what fits one sitting on 2 CPU cores (1 h 35 min with --jobs 2 on 2 AMD EPYC cores, docs/video.md): the
    # setting of Ge et al.'s claim only, fine-tuned from a 2000-step image model, 4 priors x 3 seeds at equal
    # compute (1500 steps each); the sweep off (--sweep adds it: 21 arms more), --settings scratch the other half
    # of the main grid in another sitting, joined with --reuse
    "cpu-finetune": {"settings": ["finetune"], "num_train": 2000, "max_steps": 1500, "eval_every": 500,
                     "min_steps": 1500, "patience": 3, "min_delta": 0.05, "pretrain_max_steps": 2000,
                     "eval_num": 64, "final_num": 128, "sample_steps": 50, "seeds": [0, 1, 2],
                     "sweep_seeds": [0, 1, 2], "alphas": [0.5, 2.0], "sweep": False, "overrides": []},
    # the whole pipeline in under 30 minutes: one seed, short runs, the sweep off (not converged)
    "quick": {"settings": list(SETTINGS), "num_train": 1000, "max_steps": 400, "eval_every": 200, "min_steps": 400,
              "patience": 2, "min_delta": 0.05, "pretrain_max_steps": 400, "eval_num": 32, "final_num": 32,
              "sample_steps": 20, "seeds": [0], "sweep_seeds": [0], "alphas": [0.5, 2.0], "sweep": False,
              "overrides": []},
    # one GPU: the Moving MNIST shape (64 x 64, 16 frames) on the built-in moving digits, a wider network with
    # temporal attention at 16 and 8 px (docs/video.md)
    "gpu": {"settings": list(SETTINGS), "num_train": 20000, "max_steps": 40000, "eval_every": 2000,
            "min_steps": 10000, "patience": 3, "min_delta": 0.03, "pretrain_max_steps": 40000, "eval_num": 256,
            "final_num": 1000, "sample_steps": 100, "seeds": [0, 1, 2], "sweep_seeds": [0, 1, 2], "alphas": [0.5, 2.0],
            "sweep": True,
            "overrides": ["data.frames=16", "data.size=64", "data.speed=4.0", "model.base_channels=64",
                          "model.channel_mults=[1,2,2,4]", "model.temporal_attn_resolutions=[16,8]",
                          "model.attn_resolutions=[8]", "train.batch_size=32", "train.lr=0.0002",
                          "train.warmup=1000", "train.ema_decay=0.9999", "train.threads=0", "train.device=auto",
                          "train.channels_last=false"]},
}


# ---- the arms ------------------------------------------------------------------------------------------------
def arm_name(arm: dict) -> str:
    v = arm["prior"]
    if arm["alpha"] is not None and arm["prior"] in ("mixed", "progressive") and arm["alpha"] != 1.0:
        v += f"-a{arm['alpha']:g}"
    if arm["loss"] != "mahalanobis":
        v += f"-{arm['loss']}"
    return v


def is_main_arm(arm: dict) -> bool:
    """Whether ``arm`` is of the main grid (alpha 1, the C-aware loss), not a sweep variant."""
    return arm["alpha"] == 1.0 and arm["loss"] == "mahalanobis"


def plan(o: dict) -> list[dict]:
    """Every arm of the experiment: the main grid (settings x priors x seeds) and the fine-tuned sweep (alpha for
    mixed and progressive, the plain MSE for the three correlated priors; those of ``priors`` only)."""
    arms = []
    for setting in o["settings"]:
        for prior in o["priors"]:
            for seed in o["seeds"]:
                arms.append({"setting": setting, "prior": prior, "alpha": 1.0, "loss": "mahalanobis", "seed": seed})
    if o["sweep"] and "finetune" in o["settings"]:  # of the chosen priors (so a sitting can run a part of it)
        for prior in [p for p in ("mixed", "progressive") if p in o["priors"]]:
            for alpha in o["alphas"]:
                for seed in o["sweep_seeds"]:
                    arms.append({"setting": "finetune", "prior": prior, "alpha": alpha, "loss": "mahalanobis",
                                 "seed": seed})
        for prior in [p for p in ("mixed", "progressive", "fitted") if p in o["priors"]]:
            for seed in o["sweep_seeds"]:
                arms.append({"setting": "finetune", "prior": prior, "alpha": 1.0, "loss": "mse", "seed": seed})
    for arm in arms:
        arm["name"] = arm_name(arm)
    return arms


def noise_spec(prior: str, alpha: float) -> str:
    if prior == "iid":
        return "iid"
    if prior in ("mixed", "progressive"):
        return f"{prior}:{alpha:g}"
    if prior == "fitted":
        return "fitted:toeplitz"
    raise DiffusionLabError(f"unknown noise prior {prior!r}; allowed: {', '.join(PRIORS)}")


def _base(name: str, o: dict) -> dict:
    """A packaged config (``video`` or ``video_frames``) with the preset's and the user's overrides applied, and
    without the recipe's class conditioning: the arms are unconditional models (as the experiment was designed and
    run), so the noise prior is the one thing that differs and every arm is sampled alike."""
    from diffusionlab.training.config import apply_overrides, load_yaml, packaged_config

    user = load_yaml(packaged_config(name))
    user.get("model", {}).pop("num_classes", None)
    user.get("train", {}).pop("p_uncond", None)
    for key in ("classes", "guidance", "guidance_interval"):
        user.get("sample", {}).pop(key, None)
    user = apply_overrides(user, [f"data.num={o['num_train']}", *o["overrides"], *o["set"]])
    user.setdefault("train", {}).update(threads=o["threads"], device=o["device"])
    return user


def image_config(o: dict) -> dict:
    """The image model's config, derived from the video config so the two always match: the same data (as
    frames, ``moving_digit_frames``), process (i.i.d. noise), parametrization, objective and spatial network, a
    batch of ``batch_size x frames`` frames (the video step's cost), seed 0."""
    from diffusionlab.training.config import resolve

    user = _base("video", o)
    video = resolve(copy.deepcopy(user))
    user["data"] = {**user["data"], "name": "moving_digit_frames"}
    user["process"]["noise"] = "iid"
    user["model"] = {k: v for k, v in user["model"].items() if not k.startswith("temporal")}
    user["model"]["name"] = "unet"
    user["train"].update(seed=0, batch_size=int(video["train"]["batch_size"]) * int(video["data"]["frames"]))
    for key in ("init_from", "freeze_spatial"):
        user["train"].pop(key, None)
    return user


def arm_config(arm: dict, o: dict, pretrain_dir: Path | None) -> dict:
    user = _base("video", o)
    user["process"]["noise"] = noise_spec(arm["prior"], arm["alpha"])
    user.setdefault("objective", {})["weighting"] = "simple" if arm["loss"] == "mahalanobis" else "mse"
    user["train"]["seed"] = int(arm["seed"])
    if arm["setting"] == "finetune":
        user["train"]["init_from"] = str(pretrain_dir)
        user["train"]["freeze_spatial"] = bool(o["freeze_spatial"])
    return user


def _samplers(o: dict) -> dict:
    return {"ancestral": {"sampler": "ddpm", "steps": o["sample_steps"], "clip_x0": True},
            "deterministic": {"sampler": "ddim", "steps": o["sample_steps"], "eta": 0.0, "clip_x0": True}}


def _speed(o: dict) -> float:
    from diffusionlab.training.config import resolve

    return float(resolve(_base("video", o))["data"]["speed"])


# ---- training and scoring one arm --------------------------------------------------------------------------------
def _video_evaluator(o: dict):
    from diffusionlab.experiments.video_runs import sample_run, score, values

    scfg, speed = _samplers(o)["ancestral"], _speed(o)
    return lambda run: values(score(sample_run(run, scfg, o["eval_num"], EVAL_SEED, device=o["device_eval"]), speed))


def _image_evaluator(o: dict):
    from diffusionlab.experiments.video_runs import frames_as_videos, sample_run, score, values
    from diffusionlab.training.config import resolve

    frames = int(resolve(_base("video", o))["data"]["frames"])
    scfg, speed = _samplers(o)["deterministic"], _speed(o)

    def evaluate(run):
        images = sample_run(run, scfg, o["eval_num"] * frames, EVAL_SEED, device=o["device_eval"])
        return values(score(frames_as_videos(images, frames), speed))
    return evaluate


def pretrain(o: dict, out: Path, log=print) -> dict:
    """The image model of the fine-tuned setting, trained until its samples' per-frame FD stops improving."""
    from diffusionlab.experiments.video_runs import train_until_converged

    run = out / "pretrain"
    cfg = image_config(o)
    cfg["train"]["threads"] = int(o["threads"]) * int(o["jobs"])  # nothing else runs while it trains
    rec = train_until_converged(cfg, run, _image_evaluator(o), o["eval_every"], o["pretrain_max_steps"],
                                o["min_steps"], o["patience"], o["min_delta"], key="frame_fd", log=log)
    if not (run / "best_run").is_dir():  # the run fine-tuning starts from: the best EMA weights
        best = run / "best_run.tmp"
        shutil.rmtree(best, ignore_errors=True)
        best.mkdir()
        shutil.copyfile(run / "config.yaml", best / "config.yaml")
        shutil.copyfile(run / "best.safetensors", best / "model.safetensors")
        os.replace(best, run / "best_run")
    return rec


def run_arm(arm: dict, o: dict, out: Path, log=print) -> dict:
    """Train (or reuse) one arm until converged, then score its best weights with both samplers."""
    from diffusionlab.experiments.video_runs import sample_run, score, train_until_converged, values

    torch.set_num_threads(max(1, int(o["threads"]) or 1))
    run = arm_dir(out, arm)
    final_path = run / "final.json"
    if final_path.is_file():
        return json.loads(final_path.read_text())
    pre = out / "pretrain" / "best_run" if arm["setting"] == "finetune" else None
    log(f"noise-prior: {arm['setting']}/{arm['name']} seed {arm['seed']} -> {run}")
    rec = train_until_converged(arm_config(arm, o, pre), run, _video_evaluator(o), o["eval_every"], o["max_steps"],
                                o["min_steps"], o["patience"], o["min_delta"], key="fvd", log=log)
    final = {"arm": arm, "curve": rec["curve"], "best_step": rec["best_step"], "steps": rec["steps"],
             "converged": rec["converged"], "train_wall_s": rec["train_wall_s"], "train_cpu_s": rec["train_cpu_s"],
             "eval_wall_s": rec["eval_wall_s"]}
    for kind, scfg in _samplers(o).items():
        x = sample_run(run, scfg, o["final_num"], EVAL_SEED + 1, weights="best.safetensors", device=o["device_eval"])
        final[kind] = values(score(x, _speed(o)))
        if kind == "ancestral":
            from diffusionlab.video_io import save_frame_grid, save_gif

            save_gif(x[:16], run / "samples.gif", fps=4)
            save_frame_grid(x[:8], run / "samples.png")
    atomic_write_bytes(final_path, json.dumps(final, indent=2).encode())
    return final


def arm_dir(out: Path, arm: dict) -> Path:
    return out / "runs" / arm["setting"] / arm["name"] / f"seed{arm['seed']}"


def _worker(args):
    arm, o, out = args
    return run_arm(arm, o, Path(out), log=lambda m: print(m, file=sys.stderr, flush=True))


# ---- finished arms of earlier sittings ------------------------------------------------------------------------------
#: the options that decide how an arm is trained and scored; arms of two sittings are one experiment only if
#: these agree (the others -- settings, priors, seeds, sweep, jobs, threads, device -- choose which arms run where)
ARM_OPTIONS = ("num_train", "max_steps", "eval_every", "min_steps", "patience", "min_delta", "eval_num", "final_num",
               "sample_steps", "overrides", "set", "freeze_spatial")


def reuse_results(paths: list[Path], o: dict, arms: list[dict], log=print) -> dict:
    """The finished arms of earlier sittings (their ``results.json``) that this sitting's plan ``arms`` holds, so
    that it trains only the rest and its table covers all of them. Refused when an earlier sitting trained or
    scored its arms otherwise (:data:`ARM_OPTIONS`, and the image model's budget where it fine-tuned) or two
    sittings disagree on the same arm. Returns ``{"finals": {arm key: final record}, "pretrain": the image model's
    cost record or None, "sittings": [{source, arms, used, total_wall_s}]}``; nothing is written."""
    planned = {arm_key(a) for a in arms}
    finals, source, pretrain_rec, sittings = {}, {}, None, []
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
            earlier, records = payload["options"], payload["finals"]
            keys = [arm_key(f["arm"]) for f in records]
        except OSError as e:
            raise DiffusionLabError(f"--reuse {path}: cannot read it ({e.strerror})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DiffusionLabError(f"--reuse {path}: not a noise-prior results.json ({type(e).__name__}: {e})") \
                from None
        check = ARM_OPTIONS + (("pretrain_max_steps",) if any(k[0] == "finetune" for k in keys) else ())
        bad = [f"{k}: {earlier.get(k)!r} there, {o.get(k)!r} here" for k in check if earlier.get(k) != o.get(k)]
        if bad:
            raise DiffusionLabError(f"--reuse {path}: its arms were trained or scored otherwise ({'; '.join(bad)}); "
                                    f"pass the options it ran with (--preset {earlier.get('preset')} and its "
                                    "overrides)")
        for key, f in zip(keys, records):
            if key in finals and not _same(finals[key], f):
                raise DiffusionLabError(f"--reuse: arm {key[0]}/{key[1]} seed {key[2]} differs between "
                                        f"{source[key]} and {path}")
            if key in planned:
                finals[key], source[key] = f, path
        pre = payload.get("pretrain")
        if pre and pretrain_rec and not _same(pre, pretrain_rec):
            log(f"noise-prior: --reuse {path}: its image model was trained again (not the first sitting's); its "
                "fine-tuned arms start from that one")
        pretrain_rec = pretrain_rec or pre
        used = sum(k in planned for k in keys)
        sittings.append({"source": str(path), "arms": len(records), "used": used,
                         "total_wall_s": payload.get("total_wall_s"), "pretrain": pre})
        log(f"noise-prior: --reuse {path}: {used} of its {len(records)} finished arms are in this plan")
    return {"finals": finals, "pretrain": pretrain_rec, "sittings": sittings}


def arm_key(arm: dict) -> tuple:
    return arm["setting"], arm["name"], arm["seed"]


def _same(a: dict, b: dict) -> bool:
    """Two records alike as JSON (so that a NaN equals a NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---- aggregation ---------------------------------------------------------------------------------------------------
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample sd / sqrt(n); NaN for n < 2) of the finite values."""
    v = [x for x in values if x is not None and x == x]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, sd / math.sqrt(len(v))


COLUMNS = [  # (header, getter on a final record)
    ("fvd", lambda r: r["ancestral"]["fvd"]),
    ("fvd (DDIM eta 0)", lambda r: r["deterministic"]["fvd"]),
    ("frame FD", lambda r: r["ancestral"]["frame_fd"]),
    ("same digit all frames", lambda r: r["ancestral"]["digit_all_same"]),
    ("same digit (DDIM)", lambda r: r["deterministic"]["digit_all_same"]),
    ("frames agreeing", lambda r: r["ancestral"]["digit_agreement"]),
    ("background", lambda r: r["ancestral"]["background_mean"]),
    ("speed", lambda r: r["ancestral"]["speed"]),
    ("straightness", lambda r: r["ancestral"]["straightness"]),
    ("jumps", lambda r: r["ancestral"]["jump_fraction"]),
    ("best step", lambda r: r["best_step"]),
    ("train CPU s", lambda r: r["train_cpu_s"]),
]


#: the columns a sweep variant is compared on with its own prior at alpha 1 and the C-aware loss (paired by seed)
SWEEP_DELTAS = ("fvd", "fvd (DDIM eta 0)", "same digit all frames", "frames agreeing")


def _paired(rows: list[dict], ref: dict, setting: str, name: str, get) -> dict:
    """The differences ``get(row) - get(arm name of the same setting and seed)`` (paired; seeds without that arm
    left out), their mean and standard error."""
    diffs = [get(r) - get(ref[(setting, name, r["arm"]["seed"])]) for r in rows
             if (setting, name, r["arm"]["seed"]) in ref]
    m, se = mean_se(diffs)
    return {"mean": m, "se": se, "values": diffs}


def aggregate(finals: list[dict]) -> dict:
    """Per (setting, variant): each column's per-seed values, mean and standard error, and the difference of the
    FVDs to ``iid`` of the same setting and seed (paired); a sweep variant (another alpha, the plain MSE) also
    its differences (:data:`SWEEP_DELTAS`) to the same prior at alpha 1 with the C-aware loss, ``base``."""
    groups: dict = {}
    for f in finals:
        groups.setdefault((f["arm"]["setting"], f["arm"]["name"]), []).append(f)
    ref = {(f["arm"]["setting"], f["arm"]["name"], f["arm"]["seed"]): f for f in finals}
    column = dict(COLUMNS)
    table = {}
    for (setting, name), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["arm"]["seed"])
        base = None if is_main_arm(rows[0]["arm"]) else rows[0]["arm"]["prior"]
        entry = {"setting": setting, "variant": name, "base": base,
                 "seeds": [r["arm"]["seed"] for r in rows], "converged": sum(bool(r["converged"]) for r in rows)}
        for header, get in COLUMNS:
            vals = [get(r) for r in rows]
            m, se = mean_se(vals)
            entry[header] = {"mean": m, "se": se, "values": vals}
        for kind, header in (("ancestral", "fvd"), ("deterministic", "fvd (DDIM eta 0)")):
            entry[f"dfvd_{kind}"] = _paired(rows, ref, setting, "iid", column[header])
        if entry["base"] is not None:
            entry["vs_base"] = {h: _paired(rows, ref, setting, base, column[h]) for h in SWEEP_DELTAS}
        table[f"{setting}/{name}"] = entry
    return table


def _cell(c: dict, digits: int) -> str:
    m, se = c["mean"], c["se"]
    if m != m:
        return "--"
    return f"{m:.{digits}f}" + ("" if se != se else f" ± {se:.{digits}f}")


def markdown_table(table: dict, real: dict) -> str:
    digits = {"fvd": 1, "fvd (DDIM eta 0)": 1, "frame FD": 1, "best step": 0, "train CPU s": 0}
    head = ["setting", "prior", "n"] + [h for h, _ in COLUMNS] + ["Δ fvd vs iid", "Δ fvd vs iid (DDIM)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, e in table.items():
        cells = [e["setting"], e["variant"], str(len(e["seeds"]))]
        cells += [_cell(e[h], digits.get(h, 3)) for h, _ in COLUMNS]
        cells += ["--" if e["variant"] == "iid" else _cell(e[f"dfvd_{k}"], 1) for k in ("ancestral", "deterministic")]
        lines.append("| " + " | ".join(cells) + " |")
    def num(key, d=3):
        v = real.get(key)
        return "--" if v is None else f"{v:.{d}f}"

    cells = ["real held-out videos", "--", str(real["num"]), num("fvd", 1), "--", num("frame_fd", 1),
             num("digit_all_same"), "--", num("digit_agreement"), num("background_mean"), num("speed"),
             num("straightness"), num("jump_fraction"), "--", "--", "--", "--"]
    lines.append("| " + " | ".join(cells) + " |")
    sweep = [e for e in table.values() if e.get("base")]
    if sweep:  # the sweep read against its own prior at alpha 1 with the C-aware loss, paired by seed
        head = ["setting", "variant", "against", "n"] + [f"Δ {h}" for h in SWEEP_DELTAS]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in sweep:
            cells = [e["setting"], e["variant"], e["base"], str(len(e["seeds"]))]
            cells += [_cell(e["vs_base"][h], digits.get(h, 3)) for h in SWEEP_DELTAS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def real_reference(o: dict) -> dict:
    """The video metric of ``final_num`` real held-out videos (test-split digits): what the arms are read against."""
    from diffusionlab.data import load_dataset
    from diffusionlab.experiments.video_runs import score, values
    from diffusionlab.training.config import resolve

    data = dict(resolve(_base("video", o))["data"], split="test", num=o["final_num"])
    ds = load_dataset(data, seed=TEST_SEED)
    return {"num": o["final_num"], **values(score(ds.to_display(ds.data), _speed(o)))}


# ---- figures -------------------------------------------------------------------------------------------------------
def plot_curves(finals: list[dict], pretrain_rec: dict | None, path: Path) -> Path:
    """FVD (ancestral, ``eval_num`` samples) against training steps for every arm: one panel per setting of the
    main grid, one of the sweep (where it ran: colour the prior, line the variant, its alpha-1 C-aware arms
    solid), then both settings against all training steps, the image model's included."""
    from diffusionlab.plotting import _agg

    plt = _agg()
    is_main = [is_main_arm(f["arm"]) for f in finals]
    main = [f for f, m in zip(finals, is_main) if m]
    sweep = [f for f, m in zip(finals, is_main) if not m]
    settings = sorted({f["arm"]["setting"] for f in main}, key=SETTINGS.index)
    panels = len(settings) + bool(sweep) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6), dpi=110, squeeze=False)
    axes = axes[0]
    if sweep:
        _plot_sweep(axes[len(settings)], sweep, main)
    pre_steps = pretrain_rec["best_step"] if pretrain_rec else 0
    for j, setting in enumerate(settings):
        for i, prior in enumerate(PRIORS):
            runs = [f for f in main if f["arm"]["setting"] == setting and f["arm"]["prior"] == prior]
            for k, f in enumerate(runs):
                steps = [p["step"] for p in f["curve"]]
                fvd = [p["fvd"] for p in f["curve"]]
                label = prior if k == 0 else None
                axes[j].plot(steps, fvd, color=f"C{i}", marker="o", ms=3, lw=1, alpha=0.8, label=label)
                offset = pre_steps if setting == "finetune" else 0
                axes[-1].plot([s + offset for s in steps], fvd, color=f"C{i}", lw=1,
                              ls="-" if setting == "scratch" else "--", alpha=0.7,
                              label=f"{setting} {prior}" if k == 0 else None)
        axes[j].set_title(f"{setting}: FVD vs {'fine-tuning ' if setting == 'finetune' else ''}steps")
        axes[j].set_xlabel("training steps")
        axes[j].set_ylabel("FVD (lower is better)")
        axes[j].set_yscale("log")
        axes[j].grid(alpha=0.3)
        axes[j].legend(fontsize=7)
    if pre_steps:
        axes[-1].axvline(pre_steps, color="k", lw=0.8, ls=":")
    axes[-1].set_title("all steps (fine-tuned: after the image model's)")
    axes[-1].set_xlabel("training steps, pretraining included")
    axes[-1].set_yscale("log")
    axes[-1].grid(alpha=0.3)
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_sweep(ax, sweep: list[dict], main: list[dict]) -> None:
    """The sweep's curves: colour the prior, line style the variant, the same prior at alpha 1 (C-aware) solid."""
    priors = sorted({f["arm"]["prior"] for f in sweep}, key=PRIORS.index)
    settings = {f["arm"]["setting"] for f in sweep}
    variants = sorted({f["arm"]["name"].removeprefix(f["arm"]["prior"]) for f in sweep})
    styles = dict(zip(variants, ["--", ":", "-.", (0, (5, 1, 1, 1))] * len(variants)))
    seen = set()
    for f in [m for m in main if m["arm"]["setting"] in settings and m["arm"]["prior"] in priors] + sweep:
        a = f["arm"]
        variant = a["name"].removeprefix(a["prior"])
        label = None if a["name"] in seen else a["name"]
        seen.add(a["name"])
        ax.plot([p["step"] for p in f["curve"]], [p["fvd"] for p in f["curve"]], color=f"C{PRIORS.index(a['prior'])}",
                ls=styles.get(variant, "-"), marker="o", ms=2.5, lw=1, alpha=0.8, label=label)
    ax.set_title("finetune sweep: FVD vs fine-tuning steps")
    ax.set_xlabel("training steps")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# ---- driver --------------------------------------------------------------------------------------------------------
def options(args) -> dict:
    o = copy.deepcopy(PRESETS[args.preset])
    o["preset"] = args.preset
    for key in ("max_steps", "eval_every", "min_steps", "patience", "pretrain_max_steps", "eval_num", "final_num",
                "sample_steps", "num_train"):
        v = getattr(args, key, None)
        if v is not None:
            o[key] = v
    if args.min_delta is not None:
        o["min_delta"] = args.min_delta
    for key in ("seeds", "sweep_seeds"):
        v = getattr(args, key)
        if v is not None:
            o[key] = [int(s) for s in v.split(",") if s.strip()]
    if args.alphas is not None:
        o["alphas"] = [float(a) for a in args.alphas.split(",") if a.strip()]
    if args.sweep and args.no_sweep:
        raise DiffusionLabError("--sweep and --no-sweep exclude each other")
    if args.sweep or args.no_sweep:
        o["sweep"] = bool(args.sweep)
    if o["sweep"] and not o["sweep_seeds"]:
        raise DiffusionLabError("the sweep needs at least one seed (--sweep-seeds)")
    o["reuse"] = [str(r) for r in (args.reuse or [])]
    o["priors"] = _names(args.priors, PRIORS, "noise prior")
    o["settings"] = _names(",".join(o["settings"]) if args.settings is None else args.settings, SETTINGS, "setting")
    if args.sweep and "finetune" not in o["settings"]:
        raise DiffusionLabError(f"--sweep varies the fine-tuned setting; --settings is {','.join(o['settings'])}")
    o.update(threads=args.threads, device=args.device, device_eval=args.device if args.device != "auto" else "auto",
             jobs=args.jobs, freeze_spatial=args.freeze_spatial, set=list(args.set or []))
    if not o["seeds"]:
        raise DiffusionLabError("--seeds needs at least one seed")
    if o["jobs"] < 1:
        raise DiffusionLabError(f"--jobs must be >= 1, got {o['jobs']}")
    return o


def _names(arg: str, allowed: tuple, what: str) -> list[str]:
    names = [p.strip() for p in arg.split(",") if p.strip()]
    bad = [p for p in names if p not in allowed]
    if bad or not names:
        raise DiffusionLabError(f"unknown {what}(s) {bad or arg!r}; allowed: {', '.join(allowed)}")
    return names


def measure_step(o: dict, steps: int = 3) -> float:
    """Wall seconds of one training step of the video model here (after one warm-up step), at the run threads."""
    from diffusionlab.training.config import resolve
    from diffusionlab.training.trainer import build_parts, train_step

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(o["threads"]) or threads))
    try:
        p = build_parts(resolve(_base("video", o)), log=lambda m: None)
        train_step(p, 0)
        t0 = time.time()
        for i in range(steps):
            train_step(p, i + 1)
        return (time.time() - t0) / steps
    finally:
        torch.set_num_threads(threads)


def expected_seconds(o: dict, arms: list[dict], step_s: float) -> dict:
    """An upper bound of the wall time of training ``arms`` (each to ``max_steps``; the image model if one is
    fine-tuned), from the measured step time: a
    sampling step of a video costs about a third of a training step per video; ``jobs`` runs in parallel."""
    from diffusionlab.training.config import resolve

    batch = int(resolve(_base("video", o))["train"]["batch_size"])
    def evals(max_steps):
        return math.ceil(max_steps / o["eval_every"])
    sample_s = step_s / 3 / batch * o["sample_steps"]
    arm_s = [o["max_steps"] * step_s + evals(o["max_steps"]) * o["eval_num"] * sample_s
             + 2 * o["final_num"] * sample_s for _ in arms]
    pre = 0.0
    if any(a["setting"] == "finetune" for a in arms):
        pre = o["pretrain_max_steps"] * step_s + evals(o["pretrain_max_steps"]) * o["eval_num"] * sample_s
    total = pre + sum(arm_s) / o["jobs"]
    return {"step_s": step_s, "pretrain_s": pre, "arm_s": max(arm_s) if arm_s else 0.0, "total_s": total}


def _hm(seconds: float) -> str:
    h, m = divmod(int(round(seconds / 60)), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def run_experiment(o: dict, out: Path, docs: Path | None = None, log=print, estimate: bool = True) -> dict:
    """Run (or continue) the experiment into ``out``; copy the figures and the table into ``docs`` only if given."""
    t_start = time.time()
    arms = plan(o)
    reused = reuse_results(o["reuse"], o, arms, log)  # checked before anything is written
    for key, f in reused["finals"].items():
        here = arm_dir(out, f["arm"]) / "final.json"
        if here.is_file() and not _same(json.loads(here.read_text()), f):
            raise DiffusionLabError(f"--reuse: arm {key[0]}/{key[1]} seed {key[2]} differs from the one in {here}")
    out.mkdir(parents=True, exist_ok=True)
    for f in reused["finals"].values():  # an earlier sitting's finished arm
        here = arm_dir(out, f["arm"]) / "final.json"
        if not here.is_file():
            here.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(here, json.dumps(f, indent=2).encode())
    todo = [a for a in arms if not (arm_dir(out, a) / "final.json").is_file()]
    if estimate:
        est = expected_seconds(o, todo, measure_step(o))
        log(f"noise-prior: {len(arms)} arms, {len(todo)} to train ({', '.join(o['settings'])} x "
            f"{', '.join(o['priors'])} x seeds {o['seeds']}{' + sweep' if o['sweep'] else ''}), at most "
            f"{o['max_steps']} steps each, {o['jobs']} in parallel; a training step takes {est['step_s']:.2f} s "
            f"here, so expect at most {_hm(est['total_s'])} (every arm to max_steps; converged arms stop earlier; "
            f"pretraining at most {_hm(est['pretrain_s'])}) -> {out}")
    pre_rec = None
    if any(a["setting"] == "finetune" for a in todo):
        pre_rec = pretrain(o, out, log)
    elif any(a["setting"] == "finetune" for a in arms):  # every fine-tuned arm is done: the image model's record
        pre_rec = (json.loads((out / "pretrain" / "curve.json").read_text())
                   if (out / "pretrain" / "curve.json").is_file() else reused["pretrain"])
    if o["jobs"] > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=o["jobs"], mp_context=mp.get_context("spawn")) as ex:
            finals = list(ex.map(_worker, [(a, o, str(out)) for a in arms]))
    else:
        finals = [run_arm(a, o, out, log) for a in arms]
    real = real_reference(o)
    table = aggregate(finals)
    md = markdown_table(table, real)
    curves = plot_curves(finals, pre_rec, out / "curves.png")
    figs = [curves]
    for f in finals:  # seed-0 samples of the main grid
        a = f["arm"]
        if a["seed"] == o["seeds"][0] and is_main_arm(a):
            src = arm_dir(out, a)
            if not (src / "samples.gif").is_file():
                log(f"noise-prior: {a['setting']}/{a['name']} seed {a['seed']} was trained in an earlier sitting; "
                    "its samples are in that sitting's --out")
                continue
            for ext in ("gif", "png"):
                dst = out / f"samples_{a['setting']}_{a['name']}.{ext}"
                shutil.copyfile(src / f"samples.{ext}", dst)
                figs.append(dst)
    pre_cost = None
    if pre_rec is not None:
        pre_cost = {k: pre_rec[k] for k in ("best_step", "steps", "converged", "train_wall_s", "train_cpu_s",
                                            "eval_wall_s")}
        pre_cost["curve"] = pre_rec["curve"]
    payload = {"options": o, "arms": len(arms), "table": table, "real": real, "pretrain": pre_cost,
               "finals": finals, "total_wall_s": round(time.time() - t_start, 1),
               "threads": o["threads"], "jobs": o["jobs"], "reused": reused["sittings"]}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(md + "\n")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for f in [out / "results.json", out / "results.md", *figs]:
            shutil.copyfile(f, docs / f"noise_prior_{f.name}" if not f.name.startswith("samples_") else docs / f.name)
    log(md)
    return payload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu (2 CPU cores: 45 arms, at most about 10 h with --jobs 2, less as arms converge), "
                        "cpu-finetune (the fine-tuned setting's 12 arms at 1500 steps each: 1 h 35 min with --jobs "
                        "2 on 2 AMD cores), quick (under 30 minutes, one seed, not converged), gpu")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="the same as --preset quick")
    p.add_argument("--out", default="runs/noise_prior", help="where runs and results go (reused if present)")
    p.add_argument("--write-docs", default=None, metavar="DIR",
                   help="also copy the table and figures into DIR (e.g. docs/video); never done by default")
    p.add_argument("--priors", default=",".join(PRIORS), help=f"comma-separated subset of {', '.join(PRIORS)}")
    p.add_argument("--settings", default=None, help="scratch, finetune or both (preset: both; cpu-finetune: finetune)")
    p.add_argument("--seeds", default=None, help="training seeds of the main grid (preset: 0,1,2)")
    p.add_argument("--sweep-seeds", default=None, help="seeds of the alpha / loss sweep (preset: 0,1,2)")
    p.add_argument("--alphas", default=None, help="the sweep's alphas for mixed and progressive (preset: 0.5,2)")
    p.add_argument("--sweep", action="store_true", help="add the alpha / loss sweep to a preset without one")
    p.add_argument("--no-sweep", action="store_true", help="only the main grid")
    p.add_argument("--reuse", action="append", default=[], metavar="RESULTS_JSON",
                   help="take the finished arms of an earlier sitting (its results.json; repeatable) so this one "
                        "trains only the rest; refused if they were trained or scored with other options")
    p.add_argument("--freeze-spatial", action="store_true", help="fine-tune only the temporal layers")
    for key, typ in (("max_steps", int), ("eval_every", int), ("min_steps", int), ("patience", int),
                     ("pretrain_max_steps", int), ("eval_num", int), ("final_num", int), ("sample_steps", int),
                     ("num_train", int), ("min_delta", float)):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, default=None, help="override the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the video config of every run, e.g. train.batch_size=8")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--device", default="auto")


def cmd_noise_prior(args) -> int:
    o = options(args)
    run_experiment(o, Path(args.out), Path(args.write_docs) if args.write_docs else None,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def register(sub) -> None:
    """Add ``noise-prior`` to the experiment subparsers ``sub``."""
    p = sub.add_parser("noise-prior", help="frame-noise priors x {from scratch, fine-tuned from an image model}, "
                                           "trained until the video metric stops improving")
    add_arguments(p)
    p.set_defaults(func=cmd_noise_prior)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusionlab.experiments.noise_prior [options]``."""
    p = argparse.ArgumentParser(prog="diffusionlab experiment noise-prior", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_noise_prior(args)
    except DiffusionLabError as e:
        print(f"diffusionlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
