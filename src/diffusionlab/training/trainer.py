"""The training loop: AdamW with warm-up, gradient clipping, EMA, NaN guard, CSV log, checkpoints, exact resume.

Determinism: batch indices come from a CPU generator and all diffusion noise from a generator on the
training device, both seeded from ``train.seed`` and saved in every checkpoint together with torch's global
RNG states, the optimizer state and the EMA weights; ``--resume`` therefore continues the very same
trajectory (bit for bit on CPU).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.build import build_dataset, build_model, build_process
from diffusionlab.training.checkpoint import (
    atomic_write_bytes,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng,
    save_checkpoint,
    save_safetensors_atomic,
)
from diffusionlab.training.config import dump

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds", "bad_steps"]


class EMA:
    """Exponential moving average of a model's floating-point state, with the usual warm-up
    ``decay_k = min(decay, (1 + k) / (10 + k))`` so short runs are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.lerp_(v.detach(), 1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up over ``train.warmup`` steps, then constant or cosine decay to 0."""
    base, warm, total = cfg["lr"], cfg["warmup"], cfg["steps"]
    if warm and step < warm:
        return base * (step + 1) / warm
    if cfg.get("lr_schedule", "constant") == "cosine":
        frac = (step - warm) / max(1, total - warm)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return base


def _refuse_existing(out: Path) -> None:
    if list_checkpoints(out) or (out / "model.safetensors").exists():
        raise DiffusionLabError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def _check_model_takes(model, objective, ds, device) -> None:
    """One forward pass of the objective on two training samples, so a shape the model cannot take is a clear
    error before anything is written."""
    x0 = ds.data[:2].to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        with torch.no_grad():
            objective(model, x0, generator=gen)
    except DiffusionLabError:
        raise
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffusionLabError(
            f"the model cannot take samples of shape {tuple(ds.sample_shape)} from {ds.name!r}: {first}"
        ) from None


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DiffusionLabError(f"cannot write to output directory {out}: {e.strerror or e}") from None


def _rewrite_log(path: Path, upto: int) -> None:
    """Keep the log rows of steps <= ``upto`` (the resumed checkpoint), drop the rest."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


class _LossModule(torch.nn.Module):
    """The objective as one module call, so DistributedDataParallel sees the whole forward pass
    (objectives call ``model.predict``, which DDP's own forward would not wrap)."""

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.objective(self.model, x0, t=t, noise=noise)


def draw_inputs(objective, process, x0: torch.Tensor, generator: torch.Generator):
    """``(t, eps)`` for a whole (global) batch, drawn the way ``objective`` would draw them itself.

    The trainer draws them for the global batch and every rank takes its slice, so N processes follow the very
    trajectory of one process with the same global batch."""
    from diffusionlab.objectives.common import draw_noise, draw_t

    if hasattr(objective, "sample_t"):
        t = objective.sample_t(x0.shape[0], generator, x0.device)
    else:
        t = draw_t(process, x0, generator, getattr(objective, "t_min", 1e-5))
    return t, draw_noise(process, x0, generator)


def train(cfg: dict, out_dir: str | Path, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train the run described by the validated config ``cfg`` into ``out_dir``; return a summary dict.

    Under ``torchrun`` (``WORLD_SIZE > 1``) this is DistributedDataParallel training: gloo on CPU, NCCL on GPU;
    each rank takes its slice of the same global batch (``train.batch_size``, which must divide by the number of
    processes); rank 0 alone logs, checkpoints and writes the final weights.
    """
    from tqdm.auto import tqdm

    from diffusionlab.noise.fit import resolve_fitted_noise
    from diffusionlab.objectives import make_objective
    from diffusionlab.training.distributed import Distributed

    out = Path(out_dir)
    tcfg = cfg["train"]
    dist = Distributed.from_env(tcfg["device"])
    device = dist.device
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    torch.manual_seed(tcfg["seed"])
    bsz = tcfg["batch_size"]
    local = dist.local_batch(bsz)

    # build (and so validate) everything before the run directory is touched: bad input writes nothing
    ds = build_dataset(cfg)
    cfg = resolve_fitted_noise(cfg, ds.data, out, log)  # `process.noise: fitted`: fit C, save it with the run
    process = build_process(cfg["process"], ds.sample_shape)
    process.cov.check(ds.data[:1])
    model = build_model(cfg, ds.sample_shape, process, device)
    objective = make_objective(dict(cfg["objective"]), process)
    _check_model_takes(model, objective, ds, device)
    if dist.is_main:
        if not resume:
            _refuse_existing(out)
        _check_writable(out)
    dist.barrier()
    step_module = dist.wrap(_LossModule(model, objective))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    ema = EMA(model, tcfg["ema_decay"])
    # every rank holds the same generators: they draw the global batch, each rank uses its slice
    gen_data = torch.Generator().manual_seed(tcfg["seed"])
    gen_noise = torch.Generator(device=device).manual_seed(tcfg["seed"] + 1)
    generators = {"data": gen_data, "noise": gen_noise}
    autocast = _autocast(tcfg.get("precision", "fp32"), device)

    start = 0
    log_path = out / "log.csv"
    if resume:
        ck = load_latest_checkpoint(out, device=device, warn=log if dist.is_main else (lambda m: None))
        if ck is not None:
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["optimizer"])
            restore_rng(ck["state"], generators)
            start = ck["step"]
            if dist.is_main:
                log(f"diffusionlab: resuming {out} from step {start}")
        elif dist.is_main:
            log(f"diffusionlab: no intact checkpoint in {out}; starting from step 0")
    if dist.is_main:
        _rewrite_log(log_path, start)
        atomic_write_bytes(out / "config.yaml", dump(cfg).encode())

    data = ds.data.to(device)
    n, steps = data.shape[0], tcfg["steps"]
    mine = slice(dist.rank * local, (dist.rank + 1) * local)
    clip = tcfg["grad_clip"] if tcfg["grad_clip"] > 0 else float("inf")
    bad_in_row, bad_total, last_ckpt = 0, 0, start
    window, t0 = [], time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not (progress and dist.is_main), desc="train",
               dynamic_ncols=True)
    model.train()
    logf = open(log_path, "a", newline="") if dist.is_main else None
    writer = csv.DictWriter(logf, fieldnames=LOG_FIELDS) if logf else None
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tcfg)
            idx = torch.randint(n, (bsz,), generator=gen_data).to(device)
            x0 = data[idx]
            t, noise = draw_inputs(objective, process, x0, gen_noise)
            with autocast:
                loss = step_module(x0[mine], t[mine], noise[mine]).float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            loss = dist.mean(loss.detach())  # the global batch's loss: every rank takes the same decision below
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                bad_in_row += 1
                bad_total += 1
                if bad_in_row >= tcfg["max_bad_steps"]:
                    raise DiffusionLabError(
                        f"training stopped at step {step + 1}: {bad_in_row} consecutive steps with a non-finite loss "
                        f"or gradient ({bad_total} skipped in all); the last checkpoint (step {last_ckpt}) is intact -- "
                        "lower train.lr or check the data"
                    )
            else:
                bad_in_row = 0
                opt.step()
                ema.update(model, step)
                window.append(loss.item())
            if writer and ((step + 1) % tcfg["log_every"] == 0 or step + 1 == steps):
                mean_loss = sum(window) / len(window) if window else float("nan")
                writer.writerow({"step": step + 1, "loss": f"{mean_loss:.6g}", "lr": f"{lr_at(step, tcfg):.6g}",
                                 "grad_norm": f"{float(grad_norm):.6g}", "seconds": f"{time.time() - t0:.2f}",
                                 "bad_steps": bad_total})
                logf.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if (step + 1) % tcfg["log_every"] == 0:
                window = []
            if (step + 1) % tcfg["checkpoint_every"] == 0 or step + 1 == steps:
                if dist.is_main:
                    save_checkpoint(out, step + 1, model.state_dict(), ema.state_dict(), opt, generators,
                                    extra={"bad_steps": bad_total, "world_size": dist.world_size},
                                    keep=tcfg["keep_checkpoints"])
                last_ckpt = step + 1
            if dist.is_main and tcfg["sample_every"] and (step + 1) % tcfg["sample_every"] == 0:
                _periodic_samples(cfg, ds, model, ema, out, step + 1, device)
    finally:
        bar.close()
        if logf:
            logf.close()
    summary = {"steps": steps, "resumed_from": start, "seconds": round(time.time() - t0, 2), "bad_steps": bad_total,
               "device": str(device), "world_size": dist.world_size, "parameters": sum(p.numel() for p in params)}
    if dist.is_main:
        save_safetensors_atomic(ema.state_dict(), out / "model.safetensors", metadata={"weights": "ema"})
        save_safetensors_atomic(model.state_dict(), out / "model_raw.safetensors", metadata={"weights": "raw"})
        atomic_write_bytes(out / "train_summary.json", json.dumps(summary, indent=2).encode())
        try:
            from diffusionlab.plotting import plot_loss

            plot_loss(log_path, out / "loss.png")
        except Exception as e:  # a plot must never lose a finished run
            log(f"diffusionlab: warning: could not plot the loss curve: {e}")
    dist.barrier()
    return summary


def _autocast(precision: str, device: torch.device):
    """``bf16``: autocast the forward pass to bfloat16 (GPU; on CPU it is allowed but rarely faster);
    ``fp32``: a no-op context."""
    import contextlib

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _periodic_samples(cfg, ds, model, ema, out: Path, step: int, device) -> None:
    """A small grid/scatter from the EMA weights during training (``train.sample_every``)."""
    import copy

    from diffusionlab.plotting import save_samples
    from diffusionlab.training.sampling import generate

    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(ema.state_dict())
    x = generate(ema_model, cfg["sample"], num=min(64, cfg["sample"]["num"]), seed=step, device=device,
                 shape=ds.sample_shape)
    save_samples(ds.to_display(x.cpu()), ds.kind, out / "samples" / f"step_{step:08d}.png")
