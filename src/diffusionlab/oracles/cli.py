"""CLI subcommands on exact Gaussian-mixture oracles: ``oracle sample``, ``oracle nll``, ``bench samplers``.

``register(sub)`` adds them to the main parser's subcommands (``diffusionlab.commands.register`` calls it)::

    diffusionlab oracle sample --gmm SPEC --process vp-sde --sampler dpmpp-2m --nfe 10 --num 1000 --seed 0 --out X.npy
    diffusionlab oracle nll --gmm SPEC --process vp-sde --points X.npy --out NLL.npy
    diffusionlab bench samplers --gmm ring8 --process vp-sde --num 4000 --nfe 5,10,20,50 --json OUT.json

``--gmm`` is a JSON spec file (:mod:`diffusionlab.oracles.mixture`) or a builtin mixture (``ring8``, ``aniso16``);
``--noise`` the covariance C (``iid``, ``mixed:ALPHA``, ``progressive:ALPHA``, ``toeplitz:a,b,c,...``) over the
spec's frames (or its D coordinates without ``frames``). ``oracle`` commands print one JSON object on stdout;
bad input raises :class:`~diffusionlab.errors.DiffusionLabError` (one line, exit 2 through the main CLI).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffusionlab.errors import DiffusionLabError

_F64 = torch.float64


# ---- parser plumbing -----------------------------------------------------------------------------------------
def _group(sub, name: str, help: str):
    """The nested subcommands of top-level command ``name``, creating ``name`` unless another module already did
    (so that ``bench`` can be shared)."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help)
        nested = parser.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", parser_class=type(parser))
        parser._dl_subparsers = nested

        def usage(args, _p=parser):
            _p.print_help()
            return 2

        parser.set_defaults(func=usage)
    nested = getattr(parser, "_dl_subparsers", None)
    if nested is None:
        raise RuntimeError(f"command {name!r} is registered without nested subcommands; cannot add to it")
    return nested


