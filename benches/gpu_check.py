"""GPU check: every CUDA path of the library end to end, with step times and peak memory (under 5 min on one GPU).

    python benches/gpu_check.py --json runs/gpu/check.json --markdown runs/gpu/check.md    # on a CUDA machine
    python benches/gpu_check.py --dry-run                                                 # CPU, tiny, no timings
    bash benches/gpu_check.sh                                                             # the same, wrapped

What it runs (each an entry of :func:`cases`; a failing entry is recorded with its error and the others go on):

- **training steps** of the digits U-Net (``configs/digits.yaml``) and the video space-time U-Net
  (``configs/video.yaml``) through the trainer's own :func:`~diffusionlab.training.trainer.build_parts` and
  :func:`~diffusionlab.training.trainer.train_step`, for every precision in :data:`PRECISIONS` (one entry each;
  fp16 runs with its gradient scaler; a precision a trainer's config refuses would be reported as "not supported by
  this trainer version") and with ``train.compile`` on; digits with ``train.accumulate: 4`` (four micro-batches of
  32 per step of 128);
- **the CIFAR-10 recipe** (``configs/cifar10.yaml``: DDPM's 35.7M-parameter U-Net at batch 128) on a random
  CIFAR-10 binary folder written to a temporary directory (50000 records; 64 in ``--dry-run``, with the network
  shrunk): bf16 and fp16 in memory, and bf16 streamed by the DataLoader (2 worker processes, pinned memory,
  prefetch 2) -- the step times then include the loader;
- **an image folder streamed**: 1024 PNGs (32 x 32) read by 2 workers into pinned memory for the digits-sized U-Net
  at 32 x 32 (3 channels), against the same folder in memory;
- **sampling**: 50-step DDIM of the digits model (:func:`~diffusionlab.training.sampling.generate`);
- **DDP**: one training step under DistributedDataParallel in a one-process NCCL group, no torchrun (the group is
  initialised here on 127.0.0.1; gloo in ``--dry-run``), through the trainer's
  :class:`~diffusionlab.training.distributed.Distributed`;
- **likelihood**: the probability-flow ODE NLL (exact divergence, dopri5) of a few digits under the VP-SDE model of
  ``configs/digits_sde.yaml`` (:func:`~diffusionlab.likelihood.evaluate.nll_metrics`).

The networks are freshly initialised: the check is about the code paths, their speed and memory, not about
sample quality. Times are the median of ``--steps`` timed steps after ``--warmup`` untimed ones (compile happens
in the warm-up), each bracketed by ``torch.cuda.synchronize()``; peak memory is
``torch.cuda.max_memory_allocated`` since the entry started. ``--dry-run`` runs the same code paths on the CPU at
tiny sizes (batch 8, 2 steps; ``compile`` with the ``eager`` dynamo backend, which traces the graph but skips
inductor's C++ build) and reports no times: it exists so that the script cannot rot (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

#: one entry per precision; the trainer's config decides which it accepts
PRECISIONS = ("fp32", "bf16", "fp16")
NOT_SUPPORTED = "not supported by this trainer version"


# ---- helpers ------------------------------------------------------------------------------------------------------
def _config(name: str, overrides: list[str]):
    from diffusionlab.commands import packaged_config
    from diffusionlab.training.config import load_config

    return load_config(packaged_config(name), overrides)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``steps`` times timed (seconds each, synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _memory(device: torch.device, out: dict):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


@contextlib.contextmanager
def _eager_compile(active: bool):
    """In ``--dry-run``: ``nn.Module.compile`` with dynamo's ``eager`` backend (module docstring)."""
    if not active:
        yield
        return
    orig = torch.nn.Module.compile
    torch.nn.Module.compile = functools.partialmethod(orig, backend="eager")
    try:
        yield
    finally:
        torch.nn.Module.compile = orig


#: the CIFAR-10 recipe's network shrunk for --dry-run
TINY_CIFAR = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.groups=4"]
#: the digits-sized U-Net on 32 x 32 RGB images of a folder
FOLDER_MODEL = ["model.name=unet", "model.base_channels=24", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
                "model.attn_resolutions=[16]", "model.conv_resample=false"]


