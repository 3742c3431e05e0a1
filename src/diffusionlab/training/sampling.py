"""Sampling from a trained run: rebuild the model from ``config.yaml``, load weights, draw in chunks."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusionlab.conditioning.cli import CONDITIONING_KEYS
from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.build import build_dataset, build_model, build_process, resolve_device
from diffusionlab.io import load_weights
from diffusionlab.training.config import load_config

#: keys of a ``sample:`` section that are not the sampler's own options (the last six: conditioning)
SAMPLE_KEYS = ("sampler", "steps", "grid", "rho", "sig_max", "times", "num", *CONDITIONING_KEYS)


def sampler_options(scfg: dict) -> dict:
    """The sampler's own options in a ``sample:`` section (every key but :data:`SAMPLE_KEYS`)."""
    return {k: v for k, v in scfg.items() if k not in SAMPLE_KEYS}


def section_grid(scfg: dict, process):
    """The :class:`~diffusionlab.processes.grid.TimeGrid` of a ``sample:`` section: its explicit ``times``, or
    ``steps`` of ``grid`` (the sampler's defaults where absent) with ``rho`` and ``sig_max``. A ``fitted`` or
    ``file:`` grid must have been resolved into ``times`` (:func:`sample_section`)."""
    from diffusionlab.samplers import get_sampler

    spec = get_sampler(scfg["sampler"])
    if scfg.get("times") is not None:
        return spec.grid(process, list(scfg["times"]))
    kind = scfg.get("grid")
    if kind == "fitted" or (isinstance(kind, str) and kind.startswith("file:")):
        raise DiffusionLabError(f"sample.grid {kind!r} is read when sampling a run (sample, evaluate); it has not "
                                "been resolved here")
    opts = {k: scfg[k] for k in ("rho", "sig_max") if scfg.get(k) is not None}
    if opts.get("sig_max") == float("inf"):
        opts["sig_max"] = None  # start at T
    return spec.grid(process, scfg.get("steps"), kind, **opts)


def check_sample_section(scfg: dict, process) -> None:
    """Validate a ``sample:`` section against the sampler catalogue and the process: the sampler exists and runs on
    the process, its options are its own, and its grid can be built (so ``train`` refuses a bad section before
    training; a ``fitted`` grid is fitted after training, and checked when it is read)."""
    from diffusionlab.samplers import get_sampler

    spec = get_sampler(scfg["sampler"])
    spec.check_process(process)
    spec.validate(sampler_options(scfg))
    kind = scfg.get("grid")
    if isinstance(kind, str) and kind.startswith("file:"):
        section_grid(resolve_grid_file(scfg, None), process)
    elif kind != "fitted":
        section_grid(scfg, process)


def resolve_grid_file(scfg: dict, run_dir) -> dict:
    """``scfg`` with a ``fitted`` or ``file:PATH`` grid replaced by explicit ``times``: ``fitted`` reads the run's
    ``grids/<sampler>-<steps>.json`` (:mod:`diffusionlab.samplers.fitgrid`), ``file:PATH`` a JSON list of times or
    such a file (relative paths from the run directory first, then the working directory)."""
    from diffusionlab.samplers.fitgrid import fitted_grid_path, read_times

    kind = scfg.get("grid")
    if kind != "fitted" and not (isinstance(kind, str) and kind.startswith("file:")):
        return scfg
    out = {k: v for k, v in scfg.items() if k not in ("grid", "rho", "sig_max")}
    if kind == "fitted":
        if run_dir is None:
            raise DiffusionLabError("sample.grid 'fitted' needs the run directory its grid was saved in")
        path = fitted_grid_path(run_dir, scfg["sampler"], scfg.get("steps"))
        if not path.is_file():
            raise DiffusionLabError(f"no fitted grid for sampler {scfg['sampler']!r} with {scfg.get('steps')} steps in "
                                    f"{run_dir}: run `diffusionlab fit-grid --run {run_dir} --sampler "
                                    f"{scfg['sampler']} --steps {scfg.get('steps')}` first")
    else:
        path = Path(kind[5:])
        if not path.is_absolute() and run_dir is not None and (Path(run_dir) / path).is_file():
            path = Path(run_dir) / path
    out["times"] = read_times(path)
    if out.get("steps") is not None and len(out["times"]) - 1 not in (out["steps"], out["steps"] - 1):
        out.pop("steps")
    return out


