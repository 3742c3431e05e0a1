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
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.build import build_dataset, build_model, build_process
from diffusionlab.io import atomic_write_bytes, save_safetensors_atomic
from diffusionlab.training.checkpoint import list_checkpoints, load_latest_checkpoint, restore_rng, save_checkpoint
from diffusionlab.training.config import dump

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds", "bad_steps"]


class EMA:
    """Exponential moving average of a model's floating-point state, with the usual warm-up
    ``decay_k = min(decay, (1 + k) / (10 + k))`` so short runs are not dominated by the initial weights.

    ``update(..., ok=flag)`` takes a 0-dim device tensor (1 = a good step, 0 = a skipped one) and weights the update
    by it, so a skipped step leaves the average unchanged without the host reading the flag."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, ok: torch.Tensor | None = None) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        weight = 1.0 - d if ok is None else (1.0 - d) * ok
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.lerp_(v.detach(), weight.to(s.dtype) if torch.is_tensor(weight) else weight)
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


def make_optimizer(params: list, tcfg: dict) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where it exists for the parameters' device and dtype (CPU and CUDA).

    The fused kernel is one pass over all parameters (on one CPU thread the digits U-Net's update takes 0.9 ms
    instead of 6.7 ms) and takes a ``found_inf`` flag that skips the whole update on the device, which lets
    :func:`train_step` skip a non-finite step without the host reading anything."""
    kw = {"lr": tcfg["lr"], "weight_decay": tcfg["weight_decay"]}
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, **kw)


@dataclass
class TrainParts:
    """Everything one optimizer step touches; built by :func:`build_parts`, stepped by :func:`train_step`
    (the training benchmarks time exactly this step)."""

    cfg: dict
    ds: object
    process: object
    model: torch.nn.Module
    objective: object
    step_module: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    ema: EMA
    data: torch.Tensor
    generators: dict
    dist: object
    autocast: object
    mine: slice
    clip: float
    memory_format: torch.memory_format
    init: dict | None = None  #: what ``train.init_from`` loaded (written to ``init.json``)

    @property
    def fused(self) -> bool:
        return bool(self.opt.defaults.get("fused"))


def build_parts(cfg: dict, out: Path | None = None, dist=None, log=print) -> TrainParts:
    """Build (and so validate) the data, process, model, objective, optimizer, EMA and generators of a run.

    Nothing is written except, for ``process.noise: fitted``, the fitted covariance into ``out``."""
    from diffusionlab.noise.fit import resolve_fitted_noise
    from diffusionlab.objectives import make_objective
    from diffusionlab.training.distributed import Distributed
    from diffusionlab.training.init import init_model
    from diffusionlab.training.sampling import check_sample_section

    tcfg = cfg["train"]
    dist = dist or Distributed.from_env(tcfg["device"])
    device = dist.device
    torch.manual_seed(tcfg["seed"])
    ds = build_dataset(cfg)
    if out is not None:
        cfg = resolve_fitted_noise(cfg, ds.data, out, log)  # `process.noise: fitted`: fit C, save it with the run
    process = build_process(cfg["process"], ds.sample_shape)
    process.cov.check(ds.data[:1])
    check_sample_section(cfg["sample"], process)  # a bad sample: section fails now, not after training
    model = build_model(cfg, ds.sample_shape, process, device)
    init = init_model(model, cfg, ds.sample_shape, log)  # train.init_from: inflate / load a run's weights
    objective = make_objective(dict(cfg["objective"]), process)
    _check_model_takes(model, objective, ds, device)
    memory_format = _memory_format(tcfg, ds)
    model = model.to(memory_format=_model_format(memory_format))
    if tcfg.get("compile"):
        model.net.compile()  # in place: parameter names (checkpoints) stay those of the eager network
    params = [p for p in model.parameters() if p.requires_grad]
    local = dist.local_batch(tcfg["batch_size"])
    return TrainParts(
        cfg=cfg, ds=ds, process=process, model=model, objective=objective,
        step_module=dist.wrap(_LossModule(model, objective)), params=params, opt=make_optimizer(params, tcfg),
        ema=EMA(model, tcfg["ema_decay"]), data=ds.data.to(device),
        # every rank holds the same generators: they draw the global batch, each rank uses its slice
        generators={"data": torch.Generator().manual_seed(tcfg["seed"]),
                    "noise": torch.Generator(device=device).manual_seed(tcfg["seed"] + 1)},
        dist=dist, autocast=_autocast(tcfg.get("precision", "fp32"), device),
        mine=slice(dist.rank * local, (dist.rank + 1) * local),
        clip=tcfg["grad_clip"] if tcfg["grad_clip"] > 0 else float("inf"), memory_format=memory_format, init=init,
    )


