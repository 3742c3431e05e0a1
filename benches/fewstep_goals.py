"""The few-step goals on trained networks: FD against NFE for the EDM recipe's run (default and fitted grids),
its progressively distilled students and k-diffusion's samplers on the same network, against the equal-quality
threshold of ``docs/benchmarks.md`` ("Sampling cost at equal quality": the peers' 1000-step default, mean + 2
standard errors over 3 seeds = 2.32).

    python benches/fewstep_goals.py --measure --edm-run runs/digits_edm --distilled-run runs/digits_edm_pd \\
        --json docs/benchmarks/fewstep_goals.json
    python benches/fewstep_goals.py --json docs/benchmarks/fewstep_goals.json \\
        --markdown docs/benchmarks/fewstep_goals.md --plot docs/benchmarks/fewstep_goals.png

``--measure`` runs ``diffusionlab fit-grid`` and ``diffusionlab evaluate`` (1000 samples, seeds 0-2) for every
diffusionlab row missing from ``--json`` and appends it; the k-diffusion rows come from
``bench_sampling_cost.py --edm-run`` (which needs k-diffusion installed) and are kept as they are. Without
``--measure`` it only reports: the fewest NFE at equal quality per sampler, a markdown table and the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

#: the equal-quality threshold: the peers' 1000-step FD, mean 1.926 + 2 x its standard error 0.197 over 3 seeds
#: (docs/benchmarks.md), rounded to 2.32
THRESHOLD = 2.32
#: a mean FD within this of the threshold is a tie (the threshold itself is rounded to 0.01)
TIE = 0.005
SEEDS = (0, 1, 2)
#: (row name, sampler, grid or None, NFE grid) measured on the EDM recipe's run
EDM_ROWS = [("unipc[default]", "unipc", None, (4, 5, 6, 7, 8, 10)),
            ("dpmpp-2m[default]", "dpmpp-2m", None, (5, 6, 7, 8, 10)),
            ("unipc[fitted]", "unipc", "fitted", (4, 5, 6, 8, 10))]


def _evaluate(run: str, seed: int, sampler: str | None = None, steps: int | None = None,
              grid: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "diffusionlab", "evaluate", "--run", run, "--num", "1000", "--seed", str(seed),
           "--quiet"]
    for flag, value in (("--sampler", sampler), ("--steps", steps), ("--grid", grid)):
        if value is not None:
            cmd += [flag, str(value)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _have(rows: list, library: str, sampler: str, nfe: int, seed: int) -> bool:
    return any(r["library"] == library and r["sampler"] == sampler and r["nfe"] == nfe and r["seed"] == seed
               for r in rows)


def measure(rows: list, edm_run: str, distilled_run: str | None) -> list:
    """Append the missing diffusionlab rows (module docstring)."""
    for name, sampler, grid, nfes in EDM_ROWS:
        for n in nfes:
            if grid == "fitted" and not (Path(edm_run) / "grids" / f"{sampler}-{n}.json").exists():
                subprocess.run([sys.executable, "-m", "diffusionlab", "fit-grid", "--run", edm_run, "--sampler",
                                sampler, "--steps", str(n), "--quiet"], check=True, capture_output=True)
            for seed in SEEDS:
                if not _have(rows, "diffusionlab", name, n, seed):
                    out = _evaluate(edm_run, seed, sampler, n, grid)
                    rows.append({"library": "diffusionlab", "sampler": name, "nfe": out["nfe_per_sample"],
                                 "seed": seed, "fd": out["fd"], "source": "diffusionlab evaluate"})
    if distilled_run is not None:
        for student in sorted((Path(distilled_run) / "rounds").glob("*-steps")):
            for seed in SEEDS:
                n = int(student.name.split("-")[0])
                if not _have(rows, "diffusionlab", "distilled ddim", n, seed):
                    out = _evaluate(str(student), seed)
                    rows.append({"library": "diffusionlab", "sampler": "distilled ddim", "nfe": out["nfe_per_sample"],
                                 "seed": seed, "fd": out["fd"], "source": "diffusionlab evaluate (distilled student)"})
    return rows


def summarise(rows: list) -> list:
    """``(library, sampler, nfe, mean FD, standard error, seeds)`` per configuration, sorted."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["library"], r["sampler"], r["nfe"]), []).append(r["fd"])
    out = []
    for (lib, smp, nfe), fds in sorted(groups.items()):
        m = sum(fds) / len(fds)
        se = math.sqrt(sum((f - m) ** 2 for f in fds) / (len(fds) - 1) / len(fds)) if len(fds) > 1 else float("nan")
        out.append((lib, smp, nfe, m, se, len(fds)))
    return out


