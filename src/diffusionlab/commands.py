"""Subcommands of the CLI: ``train``, ``sample``, ``evaluate``, ``demo``.

Each handler returns an exit status; user errors raise :class:`DiffusionLabError` (one line, exit 2).
Outputs are written through a temporary file and renamed, so a failed command leaves nothing half-written.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.config import packaged_config, shipped_configs  # noqa: F401 (also imported from here)

SAMPLE_SUFFIXES = (".npz", ".png", ".npy", ".gif", ".mp4")


def _config_path(arg: str) -> Path:
    """A config file path, or the name of a packaged config (``digits`` -> configs/digits.yaml)."""
    p = Path(arg)
    if p.is_file():
        return p
    if not p.suffix and packaged_config(arg).is_file():
        return packaged_config(arg)
    raise DiffusionLabError(f"config file not found: {arg}")


# -- train --------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from diffusionlab.training.config import load_config
    from diffusionlab.training.stop import check_minutes
    from diffusionlab.training.trainer import train

    check_minutes(args.max_minutes)
    overrides = list(_with_threads(args))
    if getattr(args, "init_from", None) is not None:  # image-to-video fine-tuning (training/init.py)
        overrides.append(f"train.init_from={json.dumps(args.init_from)}")
    if getattr(args, "freeze_spatial", False):
        overrides.append("train.freeze_spatial=true")
    cfg = load_config(_config_path(args.config), overrides)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet, log=_stderr,
                    max_minutes=args.max_minutes)
    from diffusionlab.training.distributed import quiet_rank

    if summary.get("stopped") is None and not quiet_rank():
        _stderr(_trained_line(summary, Path(args.out)))
    return 0


def _with_threads(args) -> list[str]:
    """The ``--set`` overrides with ``--threads N`` as ``train.threads=N`` (training reads its config)."""
    from diffusionlab.threads import check_threads

    extra = [] if args.threads is None else [f"train.threads={check_threads(args.threads)}"]
    return [*args.set, *extra]


def apply_threads(args) -> int:
    """``--threads`` of a command that does not train (default :data:`~diffusionlab.threads.DEFAULT_THREADS`);
    returns the count in use, which the command reports."""
    from diffusionlab.threads import DEFAULT_THREADS, set_threads

    return set_threads(DEFAULT_THREADS if args.threads is None else args.threads)


def add_threads(p, trains: bool = False) -> None:
    """Add ``--threads N`` to a subcommand's parser."""
    what = "train.threads (the config's, default 1)" if trains else "1"
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"torch CPU threads (default: {what}; 0: torch's default, one per core)")


def _trained_line(summary: dict, out: Path) -> str:
    skipped = summary["skipped_steps"]
    note = f"{skipped} skipped: non-finite loss or gradient" if skipped else "none skipped"
    rate = summary.get("samples_per_second")
    speed = f" at {rate:.4g} samples/s" if rate else ""
    return f"diffusionlab: trained {summary['steps']} steps in {summary['seconds']} s{speed} ({note}); weights: " \
           f"{out / 'model.safetensors'}"


#: the most samples a command draws without an override (DIFFUSIONLAB_MAX_SAMPLES)
MAX_SAMPLES = 10_000_000
#: the most samples drawn into one picture (.png grid or scatter, .gif, .mp4) without an override (DIFFUSIONLAB_MAX_PLOT)
MAX_PLOT = 100_000


def check_num(num, what: str = "number of samples") -> int:
    """``--num``: an integer in [1, the limit] (:data:`MAX_SAMPLES`, DIFFUSIONLAB_MAX_SAMPLES overrides)."""
    from diffusionlab.checks import at_most

    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DiffusionLabError(f"{what} must be an integer >= 1, got {num!r}")
    return at_most(f"--num", num, "samples", MAX_SAMPLES)


def _seed_arg(text: str) -> int:
    """argparse type of ``--seed``: an integer in [0, 2^63 - 2]."""
    import argparse

    from diffusionlab.training.sampling import check_seed

    try:
        return check_seed(int(text))
    except ValueError as e:
        msg = str(e) if isinstance(e, DiffusionLabError) else f"invalid int value: {text[:40]!r}"
        raise argparse.ArgumentTypeError(msg) from None


# -- sample -------------------------------------------------------------------------------------------------
#: training points drawn in grey under a 2-D scatter of samples
REFERENCE_POINTS = 5000


