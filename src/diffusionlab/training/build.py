"""Build the parts of a run from its (validated) config: data, process, network, model, objective.

Training, sampling and evaluation all go through :func:`build_process` and :func:`build_model`, so a run
directory's ``config.yaml`` rebuilds exactly the model that was trained.
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable device is a clear error."""
    from diffusionlab.checks import brief
    from diffusionlab.training.config import DEVICE_PATTERN

    if not isinstance(name, str) or DEVICE_PATTERN.fullmatch(name) is None:
        raise DiffusionLabError(f"unknown device {brief(name)}; use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffusionLabError(f"train.device is {name!r} but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DiffusionLabError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DiffusionLabError(f"train.device is {name!r} but MPS is not available on this machine")
    return dev


def noise_covariance(pcfg: dict, sample_shape: tuple):
    """The covariance C of a ``process:`` section (:func:`diffusionlab.processes.catalogue.noise_covariance`)."""
    from diffusionlab.processes.catalogue import noise_covariance as covariance

    return covariance(pcfg, sample_shape)


def build_process(pcfg: dict, sample_shape: tuple, cov=None):
    """The process of a ``process:`` section, with its covariance (the process catalogue; ``cov``: a covariance
    built already, e.g. one fitted to the data, instead of the section's ``noise``)."""
    from diffusionlab.processes import build_process as build

    return build(pcfg, sample_shape, cov=cov)


def build_model(cfg: dict, sample_shape: tuple, process, device) -> "torch.nn.Module":
    """Network wrapped in the parametrization (the one model interface)."""
    from diffusionlab.models import build_network
    from diffusionlab.parametrization import DiffusionModel

    p = dict(cfg["parametrization"])
    out_mult = 2 if p.get("learn_variance") else 1
    net = build_network(dict(cfg["model"]), tuple(sample_shape), out_mult=out_mult,
                        self_condition=bool(p.get("self_condition")))
    return DiffusionModel(net, process, **p).to(device)


def build_dataset(cfg: dict):
    from diffusionlab.data import load_dataset

    return load_dataset(dict(cfg["data"]), seed=cfg["train"]["seed"])