def register(sub) -> None:
    """Add ``oracle sample``, ``oracle nll`` and ``bench samplers`` to the subcommands ``sub``."""
    from diffusionlab.processes import PROCESSES

    PROCESS_NAMES = PROCESSES.names()
    from diffusionlab.processes.grid import GRID_KINDS
    from diffusionlab.samplers import sampler_names

    names = ", ".join(sampler_names())
    oracle = _group(sub, "oracle", "exact Gaussian-mixture oracles: sample with any sampler, exact likelihoods")
    p = oracle.add_parser("sample", help="sample a Gaussian mixture through its exact model (JSON on stdout)",
                          description=f"Samplers: {names} (options inline: NAME:key=value,...).")
    _common(p, PROCESS_NAMES)
    p.add_argument("--sampler", default=None,
                   help=f"one of {names}; options inline, e.g. unipc:order=3 (not with --known: --method samples)")
    p.add_argument("--nfe", type=int, default=None, help="evaluation budget per sample path (not for ode-adaptive)")
    p.add_argument("--num", type=int, default=None, help="number of samples (default 1000, or the rows of --init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start x_T (.npy, shape (N, D) or (N, F, d)) in the process's scale")
    p.add_argument("--grid", default="auto", help=f"auto (the sampler's default) or one of {', '.join(GRID_KINDS)}")
    p.add_argument("--eps", type=float, default=None, help="last time of an SDE grid (default: the process's)")
    p.add_argument("--out", required=True, help="output .npy (float64, (N, D) or (N, F, d))")
    from diffusionlab.conditioning.cli import add_arguments as add_conditioning_arguments

    add_conditioning_arguments(p, oracle=True)  # --class/--guidance (a spec with "classes"), --known/--mask/--method
    p.set_defaults(func=cmd_oracle_sample)

    p = oracle.add_parser("example", help="print a mixture spec (JSON) to start from: diffusionlab oracle example > "
                                          "mixture.json",
                          description="Print a Gaussian-mixture spec: {\"weights\": [K], \"means\": [K][D], "
                                      "\"covs\": [K][D][D], \"frames\": F (optional: samples are (F, D/F) arrays "
                                      "and --noise acts over the F frames)}. Weights are positive (normalised), "
                                      "covariances symmetric positive semi-definite. Builtins: ring8 (8 Gaussians "
                                      "of std 0.1 on a circle of radius 2), aniso16 (6 unequal-weight anisotropic "
                                      "Gaussians in 16-D); --gmm takes a builtin name or a spec file.")
    p.add_argument("--name", default="ring8", help="builtin mixture to print: ring8 (default) or aniso16")
    p.set_defaults(func=cmd_oracle_example)

    p = oracle.add_parser("nll", help="probability-flow ODE log-likelihood with exact divergence (JSON on stdout)")
    _common(p, PROCESS_NAMES)
    p.add_argument("--points", required=True, help="points (.npy, (N, D) or (N, F, d))")
    p.add_argument("--eps", type=float, default=1e-5, help="time the points are at (default 1e-5)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--out", required=True, help="output .npy of the per-point NLL (nats)")
    p.set_defaults(func=cmd_oracle_nll)

    bench = _group(sub, "bench", "benchmarks")
    p = bench.add_parser("samplers", help="every sampler against exact Gaussian-mixture ground truth")
    _common(p, PROCESS_NAMES)
    p.add_argument("--num", type=int, default=4000, help="samples per run (default 4000)")
    p.add_argument("--nfe", default="5,10,20,50", help="budgets, comma separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", default=None, help="comma-separated names (default: all that run on the process)")
    p.add_argument("--grids", default=None, help="grids of the deterministic solvers (default: all that apply)")
    p.add_argument("--projections", type=int, default=256)
    p.add_argument("--floor-seeds", type=int, default=16,
                   help="independent problems in the floor check of the best sampler at each budget (0: none)")
    p.add_argument("--json", default=None, help="write every record to this JSON file")
    p.add_argument("--plot", default=None, help="write the coupled-error plot to this PNG")
    # conditional sampling against exact conditionals (diffusionlab.oracles.conditional_bench)
    p.add_argument("--mask", default=None, metavar="SPEC",
                   help="benchmark the conditional methods instead: first:N, last:N, ends:N, alternate or a .npy mask "
                        "(frames with a spec's frames, else coordinates); --num is then the samples per known row")
    p.add_argument("--methods", default=None, help="with --mask: conditional methods, options inline (default: all)")
    p.add_argument("--known-rows", type=int, default=4, help="with --mask: known rows drawn from the data (default 4)")
    p.set_defaults(func=cmd_bench_samplers)


def _common(p, process_names) -> None:
    p.add_argument("--gmm", required=True, help="mixture spec: JSON file or builtin name (ring8, aniso16)")
    p.add_argument("--process", default="vp-sde", help=f"one of {', '.join(process_names)} (default vp-sde)")
    p.add_argument("--noise", default="iid", help="iid | mixed:ALPHA | progressive:ALPHA | toeplitz:a,b,c,...")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the oracle's tensors are small and threads only contend)")


# ---- helpers ----------------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DiffusionLabError(f"unknown --device {name!r}; e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffusionLabError(f"--device {name} asked for, but CUDA is not available on this machine")
    return dev


def _oracle(args):
    from diffusionlab.oracles.bench import resolve_spec
    from diffusionlab.oracles.mixture import GaussianMixtureOracle

    if args.threads < 0:
        raise DiffusionLabError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    return GaussianMixtureOracle.from_spec(resolve_spec(args.gmm), args.process, args.noise, device=_device(args.device))


def _check_out(path: str, suffix: str = ".npy") -> Path:
    out = Path(path)
    if out.suffix != suffix:
        raise DiffusionLabError(f"--out must end in {suffix}, got {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DiffusionLabError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DiffusionLabError(f"cannot write {out}: directory {parent} is not writable")
    if out.is_dir():
        raise DiffusionLabError(f"cannot write {out}: it is a directory")
    return out


def _save_npy(out: Path, arr: np.ndarray) -> None:
    from diffusionlab.io import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, arr)
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as e:
        raise DiffusionLabError(f"cannot write {out}: {e.strerror or e}") from None