def _write_samples(x_display, kind: str, out: Path, reference=None) -> None:
    """Write samples (display space) to ``.npz`` (key ``x``), ``.npy`` or a ``.png`` grid/scatter, atomically; a
    scatter of 2-D points draws ``reference`` (the training data) in grey beneath the samples."""
    from diffusionlab.io import atomic_write_bytes

    if out.suffix not in SAMPLE_SUFFIXES:
        raise DiffusionLabError(f"--out must end in one of {', '.join(SAMPLE_SUFFIXES)}, got {out}")
    arr = np.asarray(x_display, dtype=np.float32)
    if out.suffix in (".gif", ".mp4"):
        if kind != "videos":
            raise DiffusionLabError(f"{out.suffix} output is for video runs; this run's samples are {kind}")
        from diffusionlab.video_io import save_videos

        save_videos(arr, out)
        return
    if out.suffix == ".npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, x=arr)
        atomic_write_bytes(out, buf.getvalue())
    elif out.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(out, buf.getvalue())
    else:
        from diffusionlab.plotting import save_samples

        from diffusionlab.io import atomic_path

        with atomic_path(out) as tmp:
            save_samples(arr, kind, tmp, reference=reference)


def _check_out_dir(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DiffusionLabError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DiffusionLabError(f"cannot write {out}: directory {parent} is not writable")
    if out.is_dir():
        raise DiffusionLabError(f"cannot write {out}: it is a directory")


def _check_output_size(out: Path, num: int, shape, kind: str) -> None:
    """Refuse, before sampling, an output that cannot be written: a picture of more than :data:`MAX_PLOT` samples,
    or an array larger than the free space of its file system."""
    import shutil

    from diffusionlab.checks import at_most

    if out.suffix in (".png", ".gif", ".mp4"):
        at_most(f"--num for a {out.suffix} picture", num, "plot", MAX_PLOT)
        return
    need = 4 * num * int(np.prod(shape)) + (1 << 16)
    try:
        free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    except OSError:
        return
    if need > free:
        raise DiffusionLabError(f"cannot write {out}: {num} samples need about {need / 2**20:.1f} MB, "
                                f"{free / 2**20:.1f} MB are free")


def _stream_samples(chunks, ds, out: Path, num: int, source) -> None:
    """Write model-space sample chunks to ``out`` (display space) as they come: ``.npy`` and ``.npz`` (key ``x``)
    are streamed to a temporary file (memory bounded by one chunk) and renamed at the end; pictures collect
    their (bounded) samples first. Non-finite samples stop it: nothing is written."""
    from diffusionlab.io import atomic_path, os_error
    from diffusionlab.training.sampling import check_finite_samples

    if out.suffix not in (".npy", ".npz"):
        parts, done = [], 0
        for x in chunks:
            done += len(x)
            check_finite_samples(x, done, source)
            parts.append(ds.to_display(x))
        reference = ds.data[:REFERENCE_POINTS].cpu() if ds.kind == "points" else None
        try:
            _write_samples(torch_cat(parts), ds.kind, out, reference)
        except OSError as e:
            raise os_error(e, f"write {out}") from None
        return
    import zipfile

    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (num, *tuple(ds.sample_shape))}
    try:
        with atomic_path(out) as tmp:
            if out.suffix == ".npy":
                f, zf = open(tmp, "wb"), None
            else:
                zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED)
                f = zf.open("x.npy", "w", force_zip64=True)
            try:
                np.lib.format.write_array_header_2_0(f, header)
                done = 0
                for x in chunks:
                    done += len(x)
                    check_finite_samples(x, done, source)
                    f.write(np.ascontiguousarray(ds.to_display(x).numpy(), dtype=np.float32).tobytes())
            finally:
                f.close()
                if zf is not None:
                    zf.close()
    except OSError as e:
        raise os_error(e, f"write {out}") from None


def torch_cat(parts):
    import torch

    return torch.cat(parts, 0)


# -- model sources: a run directory or a diffusers folder (diffusionlab.interop.diffusers) -------------------
def _load_source(args, continuous: bool = False, default_data=None):
    """``(cfg, ds, model)`` of ``--run DIR`` or ``--diffusers DIR`` (exactly one; ``--data`` with the latter,
    else ``default_data``). ``continuous``: a diffusers model gets the VP-SDE instead of its chain."""
    from diffusionlab.training.sampling import load_run

    _check_source(args)
    run, folder, data = getattr(args, "run", None), getattr(args, "diffusers", None), getattr(args, "data", None)
    if folder is None:
        return load_run(run, device=args.device)
    from diffusionlab.interop.diffusers import load_diffusers_run

    return load_diffusers_run(folder, data=data if data is not None else default_data, device=args.device,
                              continuous=continuous)


def _check_source(args) -> None:
    """Exactly one of ``--run`` and ``--diffusers``; ``--data`` only with the latter."""
    run, folder = getattr(args, "run", None), getattr(args, "diffusers", None)
    if (run is None) == (folder is None):
        raise DiffusionLabError("give exactly one of --run DIR (a diffusionlab run) and --diffusers DIR")
    if folder is None and getattr(args, "data", None) is not None:
        raise DiffusionLabError("--data applies to --diffusers models; a run uses the data of its config.yaml")


