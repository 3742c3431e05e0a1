"""Run configuration: YAML read safely, every section resolved by its catalogue before anything runs.

A config has seven sections; each is the arguments of one constructor, and its defaults are that constructor's
(:mod:`diffusionlab.configuration`):

===================  ==================================================================================================
``data``             a dataset of :data:`diffusionlab.data.DATASETS` (default ``digits``)
``process``          a process of :data:`diffusionlab.processes.PROCESSES` plus ``noise`` / ``noise_axis`` (default
                     ``vp``)
``model``            a network of :data:`diffusionlab.models.NETWORKS` (default: ``mlp`` for points, ``unet`` for
                     images, ``video_unet`` for videos)
``parametrization``  :class:`~diffusionlab.parametrization.DiffusionModel`'s ``prediction``, ``learn_variance``,
                     ``scale_input``
``objective``        an objective of :data:`diffusionlab.objectives.OBJECTIVES` (default ``simple``)
``train``            :func:`train_options`, the trainer's
``sample``           a sampler of :data:`diffusionlab.samplers.SAMPLERS` with ``steps``, ``grid``, ``rho``, ``num`` and
                     the sampler's own options (:func:`sample_options`; default ``ddim``)
===================  ==================================================================================================

:func:`resolve` returns the full config (every option, defaults filled in): what ``train`` saves as
``config.yaml``, so a run directory rebuilds exactly what was trained. Unknown keys, wrong types and out-of-range
values raise :class:`~diffusionlab.errors.DiffusionLabError` naming the key, the value and what is allowed.
``--set section.key=value`` overrides any entry (the value is parsed as YAML: ``--set train.steps=100``).
docs/config.md lists every key (generated from the catalogues: ``python -m diffusionlab.docs``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from diffusionlab.configuration import Entry, parse_scalar, safe_load, yaml_error
from diffusionlab.checks import at_most, brief
from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import GRID_KINDS
from diffusionlab.threads import DEFAULT_THREADS, MAX_THREADS

#: device names a config or ``--device`` may give
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")
#: the largest global batch without an override (DIFFUSIONLAB_MAX_BATCH_SIZE)
MAX_BATCH_SIZE = 1 << 20

# (type, check, description) per train key
_POS_INT = (int, lambda v: v >= 1, "an integer >= 1")
_NONNEG_INT = (int, lambda v: v >= 0, "an integer >= 0")
_NONNEG = ((int, float), lambda v: v >= 0 and v != float("inf"), "a finite number >= 0")
TRAIN_SCHEMA = {
    "steps": _POS_INT,
    "batch_size": _POS_INT,
    "lr": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lr_schedule": ((str, list), lambda v: True, "constant, cosine, linear or a list of [step, lr] knots"),
    "weight_decay": _NONNEG,
    "warmup": _NONNEG_INT,
    "grad_clip": _NONNEG,
    "ema_decay": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": (int, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    "checkpoint_every": _POS_INT,
    "keep_checkpoints": _POS_INT,
    "log_every": _POS_INT,
    "sample_every": _NONNEG_INT,
    "device": (str, lambda v: DEVICE_PATTERN.fullmatch(v) is not None, "auto, cpu, cuda, cuda:N or mps"),
    "max_bad_steps": _POS_INT,
    "threads": (int, lambda v: 0 <= v <= MAX_THREADS, f"an integer in [0, {MAX_THREADS}] (0: torch's default)"),
    "precision": (str, lambda v: v in ("fp32", "bf16", "fp16"),
                  "fp32, bf16 or fp16 (autocast, for GPUs; fp16 with a gradient scaler)"),
    "channels_last": (bool, lambda v: True, "true or false (channels-last memory format, images and videos)"),
    "compile": (bool, lambda v: True, "true or false (torch.compile the network)"),
    "accumulate": (int, lambda v: 1 <= v <= 4096, "an integer in [1, 4096]"),
    "tensorboard": (bool, lambda v: True, "true or false (TensorBoard event files in the run's tensorboard/)"),
    "p_uncond": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1) (label dropout, class-conditional nets)"),
    "init_from": ((str, type(None)), lambda v: v is None or bool(v.strip()), "a run directory or null"),
    "freeze_spatial": (bool, lambda v: True, "true or false (train only the temporal layers; needs init_from)"),
}


def train_options(steps: int = 4000, batch_size: int = 128, lr: float = 2e-3,
                  lr_schedule: str | list = "constant", weight_decay: float = 0.0, warmup: int = 200,
                  grad_clip: float = 1.0, ema_decay: float = 0.999,
                  seed: int = 0, checkpoint_every: int = 1000, keep_checkpoints: int = 2, log_every: int = 50,
                  sample_every: int = 0, device: str = "auto", max_bad_steps: int = 10,
                  threads: int = DEFAULT_THREADS, precision: str = "fp32", channels_last: bool = False,
                  compile: bool = False, accumulate: int = 1, tensorboard: bool = False,
                  p_uncond: float = 0.0, init_from: str | None = None, freeze_spatial: bool = False) -> dict:
    """The trainer's options (the ``train:`` section).

    Args:
        steps: optimizer steps in all (a resumed run continues to this count)
        batch_size: the global batch of one optimizer step (split over torchrun processes, then into accumulate
            micro-batches)
        lr: AdamW learning rate (of the named schedules)
        lr_schedule: constant, cosine or linear decay after the warm-up, or a list of [step, lr] / [step, lr,
            shape] knots (shape linear, cosine or constant; diffusionlab.training.schedule)
        weight_decay: AdamW weight decay
        warmup: steps of linear learning-rate warm-up
        grad_clip: clip the gradient norm to this (0: no clipping)
        ema_decay: decay of the exponential moving average of the weights (sampled from)
        seed: seeds the data order, the noise and the initial weights
        checkpoint_every: steps between checkpoints
        keep_checkpoints: how many intact checkpoints to keep
        log_every: steps between rows of log.csv
        sample_every: steps between sample grids written to samples/ (0: none)
        device: auto, cpu, cuda[:N] or mps
        max_bad_steps: stop after this many consecutive non-finite steps
        threads: torch intra-op CPU threads (0: torch's default, one per core; diffusionlab.threads)
        precision: fp32, bf16 (bf16 autocast) or fp16 (fp16 autocast with a dynamic gradient scaler; overflowing
            steps are skipped and reported)
        channels_last: channels-last memory format (images; videos: channels-last-3d batches, frames run
            channels-last)
        compile: torch.compile the network
        accumulate: split each optimizer step's batch into this many micro-batches, run one after another with
            their gradients summed (the same trajectory, less memory; batch_size must divide by it times the
            number of processes)
        tensorboard: write TensorBoard event files to the run's tensorboard/ folder besides log.csv (needs the
            tensorboard package: pip install diffusionlab[tensorboard]; without it a warning, and training goes on)
        p_uncond: label dropout of a class-conditional net (model.num_classes): the probability of training a
            label as "no label", for classifier-free guidance (Ho & Salimans 2022; 0.1 to 0.2 there)
        init_from: a run directory whose EMA weights start this run: an image (unet) run inflated into a
            video_unet (every image weight used, temporal layers the identity), or a run of the same network
        freeze_spatial: train only the temporal layers of an inflated video_unet (needs init_from)
    """
    opts = dict(locals())
    _check_section("train", opts, TRAIN_SCHEMA)
    from diffusionlab.training.schedule import check_lr_schedule

    opts["lr_schedule"] = check_lr_schedule(lr_schedule)
    at_most("train.batch_size", batch_size, "batch_size", MAX_BATCH_SIZE)
    if batch_size % accumulate:
        raise DiffusionLabError(f"train.batch_size = {batch_size} does not divide into train.accumulate = "
                                f"{accumulate} micro-batches; choose a multiple")
    if freeze_spatial and init_from is None:
        raise DiffusionLabError("train.freeze_spatial needs train.init_from (the run whose spatial layers are kept)")
    return opts


#: the ``sample.grid`` values beyond the grid kinds: the run's fitted grid, an explicit-times file
SAMPLE_GRIDS = (*GRID_KINDS, "fitted", "file:PATH")


def is_sample_grid(v) -> bool:
    return v in GRID_KINDS or v == "fitted" or (isinstance(v, str) and v.startswith("file:") and len(v) > 5)


def grid_argument(value: str) -> str:
    """The CLI's ``--grid`` type: a grid kind, ``fitted`` or ``file:PATH`` (argparse names the flag)."""
    if not is_sample_grid(value):
        import argparse

        raise argparse.ArgumentTypeError(f"must be one of {', '.join(SAMPLE_GRIDS)}, got {value!r}")
    return value


