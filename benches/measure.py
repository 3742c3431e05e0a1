"""Time and memory of training steps, each measurement in a fresh process (benchmarks only).

A measurement is a JSON spec; :func:`measure` runs ``python benches/measure.py --worker SPEC`` and reads back one
JSON line. The child builds the recipe (:mod:`training_peers`), runs ``warmup`` steps, then ``repeats`` chunks of
``steps`` steps, and reports the median and minimum milliseconds per step and the memory the steps took:

- CPU: the peak resident set size (``ru_maxrss``) minus the resident size just before the first (warm-up) step,
  i.e. what training allocates on top of the built model and data (activations, gradients, optimizer state);
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the first step.

Fresh processes keep one library's allocator and caches out of another's figures; the caller interleaves the
libraries over several rounds so that drifting background load falls on all of them alike. The process CPU time
per step is reported too: with one thread it is the steadier figure where other jobs share the machine.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(spec: dict):
    """The recipe a spec names: ``{"task": "digits" | "toy" | "images" | "video", "library", "batch", ...}``."""
    import training_peers as tp

    lib, batch, device = spec["library"], spec["batch"], spec.get("device", "cpu")
    task = spec.get("task", "digits")
    if task == "toy":
        return tp.toy_recipe(lib, device, batch)
    if task == "digits":
        if lib == "diffusionlab":
            return tp.DiffusionLabRecipe(device, batch, overrides=spec.get("overrides"))
        return tp.RECIPES[lib](device, batch)
    if task == "images":  # random C x R x R images through the digits-sized networks (scaling in resolution)
        return tp.image_recipe(lib, device, batch, spec["resolution"], spec.get("overrides"))
    if task == "video":
        return tp.video_recipe(device, batch, spec["frames"], spec.get("resolution", 16), spec.get("overrides"))
    raise ValueError(f"unknown task {task!r}")


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    os.environ.setdefault("TQDM_DISABLE", "1")
    recipe = build(spec)
    cuda = recipe.device.type == "cuda"
    recipe.sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(recipe.device)
        base = torch.cuda.memory_allocated(recipe.device)
    else:
        base = _rss_bytes()
    for _ in range(spec.get("warmup", 3)):
        recipe.step()
    per_step, cpu_per_step = [], []
    for _ in range(spec.get("repeats", 5)):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(spec.get("steps", 4)):
            recipe.step()
        recipe.sync()
        per_step.append((time.perf_counter() - t0) / spec.get("steps", 4))
        cpu_per_step.append((time.process_time() - c0) / spec.get("steps", 4))
    if cuda:
        peak = torch.cuda.max_memory_allocated(recipe.device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    ms = 1000 * statistics.median(per_step)
    return {**spec, "params": recipe.params, "ms_per_step": ms, "ms_min": 1000 * min(per_step),
            "cpu_ms_per_step": 1000 * statistics.median(cpu_per_step),
            "examples_per_s": recipe.batch / (ms / 1000), "step_memory_mb": max(peak, 0) / 2**20,
            "device_name": str(recipe.device)}


def measure(spec: dict, timeout: float = 900) -> dict:
    """Run one measurement in a fresh Python process; a failure comes back as ``{"error": ...}``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), TQDM_DISABLE="1")
    cmd = [sys.executable, os.path.join(HERE, "measure.py"), "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": tail}
    return json.loads(lines[-1])


def interleaved(specs: list[dict], rounds: int, log=print) -> list[dict]:
    """Every spec measured ``rounds`` times, the order rotated each round; one record per spec with the median
    over rounds of the per-round medians (and every round's figure)."""
    runs: list[list[dict]] = [[] for _ in specs]
    for r in range(rounds):
        order = list(range(len(specs)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            rec = measure(specs[i])
            runs[i].append(rec)
            what = rec.get("error") or f"{rec['ms_per_step']:.1f} ms/step"
            log(f"  round {r + 1}/{rounds} {_label(specs[i])}: {what}")
    out = []
    for spec, recs in zip(specs, runs):
        good = [x for x in recs if "error" not in x]
        if not good:
            out.append(recs[-1])
            continue
        rec = dict(good[0])
        rec["ms_per_step"] = statistics.median(x["ms_per_step"] for x in good)
        rec["ms_rounds"] = [round(x["ms_per_step"], 2) for x in good]
        rec["cpu_ms_per_step"] = statistics.median(x["cpu_ms_per_step"] for x in good)
        rec["examples_per_s"] = rec["batch"] / (rec["ms_per_step"] / 1000)
        rec["step_memory_mb"] = statistics.median(x["step_memory_mb"] for x in good)
        out.append(rec)
    return out


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Write a matplotlib figure, creating its folder (the benchmarks' plots)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def _label(spec: dict) -> str:
    what = spec.get("variant") or " ".join([spec["library"]] + list(spec.get("overrides") or []))
    sizes = " ".join(f"{k} {spec[k]}" for k in ("resolution", "frames") if k in spec)
    return f"{spec.get('task', 'digits')} {what} batch {spec['batch']}{' ' + sizes if sizes else ''}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, HERE)
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: measure.py --worker SPEC (used by bench_throughput.py and bench_scaling.py)")
