"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of diffusion models",
Algorithm 2): a student that samples in a handful of DDIM steps, distilled from a trained run.

The student's deterministic DDIM (eta = 0; :func:`~diffusionlab.samplers.ancestral.ddim_update`) on a grid
``p_0 > ... > p_N`` is trained so that its one step ``p_i -> p_{i+1}`` lands where the teacher's two steps
``p_i -> p_{i+1/2} -> p_{i+1}`` land. From ``z = x_{p_i}`` and the teacher's end ``z''``, the student's target
``x~`` is the data prediction whose DDIM step reaches ``z''`` (Algorithm 2, with ``x_t = s_t x_0 + sigma_t eps``)::

    z'' = s'' x~ + (sigma'' / sigma) (z - s x~)    =>    x~ = (z'' - (sigma'' / sigma) z) / (s'' - (sigma'' / sigma) s)

(``x~ = z''`` on a last step to the data) and the loss is the truncated-SNR weighted ``max(SNR, 1) ||x_theta - x~||^2``
(Salimans & Ho 2022, sec. 4, "truncated SNR"), written for the student's output (weight ``max(SNR, 1) c^2``, ``c^2``
its parametrization's ``error_scale2``) in the whitened norm of the noise covariance C. Each round halves the
steps: the student of ``N`` steps becomes the teacher of the ``N / 2``-step student, which starts from its
weights. The first round's teacher is the trained model itself; its two-step target may be replaced by a more
accurate solve of the interval (``teacher_solver``, ``teacher_substeps``: e.g. Heun on ``k`` sub-steps, so that a
round can start from few steps without inheriting DDIM's first-order error; Salimans & Ho instead start from
thousands of DDIM steps). Training draws ``x_0`` from the data, ``i`` uniformly among the student's points and
``z = s x_0 + sigma eps`` exactly.

The grids are nested: the first round's teacher grid (``start_steps`` steps of ``kind``, default the ``edm`` grid)
holds every later grid as every ``2^k``-th point, ending at the data on a chain and at the process's ``eps`` on
an SDE. :func:`distill_model` is the algorithm on models and a data tensor; :func:`distill_run` builds it from a
run directory and writes the student as a run (its ``sample:`` section: ``ddim`` with the explicit ``times`` of its
grid, so ``diffusionlab sample --run STUDENT`` samples in ``N`` evaluations), with each round's student under
``rounds/<N>-steps``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import TimeGrid, make_grid
from diffusionlab.samplers.ancestral import ddim_update
from diffusionlab.utils import bcast, per_sample_dim

_F64 = torch.float64


# ---- grids -------------------------------------------------------------------------------------------------
def nested_grids(start: TimeGrid, rounds: int) -> list[TimeGrid]:
    """``[G_N, G_{N/2}, ...]``: the student grids of ``rounds`` rounds, each every other point of the one before
    (``start`` is the first teacher's grid; ``start.steps`` must divide by ``2^rounds``)."""
    if rounds < 1:
        raise DiffusionLabError(f"distillation needs at least one round, got {rounds}")
    if start.steps % (2**rounds):
        raise DiffusionLabError(f"{rounds} rounds halve {start.steps} steps {rounds} times: the first teacher's steps "
                                f"must divide by {2**rounds}")
    out, times = [], list(start.times)
    for _ in range(rounds):
        times = times[::2]
        out.append(TimeGrid(start.process, times, f"distilled-{len(times) - 1}"))
    return out


def _level(process, t) -> float:
    tt = torch.tensor(int(t)) if process.discrete else torch.tensor(float(t), dtype=_F64)
    return float(process.edm_sigma(tt))


