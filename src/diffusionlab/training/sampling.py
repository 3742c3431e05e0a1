"""Sampling from a trained run: rebuild the model from ``config.yaml``, load weights, draw in chunks."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.build import build_dataset, build_model, build_process, resolve_device
from diffusionlab.training.checkpoint import load_weights
from diffusionlab.training.config import load_config

# options of the run's `sample` section that a sampler may accept
_SAMPLER_OPTIONS = ("eta", "clip_x0", "variance")


def _time_grid(name: str, process, steps: int):
    """The time grid a discrete sampler walks: all steps for ancestral DDPM, VE and Langevin (unless fewer are
    asked for), a DDIM sub-sequence otherwise."""
    from diffusionlab.samplers import make_timesteps

    steps = min(int(steps), process.T)
    return make_timesteps(process.T, steps)


def generate(model, scfg: dict, num: int, seed: int, device, shape, chunk: int = 1000, progress: bool = False,
             noise=None) -> torch.Tensor:
    """Draw ``num`` samples (model space) with the sampler named in ``scfg`` in chunks of ``chunk``.

    Deterministic given ``seed``: one generator on ``device`` supplies the prior noise and every injected noise.
    """
    from diffusionlab.samplers import NoiseSource, get_sampler

    fn = get_sampler(scfg["sampler"])
    accepted = inspect.signature(fn).parameters
    options = {k: scfg[k] for k in _SAMPLER_OPTIONS if k in scfg and k in accepted}
    process = model.process
    ts = _time_grid(scfg["sampler"], process, scfg["steps"])
    gen = torch.Generator(device=device).manual_seed(int(seed))
    src = noise if noise is not None else NoiseSource(process.cov, generator=gen)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, num, chunk):
            b = min(chunk, num - start)
            x = process.prior_sample((b, *shape), generator=gen, device=device, dtype=torch.float32)
            out.append(fn(model, x, ts, noise=src, progress=progress, **options).cpu())
    return torch.cat(out)


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
