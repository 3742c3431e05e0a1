"""Conditional sampling benchmarked against exact conditionals of Gaussian mixtures (``bench samplers --mask``).

A problem (:class:`ConditionalProblem`) is a mixture oracle, a mask of known coordinates (:func:`mask_from_spec`)
and ``rows`` known values drawn from the data (seeded); every known row is repeated ``per_row`` times, and a method
(:data:`~diffusionlab.conditioning.methods.CONDITIONAL_METHODS`, by name with inline options) fills in the unknown
coordinates. Its error is the sliced Wasserstein-2 distance (:func:`~diffusionlab.oracles.bench.sliced_w2`, random
directions in the unknown coordinates) between the ``per_row`` draws of each known row and fresh exact draws of
``p(x_u | x_k = y)`` (:func:`~diffusionlab.oracles.conditional.condition_mixture`), averaged over the fresh sets and
the rows. Its **floor** is the same measure of an exact set of the same size (mean and standard deviation over
repeats): what an exact sampler scores. A budget of ``N`` evaluations per sample becomes steps by each method's
``steps_for_budget`` (``smc``: ``N // particles`` steps; ``repaint``: ``N // resample``).

Masks (``--mask``): ``first:N`` / ``last:N`` (the first / last N frames of an ``(F, d)`` mixture, else coordinates),
``ends:N`` (the first and last N: video interpolation), ``alternate`` (every other coordinate), or a ``.npy`` file of
0/1 of the sample's shape.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.oracles.bench import projected_quantiles, random_directions, sliced_w2_from_quantiles
from diffusionlab.oracles.conditional import condition_mixture

_F64 = torch.float64
TRUTH_SETS = 2
METHODS = ("replace", "repaint", "dps", "smc:particles=4", "smc:particles=16", "smc:particles=64")


def mask_from_spec(spec: str, sample_shape) -> torch.Tensor:
    """A bool mask of ``sample_shape`` (True = known) from a spec (module docstring)."""
    shape = tuple(sample_shape)
    text = str(spec)
    name, _, arg = text.partition(":")
    n_lead = shape[0]
    m = torch.zeros(shape, dtype=torch.bool)
    if name in ("first", "last", "ends"):
        try:
            k = int(arg)
        except ValueError:
            raise DiffusionLabError(f"mask {text!r}: {name}:N needs an integer N") from None
        if not 1 <= k < n_lead or (name == "ends" and 2 * k >= n_lead):
            raise DiffusionLabError(f"mask {text!r}: N must leave some of the {n_lead} "
                                    f"{'frames' if len(shape) > 1 else 'coordinates'} unknown")
        if name in ("first", "ends"):
            m[:k] = True
        if name in ("last", "ends"):
            m[n_lead - k:] = True
        return m
    if name == "alternate" and not arg:
        m.reshape(-1)[::2] = True
        return m
    p = Path(text)
    if p.suffix == ".npy" and p.is_file():
        arr = np.load(p, allow_pickle=False)
        if tuple(arr.shape) != shape or not np.isin(arr, (0, 1)).all():
            raise DiffusionLabError(f"mask file {p} must hold 0/1 of shape {shape}, got {arr.shape}")
        m = torch.as_tensor(arr != 0)
        if not m.any() or m.all():
            raise DiffusionLabError(f"mask file {p} must mark some coordinates known and some unknown")
        return m
    raise DiffusionLabError(f"unknown mask {text!r}; allowed: first:N, last:N, ends:N, alternate, or a .npy file")


class ConditionalProblem:
    """One conditional problem: ``rows`` known values from the data, the exact conditional of each, and the exact
    sets the measure and its floor use (module docstring)."""

    def __init__(self, oracle, mask, rows: int = 4, per_row: int = 500, seed: int = 0, projections: int = 128,
                 repeats: int = 4):
        if isinstance(per_row, bool) or not isinstance(per_row, int) or per_row < 2:
            raise DiffusionLabError(f"samples per known row must be an integer >= 2, got {per_row!r}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise DiffusionLabError(f"known rows must be an integer >= 1, got {rows!r}")
        self.oracle, self.rows, self.per_row, self.seed, self.repeats = oracle, rows, per_row, seed, repeats
        self.mask = torch.as_tensor(mask, dtype=torch.bool).reshape(oracle.sample_shape)
        self.unknown = torch.nonzero(~self.mask.reshape(-1)).reshape(-1)
        g = torch.Generator().manual_seed(seed)
        self.known_rows = oracle.sample_data(rows, g)
        self.exact = condition_mixture(oracle, self.known_rows, self.mask)
        self.directions = random_directions(self.unknown.numel(), projections, torch.Generator().manual_seed(seed + 1))
        self._quant: dict = {}
        self._floor = None

    def known(self, row: int) -> torch.Tensor:
        """The known values of row ``row``, repeated ``per_row`` times (float64)."""
        return self.known_rows[row:row + 1].expand(self.per_row, *self.oracle.sample_shape).clone()

    def _q(self, x: torch.Tensor) -> np.ndarray:
        return projected_quantiles(x.reshape(x.shape[0], -1)[:, self.unknown], self.directions)

    def truth(self, row: int, index: int) -> np.ndarray:
        """Quantiles of exact set ``index`` of row ``row`` (``0 .. TRUTH_SETS - 1`` the comparison sets, later ones
        the floor's stand-ins)."""
        key = (row, index)
        if key not in self._quant:
            g = torch.Generator().manual_seed(50_000 + 1_000 * self.seed + 31 * index + row)
            draws = self.exact.sample(g, reps=self.per_row).reshape(self.rows, self.per_row, -1)[row]
            self._quant[key] = self._q(draws)
        return self._quant[key]

    def sw2_row(self, row: int, x: torch.Tensor) -> float:
        q = self._q(x.to(_F64).cpu())
        return float(np.mean([sliced_w2_from_quantiles(q, self.truth(row, j)) for j in range(TRUTH_SETS)]))

    def floor(self) -> dict:
        """Mean and standard deviation over ``repeats`` of the measure of exact sets."""
        if self._floor is None:
            vals = []
            for r in range(self.repeats):
                per = []
                for row in range(self.rows):
                    q = self.truth(row, TRUTH_SETS + r)
                    per.append(np.mean([sliced_w2_from_quantiles(q, self.truth(row, j)) for j in range(TRUTH_SETS)]))
                vals.append(float(np.mean(per)))
            self._floor = {"floor": float(np.mean(vals)),
                           "floor_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")}
        return self._floor


