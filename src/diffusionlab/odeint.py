"""One adaptive ODE solve for the whole package: torchdiffeq's ``odeint`` between two times, landing on the end.

Used by the probability-flow ODE sampler, the ODE likelihood and the oracles' reference solutions.
torchdiffeq's adaptive solvers step past the last time and interpolate back, which would evaluate the model outside
the time interval (at ``t < 0`` the VP marginal has no real ``sigma``); ``step_t`` at the end makes them land on it
exactly. Fixed-grid methods take their options unchanged.
"""

from __future__ import annotations

import torch

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5")


def stop_at_end(options: dict | None, span: torch.Tensor, method: str) -> dict | None:
    """``options`` with ``step_t`` set to the span's end for adaptive ``method``s (module docstring)."""
    if method not in ADAPTIVE_METHODS:
        return options
    opts = dict(options or {})
    opts.setdefault("step_t", span[-1:].clone())
    return opts


def solve(func, y0, t0: float, t1: float, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
          options: dict | None = None, device=None):
    """The state at ``t1`` of ``dy/dt = func(t, y)`` from ``y(t0) = y0`` (a tensor or a tuple of tensors), with
    torchdiffeq's ``odeint`` (``method``, tolerances on the whole state); the time span is float64 on ``device``
    (default: the state's)."""
    from torchdiffeq import odeint

    first = y0[0] if isinstance(y0, tuple) else y0
    span = torch.tensor([float(t0), float(t1)], dtype=torch.float64, device=device or first.device)
    out = odeint(func, y0, span, method=method, rtol=rtol, atol=atol, options=stop_at_end(options, span, method))
    return tuple(o[-1] for o in out) if isinstance(y0, tuple) else out[-1]
