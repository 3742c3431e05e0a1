"""The one sampler catalogue: every sampler registered once, with its metadata and typed options.

A sampler is a plain function ``fn(model, x, grid, noise=None, progress=False, **options) -> x_0`` (``noise`` only
for the stochastic ones) that walks one :class:`~diffusionlab.processes.grid.TimeGrid` and only calls the model
interface. :func:`register_sampler` records it as a :class:`SamplerSpec`: its options (typed, validated; an unknown
option is refused with the allowed list, never dropped), what it needs of the process (``requires``), how many
evaluations it makes on a grid (``nfe``), how many steps fit a budget of evaluations (``steps_for_budget``),
whether it draws noise, its default grid and steps, and the paper it follows. The ``sample`` CLI, ``oracle
sample``, ``bench samplers``, the config's ``sample:`` section and the docs all read this catalogue, so one name
means one algorithm everywhere.

Names are canonical with hyphens (``euler-maruyama``); ``_`` is accepted for ``-`` (``euler_maruyama``). A spec
string may carry options: ``"unipc:order=3,variant=bh1"`` (:func:`parse_sampler`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffusionlab.checks import brief
from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import carries_x0
from diffusionlab.processes.grid import GRID_KINDS, TimeGrid, as_grid

#: what a sampler may require of a process, and how to say it
REQUIREMENTS = {
    "continuous": ("a continuous-time SDE (vp-sde, subvp-sde, ve-sde)", lambda p: not p.discrete),
    "unit_scale": ("a variance-exploding process (ve, ve-sde: s_t = 1)", lambda p: p.unit_scale),
}


# ---- option types -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """A sampler option: ``kind`` one of ``number``, ``integer``, ``bool``, ``choice``; bounds or choices; a doc."""

    kind: str
    doc: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def check(self, sampler: str, name: str, value):
        """``value`` validated (and converted: integers stay ints, numbers become floats)."""
        where = f"sampler {sampler!r} option {name}"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise DiffusionLabError(f"{where} must be true or false, got {brief(value)}")
            return value
        if self.kind == "choice":
            if value not in self.choices or (isinstance(value, bool) and not any(c is value for c in self.choices)):
                raise DiffusionLabError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {brief(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DiffusionLabError(f"{where} must be {self.describe()}, got {brief(value)}")
        if self.kind == "integer" and (not isinstance(value, int)):
            raise DiffusionLabError(f"{where} must be {self.describe()}, got {brief(value)}")
        v = value if self.kind == "integer" else float(value)
        if math.isnan(v) or (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            raise DiffusionLabError(f"{where} must be {self.describe()}, got {brief(value)}")
        return v

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        what = "an integer" if self.kind == "integer" else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{what} >= {self.low:g}"
        return what


def number(doc: str = "", low: float | None = None, high: float | None = None) -> Option:
    return Option("number", doc, low, high)


def integer(doc: str = "", low: int | None = None, high: int | None = None) -> Option:
    return Option("integer", doc, low, high)


def flag(doc: str = "") -> Option:
    return Option("bool", doc)


def one_of(*choices, doc: str = "") -> Option:
    return Option("choice", doc, choices=tuple(choices))


# ---- evaluation counts ------------------------------------------------------------------------------------------
def per_step(k: int = 1) -> Callable:
    """``nfe(grid, options) = k`` evaluations per step."""
    return lambda grid, opts: k * grid.steps


def budget_per_step(k: int = 1) -> Callable:
    """``steps_for_budget(budget, process, options) = budget // k`` (at least 1 step)."""
    def steps(budget: int, process, opts) -> int:
        if budget < k:
            raise DiffusionLabError(f"a budget of {budget} evaluations is below the {k} one step needs")
        return budget // k
    return steps