def _memory_format(tcfg: dict, ds) -> torch.memory_format:
    """The batches' memory format: channels-last for images ``(C, H, W)``, channels-last-3d for videos
    ``(C, F, H, W)`` (the space-time U-Net then runs its frames channels-last), contiguous without
    ``train.channels_last``."""
    if not tcfg.get("channels_last"):
        return torch.contiguous_format
    if len(ds.sample_shape) == 3:
        return torch.channels_last
    if len(ds.sample_shape) == 4:
        return torch.channels_last_3d
    raise DiffusionLabError(
        f"train.channels_last applies to images (C, H, W) and videos (C, F, H, W); {ds.name!r} samples have shape "
        f"{tuple(ds.sample_shape)}"
    )


def _model_format(memory_format: torch.memory_format) -> torch.memory_format:
    """The weights' format for batches in ``memory_format``: 4-D conv weights channels-last for images and videos
    (the space-time U-Net's convolutions are 2-D)."""
    return torch.contiguous_format if memory_format == torch.contiguous_format else torch.channels_last


def train_step(p: TrainParts, step: int) -> torch.Tensor:
    """One optimizer step at index ``step``; returns the device tensor ``[loss, grad_norm, ok]`` and never waits
    for the device: a non-finite loss or gradient (``ok = 0``) skips the AdamW and EMA updates on the device
    (the fused kernel's ``found_inf``; the unfused fallback reads the flag)."""
    tcfg = p.cfg["train"]
    for g in p.opt.param_groups:
        g["lr"] = lr_at(step, tcfg)
    device = p.data.device
    idx = torch.randint(p.data.shape[0], (tcfg["batch_size"],), generator=p.generators["data"])
    x0 = p.data[idx.to(device, non_blocking=True)]
    t, noise = draw_inputs(p.objective, p.process, x0, p.generators["noise"])
    x0, noise = (v[p.mine].contiguous(memory_format=p.memory_format) for v in (x0, noise))
    with p.autocast:
        loss = p.step_module(x0, t[p.mine], noise).float().mean()
    p.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(p.params, p.clip)
    loss = p.dist.mean(loss.detach())  # the global batch's loss: every rank takes the same decision
    ok = (torch.isfinite(loss) & torch.isfinite(grad_norm)).float()
    if p.fused:
        p.opt.found_inf = 1.0 - ok  # read by the fused AdamW kernel: a nonzero flag skips the whole update
        p.opt.step()
    elif ok.item():
        p.opt.step()
    p.ema.update(p.model, step, ok=ok)
    return torch.stack([loss, grad_norm.float(), ok])