def _load_points(path: str, oracle, what: str) -> torch.Tensor:
    """An ``(N, D)`` or ``(N, *sample_shape)`` array from a .npy file, as float64 ``(N, *sample_shape)``."""
    from diffusionlab.data.arrays import load_npy

    p = Path(path)
    if not p.is_file():
        raise DiffusionLabError(f"{what} file not found: {p}")
    arr = load_npy(str(p), f"{what} {p}")
    if arr.ndim >= 1 and arr.shape[0] > MAX_SAMPLES:
        _check_num(int(arr.shape[0]))
    shape = oracle.sample_shape
    ok = arr.ndim >= 2 and arr.shape[0] >= 1 and (tuple(arr.shape[1:]) == shape or tuple(arr.shape[1:]) == (oracle.dim,))
    if not ok:
        allowed = f"(N, {oracle.dim})" + (f" or (N, {', '.join(map(str, shape))})" if len(shape) > 1 else "")
        raise DiffusionLabError(f"{what} {p} has shape {tuple(arr.shape)}; this mixture needs {allowed}")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise DiffusionLabError(f"{what} {p} must hold finite numbers")
    return torch.as_tensor(arr, dtype=_F64).reshape(arr.shape[0], *shape)


#: the most samples or points an oracle command takes without an override (DIFFUSIONLAB_MAX_SAMPLES)
MAX_SAMPLES = 10_000_000


def _check_num(num, minimum: int = 1) -> int:
    from diffusionlab.checks import at_most

    if isinstance(num, bool) or not isinstance(num, int) or num < minimum:
        raise DiffusionLabError(f"--num must be an integer >= {minimum}, got {num!r}")
    return at_most("--num", num, "samples", MAX_SAMPLES)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**63 - 3:
        raise DiffusionLabError(f"--seed must be an integer in [0, 2^63 - 3], got {seed!r}")
    return seed


def _emit(obj: dict) -> None:
    print(json.dumps(obj))


# ---- oracle sample ------------------------------------------------------------------------------------------------
def _oracle_mask(path, oracle, n: int):
    """A mask file (``.npy``, or ``.npz`` key ``mask``) for ``n`` rows of the oracle's samples: broadcastable to
    ``(n, *sample_shape)``, or flattened over the ``D`` coordinates."""
    import torch

    from diffusionlab.conditioning.generate import _read_array
    from diffusionlab.utils import as_mask

    m = torch.as_tensor(_read_array(path, "mask", "--mask"))
    shape = tuple(oracle.sample_shape)
    if len(shape) > 1 and m.ndim >= 1 and m.shape[-1] == oracle.dim and tuple(m.shape[-len(shape):]) != shape:
        m = m.reshape(*m.shape[:-1], *shape)
    mask = as_mask(m, (n, *shape))
    if not bool(mask.any()):
        raise DiffusionLabError(f"--mask {path} marks nothing as known (1 = known)")
    return mask


