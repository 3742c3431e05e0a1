"""How training step time and memory grow with batch size, resolution and frame count, and what the frame
covariance costs next to the network.

    python benches/bench_scaling.py                    # ~10 min on 2 cores
    python benches/bench_scaling.py --json runs/bench/scaling.json --markdown runs/bench/scaling.md \\
        --plot docs/benchmarks/scaling.png

1. **batch**: digits (1 x 8 x 8), batch 16 .. 256, diffusionlab as configured vs the peers (``measure.py``);
2. **resolution**: random 1 x R x R images through the same three networks (two levels, attention at R/2 and in
   the middle, so the parameter counts stay those of the digits networks), R = 8, 16, 32;
3. **frames**: diffusionlab's space-time U-Net (configs/video.yaml, ``progressive:1.0`` frame noise) on random
   1 x F x 16 x 16 videos, F = 4, 8, 16 (the peers have no video training loop);
4. **covariance**: for F = 4 .. 128 frames of a (8, 1, F, 16, 16) batch, the time of drawing correlated noise
   (``L z``) plus one Mahalanobis norm (``x^T C^{-1} x``) -- what one training step adds -- for each covariance,
   against one forward pass of the space-time U-Net at the same F (up to 32 frames, where it still fits the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import interleaved, save_figure  # noqa: E402

LIBS = ("diffusionlab", "diffusers", "ddpm-pytorch")


def scaling_specs(batches, resolutions, frames, threads, device) -> list[dict]:
    base = {"threads": threads, "device": device}
    out = [{**base, "axis": "batch", "task": "digits", "library": lib, "batch": b} for b in batches for lib in LIBS]
    out += [{**base, "axis": "resolution", "task": "images", "library": lib, "batch": 32, "resolution": r, "steps": 2,
             "repeats": 3} for r in resolutions for lib in LIBS]
    out += [{**base, "axis": "frames", "task": "video", "library": "diffusionlab", "batch": 8, "frames": f, "steps": 2,
             "repeats": 3} for f in frames]
    return out


def _time(fn, repeats: int = 7) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def covariances(F: int) -> dict:
    import torch

    from diffusionlab.noise.covariance import Dense, make_covariance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(F, F, generator=g, dtype=torch.float64)
    dense = Dense(a @ a.T / F + torch.eye(F, dtype=torch.float64), axis=2)
    toe = ",".join(f"{0.8 ** k:.6f}" for k in range(F))
    return {"iid": make_covariance("iid", F, 2), "mixed:0.5": make_covariance("mixed:0.5", F, 2),
            "progressive:1.0": make_covariance("progressive:1.0", F, 2),
            "toeplitz 0.8^k": make_covariance(f"toeplitz:{toe}", F, 2), "dense (fitted)": dense}


def covariance_costs(frame_counts, net_frames_max: int, device: str) -> list[dict]:
    """Milliseconds per (draw + Mahalanobis) for each covariance vs one network forward, per F."""
    import torch

    import training_peers as tp

    rows = []
    for F in frame_counts:
        shape = (8, 1, F, 16, 16)
        x = torch.randn(shape, device=device)
        net_ms = None
        if F <= net_frames_max:
            r = tp.video_recipe(device, 8, F)
            model = r.parts.model
            t = torch.full((8,), 50, device=device, dtype=torch.long)
            with torch.no_grad():
                net_ms = _time(lambda: model(x, t), repeats=3)
        for name, cov in covariances(F).items():
            gen = torch.Generator(device=device).manual_seed(0)

            def once(cov=cov, gen=gen):
                eps = cov.sample(shape, generator=gen, device=device)
                return cov.mahalanobis(x - eps)

            ms = _time(once)
            rows.append({"frames": F, "covariance": name, "ms": ms, "network_forward_ms": net_ms,
                         "share_of_forward": ms / net_ms if net_ms else None})
    return rows


def markdown(records, cov_rows, header) -> str:
    lines = [header, ""]
    for axis, col in (("batch", "batch"), ("resolution", "resolution"), ("frames", "frames")):
        rows = [r for r in records if r.get("axis") == axis]
        if not rows:
            continue
        lines += [f"**{axis}**", "", f"| {col} | library | ms / step | examples / s | step memory (MB) |",
                  "| ---: | --- | ---: | ---: | ---: |"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r.get(col)} | {r['library']} | failed: {r['error']} | | |")
                continue
            lines.append(f"| {r[col]} | {r['library']} | {r['ms_per_step']:.1f} | {r['examples_per_s']:.0f} | "
                         f"{r['step_memory_mb']:.0f} |")
        lines.append("")
    if cov_rows:
        lines += ["**covariance** (batch 8 x 1 x F x 16 x 16: draw L z and one Mahalanobis norm)", "",
                  "| F | covariance | ms | network forward ms | share of forward |", "| ---: | --- | ---: | ---: | ---: |"]
        for r in cov_rows:
            net = f"{r['network_forward_ms']:.1f}" if r["network_forward_ms"] else "-"
            share = f"{100 * r['share_of_forward']:.2f} %" if r["share_of_forward"] else "-"
            lines.append(f"| {r['frames']} | {r['covariance']} | {r['ms']:.3f} | {net} | {share} |")
    return "\n".join(lines) + "\n"


def plot(records, cov_rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, axis in zip(axes[:3], ("batch", "resolution", "frames")):
        for lib in LIBS:
            rows = [r for r in records if r.get("axis") == axis and r["library"] == lib and "error" not in r]
            if rows:
                ax.plot([r[axis] for r in rows], [r["ms_per_step"] for r in rows], marker="o", label=lib)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("ms / training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    ax = axes[3]
    for name in sorted({r["covariance"] for r in cov_rows}):
        rows = [r for r in cov_rows if r["covariance"] == name]
        ax.plot([r["frames"] for r in rows], [r["ms"] for r in rows], marker="o", label=name)
    net = [r for r in cov_rows if r["covariance"] == "iid" and r["network_forward_ms"]]
    ax.plot([r["frames"] for r in net], [r["network_forward_ms"] for r in net], "k--", label="network forward")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames F")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,32,64,128,256")
    ap.add_argument("--resolutions", default="8,16,32")
    ap.add_argument("--frames", default="4,8,16")
    ap.add_argument("--cov-frames", default="4,8,16,32,64,128")
    ap.add_argument("--net-frames-max", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    torch.set_num_threads(args.threads)
    todo = scaling_specs(ints(args.batches), ints(args.resolutions), ints(args.frames), args.threads, args.device)
    records = interleaved(todo, args.rounds, log=lambda m: print(m, file=sys.stderr))
    cov_rows = covariance_costs(ints(args.cov_frames), args.net_frames_max, args.device)
    header = f"Scaling, {args.device}, {args.threads} thread(s), median of {args.rounds} rounds"
    text = markdown(records, cov_rows, header)
    print(text)
    for path, content in ((args.json, None), (args.markdown, text)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                if content is None:
                    json.dump({"records": records, "covariance": cov_rows, "args": vars(args)}, f, indent=1)
                else:
                    f.write(content)
    if args.plot:
        plot(records, cov_rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