def _source_name(args) -> str:
    return str(args.run if getattr(args, "run", None) is not None else args.diffusers)


def _continuous_sampler(name: str | None) -> bool:
    """Whether the sampler asked for needs a continuous-time SDE (a diffusers model then gets the VP-SDE)."""
    from diffusionlab.samplers import get_sampler

    return name is not None and "continuous" in get_sampler(name).requires


def _nfe_line(model, scfg: dict, num: int) -> dict:
    """What the sampling cost: the sampler's evaluations per sample path (by its catalogue entry) and the
    evaluations counted by the model over all batches."""
    from diffusionlab.samplers import get_sampler
    from diffusionlab.training.sampling import sampler_options, section_grid

    spec = get_sampler(scfg["sampler"])
    grid = section_grid(scfg, model.process)
    return {"steps": grid.steps, "grid": grid.kind, "nfe_per_sample": spec.count(grid, sampler_options(scfg))}


def _sample_conditional(args, cfg: dict, ds, model, scfg: dict, cond: dict, out: Path) -> int:
    """``diffusionlab sample`` with conditioning (module docstring): writes ``out`` and prints one JSON line."""
    from diffusionlab.conditioning.cli import set_options
    from diffusionlab.conditioning.generate import generate_conditional, load_known
    from diffusionlab.samplers import get_sampler
    from diffusionlab.training.sampling import sampler_options, section_grid

    device = next(model.parameters()).device
    kw = dict(classes=cond.get("classes"), guidance=cond.get("guidance"), interval=cond.get("interval"))
    num = args.num
    if cond.get("known") is not None:
        if getattr(args, "sampler", None) is not None:
            raise DiffusionLabError("--sampler does not apply with --known: the conditional --method samples "
                                    "(its --steps, --grid and --set options)")
        known, mask = load_known(cond["known"], cond["mask"], ds.sample_shape,
                                 None if ds.kind == "points" else _known_to_model)
        if num is None:
            num = known.shape[0]
        elif known.shape[0] == 1:
            known, mask = known.expand(num, *known.shape[1:]), mask.expand(num, *mask.shape[1:])
        elif known.shape[0] != num:
            raise DiffusionLabError(f"--num {num} disagrees with the {known.shape[0]} rows of --known (one known row "
                                    "per sample, or one row for all)")
        opts = dict(cond["method_options"])
        opts.update(set_options(args.set))
        if args.eta is not None:
            raise DiffusionLabError("--eta is a ddim option; with --method use --set KEY=VALUE for the method's options")
        kw.update(known=known, mask=mask, method=cond["method"], method_options=opts, grid=args.steps, kind=args.grid)
    else:
        num = 64 if num is None else num
        spec = get_sampler(scfg["sampler"])
        kw.update(sampler=spec, sampler_options=sampler_options(scfg), grid=section_grid(scfg, model.process))
    t0 = time.time()
    x, info = generate_conditional(model, ds.sample_shape, num, args.seed, device, progress=not args.quiet, **kw)
    disp = ds.to_display(x)
    per_class = num // len(cond["classes"]) if cond.get("classes") and num % len(cond["classes"]) == 0 else None
    if out.suffix == ".png" and ds.kind == "images" and per_class:
        from diffusionlab.io import atomic_path
        from diffusionlab.plotting import save_image_grid

        with atomic_path(out) as tmp:
            save_image_grid(disp.float().clamp(0, 1), tmp, nrow=per_class)
    else:
        _write_samples(disp, ds.kind, out)
    name = info.get("method") or scfg["sampler"]
    print(json.dumps({"out": str(out), "num": num, "sampler": name, **info, "seconds": round(time.time() - t0, 2)}))
    return 0


def _known_to_model(x):
    from diffusionlab.data.scaling import to_model

    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise DiffusionLabError(f"--known values of images/videos are in display space [0, 1], got {lo:.4g}..{hi:.4g}")
    return to_model(x.clamp(0, 1))


