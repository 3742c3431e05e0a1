"""The few-step subcommands: ``fit-grid`` (a grid fitted to a run's model, saved with the run) and ``distill``
(a run that samples in a handful of evaluations, distilled from another).

Each handler returns an exit status; user errors raise :class:`~diffusionlab.errors.DiffusionLabError` (one line,
exit 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- fit-grid -----------------------------------------------------------------------------------------------
def cmd_fit_grid(args) -> int:
    """Fit the grid of the run's (or ``--sampler``'s) deterministic sampler to the run's model and save it as
    ``<run>/grids/<sampler>-<steps>.json`` (:mod:`diffusionlab.samplers.fitgrid`); ``--make-default`` makes the
    run sample with it (its config's ``sample:`` section: that sampler, steps and ``grid: fitted``)."""
    import torch

    from diffusionlab.samplers.fitgrid import fit_grid, save_fit
    from diffusionlab.training.sampling import load_run, sample_section, sampler_options, section_grid

    cfg, ds, model = load_run(args.run, device=args.device)
    scfg = sample_section(cfg, args.sampler, args.steps, args.grid, args.set, run_dir=args.run)
    start = section_grid(scfg, model.process)
    model.eval()
    device = next(model.parameters()).device
    result = fit_grid(model, scfg["sampler"], start=start, shape=ds.sample_shape, num=args.num, seed=args.seed,
                      sweeps=args.sweeps, ref_steps=args.ref_steps, device=device, dtype=torch.float32,
                      log=None if args.quiet else _stderr, **sampler_options(scfg))
    path = save_fit(result, args.run)
    summary = {"path": str(path), "sampler": result.sampler, "steps": result.grid.steps,
               "start_grid": result.start.kind, "start_times": list(result.start.times), "times": list(result.grid.times),
               "error_start": result.error_start, "error": result.error,
               "reference_error": result.reference_error, "model_evaluations": result.evaluations,
               "seconds": round(result.seconds, 1)}
    if args.make_default:
        _make_default(args.run, cfg, result)
        summary["default"] = True
    print(json.dumps(summary, indent=1))
    return 0


def _make_default(run: str, cfg: dict, result) -> None:
    """Rewrite ``<run>/config.yaml`` so that its ``sample:`` section is the fitted sampler with ``grid: fitted``."""
    from diffusionlab.io import atomic_write_bytes
    from diffusionlab.training.config import check_sample, dump

    section = {"sampler": result.sampler, "num": cfg["sample"].get("num", 64), "steps": result.grid.steps,
               "grid": "fitted", **result.options}
    check_sample(section)
    cfg = dict(cfg, sample=section)
    atomic_write_bytes(Path(run) / "config.yaml", dump(cfg).encode())


def _add_grid_args(p) -> None:
    from diffusionlab.commands import _grid_arg

    p.add_argument("--sampler", default=None, help="deterministic sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's or the sampler's)")
    p.add_argument("--grid", default=None, type=_grid_arg, metavar="GRID",
                   help="the starting grid (default: the sampler's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a sampler option")


def register(sub) -> None:
    p = sub.add_parser("fit-grid", help="fit a sampler's time grid to a run's model (saved with the run)",
                       description="Moves the interior points of a deterministic sampler's grid to minimise the "
                                   "coupled error against a dense reference solve of the model's own probability-flow "
                                   "ODE on a batch of its trajectories; writes <run>/grids/<sampler>-<steps>.json, "
                                   "used by sample/evaluate --grid fitted.")
    p.add_argument("--run", required=True, help="run directory")
    _add_grid_args(p)
    p.add_argument("--num", type=int, default=128, help="trajectories fitted on (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trajectories' starts")
    p.add_argument("--sweeps", type=int, default=4, help="search sweeps, each halving the move (default 4)")
    p.add_argument("--ref-steps", type=int, default=200, help="steps of the reference solve (default 200)")
    p.add_argument("--make-default", action="store_true",
                   help="make the run sample with this sampler, steps and the fitted grid (rewrites its config.yaml)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fit_grid)


__all__ = ["register", "cmd_fit_grid"]
