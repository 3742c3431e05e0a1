"""Videos longer than the model's window: sliding windows, each conditioned on the frames already made.

A model trained on ``W``-frame videos makes an ``L > W`` frame video window by window. The first window is an
ordinary sample; every later window keeps its first ``k`` frames (``overlap``) equal to the last ``k`` frames
already made and samples the ``W - k`` new ones. Conditioning is the replacement method (Song et al. 2021, "Score-
based generative modeling through SDEs", Sec. 5 and App. I.2, imputation; Ho et al. 2022, "Video diffusion models",
Sec. 3.1, for extending videos): at every step the known frames of the state are replaced by a draw of the forward
marginal ``q(x_t | x_0) = N(s_t x_0, sigma_t^2 C)`` at the step's level: the whole window takes the sampler's
update (DDIM, Song, Meng & Ermon 2021, eq. 12, with ``eta``: 0 deterministic, 1 ancestral), the known frames with
their true ``x_0`` and their own noise ``e_K = (x_t - s_t x_0) / sigma_t`` in place of the network's predictions,
so that they walk a path of the forward process and share each step's injected noise ``L z`` (drawn across the
whole window) with the new frames. ``resample`` > 1 adds
RePaint's resampling (Lugmayr et al. 2022, Algorithm 1): each step is undone by the forward transition
``x_t = a x_{t'} + G L z`` and redone, ``resample`` times in all, so the new frames can agree with the known ones.

**Joint noising.** The noise of a window is ``N(0, C)`` across its frames (``C`` the model's frame covariance). The
known frames keep the noise they had in the previous window, ``e_K`` -- their replacement at level ``t`` is
``s_t x_0 + sigma_t e_K`` -- and the new frames' starting noise is drawn given it,
``e_U ~ N(C_UK C_KK^{-1} e_K, C_UU - C_UK C_KK^{-1} C_KU)`` (:class:`~diffusionlab.noise.conditional.ConditionalNoise`),
so every window's noise has the joint law the model was trained on and the noise of the whole long video is one
Gaussian field correlated across the windows' overlaps (for AR(1) "progressive" noise: the AR(1) chain over all
``L`` frames). ``joint=False`` draws ``e_U ~ N(0, C_UU)`` independently of ``e_K`` instead (the comparison).

This is the minimal conditioning step the extension needs, written so that a shared conditional sampler (the
replacement, RePaint, DPS or SMC samplers with joint noising) can take its place: :func:`conditional_window` is
the one call that samples a window given known frames and their noise.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.conditional import ConditionalNoise
from diffusionlab.parametrization import carries_x0
from diffusionlab.processes.grid import as_grid
from diffusionlab.progress import progress as progress_display
from diffusionlab.samplers.ancestral import ddim_prediction, ddim_update
from diffusionlab.samplers.noise import NoiseSource


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise DiffusionLabError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def frame_covariance(model, window: int) -> torch.Tensor:
    """The model's ``window x window`` frame covariance ``C`` (float64; the identity for i.i.d. noise)."""
    cov = model.process.cov
    if cov.size is not None and cov.size != window:
        raise DiffusionLabError(f"the model's noise covariance is {cov.size}x{cov.size}, not over the window of {window} "
                                f"frames")
    return cov.matrix(window)


