"""Sampler benchmark against diffusers and k-diffusion on exact Gaussian-mixture oracles.

    python benches/bench_samplers.py                       # ring8 and aniso16, NFE 5,10,20,50, peers included
    python benches/bench_samplers.py --specs ring8 --nfe 5,10 --no-peers --num 2000

For each mixture (a builtin name of :mod:`diffusionlab.oracles.bench` or a JSON spec path) and each budget it runs
every deterministic solver of diffusionlab on the VP-SDE (on every time grid kind and its own default grid), its
stochastic samplers, grids fitted to the oracle (``--fit-samplers``, on starts of their own), and the peers of
``benches/peers.py`` from the same shared initial draws, scores them (coupled error against an RK45
reference, sliced W2 and mixture-weight error against their noise floors) and prints the tables; ``--json`` writes
every record, ``--plots DIR`` the coupled-error plots (``samplers_<spec>.png``), ``--markdown FILE`` the tables
of docs/samplers.md. Needs the optional ``bench`` extra (``pip install -c constraints.txt -e ".[bench]"``; for
k-diffusion see benches/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusionlab.oracles import bench as B  # noqa: E402
from diffusionlab.oracles.mixture import GaussianMixtureOracle  # noqa: E402
from diffusionlab.processes.grid import make_grid  # noqa: E402


def run_spec(spec_name: str, args) -> list[dict]:
    from peers import diffusers_runs, k_diffusion_runs

    spec = B.resolve_spec(spec_name)
    oracle = GaussianMixtureOracle.from_spec(spec, args.process, args.noise)
    problem = B.Problem(oracle, num=args.num, seed=args.seed, projections=args.projections)
    process = oracle.process
    budgets = [int(v) for v in args.nfe.split(",")]
    grid = make_grid(process, 1)  # the process's default ends: k-diffusion's grids span the same levels
    sig_max, sig_min = grid.sig[0], grid.sig[-1]

    def extra(pb, budget):
        recs = []
        if not args.no_peers:
            recs += diffusers_runs(pb, budget)
            recs += k_diffusion_runs(pb, budget, sig_max, sig_min)
        return recs

    def progress(rec):
        if args.verbose and "skipped" not in rec:
            print(f"  {spec_name} {rec['family']}:{rec['sampler']} [{rec.get('grid')}] NFE {rec['nfe']}: "
                  f"coupled {rec.get('coupled', float('nan')):.3e} SW2 {rec['sw2']:.4f}", file=sys.stderr, flush=True)

    samplers = None if args.samplers is None else args.samplers.split(",")
    records = B.benchmark(problem, process, budgets, samplers=samplers, extra=extra, progress=progress)
    fitted = fit_runs(problem, process, records, budgets, args) if args.fit_samplers else {}
    for r in records:
        r["spec"] = spec_name
    checks = []
    if args.floor_seeds > 0:  # is diffusionlab's best deterministic sampler within the floor, at each budget?
        peers_best = B.best_by_budget(records, lambda f: f != "diffusionlab")
        seeds = range(1, args.floor_seeds + 1)
        for b, rec in sorted(B.best_by_budget(records, lambda f: f == "diffusionlab").items()):
            grid = fitted.get((rec["sampler"], b), rec["grid"]) if rec["grid"].startswith("fitted") else rec["grid"]
            c = B.floor_check(oracle, rec["sampler"], b, grid, num=args.num, seeds=seeds,
                              projections=args.projections)
            c["spec"] = spec_name
            p = peers_best.get(b)
            if p is not None:  # the best peer on the same independent problems: a paired comparison of SW2
                pc = B.floor_check(oracle, p["sampler"], b, p["grid"], num=args.num, seeds=seeds,
                                   projections=args.projections, runner=peer_runner(p, b, sig_max, sig_min))
                d = np.subtract(c["per_seed"]["sw2"], pc["per_seed"]["sw2"])
                c["peer"] = {"family": p["family"], "sampler": p["sampler"], "grid": p["grid"],
                             "sw2_mean": pc["sw2_mean"], "sw2_se": pc["sw2_se"], "sw2_z": pc["sw2_z"],
                             "weight_mean": pc["weight_mean"], "diff_mean": float(d.mean()),
                             "diff_se": float(d.std(ddof=1) / np.sqrt(len(d)))}
            checks.append(c)
    return records, checks


def fit_runs(problem, process, records: list[dict], budgets, args) -> dict:
    """Schedule optimisation (:func:`diffusionlab.samplers.fitgrid.fit_grid`): for each budget and each of
    ``--fit-samplers``, the grid of that sampler's best record (lowest coupled error) is fitted to the oracle on
    ``--fit-num`` starts of their own (seed ``--seed + 1000``: not the benchmark's shared draws), then run on the
    benchmark's draws like any grid (recorded as ``fitted[<start grid>]``). Appends the records; returns
    ``{(sampler, budget): fitted TimeGrid}``."""
    from diffusionlab.samplers.fitgrid import fit_grid

    out = {}
    for b in budgets:
        for name in args.fit_samplers.split(","):
            cands = [r for r in records if r["family"] == "diffusionlab" and r["sampler"] == name and r["budget"] == b
                     and "coupled" in r and not r.get("adaptive")]
            if not cands:
                continue
            best = min(cands, key=lambda r: r["coupled"])
            start = B.plan(name, process, b, best["grid"]).grid
            if start.steps < 2:
                continue
            res = fit_grid(problem.oracle, name, start=start, num=args.fit_num, seed=args.seed + 1000,
                           dtype=torch.float64, ref_steps=args.fit_ref_steps)
            grid = res.grid
            grid.kind = f"fitted[{best['grid']}]"
            rec = B.run_diffusionlab(problem, process, name, b, grid)
            rec["fit"] = {"start_grid": best["grid"], "start_coupled": best["coupled"], "times": list(grid.times),
                          "fit_error_start": res.error_start, "fit_error": res.error, "fit_evaluations": res.evaluations}
            records.append(rec)
            out[(name, b)] = grid
            if args.verbose:
                print(f"  fitted {name} NFE<={b} from [{best['grid']}]: coupled {best['coupled']:.3e} -> "
                      f"{rec['coupled']:.3e} (fit batch {res.error_start:.3e} -> {res.error:.3e})", file=sys.stderr,
                      flush=True)
    return out


def ratio_lines(records: list[dict], budgets) -> list[str]:
    """Per budget: the best diffusionlab coupled error without and with fitted grids, the best peer's, and the
    ratios (a markdown table). A run started at a lower level has less of the ODE to integrate, so the ratios compare
    only our runs started about as high as the best peer's or higher (``sig_start >= 0.9`` times its start:
    diffusers' own chain tops at 157, the VP-SDE at 152); the best at any start is shown besides."""
    lines = ["| NFE<= | best peer | diffusionlab, fixed grids | with fitted grids | ratio fixed | ratio fitted | "
             "best at any start (fixed / fitted) |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def cell(r):
        return f"{r['coupled']:.3e} ({r['family']}:{r['sampler']} [{r['grid']}], sig_start {r['sig_start']:.4g})"

    for b in budgets:
        rows = [r for r in records if r.get("budget") == b and "coupled" in r and not r.get("adaptive")
                and r.get("deterministic")]
        peers = [r for r in rows if r["family"] != "diffusionlab"]
        if not peers:
            continue
        pb = min(peers, key=lambda r: r["coupled"])
        ours = [r for r in rows if r["family"] == "diffusionlab"]
        fair = [r for r in ours if r["sig_start"] >= 0.9 * pb["sig_start"]]  # diffusers' chain tops at 157 vs 152
        fixed = [r for r in fair if not str(r["grid"]).startswith("fitted")]
        if not (fixed and fair):
            continue
        f0, f1 = min(fixed, key=lambda r: r["coupled"]), min(fair, key=lambda r: r["coupled"])
        any0 = min((r for r in ours if not str(r["grid"]).startswith("fitted")), key=lambda r: r["coupled"])
        any1 = min(ours, key=lambda r: r["coupled"])
        lines.append(f"| {b} | {cell(pb)} | {cell(f0)} | {cell(f1)} | {f0['coupled'] / pb['coupled']:.3f} | "
                     f"{f1['coupled'] / pb['coupled']:.3f} | {any0['coupled']:.3e} / {any1['coupled']:.3e} |")
    return lines


def peer_runner(rec: dict, budget: int, sig_max: float, sig_min: float):
    """``runner(problem) -> record``: the peer configuration of ``rec`` on another problem."""
    from peers import diffusers_runs, k_diffusion_runs

    if rec["family"] == "diffusers":
        return lambda pb: diffusers_runs(pb, budget, names=[rec["sampler"]])[0]
    if rec["sampler"] == "dpm_fast":
        return lambda pb: k_diffusion_runs(pb, budget, sig_max, sig_min, samplers=["dpm_fast"], grids=())[0]
    return lambda pb: k_diffusion_runs(pb, budget, sig_max, sig_min, samplers=[rec["sampler"]],
                                       grids=(rec["grid"],))[0]


def check_line(c: dict) -> str:
    line = (f"floor check {c['spec']} NFE<={c['budget']} diffusionlab:{c['sampler']} [{c['grid']}] over {c['seeds']} "
            f"problems: SW2 {c['sw2_mean']:.4f} +- {c['sw2_se']:.4f} vs floor {c['sw2_floor_mean']:.4f} +- "
            f"{c['sw2_floor_se']:.4f} (z = {c['sw2_z']:.2f}); weight error {c['weight_mean']:.4f} vs "
            f"{c['weight_floor_mean']:.4f} (z = {c['weight_z']:.2f}): {'within' if c['within'] else 'NOT within'}")
    if "peer" in c:
        p = c["peer"]
        line += (f"; best peer {p['family']}:{p['sampler']} [{p['grid']}] SW2 {p['sw2_mean']:.4f} +- {p['sw2_se']:.4f}, "
                 f"ours - peer = {p['diff_mean']:+.4f} +- {p['diff_se']:.4f}")
    return line


def best_rows(records: list[dict], metric: str = "coupled") -> list[dict]:
    """One row per (family, sampler): at each budget the best grid of that sampler (for the compact table)."""
    rows: dict = {}
    for r in records:
        if "skipped" in r or metric not in r or r.get("adaptive"):
            continue
        key = (r["family"], r["sampler"])
        cur = rows.setdefault(key, {}).get(r["budget"])
        if cur is None or r[metric] < cur[metric]:
            rows[key][r["budget"]] = r
    out = []
    for (fam, name), cells in rows.items():
        for rec in cells.values():
            out.append(dict(rec, grid=f"best: {rec['grid']}"))
    return out


def markdown(records: list[dict], checks: list[dict], spec: str, budgets: list[int]) -> str:
    """The docs tables for one mixture: per sampler its best grid's coupled error (deterministic) or SW2 (stochastic)
    at each budget; the best of each family; the floor checks."""
    recs = [r for r in records if r.get("spec") == spec and "skipped" not in r]
    best: dict = {}
    for r in recs:
        if r.get("adaptive"):
            continue
        key = (r["family"], r["sampler"])
        metric = "coupled" if r["deterministic"] else "sw2"
        cur = best.setdefault(key, {}).get(r["budget"])
        if cur is None or r[metric] < cur[metric]:
            best[key][r["budget"]] = r
    head = "| family | sampler | " + " | ".join(f"NFE<={b}" for b in budgets) + " |"
    lines = ["Coupled error (RMS distance to the RK45 solution from the same start; stochastic samplers: SW2), "
             "best grid per sampler, as `error (actual NFE, grid)`:", "", head, "|" + " --- |" * (2 + len(budgets))]
    for (fam, name), cells in best.items():
        row = f"| {fam} | {name} |"
        for b in budgets:
            r = cells.get(b)
            if r is None:
                row += " |"
                continue
            val = f"{r['coupled']:.2e}" if "coupled" in r else f"SW2 {r['sw2']:.3f}"
            row += f" {val} ({r['nfe']}, {r['grid']}) |"
        lines.append(row)
    lines += ["", "Best deterministic sampler of each family (by coupled error) and its SW2 / weight error; the "
              "floors are those of exact sets at the run's final level:", "",
              "| NFE<= | family | sampler [grid] | NFE | coupled | SW2 (floor +- sd) | weight error (floor) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in budgets:
        for fam in ("diffusionlab", "diffusers", "k-diffusion"):
            cand = [r for r in recs if r["budget"] == b and r["family"] == fam and r["deterministic"]
                    and "coupled" in r and not r.get("adaptive")]
            if not cand:
                continue
            r = min(cand, key=lambda v: v["coupled"])
            lines.append(f"| {b} | {fam} | {r['sampler']} [{r['grid']}] | {r['nfe']} | {r['coupled']:.2e} | "
                         f"{r['sw2']:.4f} ({r['sw2_floor']:.4f} +- {r['sw2_floor_std']:.4f}) | "
                         f"{r['weight_error']:.4f} ({r['weight_floor']:.4f}) |")
    lines += ["", "Ratio of the best coupled errors (diffusionlab / best peer), without and with grids fitted to the "
              "model (`--fit-samplers`):", "", *ratio_lines(recs, budgets)]
    rk = [r for r in recs if r.get("adaptive")]
    if rk:
        r = rk[0]
        est = r["reference_error"]
        lines += ["", f"RK45 (torchdiffeq dopri5, rtol = atol = 1e-7, in t): {r['nfe']} evaluations, coupled error "
                      f"{r['coupled']:.1e}, SW2 {r['sw2']:.4f}; the reference itself (dopri5 1e-9 in sig): "
                      f"{r['reference_nfe']} evaluations"
                      + (f", distance to a 10x looser solve {est:.0e} (its own error is ~10x smaller)." if est else ".")]
    sc = [c for c in checks if c["spec"] == spec]
    if sc:
        lines += ["", "Floor check over independent problems ({} problems of {} samples each; z > 2: outside the "
                      "floor) of diffusionlab's best sampler, and the best peer's SW2 on the same problems (paired "
                      "difference ours - peer):".format(sc[0]["seeds"], sc[0]["num"]), "",
                  "| NFE<= | sampler [grid] | SW2 mean +- se | floor mean +- se | z | weight error (floor) | z | "
                  "within | best peer: SW2 | ours - peer |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in sc:
            p = c.get("peer")
            peer = (f"{p['family']}:{p['sampler']} [{p['grid']}]: {p['sw2_mean']:.4f} +- {p['sw2_se']:.4f} | "
                    f"{p['diff_mean']:+.4f} +- {p['diff_se']:.4f}") if p else " | "
            lines.append(f"| {c['budget']} | {c['sampler']} [{c['grid']}] | {c['sw2_mean']:.4f} +- {c['sw2_se']:.4f} | "
                         f"{c['sw2_floor_mean']:.4f} +- {c['sw2_floor_se']:.4f} | {c['sw2_z']:.2f} | "
                         f"{c['weight_mean']:.4f} ({c['weight_floor_mean']:.4f}) | {c['weight_z']:.2f} | "
                         f"{'yes' if c['within'] else 'no'} | {peer} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="ring8,aniso16", help="builtin names or JSON spec paths, comma separated")
    ap.add_argument("--process", default="vp-sde")
    ap.add_argument("--noise", default="iid")
    ap.add_argument("--num", type=int, default=2000, help="samples per run (and per exact set)")
    ap.add_argument("--nfe", default="5,10,20,50")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--projections", type=int, default=256)
    ap.add_argument("--samplers", default=None, help="diffusionlab samplers (default: all that run on the process)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plots", default=None, help="directory for samplers_<spec>.png")
    ap.add_argument("--markdown", default=None, help="write the compact tables to this file")
    ap.add_argument("--floor-seeds", type=int, default=16, help="problems per floor check (0: none)")
    ap.add_argument("--fit-samplers", default="dpmpp-2m,dpmpp-3m,unipc,unipc:order=3",
                    help="samplers whose best grid is fitted to the oracle at each budget ('': none)")
    ap.add_argument("--fit-num", type=int, default=512, help="starts the grids are fitted on (default 512)")
    ap.add_argument("--fit-ref-steps", type=int, default=200, help="steps of the fit's reference solve")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    records, checks = [], []
    for spec in args.specs.split(","):
        ts = time.perf_counter()
        recs, chk = run_spec(spec, args)
        records += recs
        checks += chk
        print(f"== {spec}: {len(recs)} runs and {len(chk)} floor checks in {time.perf_counter() - ts:.1f} s")
        for metric in ("coupled", "sw2", "weight_error"):
            print(B.format_table([r for r in best_rows(recs, metric)], metric, f"{spec}: {metric} (best grid per sampler)"))
        print("\n".join(B.summary_lines(recs)))
        print("\n".join(ratio_lines(recs, [int(v) for v in args.nfe.split(",")])))
        for c in chk:
            print(check_line(c))
        if args.plots:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
            B.plot_records(recs, Path(args.plots) / f"samplers_{Path(spec).stem}.png",
                           f"{spec}, {args.process}, {args.num} samples: coupled error vs NFE (best grid per sampler "
                           "at each budget; clipped at 10)")
    total = time.perf_counter() - t0
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
              f"{args.threads} thread(s)"
    print(f"total {total:.1f} s on {machine}")
    budgets = [int(v) for v in args.nfe.split(",")]
    if args.markdown:
        text = [f"<!-- generated by benches/bench_samplers.py in {total:.0f} s on {machine} -->"]
        for spec in args.specs.split(","):
            text += [f"### {spec}", "", markdown(records, checks, spec, budgets), ""]
        Path(args.markdown).write_text("\n".join(text))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "seconds": total, "records": records,
                                               "floor_checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