def _times_ok(v) -> bool:
    return len(v) >= 1 and all(isinstance(u, (int, float)) and not isinstance(u, bool) for u in v)


SAMPLE_SCHEMA = {
    "sampler": (str, lambda v: True, "a sampler name"),
    "steps": _POS_INT,
    "grid": (str, is_sample_grid, f"one of {', '.join(SAMPLE_GRIDS)}"),
    "rho": ((int, float), lambda v: 0 < v < float("inf"), "a number > 0 (the karras grid's exponent)"),
    "sig_max": ((int, float), lambda v: v > 0, "a number > 0 (the grid's start level sigma / s; .inf: T)"),
    "times": (list, _times_ok, "a list of times (an explicit grid, first to last)"),
    "num": _POS_INT,
    # conditioning (diffusionlab.conditioning.cli; flags of the same names override them)
    "classes": ((int, list), lambda v: True, "a class or a list of classes of a class-conditional model"),
    "guidance": ((int, float), lambda v: v == v and abs(v) != float("inf"), "a finite number (classifier-free guidance)"),
    "guidance_interval": (list, lambda v: len(v) == 2, "[lo, hi], the noise levels sigma/s guided"),
    "known": (str, lambda v: True, "a .npz/.npy file of known values"),
    "mask": (str, lambda v: True, "a .npz/.npy mask file (1 = known)"),
    "method": (str, lambda v: True, "a conditional method (replace, repaint, dps, smc; options inline)"),
}