def teacher_points(process, t_hi, t_lo, substeps: int) -> list:
    """``substeps`` steps' points from ``t_hi`` to ``t_lo``, the ones between uniform in log-level; a last interval
    of a chain (``t_lo = 0``, the data) puts its last point before the data at ``t = 1``. On a chain the points are
    the nearest distinct steps (fewer where the interval holds fewer)."""
    if substeps <= 1 or (process.discrete and t_hi - t_lo <= 1):
        return [t_hi, t_lo]
    to_data = process.discrete and t_lo == 0
    lo = 1 if to_data else t_lo
    u_hi, u_lo = math.log(_level(process, t_hi)), math.log(_level(process, lo))
    k = torch.arange(1, substeps, dtype=_F64) / ((substeps - 1) if to_data else substeps)
    inner = process.time_at_edm_sigma(torch.exp(u_hi + k * (u_lo - u_hi))).tolist()
    pts = [t_hi]
    for v in inner:
        v = int(v) if process.discrete else float(v)
        if t_lo < v < pts[-1]:
            pts.append(v)
    return [*pts, t_lo]


TEACHER_SOLVERS = ("ddim", "heun")


@torch.no_grad()
def solve_points(model, z: torch.Tensor, points: list, solver: str = "heun") -> torch.Tensor:
    """``model``'s probability-flow ODE from ``z`` at ``points[0]`` through ``points`` (one time each, the same for
    every sample): DDIM steps (Euler in ``y = x / s``, Song et al. 2021 eq. 12) or Heun's (Karras et al. 2022,
    Algorithm 1; Euler on a step to the data)."""
    process = model.process
    ts = torch.tensor(points) if process.discrete else torch.tensor([float(v) for v in points], dtype=_F64)
    s_all, sig_all = process.coeffs(ts)
    s_all, sig_all = s_all.tolist(), sig_all.tolist()

    def time(k):
        return int(points[k]) if process.discrete else torch.tensor(float(points[k]), dtype=_F64, device=z.device)

    for k in range(len(points) - 1):
        p = model.predict(z, time(k))
        z_next = ddim_update(z, p.x0, p.eps, s_all[k + 1], sig_all[k + 1])
        if solver == "heun" and sig_all[k + 1] > 0:
            p2 = model.predict(z_next, time(k + 1))
            lev, lev2 = sig_all[k] / s_all[k], sig_all[k + 1] / s_all[k + 1]
            z_next = s_all[k + 1] * (z / s_all[k] + (lev2 - lev) * 0.5 * (p.eps + p2.eps))
        z = z_next
    return z


# ---- the targets -------------------------------------------------------------------------------------------
def _coeffs(grid: TimeGrid, idx: torch.Tensor, like: torch.Tensor, offset: int = 0):
    s = torch.tensor(grid.s, dtype=like.dtype, device=like.device)[idx + offset]
    sig = torch.tensor(grid.sigma, dtype=like.dtype, device=like.device)[idx + offset]
    return bcast(s, like), bcast(sig, like)


def _times(grid: TimeGrid, idx: torch.Tensor, device, offset: int = 0) -> torch.Tensor:
    t = grid.t[(idx + offset).cpu()]
    return (t.long() if grid.discrete else t).to(device)


@torch.no_grad()
def ddim_two_steps(teacher, z: torch.Tensor, teacher_grid: TimeGrid, i2: torch.Tensor) -> torch.Tensor:
    """The teacher's two DDIM steps from its points ``i2`` to ``i2 + 2`` (per sample)."""
    for k in (0, 1):
        t = _times(teacher_grid, i2, z.device, k)
        p = teacher.predict(z, t)
        s1, sig1 = _coeffs(teacher_grid, i2, z, k + 1)
        z = s1 * p.x0 + sig1 * p.eps  # DDIM, eta = 0 (Song et al. 2021, eq. 12), per sample
    return z


def teacher_table(grid: TimeGrid, substeps: int) -> torch.Tensor:
    """``(N, substeps + 1)`` float64 times: row ``k`` the teacher's points from ``p_k`` to ``p_{k+1}``
    (:func:`teacher_points`), padded by repeating ``p_{k+1}`` where a chain's interval holds fewer steps (a
    zero-length step changes nothing)."""
    rows = []
    for k in range(grid.steps):
        pts = teacher_points(grid.process, grid.times[k], grid.times[k + 1], substeps)
        rows.append([float(v) for v in pts] + [float(pts[-1])] * (substeps + 1 - len(pts)))
    return torch.tensor(rows, dtype=_F64)


