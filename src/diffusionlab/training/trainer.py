"""The training loop: AdamW with warm-up and schedules, gradient clipping and accumulation, fp32 / bf16 / fp16
(with a gradient scaler), EMA, NaN guard, CSV log and TensorBoard, checkpoints, exact resume.

Determinism: the samples of each step's batch are a function of ``train.seed`` and the step
(:mod:`diffusionlab.data.order`; in memory or streamed, :mod:`diffusionlab.training.batches`), and all diffusion
noise comes from a generator on the training device seeded from ``train.seed``, saved in every checkpoint together
with torch's global RNG states, the optimizer state (in its parameters' memory format), the gradient scaler's
state, the EMA weights and the loop's own state (the losses of the log window in progress, the skipped-step
count, the position in the data stream); ``--resume`` therefore continues the very same trajectory and the very
same log (bit for bit on CPU).

Nothing is lost (:mod:`diffusionlab.training.rundir`, :mod:`diffusionlab.training.stop`): everything is built and
validated before the run directory is touched; one process writes a run (an exclusive lock); ``--resume`` refuses
a changed config outside the keys that may change; SIGTERM, SIGINT and ``--max-minutes`` stop after a checkpoint
with exit status 0; an operating-system error (a full disk, a file-size limit) is one line that names the intact
checkpoint; skipped (non-finite) steps are counted and reported, and a run without a single finite step fails.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusionlab.data.order import epoch_of
from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import self_condition_rows
from diffusionlab.threads import set_threads
from diffusionlab.training.build import build_model, build_process
from diffusionlab.io import atomic_path, atomic_write_bytes, clean_stale_temporaries, os_error, save_safetensors_atomic
from diffusionlab.training.checkpoint import (CKPT_DIR, checkpoint_name, list_checkpoints, load_latest_checkpoint,
                                              restore_optimizer, restore_rng, save_checkpoint, stale_checkpoint_temp)
from diffusionlab.training.config import dump
from diffusionlab.training.labels import batch_labels, training_labels
from diffusionlab.training.schedule import lr_at  # noqa: F401 (the trainer's schedule; imported from here too)

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds", "bad_steps"]
#: warn when more than this fraction of the steps of a log window were skipped
SKIP_WARN_FRACTION = 0.01


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


def _refuse_existing(out: Path) -> None:
    if list_checkpoints(out) or (out / "model.safetensors").exists():
        raise DiffusionLabError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def _check_model_takes(model, objective, ds, first: torch.Tensor, device, labels=None) -> None:
    """One forward pass of the objective on a few training samples (``first``, with their class labels for a
    class-conditional net), so a shape the model cannot take is a clear error before anything is written."""
    x0 = first.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    extra = {} if labels is None else {"labels": labels}  # class labels (training/labels.py)
    try:
        with torch.no_grad():
            loss = objective(model, x0, generator=gen, **extra)
    except DiffusionLabError:
        raise
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffusionLabError(
            f"the model cannot take samples of shape {tuple(ds.sample_shape)} from {ds.name!r}: {first}"
        ) from None
    if not bool(torch.isfinite(loss).any()):
        top = float(x0.abs().max())
        raise DiffusionLabError(f"the loss at initialisation is not finite for any of the first {len(x0)} training "
                                f"samples of {ds.name!r} (largest |x| = {top:.3g}): no step could train; check the "
                                "data's scale and the process and noise settings")


class _Unchanged(Exception):
    """Leaves :func:`_rewrite_log`'s atomic block when nothing was dropped (the old file stays)."""