# ---- the spec ---------------------------------------------------------------------------------------------------
@dataclass
class SamplerSpec:
    """One registered sampler (module docstring). Call it like the function; :meth:`run` validates first."""

    name: str
    fn: Callable
    summary: str
    reference: str
    options: dict[str, Option] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    stochastic: bool | Callable[[dict], bool] = False
    default_grid: str = "uniform"
    default_steps: int | None = None
    default_sig_max: float | None = None
    nfe: Callable[[TimeGrid, dict], int | None] = per_step(1)
    steps_for_budget: Callable[[int, Any, dict], int] | None = None
    adaptive: bool = False

    def __post_init__(self):
        params = inspect.signature(self.fn).parameters
        missing = [k for k in self.options if k not in params]
        if missing:
            raise DiffusionLabError(f"sampler {self.name!r} declares options its function does not take: {missing}")
        self.takes_noise = "noise" in params
        self.defaults = {k: params[k].default for k in self.options}
        if self.steps_for_budget is None:
            self.steps_for_budget = budget_per_step(1)
        if self.default_grid not in GRID_KINDS:
            raise DiffusionLabError(f"sampler {self.name!r}: unknown default grid {self.default_grid!r}")

    # -- metadata ---------------------------------------------------------------------------------------------
    def is_stochastic(self, options: dict | None = None) -> bool:
        """Whether a call with ``options`` draws noise."""
        opts = self.resolve(options or {})
        return bool(self.stochastic(opts)) if callable(self.stochastic) else bool(self.stochastic)

    def runs_on(self, process) -> bool:
        return all(REQUIREMENTS[r][1](process) for r in self.requires)

    def check_process(self, process) -> None:
        for r in self.requires:
            what, ok = REQUIREMENTS[r]
            if not ok(process):
                raise DiffusionLabError(f"sampler {self.name!r} needs {what}; the model's process is {process!r}")

    def validate(self, options: dict) -> dict:
        """The given options checked against the declared ones (unknown ones refused with the allowed list)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise DiffusionLabError(
                f"sampler {self.name!r} takes no option {', '.join(unknown)}; its options: {allowed}"
            )
        return {k: self.options[k].check(self.name, k, v) for k, v in options.items()}

    def resolve(self, options: dict) -> dict:
        """Every option: the given ones (validated) over the function's defaults."""
        return {**self.defaults, **self.validate(options)}

    def grid(self, process, grid=None, kind: str | None = None, **grid_options) -> TimeGrid:
        """The grid for a call: a :class:`TimeGrid`, a number of steps, a sequence of times or None (the sampler's
        default steps; on a chain with fewer steps, all of them), of ``kind`` (default: the sampler's), started at
        the sampler's ``default_sig_max`` unless ``grid_options`` give ``sig_max`` (None there: the process's
        ``T``)."""
        if grid is None:
            grid = self.default_steps
            if grid is not None and process.discrete:
                grid = min(grid, process.T)
        if grid is None or (isinstance(grid, int) and not isinstance(grid, bool)):
            grid_options = {"sig_max": self.default_sig_max, **grid_options}
        return as_grid(process, grid, kind or self.default_grid, **grid_options)

    def count(self, grid: TimeGrid, options: dict | None = None) -> int | None:
        """Evaluations of the model per sample path on ``grid`` (None: adaptive)."""
        return self.nfe(grid, self.resolve(options or {}))

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, model, x: torch.Tensor, grid=None, noise=None, progress: bool = False, kind: str | None = None,
            **options) -> torch.Tensor:
        """Validate the options and the process, build the grid, and sample from ``x`` (a draw at the grid's start).
        ``noise`` (a NoiseSource or a torch.Generator seeding one) reaches the sampler only if it takes noise."""
        opts = self.validate(options)
        self.check_process(model.process)
        g = self.grid(model.process, grid, kind)
        if self.takes_noise:
            return self.fn(model, x, g, noise=noise, progress=progress, **opts)
        return self.fn(model, x, g, progress=progress, **opts)

    __call__ = run

    def describe(self) -> str:
        """One paragraph for help texts and the docs."""
        opts = "; ".join(f"{k} ({o.describe()}, default {self.defaults[k]!r})" for k, o in self.options.items())
        needs = ", ".join(REQUIREMENTS[r][0] for r in self.requires) or "any process"
        return f"{self.name}: {self.summary} [{self.reference}]. Runs on {needs}. Options: {opts or 'none'}."


# ---- the registry -----------------------------------------------------------------------------------------------
SAMPLERS: dict[str, SamplerSpec] = {}


def canonical(name) -> str:
    if not isinstance(name, str) or not name:
        raise DiffusionLabError(f"a sampler name must be a non-empty string, got {brief(name)}")
    return name.strip().replace("_", "-")


def register_sampler(name: str, summary: str, reference: str, **meta):
    """Decorator registering ``fn`` under ``name`` with the metadata of :class:`SamplerSpec`; returns ``fn`` run as
    one trajectory of a self-conditioned model (:func:`~diffusionlab.parametrization.carries_x0`), which the
    catalogue holds too."""
    def deco(fn: Callable) -> Callable:
        key = canonical(name)
        fn = carries_x0(fn)
        SAMPLERS[key] = SamplerSpec(key, fn, summary, reference, **meta)
        return fn
    return deco


def unregister_sampler(name: str) -> None:
    SAMPLERS.pop(canonical(name), None)


def sampler_names(process=None) -> list[str]:
    """Registered names (those that run on ``process`` if given), sorted."""
    return sorted(n for n, s in SAMPLERS.items() if process is None or s.runs_on(process))


def get_sampler(name: str) -> SamplerSpec:
    """The spec of ``name``; :class:`DiffusionLabError` listing the registered names otherwise."""
    key = canonical(name)
    if key not in SAMPLERS:
        raise DiffusionLabError(f"unknown sampler {brief(name)}; allowed: {', '.join(sampler_names())}")
    return SAMPLERS[key]


def spec_of(sampler) -> SamplerSpec:
    """The spec of a name, a spec, or a registered sampler function."""
    if isinstance(sampler, SamplerSpec):
        return sampler
    if isinstance(sampler, str):
        return get_sampler(sampler)
    for spec in SAMPLERS.values():
        if spec.fn is sampler:
            return spec
    raise DiffusionLabError(f"{sampler!r} is not a registered sampler (register it with register_sampler)")


def parse_sampler(text: str) -> tuple[SamplerSpec, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` (values parsed as YAML scalars) -> ``(spec, options)``."""
    from diffusionlab.configuration import parse_scalar

    name, _, rest = str(text).partition(":")
    spec = get_sampler(name)
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DiffusionLabError(f"sampler spec {text!r}: options are key=value pairs separated by commas")
        options[key.strip()] = parse_scalar(raw.strip())
    return spec, spec.validate(options)