def _sizes(dry: bool) -> dict:
    if dry:
        return {"digits_batch": 8, "video_batch": 4, "video_overrides": ["data.num=8", "data.frames=4",
                                                                          "data.size=8"],
                "sample_num": 8, "sample_steps": 3, "nll_points": 2, "nll_tol": 1e-2, "cifar_records": 64,
                "cifar_batch": 8, "cifar_overrides": TINY_CIFAR, "pngs": 16, "folder_batch": 8}
    return {"digits_batch": 128, "video_batch": 16, "video_overrides": [], "sample_num": 1000, "sample_steps": 50,
            "nll_points": 8, "nll_tol": 1e-5, "cifar_records": 50000, "cifar_batch": 128, "cifar_overrides": [],
            "pngs": 1024, "folder_batch": 128}


@functools.lru_cache(maxsize=None)
def _scratch() -> str:
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="gpu_check.")
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=None)
def fake_cifar(records: int) -> str:
    """A CIFAR-10 binary folder of random records (1 label byte + 3072 pixel bytes) in a scratch directory."""
    import numpy as np

    folder = Path(_scratch()) / f"cifar-{records}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = -(-records // 5)
    for i in range(1, 6):
        rec = np.concatenate([rng.integers(0, 10, (per, 1)), rng.integers(0, 256, (per, 3072))], axis=1)
        (folder / f"data_batch_{i}.bin").write_bytes(rec.astype(np.uint8).tobytes())
    return str(folder)


@functools.lru_cache(maxsize=None)
def png_folder(n: int) -> str:
    """``n`` random 32 x 32 RGB PNGs in a scratch directory."""
    import imageio.v3 as iio
    import numpy as np

    folder = Path(_scratch()) / f"pngs-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        iio.imwrite(folder / f"{i:05d}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return str(folder)


# ---- entries ------------------------------------------------------------------------------------------------------
def train_entry(config: str, precision: str, compile_: bool, batch: int, extra: list[str], args) -> dict:
    """Training steps of ``config`` at ``precision`` (``compile_``: ``train.compile``)."""
    from diffusionlab.errors import DiffusionLabError
    from diffusionlab.training.trainer import build_parts, train_step

    overrides = [f"train.device={args.device}", f"train.precision={precision}", f"train.compile={str(compile_).lower()}",
                 f"train.batch_size={batch}", "train.threads=0", *extra]
    try:
        cfg = _config(config, overrides)
    except DiffusionLabError as e:
        if "precision" in str(e):
            return {"status": NOT_SUPPORTED, "detail": str(e)}
        raise
    out: dict = {}
    device = torch.device(args.device)
    with _memory(device, out), _eager_compile(args.dry_run and compile_):
        parts = build_parts(cfg, log=lambda *a: None)
        step = [0]

        def one():
            train_step(parts, step[0])
            step[0] += 1

        try:
            times = _timed(one, device, args.warmup, args.steps)
        finally:
            parts.batches.close()  # a streaming loader's workers
    out.update(status="ok", batch=batch, parameters=sum(p.numel() for p in parts.params), fused_adamw=parts.fused,
               step_ms=_ms(times, args), images_per_s=None if args.dry_run else round(batch / statistics.median(times), 1))
    if parts.batches.streaming:
        out["data"] = f"streamed, {cfg['data']['workers']} workers, pinned memory: {device.type == 'cuda'}"
    if parts.scaler is not None:
        out["grad_scale"] = parts.scaler.get_scale()
    if cfg["train"]["accumulate"] > 1:
        out["micro_batches"] = cfg["train"]["accumulate"]
    return out


