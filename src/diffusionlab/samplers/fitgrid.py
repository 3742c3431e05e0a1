"""Time grids fitted to a model and a step budget: the coupled error against a reference solve, minimised.

A deterministic sampler's error on a trained network depends on where its few evaluations fall, and the best
places depend on the network (where its errors are, how curved its trajectories are), not only on the process.
:func:`fit_grid` takes a sampler, a budget of ``steps`` and a starting grid (the sampler's default), draws a batch
of starts ``x`` at the grid's first point, solves the model's own probability-flow ODE from them with a dense
high-order reference (:func:`reference_solve`: UniPC of order 3 on a log-SNR grid of ``ref_steps`` steps between
the same ends; its own error is estimated by a second solve with half the steps), and moves the grid's interior
points to minimise the *coupled error*

    E(grid) = sqrt(mean_i ||sampler(x_i; grid) - reference(x_i)||^2)

(the criterion of the trajectory-matching schedules, e.g. Sabour et al. 2024, "Align your steps", sec. 3, there
bounded through a KL divergence; here measured directly on the model's own trajectories). The search is a
coordinate (pattern) search in the log-level ``u = log(sigma / s)``: each interior point in turn is moved a fraction
``f`` of the way towards either neighbour, the better move kept if it lowers ``E``; ``f`` halves each sweep
(0.5, 0.25, ...). Only improvements are accepted, so the fitted grid never does worse than its start on the batch
it was fitted to; the first and last points (the start level and the data) stay. On a chain the points stay integer
steps (the nearest step to each level, kept strictly decreasing).

The result is saved with a run as ``<run>/grids/<sampler>-<steps>.json`` (:func:`save_fit`): the times, the sampler
and its options, the starting grid, the errors before and after, the reference's error estimate and the batch; and
``sample: {grid: fitted}`` (or ``--grid fitted``) samples with it (:func:`read_times`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import TimeGrid, make_grid
from diffusionlab.samplers.catalogue import get_sampler, parse_sampler, spec_of

_F64 = torch.float64
REFERENCE = "unipc:order=3"
FRACTIONS = (0.5, 0.25, 0.125, 0.0625)


def coupled_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS over samples of the Euclidean distance ``||x_i - ref_i||`` (float64)."""
    d = (x.to(_F64) - ref.to(_F64)).reshape(x.shape[0], -1)
    return float(d.square().sum(1).mean().sqrt())


def reference_grid(process, start: TimeGrid, steps: int) -> TimeGrid:
    """A log-SNR grid of ``steps`` steps between ``start``'s first and last points (exactly those points)."""
    end = start.times[-1]
    kw = {} if process.discrete else {"eps": max(float(end), 1e-12) if end > 0 else None}
    if not process.discrete and end == 0:
        raise DiffusionLabError("a fitted SDE grid must end above t = 0 (the default grids end at the process's eps)")
    ref = make_grid(process, steps, "logsnr", sig_max=start.sig[0], **kw)
    inner = [t for t in ref.times[1:-1] if end < t < start.times[0]]
    return TimeGrid(process, [start.times[0], *inner, end], "reference")


