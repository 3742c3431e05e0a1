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
    from diffusionlab.training.config import grid_argument

    p.add_argument("--sampler", default=None, help="deterministic sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's or the sampler's)")
    p.add_argument("--grid", default=None, type=grid_argument, metavar="GRID",
                   help="the starting grid (default: the sampler's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a sampler option")


# -- distill ------------------------------------------------------------------------------------------------
def cmd_distill(args) -> int:
    """Progressive distillation of ``--run`` into a new run ``--out`` that samples in ``--steps`` DDIM steps
    (:mod:`diffusionlab.training.distill`)."""
    from diffusionlab.training.distill import distill_run

    summary = distill_run(args.run, args.out, steps=args.steps, start_steps=args.start_steps, kind=args.grid,
                          iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                          ema_decay=args.ema_decay, seed=args.seed, teacher_solver=args.teacher_solver,
                          teacher_substeps=args.teacher_substeps, prediction=args.prediction, device=args.device,
                          threads=args.threads, log=(lambda m: None) if args.quiet else _stderr)
    print(json.dumps(summary, indent=1))
    return 0


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

    from diffusionlab.parametrization import PREDICTIONS
    from diffusionlab.processes.grid import GRID_KINDS
    from diffusionlab.training.distill import TEACHER_SOLVERS

    p = sub.add_parser("distill", help="distil a run into one that samples in a few DDIM steps",
                       description="Progressive distillation (Salimans & Ho 2022): each round trains a student whose "
                                   "one DDIM step matches two of its teacher's, halving the steps from --start-steps "
                                   "to --steps; the student is a run (sample --run DIR samples in --steps "
                                   "evaluations), each round's student under DIR/rounds/<N>-steps.")
    p.add_argument("--run", required=True, help="the teacher run")
    p.add_argument("--out", required=True, help="the student's run directory (new)")
    p.add_argument("--steps", type=int, default=4, help="the student's DDIM steps (default 4)")
    p.add_argument("--start-steps", type=int, default=None,
                   help="the first teacher grid's steps: --steps times a power of 2 (default 2 x --steps: one round)")
    p.add_argument("--grid", default=None, choices=GRID_KINDS, help="the first teacher grid's kind (default edm)")
    p.add_argument("--iterations", type=int, default=500, help="optimizer steps per round (default 500)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps of each round (default 50)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA of the student's weights (default 0.995)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-solver", default="heun", choices=TEACHER_SOLVERS,
                   help="the first round's teacher solve of each interval (default heun; ddim with 2 sub-steps is "
                        "Salimans & Ho's)")
    p.add_argument("--teacher-substeps", type=int, default=2, help="its sub-steps per student step (default 2)")
    p.add_argument("--prediction", default=None, choices=PREDICTIONS,
                   help="the student's parametrization (default the teacher's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_distill)


__all__ = ["register", "cmd_fit_grid", "cmd_distill"]