def _conditional_oracle_sample(args, cond: dict) -> int:
    """``diffusionlab oracle sample`` with conditioning: ``--class``/``--guidance`` on a mixture spec with
    ``"classes"`` (the class-conditional oracle), ``--known``/``--mask`` (``.npy``, ``(N, D)`` or ``(N, F, d)``; one
    known row per output row) with ``--method`` within ``--nfe`` evaluations per sample (steps by the method's
    budget rule). Writes ``--out`` and prints one JSON object."""
    import torch

    from diffusionlab.conditioning.generate import generate_conditional
    from diffusionlab.oracles.bench import plan, resolve_spec

    out = _check_out(args.out)
    if cond.get("classes") is not None:
        from diffusionlab.oracles.conditional import ClassConditionalMixtureOracle

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        oracle = ClassConditionalMixtureOracle.from_spec(resolve_spec(args.gmm), args.process, args.noise,
                                                         device=_device(args.device))
    else:
        oracle = _oracle(args)
    dev = oracle.means.device
    process = oracle.process
    f64 = torch.float64
    kw = dict(classes=cond.get("classes"), guidance=cond.get("guidance"), interval=cond.get("interval"))
    if cond.get("known") is not None:
        if args.sampler is not None:
            raise DiffusionLabError("--sampler does not apply with --known: --method samples (within --nfe)")
        if args.init is not None:
            raise DiffusionLabError("--init does not apply with --known: the method draws its own start")
        known = _load_points(cond["known"], oracle, "--known")
        mask = _oracle_mask(cond["mask"], oracle, known.shape[0])
        num = known.shape[0] if args.num is None else args.num
        if num != known.shape[0]:
            raise DiffusionLabError(f"--num {num} disagrees with the {known.shape[0]} rows of --known (one per sample)")
        spec, opts = cond["method"], dict(cond["method_options"])
        if args.nfe is None:
            raise DiffusionLabError(f"--method {spec.name} needs --nfe (its evaluation budget per sample)")
        steps = spec.steps_for_budget(args.nfe, process, spec.resolve(opts))
        if process.discrete:
            steps = min(steps, process.T)
        kw.update(known=known.to(f64), mask=mask, method=spec, method_options=opts, grid=steps,
                  kind=None if args.grid == "auto" else args.grid)
        name = spec.name
    else:
        if args.sampler is None:
            raise DiffusionLabError("oracle sample needs --sampler (or --known, --mask and --method)")
        if args.init is not None:
            raise DiffusionLabError("--init does not combine with --class (the start is drawn per class batch)")
        num = 1000 if args.num is None else args.num
        p = plan(args.sampler, process, args.nfe, args.grid, args.eps)
        kw.update(sampler=p.spec, sampler_options=p.options, grid=p.grid)
        name = args.sampler
    if isinstance(num, bool) or num < 1:
        raise DiffusionLabError(f"--num must be an integer >= 1, got {num}")
    t0 = time.time()
    x, info = generate_conditional(oracle, oracle.sample_shape, num, args.seed + 1, dev, **kw)
    if not torch.isfinite(x).all():
        raise DiffusionLabError(f"{name} produced non-finite samples; try a larger --nfe")
    _save_npy(out, x.to(f64).numpy())
    print(json.dumps({"sampler": name, "nfe_budget": args.nfe, **info, "process": args.process, "noise": args.noise,
                      "num": int(x.shape[0]), "shape": list(x.shape), "seed": args.seed, "out": str(out),
                      "seconds": round(time.time() - t0, 3)}))
    return 0