@torch.no_grad()
def teacher_interval(teacher, z: torch.Tensor, table: torch.Tensor, i: torch.Tensor, solver: str) -> torch.Tensor:
    """The teacher's solve of each sample's student interval ``p_i -> p_{i+1}`` through the points of row ``i`` of
    ``table`` (:func:`teacher_table`), batched: DDIM steps, or Heun's (Karras et al. 2022, Algorithm 1; Euler on a
    step to the data, none on a zero-length one)."""
    process = teacher.process
    pts = table[i.cpu()]  # (B, K + 1)
    for k in range(pts.shape[1] - 1):
        ta, tb = pts[:, k], pts[:, k + 1]
        ta_m = (ta.long() if process.discrete else ta).to(z.device)
        tb_m = (tb.long() if process.discrete else tb).to(z.device)
        sa, siga = process.coeffs_like(ta_m, z)
        sb, sigb = process.coeffs_like(tb_m, z)
        p = teacher.predict(z, ta_m)
        z_next = sb * p.x0 + sigb * p.eps  # DDIM, eta = 0: Euler in y = x / s
        if solver == "heun":
            moving = (sigb.reshape(-1) > 0) & (tb != ta).to(z.device)
            if bool(moving.any()):
                p2 = teacher.predict(z_next, tb_m)
                heun = sb * (z / sa + (sigb / sb - siga / sa) * 0.5 * (p.eps + p2.eps))
                z_next = torch.where(bcast(moving, z), heun, z_next)
        z = torch.where(bcast((tb != ta).to(z.device), z), z_next, z)
    return z


def ddim_target(z: torch.Tensor, z2: torch.Tensor, grid: TimeGrid, i: torch.Tensor) -> torch.Tensor:
    """``x~ = (z'' - (sigma''/sigma) z) / (s'' - (sigma''/sigma) s)``: the data prediction whose DDIM step from
    ``(z, p_i)`` reaches ``z''`` at ``p_{i+1}`` (module docstring)."""
    s, sig = _coeffs(grid, i, z)
    s2, sig2 = _coeffs(grid, i, z, 1)
    r = sig2 / sig
    return (z2 - r * z) / (s2 - r * s)


def distill_loss(student, x0: torch.Tensor, z: torch.Tensor, eps: torch.Tensor, x_target: torch.Tensor,
                 grid: TimeGrid, i: torch.Tensor) -> torch.Tensor:
    """``max(SNR, 1) ||x_theta - x~||^2_{C^{-1}} / D`` per sample, through the student's output: its target for
    ``x~`` (and the matching ``eps~ = (z - s x~) / sigma``) and weight ``max(SNR, 1) c^2``."""
    t = _times(grid, i, z.device)
    s, sig = _coeffs(grid, i, z)
    eps_t = (z - s * x_target) / sig
    param = student.parametrization
    target = param.target(eps_t, x_target, s, sig)
    out, _ = student.split(student(z, t))
    w = ((s / sig) ** 2).clamp(min=1.0).reshape(-1) * param.error_scale2(s, sig).reshape(-1)
    return w * student.process.cov.mahalanobis(out - target) / per_sample_dim(x0)


# ---- the algorithm -----------------------------------------------------------------------------------------
@dataclass
class DistillRound:
    steps: int
    grid: TimeGrid
    losses: list = field(default_factory=list)
    seconds: float = 0.0


def _refuse_self_conditioning(**models) -> None:
    for who, m in models.items():
        if getattr(m, "self_condition", False):
            raise DiffusionLabError(f"progressive distillation does not train self-conditioned models (the {who} has "
                                    "parametrization.self_condition on): its solves and its loss feed no x_0 estimate")


