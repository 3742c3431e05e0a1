"""Training from a folder of PNGs: the in-memory path against the streaming DataLoader (0, 1, 2 workers).

    python benches/bench_stream.py                                   # about 6 minutes on 2 CPU cores
    python benches/bench_stream.py --json runs/bench/stream.json --markdown runs/bench/stream.md

The folder: ``--files`` RGB PNGs of ``--source`` x ``--source`` pixels (smooth random images, like downscaled photos,
so that they compress and decode like natural images), trained at ``--size`` x ``--size`` (centre crop and
antialiased resize, as ``image_folder`` does). Every measurement is a fresh process (``--worker SPEC``) that builds
the run with the trainer's own :func:`~diffusionlab.training.trainer.build_parts` -- for the in-memory path that
decodes every file; for streaming it only checks their headers -- and then times full training steps
(:func:`~diffusionlab.training.trainer.train_step`, the batch fetch included) with the wall clock: with workers the
decoding happens in other processes, so the process CPU time would not count it. Two U-Nets: ``tiny`` (width 8,
three levels, no attention but the middle block's at 8 x 8: the data path matters) and ``small`` (width 32, three
levels, attention at 8 x 8: the network dominates). Variants are interleaved over ``--rounds`` rounds (order rotated each round) so that a drifting
background load falls on all alike; the figures are medians over the rounds, and the ratios are against the
in-memory path of the same round. The load average at the start and the end is printed with the table: on a
shared machine say so with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = {  # the middle block's attention runs at the lowest resolution: 8 x 8 for both
    "tiny": {"name": "unet", "base_channels": 8, "channel_mults": [1, 1, 1], "num_res_blocks": 1,
             "attn_resolutions": []},
    "small": {"name": "unet", "base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1,
              "attn_resolutions": [8]},
}
VARIANTS = {"in memory": ["data.stream=false"], "stream, 0 workers": ["data.stream=true", "data.workers=0"],
            "stream, 1 worker": ["data.stream=true", "data.workers=1"],
            "stream, 2 workers": ["data.stream=true", "data.workers=2"]}


def write_folder(folder: str, n: int, side: int, seed: int = 0) -> None:
    """``n`` smooth random RGB PNGs (8 x 8 noise upsampled bilinearly, plus a little pixel noise)."""
    import imageio.v3 as iio
    import numpy as np
    import torch
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        low = torch.rand(1, 3, 8, 8, generator=g)
        img = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)[0]
        img = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        iio.imwrite(os.path.join(folder, f"{i:05d}.png"), (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from diffusionlab.training.config import resolve
    from diffusionlab.training.trainer import build_parts, train_step

    cfg = {"data": {"name": "image_folder", "path": spec["folder"], "image_size": spec["size"], "flip": True},
           "process": {"name": "vp", "T": 1000}, "model": MODELS[spec["model"]],
           "train": {"batch_size": spec["batch"], "device": "cpu", "threads": 1, "seed": 0, "warmup": 0},
           "sample": {"sampler": "ddim", "steps": 10}}
    t0 = time.perf_counter()
    p = build_parts(resolve(cfg, spec["overrides"]), log=lambda m: None)
    start = time.perf_counter() - t0
    for k in range(spec["warmup"]):
        train_step(p, k).tolist()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for k in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        train_step(p, k).tolist()  # .tolist(): wait for the step
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    p.batches.close()
    return {"startup_s": start, "step_ms": 1000 * wall / spec["steps"], "cpu_ms": 1000 * cpu / spec["steps"],
            "streaming": p.batches.streaming}


def measure(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "pngs")
        write_folder(folder, args.files, args.source)
        rows: dict = {(m, v): [] for m in args.models for v in VARIANTS}
        for r in range(args.rounds):
            order = list(VARIANTS)
            order = order[r % len(order):] + order[:r % len(order)]
            for model in args.models:
                base = None
                for v in order:
                    spec = {"folder": folder, "size": args.size, "batch": args.batch, "model": model,
                            "overrides": VARIANTS[v], "steps": args.steps, "warmup": args.warmup}
                    res = measure(spec)
                    rows[(model, v)].append(res)
                    print(json.dumps({"round": r, "model": model, "variant": v, **res}), flush=True)
    load1 = os.getloadavg()
    table = []
    for model in args.models:
        mem = rows[(model, "in memory")]
        for v in VARIANTS:
            res = rows[(model, v)]
            ratios = [m["step_ms"] / x["step_ms"] for m, x in zip(mem, res)]  # > 1: faster than in memory
            step = statistics.median(x["step_ms"] for x in res)
            table.append({"model": model, "variant": v, "step_ms": round(step, 1),
                          "samples_per_s": round(1000 * args.batch / step, 1),
                          "cpu_ms_main": round(statistics.median(x["cpu_ms"] for x in res), 1),
                          "startup_s": round(statistics.median(x["startup_s"] for x in res), 2),
                          "speed_vs_memory": round(statistics.median(ratios), 3)})
    return {"environment": {"cpus": os.cpu_count(), "load_start": [round(x, 2) for x in load0],
                            "load_end": [round(x, 2) for x in load1], "files": args.files, "source": args.source,
                            "size": args.size, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                            "torch_threads": 1},
            "rows": table}


def markdown(rep: dict) -> str:
    e = rep["environment"]
    lines = [f"{e['files']} PNGs of {e['source']} x {e['source']} trained at {e['size']} x {e['size']}, batch "
             f"{e['batch']}, 1 torch thread, {e['cpus']} CPU cores; load average {e['load_start'][0]} at the start, "
             f"{e['load_end'][0]} at the end; medians of {e['rounds']} interleaved rounds of {e['steps']} steps", "",
             "| U-Net | data path | ms / step | samples / s | main-process CPU ms / step | start-up s | speed vs in "
             "memory |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rep["rows"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['step_ms']} | {r['samples_per_s']} | {r['cpu_ms_main']} | "
                     f"{r['startup_s']} | {r['speed_vs_memory']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--files", type=int, default=1024)
    p.add_argument("--source", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.models = args.models.split(",")
    rep = run(args)
    md = markdown(rep)
    print(md)
    for path, text in ((args.json, json.dumps(rep, indent=1)), (args.markdown, md)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
