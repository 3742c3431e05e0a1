"""``train.init_from``: start a run from another run's weights -- image-to-video fine-tuning.

``init_from: RUN_DIR`` names a finished (or checkpointed) run. Its EMA weights start the new run:

- an image run (``model.name: unet`` on frames of the same shape as the videos' frames) into a ``video_unet``:
  every image weight is loaded into the spatial layer of the same name and the temporal layers stay at their
  initialisation, the identity (:func:`diffusionlab.models.inflate.inflate`), so the video model starts as the
  image model applied to every frame (Ho et al. 2022, Sec. 3; Blattmann et al. 2023, Sec. 3.1);
- a run of the same network (for instance a video run fine-tuned further): every weight, strictly.

The source must share what the weights mean: the network options (``dropout`` may differ), the process except its
noise covariance (a per-frame marginal of ``mixed`` or ``progressive`` noise is the image model's ``N(0, I)``, which
is why Ge et al. 2023 fine-tune with them), the parametrization, and the frame shape. ``freeze_spatial: true``
trains only the temporal layers. What was loaded (source, its config, a SHA-256 of its weights, tensor counts)
is written with the run (``init.json``, ``init_config.yaml``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError

#: model options that may differ between the source and the new run (they hold no weights)
FREE_MODEL_OPTIONS = ("dropout",)
#: process options that may differ (the covariance of the noise)
FREE_PROCESS_OPTIONS = ("noise", "noise_axis")


def _source(path: str) -> tuple[Path, dict]:
    from diffusionlab.training.config import load_config

    run = Path(path).expanduser()
    if not run.is_dir() or not (run / "config.yaml").is_file():
        raise DiffusionLabError(f"train.init_from {path!r} is not a run directory (no config.yaml there)")
    return run, load_config(run / "config.yaml")


def _weights(run: Path) -> tuple[dict, str]:
    """The source's EMA weights and a description of where they came from."""
    from diffusionlab.io import load_weights
    from diffusionlab.training.checkpoint import load_latest_checkpoint

    path = run / "model.safetensors"
    if path.is_file():
        return load_weights(path, device="cpu"), str(path)
    ck = load_latest_checkpoint(run, device="cpu", warn=lambda m: None)
    if ck is None:
        raise DiffusionLabError(f"train.init_from {str(run)!r} has neither model.safetensors nor an intact checkpoint")
    return ck["ema"], f"{run}/checkpoints (step {ck['step']}, EMA)"


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _differences(a: dict, b: dict, free: tuple[str, ...]) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(free))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_compatible(cfg: dict, src_cfg: dict, sample_shape: tuple, src_shape: tuple, src: str) -> str:
    """Raise unless the source run's weights mean the same in this run; returns ``"inflate"`` (image into video)
    or ``"same"`` (the same network)."""
    model, smodel = dict(cfg["model"]), dict(src_cfg["model"])
    if smodel["name"] == model["name"]:
        mode, frame_shape, src_frame = "same", tuple(sample_shape), tuple(src_shape)
    elif smodel["name"] == "unet" and model["name"] == "video_unet":
        mode = "inflate"
        if len(src_shape) != 3 or len(sample_shape) != 4:
            raise DiffusionLabError(f"train.init_from {src!r}: inflation takes an image run (C, H, W) into a video run "
                                    f"(C, F, H, W); got {tuple(src_shape)} and {tuple(sample_shape)}")
        frame_shape = (sample_shape[0], *sample_shape[2:])
        src_frame = tuple(src_shape)
        for k in [k for k in model if k.startswith("temporal")]:  # the temporal layers' options
            model.pop(k)
    else:
        raise DiffusionLabError(f"train.init_from {src!r} is a {smodel['name']} run; a {model['name']} run starts from "
                                f"a run of the same network or (video_unet) from an image unet run")
    problems = []
    if tuple(frame_shape) != tuple(src_frame):
        problems.append(f"frame shape {tuple(frame_shape)} vs the source's {tuple(src_frame)}")
    problems += [f"model.{d}" for d in _differences(model, smodel, FREE_MODEL_OPTIONS + ("name",))]
    problems += [f"process.{d}" for d in _differences(cfg["process"], src_cfg["process"], FREE_PROCESS_OPTIONS)]
    problems += [f"parametrization.{d}" for d in _differences(cfg["parametrization"], src_cfg["parametrization"], ())]
    if problems:
        raise DiffusionLabError(f"train.init_from {src!r} does not fit this run (this run vs the source): "
                                + "; ".join(problems))
    return mode


def init_model(model: torch.nn.Module, cfg: dict, sample_shape: tuple, log=print) -> dict | None:
    """Load ``train.init_from`` into ``model`` (a :class:`~diffusionlab.parametrization.DiffusionModel`) and apply
    ``train.freeze_spatial``; returns the record written with the run (None without ``init_from``)."""
    from diffusionlab.models.inflate import freeze_spatial, inflate
    from diffusionlab.training.build import build_dataset

    tcfg = cfg["train"]
    if tcfg.get("init_from") is None:
        return None
    run, src_cfg = _source(tcfg["init_from"])
    src_shape = tuple(build_dataset(src_cfg).sample_shape)
    mode = check_compatible(cfg, src_cfg, tuple(sample_shape), src_shape, tcfg["init_from"])
    state, where = _weights(run)
    if mode == "inflate":
        counts = inflate(model, state)
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise DiffusionLabError(f"weights of train.init_from {str(run)!r} do not fit this run's network: "
                                    f"{str(e).splitlines()[0]}") from None
        counts = {"loaded": len(state), "loaded_parameters": int(sum(v.numel() for v in state.values())),
                  "temporal": 0, "temporal_parameters": 0}
    record = {"init_from": str(run.resolve()), "weights": where, "sha256": _digest(state), "mode": mode, **counts}
    if tcfg.get("freeze_spatial"):
        if mode != "inflate":
            raise DiffusionLabError("train.freeze_spatial applies to an image run inflated into a video_unet")
        record["trainable_parameters"] = freeze_spatial(model)
    log(f"diffusionlab: initialised from {run} ({mode}: {counts['loaded']} tensors loaded, {counts['temporal']} "
        f"temporal tensors at the identity{', spatial layers frozen' if tcfg.get('freeze_spatial') else ''})")
    record["source_config"] = src_cfg
    return record
