"""``diffusionlab experiment noise-prior``: does noise correlated across frames help a video diffusion model?

The same factorized space-time U-Net (:mod:`diffusionlab.models.video_unet`) is trained on ``moving_digits``
(:mod:`diffusionlab.data.video`) at equal compute -- same steps, batch, learning rate, seed and data -- with
four frame covariances C of the forward noise (Ge et al. 2023, "Preserve Your Own
Correlation", for the first two correlated ones):

- ``iid`` -- ``C = I``;
- ``mixed`` -- compound symmetric, ``alpha^2 / (1 + alpha^2)`` off the diagonal;
- ``progressive`` -- AR(1), ``rho = alpha / sqrt(1 + alpha^2)``;
- ``fitted`` -- the training videos' own frame correlation, projected to the nearest definite Toeplitz
  correlation matrix (:func:`~diffusionlab.noise.fit.fit_frame_covariance`), passed to the trainer as an exact
  ``toeplitz:`` spec and saved with the run (``noise_covariance.safetensors``).

Loss: ``L_simple`` with the Mahalanobis norm ``||eps - eps_theta||^2_{C^{-1}}`` (``--weighting simple``, the
default), the ELBO weights (``elbo``) or plain MSE that ignores C (``mse``). The process is the linear
VP chain ``VPSDE(0.1, 20).discretize(T)`` so that the same network is also a model of the VP-SDE for the ODE
likelihood (:func:`~diffusionlab.metrics.video.sde_view`).

Every run is trained by the library's trainer (:func:`diffusionlab.training.trainer.train`) from a config built
here, then evaluated (:mod:`diffusionlab.metrics.video`) on held-out videos (test-split digits, a fixed seed):
``-ELBO`` and the probability-flow-ODE NLL in bits/dim (17-level data, dequantized), and samples (DDPM
ancestral, noise ``L z``) scored by lag-k frame correlations, mean absolute consecutive-frame difference and
digit-classifier consistency, next to the same statistics of real videos. Results: ``results.json`` and
``results.md`` (mean +- standard deviation over seeds) and figures in ``--docs`` (default ``docs/video``).
Runs and evaluations already on disk are reused, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError

PRIORS = ("iid", "mixed", "progressive", "fitted")
WEIGHTINGS = ("simple", "elbo", "mse")
BETA_MIN, BETA_MAX = 0.1, 20.0
LEVELS = 17  #: moving digits take the values k / 16
TEST_SEED = 10_000

PRESETS = {
    # 2 CPU cores: about 6 minutes per run (measured in docs/video.md)
    "cpu": {"steps": 500, "batch": 16, "lr": 2e-3, "warmup": 50, "frames": 8, "size": 16, "num_train": 2000,
            "T": 100, "base_channels": 16, "channel_mults": [1, 2, 2], "attn_resolutions": [], "temporal": "conv",
            "eval_num": 32, "ode_num": 16, "samples": 64, "sample_steps": 50, "seeds": [0, 1]},
    # one GPU
    "gpu": {"steps": 20000, "batch": 64, "lr": 1e-3, "warmup": 500, "frames": 16, "size": 32, "num_train": 20000,
            "T": 1000, "base_channels": 64, "channel_mults": [1, 2, 2], "attn_resolutions": [8],
            "temporal": "both", "eval_num": 256, "ode_num": 64, "samples": 256, "sample_steps": 250,
            "seeds": [0, 1, 2]},
}


# ---- configs ------------------------------------------------------------------------------------------------
def data_config(o: dict, split: str = "train") -> dict:
    return {"name": "moving_digits", "num": o["num_train"], "frames": o["frames"], "size": o["size"],
            "speed": o["speed"], "num_digits": 1, "split": split}


def noise_spec(prior: str, o: dict, data: torch.Tensor | None = None) -> str:
    """The ``process.noise`` spec of ``prior``; ``fitted`` needs the training ``data``."""
    if prior == "iid":
        return "iid"
    if prior == "mixed":
        return f"mixed:{o['alpha_mixed']}"
    if prior == "progressive":
        return f"progressive:{o['alpha_progressive']}"
    if prior == "fitted":
        from diffusionlab.noise.fit import fit_frame_covariance, toeplitz_spec

        return toeplitz_spec(fit_frame_covariance(data, axis=2, center="frame", toeplitz=True))
    raise DiffusionLabError(f"unknown noise prior {prior!r}; allowed: {', '.join(PRIORS)}")


def run_config(prior_spec: str, seed: int, o: dict) -> dict:
    """A full, validated run config (the lead's trainer resolves and checks it)."""
    from diffusionlab.training.config import resolve

    T = int(o["T"])
    user = {
        "data": data_config(o),
        "process": {"name": "vp", "T": T, "schedule": "linear", "beta_start": BETA_MIN / T,
                    "beta_end": BETA_MAX / T, "noise": prior_spec},
        "model": {"name": "video_unet", "base_channels": o["base_channels"], "channel_mults": list(o["channel_mults"]),
                  "num_res_blocks": 1, "attn_resolutions": list(o["attn_resolutions"]), "conv_resample": False,
                  "temporal": o["temporal"]},
        "parametrization": {"prediction": "eps", "learn_variance": False, "scale_input": True},
        "objective": {"name": "simple", "weighting": o["weighting"]},
        "train": {"steps": o["steps"], "batch_size": o["batch"], "lr": o["lr"], "warmup": o["warmup"],
                  "grad_clip": 1.0, "ema_decay": 0.999, "seed": int(seed), "checkpoint_every": o["steps"],
                  "keep_checkpoints": 1, "log_every": max(1, o["steps"] // 20), "device": o["device"],
                  "threads": o["threads"]},
        "sample": {"sampler": "ddpm", "steps": o["sample_steps"], "num": o["samples"], "clip_x0": True},
    }
    return resolve(user)


# ---- one run ------------------------------------------------------------------------------------------------
def train_run(prior: str, seed: int, o: dict, run_dir: Path, log=print) -> dict:
    """Train (or reuse) the run of ``prior`` and ``seed``; returns its config."""
    from diffusionlab.data import load_dataset
    from diffusionlab.training.trainer import train

    if (run_dir / "model.safetensors").is_file() and (run_dir / "config.yaml").is_file():
        from diffusionlab.training.config import load_config

        log(f"noise-prior: reusing {run_dir}")
        return load_config(run_dir / "config.yaml")
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(data_config(o), seed=seed).data if prior == "fitted" else None
    spec = noise_spec(prior, o, data)
    cfg = run_config(spec, seed, o)
    if prior == "fitted":
        from diffusionlab.noise import make_covariance
        from diffusionlab.noise.fit import save_covariance

        save_covariance(make_covariance(spec, o["frames"], 2), run_dir / "noise_covariance.safetensors",
                        meta={"fitted_to": "training videos", "center": "frame", "toeplitz": True})
    log(f"noise-prior: training {prior} (seed {seed}, noise {spec[:60]}) in {run_dir}")
    summary = train(cfg, run_dir, resume=True, progress=False, log=log)
    log(f"noise-prior: {prior} seed {seed} trained in {summary['seconds']} s")
    return cfg


def test_videos(o: dict, num: int):
    from diffusionlab.data import load_dataset

    cfg = dict(data_config(o, split="test"), num=int(num))
    return load_dataset(cfg, seed=TEST_SEED)


def evaluate_run(run_dir: Path, o: dict, seed: int, log=print) -> dict:
    """Bits/dim and sample statistics of one trained run (cached in ``run_dir/metrics.json``)."""
    from diffusionlab.metrics.video import elbo_bpd, ode_bpd, video_statistics
    from diffusionlab.training.sampling import generate, load_run
    from diffusionlab.video_io import save_frame_grid, save_gif, save_npz

    cache = run_dir / "metrics.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg, ds, model = load_run(run_dir, device=o["device"])
    dev = next(model.parameters()).device
    test = test_videos(o, o["eval_num"]).data.to(dev)
    t0 = time.time()
    g = torch.Generator(device=dev).manual_seed(1000 + seed)
    out = {"elbo": elbo_bpd(model, test, levels=LEVELS, generator=g)}
    log(f"noise-prior: {run_dir.name} ELBO {out['elbo']['bpd']:.4f} bits/dim ({time.time() - t0:.0f} s)")
    if o["ode_num"] > 0:
        t0 = time.time()
        out["ode"] = ode_bpd(model, test[: o["ode_num"]], levels=LEVELS, generator=g, beta_min=BETA_MIN,
                             beta_max=BETA_MAX)
        log(f"noise-prior: {run_dir.name} ODE {out['ode']['bpd']:.4f} bits/dim, {out['ode']['nfe']} evaluations "
            f"({time.time() - t0:.0f} s)")
    t0 = time.time()
    x = generate(model, cfg["sample"], num=o["samples"], seed=2000 + seed, device=dev, shape=ds.sample_shape)
    disp = ds.to_display(x)
    out["samples"] = video_statistics(disp, max_lag=min(3, disp.shape[2] - 1))
    out["sample_seconds"] = round(time.time() - t0, 1)
    save_npz(disp, run_dir / "samples.npz")
    save_gif(disp[:16], run_dir / "samples.gif", fps=4)
    save_frame_grid(disp[:8], run_dir / "samples.png")
    out["noise"] = cfg["process"]["noise"]
    out["C_lag1"] = float(_cov_matrix(cfg, o)[0, 1]) if o["frames"] > 1 else float("nan")
    cache.write_text(json.dumps(out, indent=2))
    return out


def _cov_matrix(cfg: dict, o: dict) -> torch.Tensor:
    from diffusionlab.noise import make_covariance

    spec = cfg["process"]["noise"]
    return torch.eye(o["frames"], dtype=torch.float64) if spec == "iid" else make_covariance(spec, o["frames"], 2).matrix()


# ---- aggregation --------------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x == x]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, sd


COLUMNS = [  # (key, header, getter)
    ("C_lag1", "C lag-1", lambda r: r["C_lag1"]),
    ("elbo", "-ELBO bits/dim", lambda r: r["elbo"]["bpd"]),
    ("ode", "ODE NLL bits/dim", lambda r: r["ode"]["bpd"] if "ode" in r else float("nan")),
    ("lag1", "lag-1 corr", lambda r: r["samples"]["lag_correlation"][0]),
    ("lag2", "lag-2 corr", lambda r: r["samples"]["lag_correlation"][1] if len(r["samples"]["lag_correlation"]) > 1
     else float("nan")),
    ("diff", "mean abs frame diff", lambda r: r["samples"]["consecutive_difference"]),
    ("consistency", "digit consistency", lambda r: r["samples"]["consistency"]),
    ("all_same", "same digit all frames", lambda r: r["samples"]["all_same"]),
    ("confidence", "classifier confidence", lambda r: r["samples"]["confidence"]),
]


def aggregate(results: dict, real: dict) -> dict:
    """Per prior: every column's per-seed values, mean and standard deviation over seeds."""
    table = {}
    for prior, by_seed in results.items():
        row = {}
        for key, _, get in COLUMNS:
            vals = [get(r) for r in by_seed.values()]
            m, sd = _mean_sd(vals)
            row[key] = {"mean": m, "sd": sd, "values": vals}
        table[prior] = row
    real_row = {"lag1": real["lag_correlation"][0], "lag2": real["lag_correlation"][1],
                "diff": real["consecutive_difference"], "consistency": real["consistency"],
                "all_same": real["all_same"], "confidence": real["confidence"]}
    return {"priors": table, "real": real_row}


def _fmt(cell: dict, digits: int = 3) -> str:
    m, sd = cell["mean"], cell["sd"]
    if m != m:
        return "--"
    return f"{m:.{digits}f}" + ("" if sd != sd else f" ± {sd:.{digits}f}")


def markdown_table(agg: dict, seeds: list[int]) -> str:
    head = "| prior | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "| --- " * (len(COLUMNS) + 1) + "|"
    lines = [head, sep]
    for prior, row in agg["priors"].items():
        lines.append(f"| {prior} | " + " | ".join(_fmt(row[k]) for k, _, _ in COLUMNS) + " |")
    real = agg["real"]
    cells = ["--", "--", "--"] + [f"{real[k]:.3f}" for k in ("lag1", "lag2", "diff", "consistency", "all_same",
                                                               "confidence")]
    lines.append("| real videos | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± standard deviation over {len(seeds)} seed(s) {seeds} (one trained model per prior and seed).")
    return "\n".join(lines)


# ---- figures ------------------------------------------------------------------------------------------------
def plot_results(agg: dict, covs: dict, data_corr: torch.Tensor, docs: Path) -> list[Path]:
    from diffusionlab.plotting import _agg

    plt = _agg()
    priors = list(agg["priors"])
    paths = []
    # 1. bits/dim
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    for ax, key, title in ((axes[0], "elbo", "-ELBO (bits/dim)"), (axes[1], "ode", "ODE NLL (bits/dim)")):
        for i, p in enumerate(priors):
            cell = agg["priors"][p][key]
            ax.bar(i, cell["mean"], yerr=0 if cell["sd"] != cell["sd"] else cell["sd"], color=f"C{i}", capsize=4)
            ax.plot([i] * len(cell["values"]), cell["values"], "k.", ms=4)
        ax.set_xticks(range(len(priors)), priors)
        ax.set_title(title)
        finite = [v for p in priors for v in agg["priors"][p][key]["values"] if v == v]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.3 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(docs / "bpd.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    # 2. temporal statistics of samples vs real
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=120)
    for i, p in enumerate(priors):
        row = agg["priors"][p]
        axes[0].errorbar([1, 2], [row["lag1"]["mean"], row["lag2"]["mean"]],
                         yerr=[_nz(row["lag1"]["sd"]), _nz(row["lag2"]["sd"])], marker="o", capsize=3, label=p)
    axes[0].plot([1, 2], [agg["real"]["lag1"], agg["real"]["lag2"]], "k--", marker="s", label="real")
    axes[0].set_xticks([1, 2])
    axes[0].set_xlabel("lag k")
    axes[0].set_title("frame correlation at lag k")
    axes[0].legend(fontsize=7)
    for ax, key, title in ((axes[1], "diff", "mean |x_{f+1} - x_f|"), (axes[2], "consistency", "digit consistency")):
        for i, p in enumerate(priors):
            cell = agg["priors"][p][key]
            ax.bar(i, cell["mean"], yerr=_nz(cell["sd"]), color=f"C{i}", capsize=4)
            ax.plot([i] * len(cell["values"]), cell["values"], "k.", ms=4)
        ax.axhline(agg["real"][key], color="k", ls="--", lw=1, label="real")
        ax.set_xticks(range(len(priors)), priors)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(docs / "temporal.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    # 3. the noise covariances' first rows vs the data's frame correlation
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    lags = torch.arange(data_corr.shape[0])
    ax.plot(lags, data_corr[0], "k--", marker="s", label="data (frame-centred)")
    for i, (p, m) in enumerate(covs.items()):
        ax.plot(lags, m[0], marker="o", color=f"C{i}", label=p)
    ax.set_xlabel("lag (frames)")
    ax.set_ylabel("correlation C[0, lag]")
    ax.set_title("noise covariance C across frames")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(docs / "covariances.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def _nz(v: float) -> float:
    return 0.0 if v != v else v


# ---- driver -------------------------------------------------------------------------------------------------
def options(args) -> dict:
    o = dict(PRESETS[args.preset])
    for key in ("steps", "batch", "lr", "frames", "size", "num_train", "T", "eval_num", "ode_num", "samples",
                "sample_steps"):
        v = getattr(args, key, None)
        if v is not None:
            o[key] = v
    if args.seeds is not None:
        o["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    o.update(speed=args.speed, alpha_mixed=args.alpha_mixed, alpha_progressive=args.alpha_progressive,
             weighting=args.weighting, device=args.device, threads=args.threads)
    priors = [p.strip() for p in args.priors.split(",") if p.strip()]
    bad = [p for p in priors if p not in PRIORS]
    if bad or not priors:
        raise DiffusionLabError(f"unknown noise prior(s) {bad}; allowed: {', '.join(PRIORS)}")
    o["priors"] = priors
    if not o["T"] > BETA_MAX:
        raise DiffusionLabError(f"T must exceed {BETA_MAX:g} (the chain's last beta is {BETA_MAX:g} / T < 1), got {o['T']}")
    if o["weighting"] not in WEIGHTINGS:
        raise DiffusionLabError(f"unknown weighting {o['weighting']!r}; allowed: {', '.join(WEIGHTINGS)}")
    return o


def run_experiment(o: dict, out_dir: Path, docs: Path, log=print) -> dict:
    from diffusionlab.data import load_dataset
    from diffusionlab.metrics.video import video_statistics
    from diffusionlab.noise.fit import frame_correlation
    from diffusionlab.video_io import save_frame_grid, save_gif

    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    results: dict = {p: {} for p in o["priors"]}
    timings: dict = {}
    for seed in o["seeds"]:
        for prior in o["priors"]:
            run_dir = out_dir / f"{prior}_seed{seed}"
            t0 = time.time()
            train_run(prior, seed, o, run_dir, log)
            t1 = time.time()
            results[prior][seed] = evaluate_run(run_dir, o, seed, log)
            timings[f"{prior}_seed{seed}"] = {"train_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1)}
    # real videos: statistics on held-out videos, figures
    real_ds = test_videos(o, o["samples"])
    real_disp = real_ds.to_display(real_ds.data)
    real = video_statistics(real_disp, max_lag=min(3, o["frames"] - 1), labels=real_ds.labels)
    train_ds = load_dataset(data_config(o), seed=o["seeds"][0])
    data_corr = frame_correlation(train_ds.data, axis=2, center="frame")
    covs = {}
    for prior in o["priors"]:
        cfg_path = out_dir / f"{prior}_seed{o['seeds'][0]}" / "config.yaml"
        from diffusionlab.training.config import load_config

        covs[prior] = _cov_matrix(load_config(cfg_path), o)
    agg = aggregate(results, real)
    figs = plot_results(agg, covs, data_corr, docs)
    save_gif(real_disp[:16], docs / "real.gif", fps=4)
    save_frame_grid(real_disp[:8], docs / "real.png")
    for prior in o["priors"]:
        src = out_dir / f"{prior}_seed{o['seeds'][0]}"
        shutil.copyfile(src / "samples.gif", docs / f"samples_{prior}.gif")
        shutil.copyfile(src / "samples.png", docs / f"samples_{prior}.png")
    md = markdown_table(agg, o["seeds"])
    payload = {"options": o, "aggregate": agg, "per_run": {p: {str(s): r for s, r in v.items()}
                                                           for p, v in results.items()},
               "real": real, "data_frame_correlation": data_corr.tolist(),
               "covariances": {p: m.tolist() for p, m in covs.items()}, "timings": timings,
               "total_seconds": round(time.time() - t_start, 1), "figures": [str(f) for f in figs]}
    (docs / "results.json").write_text(json.dumps(payload, indent=2))
    (docs / "results.md").write_text(md + "\n")
    log(md)
    return payload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes for 2 CPU cores or one GPU")
    p.add_argument("--out-dir", default="runs/noise_prior", help="where the runs go (reused if present)")
    p.add_argument("--docs", default="docs/video", help="where the table, JSON and figures go")
    p.add_argument("--priors", default=",".join(PRIORS), help=f"comma-separated subset of {', '.join(PRIORS)}")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (preset: cpu 0,1; gpu 0,1,2)")
    p.add_argument("--weighting", default="simple", help="simple (Mahalanobis L_simple), elbo (ELBO weights) "
                   "or mse (ignores C)")
    p.add_argument("--alpha-mixed", type=float, default=1.0, help="mixed prior alpha (off-diagonal a^2/(1+a^2))")
    p.add_argument("--alpha-progressive", type=float, default=1.0, help="progressive prior alpha "
                   "(rho = a/sqrt(1+a^2))")
    p.add_argument("--speed", type=float, default=1.0, help="digit speed, pixels per frame")
    for key, typ in (("steps", int), ("batch", int), ("lr", float), ("frames", int), ("size", int),
                     ("num_train", int), ("T", int), ("eval_num", int), ("ode_num", int), ("samples", int),
                     ("sample_steps", int)):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, default=None, help="override the preset")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def cmd_noise_prior(args) -> int:
    o = options(args)
    run_experiment(o, Path(args.out_dir), Path(args.docs), log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def register(sub) -> None:
    """Add ``noise-prior`` to the experiment subparsers ``sub``."""
    p = sub.add_parser("noise-prior", help="train one video model per frame-noise covariance C and compare them")
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