def run_method(problem: ConditionalProblem, name: str, budget: int, grid: str | None = None,
               dtype=_F64) -> dict:
    """Run method ``name`` (inline options allowed) within ``budget`` evaluations per sample on every known row."""
    from diffusionlab.conditioning.methods import parse_method

    spec, opts = parse_method(name)
    oracle = problem.oracle
    process = oracle.process
    spec.check_process(process)
    steps = spec.steps_for_budget(budget, process, spec.resolve(opts))
    if process.discrete:
        steps = min(steps, process.T)
    g = spec.grid(process, steps, grid)
    gen = torch.Generator().manual_seed(problem.seed + 7)
    sw, t0 = [], time.perf_counter()
    oracle.nfe = 0
    with torch.no_grad():
        for row in range(problem.rows):
            x = spec.run(oracle, problem.known(row).to(dtype), problem.mask, g, noise=gen, **opts)
            sw.append(problem.sw2_row(row, x))
    fl = problem.floor()
    return {"method": name, "budget": budget, "steps": g.steps, "grid": g.kind, "nfe": spec.count(g, opts),
            "network_calls": oracle.nfe, "sw2": float(np.mean(sw)), "sw2_rows": sw, **fl,
            "ratio": float(np.mean(sw)) / fl["floor"], "seconds": round(time.perf_counter() - t0, 2)}


def benchmark(problem: ConditionalProblem, budgets, methods=None, progress=None) -> list[dict]:
    """Every method at every budget (budgets too small for a method are skipped with the reason)."""
    out = []
    for budget in budgets:
        for name in methods or METHODS:
            try:
                rec = run_method(problem, name, budget)
            except DiffusionLabError as e:
                rec = {"method": name, "budget": budget, "skipped": str(e)}
            out.append(rec)
            if progress:
                progress(rec)
    return out


def format_table(records: list[dict], title: str = "") -> str:
    """A markdown table: one row per method, one column per budget, cells ``SW2 (ratio to the floor)``, and the
    floor's row."""
    budgets = sorted({r["budget"] for r in records})
    rows: dict = {}
    floor = None
    for r in records:
        if "skipped" in r:
            continue
        rows.setdefault(r["method"], {})[r["budget"]] = r
        floor = (r["floor"], r["floor_sd"])
    head = "| method | " + " | ".join(f"NFE {b}" for b in budgets) + " |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "| --- |" + " --- |" * len(budgets)]
    for name, cells in rows.items():
        vals = [f"{cells[b]['sw2']:.4f} ({cells[b]['ratio']:.2f}x)" if b in cells else "" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    if floor is not None:
        lines.append(f"| floor (exact vs exact) | " + " | ".join(f"{floor[0]:.4f} +- {floor[1]:.4f}" for _ in budgets)
                     + " |")
    return "\n".join(lines)


def cmd_bench_conditional(args, oracle) -> int:
    """``bench samplers --mask SPEC``: the conditional methods against the exact conditional (printed table,
    ``--json`` records)."""
    import json

    from diffusionlab.conditioning.methods import parse_method
    from diffusionlab.io import atomic_write_bytes
    from diffusionlab.oracles.cli import _budgets

    budgets = _budgets(args.nfe)
    methods = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        parse_method(m)
    mask = mask_from_spec(args.mask, oracle.sample_shape)
    t0 = time.perf_counter()
    problem = ConditionalProblem(oracle, mask, rows=args.known_rows, per_row=args.num, seed=args.seed,
                                 projections=args.projections)
    records = benchmark(problem, budgets, methods)
    print(format_table(records, f"{args.gmm}, {args.process}, noise {args.noise}, mask {args.mask}: SW2 of the unknown "
                                f"part to exact conditional draws ({args.known_rows} known rows x {args.num} samples)"))
    print(f"{len(records)} runs in {time.perf_counter() - t0:.1f} s")
    if args.json is not None:
        payload = {"gmm": args.gmm, "process": args.process, "noise": args.noise, "mask": args.mask,
                   "known_rows": args.known_rows, "per_row": args.num, "seed": args.seed, "budgets": budgets,
                   "records": records}
        atomic_write_bytes(Path(args.json), json.dumps(payload, indent=1).encode())
    return 0


__all__ = ["mask_from_spec", "ConditionalProblem", "run_method", "benchmark", "format_table", "cmd_bench_conditional",
           "METHODS"]