def sample_options(sampler: str = "ddim", num: int = 64, steps: int | None = None, grid: str | None = None,
                   rho: float | None = None, sig_max: float | None = None, times: list | None = None,
                   classes: list | None = None, guidance: float | None = None,
                   guidance_interval: list | None = None, known: str | None = None, mask: str | None = None,
                   method: str | None = None) -> dict:
    """The ``sample:`` section's own keys (the sampler's options come besides them).

    Args:
        sampler: a sampler of the catalogue (``diffusionlab sample --help`` lists them)
        num: samples written at the end of ``demo`` and by periodic sampling
        steps: sampler steps (default: the sampler's own)
        grid: uniform, trailing, quadratic, logsnr, karras, edm (default: the sampler's own), fitted (the run's grid
            fitted by ``diffusionlab fit-grid`` for this sampler and steps) or file:PATH (a JSON list of times, or a
            fit-grid file)
        rho: the karras grid's exponent (default 7)
        sig_max: the grid's start level sigma / s (default: the sampler's; .inf starts at T)
        times: an explicit grid (chain steps or SDE times, first to last); overrides steps and grid
        classes: class label(s) to sample (class-conditional models; spread over the samples in blocks)
        guidance: classifier-free guidance weight (1 conditional, 0 unconditional)
        guidance_interval: [lo, hi]: guide only at noise levels sigma/s in (lo, hi]
        known: known values (.npz key x, display space) for conditional sampling
        mask: their mask (.npz key mask, 1 = known)
        method: the conditional method with known values (replace, repaint, dps, smc; default smc)
    """
    return {k: v for k, v in dict(locals()).items() if v is not None}


def _check_section(name: str, section: dict, schema: dict) -> None:
    for key, value in section.items():
        if key not in schema:
            raise DiffusionLabError(f"unknown key {name}.{key}; allowed: {', '.join(sorted(schema))}")
        types, ok, what = schema[key]
        is_bool = isinstance(value, bool)
        wants_bool = types is bool
        if (is_bool and not wants_bool) or not isinstance(value, types) or not ok(value):
            raise DiffusionLabError(f"{name}.{key} must be {what}, got {brief(value)}")


def check_sample(section: dict) -> None:
    """The generic keys of ``sample:`` by :data:`SAMPLE_SCHEMA`; every other key must be an option of the sampler
    (:mod:`diffusionlab.samplers` validates it, naming the sampler's options)."""
    from diffusionlab.samplers import get_sampler

    if "spacing" in section:
        raise DiffusionLabError(f"sample.spacing was renamed sample.grid ({', '.join(GRID_KINDS)})")
    if not isinstance(section.get("sampler"), str):
        raise DiffusionLabError(f"sample.sampler must be a sampler name, got {section.get('sampler')!r}")
    spec = get_sampler(section["sampler"])
    _check_section("sample", {k: v for k, v in section.items() if k in SAMPLE_SCHEMA}, SAMPLE_SCHEMA)
    from diffusionlab.conditioning.cli import check_section as check_conditioning

    check_conditioning(section)  # classes, guidance, known, mask, method (diffusionlab.conditioning.cli)
    for key, value in section.items():
        if key in SAMPLE_SCHEMA:
            continue
        if key not in spec.options:
            allowed = ", ".join([*SAMPLE_SCHEMA, *sorted(spec.options)])
            raise DiffusionLabError(f"unknown key sample.{key} for sampler {spec.name!r}; allowed: {allowed}")
        try:
            spec.options[key].check(spec.name, key, value)
        except DiffusionLabError as e:
            raise DiffusionLabError(f"sample.{key}: {e}") from None


# ---- the sections -------------------------------------------------------------------------------------------------
_DEFAULT_NETWORK = {"points": "mlp", "images": "unet", "videos": "video_unet"}


def _data(section: dict | None) -> dict:
    from diffusionlab.data import resolve_data

    return resolve_data({"name": "digits", **(section or {})})  # the dataset's options, then the loading keys