class _Lagged:
    """Host copies of each step's ``[loss, grad_norm, ok]``, read one step late: the copy of step k is queued
    without waiting and read after step k + 1 has been queued, so the device never idles for the host (on the
    CPU the copy is immediate). :meth:`flush` reads everything pending (before logs and checkpoints)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []

    def push(self, step: int, stats: torch.Tensor) -> list:
        host = stats.to("cpu", non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, host, event))
        return self.flush(keep=1)

    def flush(self, keep: int = 0) -> list:
        ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        out = []
        for step, host, event in ready:
            if event is not None:
                event.synchronize()
            out.append((step, *host.tolist()))
        return out


def train(cfg: dict, out_dir: str | Path, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train the run described by the validated config ``cfg`` into ``out_dir``; return a summary dict.

    Under ``torchrun`` (``WORLD_SIZE > 1``) this is DistributedDataParallel training: gloo on CPU, NCCL on GPU;
    each rank takes its slice of the same global batch (``train.batch_size``, which must divide by the number of
    processes); rank 0 alone logs, checkpoints and writes the final weights.
    """
    from diffusionlab.progress import progress as progress_display
    from diffusionlab.training.distributed import Distributed

    out = Path(out_dir)
    tcfg = cfg["train"]
    dist = Distributed.from_env(tcfg["device"])
    device = dist.device
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    if dist.is_main and not resume:
        _refuse_existing(out)  # before anything (a fitted noise covariance) is written into ``out``
    # build (and so validate) everything before the run directory is touched: bad input writes nothing
    p = build_parts(cfg, out, dist, log)
    cfg = p.cfg
    if dist.is_main:
        _check_writable(out)
    dist.barrier()

    start = 0
    log_path = out / "log.csv"
    if resume:
        ck = load_latest_checkpoint(out, device=device, warn=log if dist.is_main else (lambda m: None))
        if ck is not None:
            p.model.load_state_dict(ck["model"])
            p.ema.load_state_dict(ck["ema"])
            p.opt.load_state_dict(ck["optimizer"])
            restore_rng(ck["state"], p.generators)
            start = ck["step"]
            if dist.is_main:
                log(f"diffusionlab: resuming {out} from step {start}")
        elif dist.is_main:
            log(f"diffusionlab: no intact checkpoint in {out}; starting from step 0")
    if dist.is_main:
        _rewrite_log(log_path, start)
        atomic_write_bytes(out / "config.yaml", dump(cfg).encode())
        if p.init is not None:  # the provenance of train.init_from
            record = {k: v for k, v in p.init.items() if k != "source_config"}
            atomic_write_bytes(out / "init.json", json.dumps(record, indent=2).encode())
            atomic_write_bytes(out / "init_config.yaml", dump(p.init["source_config"]).encode())

    steps = tcfg["steps"]
    bad = {"in_row": 0, "total": 0}
    last_ckpt = start
    window, last_grad, t0 = [], float("nan"), time.time()
    lagged = _Lagged(device)

    def account(rows) -> None:
        nonlocal last_grad
        for step, loss, grad_norm, ok in rows:
            last_grad = grad_norm
            if ok:
                bad["in_row"] = 0
                window.append(loss)
                continue
            bad["in_row"] += 1
            bad["total"] += 1
            if bad["in_row"] >= tcfg["max_bad_steps"]:
                raise DiffusionLabError(
                    f"training stopped at step {step + 1}: {bad['in_row']} consecutive steps with a non-finite loss "
                    f"or gradient ({bad['total']} skipped in all); the last checkpoint (step {last_ckpt}) is intact -- "
                    "lower train.lr or check the data"
                )

    bar = progress_display(range(start, steps), total=steps, initial=start, desc="train",
                           enabled=progress and dist.is_main)
    p.model.train()
    logf = open(log_path, "a", newline="") if dist.is_main else None
    writer = csv.DictWriter(logf, fieldnames=LOG_FIELDS) if logf else None
    try:
        for step in bar:
            account(lagged.push(step, train_step(p, step)))
            log_now = (step + 1) % tcfg["log_every"] == 0 or step + 1 == steps
            ckpt_now = (step + 1) % tcfg["checkpoint_every"] == 0 or step + 1 == steps
            if log_now or ckpt_now:
                account(lagged.flush())
            if writer and log_now:
                mean_loss = sum(window) / len(window) if window else float("nan")
                writer.writerow({"step": step + 1, "loss": f"{mean_loss:.6g}", "lr": f"{lr_at(step, tcfg):.6g}",
                                 "grad_norm": f"{last_grad:.6g}", "seconds": f"{time.time() - t0:.2f}",
                                 "bad_steps": bad["total"]})
                logf.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if (step + 1) % tcfg["log_every"] == 0:
                window = []
            if ckpt_now:
                if dist.is_main:
                    save_checkpoint(out, step + 1, p.model.state_dict(), p.ema.state_dict(), p.opt, p.generators,
                                    extra={"bad_steps": bad["total"], "world_size": dist.world_size},
                                    keep=tcfg["keep_checkpoints"])
                last_ckpt = step + 1
            if dist.is_main and tcfg["sample_every"] and (step + 1) % tcfg["sample_every"] == 0:
                _periodic_samples(cfg, p.ds, p.model, p.ema, out, step + 1, device)
    finally:
        bar.close()
        if logf:
            logf.close()
    summary = {"steps": steps, "resumed_from": start, "seconds": round(time.time() - t0, 2), "bad_steps": bad["total"],
               "device": str(device), "world_size": dist.world_size, "parameters": sum(q.numel() for q in p.params)}
    if dist.is_main:
        save_safetensors_atomic(p.ema.state_dict(), out / "model.safetensors", metadata={"weights": "ema"})
        save_safetensors_atomic(p.model.state_dict(), out / "model_raw.safetensors", metadata={"weights": "raw"})
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
