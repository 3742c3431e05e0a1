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
from pathlib import Path

import yaml

from diffusionlab.configuration import Entry, parse_scalar, safe_load, yaml_error
from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import GRID_KINDS

# (type, check, description) per train key
_POS_INT = (int, lambda v: v >= 1, "an integer >= 1")
_NONNEG_INT = (int, lambda v: v >= 0, "an integer >= 0")
_NONNEG = ((int, float), lambda v: v >= 0 and v != float("inf"), "a finite number >= 0")
TRAIN_SCHEMA = {
    "steps": _POS_INT,
    "batch_size": _POS_INT,
    "lr": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lr_schedule": (str, lambda v: v in ("constant", "cosine"), "one of constant, cosine"),
    "weight_decay": _NONNEG,
    "warmup": _NONNEG_INT,
    "grad_clip": _NONNEG,
    "ema_decay": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": (int, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    "checkpoint_every": _POS_INT,
    "keep_checkpoints": _POS_INT,
    "log_every": _POS_INT,
    "sample_every": _NONNEG_INT,
    "device": (str, lambda v: v == "auto" or v == "cpu" or v.startswith("cuda") or v == "mps", "auto, cpu, cuda[:N] or mps"),
    "max_bad_steps": _POS_INT,
    "threads": _NONNEG_INT,
    "precision": (str, lambda v: v in ("fp32", "bf16"), "fp32 or bf16 (bf16 autocast, for GPUs)"),
    "channels_last": (bool, lambda v: True, "true or false (channels-last memory format, images and videos)"),
    "compile": (bool, lambda v: True, "true or false (torch.compile the network)"),
    "init_from": ((str, type(None)), lambda v: v is None or bool(v.strip()), "a run directory or null"),
    "freeze_spatial": (bool, lambda v: True, "true or false (train only the temporal layers; needs init_from)"),
}


def train_options(steps: int = 4000, batch_size: int = 128, lr: float = 2e-3, lr_schedule: str = "constant",
                  weight_decay: float = 0.0, warmup: int = 200, grad_clip: float = 1.0, ema_decay: float = 0.999,
                  seed: int = 0, checkpoint_every: int = 1000, keep_checkpoints: int = 2, log_every: int = 50,
                  sample_every: int = 0, device: str = "auto", max_bad_steps: int = 10, threads: int = 0,
                  precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                  init_from: str | None = None, freeze_spatial: bool = False) -> dict:
    """The trainer's options (the ``train:`` section).

    Args:
        steps: optimizer steps in all (a resumed run continues to this count)
        batch_size: the global batch (split over torchrun processes)
        lr: AdamW learning rate
        lr_schedule: constant or cosine decay after the warm-up
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
        threads: torch intra-op threads (0: torch's default)
        precision: fp32 or bf16 (bf16 autocast)
        channels_last: channels-last memory format (images; videos: channels-last-3d batches, frames run
            channels-last)
        compile: torch.compile the network
        init_from: a run directory whose EMA weights start this run: an image (unet) run inflated into a
            video_unet (every image weight used, temporal layers the identity), or a run of the same network
        freeze_spatial: train only the temporal layers of an inflated video_unet (needs init_from)
    """
    opts = dict(locals())
    _check_section("train", opts, TRAIN_SCHEMA)
    if freeze_spatial and init_from is None:
        raise DiffusionLabError("train.freeze_spatial needs train.init_from (the run whose spatial layers are kept)")
    return opts


SAMPLE_SCHEMA = {
    "sampler": (str, lambda v: True, "a sampler name"),
    "steps": _POS_INT,
    "grid": (str, lambda v: v in GRID_KINDS, f"one of {', '.join(GRID_KINDS)}"),
    "rho": ((int, float), lambda v: 0 < v < float("inf"), "a number > 0 (the karras grid's exponent)"),
    "num": _POS_INT,
}


def sample_options(sampler: str = "ddim", num: int = 64, steps: int | None = None, grid: str | None = None,
                   rho: float | None = None) -> dict:
    """The ``sample:`` section's own keys (the sampler's options come besides them).

    Args:
        sampler: a sampler of the catalogue (``diffusionlab sample --help`` lists them)
        num: samples written at the end of ``demo`` and by periodic sampling
        steps: sampler steps (default: the sampler's own)
        grid: uniform, trailing, quadratic, logsnr or karras (default: the sampler's own)
        rho: the karras grid's exponent (default 7)
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
            raise DiffusionLabError(f"{name}.{key} must be {what}, got {value!r}")


def check_sample(section: dict) -> None:
    """The generic keys of ``sample:`` by :data:`SAMPLE_SCHEMA`; every other key must be an option of the sampler
    (:mod:`diffusionlab.samplers` validates it, naming the sampler's options)."""
    from diffusionlab.samplers import get_sampler

    if "spacing" in section:
        raise DiffusionLabError("sample.spacing was renamed sample.grid (uniform, trailing, quadratic, logsnr, karras)")
    if not isinstance(section.get("sampler"), str):
        raise DiffusionLabError(f"sample.sampler must be a sampler name, got {section.get('sampler')!r}")
    spec = get_sampler(section["sampler"])
    _check_section("sample", {k: v for k, v in section.items() if k in SAMPLE_SCHEMA}, SAMPLE_SCHEMA)
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
    from diffusionlab.data import DATASETS

    return DATASETS.resolve({"name": "digits", **(section or {})})


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
    from diffusionlab.parametrization import PARAMETRIZATIONS

    if out["prediction"] not in PARAMETRIZATIONS:
        raise DiffusionLabError(f"parametrization.prediction must be one of {', '.join(PARAMETRIZATIONS)}, got "
                                f"{out['prediction']!r}")
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
    path = Path(path)
    if not path.is_file():
        raise DiffusionLabError(f"config file not found: {path}")
    try:
        data = safe_load(path.read_text())
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
            raise DiffusionLabError(f"unknown config section {section!r}; allowed: {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise DiffusionLabError(f"config section {section!r} must be a mapping, got {value!r}")
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