def cmd_oracle_sample(args) -> int:
    """Sample with ``--sampler`` within ``--nfe`` evaluations per path; writes ``--out``, prints JSON."""
    from diffusionlab.conditioning.cli import resolve as resolve_conditioning
    from diffusionlab.oracles.bench import plan
    from diffusionlab.samplers import parse_sampler

    from diffusionlab.oracles.bench import _check_budget

    cond = resolve_conditioning(args)  # --class, --guidance, --known, --mask, --method (diffusionlab.conditioning)
    if cond:
        return _conditional_oracle_sample(args, cond)
    if args.sampler is None:
        raise DiffusionLabError("oracle sample needs --sampler (or --known, --mask and --method)")
    spec, _ = parse_sampler(args.sampler)
    if not spec.adaptive and args.nfe is None:
        raise DiffusionLabError(f"sampler {args.sampler!r} needs --nfe (its evaluation budget per sample path)")
    if args.nfe is not None:
        _check_budget(args.nfe)
    _check_seed(args.seed)
    if args.num is not None:
        _check_num(args.num)
    out = _check_out(args.out)
    oracle = _oracle(args)
    dev = oracle.means.device
    process = oracle.process
    if args.init is not None:
        x = _load_points(args.init, oracle, "--init")
        if args.num is not None and args.num != x.shape[0]:
            raise DiffusionLabError(f"--num {args.num} disagrees with the {x.shape[0]} rows of --init {args.init}")
    else:
        num = 1000 if args.num is None else args.num
        x = process.prior_sample((num, *oracle.sample_shape), generator=torch.Generator().manual_seed(args.seed),
                                 dtype=_F64)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    p = plan(args.sampler, process, args.nfe, args.grid, args.eps, generator=gen)
    oracle.nfe = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        y = p.run(oracle, x.to(dev))
    seconds = time.perf_counter() - t0
    if not torch.isfinite(y).all():
        raise DiffusionLabError(f"sampler {args.sampler} produced non-finite samples (NFE {oracle.nfe}); try more --nfe")
    _save_npy(out, y.detach().cpu().to(_F64).numpy())
    _emit({"nfe": oracle.nfe, "nfe_budget": args.nfe, "budget_applies": not spec.adaptive,
           "steps": p.steps, "sampler": args.sampler, "process": args.process, "noise": args.noise,
           "grid": p.grid_kind, "num": int(y.shape[0]), "shape": list(y.shape), "deterministic": p.deterministic,
           "sigma_start": p.sig_start, "sigma_end": p.sig_end, "seed": args.seed, "init": args.init,
           "out": str(out), "seconds": round(seconds, 3)})
    return 0


# ---- oracle example ---------------------------------------------------------------------------------------------
def cmd_oracle_example(args) -> int:
    """Print the builtin mixture ``--name`` as a JSON spec (a starting point for ``--gmm FILE``)."""
    from diffusionlab.oracles.bench import BUILTIN_SPECS

    if args.name not in BUILTIN_SPECS:
        raise DiffusionLabError(f"unknown builtin mixture {args.name!r}; allowed: {', '.join(BUILTIN_SPECS)}")
    print(json.dumps(BUILTIN_SPECS[args.name](), indent=1))
    return 0


# ---- oracle nll ---------------------------------------------------------------------------------------------------
def cmd_oracle_nll(args) -> int:
    """Probability-flow ODE NLL (exact divergence) of ``--points`` against the exact ``-log p_eps``."""
    from diffusionlab.likelihood.ode import ode_log_likelihood

    out = _check_out(args.out)
    oracle = _oracle(args)
    oracle.process.require_continuous("oracle nll (the probability-flow ODE likelihood)")
    x = _load_points(args.points, oracle, "--points").to(oracle.means.device)
    oracle.nfe = 0
    t0 = time.perf_counter()
    res = ode_log_likelihood(oracle, x, eps=args.eps, rtol=args.rtol, atol=args.atol, divergence="exact")
    nll = -res["log_likelihood"].detach()
    exact = -oracle.marginal_log_prob(x, torch.tensor(float(args.eps), dtype=_F64))
    try:
        data_nll = float(-oracle.log_prob(x).mean())
    except DiffusionLabError:  # singular data covariances: no data density
        data_nll = None
    _save_npy(out, nll.cpu().to(_F64).numpy())
    _emit({"mean_nll": float(nll.mean()), "exact_mean_nll": float(exact.mean()), "data_mean_nll": data_nll,
           "max_abs_error": float((nll - exact).abs().max()), "nfe": int(res["nfe"]), "num": int(x.shape[0]),
           "eps": args.eps, "process": args.process, "noise": args.noise, "out": str(out),
           "seconds": round(time.perf_counter() - t0, 3)})
    return 0


