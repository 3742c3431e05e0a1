"""Learning-rate schedules: a named shape after the linear warm-up, or a list of knots.

``train.lr_schedule`` is

- ``constant``: ``train.lr`` throughout;
- ``cosine``: ``lr (1 + cos(pi f)) / 2`` with ``f`` the fraction of the steps after the warm-up (Loshchilov &
  Hutter 2017, "SGDR", eq. 5 with one cycle and a minimum of 0);
- ``linear``: ``lr (1 - f)``, a linear decay to 0 at ``train.steps``;
- a list of knots ``[[step, lr], [step, lr, shape], ...]``: the learning rate is ``lr_i`` at ``step_i`` and goes to
  the next knot's value by ``shape`` (``linear``, the default; ``cosine``: half a cosine; ``constant``: it stays
  ``lr_i`` up to the next knot, a step), and stays at the last knot's value after it. The first knot is at step 0
  and the steps increase; ``train.lr`` is not used (the knots give the values). E.g. a warm-up and a step decay:
  ``[[0, 0.0], [1000, 2e-4], [200000, 2e-4, constant], [200001, 2e-5]]``.

``train.warmup`` (steps of a linear ramp from ``lr / warmup`` to ``lr``) multiplies every schedule, a list too (set
it to 0 when the list has its own warm-up).
"""

from __future__ import annotations

import math

from diffusionlab.checks import brief
from diffusionlab.errors import DiffusionLabError

NAMED = ("constant", "cosine", "linear")
SHAPES = ("linear", "cosine", "constant")


def check_lr_schedule(value) -> str | list:
    """``value`` if it is a valid ``train.lr_schedule`` (module docstring), else a :class:`DiffusionLabError`
    naming the bad knot."""
    if isinstance(value, str):
        if value not in NAMED:
            raise DiffusionLabError(f"train.lr_schedule must be one of {', '.join(NAMED)} or a list of [step, lr] "
                                    f"knots, got {brief(value)}")
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise DiffusionLabError(f"train.lr_schedule must be one of {', '.join(NAMED)} or a non-empty list of "
                                f"[step, lr] knots, got {brief(value)}")
    last = None
    for i, knot in enumerate(value):
        where = f"train.lr_schedule knot {i} ({brief(knot)})"
        if not isinstance(knot, (list, tuple)) or len(knot) not in (2, 3):
            raise DiffusionLabError(f"{where} must be [step, lr] or [step, lr, shape]")
        step, lr = knot[0], knot[1]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DiffusionLabError(f"{where}: the step must be an integer >= 0")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 <= lr < 1) or lr != lr:
            raise DiffusionLabError(f"{where}: the learning rate must be a number in [0, 1)")
        if len(knot) == 3 and knot[2] not in SHAPES:
            raise DiffusionLabError(f"{where}: the shape must be one of {', '.join(SHAPES)}")
        if i == 0 and step != 0:
            raise DiffusionLabError(f"{where}: the first knot must be at step 0")
        if last is not None and step <= last:
            raise DiffusionLabError(f"{where}: the steps must increase (step {step} after {last})")
        last = step
    return [list(k) for k in value]


def _between(a: float, b: float, frac: float, shape: str) -> float:
    if shape == "constant":
        return a
    if shape == "cosine":
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * frac))
    return a + (b - a) * frac


def knots_lr(step: int, knots: list) -> float:
    """The learning rate of a list of knots at ``step`` (module docstring)."""
    for (s0, lr0, *shape), (s1, lr1, *_) in zip(knots, knots[1:]):
        if s0 <= step < s1:
            return _between(float(lr0), float(lr1), (step - s0) / (s1 - s0), shape[0] if shape else "linear")
    return float(knots[-1][1])


def over_horizon(cfg: dict, horizon: int) -> str | list:
    """The ``train:`` section ``cfg``'s named schedule as knots that decay over ``horizon`` steps whatever
    ``train.steps`` says, so a run trained in segments (``train.steps`` raised each time, as
    :func:`diffusionlab.experiments.video_runs.train_until_converged` does) follows one schedule instead of decaying
    to 0 at the end of every segment. ``lr_at`` gives the same values as the named schedule with ``steps =
    horizon`` (the warm-up still multiplies the knots); ``constant`` and lists of knots come back as they are."""
    schedule = cfg.get("lr_schedule", "constant")
    if not isinstance(schedule, str) or schedule == "constant":
        return schedule
    lr, warm = float(cfg["lr"]), int(cfg["warmup"])
    if horizon <= warm:
        raise DiffusionLabError(f"the horizon of the lr_schedule ({horizon} steps) must exceed train.warmup ({warm})")
    head = [[0, lr, "constant"]] if warm else []
    return head + [[warm, lr, schedule], [horizon, 0.0]]  # the named decays are the knot shapes of the same name


def lr_at(step: int, cfg: dict) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under the ``train:`` section ``cfg``."""
    base, warm, total = cfg["lr"], cfg["warmup"], cfg["steps"]
    schedule = cfg.get("lr_schedule", "constant")
    if isinstance(schedule, (list, tuple)):
        lr = knots_lr(step, schedule)
        return lr * (step + 1) / warm if warm and step < warm else lr
    if warm and step < warm:
        return base * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "linear":
        return base * (1 - frac)
    return base