def sample_section(cfg: dict, sampler: str | None = None, steps: int | None = None, grid: str | None = None,
                   overrides: list[str] | None = None, eta: float | None = None, run_dir=None) -> dict:
    """The ``sample:`` section a command uses: the run's own (its sampler, steps, grid and options) unless
    ``sampler`` names another one, which then gets its own default steps, grid and options; ``steps``, ``grid``,
    ``--set KEY=VALUE`` options (``eta`` as a shortcut) override, each validated against the sampler. A ``fitted``
    or ``file:`` grid becomes explicit ``times`` (``run_dir``: where a fitted grid is read from); given ``steps`` or
    ``grid`` replace the run's explicit ``times``."""
    from diffusionlab.conditioning.cli import set_options
    from diffusionlab.samplers import canonical, get_sampler
    from diffusionlab.training.config import check_sample

    run = dict(cfg["sample"])
    if sampler is not None and canonical(sampler) != canonical(run["sampler"]):
        get_sampler(sampler)  # a clear error for an unknown name before anything else
        scfg = {"sampler": sampler}
    else:
        scfg = run
    if steps is not None or grid is not None:
        scfg.pop("times", None)
    for key, value in (("steps", steps), ("grid", grid), ("eta", eta)):
        if value is not None:
            scfg[key] = value
    scfg.update(set_options(overrides, "a sampler option, e.g. eta=0.5"))
    scfg.pop("num", None)
    check_sample(dict(scfg))
    return resolve_grid_file(scfg, run_dir)


def generate_chunks(model, scfg: dict, num: int, seed: int, device, shape, chunk: int = 1000, noise=None,
                    progress: bool = False):
    """:func:`generate`'s samples one chunk of at most ``chunk`` at a time (model space, on the CPU): memory stays
    bounded by one chunk whatever ``num`` is, and the chunks are exactly those :func:`generate` concatenates
    (one generator, drawn in the same order). ``progress`` shows the samples done over several chunks (the steps
    of the one chunk otherwise)."""
    from diffusionlab.progress import progress as progress_display
    from diffusionlab.samplers import get_sampler, sample_in_chunks

    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DiffusionLabError(f"number of samples must be an integer >= 1, got {num!r}")
    spec = get_sampler(scfg["sampler"])
    grid = section_grid(scfg, model.process)
    gen = torch.Generator(device=device).manual_seed(check_seed(seed))
    model.eval()
    several = num > chunk
    bar = progress_display(total=num, desc="sample", enabled=progress and several)
    try:
        for start in range(0, num, chunk):
            n = min(chunk, num - start)
            with torch.no_grad():
                x = sample_in_chunks(spec, model, shape, n, chunk=n, generator=gen, device=device,
                                     store_device="cpu", grid=grid, noise=noise, progress=progress and not several,
                                     **sampler_options(scfg))
            bar.update(n)
            yield x
    finally:
        bar.close()


def generate(model, scfg: dict, num: int, seed: int, device, shape, chunk: int = 1000, progress: bool = False,
             noise=None) -> torch.Tensor:
    """Draw ``num`` samples (model space, on the CPU) with the sampler, grid and options of the ``sample:`` section
    ``scfg`` (:data:`SAMPLE_KEYS` plus the sampler's own options), in chunks.

    Deterministic given ``seed``: one generator on ``device`` supplies the prior noise and every injected noise.
    """
    return torch.cat(list(generate_chunks(model, scfg, num, seed, device, shape, chunk, noise, progress)), 0)


#: seeds a command accepts (a generator takes 64 bits; the trainer adds 1 for its noise generator)
MAX_SEED = 2**63 - 2


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DiffusionLabError(f"seed must be an integer in [0, 2^63 - 2], got {seed!r}")
    return seed