def _process(section: dict | None) -> dict:
    from diffusionlab.processes import resolve_process

    return resolve_process({"name": "vp", **(section or {})})


def _model(section: dict | None, data: dict | None = None) -> dict:
    from diffusionlab.data import DATASETS
    from diffusionlab.models import NETWORKS

    if not section:
        kind = (DATASETS.get(data["name"]).meta.get("kind") if data else None) or "images"
        section = {"name": _DEFAULT_NETWORK[kind]}
    return NETWORKS.resolve(section)


def _parametrization(section: dict | None) -> dict:
    from diffusionlab.parametrization import DiffusionModel

    entry = Entry("parametrization", DiffusionModel, "parametrization", (),
                  {"options_of": DiffusionModel, "inferred": ("net", "process")})
    out = entry.resolve(section or {}, "parametrization")
    from diffusionlab.parametrization import PARAMETRIZATIONS, get_parametrization

    if out["prediction"] not in PARAMETRIZATIONS:
        raise DiffusionLabError(f"parametrization.prediction must be one of {', '.join(PARAMETRIZATIONS)}, got "
                                f"{out['prediction']!r}")
    get_parametrization(out["prediction"], out.get("sigma_data"))  # sigma_data: for edm only, > 0
    return out


def _objective(section: dict | None) -> dict:
    from diffusionlab.objectives import OBJECTIVES

    return OBJECTIVES.resolve({"name": "simple", **(section or {})})


def _train(section: dict | None) -> dict:
    return Entry("train", train_options, "train").build(section or {})


def _sample(section: dict | None) -> dict:
    section = dict(section or {})
    generic = {k: v for k, v in section.items() if k in SAMPLE_SCHEMA}
    out = {**Entry("sample", sample_options, "sample").build(generic), **{k: v for k, v in section.items()
                                                                          if k not in SAMPLE_SCHEMA}}
    check_sample(out)
    return out


SECTIONS = {"data": _data, "process": _process, "model": None, "parametrization": _parametrization,
            "objective": _objective, "train": _train, "sample": _sample}


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` (sections are merged key by key)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` strings; the value is parsed as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise DiffusionLabError(f"--set expects section.key=value, got {item!r}")
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise DiffusionLabError(f"--set {item!r}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        value = parse_scalar(raw)
        node = cfg.setdefault(section, {})
        parts = name.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def load_yaml(path: str | Path) -> dict:
    """Parse a YAML file with the safe loader; errors name the file."""
    from diffusionlab.configuration import MAX_CONFIG_BYTES
    from diffusionlab.io import os_error

    path = Path(path)
    if not path.is_file():
        raise DiffusionLabError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more than a config may hold
    except OSError as e:
        raise os_error(e, f"read config file {path}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise DiffusionLabError(f"config file {path} is larger than the {MAX_CONFIG_BYTES} bytes a config may have; "
                                "refused")
    try:
        data = safe_load(raw.decode("utf-8"), f"config file {path}")
    except yaml.YAMLError as e:
        raise yaml_error(e, str(path)) from None
    except UnicodeDecodeError:
        raise DiffusionLabError(f"config file {path} is not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DiffusionLabError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def resolve(user: dict, overrides: list[str] | None = None) -> dict:
    """The full run config: the user's sections (after ``--set`` overrides) resolved by their catalogues, every
    option present with its constructor's default (module docstring). Raises on anything unknown or invalid."""
    user = apply_overrides(user, overrides)
    if not isinstance(user, dict):
        raise DiffusionLabError(f"a config must be a mapping of sections, got {type(user).__name__}")
    for section, value in user.items():
        if section not in SECTIONS:
            raise DiffusionLabError(f"unknown config section {brief(section)}; allowed: {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise DiffusionLabError(f"config section {section!r} must be a mapping, got {brief(value)}")
    out = {}
    for name, build in SECTIONS.items():
        out[name] = _model(user.get("model"), out["data"]) if name == "model" else build(user.get(name))
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read, merge and validate a run config."""
    return resolve(load_yaml(path), overrides)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def validate(cfg: dict) -> dict:
    """``cfg`` if it is a valid full config (it resolves to itself); DiffusionLabError otherwise."""
    return resolve(cfg)


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``digits``, ``toy2d``, ...)."""
    from importlib import resources

    p = resources.files("diffusionlab") / "configs" / f"{name}.yaml"
    return Path(str(p))


def shipped_configs() -> list[str]:
    """The names of the configs shipped with the package."""
    from importlib import resources

    folder = Path(str(resources.files("diffusionlab") / "configs"))
    return sorted(p.stem for p in folder.glob("*.yaml"))