def cmd_sample(args) -> int:
    from diffusionlab.training.sampling import generate_chunks, sample_section

    out = Path(args.out)
    if out.suffix not in SAMPLE_SUFFIXES:
        raise DiffusionLabError(f"--out must end in one of {', '.join(SAMPLE_SUFFIXES)}, got {out}")
    _check_out_dir(out)
    if args.num is not None:
        check_num(args.num)
    if args.sampler is not None:
        from diffusionlab.samplers import get_sampler

        get_sampler(args.sampler)  # validate the name before any work
    threads = apply_threads(args)
    cfg, ds, model = _load_source(args, continuous=_continuous_sampler(args.sampler))
    if out.suffix in (".gif", ".mp4") and ds.kind != "videos":
        raise DiffusionLabError(f"{out.suffix} output is for video runs; this run's samples are {ds.kind}")
    # -- class labels, guidance, known values (diffusionlab.conditioning.cli) --
    from diffusionlab.conditioning.cli import resolve as resolve_conditioning

    cond = resolve_conditioning(args, cfg["sample"])
    if cond.get("known") is not None:  # the method's own steps, grid and options
        return _sample_conditional(args, cfg, ds, model, None, cond, out)
    scfg = sample_section(cfg, args.sampler, args.steps, args.grid, args.set, args.eta, run_dir=args.run)
    longer = _longer(args, ds)  # video branch: more frames than trained on (samplers/extend.py)
    if cond and not longer:
        return _sample_conditional(args, cfg, ds, model, scfg, cond, out)
    # --
    num = 64 if args.num is None else args.num
    shape = (ds.sample_shape[0], args.frames, *ds.sample_shape[2:]) if longer else ds.sample_shape
    _check_output_size(out, num, shape, ds.kind)
    t0 = time.time()
    cost = _nfe_line(model, scfg, num)
    if longer:
        x = _extend(args, model, ds, scfg, num, cond)  # with the classes and guidance of cond, if any
        _write_samples(ds.to_display(x), ds.kind, out)
        cost = _extend_cost(args, ds, cost)
        cost.update(_class_info(cond))
    else:
        chunks = generate_chunks(model, scfg, num=num, seed=args.seed, device=next(model.parameters()).device,
                                 shape=ds.sample_shape, progress=not args.quiet)
        _stream_samples(chunks, ds, out, num, _source_name(args))
    print(json.dumps({"out": str(out), "num": num, "sampler": scfg["sampler"], **cost,
                      "seconds": round(time.time() - t0, 2), "threads": threads}))
    return 0


# -- evaluate -----------------------------------------------------------------------------------------------
# ---- video branch: moving_digits runs are scored by diffusionlab.metrics.video_digits (docs/video_metric.md) ----
VIDEO_NUM = 64  #: default number of sampled videos


def _video_speed(cfg: dict, ds, run: str) -> float | None:
    """The px/frame of a moving_digits run's data (what the video metric's real references use); None for other
    runs. Options missing from the config take ``moving_digits``'s defaults."""
    import inspect

    from diffusionlab.data.video import moving_digits

    if ds.name != "moving_digits":
        return None
    opts = {k: p.default for k, p in inspect.signature(moving_digits).parameters.items()} | dict(cfg["data"])
    if opts["num_digits"] != 1:
        raise DiffusionLabError(f"the video metric scores one-digit videos; {run} was trained on moving_digits "
                                f"with num_digits={opts['num_digits']}")
    return float(opts["speed"])
def _longer(args, ds) -> bool:
    """Whether ``--frames`` asks a video run for more frames than it was trained on."""
    frames = getattr(args, "frames", None)
    if frames is None:
        return False
    if ds.kind != "videos":
        raise DiffusionLabError(f"--frames applies to video runs; this run's samples are {ds.kind}")
    trained = int(ds.sample_shape[1])
    if frames < trained:
        raise DiffusionLabError(f"--frames must be at least the {trained} frames the run was trained on, got {frames}")
    return frames > trained


def _class_info(cond: dict) -> dict:
    """The classes and guidance of a conditioning (what the JSON line reports), the ones set."""
    return {k: cond[k] for k in ("classes", "guidance") if cond.get(k) is not None}


def _extend(args, model, ds, scfg, num, cond=None):
    """Sliding windows of the trained length, each conditioned on the frames already made, with joint noising
    (:func:`diffusionlab.training.sampling.extend_with_section`); ``cond``: class labels and guidance."""
    from diffusionlab.training.sampling import extend_with_section

    cond = cond or {}
    return extend_with_section(model, scfg, num, args.frames, ds.sample_shape, overlap=args.overlap,
                               joint=not args.independent_noise, resample=args.resample, seed=args.seed,
                               progress=not args.quiet, classes=cond.get("classes"), guidance=cond.get("guidance"),
                               interval=cond.get("interval"))


def _extend_cost(args, ds, cost: dict) -> dict:
    """The evaluations of a longer video: every window's steps (times ``--resample``), per video."""
    from diffusionlab.samplers.extend import window_starts

    window = int(ds.sample_shape[1])
    windows = len(window_starts(args.frames, window, args.overlap))
    return {**cost, "windows": windows, "nfe_per_sample": cost["nfe_per_sample"] * windows * args.resample}


