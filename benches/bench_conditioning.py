"""The conditioning table of docs/conditioning.md: every conditional method against exact conditionals.

For each problem (a Gaussian-mixture oracle, a process, a frame covariance C and a mask of known coordinates) the
conditional methods run at several budgets of network evaluations per sample, and their SW2 distance to exact
conditional draws is reported next to the noise floor of two exact sets of the same size
(:mod:`diffusionlab.oracles.conditional_bench`). ``smc`` runs 100 steps with ``budget / 100`` particles; the other
methods spend the budget on steps (``repaint``: ``budget / 10`` steps, each walked 10 times; at most the chain's
1000 steps). Under a correlated C the ``smc`` and ``replace`` rows are repeated with independently noised known
frames (``coupling=independent``). Results are appended to ``--json`` cell by cell, so an interrupted run continues
where it stopped; ``--markdown`` writes the tables.

    python benches/bench_conditioning.py --json runs/bench/conditioning.json --markdown runs/bench/conditioning.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusionlab.oracles.bench import resolve_spec
from diffusionlab.oracles.conditional_bench import ConditionalProblem, mask_from_spec, run_method
from diffusionlab.oracles.mixture import GaussianMixtureOracle

BUDGETS = (100, 400, 1600, 6400)
SMC_STEPS = 100

#: (name, mixture, frames, noise, mask)
PROBLEMS = [
    ("ring8, x known", "ring8", None, "iid", "first:1"),
    ("ring8, y known", "ring8", None, "iid", "last:1"),
    ("aniso16, first 8 known", "aniso16", None, "iid", "first:8"),
    ("aniso16, every other known", "aniso16", None, "iid", "alternate"),
    ("ring8 as 2 frames, mixed:1, frame 1 known", "ring8", 2, "mixed:1.0", "first:1"),
    ("ring8 as 2 frames, progressive:1, frame 1 known", "ring8", 2, "progressive:1.0", "first:1"),
    ("aniso16 as 8 frames x 2, mixed:1, frames 1-2 known", "aniso16", 8, "mixed:1.0", "first:2"),
    ("aniso16 as 8 frames x 2, progressive:1, frames 1-2 known", "aniso16", 8, "progressive:1.0", "first:2"),
    ("aniso16 as 8 frames x 2, progressive:1, first and last frame known", "aniso16", 8, "progressive:1.0", "ends:1"),
]


def cells(correlated: bool):
    """``(row label, method spec, budget)`` of one problem."""
    out = []
    for b in BUDGETS:
        out.append(("replace", "replace", b))
        out.append(("repaint (j = 10, r = 10)", "repaint", b))
        out.append(("dps (zeta = 0.5)", "dps", b))
        out.append((f"smc ({SMC_STEPS} steps, budget / {SMC_STEPS} particles)", f"smc:particles={b // SMC_STEPS}", b))
        if correlated:
            out.append(("replace, independent noising", "replace:coupling=independent", b))
            out.append((f"smc ({SMC_STEPS} steps), independent noising",
                        f"smc:particles={b // SMC_STEPS},coupling=independent", b))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--rows", type=int, default=4, help="known rows per problem (default 4)")
    p.add_argument("--per-row", type=int, default=500, help="samples per known row (default 500)")
    p.add_argument("--process", default="vp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problems", default=None, help="indices of PROBLEMS to run, comma separated (default all)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(path.read_text()) if path.exists() else {"records": []}
    have = {(r["problem"], r["method"], r["budget"]) for r in done["records"]}
    chosen = range(len(PROBLEMS)) if args.problems is None else [int(i) for i in args.problems.split(",")]
    for i in chosen:
        title, gmm, frames, noise, mask = PROBLEMS[i]
        spec = resolve_spec(gmm)
        if frames:
            spec = {**spec, "frames": frames}
        oracle = GaussianMixtureOracle.from_spec(spec, args.process, noise)
        problem = None
        for label, method, budget in cells(noise != "iid"):
            if (title, method, budget) in have:
                continue
            if problem is None:
                problem = ConditionalProblem(oracle, mask_from_spec(mask, oracle.sample_shape), rows=args.rows,
                                             per_row=args.per_row, seed=args.seed)
            rec = run_method(problem, method, budget)
            rec.update({"problem": title, "row": label, "gmm": gmm, "frames": frames, "noise": noise, "mask": mask,
                        "process": args.process, "rows": args.rows, "per_row": args.per_row})
            done["records"].append(rec)
            path.write_text(json.dumps(done, indent=1))
            print(f"{title} | {label} | NFE {budget}: SW2 {rec['sw2']:.4f} = {rec['ratio']:.2f}x the floor "
                  f"{rec['floor']:.4f} ({rec['seconds']} s)", flush=True)
    if args.markdown:
        Path(args.markdown).write_text(markdown(done["records"]) + "\n")
    return 0


def markdown(records) -> str:
    """One table per problem: rows = methods, columns = budgets, cells ``SW2 (ratio to the floor)``."""
    out = []
    problems = list(dict.fromkeys(r["problem"] for r in records))
    for title in problems:
        recs = [r for r in records if r["problem"] == title]
        budgets = sorted({r["budget"] for r in recs})
        floor = recs[0]["floor"], recs[0]["floor_sd"]
        out += [f"**{title}** (floor: {floor[0]:.4f} +- {floor[1]:.4f})", "",
                "| method | " + " | ".join(f"NFE {b}" for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for label in dict.fromkeys(r["row"] for r in recs):
            cells_ = {r["budget"]: r for r in recs if r["row"] == label}
            out.append(f"| {label} | " + " | ".join(
                f"{cells_[b]['sw2']:.4f} ({cells_[b]['ratio']:.2f}x)" if b in cells_ else "" for b in budgets) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