def check_finite_samples(x: torch.Tensor, done: int, source) -> None:
    """Refuse samples with NaN or infinite values (``done`` samples drawn so far, from ``source``)."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DiffusionLabError(f"sampling produced {bad} non-finite values within the first {done} samples of {source} "
                                "(the weights hold NaN, or the sampler diverged: try more --steps or another "
                                "--sampler); nothing was written")


def load_run(run_dir: str | Path, device: str = "auto", weights: str = "ema"):
    """``(cfg, dataset, model)`` of a finished (or checkpointed) run, weights loaded (EMA by default)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DiffusionLabError(f"run directory not found: {run}")
    if not (run / "config.yaml").is_file():
        raise DiffusionLabError(f"{run} is not a run directory (no config.yaml)")
    from diffusionlab.training.rundir import localize

    cfg = localize(load_config(run / "config.yaml"), run)
    dev = resolve_device(device)
    ds = build_dataset(cfg)
    process = build_process(cfg["process"], ds.sample_shape)
    model = build_model(cfg, ds.sample_shape, process, dev)
    name = "model.safetensors" if weights == "ema" else "model_raw.safetensors"
    path = run / name
    if not path.is_file():
        from diffusionlab.training.checkpoint import load_latest_checkpoint

        ck = load_latest_checkpoint(run, device=dev)
        if ck is None:
            raise DiffusionLabError(f"{run} has neither {name} nor an intact checkpoint")
        sd = ck["ema"] if weights == "ema" else ck["model"]
    else:
        sd = load_weights(path, device=dev)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:400]
        raise DiffusionLabError(f"weights in {path} do not fit the model of {run}/config.yaml: {detail}") from None
    bad = [k for k, v in sd.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]
    if bad:
        raise DiffusionLabError(f"the weights of {run} hold NaN or infinite values ({bad[0]}); they cannot be sampled")
    return cfg, ds, model


def extend_options(scfg: dict) -> tuple[float, bool]:
    """``(eta, clip_x0)`` of the window updates (DDIM steps) of a ``sample:`` section, its options resolved by the
    sampler (its defaults where the section is silent): ``ddim``'s own ``eta``; ``ddpm`` with ``variance:
    beta_tilde`` is DDIM at ``eta = 1`` (Song, Meng & Ermon 2021, eq. 16). Any other sampler, or ``ddpm`` with
    another variance, is refused: the extension has no such step."""
    from diffusionlab.samplers import canonical, get_sampler

    spec = get_sampler(scfg["sampler"])
    opts = spec.resolve(sampler_options(scfg))
    name = canonical(scfg["sampler"])
    if name == "ddim":
        return float(opts["eta"]), bool(opts["clip_x0"])
    if name == "ddpm" and opts["variance"] == "beta_tilde":
        return 1.0, bool(opts["clip_x0"])
    detail = f"ddpm with variance {opts['variance']!r}" if name == "ddpm" else repr(scfg["sampler"])
    raise DiffusionLabError(f"longer videos are sampled with DDIM steps (ddim, or ddpm with variance beta_tilde as "
                            f"eta = 1); the sampler is {detail}: pass --sampler ddim (--set eta=1 for ancestral)")


def extend_with_section(model, scfg: dict, num: int, frames: int, shape, overlap: int | None = None,
                        joint: bool = True, resample: int = 1, seed: int = 0, device=None,
                        progress: bool = False, classes=None, guidance=None, interval=None,
                        chunk: int = 64) -> torch.Tensor:
    """:func:`~diffusionlab.samplers.extend.extend_videos` with the grid (:func:`section_grid`), ``eta`` and
    ``clip_x0`` (:func:`extend_options`) of a ``sample:`` section, one generator seeded by ``seed``; ``classes``
    (spread over the videos in blocks), ``guidance`` and ``interval`` condition every window of a class-conditional
    model on its video's class (:func:`~diffusionlab.conditioning.guidance.condition_on_class`)."""
    from diffusionlab.samplers.extend import extend_videos

    eta, clip = extend_options(scfg)
    grid = section_grid(scfg, model.process)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    if classes is None:
        return extend_videos(model, num, frames, int(shape[1]), overlap, grid, eta, joint, resample, clip, gen,
                             shape=tuple(shape), device=dev, progress=progress, chunk=chunk)
    from diffusionlab.conditioning.generate import labels_for
    from diffusionlab.conditioning.guidance import condition_on_class

    labels, out = labels_for(classes, num, model.num_classes), []
    for a in range(0, num, chunk):  # one wrapper per chunk of videos, the one generator throughout
        n = min(chunk, num - a)
        m = condition_on_class(model, labels[a:a + n], guidance, interval)
        out.append(extend_videos(m, n, frames, int(shape[1]), overlap, grid, eta, joint, resample, clip, gen,
                                 shape=tuple(shape), device=dev, progress=progress, chunk=n))
    return torch.cat(out)