def _add_extend_args(p) -> None:
    p.add_argument("--frames", type=int, default=None,
                   help="video runs: frames per video; more than trained are made by sliding windows conditioned on "
                        "the frames already made (DDIM steps, noise correlated across the overlap)")
    p.add_argument("--overlap", type=int, default=None, help="with --frames: known frames per window (default half)")
    p.add_argument("--resample", type=int, default=1, help="with --frames: RePaint resampling per step (default 1)")
    p.add_argument("--independent-noise", action="store_true",
                   help="with --frames: draw the new frames' noise independently of the known frames' (comparison)")
# ---- end of the video branch ----


def evaluate_run(run: str, num: int | None = None, seed: int = 0, sampler: str | None = None,
                 steps: int | None = None, device: str = "auto", progress: bool = False, grid: str | None = None,
                 overrides: list[str] | None = None, loaded=None, extend=None, classes=None) -> dict:
    """Sample ``num`` items from a run and score them: digits runs with the digits metric (default 1000 samples),
    moving_digits runs with the video metric (default :data:`VIDEO_NUM` videos); ``loaded``: an already loaded
    ``(cfg, ds, model)`` (e.g. a diffusers model), ``run`` then only names it. A class-conditional run is sampled
    with the classes and guidance of its ``sample:`` section, or of ``classes`` (an object with the ``--class``,
    ``--guidance``, ``--guidance-interval`` attributes; :func:`~diffusionlab.conditioning.cli.resolve_classes`)."""
    from diffusionlab.conditioning.cli import resolve_classes
    from diffusionlab.metrics import evaluate_digits
    from diffusionlab.training.sampling import generate, load_run, sample_section

    cfg, ds, model = loaded if loaded is not None else load_run(run, device=device)
    speed = _video_speed(cfg, ds, run)
    if extend is not None and speed is None:
        raise DiffusionLabError("--frames applies to video runs")
    if speed is None and ds.name != "digits":
        raise DiffusionLabError(f"the digits metric needs a run trained on digits (or moving_digits videos); {run} "
                                f"was trained on {ds.name!r}")
    if num is None:
        num = 1000 if speed is None else VIDEO_NUM
    cond = resolve_classes(classes, cfg["sample"])
    scfg = sample_section(cfg, sampler, steps, grid, overrides, run_dir=run)
    longer = extend is not None and _longer(extend, ds)
    t0, info = time.time(), {}
    if longer:  # video branch: longer videos (samplers/extend.py), with the classes of cond if any
        x = _extend(extend, model, ds, scfg, num, cond)
        info = _class_info(cond)
    elif cond:  # class labels and guidance (conditioning/generate.py)
        x, info = _generate_classes(model, ds, scfg, cond, num, seed, progress)
    else:
        x = generate(model, scfg, num=num, seed=seed, device=next(model.parameters()).device, shape=ds.sample_shape,
                     progress=progress)
    seconds = time.time() - t0
    from diffusionlab.training.sampling import check_finite_samples

    check_finite_samples(x, num, run)
    if speed is None:
        metrics = evaluate_digits(ds.to_display(x))
    else:  # video branch
        from diffusionlab.metrics.video_digits import evaluate_videos

        metrics = evaluate_videos(ds.to_display(x), speed=speed, device=next(model.parameters()).device)
    metrics.update({"sampler": scfg["sampler"], **_nfe_line(model, scfg, num), "sampling_seconds": round(seconds, 2),
                    "seed": seed})
    metrics.update({k: info[k] for k in ("classes", "guidance", "guidance_interval", "network_calls") if k in info})
    return metrics, ds.to_display(x)


def _generate_classes(model, ds, scfg: dict, cond: dict, num: int, seed: int, progress: bool):
    """``(samples, info)`` of a class-conditional run with ``cond``'s classes and guidance and the section's sampler."""
    from diffusionlab.conditioning.generate import generate_conditional
    from diffusionlab.samplers import get_sampler
    from diffusionlab.training.sampling import sampler_options, section_grid

    return generate_conditional(model, ds.sample_shape, num, seed, next(model.parameters()).device,
                                sampler=get_sampler(scfg["sampler"]), sampler_options=sampler_options(scfg),
                                grid=section_grid(scfg, model.process), classes=cond.get("classes"),
                                guidance=cond.get("guidance"), interval=cond.get("interval"), progress=progress)


