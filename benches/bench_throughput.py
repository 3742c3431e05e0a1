"""Training throughput against the peers: examples per second and step memory at matched model size.

    python benches/bench_throughput.py                       # digits U-Nets at batch 16 and 128, toy-2D MLP: ~6 min
    python benches/bench_throughput.py --json runs/bench/throughput.json --markdown runs/bench/throughput.md

Rows (every one a full training step of that library's own loop: batch draw, noising, forward, loss, backward,
clipping, optimizer, EMA; see ``training_peers.py``):

- **digits**: 1 x 8 x 8 digits, the U-Nets matched to about 0.4 M parameters (diffusionlab 399,913; diffusers
  ``UNet2DModel`` 395,641; denoising-diffusion-pytorch ``Unet`` 418,919). diffusionlab runs as configured by
  ``configs/digits.yaml`` (``train.channels_last: true``), without channels-last, and with ``train.compile: true``
  (``torch.compile`` of the network; compile time is not in the step time: see ``bench_time_to_quality.py``
  for the wall clock that includes it);
- **toy**: configs/toy2d.yaml's MLP (695,298 parameters) on 2-D points, the same network in every loop.

Every figure is the median over ``--rounds`` fresh processes (libraries interleaved, order rotated per round) of
the median over chunks of steps in that process (``measure.py``). The goal ratio is diffusionlab's best
configuration over the faster peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import interleaved  # noqa: E402

DIGITS_VARIANTS = {
    "diffusionlab": [],  # configs/digits.yaml as shipped
    "diffusionlab (no channels-last)": ["train.channels_last=false"],
    "diffusionlab + compile": ["train.compile=true"],
}
PEERS = ("diffusers", "ddpm-pytorch")


def specs(batches, toy_batch: int, threads: int, device: str, steps: int, compile_: bool) -> list[dict]:
    out = []
    for b in batches:
        for variant, overrides in DIGITS_VARIANTS.items():
            if "compile" in variant and not compile_:
                continue
            out.append({"task": "digits", "library": "diffusionlab", "variant": variant, "overrides": overrides,
                        "batch": b, "threads": threads, "device": device, "steps": steps})
        for lib in PEERS:
            out.append({"task": "digits", "library": lib, "variant": lib, "batch": b, "threads": threads,
                        "device": device, "steps": steps})
    if toy_batch:
        for lib in ("diffusionlab",) + PEERS:
            out.append({"task": "toy", "library": lib, "variant": lib, "batch": toy_batch, "threads": threads,
                        "device": device, "steps": steps})
    return out


def goal_rows(records: list[dict]) -> list[dict]:
    """Per (task, batch): diffusionlab's best and as-configured throughput over the faster peer's."""
    rows = []
    keys = sorted({(r["task"], r["batch"]) for r in records})
    for task, batch in keys:
        group = [r for r in records if r["task"] == task and r["batch"] == batch and "error" not in r]
        ours = [r for r in group if r["library"] == "diffusionlab"]
        peers = [r for r in group if r["library"] != "diffusionlab"]
        if not ours or not peers:
            continue
        best_peer = max(peers, key=lambda r: r["examples_per_s"])
        best_ours = max(ours, key=lambda r: r["examples_per_s"])
        default = next((r for r in ours if r["variant"] == "diffusionlab"), best_ours)
        rows.append({"task": task, "batch": batch, "faster_peer": best_peer["variant"],
                     "best": best_ours["variant"], "ratio_best": best_ours["examples_per_s"] / best_peer["examples_per_s"],
                     "ratio_default": default["examples_per_s"] / best_peer["examples_per_s"]})
    return rows


def markdown(records: list[dict], goals: list[dict], header: str) -> str:
    lines = [header, "", "| task | batch | library | parameters | ms / step | CPU ms / step | examples / s | step memory (MB) "
             "| rounds (ms) |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['batch']} | {r['variant']} | | | | | | failed: {r['error']} |")
            continue
        lines.append(f"| {r['task']} | {r['batch']} | {r['variant']} | {r['params']:,} | {r['ms_per_step']:.1f} | "
                     f"{r['cpu_ms_per_step']:.1f} | {r['examples_per_s']:.0f} | {r['step_memory_mb']:.0f} | {', '.join(f'{x:.0f}' for x in r['ms_rounds'])} |")
    lines += ["", "| task | batch | faster peer | diffusionlab as configured / peer | best diffusionlab / peer | goal >= 1.3 |",
              "| --- | ---: | --- | ---: | ---: | --- |"]
    for g in goals:
        lines.append(f"| {g['task']} | {g['batch']} | {g['faster_peer']} | {g['ratio_default']:.2f}x | "
                     f"{g['ratio_best']:.2f}x ({g['best']}) | {'met' if g['ratio_best'] >= 1.3 else 'missed'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,128", help="digits batch sizes, comma separated")
    ap.add_argument("--toy-batch", type=int, default=512, help="toy-2D batch (configs/toy2d.yaml's); 0 skips")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed chunk (5 chunks per process)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    todo = specs(batches, args.toy_batch, args.threads, args.device, args.steps, not args.no_compile)
    print(f"bench_throughput: {len(todo)} configurations x {args.rounds} rounds, {args.threads} thread(s), {args.device}",
          file=sys.stderr)
    records = interleaved(todo, args.rounds, log=lambda m: print(m, file=sys.stderr))
    goals = goal_rows(records)
    header = f"Training throughput, {args.device}, {args.threads} thread(s), median of {args.rounds} rounds"
    text = markdown(records, goals, header)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"records": records, "goals": goals, "args": vars(args)}, f, indent=1)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
