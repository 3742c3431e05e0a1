"""Build the parts of a run from its (validated) config: data, process, network, model, objective.

Training, sampling and evaluation all go through :func:`build_process` and :func:`build_model`, so a run
directory's ``config.yaml`` rebuilds exactly the model that was trained.
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.fit import make_noise_covariance as make_covariance
from diffusionlab.processes import SubVPSDE, VEChain, VESDE, VPChain, VPSDE
from diffusionlab.schedules import cosine_betas, geometric_sigmas, linear_betas


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffusionLabError(f"train.device is {name!r} but CUDA is not available on this machine")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DiffusionLabError(f"train.device is {name!r} but MPS is not available on this machine")
    return dev


def noise_covariance(pcfg: dict, sample_shape: tuple):
    """The process's noise covariance from ``process.noise`` (``iid``, ``mixed:A``, ``progressive:A``,
    ``toeplitz:a,b,...``) over ``process.noise_axis`` of the batch (default: the frame axis of videos
    ``(B, C, F, H, W)``, i.e. 2; the first feature axis otherwise)."""
    spec = pcfg.get("noise", "iid")
    default_axis = 2 if len(sample_shape) == 4 else 1
    axis = int(pcfg.get("noise_axis", default_axis))
    if spec in (None, "iid", "identity"):
        return make_covariance("iid", None, axis)
    if not (1 <= axis <= len(sample_shape)):
        raise DiffusionLabError(f"process.noise_axis = {axis} is not an axis of samples shaped {tuple(sample_shape)}")
    return make_covariance(spec, sample_shape[axis - 1], axis)


def build_process(pcfg: dict, sample_shape: tuple):
    """The forward process named by ``process.name`` (chains ``vp``, ``ve``; SDEs ``vp-sde``, ``subvp-sde``,
    ``ve-sde``) with its schedule and noise covariance."""
    cov = noise_covariance(pcfg, sample_shape)
    name = pcfg["name"]
    if name == "vp":
        schedule = pcfg.get("schedule", "linear")
        if schedule == "linear":
            betas = linear_betas(pcfg.get("T", 1000), pcfg.get("beta_start", 1e-4), pcfg.get("beta_end", 0.02))
        elif schedule == "cosine":
            betas = cosine_betas(pcfg.get("T", 1000), pcfg.get("cosine_s", 0.008))
        else:
            raise DiffusionLabError(f"unknown process.schedule {schedule!r}; allowed: linear, cosine")
        return VPChain(betas, cov=cov)
    if name == "ve":
        return VEChain(geometric_sigmas(pcfg.get("L", 232), pcfg.get("sigma_min", 0.01), pcfg.get("sigma_max", 1.0)), cov=cov)
    if name in ("vp-sde", "subvp-sde"):
        cls = VPSDE if name == "vp-sde" else SubVPSDE
        return cls(pcfg.get("beta_min", 0.1), pcfg.get("beta_max", 20.0), cov=cov)
    if name == "ve-sde":
        return VESDE(pcfg.get("sigma_min", 0.01), pcfg.get("sigma_max", 50.0), cov=cov)
    raise DiffusionLabError(f"unknown process.name {name!r}; allowed: vp, ve, vp-sde, subvp-sde, ve-sde")


def build_model(cfg: dict, sample_shape: tuple, process, device) -> "torch.nn.Module":
    """Network wrapped in the parametrization (the one model interface)."""
    from diffusionlab.models import build_network
    from diffusionlab.parametrization import DiffusionModel

    p = cfg["parametrization"]
    out_mult = 2 if p.get("learn_variance", False) else 1
    net = build_network(dict(cfg["model"]), tuple(sample_shape), out_mult=out_mult)
    model = DiffusionModel(
        net, process, prediction=p.get("prediction", "eps"), learn_variance=p.get("learn_variance", False),
        scale_input=p.get("scale_input", True),
    )
    return model.to(device)


def build_dataset(cfg: dict):
    from diffusionlab.data import load_dataset

    return load_dataset(dict(cfg["data"]), seed=cfg["train"]["seed"])