def cmd_evaluate(args) -> int:
    """``--metric digits``: sample and score digits; ``fid``: FID, KID, precision/recall
    (:mod:`diffusionlab.training.image_metrics`); ``nll`` / ``elbo``: likelihood reports
    (:mod:`diffusionlab.likelihood.evaluate`). A run (``--run``) or a diffusers model (``--diffusers``). One JSON
    object on stdout."""
    _check_source(args)
    if args.clip_x0 and args.metric != "elbo":
        raise DiffusionLabError(f"--clip-x0 applies to --metric elbo, not to --metric {args.metric}")
    threads = apply_threads(args)
    if args.num is not None:
        check_num(args.num, "--num")
    if args.steps is not None and (isinstance(args.steps, bool) or args.steps < 1):
        raise DiffusionLabError(f"--steps must be an integer >= 1, got {args.steps}")
    if args.metric != "fid":
        for flag, value in (("--inception", args.inception), ("--stats-cache", args.stats_cache)):
            if value is not None:
                raise DiffusionLabError(f"{flag} applies to --metric fid, not to --metric {args.metric}")
    if args.metric in ("digits", "fid"):
        for flag, value, default in (("--divergence", args.divergence, "exact"), ("--probes", args.probes, 1),
                                     ("--batch-size", args.batch_size, None), ("--variance", args.variance, None)):
            if value != default:
                raise DiffusionLabError(f"{flag} applies to --metric nll or elbo, not to --metric {args.metric}")
    if args.metric != "digits":
        for flag, value in (("--class", args.classes), ("--guidance", args.guidance),
                            ("--guidance-interval", args.guidance_interval)):
            if value is not None:
                raise DiffusionLabError(f"{flag} applies to --metric digits (class-conditional sampling), not to "
                                        f"--metric {args.metric}")
    if args.frames is not None and args.metric != "digits":
        raise DiffusionLabError(f"--frames applies to the video metric (--metric digits on a video run), not to "
                                f"--metric {args.metric}")
    num = 1000 if args.num is None and args.metric != "digits" else args.num  # digits: by the run's data
    if args.metric == "digits":
        loaded = _load_source(args, default_data="digits")
        metrics, _ = evaluate_run(_source_name(args), num=args.num, seed=args.seed, sampler=args.sampler,
                                  steps=args.steps, device=args.device, progress=not args.quiet, grid=args.grid,
                                  overrides=args.set, loaded=loaded,
                                  extend=args if args.frames is not None else None, classes=args)
    elif args.metric == "fid":
        from diffusionlab.interop.inception import load_inception
        from diffusionlab.training.build import resolve_device
        from diffusionlab.training.image_metrics import evaluate_image_metrics

        if args.inception is None:
            raise DiffusionLabError("--metric fid needs --inception PATH: a local copy of the FID Inception weights "
                                    "(pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)")
        extractor = load_inception(args.inception, device=resolve_device(args.device))  # fails before any sampling
        metrics = evaluate_image_metrics(_load_source(args), extractor, _source_name(args), num=num,
                                         seed=args.seed, sampler=args.sampler, steps=args.steps,
                                         cache_dir=args.stats_cache, progress=not args.quiet, log=_stderr)
    else:
        from diffusionlab.likelihood.evaluate import check_request, evaluate_likelihood

        if args.sampler is not None or args.steps is not None or args.grid is not None or args.set:
            raise DiffusionLabError(f"--sampler, --steps, --grid and --set apply to --metric digits, not to --metric "
                                    f"{args.metric}")
        check_request(args.metric, num, args.batch_size, args.divergence, args.probes, args.rtol, args.atol,
                      args.variance)  # bad options fail before the model is loaded
        loaded = _load_source(args, continuous=args.metric == "nll")
        metrics = evaluate_likelihood(loaded, args.metric, num=num, seed=args.seed,
                                      batch_size=args.batch_size, divergence=args.divergence, probes=args.probes,
                                      rtol=args.rtol, atol=args.atol, variance=args.variance,
                                      progress=not args.quiet, log=_stderr, run=_source_name(args),
                                      clip_x0=args.clip_x0)
    metrics["threads"] = threads
    print(json.dumps(metrics, indent=2))
    return 0