def _rewrite_log(path: Path, upto: int) -> None:
    """Keep the log rows of steps <= ``upto`` (the resumed checkpoint), drop the rest (and any malformed row, e.g.
    one cut by a kill). The new log replaces the old one atomically (:func:`diffusionlab.io.atomic_path`): a kill
    at any moment leaves the old log or the new one, never a truncated one. Nothing is rewritten when nothing is
    dropped."""
    if not path.exists():
        atomic_write_bytes(path, (",".join(LOG_FIELDS) + "\r\n").encode())
        return
    try:
        with atomic_path(path) as tmp:
            dropped = 0

            def clean(lines):  # garbage (NUL bytes, undecodable bytes) drops its own line only
                nonlocal dropped
                for line in lines:
                    if "\0" in line or "\ufffd" in line:
                        dropped += 1
                    else:
                        yield line

            with open(path, newline="", errors="replace") as src, open(tmp, "w", newline="") as dst:
                reader = csv.DictReader(clean(src))
                writer = csv.DictWriter(dst, fieldnames=LOG_FIELDS, extrasaction="ignore")
                writer.writeheader()
                try:
                    dropped += reader.fieldnames != LOG_FIELDS
                    for row in reader:
                        try:
                            ok = all(row.get(k) not in (None, "") for k in LOG_FIELDS) and int(row["step"]) <= upto
                        except ValueError:
                            ok = False
                        if ok:
                            writer.writerow(row)
                        else:
                            dropped += 1
                except (csv.Error, UnicodeDecodeError):  # garbage (NUL bytes, binary): keep the rows read so far
                    dropped += 1
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 1))
                dropped += f.read(1) not in (b"\n", b"")  # a row cut by a kill: appending would glue onto it
            if not dropped:
                raise _Unchanged
    except _Unchanged:
        pass


class _LossModule(torch.nn.Module):
    """The objective as one module call, so DistributedDataParallel sees the whole forward pass
    (objectives call ``model.predict``, which DDP's own forward would not wrap)."""

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, labels=None,
                self_cond_rows=None) -> torch.Tensor:
        kw = {} if labels is None else {"labels": labels}  # class-conditional (training/labels.py)
        if self_cond_rows is not None:  # a self-conditioned model: the rows fed its estimate (parametrization.py)
            kw["self_cond_rows"] = self_cond_rows
        return self.objective(self.model, x0, t=t, noise=noise, **kw)


def _rows_kw(rows, sl: slice) -> dict:
    return {} if rows is None else {"self_cond_rows": rows[sl]}


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
    data: torch.Tensor | None  # the whole training set on the device (None when streamed)
    generators: dict
    dist: object
    autocast: object
    mine: slice
    clip: float
    memory_format: torch.memory_format
    fitted_noise: object = None
    batches: object = None  # diffusionlab.training.batches: MemoryBatches or StreamBatches
    scaler: object = None  # torch.amp.GradScaler (fp16)
    accumulate: int = 1
    labels: torch.Tensor | None = None  # class labels of the data, on the device (training/labels.py)
    init: dict | None = None  #: what ``train.init_from`` loaded (written to ``init.json``)

    @property
    def fused(self) -> bool:
        return bool(self.opt.defaults.get("fused"))