@carries_x0  # one window is one trajectory of a self-conditioned model: its estimate starts afresh
def conditional_window(model, known_x0: torch.Tensor, known_noise: torch.Tensor, window: int, grid=None,
                       eta: float = 0.0, joint: bool = True, resample: int = 1, clip_x0: bool = False,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One window of ``window`` frames whose first ``k`` frames are ``known_x0`` ``(N, C, k, H, W)`` (model space;
    ``k = 0`` for an unconditional window) with the starting noise ``known_noise`` of the same shape (module
    docstring). Returns ``(x0 (N, C, window, H, W), noise (N, C, window, H, W))``: the window (known frames exactly
    ``known_x0``) and its starting noise, to hand on to the next window.

    ``grid``: a :class:`~diffusionlab.processes.grid.TimeGrid` of the model's process or a step count; ``eta`` the
    DDIM noise (0 to 1); ``resample`` RePaint's count per step (1: plain replacement); ``clip_x0`` clamps the
    prediction of ``x_0`` to [-1, 1]; ``generator`` supplies every random draw."""
    if not 0.0 <= float(eta) <= 1.0:
        raise DiffusionLabError(f"eta must lie in [0, 1], got {eta!r}")
    _check_int("resample", resample, 1)
    k = known_x0.shape[2]
    _check_int("the known frames", k, 0, window - 1)
    if tuple(known_noise.shape) != tuple(known_x0.shape):
        raise DiffusionLabError(f"known_noise must have the shape of known_x0 {tuple(known_x0.shape)}, got "
                                f"{tuple(known_noise.shape)}")
    grid = as_grid(model.process, grid)
    c = frame_covariance(model, window)
    known = list(range(k))
    if joint:
        eps = ConditionalNoise(c, known).sample(known_noise, generator)
    else:  # the new frames' noise independent of the known frames' (marginally N(0, C_UU))
        fresh = ConditionalNoise(c[k:, k:], []).sample(known_noise[:, :, :0], generator)
        eps = torch.cat([known_noise, fresh], dim=2)
    noise = NoiseSource(model.process.cov, generator)
    x = grid.sigma[0] * eps
    if k:
        x[:, :, :k] += grid.s[0] * known_x0
    n = grid.steps
    for i in range(n):
        c2 = float(eta) ** 2 * grid.posterior(i)[2]
        for r in range(resample):
            x0, e = ddim_prediction(model, x, grid, i, clip_x0)
            if k:  # the known frames: their true x_0 and their own noise, so they follow their forward path
                x0, e = x0.clone(), e.clone()
                x0[:, :, :k] = known_x0
                e[:, :, :k] = (x[:, :, :k] - grid.s[i] * known_x0) / grid.sigma[i]
            x_next = ddim_update(x, x0, e, grid.s[i + 1], grid.sigma[i + 1], c2, noise)
            if r < resample - 1 and i < n - 1:  # RePaint: back to this step's level by the forward transition
                a, g2 = grid.transition(i)
                x = a * x_next + math.sqrt(g2) * noise(x_next)
        x = x_next
    if k:
        x = x.clone()
        x[:, :, :k] = known_x0  # exact already at the data (s = 1, sigma = 0); set it against rounding
    return x, eps


def window_overlap(window: int, overlap: int | None = None) -> int:
    """The known frames per window: ``overlap``, by default half the window."""
    return window // 2 if overlap is None else overlap


def window_starts(frames: int, window: int, overlap: int | None = None) -> list[int]:
    """First frame of every window of an ``frames``-frame video made ``window`` frames at a time with ``overlap``
    known frames (default :func:`window_overlap`; the last window may reach past the end, its extra frames are
    dropped)."""
    overlap = window_overlap(window, overlap)
    _check_int("window", window, 2)
    _check_int("overlap", overlap, 1, window - 1)
    _check_int("frames", frames, window)
    starts, stride = [0], window - overlap
    while starts[-1] + window < frames:
        starts.append(starts[-1] + stride)
    return starts


def extend_videos(model, num: int, frames: int, window: int, overlap: int | None = None, grid=None,
                  eta: float = 0.0, joint: bool = True, resample: int = 1, clip_x0: bool = False,
                  generator: torch.Generator | None = None, shape=None, device=None, dtype=torch.float32,
                  chunk: int = 64, progress: bool = False) -> torch.Tensor:
    """``num`` videos of ``frames`` frames from a model of ``window``-frame videos (model space, on the CPU):
    windows of ``window`` frames, each sharing ``overlap`` (default :func:`window_overlap`, half the window) frames
    with the one before (module docstring; :func:`conditional_window` for the other options). ``shape`` is the model's sample shape
    ``(C, window, H, W)``; ``device`` (default: the model's) and ``dtype`` those of the sampling."""
    _check_int("num", num, 1)
    overlap = window_overlap(window, overlap)
    starts = window_starts(frames, window, overlap)
    if shape is None or len(shape) != 4 or shape[1] != window:
        raise DiffusionLabError(f"shape must be the model's sample shape (C, {window}, H, W), got {shape!r}")
    c, _, h, w = shape
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    grid = as_grid(model.process, grid)
    out = []
    todo = [(a, min(chunk, num - a)) for a in range(0, num, chunk)]
    bar = progress_display(total=len(todo) * len(starts), desc="extend", enabled=progress)
    model.eval()
    with torch.no_grad():
        for _, m in todo:
            empty = torch.zeros(m, c, 0, h, w, device=device, dtype=dtype)
            video, eps = conditional_window(model, empty, empty, window, grid, eta, joint, resample, clip_x0,
                                            generator)
            bar.update(1)
            parts = [video]
            for _ in starts[1:]:
                video, eps = conditional_window(model, video[:, :, -overlap:], eps[:, :, -overlap:], window, grid, eta,
                                                joint, resample, clip_x0, generator)
                parts.append(video[:, :, overlap:])
                bar.update(1)
            out.append(torch.cat(parts, dim=2)[:, :, :frames].cpu())
    bar.close()
    return torch.cat(out)