def distill_model(teacher, student, data: torch.Tensor, start: TimeGrid, rounds: int, iterations: int = 500,
                  batch_size: int = 128, lr: float = 5e-4, warmup: int = 50, ema_decay: float = 0.995,
                  grad_clip: float = 1.0, seed: int = 0, teacher_solver: str = "ddim", teacher_substeps: int = 2,
                  log=None, on_round=None) -> list[DistillRound]:
    """Progressive distillation of ``teacher`` into ``student`` (module docstring) on ``data`` (``(n, ...)``).

    ``start``: the first teacher's grid (``rounds`` halvings); ``iterations`` AdamW steps per round at
    ``batch_size``, learning rate ``lr`` with ``warmup`` steps each round; EMA ``ema_decay`` (the EMA weights are
    the round's student and the next round's teacher); ``teacher_solver`` / ``teacher_substeps``: the first round's
    teacher solve of each interval (``ddim`` with 2 sub-steps: Salimans & Ho's two DDIM steps through the
    teacher's midpoint). ``on_round(round, student)`` is called after each round. Returns the rounds.
    """
    from diffusionlab.training.trainer import EMA, make_optimizer

    _refuse_self_conditioning(teacher=teacher, student=student)
    grids = nested_grids(start, rounds)
    if teacher_solver not in TEACHER_SOLVERS:
        raise DiffusionLabError(f"unknown teacher solver {teacher_solver!r}; allowed: {', '.join(TEACHER_SOLVERS)}")
    if isinstance(teacher_substeps, bool) or not isinstance(teacher_substeps, int) or teacher_substeps < 1:
        raise DiffusionLabError(f"teacher substeps must be an integer >= 1, got {teacher_substeps!r}")
    device = data.device
    gen_data = torch.Generator().manual_seed(int(seed))
    gen_noise = torch.Generator(device=device).manual_seed(int(seed) + 1)
    process = student.process
    results = []
    teacher_grid = start
    current_teacher = teacher
    for r, grid in enumerate(grids, start=1):
        t0 = time.time()
        params = [q for q in student.parameters() if q.requires_grad]
        opt = make_optimizer(params, {"lr": lr, "weight_decay": 0.0})
        ema = EMA(student, ema_decay)
        rec = DistillRound(grid.steps, grid)
        first = r == 1 and not (teacher_solver == "ddim" and teacher_substeps == 2)
        table = teacher_table(grid, teacher_substeps) if first else None
        student.train()
        for it in range(iterations):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (it + 1) / max(1, warmup))
            idx = torch.randint(data.shape[0], (batch_size,), generator=gen_data)
            x0 = data[idx.to(device)]
            i = torch.randint(grid.steps, (batch_size,), generator=gen_noise, device=gen_noise.device).to(device)
            eps = process.cov.sample(x0.shape, generator=gen_noise, device=gen_noise.device, dtype=x0.dtype).to(device)
            s, sig = _coeffs(grid, i, x0)
            z = s * x0 + sig * eps
            if first:
                z2 = teacher_interval(current_teacher, z, table, i, teacher_solver)
            else:
                z2 = ddim_two_steps(current_teacher, z, teacher_grid, 2 * i)
            x_t = ddim_target(z, z2, grid, i)
            loss = distill_loss(student, x0, z, eps, x_t, grid, i).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            opt.step()
            ema.update(student, it)
            rec.losses.append(loss.detach())
            if log and ((it + 1) % max(1, iterations // 10) == 0 or it + 1 == iterations):
                window = torch.stack(rec.losses[-max(1, iterations // 10):])
                log(f"distill: round {r}/{rounds} ({grid.steps} steps) iteration {it + 1}/{iterations}: loss "
                    f"{float(window.mean()):.5f}")
        student.load_state_dict(ema.state_dict())
        student.eval()
        rec.losses = torch.stack(rec.losses).tolist()
        rec.seconds = time.time() - t0
        results.append(rec)
        if on_round is not None:
            on_round(r, student, rec)
        current_teacher = copy.deepcopy(student)
        for q in current_teacher.parameters():
            q.requires_grad_(False)
        teacher_grid = grid
    return results


# ---- from a run to a run -----------------------------------------------------------------------------------
def distill_run(teacher_run, out_dir, steps: int = 4, start_steps: int | None = None, kind: str | None = None,
                iterations: int = 500, batch_size: int = 128, lr: float = 5e-4, warmup: int = 50,
                ema_decay: float = 0.995, seed: int = 0, teacher_solver: str = "heun", teacher_substeps: int = 2,
                prediction: str | None = None, device: str = "auto", threads: int = 0, log=print) -> dict:
    """Distil the run ``teacher_run`` into a new run ``out_dir`` sampling in ``steps`` DDIM steps (module
    docstring). ``start_steps``: the first teacher grid's steps (default ``2 steps``: one round); it must be
    ``steps`` times a power of 2. ``kind``: that grid's kind (default ``edm``). ``prediction``: the student's
    parametrization (default the teacher's; it starts from the teacher's weights either way). Returns a summary;
    writes ``out_dir/config.yaml``, ``model.safetensors`` (EMA student), ``distill.json`` and ``rounds/<N>-steps``
    (each round's student as a run)."""
    from diffusionlab.io import atomic_write_bytes, save_safetensors_atomic
    from diffusionlab.parametrization import DiffusionModel
    from diffusionlab.training.build import build_dataset
    from diffusionlab.training.config import dump
    from diffusionlab.training.sampling import load_run

    out = Path(out_dir)
    if (out / "model.safetensors").exists() or (out / "config.yaml").exists():
        raise DiffusionLabError(f"{out} already holds a run; choose another --out")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DiffusionLabError(f"--steps must be an integer >= 1, got {steps!r}")
    start_steps = 2 * steps if start_steps is None else start_steps
    ratio = start_steps / steps
    if start_steps <= steps or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
        raise DiffusionLabError(f"--start-steps must be --steps ({steps}) times a power of 2 (2, 4, 8, ...), got "
                                f"{start_steps}")
    rounds = int(round(math.log2(ratio)))
    if threads:
        torch.set_num_threads(int(threads))
    cfg, ds, teacher = load_run(teacher_run, device=device)
    _refuse_self_conditioning(teacher=teacher)  # before anything is written
    teacher.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    process = teacher.process
    start = make_grid(process, start_steps, kind or "edm")
    pcfg = dict(cfg["parametrization"])
    if prediction is not None:
        pcfg["prediction"] = prediction
        if prediction != "edm":
            pcfg["sigma_data"] = None
    student = DiffusionModel(copy.deepcopy(teacher.net), process, **pcfg).to(next(teacher.parameters()).device)
    for q in student.parameters():
        q.requires_grad_(True)
    data = build_dataset(cfg).data.to(next(teacher.parameters()).device)
    out.mkdir(parents=True, exist_ok=True)

    def student_cfg(grid: TimeGrid) -> dict:
        return {**cfg, "parametrization": pcfg,
                "sample": {"sampler": "ddim", "num": cfg["sample"].get("num", 64), "eta": 0.0, "clip_x0": False,
                           "times": list(grid.times)}}

    def save(run_dir: Path, model, grid: TimeGrid) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(model.state_dict(), run_dir / "model.safetensors", metadata={"weights": "ema"})
        atomic_write_bytes(run_dir / "config.yaml", dump(student_cfg(grid)).encode())

    def on_round(r, model, rec):
        save(out / "rounds" / f"{rec.steps}-steps", model, rec.grid)

    t0 = time.time()
    res = distill_model(teacher, student, data, start, rounds, iterations, batch_size, lr, warmup, ema_decay,
                        seed=seed, teacher_solver=teacher_solver, teacher_substeps=teacher_substeps, log=log,
                        on_round=on_round)
    final = res[-1]
    summary = {"teacher": str(teacher_run), "steps": final.steps, "times": list(final.grid.times),
               "start_grid": {"kind": start.kind, "times": list(start.times)}, "rounds": [
                   {"steps": rc.steps, "times": list(rc.grid.times), "seconds": round(rc.seconds, 1),
                    "final_loss": sum(rc.losses[-50:]) / len(rc.losses[-50:])} for rc in res],
               "iterations_per_round": iterations, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
               "teacher_solver": teacher_solver, "teacher_substeps": teacher_substeps,
               "prediction": pcfg["prediction"], "seed": seed, "seconds": round(time.time() - t0, 1)}
    atomic_write_bytes(out / "distill.json", json.dumps(summary, indent=1).encode())
    save(out, student, final.grid)  # config.yaml last: a run directory only once it is complete
    return summary


__all__ = ["distill_model", "distill_run", "nested_grids", "teacher_points", "solve_points", "ddim_target",
           "distill_loss", "ddim_two_steps", "teacher_interval", "teacher_table", "DistillRound", "TEACHER_SOLVERS"]