def build_parts(cfg: dict, out: Path | None = None, dist=None, log=print) -> TrainParts:
    """Build (and so validate) the data, process, model, objective, optimizer, EMA and generators of a run.

    Nothing is written. For ``process.noise: fitted`` (and an ``out`` directory) the covariance is fitted to the
    data in memory (``fitted_noise``) and the config names the file the trainer writes it to once the run starts
    (``file:noise_covariance.safetensors`` in ``out``). Under ``torchrun`` the process group is joined only after
    everything is validated (:meth:`~diffusionlab.training.distributed.Distributed.start`)."""
    from diffusionlab.noise.fit import fit_noise, is_fitted_spec
    from diffusionlab.objectives import OBJECTIVES, make_objective
    from diffusionlab.training.distributed import Distributed
    from diffusionlab.training.init import init_model
    from diffusionlab.training.sampling import check_sample_section

    from diffusionlab.training.batches import open_training_data
    from diffusionlab.training.precision import autocast, grad_scaler

    tcfg = cfg["train"]
    dist = dist or Distributed.from_env(tcfg["device"])
    device = dist.device
    torch.manual_seed(tcfg["seed"])
    local = dist.local_batch(tcfg["batch_size"])
    if local % tcfg["accumulate"]:
        raise DiffusionLabError(f"the batch of each of the {dist.world_size} processes ({local}) does not divide into "
                                f"train.accumulate = {tcfg['accumulate']} micro-batches; choose a train.batch_size "
                                "that is a multiple of both")
    mine = slice(dist.rank * local, (dist.rank + 1) * local)
    ds, batches, first = open_training_data(cfg, device, tcfg["batch_size"], mine, log)
    fitted = None
    if out is not None:
        if batches.streaming and is_fitted_spec(cfg["process"].get("noise")):
            raise DiffusionLabError("process.noise: fitted fits the covariance to the whole training set, which a "
                                    "streamed set does not hold in memory: set data.stream=false, or fit it once "
                                    "and give it as file:PATH")
        cfg, fitted = fit_noise(cfg, None if batches.streaming else ds.data, out)  # `fitted`: fit C (written later)
    process = build_process(cfg["process"], ds.sample_shape, cov=fitted)
    process.cov.check(first[:1])
    check_sample_section(cfg["sample"], process)  # a bad sample: section fails now, not after training
    model = build_model(cfg, ds.sample_shape, process, device)
    init = init_model(model, cfg, ds.sample_shape, log)  # train.init_from: inflate / load a run's weights
    objective = make_objective(dict(cfg["objective"]), process)
    if model.self_condition and not getattr(objective, "self_conditioning", False):
        able = [n for n in OBJECTIVES.names() if getattr(OBJECTIVES.get(n).factory, "self_conditioning", False)]
        raise DiffusionLabError(f"parametrization.self_condition trains with objective {' or '.join(able)} (they "
                                f"feed the model its x_0 estimate); objective {cfg['objective']['name']!r} does not")
    labels = training_labels(ds, model, tcfg, device, streaming=batches.streaming)  # training/labels.py
    _check_model_takes(model, objective, ds, first, device, None if labels is None else labels[: first.shape[0]])
    memory_format = _memory_format(tcfg, ds)
    model = model.to(memory_format=_model_format(memory_format))
    if tcfg.get("compile"):
        model.net.compile()  # in place: parameter names (checkpoints) stay those of the eager network
    params = [p for p in model.parameters() if p.requires_grad]
    dist.start()  # everything is valid: join the process group (torchrun), which DDP's wrapper needs
    return TrainParts(
        cfg=cfg, ds=ds, process=process, model=model, objective=objective,
        step_module=dist.wrap(_LossModule(model, objective)), params=params, opt=make_optimizer(params, tcfg),
        ema=EMA(model, tcfg["ema_decay"]), data=getattr(batches, "data", None),
        # every rank holds the same generator: it draws the global batch's noise, each rank uses its slice (the
        # batch's samples themselves are a function of the seed and the step: diffusionlab.data.order)
        generators={"noise": torch.Generator(device=device).manual_seed(tcfg["seed"] + 1)},
        dist=dist, autocast=autocast(tcfg["precision"], device), mine=mine,
        clip=tcfg["grad_clip"] if tcfg["grad_clip"] > 0 else float("inf"), memory_format=memory_format,
        fitted_noise=fitted, batches=batches, scaler=grad_scaler(tcfg["precision"], device),
        accumulate=tcfg["accumulate"], labels=labels, init=init,
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


def _backward(p: TrainParts, loss: torch.Tensor) -> None:
    (p.scaler.scale(loss) if p.scaler is not None else loss).backward()


def train_step(p: TrainParts, step: int, x0: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step at index ``step`` (on ``x0``, the rank's slice of the step's batch, when given; else
    fetched); returns the device tensor ``[loss, grad_norm, ok]`` and never waits for the device: a non-finite loss
    or gradient (``ok = 0``; under fp16 a gradient that overflowed the scaler's scale) skips the AdamW and EMA
    updates on the device (the fused kernel's ``found_inf``; the unfused fallback reads the flag).

    With ``train.accumulate = k`` the slice is run as ``k`` micro-batches, each loss divided by ``k`` and the
    gradients summed before one update: the gradient of the whole batch's mean loss (up to the rounding of the
    sum's order), so the trajectory is that of one batch of the same size. The diffusion times and noise are drawn
    for the whole global batch at once, as without accumulation."""
    tcfg = p.cfg["train"]
    for g in p.opt.param_groups:
        g["lr"] = lr_at(step, tcfg)
    if x0 is None:
        x0 = p.batches.get(step)
    like = x0.new_empty(()).expand(tcfg["batch_size"], *x0.shape[1:])  # the global batch's shape, no storage
    t, noise = draw_inputs(p.objective, p.process, like, p.generators["noise"])
    x0, noise = x0.contiguous(memory_format=p.memory_format), noise[p.mine].contiguous(memory_format=p.memory_format)
    t = t[p.mine]
    # the rank's class labels with label dropout drawn for the global batch (training/labels.py); None: unconditional
    labels = batch_labels(p.labels, p.batches, step, tcfg["p_uncond"], p.model.num_classes, p.generators["noise"],
                          tcfg["batch_size"], p.mine)
    extra = () if labels is None else (labels,)
    # a self-conditioned model: the rows fed its own estimate, chosen for the global batch like t and the noise
    rows = self_condition_rows(tcfg["batch_size"], x0.device)[p.mine] if p.model.self_condition else None
    p.opt.zero_grad(set_to_none=True)
    k = p.accumulate
    if k == 1:
        with p.autocast:
            loss = p.step_module(x0, t, noise, *extra, **_rows_kw(rows, slice(None))).float().mean()
        _backward(p, loss)
        loss = loss.detach()
    else:
        m, total = x0.shape[0] // k, 0.0
        for j in range(k):
            sl = slice(j * m, (j + 1) * m)
            sync = j == k - 1 or not hasattr(p.step_module, "no_sync")  # DDP all-reduces once, after the last
            with contextlib.nullcontext() if sync else p.step_module.no_sync():
                with p.autocast:
                    part = p.step_module(x0[sl], t[sl], noise[sl], *(e[sl] for e in extra),
                                         **_rows_kw(rows, sl)).float().mean()
                _backward(p, part / k)
            total = total + part.detach()
        loss = total / k
    if p.scaler is not None:
        p.scaler.unscale_(p.opt)  # the true gradients (an overflow leaves inf or nan in them)
    grad_norm = torch.nn.utils.clip_grad_norm_(p.params, p.clip)
    loss = p.dist.mean(loss)  # the global batch's loss: every rank takes the same decision
    ok = (torch.isfinite(loss) & torch.isfinite(grad_norm)).float()
    if p.fused:
        p.opt.found_inf = 1.0 - ok  # read by the fused AdamW kernel: a nonzero flag skips the whole update
        p.opt.step()
    elif ok.item():
        p.opt.step()
    if p.scaler is not None:
        p.scaler.update()  # halves the scale after an overflow (the step above was skipped), grows it otherwise
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


def _saved_config(out: Path) -> dict | None:
    """The full config the run in ``out`` was trained with (its ``config.yaml``, resolved again so that options
    added since have their defaults); None when there is none."""
    from diffusionlab.training.config import load_config
    from diffusionlab.training.rundir import localize

    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        return localize(load_config(path), out)
    except DiffusionLabError as e:
        raise DiffusionLabError(f"cannot --resume {out}: its config.yaml does not resolve ({e})") from None


def _resume_config(cfg: dict, out: Path, log) -> dict:
    """``cfg`` checked against the run's saved config (:func:`diffusionlab.training.rundir.check_resume_config`);
    a ``fitted`` noise spec answered by the run's own fitted file is replaced by that file (not fitted again)."""
    from diffusionlab.noise.fit import FITTED_FILE, is_fitted_spec, read_covariance_meta
    from diffusionlab.training.rundir import check_resume_config

    saved = _saved_config(out)
    if saved is None:
        if list_checkpoints(out):
            log(f"diffusionlab: warning: {out} has checkpoints but no config.yaml; the config cannot be compared")
        return cfg
    spec = cfg["process"].get("noise")
    fitted = Path(os.path.abspath(out)) / FITTED_FILE
    if is_fitted_spec(spec) and saved["process"].get("noise") == f"file:{fitted}" and fitted.is_file():
        if read_covariance_meta(fitted).get("spec") == spec:
            cfg = {**cfg, "process": {**cfg["process"], "noise": saved["process"]["noise"]}}
    check_resume_config(saved, cfg, out)
    if saved["train"]["steps"] != cfg["train"]["steps"] and cfg["train"]["lr_schedule"] in ("cosine", "linear"):
        log(f"diffusionlab: warning: train.steps changed {saved['train']['steps']} -> {cfg['train']['steps']} with "
            f"lr_schedule {cfg['train']['lr_schedule']}: the schedule follows the new total from here on")
    return cfg


class _Loop:
    """The loop's own state, saved with every checkpoint (``extra``) so that a resumed run continues the very same
    log: the losses and skipped steps of the log window in progress, the last gradient norm, the skipped-step
    total and the training time so far."""

    def __init__(self, extra: dict | None = None):
        extra = extra or {}
        self.window: list[float] = [float(v) for v in extra.get("window", [])]
        self.window_steps = int(extra.get("window_steps", len(self.window)))
        self.window_bad = int(extra.get("window_bad", 0))
        self.bad_total = int(extra.get("bad_steps", 0))
        self.good_total = int(extra.get("good_steps", 0))
        self.last_grad = float(extra.get("last_grad", float("nan")))
        self.seconds_before = float(extra.get("seconds", 0.0))
        self.in_row = 0

    def extra(self, seconds: float, world_size: int) -> dict:
        return {"bad_steps": self.bad_total, "good_steps": self.good_total, "world_size": world_size,
                "window": self.window, "window_steps": self.window_steps, "window_bad": self.window_bad,
                "last_grad": self.last_grad, "seconds": round(self.seconds_before + seconds, 3)}

    def reset_window(self) -> None:
        self.window, self.window_steps, self.window_bad = [], 0, 0


def _fetch(p: TrainParts, step: int, dist) -> torch.Tensor | str:
    """The rank's batch of ``step``, or the message of a :class:`~diffusionlab.data.sources.DataError` (under
    torchrun every rank learns of any rank's failure, so all stop together)."""
    from diffusionlab.data.sources import DataError

    try:
        x0, failed = p.batches.get(step), None
    except DataError as e:
        x0, failed = None, str(e)
    if dist.enabled and dist.any(failed is not None) and failed is None:  # every rank asks, whatever its data path
        failed = "another process could not read its part of the batch (its message names the file)"
    return failed if failed is not None else x0


def _data_order(p: TrainParts, step: int) -> dict:
    """Where the run is in its data stream (saved in checkpoints; the order itself is a function of the seed and
    the step: :mod:`diffusionlab.data.order`)."""
    n = len(p.batches)
    batch = p.cfg["train"]["batch_size"]
    return {"data_order": {"order": "epochs", "size": n, "batch": batch, "samples": step * batch,
                           "epoch": round(epoch_of(step, batch, n), 4)}}


def _check_data_order(extra: dict, p: TrainParts, log) -> None:
    """Warn when a resumed checkpoint's data stream is not this run's: written before the epoch order (batches
    were drawn with replacement), or over a set of another size (files added to or removed from a folder)."""
    saved = extra.get("data_order")
    if not isinstance(saved, dict):
        log("diffusionlab: warning: this checkpoint was written by a diffusionlab that drew batches with "
            "replacement; from here on they follow the epoch order (diffusionlab.data.order), so the run is not the "
            "one an uninterrupted run of that version would have been")
    elif saved.get("size") != len(p.batches):
        log(f"diffusionlab: warning: the training set had {saved.get('size')} samples when the checkpoint was "
            f"written and has {len(p.batches)} now: the batches from here on follow the order of the new set")


def _rate(steps: int, batch: int, seconds: float) -> float | None:
    """Training throughput in samples per second."""
    return round(steps * batch / seconds, 2) if seconds > 0 and steps > 0 else None


def _scaler_note(p: TrainParts) -> str:
    if p.scaler is None:
        return ""
    return f": under fp16, gradients that overflowed the gradient scaler's scale (now {p.scaler.get_scale():g})"


def _intact_note(last_ckpt: int | None) -> str:
    return f"the last checkpoint (step {last_ckpt}) is intact" if last_ckpt is not None else "no checkpoint was written"


def train(cfg: dict, out_dir: str | Path, resume: bool = False, progress: bool = True, log=print,
          max_minutes: float | None = None) -> dict:
    """Train the run described by the validated config ``cfg`` into ``out_dir``; return a summary dict.

    Under ``torchrun`` (``WORLD_SIZE > 1``) this is DistributedDataParallel training: gloo on CPU, NCCL on GPU;
    each rank takes its slice of the same global batch (``train.batch_size``, which must divide by the number of
    processes); rank 0 alone logs, checkpoints and writes the final weights.

    SIGTERM, SIGINT and the ``max_minutes`` budget stop the run after the current step with a checkpoint; the
    summary then has ``stopped`` (the reason) and ``step`` (where it stopped), and ``--resume`` continues it.
    """
    from diffusionlab.training.stop import StopRequest

    with StopRequest(max_minutes) as stop:
        return _train(cfg, Path(out_dir), resume, progress, log, stop)


def _train(cfg: dict, out: Path, resume: bool, progress: bool, log, stop) -> dict:
    from diffusionlab.training.distributed import Distributed
    from diffusionlab.training.rundir import RunLock, absolute_noise_path, preflight

    tcfg = cfg["train"]
    dist = Distributed.from_env(tcfg["device"])  # the process group is joined once everything is validated
    device = dist.device
    if tcfg.get("threads"):
        set_threads(int(tcfg["threads"]), "train.threads")
        if dist.is_main and tcfg["threads"] > (os.cpu_count() or 1):
            log(f"diffusionlab: warning: train.threads = {tcfg['threads']} exceeds the {os.cpu_count()} CPU cores here")
    cfg = absolute_noise_path(cfg)
    if resume:
        cfg = _resume_config(cfg, out, log if dist.is_main else (lambda m: None))
    else:
        _refuse_existing(out)  # before anything is written into ``out``
    # build (and so validate) everything before the run directory is touched: bad input writes nothing
    p = build_parts(cfg, out, dist, log)
    cfg, tcfg = p.cfg, p.cfg["train"]
    if stop.requested():
        log(f"diffusionlab: stopped {stop.describe()} before training started; nothing was written")
        return {"steps": tcfg["steps"], "stopped": stop.reason, "step": None, "resumed_from": None}
    lock = RunLock(out) if dist.is_main else None
    try:
        if lock is not None:
            preflight(out, sum(q.numel() for q in p.params), tcfg["sample_every"], dist.world_size)
            lock.acquire()
            if not resume:
                _refuse_existing(out)  # another writer may have finished a run here meanwhile
            for d in (out, out / CKPT_DIR, out / "samples"):
                clean_stale_temporaries(d, extra=stale_checkpoint_temp if d.name == CKPT_DIR else None)
        dist.barrier()
        return _run(p, cfg, out, resume, progress, log, stop, dist)
    finally:
        if lock is not None:
            lock.release()


def _run(p: TrainParts, cfg: dict, out: Path, resume: bool, progress: bool, log, stop, dist) -> dict:
    """The steps of :func:`train` once the run directory is locked and checked."""
    from diffusionlab.noise.fit import FITTED_FILE, save_fitted_noise
    from diffusionlab.progress import progress as progress_display
    from diffusionlab.training.precision import restore_scaler, scaler_state
    from diffusionlab.training.rundir import portable
    from diffusionlab.training.tensorboard import open_tensorboard

    device = dist.device
    tcfg = cfg["train"]
    steps = tcfg["steps"]
    start, extra, last_ckpt = 0, {}, None
    log_path = out / "log.csv"
    if resume:
        def apply(ck):
            p.model.load_state_dict(ck["model"])
            p.ema.load_state_dict(ck["ema"])
            restore_optimizer(p.opt, ck["optimizer"])
            ck["reseeded"] = restore_rng(ck["state"], p.generators)
            restore_scaler(p.scaler, ck["meta"].get("extra", {}).get("grad_scaler"))

        ck = load_latest_checkpoint(out, device=device, warn=log if dist.is_main else (lambda m: None), apply=apply)
        if ck is not None:
            start, extra, last_ckpt = ck["step"], ck["meta"].get("extra", {}), ck["step"]
            if steps < start:
                raise DiffusionLabError(f"train.steps = {steps} is below step {start} of the run's newest checkpoint; a "
                                        f"resumed run can only go on (give train.steps >= {start})")
            if dist.is_main:
                log(f"diffusionlab: resuming {out} from step {start}")
                if ck["reseeded"]:
                    log(f"diffusionlab: warning: the {', '.join(ck['reseeded'])} generator's state was saved on "
                        f"another kind of device than {device}; it is seeded from that state instead, so the "
                        "resumed run does not draw the noise an uninterrupted run would have")
                _check_data_order(extra, p, log)
        elif dist.is_main:
            log(f"diffusionlab: no checkpoint in {out}; starting from step 0")
    state = _Loop(extra)
    if dist.is_main:
        try:
            if p.fitted_noise is not None:
                save_fitted_noise(p.fitted_noise, out)
            _rewrite_log(log_path, start)
            atomic_write_bytes(out / "config.yaml", dump(portable(cfg, out)).encode())
            if p.init is not None:  # the provenance of train.init_from
                record = {k: v for k, v in p.init.items() if k != "source_config"}
                atomic_write_bytes(out / "init.json", json.dumps(record, indent=2).encode())
                atomic_write_bytes(out / "init_config.yaml", dump(p.init["source_config"]).encode())
        except OSError as e:
            raise os_error(e, f"write to the run directory {out}") from None

    t0 = time.time()
    lagged = _Lagged(device)
    tb = open_tensorboard(out, start, log) if tcfg["tensorboard"] and dist.is_main else None

    def account(rows) -> None:
        for step, loss, grad_norm, ok in rows:
            state.last_grad = grad_norm
            state.window_steps += 1
            if ok:
                state.in_row = 0
                state.good_total += 1
                state.window.append(loss)
                continue
            state.in_row += 1
            state.bad_total += 1
            state.window_bad += 1
            if state.in_row >= tcfg["max_bad_steps"]:
                raise DiffusionLabError(
                    f"training stopped at step {step + 1}: {state.in_row} consecutive steps with a non-finite loss "
                    f"or gradient ({state.bad_total} skipped in all); {_intact_note(last_ckpt)} -- lower train.lr "
                    "or check the data")

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        if dist.is_main:
            try:
                save_checkpoint(out, step, p.model.state_dict(), p.ema.state_dict(), p.opt, p.generators,
                                extra={**state.extra(time.time() - t0, dist.world_size), **_data_order(p, step),
                                       "grad_scaler": scaler_state(p.scaler)},
                                keep=tcfg["keep_checkpoints"], warn=log)
            except OSError as e:
                raise DiffusionLabError(f"cannot write checkpoint {checkpoint_name(step)} in {out / CKPT_DIR}: "
                                        f"{os_error(e, 'x').args[0].removeprefix('cannot x: ')}; "
                                        f"{_intact_note(last_ckpt)}") from None
        last_ckpt = step

    bar = progress_display(range(start, steps), total=steps, initial=start, desc="train",
                           enabled=progress and dist.is_main)
    p.model.train()
    logf = writer = None
    stopped_at = None
    try:
        if dist.is_main:
            logf = open(log_path, "a", newline="")
            writer = csv.DictWriter(logf, fieldnames=LOG_FIELDS)
        for step in bar:
            x0 = _fetch(p, step, dist)
            if isinstance(x0, str):  # the data cannot be read: stop with a checkpoint of the steps done
                account(lagged.flush())
                if step > start and last_ckpt != step:
                    checkpoint(step)
                raise DiffusionLabError(f"training stopped before step {step + 1}: {x0}; "
                                        f"{_intact_note(last_ckpt)}: fix the data, then continue with --resume")
            account(lagged.push(step, train_step(p, step, x0)))
            log_now = (step + 1) % tcfg["log_every"] == 0 or step + 1 == steps
            ckpt_now = (step + 1) % tcfg["checkpoint_every"] == 0 or step + 1 == steps
            halt = dist.any(stop.requested() is not None)
            if log_now or ckpt_now or halt:
                account(lagged.flush())
            if log_now:
                mean_loss = sum(state.window) / len(state.window) if state.window else float("nan")
                if writer:
                    writer.writerow({"step": step + 1, "loss": f"{mean_loss:.6g}", "lr": f"{lr_at(step, tcfg):.6g}",
                                     "grad_norm": f"{state.last_grad:.6g}",
                                     "seconds": f"{state.seconds_before + time.time() - t0:.2f}",
                                     "bad_steps": state.bad_total})
                    logf.flush()
                if dist.is_main and state.window_bad > SKIP_WARN_FRACTION * state.window_steps:
                    log(f"diffusionlab: warning: {state.window_bad} of the {state.window_steps} steps up to step "
                        f"{step + 1} were skipped (non-finite loss or gradient{_scaler_note(p)}; {state.bad_total} "
                        "in all)")
                bar.set_postfix(loss=f"{mean_loss:.4f}", skipped=state.bad_total)
                if tb is not None:
                    tb.scalars(step + 1, loss=mean_loss, lr=lr_at(step, tcfg), grad_norm=state.last_grad,
                               skipped_steps=state.bad_total,
                               samples_per_second=_rate(step + 1 - start, tcfg["batch_size"], time.time() - t0))
            if (step + 1) % tcfg["log_every"] == 0:
                state.reset_window()
            if ckpt_now or halt:
                checkpoint(step + 1)
            if dist.is_main and tcfg["sample_every"] and (step + 1) % tcfg["sample_every"] == 0:
                grid = _periodic_samples(cfg, p.ds, p.model, p.ema, out, step + 1, device)
                if tb is not None:
                    tb.image(step + 1, grid)
            if halt and step + 1 < steps:  # (a stop asked during the last step: the run is complete anyway)
                stopped_at = step + 1
                break
    except OSError as e:
        raise DiffusionLabError(f"{os_error(e, f'write {e.filename or out}').args[0]}; {_intact_note(last_ckpt)}") from None
    finally:
        bar.close()
        p.batches.close()
        if tb is not None:
            tb.close()
        if logf:
            try:
                logf.close()
            except OSError:
                pass
    seconds = round(time.time() - t0, 2)
    done = (stopped_at or steps) - start
    summary = {"steps": steps, "resumed_from": start, "seconds": seconds, "bad_steps": state.bad_total,
               "skipped_steps": state.bad_total, "device": str(device), "world_size": dist.world_size,
               "parameters": sum(q.numel() for q in p.params),
               "samples_per_second": _rate(done, tcfg["batch_size"], seconds),
               "data": "streamed" if p.batches.streaming else "in memory"}
    if p.scaler is not None:
        summary["grad_scale"] = p.scaler.get_scale()
    if stopped_at is not None:
        if dist.is_main:
            log(f"diffusionlab: stopped {stop.describe()} at step {stopped_at} of {steps}; checkpoint "
                f"{checkpoint_name(stopped_at)} is intact; continue with --resume")
        dist.barrier()
        return {**summary, "stopped": stop.reason, "step": stopped_at}
    if state.good_total == 0:
        raise DiffusionLabError(f"no step of the {steps} made progress: every one had a non-finite loss or gradient "
                                f"({state.bad_total} skipped); no weights were written -- lower train.lr or check the "
                                "data's scale and the noise covariance")
    if dist.is_main:
        _write_final(p, out, summary, log_path, log, last_ckpt)
    dist.barrier()
    return summary


def _write_final(p, out: Path, summary: dict, log_path: Path, log, last_ckpt) -> None:
    """The final EMA and raw weights (refused when non-finite), the summary and the loss plot."""
    ema, raw = p.ema.state_dict(), p.model.state_dict()
    bad = [k for sd in (ema, raw) for k, v in sd.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]
    if bad:
        raise DiffusionLabError(f"the trained weights hold non-finite values ({bad[0]}); no weights were written -- "
                                f"lower train.lr or check the data; {_intact_note(last_ckpt)}")
    for name, sd, kind in (("model.safetensors", ema, "ema"), ("model_raw.safetensors", raw, "raw")):
        try:
            save_safetensors_atomic(sd, out / name, metadata={"weights": kind})
        except OSError as e:
            raise DiffusionLabError(f"{os_error(e, f'write the final weights {out / name}').args[0]}; "
                                    f"{_intact_note(last_ckpt)}: run again with --resume once that is fixed") from None
    try:
        atomic_write_bytes(out / "train_summary.json", json.dumps(summary, indent=2).encode())
    except OSError as e:
        raise os_error(e, f"write {out / 'train_summary.json'}") from None
    try:
        from diffusionlab.plotting import plot_loss

        with atomic_path(out / "loss.png") as tmp:
            plot_loss(log_path, tmp)
    except Exception as e:  # a plot must never lose a finished run
        log(f"diffusionlab: warning: could not plot the loss curve: {str(e).splitlines()[0] if str(e) else e}")


def _periodic_samples(cfg, ds, model, ema, out: Path, step: int, device) -> Path:
    """A small grid (images), frame grid (videos) or scatter (points) from the EMA weights during training
    (``train.sample_every``), drawn by the run's ``sample:`` section (the sampler catalogue), written atomically to
    ``samples/step_N.png``; returns its path."""
    import copy

    from diffusionlab.plotting import save_samples
    from diffusionlab.training.sampling import generate

    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(ema.state_dict())
    ema_model.eval()
    x = generate(ema_model, cfg["sample"], num=min(64, cfg["sample"]["num"]), seed=step, device=device,
                 shape=ds.sample_shape)
    path = out / "samples" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_samples(ds.to_display(x.float().cpu()), ds.kind, tmp)
    return path
