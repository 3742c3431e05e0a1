"""Time to quality against the peers: wall clock and optimizer steps until the digits metric reaches a threshold.

    python benches/bench_time_to_quality.py                                  # FD <= 3, 15 min cap each: ~60 min
    python benches/bench_time_to_quality.py --json runs/bench/ttq.json --markdown runs/bench/ttq.md \\
        --plot docs/benchmarks/time_to_quality.png

Each library trains with its own default recipe (``training_peers.py``: diffusionlab's ``configs/digits.yaml``,
diffusers' ``train_unconditional`` defaults, denoising-diffusion-pytorch's ``Trainer`` defaults) at matched model
size on the same 1500 training digits. The libraries take turns: each trains for ``--eval-every`` seconds of wall
clock, then its EMA weights draw ``--num`` digits with its own 50-step DDIM and the digits metric scores them against
the 297 held-out digits (``diffusionlab.metrics.digits``, Frechet distance in the shipped classifier's features).
Taking turns puts any change in background load on every library alike. The training clock counts every step from
the first (and so a ``torch.compile`` warm-up, if configured), never the evaluations. A library stops when its FD is
at or below ``--threshold`` or when its training clock passes ``--cap-minutes``.

Reference FDs of the metric (docs/digits_metric.md): real held-out digits 1.74, Gaussian noise 34.4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")
from measure import save_figure  # noqa: E402


class Contender:
    """One library's training run with its clock and its quality curve."""

    def __init__(self, name: str, recipe):
        self.name, self.recipe = name, recipe
        self.train_seconds, self.steps, self.curve = 0.0, 0, []
        self.done = False

    def train_for(self, seconds: float) -> None:
        end = self.train_seconds + seconds
        t0 = time.perf_counter()
        while self.train_seconds < end:
            self.recipe.step()
            self.steps += 1
            if self.steps % 8 == 0 or self.recipe.device.type == "cpu":
                self.recipe.sync()
                now = time.perf_counter()
                self.train_seconds += now - t0
                t0 = now
        self.recipe.sync()
        self.train_seconds += time.perf_counter() - t0

    def evaluate(self, num: int, seed: int) -> dict:
        from diffusionlab.metrics.digits import evaluate_digits

        t0 = time.perf_counter()
        x = self.recipe.sample(num, seed=seed)
        m = evaluate_digits(x.cpu())
        point = {"train_seconds": round(self.train_seconds, 2), "steps": self.steps,
                 "examples": self.steps * self.recipe.batch, "fd": m["fd"], "class_coverage": m["class_coverage"],
                 "eval_seconds": round(time.perf_counter() - t0, 2)}
        self.curve.append(point)
        return point


def reached(curve: list[dict], threshold: float) -> dict | None:
    return next((p for p in curve if p["fd"] <= threshold), None)