# -- demo ---------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    """The main job: train a U-Net on the bundled digits, sample 1000 digits, score and plot them."""
    import torch

    from diffusionlab.metrics import evaluate_digits
    from diffusionlab.plotting import save_image_grid
    from diffusionlab.io import atomic_write_bytes
    from diffusionlab.training.config import load_config
    from diffusionlab.training.sampling import generate, load_run
    from diffusionlab.training.trainer import train

    from diffusionlab.training.sampling import check_finite_samples
    from diffusionlab.training.stop import check_minutes

    out = Path(args.out)
    check_num(args.num)  # before training, not after
    check_minutes(args.max_minutes)
    cfg = load_config(packaged_config("digits"), _with_threads(args))
    t0 = time.time()
    _stderr(f"diffusionlab demo: training a U-Net on the bundled 8x8 digits ({cfg['train']['steps']} steps) -> {out}")
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet, log=_stderr, max_minutes=args.max_minutes)
    if summary.get("stopped") is not None:
        _stderr(f"diffusionlab demo: training stopped; continue with: diffusionlab demo --out {out} --resume")
        return 0
    _stderr(_trained_line(summary, out))
    cfg, ds, model = load_run(out)
    _stderr(f"diffusionlab demo: sampling {args.num} digits with {cfg['sample']['sampler']} ({cfg['sample']['steps']} steps)")
    t1 = time.time()
    x = generate(model, cfg["sample"], num=args.num, seed=cfg["train"]["seed"], device=next(model.parameters()).device,
                 shape=ds.sample_shape, progress=not args.quiet)
    check_finite_samples(x, args.num, out)
    x01 = ds.to_display(x).float().clamp(0, 1)
    sample_seconds = time.time() - t1
    _write_samples(x01.numpy(), ds.kind, out / "samples.npz")
    save_image_grid(x01[:100], out / "samples.png", nrow=10, scale=4)
    metrics = evaluate_digits(x01)
    metrics.update({"train_seconds": summary["seconds"], "sample_seconds": round(sample_seconds, 2),
                    "total_seconds": round(time.time() - t0, 2), "steps": summary["steps"],
                    "parameters": summary["parameters"], "sampler": cfg["sample"]["sampler"],
                    "sampler_steps": cfg["sample"]["steps"], "threads": torch.get_num_threads()})
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    print(f"diffusionlab demo finished in {metrics['total_seconds']:.0f} s")
    print(f"  samples (npz, key x, {args.num}x1x8x8 in [0,1]): {out / 'samples.npz'}")
    print(f"  sample grid:     {out / 'samples.png'}")
    print(f"  training curve:  {out / 'loss.png'}")
    print(f"  metrics:         {out / 'metrics.json'}  (FD {metrics['fd']:.2f}, class coverage {metrics['class_coverage']:.2f})")
    print(f"  weights:         {out / 'model.safetensors'}")
    print(f"  more samples:    diffusionlab sample --run {out} --num 64 --seed 1 --out more.png")
    return 0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_diffusers_args(p) -> None:
    """``--diffusers DIR`` and ``--data`` (:mod:`diffusionlab.interop.diffusers`): a diffusers model instead of a run."""
    p.add_argument("--diffusers", default=None, metavar="DIR",
                   help="a diffusers UNet2DModel folder (save_pretrained) or DDPMPipeline folder, instead of --run")
    p.add_argument("--data", default=None, metavar="NAME|YAML",
                   help="with --diffusers: the model's dataset (a name such as digits, or a YAML data section)")


