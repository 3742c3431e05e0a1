"""Video runs trained until the video metric stops improving, and scored with it (the experiments' building blocks).

:func:`train_until_converged` trains a run in segments of ``eval_every`` steps with the library's trainer (each
segment resumes the last checkpoint exactly, so the segments are one uninterrupted run), scores the EMA weights
after every segment with the moving-digits video metric (:func:`diffusionlab.metrics.video_digits.evaluate_videos`)
and stops once the score has not improved by a relative ``min_delta`` for ``patience`` evaluations (or at
``max_steps``). The whole curve, the best step, the train and evaluation costs (wall and CPU seconds) are kept in
``curve.json``, the best EMA weights in ``best.safetensors``; an interrupted run continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.io import atomic_write_bytes

#: the figures of the video metric kept on every curve point
FIGURES = ("fvd", "frame_fd", "digit_all_same", "digit_agreement", "digit_confidence", "background_mean",
           "background_fraction", "speed", "straightness", "acceleration", "jump_fraction", "static_fraction",
           "empty_frames")


def values(metrics: dict) -> dict:
    """``{figure: value}`` of an :func:`~diffusionlab.metrics.video_digits.evaluate_videos` result."""
    return {k: metrics[k]["value"] for k in FIGURES if k in metrics}


def sample_run(run_dir: Path, scfg: dict, num: int, seed: int, weights: str = "model.safetensors",
               device: str = "cpu") -> torch.Tensor:
    """``num`` samples (display space, [0, 1], CPU) of a run's weights file ``weights`` with the ``sample:``
    section ``scfg``. An image run's samples come back as ``num`` images."""
    from diffusionlab.io import load_weights
    from diffusionlab.training.sampling import generate, load_run

    cfg, ds, model = load_run(run_dir, device=device)
    if weights != "model.safetensors":  # onto the device load_run resolved ("auto" is not a torch device)
        model.load_state_dict(load_weights(Path(run_dir) / weights, device=next(model.parameters()).device))
    x = generate(model, scfg, num=num, seed=seed, device=next(model.parameters()).device, shape=ds.sample_shape)
    return ds.to_display(x).clamp(0, 1)


def score(videos: torch.Tensor, speed: float, real: bool = False) -> dict:
    from diffusionlab.metrics.video_digits import evaluate_videos

    return evaluate_videos(videos, speed=speed, real=real)


def frames_as_videos(images: torch.Tensor, frames: int) -> torch.Tensor:
    """``(N * frames, C, H, W)`` independent images as ``(N, C, frames, H, W)`` videos (an image model's "videos":
    the video metric then scores its per-frame quality)."""
    n = images.shape[0] // frames
    return images[: n * frames].reshape(n, frames, *images.shape[1:]).transpose(1, 2)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def improved(value: float, best: float | None, min_delta: float) -> bool:
    """Lower is better: ``value`` improves on ``best`` by more than the relative ``min_delta``."""
    return best is None or value < best * (1.0 - min_delta)


def converged(curve: list[dict], key: str, patience: int, min_delta: float) -> bool:
    """No improvement of ``key`` by a relative ``min_delta`` over the best so far in the last ``patience`` points."""
    best = None
    last_gain = 0
    for i, point in enumerate(curve):
        if improved(point[key], best, min_delta):
            best, last_gain = point[key], i
    return len(curve) - 1 - last_gain >= patience


def train_until_converged(user_cfg: dict, run_dir: str | Path, evaluate, eval_every: int, max_steps: int,
                          min_steps: int = 0, patience: int = 3, min_delta: float = 0.05, key: str = "fvd",
                          log=print) -> dict:
    """Train the run ``user_cfg`` (a config, its ``train.steps`` ignored; a named ``lr_schedule`` decays over
    ``max_steps``, not over each segment: :func:`~diffusionlab.training.schedule.over_horizon`) in segments of
    ``eval_every`` steps up to ``max_steps``, calling ``evaluate(run_dir) -> {figure: value}`` on the EMA weights
    after each, until ``key`` (lower is better) has not improved by ``min_delta`` (relative) for ``patience``
    evaluations and at least ``min_steps`` were trained (module docstring). Returns the record saved as
    ``curve.json``."""
    from diffusionlab.training.config import resolve
    from diffusionlab.training.schedule import over_horizon
    from diffusionlab.training.trainer import train

    for name, v, lo in (("eval_every", eval_every, 1), ("max_steps", max_steps, 1), ("patience", patience, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise DiffusionLabError(f"{name} must be an integer >= {lo}, got {v!r}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    record = _read(run / "curve.json") or {"curve": [], "train_wall_s": 0.0, "train_cpu_s": 0.0, "eval_wall_s": 0.0}
    if record.get("done"):
        return record
    curve = record["curve"]
    step = curve[-1]["step"] if curve else 0
    while step < max_steps:
        if curve and step >= min_steps and converged(curve, key, patience, min_delta):
            break
        step = min(step + eval_every, max_steps)
        user = copy.deepcopy(user_cfg)
        user.setdefault("train", {})["steps"] = step
        user["train"]["checkpoint_every"] = eval_every
        cfg = resolve(user)
        cfg["train"]["lr_schedule"] = over_horizon(cfg["train"], max_steps)  # one decay over max_steps
        w0, c0 = time.time(), time.process_time()
        train(cfg, run, resume=True, progress=False, log=lambda m: None)
        record["train_wall_s"] += time.time() - w0
        record["train_cpu_s"] += time.process_time() - c0
        w0 = time.time()
        figures = evaluate(run)
        record["eval_wall_s"] += time.time() - w0
        if improved(figures[key], min((p[key] for p in curve), default=None), 0.0):
            atomic_write_bytes(run / "best.safetensors", (run / "model.safetensors").read_bytes())
        curve.append({"step": step, "train_wall_s": round(record["train_wall_s"], 1),
                      "train_cpu_s": round(record["train_cpu_s"], 1), **figures})
        _write(run / "curve.json", record)
        log(f"  {run}: step {step} {key} {figures[key]:.2f}")
    best = min(curve, key=lambda p: p[key])
    record.update(done=True, best_step=best["step"], steps=curve[-1]["step"],
                  converged=converged(curve, key, patience, min_delta), key=key, patience=patience,
                  min_delta=min_delta)
    _write(run / "curve.json", record)
    return record
