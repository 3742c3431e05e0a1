"""Class conditioning and classifier-free guidance as wrappers of the model interface.

A wrapper is a :class:`ModelWrapper`: it has the interface of :class:`~diffusionlab.parametrization.DiffusionModel`
(``predict``, ``forward``, ``eps``, ``x0``, ``c_score``, ``score``, ``process``, ``parametrization``, ``nfe``, ...)
around an inner model and defines only :meth:`~ModelWrapper.predict`, so every sampler of the catalogue runs on it
unchanged -- conditioning never enters the samplers.

- :class:`LabelledModel` binds class labels to a class-conditional model: ``predict(x, t) =
  inner.predict(x, t, labels)``.
- :class:`GuidedModel` is classifier-free guidance (Ho & Salimans 2022, eq. 6)::

      eps = eps_u + w (eps_c - eps_u)

  with ``eps_c`` the model given the class and ``eps_u`` given the no-label index. Both come from **one** network
  call on a doubled batch ``[x; x]`` with labels ``[c; no label]`` (counted as one evaluation of a doubled batch:
  the model's ``nfe`` grows by 1, :attr:`GuidedModel.calls` says how many calls were doubled). ``x0`` and the raw
  output are combined with the same weights -- all parametrizations are affine in ``(eps, x0)`` at fixed ``x_t``,
  so this is the same guided model whatever the net predicts; a learned variance is the conditional one.
  ``w = 1`` is the conditional model and ``w = 0`` the unconditional one (then a single call, no doubling).
  An optional guidance **interval** ``(lo, hi]`` of EDM noise levels ``sig = sigma / s`` (Kynkaanniemi et al. 2024,
  "Applying guidance in a limited interval improves sample and distribution quality in diffusion models", eq. 2)
  applies ``w`` only where ``lo < sig <= hi`` and the conditional model (``w = 1``, one single call) elsewhere.

Labels are an int (every row) or an ``(N,)`` tensor; a batch of ``m N`` rows (e.g. ``m`` particles per row of a
conditional sampler, rows consecutive) repeats each label ``m`` times.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import Prediction, resize_carried_x0


class ModelWrapper(nn.Module):
    """The model interface around ``inner`` (module docstring); subclasses define :meth:`predict`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    # -- what samplers and objectives read -------------------------------------------------------------------
    @property
    def process(self):
        return self.inner.process

    @property
    def parametrization(self):
        return self.inner.parametrization

    @property
    def prediction(self) -> str:
        return self.inner.prediction

    @property
    def learn_variance(self) -> bool:
        return self.inner.learn_variance

    @property
    def out_mult(self) -> int:
        return self.inner.out_mult

    @property
    def cov(self):
        return self.inner.process.cov

    @property
    def num_classes(self):
        """None: a wrapper that binds labels takes no more."""
        return None

    @property
    def nfe(self) -> int:
        """The inner model's evaluation count (one per network call, a doubled batch counting one)."""
        return self.inner.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.inner.nfe = value

    def coeffs(self, t, x: torch.Tensor):
        return self.inner.coeffs(t, x)

    def split(self, out: torch.Tensor):
        return self.inner.split(out)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        return self.inner.target(x0, eps, t)

    # -- the interface ----------------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t) -> Prediction:
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The raw output of the wrapped model (the variance half appended with a learned variance)."""
        p = self.predict(x_t, t)
        return p.out if p.v_var is None else torch.cat([p.out, p.v_var], dim=1)

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.predict(x_t, t).eps

    def x0(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.predict(x_t, t).x0

    def c_score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.predict(x_t, t).c_score

    def score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        p = self.predict(x_t, t)
        return -self.process.cov.solve(p.eps) / p.sigma


def class_labels(labels, num_classes: int | None, what: str = "class") -> torch.Tensor:
    """Class labels (an int, a sequence or an integer tensor) as a CPU int64 tensor with values in
    ``0..num_classes - 1`` (the no-label index is not a class)."""
    if num_classes is None:
        raise DiffusionLabError(f"a {what} was given, but the model is not class-conditional (its network was built "
                                "without num_classes)")
    if isinstance(labels, bool):
        raise DiffusionLabError(f"{what} labels must be integers, got {labels!r}")
    try:
        lab = torch.as_tensor(labels).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise DiffusionLabError(f"{what} labels must be integers, got {labels!r}") from None
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.is_complex() or lab.ndim > 1:
        raise DiffusionLabError(f"{what} labels must be an integer or a 1-D list of integers, got {labels!r}")
    lab = lab.to(torch.long).reshape(-1)
    if lab.numel() == 0:
        raise DiffusionLabError(f"no {what} labels given")
    bad = lab[(lab < 0) | (lab >= num_classes)]
    if bad.numel():
        raise DiffusionLabError(f"{what} {int(bad[0])} is not a class of this model: allowed 0..{num_classes - 1}")
    return lab


class LabelledModel(ModelWrapper):
    """A class-conditional model with its labels bound: ``predict(x, t) = inner.predict(x, t, labels)``."""

    def __init__(self, inner, labels):
        super().__init__(inner)
        self.labels = class_labels(labels, inner.num_classes)
        self.calls = {"conditional": 0}

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The labels of the batch ``x`` (module docstring: repeated for a multiple of their count)."""
        n, b = self.labels.numel(), x.shape[0]
        if n == 1:
            return self.labels.to(x.device).expand(b)
        if b % n:
            raise DiffusionLabError(f"{n} labels for a batch of {b} rows: the batch must be a multiple of the labels")
        return self.labels.to(x.device).repeat_interleave(b // n)

    def predict(self, x_t: torch.Tensor, t) -> Prediction:
        self.calls["conditional"] += 1
        return self.inner.predict(x_t, t, labels=self.rows(x_t))

    def extra_repr(self) -> str:
        return f"labels={self.labels.tolist()[:10]}{'...' if self.labels.numel() > 10 else ''}"


def check_guidance(guidance) -> float | None:
    """A guidance weight ``w`` as a float (a finite number: 0 unconditional, 1 conditional, > 1 guided), or None."""
    if guidance is None:
        return None
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise DiffusionLabError(f"guidance must be a finite number (0 unconditional, 1 conditional), got {guidance!r}")
    return float(guidance)


def check_interval(interval) -> tuple[float, float] | None:
    """A guidance interval ``(lo, hi)`` of EDM noise levels, ``0 <= lo < hi`` (``hi`` may be ``inf``), or None."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"a guidance interval is two noise levels lo,hi (sigma / s), got {interval!r}") from None
    if not (lo >= 0 and hi > lo) or math.isnan(lo) or math.isnan(hi):
        raise DiffusionLabError(f"a guidance interval needs 0 <= lo < hi, got {interval!r}")
    return lo, hi


class GuidedModel(LabelledModel):
    """Classifier-free guidance of a class-conditional model (module docstring).

    Args:
        inner: a class-conditional model (``inner.num_classes`` set; its no-label index trained by label dropout).
        labels: the classes (an int or ``(N,)``).
        guidance: ``w`` (a finite number; 0 unconditional, 1 conditional, > 1 guided).
        interval: None or ``(lo, hi)``: guide only where the EDM level ``sigma / s`` lies in ``(lo, hi]``.

    :attr:`calls` counts the evaluations by kind: ``doubled`` (one call on ``2B`` rows), ``conditional`` and
    ``unconditional`` (one call on ``B`` rows).
    """

    def __init__(self, inner, labels, guidance: float, interval=None):
        super().__init__(inner, labels)
        self.guidance = check_guidance(guidance)
        if self.guidance is None:
            raise DiffusionLabError("a guided model needs a guidance weight w (a finite number), got None")
        self.interval = check_interval(interval)
        self.null = int(inner.num_classes)
        self.calls = {"doubled": 0, "conditional": 0, "unconditional": 0}

    def _inside(self, t, x: torch.Tensor) -> torch.Tensor | None:
        """Per row, whether guidance applies at ``t`` (None: everywhere)."""
        if self.interval is None:
            return None
        _, s, sigma = self.inner.coeffs(t, x)  # broadcast against x: (B, 1, ...)
        sig = (sigma / s).to(torch.float64).reshape(-1)
        lo, hi = self.interval
        inside = (sig > lo) & (sig <= hi)
        return inside.expand(x.shape[0]) if inside.numel() == 1 else inside

    def predict(self, x_t: torch.Tensor, t) -> Prediction:
        w = self.guidance
        rows = self.rows(x_t)
        inside = self._inside(t, x_t)
        if inside is not None and not bool(inside.any()):
            w = 1.0
        b = x_t.shape[0]
        # a self-conditioned trajectory's estimate follows the batch as the interval turns the doubling on or off
        resize_carried_x0(self.inner, b if w in (0.0, 1.0) else 2 * b)
        if w == 1.0:
            self.calls["conditional"] += 1
            return self.inner.predict(x_t, t, labels=rows)
        if w == 0.0:
            self.calls["unconditional"] += 1
            return self.inner.predict(x_t, t, labels=torch.full_like(rows, self.null))
        tt = torch.as_tensor(t)
        t2 = torch.cat([tt, tt]) if torch.is_tensor(t) and tt.ndim == 1 else t
        p = self.inner.predict(torch.cat([x_t, x_t]), t2, labels=torch.cat([rows, torch.full_like(rows, self.null)]))
        self.calls["doubled"] += 1
        wt = torch.full((b,), w, dtype=x_t.dtype, device=x_t.device)
        if inside is not None:
            wt = torch.where(inside.to(x_t.device), wt, torch.ones_like(wt))
        wt = wt.reshape(b, *([1] * (x_t.ndim - 1)))

        def mix(v):
            c, u = v[:b], v[b:]
            return u + wt * (c - u)

        s, sigma = p.s, p.sigma
        if torch.is_tensor(s) and s.ndim and s.shape[0] == 2 * b:
            s, sigma = s[:b], sigma[:b]
        return Prediction(eps=mix(p.eps), x0=mix(p.x0), out=mix(p.out), s=s, sigma=sigma,
                          v_var=None if p.v_var is None else p.v_var[:b])

    def extra_repr(self) -> str:
        return f"guidance={self.guidance}, interval={self.interval}, " + super().extra_repr()


def condition_on_class(model, labels, guidance: float | None = None, interval=None):
    """``model`` conditioned on ``labels``: :class:`LabelledModel` without guidance (or ``w = 1`` and no interval),
    :class:`GuidedModel` otherwise."""
    guidance = check_guidance(guidance)
    if guidance is None or (guidance == 1.0 and interval is None):
        return LabelledModel(model, labels)
    return GuidedModel(model, labels, guidance, interval)


def evaluation_note(model) -> dict:
    """What a wrapper's evaluation count means, for the CLI's JSON: the calls by kind and that a doubled call is
    one evaluation of a ``2B``-row batch."""
    calls = getattr(model, "calls", None)
    if calls is None:
        return {}
    out = {"evaluations_by_kind": dict(calls)}
    if calls.get("doubled"):
        out["nfe_note"] = ("classifier-free guidance: each doubled evaluation is one network call on a doubled batch "
                           "(conditional and unconditional rows together), counted as one NFE")
    return out


__all__ = ["ModelWrapper", "LabelledModel", "GuidedModel", "class_labels", "condition_on_class", "check_interval",
           "evaluation_note"]
