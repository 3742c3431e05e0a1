"""Sampling from a trained run: rebuild the model from ``config.yaml``, load weights, draw in chunks."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.build import build_dataset, build_model, build_process, resolve_device
from diffusionlab.io import load_weights
from diffusionlab.training.config import load_config

# options of the run's `sample` section that a sampler may accept
_SAMPLER_OPTIONS = ("eta", "clip_x0", "variance", "spacing")


def generate(model, scfg: dict, num: int, seed: int, device, shape, chunk: int = 1000, progress: bool = False,
             noise=None) -> torch.Tensor:
    """Draw ``num`` samples (model space, on the CPU) with the sampler and step count of ``scfg``, in chunks.

    Deterministic given ``seed``: one generator on ``device`` supplies the prior noise and every injected noise.
    """
    from diffusionlab.samplers import get_sampler, sample_in_chunks

    fn = get_sampler(scfg["sampler"])
    accepted = inspect.signature(fn).parameters
    options = {k: scfg[k] for k in _SAMPLER_OPTIONS if k in scfg and k in accepted}
    if noise is not None:
        options["noise"] = noise
    gen = torch.Generator(device=device).manual_seed(int(seed))
    model.eval()
    with torch.no_grad():
        return sample_in_chunks(fn, model, shape, int(num), chunk=chunk, generator=gen, device=device,
                                store_device="cpu", timesteps=int(scfg["steps"]), progress=progress, **options)


def load_run(run_dir: str | Path, device: str = "auto", weights: str = "ema"):
    """``(cfg, dataset, model)`` of a finished (or checkpointed) run, weights loaded (EMA by default)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DiffusionLabError(f"run directory not found: {run}")
    if not (run / "config.yaml").is_file():
        raise DiffusionLabError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
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
        raise DiffusionLabError(f"weights in {path} do not fit the model of {run}/config.yaml: {str(e).splitlines()[0]}") from None
    return cfg, ds, model