# ---- bench samplers -------------------------------------------------------------------------------------------
def _budgets(text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DiffusionLabError(f"--nfe must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise DiffusionLabError(f"--nfe budgets must be integers >= 1, got {text!r}")
    from diffusionlab.oracles.bench import _check_budget

    return [_check_budget(v) for v in vals]


def cmd_bench_samplers(args) -> int:
    """Run every sampler at every budget, print the error tables and floor checks; ``--json`` writes the records."""
    import platform

    from diffusionlab.oracles import bench as B
    from diffusionlab.processes.grid import GRID_KINDS
    from diffusionlab.samplers import parse_sampler

    budgets = _budgets(args.nfe)
    _check_num(args.num, minimum=2)
    _check_seed(args.seed)
    if isinstance(args.projections, bool) or args.projections < 1:
        raise DiffusionLabError(f"--projections must be an integer >= 1 (directions of the sliced distance), got "
                                f"{args.projections}")
    if args.projections > 100_000:
        raise DiffusionLabError(f"--projections must be at most 100000, got {args.projections}")
    if args.floor_seeds < 0 or args.floor_seeds > 10_000:
        raise DiffusionLabError(f"--floor-seeds must be an integer in [0, 10000], got {args.floor_seeds}")
    if args.json is not None:
        _check_out(args.json, ".json")
    if args.plot is not None:
        _check_out(args.plot, ".png")
    if args.mask is not None:  # conditional methods against exact conditionals
        from diffusionlab.oracles.conditional_bench import cmd_bench_conditional

        if args.samplers is not None or args.grids is not None or args.plot is not None:
            raise DiffusionLabError("--samplers, --grids and --plot apply to the unconditional benchmark, not to --mask")
        return cmd_bench_conditional(args, _oracle(args))
    if args.methods is not None:
        raise DiffusionLabError("--methods needs --mask (the known coordinates)")
    samplers = None if args.samplers is None else [s.strip() for s in args.samplers.split(",")]
    for s in samplers or []:
        parse_sampler(s)  # unknown names and options refused, listing the allowed ones
    grids = None if args.grids is None else [g.strip() for g in args.grids.split(",")]
    for g in grids or []:
        if g not in GRID_KINDS:
            raise DiffusionLabError(f"unknown time grid {g!r}; allowed: {', '.join(GRID_KINDS)}")
    oracle = _oracle(args)
    t0 = time.perf_counter()
    problem = B.Problem(oracle, num=args.num, seed=args.seed, projections=args.projections,
                        device=oracle.means.device)
    records = B.benchmark(problem, oracle.process, budgets, samplers=samplers, grids=grids)
    checks = []
    if args.floor_seeds > 0:
        for b, rec in sorted(B.best_by_budget(records, lambda f: f == "diffusionlab").items()):
            checks.append(B.floor_check(oracle, rec["sampler"], b, rec["grid"], num=args.num,
                                        seeds=range(1, args.floor_seeds + 1), projections=args.projections))
    seconds = time.perf_counter() - t0
    for metric in ("coupled", "sw2", "weight_error"):
        table = B.format_table(records, metric)
        if table:
            print(table + "\n")
    for line in B.summary_lines(records):
        print(line)
    for c in checks:
        print(f"floor check NFE<={c['budget']} {c['sampler']} [{c['grid']}] over {c['seeds']} problems: SW2 "
              f"{c['sw2_mean']:.4f} +- {c['sw2_se']:.4f} vs floor {c['sw2_floor_mean']:.4f} +- {c['sw2_floor_se']:.4f} "
              f"(z = {c['sw2_z']:.2f}); weight error z = {c['weight_z']:.2f}: "
              f"{'within' if c['within'] else 'NOT within'} the noise floor")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} thread(s)"
    print(f"{len(records)} runs in {seconds:.1f} s on {machine}")
    if args.plot is not None:
        B.plot_records(records, args.plot, f"{args.gmm}, {args.process}")
    if args.json is not None:
        payload = {"gmm": args.gmm, "process": args.process, "noise": args.noise, "num": args.num,
                   "budgets": budgets, "records": records, "floor_checks": checks, "seconds": seconds,
                   "machine": machine}
        from diffusionlab.io import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(payload, indent=1).encode())
    return 0


__all__ = ["register", "cmd_oracle_sample", "cmd_oracle_example", "cmd_oracle_nll", "cmd_bench_samplers"]