def fewest(summary: list) -> dict:
    """The fewest NFE at equal quality (mean FD <= :data:`THRESHOLD`, 3 seeds) per (library, sampler), with its
    mean FD (a tie when within :data:`TIE` of the threshold)."""
    best: dict = {}
    for lib, smp, nfe, m, _, n in summary:
        if n >= len(SEEDS) and m <= THRESHOLD and nfe < best.get((lib, smp), (math.inf,))[0]:
            best[(lib, smp)] = (nfe, m)
    return best


def _fewest_cell(b, summary: list, lib: str, smp: str) -> str:
    """``**N**``, or for a tie at the threshold ``**N** (a tie, FD m; M below it)`` with the fewest NFE clearly
    below."""
    if b is None:
        return "not reached"
    nfe, m = b
    if m < THRESHOLD - TIE:
        return f"**{nfe}**"
    below = [s[2] for s in summary if (s[0], s[1]) == (lib, smp) and s[5] >= len(SEEDS) and s[3] < THRESHOLD - TIE]
    return f"**{nfe}** (a tie, FD {m:.3f}; {min(below)} below it)" if below else f"**{nfe}** (a tie, FD {m:.3f})"


def markdown(summary: list) -> str:
    best = fewest(summary)
    nfes = sorted({s[2] for s in summary})
    keys = sorted({(s[0], s[1]) for s in summary})
    cell = {(s[0], s[1], s[2]): s for s in summary}
    lines = ["| library | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " | fewest NFE at FD <= 2.32 |",
             "| --- | --- |" + " ---: |" * (len(nfes) + 1)]
    for lib, smp in keys:
        vals = []
        for n in nfes:
            s = cell.get((lib, smp, n))
            vals.append("" if s is None else (f"{s[3]:.2f} ± {s[4]:.2f}" if s[5] > 1 else f"{s[3]:.2f}"))
        b = best.get((lib, smp))
        lines.append(f"| {lib} | `{smp}` | " + " | ".join(vals) + f" | {_fewest_cell(b, summary, lib, smp)} |")
    return "\n".join(lines) + "\n"


def plot(summary: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for lib, smp in sorted({(s[0], s[1]) for s in summary}):
        pts = [s for s in summary if s[0] == lib and s[1] == smp]
        ax.errorbar([p[2] for p in pts], [p[3] for p in pts], yerr=[0 if math.isnan(p[4]) else p[4] for p in pts],
                    marker="o", capsize=2, label=f"{lib} {smp}", linestyle="--" if lib != "diffusionlab" else "-")
    ax.axhline(THRESHOLD, color="grey", linewidth=1)
    ax.text(1.05, THRESHOLD * 1.02, "equal quality (FD 2.32)", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FD, digits metric (mean ± se, 3 seeds)")
    ax.set_title("EDM recipe on digits: few-step samplers and distilled students")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="the measured rows (read, and written with --measure)")
    p.add_argument("--measure", action="store_true", help="evaluate the missing diffusionlab rows")
    p.add_argument("--edm-run", default="runs/digits_edm")
    p.add_argument("--distilled-run", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    path = Path(args.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    if args.measure:
        rows = measure(rows, args.edm_run, args.distilled_run)
        path.write_text(json.dumps(rows, indent=1))
    summary = summarise(rows)
    table = markdown(summary)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(summary, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
