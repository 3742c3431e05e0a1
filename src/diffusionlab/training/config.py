"""Run configuration: YAML parsed with a safe loader, merged over defaults, validated before anything runs.

A config has six sections. ``data`` and ``model`` are passed to their builders (which validate their own
keys); the others are checked here: unknown keys, wrong types and out-of-range values raise
:class:`~diffusionlab.errors.DiffusionLabError` naming the key, the value and what is allowed.
``--set section.key=value`` overrides any entry (the value is parsed as YAML: ``--set train.steps=100``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import GRID_KINDS


from diffusionlab.configuration import parse_scalar, safe_load, yaml_error  # noqa: E402


DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"name": "digits"},
    "process": {"name": "vp", "T": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "noise": "iid"},
    "model": {"name": "unet"},
    "parametrization": {"prediction": "eps", "learn_variance": False, "scale_input": True},
    "objective": {"name": "simple"},
    "train": {
        "steps": 4000,
        "batch_size": 128,
        "lr": 2e-3,
        "lr_schedule": "constant",
        "weight_decay": 0.0,
        "warmup": 200,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "seed": 0,
        "checkpoint_every": 1000,
        "keep_checkpoints": 2,
        "log_every": 50,
        "sample_every": 0,
        "device": "auto",
        "max_bad_steps": 10,
        "threads": 0,
        "precision": "fp32",
        "channels_last": False,
        "compile": False,
    },
    "sample": {"sampler": "ddim", "num": 64},
}

# process-section keys allowed per process name
PROCESS_KEYS = {
    "vp": {"name", "T", "schedule", "beta_start", "beta_end", "cosine_s", "noise", "noise_axis"},
    "ve": {"name", "L", "sigma_min", "sigma_max", "noise", "noise_axis"},
    "vp-sde": {"name", "beta_min", "beta_max", "noise", "noise_axis"},
    "subvp-sde": {"name", "beta_min", "beta_max", "noise", "noise_axis"},
    "ve-sde": {"name", "sigma_min", "sigma_max", "noise", "noise_axis"},
}
PROCESS_DEFAULTS = {
    "vp": DEFAULTS["process"],
    "ve": {"name": "ve", "L": 232, "sigma_min": 0.01, "sigma_max": 1.0, "noise": "iid"},
    "vp-sde": {"name": "vp-sde", "beta_min": 0.1, "beta_max": 20.0, "noise": "iid"},
    "subvp-sde": {"name": "subvp-sde", "beta_min": 0.1, "beta_max": 20.0, "noise": "iid"},
    "ve-sde": {"name": "ve-sde", "sigma_min": 0.01, "sigma_max": 50.0, "noise": "iid"},
}

# (type, check, description) per train key
_POS_INT = (int, lambda v: v >= 1, "an integer >= 1")
_NONNEG_INT = (int, lambda v: v >= 0, "an integer >= 0")
_NONNEG = ((int, float), lambda v: v >= 0, "a number >= 0")
TRAIN_SCHEMA = {
    "steps": _POS_INT,
    "batch_size": _POS_INT,
    "lr": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lr_schedule": (str, lambda v: v in ("constant", "cosine"), "one of constant, cosine"),
    "weight_decay": _NONNEG,
    "warmup": _NONNEG_INT,
    "grad_clip": _NONNEG,
    "ema_decay": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": _NONNEG_INT,
    "checkpoint_every": _POS_INT,
    "keep_checkpoints": _POS_INT,
    "log_every": _POS_INT,
    "sample_every": _NONNEG_INT,
    "device": (str, lambda v: v == "auto" or v == "cpu" or v.startswith("cuda") or v == "mps", "auto, cpu, cuda[:N] or mps"),
    "max_bad_steps": _POS_INT,
    "threads": _NONNEG_INT,
    "precision": (str, lambda v: v in ("fp32", "bf16"), "fp32 or bf16 (bf16 autocast, for GPUs)"),
    "channels_last": (bool, lambda v: True, "true or false (channels-last memory format, image data only)"),
    "compile": (bool, lambda v: True, "true or false (torch.compile the network)"),
}
SAMPLE_SCHEMA = {
    "sampler": (str, lambda v: True, "a sampler name"),
    "steps": _POS_INT,
    "grid": (str, lambda v: v in GRID_KINDS, f"one of {', '.join(GRID_KINDS)}"),
    "rho": ((int, float), lambda v: 0 < v < float("inf"), "a number > 0 (the karras grid's exponent)"),
    "num": _POS_INT,
}
PARAM_SCHEMA = {
    "prediction": (str, lambda v: v in ("eps", "x0", "v", "score"), "one of eps, x0, v, score"),
    "learn_variance": (bool, lambda v: True, "true or false"),
    "scale_input": (bool, lambda v: True, "true or false"),
}


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


def validate(cfg: dict) -> dict:
    """Check every section; return ``cfg`` unchanged if it is valid."""
    if not isinstance(cfg, dict):
        raise DiffusionLabError(f"a config must be a mapping of sections, got {type(cfg).__name__}")
    for section in cfg:
        if section not in DEFAULTS:
            raise DiffusionLabError(f"unknown config section {section!r}; allowed: {', '.join(DEFAULTS)}")
        if not isinstance(cfg[section], dict):
            raise DiffusionLabError(f"config section {section!r} must be a mapping, got {cfg[section]!r}")
    for section in ("data", "model", "objective"):
        if not isinstance(cfg[section].get("name"), str):
            raise DiffusionLabError(f"{section}.name must be a string, got {cfg[section].get('name')!r}")
    proc = cfg["process"]
    pname = proc.get("name")
    if pname not in PROCESS_KEYS:
        raise DiffusionLabError(f"unknown process.name {pname!r}; allowed: {', '.join(PROCESS_KEYS)}")
    extra = set(proc) - PROCESS_KEYS[pname]
    if extra:
        raise DiffusionLabError(
            f"unknown key process.{sorted(extra)[0]} for process {pname!r}; allowed: {', '.join(sorted(PROCESS_KEYS[pname]))}"
        )
    _check_section("train", cfg["train"], TRAIN_SCHEMA)
    check_sample(cfg["sample"])
    _check_section("parametrization", cfg["parametrization"], PARAM_SCHEMA)
    return cfg


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
        if section not in DEFAULTS:
            raise DiffusionLabError(f"--set {item!r}: unknown section {section!r}; allowed: {', '.join(DEFAULTS)}")
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
    """Defaults <- user config <- ``--set`` overrides, then validated."""
    user = apply_overrides(user, overrides)
    for section in user:
        if section not in DEFAULTS:
            raise DiffusionLabError(f"unknown config section {section!r}; allowed: {', '.join(DEFAULTS)}")
    base = copy.deepcopy(DEFAULTS)
    pname = (user.get("process") or {}).get("name", "vp")
    if pname in PROCESS_DEFAULTS:
        base["process"] = copy.deepcopy(PROCESS_DEFAULTS[pname])
    if "data" in user and isinstance(user["data"], dict) and user["data"].get("name") != base["data"]["name"]:
        base["data"] = {}
    if "model" in user and isinstance(user["model"], dict) and user["model"].get("name") != base["model"]["name"]:
        base["model"] = {}
    if "objective" in user and isinstance(user["objective"], dict):
        base["objective"] = {}
    usample = user.get("sample")
    if isinstance(usample, dict) and "sampler" in usample and usample["sampler"] != base["sample"]["sampler"]:
        base["sample"] = {"num": base["sample"]["num"]}  # another sampler: its own default steps and options
    return validate(merge(base, user))


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read, merge and validate a run config."""
    return resolve(load_yaml(path), overrides)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