@torch.no_grad()
def reference_solve(model, x: torch.Tensor, start: TimeGrid, steps: int = 200) -> tuple[torch.Tensor, float]:
    """The model's probability-flow ODE from ``x`` (at ``start``'s first point) to its last: UniPC of order 3 on
    :func:`reference_grid` with ``steps`` steps; returns ``(solution, error estimate)``, the estimate being the
    coupled distance to the same solve with ``steps // 2`` steps (an upper bound on its own error for a convergent
    high-order solve)."""
    spec, opts = parse_sampler(REFERENCE)
    ref = spec.run(model, x, reference_grid(model.process, start, steps), **opts)
    half = spec.run(model, x, reference_grid(model.process, start, max(2, steps // 2)), **opts)
    return ref, coupled_error(half, ref)


@dataclass
class FitResult:
    """A fitted grid and how it was found (module docstring)."""

    sampler: str
    options: dict
    grid: TimeGrid
    start: TimeGrid
    error_start: float
    error: float
    reference_error: float
    num: int
    seed: int
    history: list = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"sampler": self.sampler, "options": self.options, "steps": self.grid.steps,
                "times": list(self.grid.times), "sig": self.grid.sig, "start_grid": self.start.kind,
                "start_times": list(self.start.times), "error_start": self.error_start, "error": self.error,
                "reference": {"solver": REFERENCE, "error_estimate": self.reference_error}, "num": self.num,
                "seed": self.seed, "history": self.history, "model_evaluations": self.evaluations,
                "seconds": round(self.seconds, 2)}


def _moved(process, times: list, i: int, level: float):
    """``times`` with interior point ``i`` moved to the time of EDM level ``level`` (the nearest step on a chain),
    or None if that leaves it where it is or breaks strict monotonicity."""
    t = process.time_at_edm_sigma(torch.tensor(level, dtype=_F64))
    t = max(1, min(int(process.T), int(t))) if process.discrete else float(t)
    if t == times[i] or not (times[i + 1] < t < times[i - 1]):
        return None
    return [*times[:i], t, *times[i + 1:]]


def fit_grid(model, sampler, steps: int | None = None, start=None, kind: str | None = None, shape=None,
             num: int = 128, seed: int = 0, sweeps: int = 4, ref_steps: int = 200, device=None,
             dtype=torch.float32, log=None, **options) -> FitResult:
    """Fit the grid of a deterministic ``sampler`` (name, ``"name:opt=v"``, or spec) with ``steps`` steps to
    ``model`` (module docstring). ``start``: the starting :class:`TimeGrid` (default: the sampler's grid of
    ``steps`` steps of ``kind``); ``shape``: one sample's shape (default ``model.sample_shape``, which the oracles
    have); ``num`` starts drawn from the prior scaled to the start level (as sampling does) with a generator seeded
    by ``seed`` on ``device`` (default: the model's); ``sweeps`` halvings of the move fraction from 0.5;
    ``ref_steps`` the reference's steps. ``log`` gets one line per accepted move. Returns a :class:`FitResult`."""
    t0 = time.time()
    spec, inline = (spec_of(sampler), {}) if not isinstance(sampler, str) else parse_sampler(sampler)
    opts = spec.validate({**inline, **options})
    if spec.is_stochastic(opts) or spec.adaptive:
        raise DiffusionLabError(f"a grid can only be fitted for a deterministic fixed-step sampler; {spec.name!r} with "
                                f"{opts or 'its defaults'} is {'adaptive' if spec.adaptive else 'stochastic'}")
    process = model.process
    spec.check_process(process)
    g0 = start if isinstance(start, TimeGrid) else spec.grid(process, steps, kind)
    if g0.steps < 2:
        raise DiffusionLabError(f"a grid of {g0.steps} step has no interior point to fit")
    shape = tuple(shape if shape is not None else getattr(model, "sample_shape", ()))
    if not shape:
        raise DiffusionLabError("fit_grid needs one sample's shape (shape=, or model.sample_shape)")
    if device is None:
        device = next((q.device for q in model.parameters()), torch.device("cpu"))
    gen = torch.Generator(device=device).manual_seed(int(seed))
    x = g0.start_sample((num, *shape), generator=gen, device=device, dtype=dtype)  # as sample_in_chunks draws
    nfe0 = model.nfe
    ref, ref_err = reference_solve(model, x, g0, ref_steps)

    def error(times):
        with torch.no_grad():
            return coupled_error(spec.run(model, x, TimeGrid(process, times, "fitted"), **opts), ref)

    times = list(g0.times)
    best = e0 = error(times)
    history = [{"sweep": 0, "point": None, "error": e0}]
    floor = float(process.edm_sigma(torch.tensor(1))) if process.discrete else None  # a chain's lowest level
    for sweep, f in enumerate(FRACTIONS[:max(0, int(sweeps))], start=1):
        for i in range(1, len(times) - 1):  # the start and the end stay
            sig = TimeGrid(process, times).sig
            lo = sig[i + 1] if sig[i + 1] > 0 else floor
            cands = [c for c in (_moved(process, times, i, math.exp(math.log(sig[i]) + f * (math.log(v) - math.log(sig[i]))))
                                 for v in (sig[i - 1], lo)) if c is not None]
            if not cands:
                continue
            e, c = min(((error(c), c) for c in cands), key=lambda v: v[0])
            if e < best:
                best, times = e, c
                history.append({"sweep": sweep, "point": i, "time": c[i], "error": e})
                if log:
                    log(f"fit-grid: sweep {sweep} (f = {f}), point {i} -> t = {c[i]:g}: coupled error {e:.4g}")
    return FitResult(spec.name, opts, TimeGrid(process, times, "fitted"), g0, e0, best, ref_err, num, int(seed),
                     history, model.nfe - nfe0, time.time() - t0)


# ---- saved with a run -----------------------------------------------------------------------------------------
def fitted_grid_path(run_dir, sampler: str, steps) -> Path:
    """``<run>/grids/<sampler>-<steps>.json`` (``steps`` None: the sampler's default steps)."""
    spec = get_sampler(sampler)
    n = spec.default_steps if steps is None else steps
    return Path(run_dir) / "grids" / f"{spec.name}-{n}.json"


def save_fit(result: FitResult, run_dir) -> Path:
    """Write ``result`` atomically as the run's fitted grid for its sampler and steps; returns the path."""
    from diffusionlab.io import atomic_write_bytes

    path = fitted_grid_path(run_dir, result.sampler, result.grid.steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(result.to_json(), indent=1).encode())
    return path


def read_times(path) -> list:
    """The times of a grid file: a JSON list of times, or a fit-grid file (its ``times``)."""
    path = Path(path)
    if not path.is_file():
        raise DiffusionLabError(f"grid file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffusionLabError(f"grid file {path} is not JSON: {e}") from None
    times = data.get("times") if isinstance(data, dict) else data
    if not isinstance(times, list) or not times or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in times):
        raise DiffusionLabError(f"grid file {path} must hold a list of times (or an object with 'times'), got "
                                f"{str(data)[:80]}")
    return times


__all__ = ["fit_grid", "FitResult", "reference_solve", "reference_grid", "coupled_error", "save_fit", "read_times",
           "fitted_grid_path"]