def sample_entry(args, sizes) -> dict:
    """50-step DDIM samples of the (untrained) digits model."""
    from diffusionlab.training.sampling import generate
    from diffusionlab.training.trainer import build_parts

    cfg = _config("digits", [f"train.device={args.device}", "train.threads=0"])
    out: dict = {}
    device = torch.device(args.device)
    with _memory(device, out):
        parts = build_parts(cfg, log=lambda *a: None)
        scfg = dict(cfg["sample"], steps=sizes["sample_steps"])

        def one():
            generate(parts.model, scfg, num=sizes["sample_num"], seed=0, device=device, shape=parts.ds.sample_shape)

        times = _timed(one, device, 1 if not args.dry_run else 0, 1 if args.dry_run else 3)
    out.update(status="ok", num=sizes["sample_num"], sampler=f"{scfg['sampler']} {scfg['steps']} steps",
               seconds=None if args.dry_run else round(statistics.median(times), 3))
    return out


class _OneRank:
    """A :class:`~diffusionlab.training.distributed.Distributed` of world size 1 that still wraps in DDP and
    all-reduces (``enabled`` forced on): the DDP code path without torchrun."""

    @staticmethod
    def make(device: torch.device):
        from diffusionlab.training.distributed import Distributed

        class OneRank(Distributed):
            @property
            def enabled(self) -> bool:
                return True

        if device.type == "cuda":  # DDP's device_ids need an index, as Distributed.from_env gives it
            device = torch.device("cuda", device.index or 0)
            torch.cuda.set_device(device)
        return OneRank(rank=0, world_size=1, local_rank=0, device=device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_entry(args, sizes) -> dict:
    """One DDP training step (digits) in a one-process NCCL group (gloo on the CPU)."""
    import torch.distributed as tdist

    from diffusionlab.training.trainer import build_parts, train_step

    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    tdist.init_process_group(backend=backend, rank=0, world_size=1)
    out: dict = {}
    try:
        cfg = _config("digits", [f"train.device={args.device}", f"train.batch_size={sizes['digits_batch']}",
                                 "train.threads=0"])
        with _memory(device, out):
            parts = build_parts(cfg, dist=_OneRank.make(device), log=lambda *a: None)
            wrapped = type(parts.step_module).__name__
            step = [0]

            def one():
                train_step(parts, step[0])
                step[0] += 1

            times = _timed(one, device, args.warmup, args.steps)
    finally:
        tdist.destroy_process_group()
    out.update(status="ok", backend=backend, wrapped_in=wrapped, batch=sizes["digits_batch"], step_ms=_ms(times, args))
    return out


def nll_entry(args, sizes) -> dict:
    """ODE NLL (exact divergence) of a few test digits under the VP-SDE digits model, float64."""
    from diffusionlab.data import load_dataset
    from diffusionlab.likelihood.evaluate import nll_metrics
    from diffusionlab.training.trainer import build_parts

    cfg = _config("digits_sde", [f"train.device={args.device}", "train.threads=0"])
    device = torch.device(args.device)
    out: dict = {}
    with _memory(device, out):
        parts = build_parts(cfg, log=lambda *a: None)
        x = load_dataset({"name": "digits", "split": "test"}).data[:sizes["nll_points"]].to(device)
        t0 = time.perf_counter()
        res = nll_metrics(parts.model, x.double(), levels=None, batch_size=sizes["nll_points"],
                          rtol=sizes["nll_tol"], atol=sizes["nll_tol"])
        _sync(device)
        seconds = time.perf_counter() - t0
    out.update(status="ok", points=sizes["nll_points"], nfe=res["network_calls"], bits_per_dim=round(res["bits_per_dim"], 4),
               seconds=None if args.dry_run else round(seconds, 3))
    return out


def _ms(times: list[float], args):
    return None if args.dry_run else round(1000 * statistics.median(times), 2)


def _cifar_overrides(sizes: dict) -> list[str]:
    return [f"data.path={fake_cifar(sizes['cifar_records'])}", *sizes["cifar_overrides"]]


def _folder_overrides(sizes: dict) -> list[str]:
    return ["data.name=image_folder", f"data.path={png_folder(sizes['pngs'])}", "data.image_size=32", *FOLDER_MODEL]


def _lazy(entry, config, precision, compile_, batch, data, extra, args):
    """An entry whose data overrides are made (its files written) only when it runs."""
    return lambda: entry(config, precision, compile_, batch, [*data(), *extra], args)


def cases(args) -> list[tuple[str, callable]]:
    """``(name, thunk)`` for every entry of the check (module docstring)."""
    s = _sizes(args.dry_run)
    out = []
    for precision in PRECISIONS:
        out.append((f"train digits {precision}", functools.partial(train_entry, "digits", precision, False,
                                                                 s["digits_batch"], [], args)))
    for precision in ("fp32", "bf16", "fp16"):
        out.append((f"train digits {precision} compiled", functools.partial(train_entry, "digits", precision, True,
                                                                          s["digits_batch"], [], args)))
    out.append(("train digits fp32 accumulate 4", functools.partial(train_entry, "digits", "fp32", False,
                                                                    s["digits_batch"], ["train.accumulate=4"], args)))
    cifar = functools.partial(_cifar_overrides, s)
    for name, precision, extra in (("train cifar10 recipe bf16", "bf16", ["data.stream=false"]),
                                   ("train cifar10 recipe fp16 (scaler)", "fp16", ["data.stream=false"]),
                                   ("train cifar10 recipe bf16 streamed (2 workers)", "bf16",
                                    ["data.stream=true", "data.workers=2", "data.prefetch=2"])):
        out.append((name, _lazy(train_entry, "cifar10", precision, False, s["cifar_batch"], cifar, extra, args)))
    folder = functools.partial(_folder_overrides, s)
    for name, extra in (("train image folder in memory", ["data.stream=false"]),
                        ("train image folder streamed (2 workers)", ["data.stream=true", "data.workers=2"])):
        out.append((name, _lazy(train_entry, "digits", "bf16", False, s["folder_batch"], folder, extra, args)))
    for precision in PRECISIONS:
        out.append((f"train video {precision}", functools.partial(train_entry, "video", precision, False,
                                                                s["video_batch"], s["video_overrides"], args)))
    out.append(("train video bf16 compiled", functools.partial(train_entry, "video", "bf16", True, s["video_batch"],
                                                               s["video_overrides"], args)))
    out.append(("sample digits (ddim)", functools.partial(sample_entry, args, s)))
    out.append(("ddp step, 1-process group", functools.partial(ddp_entry, args, s)))
    out.append(("ode nll (exact divergence)", functools.partial(nll_entry, args, s)))
    return out


# ---- report -------------------------------------------------------------------------------------------------------
def environment(args) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "dry_run": args.dry_run, "steps": args.steps, "warmup": args.warmup}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(args.device))
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    return env


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"GPU check ({'DRY RUN on the CPU: no timing claims' if env['dry_run'] else env.get('gpu', env['device'])}"
             f"; torch {env['torch']})", "",
             "| entry | status | step ms (median) | other | peak MiB |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        other = {k: v for k, v in r.items() if k not in ("name", "status", "step_ms", "peak_mib", "detail", "error")}
        status = r["status"] if r["status"] != "error" else f"error: {r['error']}"
        step = r.get("step_ms")
        lines.append(f"| {r['name']} | {status} | {'-' if step is None else step} | "
                     f"{', '.join(f'{k}={v}' for k, v in other.items() if v is not None)} | "
                     f"{'-' if r.get('peak_mib') is None else r['peak_mib']} |")
    return "\n".join(lines)


def run(args) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    results = []
    for name, thunk in cases(args):
        if args.only and not any(k in name for k in args.only.split(",")):
            continue
        t0 = time.perf_counter()
        try:
            res = thunk()
        except Exception as e:  # noqa: BLE001 - a failing path is a result; the other entries still run
            res = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            if args.verbose:
                traceback.print_exc()
        res = {"name": name, **res, "wall_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(res), flush=True)
        results.append(res)
    return results, environment(args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no timing claims")
    p.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per entry (default 20; dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; dry run 1)")
    p.add_argument("--only", default=None, help="comma-separated substrings of the entries to run")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing entries")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.steps = args.steps or (2 if args.dry_run else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine, or use --dry-run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        torch.set_num_threads(1)
    results, env = run(args)
    md = markdown(results, env)
    print(md)
    for path, text in ((args.json, json.dumps({"environment": env, "results": results}, indent=1)), (args.markdown, md)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