def register(sub) -> None:
    from diffusionlab.experiments import register as register_experiments
    from diffusionlab.training.config import grid_argument
    from diffusionlab.oracles.cli import register as register_oracles

    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a run from a YAML config (a file, or the name of a shipped one: "
                                   f"{', '.join(shipped_configs())}). Every key, its type, default and meaning: "
                                   "docs/config.md (python -m diffusionlab.docs regenerates it). Override any key "
                                   "with --set section.key=value.")
    p.add_argument("config", help="YAML config file, or the name of a shipped one (see above)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the run's last intact checkpoint")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop cleanly after M minutes with a checkpoint (exit 0; continue with --resume); SIGTERM and "
                        "Ctrl-C stop the same way")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from RUN's EMA weights (train.init_from): an image unet run is inflated into a "
                        "video_unet, temporal layers at the identity")
    p.add_argument("--freeze-spatial", action="store_true",
                   help="with --init-from: train only the temporal layers (train.freeze_spatial)")
    add_threads(p, trains=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    from diffusionlab.processes.grid import GRID_KINDS
    from diffusionlab.samplers import sampler_names

    names = ", ".join(sampler_names())
    p = sub.add_parser("sample", help="draw samples from a trained run (or a diffusers model)",
                       description="Samples with the run's own sampler, steps, grid and options (its config's sample: "
                                   "section) unless --sampler names another, which then gets its own defaults. "
                                   f"Samplers: {names}.")
    p.add_argument("--run", default=None, help="run directory (from train or demo)")
    _add_diffusers_args(p)
    p.add_argument("--sampler", default=None, help=f"sampler (default: the run's): {names}")
    p.add_argument("--steps", type=int, default=None, help="number of sampler steps (default: the sampler's)")
    p.add_argument("--grid", default=None, type=grid_argument, metavar="GRID",
                   help=f"time grid: {', '.join(GRID_KINDS)}, fitted (the run's, from fit-grid) or file:PATH "
                        "(default: the sampler's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler option, e.g. eta=0.5 (refused if the sampler has no such option)")
    p.add_argument("--eta", type=float, default=None, help="shortcut for --set eta=VALUE (ddim)")
    p.add_argument("--num", type=int, default=None, help="number of samples (default 64, or the rows of --known)")
    p.add_argument("--seed", type=_seed_arg, default=0)
    p.add_argument("--out", required=True, help="output .npz (key x), .npy or .png (a 2-D run's scatter shows the "
                                                 "training data in grey)")
    p.add_argument("--device", default="auto")
    add_threads(p)
    p.add_argument("--quiet", action="store_true")
    from diffusionlab.conditioning.cli import add_arguments as add_conditioning_arguments

    add_conditioning_arguments(p)  # --class, --guidance, --guidance-interval, --known, --mask, --method
    _add_extend_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="score a trained run (JSON on stdout)",
                       description="digits: sample --num digits and score them (FD in a digit classifier's features, "
                                   "class coverage); on a moving_digits run, sample --num videos (default 64) and "
                                   "score them with the video metric (docs/video_metric.md). nll: probability-flow "
                                   "ODE log-likelihood of --num held-out points (SDE runs). elbo: DDPM's full variational bound, all T terms (chain runs). "
                                   "nll and elbo are in nats per point and bits per dimension (see docs/likelihood.md).")
    p.add_argument("--run", default=None, help="run directory")
    _add_diffusers_args(p)
    p.add_argument("--metric", default="digits", choices=("digits", "fid", "nll", "elbo"),
                   help="digits (default), fid (FID, KID, precision/recall; image models), nll (SDE runs) or elbo "
                        "(chain runs)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="fid: local FID Inception weights (pt_inception-2015-12-05-6726825d.pth); never downloaded")
    p.add_argument("--stats-cache", default=None, metavar="DIR",
                   help="fid: reference-statistics cache (default $DIFFUSIONLAB_CACHE/fid or ~/.cache/diffusionlab/fid)")
    p.add_argument("--num", type=int, default=None,
                   help="samples (digits: 1000, moving_digits videos: 64, fid: 1000) or evaluation points (nll, elbo: "
                        "1000)")
    p.add_argument("--seed", type=_seed_arg, default=0)
    p.add_argument("--sampler", default=None, help=f"digits: sampler (default: the run's): {names}")
    p.add_argument("--steps", type=int, default=None, help="digits: sampler steps (default: the sampler's)")
    p.add_argument("--grid", default=None, type=grid_argument, metavar="GRID",
                   help="digits: time grid, as for sample (default: the sampler's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="digits: a sampler option")
    p.add_argument("--batch-size", type=int, default=None, help="nll, elbo: points per batch (default 128)")
    p.add_argument("--divergence", default="exact", choices=("exact", "hutchinson"),
                   help="nll: exact divergence (D backward passes per evaluation) or Hutchinson's estimator")
    p.add_argument("--probes", type=int, default=1, help="nll: Rademacher probes per point for Hutchinson (default 1)")
    p.add_argument("--rtol", type=float, default=1e-5, help="nll: dopri5 relative tolerance (default 1e-5)")
    p.add_argument("--atol", type=float, default=1e-5, help="nll: dopri5 absolute tolerance (default 1e-5)")
    p.add_argument("--variance", default=None, choices=("beta", "fixed_large", "beta_tilde", "learned"),
                   help="elbo: reverse variance (default: learned if the model learns it, else beta; fixed_large: "
                        "beta-tilde_2 at t = 1, as Ho et al.'s code)")
    p.add_argument("--clip-x0", action="store_true",
                   help="elbo: clamp x_theta to [-1, 1] in the reverse means: the bound of the model as sampled with "
                        "clip_x0 (improved-diffusion's calc_bpd_loop default)")
    p.add_argument("--device", default="auto")
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_extend_args(p)
    from diffusionlab.conditioning.cli import add_class_arguments

    add_class_arguments(p)  # digits: a class-conditional run's classes and guidance (default: its sample section's)
    p.set_defaults(func=cmd_evaluate)

    from diffusionlab.interop.diffusers import register as register_export

    register_export(sub)  # export --run DIR --out DIR (a diffusers DDPMPipeline folder)

    p = sub.add_parser("demo", help="train a U-Net on the bundled digits and sample from it (the main job)")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--num", type=int, default=1000, help="number of digits to sample (default 1000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the digits config")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop training cleanly after M minutes with a checkpoint (continue with --resume)")
    add_threads(p, trains=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    register_oracles(sub)  # oracle sample | oracle nll, bench samplers
    register_experiments(sub)  # experiment noise-prior
    from diffusionlab.commands_fewstep import register as register_fewstep

    register_fewstep(sub)  # fit-grid, distill