def summary(contenders: list[Contender], threshold: float, cap_s: float) -> dict:
    rows = {}
    for c in contenders:
        hit = reached(c.curve, threshold)
        rows[c.name] = {"params": c.recipe.params, "batch": c.recipe.batch, "reached": hit is not None,
                        "seconds": hit["train_seconds"] if hit else None, "steps": hit["steps"] if hit else None,
                        "best_fd": min((p["fd"] for p in c.curve), default=None),
                        "trained_seconds": round(c.train_seconds, 1), "trained_steps": c.steps}
    ours = rows.get("diffusionlab")
    peers = {k: v for k, v in rows.items() if k in ("diffusers", "ddpm-pytorch")}
    goal = None
    if ours and ours["reached"] and peers:
        # a peer that never reached the threshold took longer than its whole training clock
        peer_times = {k: (v["seconds"] if v["reached"] else v["trained_seconds"]) for k, v in peers.items()}
        fastest = min(peer_times, key=peer_times.get)
        bound = not peers[fastest]["reached"]
        goal = {"faster_peer": fastest, "ratio": ours["seconds"] / peer_times[fastest],
                "ratio_is_upper_bound": bound, "met": ours["seconds"] / peer_times[fastest] <= 1 / 3}
    return {"threshold": threshold, "cap_seconds": cap_s, "libraries": rows, "goal": goal}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"Time to digits FD <= {s['threshold']} (cap {s['cap_seconds'] / 60:.0f} min of training each)", "",
             "| library | parameters | batch | reached | training seconds | optimizer steps | best FD | trained |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for name, r in s["libraries"].items():
        lines.append(f"| {name} | {r['params']:,} | {r['batch']} | {'yes' if r['reached'] else 'no'} | "
                     f"{r['seconds'] if r['reached'] else '>' + str(r['trained_seconds'])} | "
                     f"{r['steps'] if r['reached'] else '>' + str(r['trained_steps'])} | {r['best_fd']:.2f} | "
                     f"{r['trained_seconds']:.0f} s, {r['trained_steps']} steps |")
    g = s["goal"]
    if g:
        rel = "<=" if g["ratio_is_upper_bound"] else "="
        lines += ["", f"diffusionlab / {g['faster_peer']}: {rel} {g['ratio']:.3f} (goal <= 1/3: "
                      f"{'met' if g['met'] else 'missed'})"]
    lines += ["", "Curves (training seconds: FD):", ""]
    for name, curve in result["curves"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p['train_seconds']:.0f}: {p['fd']:.2f}" for p in curve))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in result["curves"].items():
        ax.plot([p["train_seconds"] / 60 for p in curve], [p["fd"] for p in curve], marker="o", ms=3, label=name)
    ax.axhline(result["summary"]["threshold"], color="k", ls="--", lw=1, label="threshold")
    ax.axhline(1.74, color="gray", ls=":", lw=1, label="real held-out digits")
    ax.set_yscale("log")
    ax.set_xlabel("training wall clock (minutes, 2-core CPU)")
    ax.set_ylabel("digits FD (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    import torch

    import training_peers as tp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=float, default=3.0, help="digits FD to reach (default 3.0)")
    ap.add_argument("--cap-minutes", type=float, default=15.0, help="training clock cap per library")
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between evaluations")
    ap.add_argument("--num", type=int, default=1000, help="samples per evaluation")
    ap.add_argument("--libraries", default=",".join(tp.LIBRARIES))
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                    help="an extra diffusionlab contender: configs/digits.yaml with these overrides, e.g. "
                         "'v+min-snr=parametrization.prediction=v,objective.weighting=min_snr' (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    contenders = []
    for name in args.libraries.split(","):
        try:
            contenders.append(Contender(name, tp.RECIPES[name](args.device, seed=args.seed)))
        except (RuntimeError, KeyError) as e:
            print(f"bench_time_to_quality: skipping {name}: {e}", file=sys.stderr)
    for spec in args.variant:
        name, _, sets = spec.partition("=")
        contenders.append(Contender(name, tp.DiffusionLabRecipe(args.device, seed=args.seed,
                                                                overrides=[x for x in sets.split(",") if x])))
    cap = 60 * args.cap_minutes
    k = 0
    while not all(c.done for c in contenders):
        for c in contenders:
            if c.done:
                continue
            c.train_for(min(args.eval_every, cap - c.train_seconds))
            p = c.evaluate(args.num, seed=args.seed + 1000 + k)
            print(f"{c.name}: {p['train_seconds']:.0f} s, {p['steps']} steps, FD {p['fd']:.3f} "
                  f"(eval {p['eval_seconds']:.0f} s)", file=sys.stderr, flush=True)
            c.done = p["fd"] <= args.threshold or c.train_seconds >= cap - 1e-6
        k += 1
    result = {"summary": summary(contenders, args.threshold, cap), "curves": {c.name: c.curve for c in contenders},
              "args": vars(args)}
    text = markdown(result)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
