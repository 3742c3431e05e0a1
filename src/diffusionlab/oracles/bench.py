"""Sampler benchmark on exact Gaussian-mixture oracles: error measures with their noise floors, the catalogue of
samplers by CLI name with their NFE budgets, and the table of errors against NFE.

Every run is described in the scaled variable ``y = x / s`` at EDM noise level ``sig = sigma / s`` (see
:mod:`~diffusionlab.samplers.fewstep`): a run starts at ``y_0 = x_0 + sig_start eps`` -- an *exact* draw of the
noisy marginal, built from draws ``(x_0, eps)`` shared by every run (so runs differ only by the solver, and a
peer whose grid starts at a slightly different level gets the same ``x_0`` and ``eps``) -- and ends at
``sig_end``, where its target is the exact mixture ``p(y; sig_end) = sum_k w_k N(m_k, S_k + sig_end^2 K)``. The
measures, each with its floor:

- **coupled error** (deterministic solvers): RMS over samples of ``||y_N - y_ref||`` against the probability-flow
  ODE solved from the same ``y_0`` by Dormand-Prince with ``rtol = atol = 1e-9`` in ``sig``
  (:func:`reference_solution`); it isolates the discretisation error. Floor: the reference's own error,
  bounded by its distance to a second solve at 10x looser tolerances (reported; about 1e-8 to 1e-7).
- **sliced Wasserstein-2** between the samples and fresh exact sample sets of the same size, over ``P = 256``
  random directions (:func:`sliced_w2`; averaged over 4 fresh sets). Floor: the same measure of an independent
  exact set of that size (mean and standard deviation over repeats): an exact sampler's SW2 is distributed like
  the floor. On multimodal data SW2 is heavy-tailed (it is dominated by how the mass splits between far-apart
  components), so one problem's draws can be unlucky; :func:`floor_check` decides "within the floor" over
  independent problems.
- **mixture-weight error**: each sample assigned to its most likely component (the Bayes classifier of
  ``p(y; sig_end)``), L1 distance between the assignment frequencies and the true weights. Floor: the same for
  exact sets of that size.

Samplers are the catalogue's (:mod:`diffusionlab.samplers`), by name with optional inline options
(``unipc:order=3,variant=bh1``); a budget ``--nfe N`` becomes steps by each sampler's own ``steps_for_budget``
(actual NFE <= N): one step per evaluation for most, ``heun`` ``N // 2`` steps on an SDE grid (``(N + 1) // 2`` on a
chain, whose last step to the data costs 1), ``pc`` ``N // (1 + n_corrector)``, ``annealed-langevin`` levels of
``n_steps_each = max(1, (N - 1) // 10)`` steps plus a denoising step; ``ode-adaptive`` is adaptive (dopri5,
``rtol = atol = 1e-7`` here), the budget does not apply and the actual count is reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.oracles.mixture import GaussianMixtureOracle, load_spec
from diffusionlab.odeint import solve
from diffusionlab.processes.grid import GRID_KINDS, TimeGrid, make_grid
from diffusionlab.samplers import NoiseSource, parse_sampler, sampler_names
from diffusionlab.utils import mean_and_stderr

_F64 = torch.float64
RK45_TOL = 1e-7
REFERENCE_TOL = 1e-9
TRUTH_SETS = 4  # fresh exact sets each run's SW2 is averaged over


# ---- builtin mixtures -----------------------------------------------------------------------------------------
def ring_spec(k: int = 8, radius: float = 2.0, std: float = 0.1) -> dict:
    """``k`` equal-weight isotropic Gaussians (std ``std``) evenly spaced on a circle of radius ``radius``."""
    ang = 2.0 * math.pi * np.arange(k) / k
    means = np.stack([radius * np.cos(ang), radius * np.sin(ang)], 1)
    covs = np.stack([std**2 * np.eye(2)] * k)
    return {"weights": [1.0 / k] * k, "means": means.tolist(), "covs": covs.tolist(), "name": f"ring{k}"}


def anisotropic_spec(dim: int = 16, k: int = 6, seed: int = 0, mean_scale: float = 2.0,
                     eig_range: tuple[float, float] = (0.01, 1.0)) -> dict:
    """``k`` Gaussians in ``dim`` dimensions with unequal weights, means ``N(0, mean_scale^2 I)`` and anisotropic
    covariances ``Q diag(lambda) Q^T`` (``Q`` random orthogonal, ``lambda`` log-uniform in ``eig_range``,
    condition number 100 by default). NumPy's PCG64 stream with ``seed`` makes it reproducible."""
    rng = np.random.default_rng(seed)
    w = 1.0 + np.arange(k)[::-1].astype(float)  # k, k-1, ..., 1
    means = mean_scale * rng.standard_normal((k, dim))
    covs = []
    lo, hi = np.log(eig_range[0]), np.log(eig_range[1])
    for _ in range(k):
        q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
        q = q * np.sign(np.diag(r))[None, :]
        lam = np.exp(rng.uniform(lo, hi, dim))
        lam[0], lam[-1] = eig_range  # the full range in every component
        c = (q * lam[None, :]) @ q.T
        covs.append(0.5 * (c + c.T))
    return {"weights": (w / w.sum()).tolist(), "means": means.tolist(), "covs": np.stack(covs).tolist(),
            "name": f"aniso{dim}"}


BUILTIN_SPECS = {"ring8": ring_spec, "aniso16": anisotropic_spec}


def resolve_spec(arg) -> dict:
    """A mixture spec: a dict, a builtin name (``ring8``, ``aniso16``) or a JSON file path."""
    if isinstance(arg, dict):
        return arg
    if str(arg) in BUILTIN_SPECS:
        return BUILTIN_SPECS[str(arg)]()
    return load_spec(arg)


# ---- error measures -------------------------------------------------------------------------------------------
def random_directions(dim: int, num: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` uniformly random unit vectors in ``R^dim`` as the columns of a float64 ``(dim, num)`` matrix."""
    v = torch.randn(dim, num, generator=generator, dtype=_F64)
    return v / v.norm(dim=0, keepdim=True)


def projected_quantiles(a: torch.Tensor, directions: torch.Tensor, m: int | None = None) -> np.ndarray:
    """The projections of the samples ``a`` (``(n, ...)``, flattened) on each unit direction (``(D, P)``), sorted:
    a float64 ``(P, m)`` array of the quantiles at levels ``(i + 1/2) / m`` (the sorted projections themselves
    when ``m = n``; linear interpolation otherwise)."""
    a = a.reshape(a.shape[0], -1).to(_F64).cpu()
    if a.shape[1] != directions.shape[0]:
        raise DiffusionLabError(f"sliced W2: samples of dimension {a.shape[1]} against directions in "
                                f"{directions.shape[0]} dimensions")
    srt = np.sort((a @ directions).T.numpy(), axis=1)  # NumPy sorts rows several times faster than torch here
    n = srt.shape[1]
    if m is None or m == n:
        return srt
    pos = (np.arange(m) + 0.5) / m * n - 0.5
    lo = np.clip(np.floor(pos), 0, n - 1).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = np.clip(pos - lo, 0.0, 1.0)[None, :]
    return srt[:, lo] * (1 - frac) + srt[:, hi] * frac


def sliced_w2_from_quantiles(qa: np.ndarray, qb: np.ndarray) -> float:
    """``sqrt(mean over directions and levels of (qa - qb)^2)`` for :func:`projected_quantiles` of two sets."""
    return float(np.sqrt(np.mean(np.square(qa - qb))))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-2 distance ``sqrt(mean_theta W2^2(theta^T a, theta^T b))`` between two sample sets
    (``(n, ...)``, flattened) over the unit ``directions`` (``(D, P)``); 1-D W2 from sorted projections
    (quantiles when the sizes differ)."""
    m = max(a.shape[0], b.shape[0])
    return sliced_w2_from_quantiles(projected_quantiles(a, directions, m), projected_quantiles(b, directions, m))


def coupled_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS over samples of the Euclidean distance ``||x_i - ref_i||`` (same initial noise, same shapes)."""
    d = (x.to(_F64) - ref.to(_F64).to(x.device)).reshape(x.shape[0], -1)
    return float(d.square().sum(1).mean().sqrt())


def weight_error(oracle: GaussianMixtureOracle, y: torch.Tensor, sig: float) -> float:
    """L1 distance between the frequencies of the most likely components of ``y`` (under ``p(y; sig)``,
    ``y = x_0 + sig eps``) and the true weights."""
    comp = oracle.component_at(y, 1.0, sig).cpu()
    freq = torch.bincount(comp, minlength=oracle.num_components).to(_F64) / comp.numel()
    return float((freq - oracle.weights.cpu()).abs().sum())


def reference_solution(oracle: GaussianMixtureOracle, y0: torch.Tensor, sig_start: float, sig_end: float,
                       rtol: float = REFERENCE_TOL, atol: float = REFERENCE_TOL) -> tuple[torch.Tensor, int]:
    """The probability-flow ODE ``dy/dsig = E[eps | y]`` (``y = x_0 + sig eps``) from ``sig_start`` to ``sig_end``
    (may be 0) by torchdiffeq's Dormand-Prince in float64: ``(y_end, evaluations)``."""
    start = oracle.nfe

    def velocity(sig, y):
        return oracle.posterior_at(y, 1.0, float(sig))[0]

    out = solve(velocity, y0.to(_F64), float(sig_start), float(sig_end), "dopri5", rtol, atol)
    return out, oracle.nfe - start


# ---- the samplers by name ------------------------------------------------------------------------------------
#: variants the benchmark runs besides every registered sampler (the same algorithms with other options)
BENCH_VARIANTS = ("unipc:order=3", "unipc:order=3,variant=bh1")


def bench_samplers(process) -> list[str]:
    """Every registered sampler that runs on ``process``, plus :data:`BENCH_VARIANTS`."""
    names = sampler_names(process)
    return names + [v for v in BENCH_VARIANTS if parse_sampler(v)[0].name in names]


@dataclass
class Plan:
    """How to run sampler ``name`` (a catalogue name with optional inline options) within a budget: the spec, its
    :class:`~diffusionlab.processes.grid.TimeGrid`, ``steps``, options, the ``nfe`` it will make (None: adaptive),
    whether it is ``deterministic``, its noise source, and the start and end levels ``sig = sigma / s`` and scales."""

    name: str
    spec: object
    grid_kind: str
    steps: int | None
    grid: object
    options: dict = field(default_factory=dict)
    nfe: int | None = None
    deterministic: bool = True
    noise: object = None
    sig_end: float = 0.0
    sig_start: float = 0.0
    s_start: float = 1.0
    s_end: float = 1.0

    def run(self, model, x: torch.Tensor) -> torch.Tensor:
        return self.spec.run(model, x, self.grid, noise=self.noise, **self.options)


def _check_budget(budget) -> int:
    from diffusionlab.checks import at_most
    from diffusionlab.processes.grid import MAX_GRID_STEPS

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise DiffusionLabError(f"--nfe must be an integer >= 1, got {budget!r}")
    return at_most("--nfe", budget, "steps", MAX_GRID_STEPS)


def plan(name: str, process, budget: int | None, grid: str | None = None, eps: float | None = None,
         generator: torch.Generator | None = None) -> Plan:
    """The :class:`Plan` of sampler ``name`` on ``process`` within ``budget`` evaluations per sample path
    (module docstring); ``grid`` one of :data:`~diffusionlab.processes.grid.GRID_KINDS` (started at ``T``; ``edm``
    at 80), or None, ``auto`` or ``default``: the sampler's default grid with its start level (recorded as the
    kind, or as ``default`` for ``default``), or a :class:`~diffusionlab.processes.grid.TimeGrid` (e.g. a fitted
    one, :mod:`diffusionlab.samplers.fitgrid`: run as is, recorded by its kind); ``eps`` the last time of an SDE grid (default: the process's);
    ``generator`` seeds stochastic samplers."""
    spec, options = parse_sampler(name)
    spec.check_process(process)
    if isinstance(grid, TimeGrid):  # an explicit grid (a fitted one): its own steps
        deterministic = not spec.is_stochastic(options)
        return Plan(name, spec, grid.kind, grid.steps, grid, options, spec.count(grid, options), deterministic,
                    None if deterministic else NoiseSource(process.cov, generator), sig_end=grid.sig[-1],
                    sig_start=grid.sig[0], s_start=grid.s[0], s_end=grid.s[-1])
    default = grid in (None, "auto", "default")  # the sampler's own grid: its kind and its start level
    kind = spec.default_grid if default else grid
    if kind not in GRID_KINDS:
        raise DiffusionLabError(f"unknown time grid {grid!r}; allowed: auto, default, {', '.join(GRID_KINDS)}")
    if process.discrete and eps is not None:
        raise DiffusionLabError("--eps applies to SDE processes only (a chain ends at the data, t = 0)")
    if spec.adaptive:
        options = {"rtol": RK45_TOL, "atol": RK45_TOL, **options}
        steps = 1
    else:
        budget = _check_budget(budget)
        if spec.name == "annealed-langevin":
            options = {"n_steps_each": max(1, (budget - 1) // 10), **options}
        steps = spec.steps_for_budget(budget, process, spec.resolve(options))
        if process.discrete and steps > process.T:
            raise DiffusionLabError(f"--nfe {budget} asks for {steps} steps, more than the chain's T = {process.T}")
    g = spec.grid(process, steps, None, eps=eps) if default else make_grid(process, steps, kind, eps=eps)
    deterministic = not spec.is_stochastic(options)
    noise = None if deterministic else NoiseSource(process.cov, generator)
    label = "adaptive" if spec.adaptive else ("default" if grid == "default" else kind)
    return Plan(name, spec, label, None if spec.adaptive else steps, g, options,
                spec.count(g, options), deterministic, noise, sig_end=g.sig[-1], sig_start=g.sig[0],
                s_start=g.s[0], s_end=g.s[-1])


# ---- the benchmark --------------------------------------------------------------------------------------------
class Problem:
    """One benchmark problem: an oracle, ``num`` shared draws ``(x_0, eps)``, fixed projection directions, and caches
    of exact sample sets, floors and reference solutions keyed by the EDM levels."""

    def __init__(self, oracle: GaussianMixtureOracle, num: int = 4000, seed: int = 0, projections: int = 256,
                 repeats: int = 8, device=None, coupled: bool = True):
        if isinstance(num, bool) or not isinstance(num, int) or num < 2:
            raise DiffusionLabError(f"--num must be an integer >= 2, got {num!r}")
        self.oracle, self.num, self.seed, self.repeats = oracle, num, seed, repeats
        self.coupled = coupled  # False: skip the reference solves (the floor checks need only SW2 and weights)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(seed)
        self.x0 = oracle.sample_data(num, g, device=self.device)
        self.eps = oracle.process.cov.sample((num, *oracle.sample_shape), generator=g, dtype=_F64).to(self.device)
        self.directions = random_directions(oracle.dim, projections, torch.Generator().manual_seed(seed + 1))
        self._truth: dict = {}
        self._quant: dict = {}
        self._floors: dict = {}
        self._refs: dict = {}

    def start(self, sig_start: float) -> torch.Tensor:
        """``y_0 = x_0 + sig_start eps``: an exact draw of ``p(y; sig_start)``, shared by all runs."""
        return self.x0 + float(sig_start) * self.eps

    def truth(self, sig: float, index: int) -> torch.Tensor:
        """Exact set ``index`` of ``num`` draws of ``p(y; sig)`` (independent of the shared draws): sets
        ``0 .. TRUTH_SETS - 1`` are the fresh sets every run is compared with; later ones are the floor's exact
        stand-ins."""
        key = (round(float(sig), 15), index)
        if key not in self._truth:
            g = torch.Generator().manual_seed(10_000 + 97 * self.seed + index)
            self._truth[key] = self.oracle.sample_at(self.num, 1.0, float(sig), g)
        return self._truth[key]

    def truth_quantiles(self, sig: float, index: int) -> np.ndarray:
        """:func:`projected_quantiles` of :meth:`truth` (cached)."""
        key = (round(float(sig), 15), index)
        if key not in self._quant:
            self._quant[key] = projected_quantiles(self.truth(sig, index), self.directions)
        return self._quant[key]

    def _sw2_stat(self, q: np.ndarray, sig: float) -> float:
        return float(np.mean([sliced_w2_from_quantiles(q, self.truth_quantiles(sig, j)) for j in range(TRUTH_SETS)]))

    def sliced_w2(self, y: torch.Tensor, sig: float) -> float:
        """The SW2 measure of ``y`` (``num`` samples) at level ``sig``: its mean SW2 to the ``TRUTH_SETS`` fresh exact
        sets (averaging over several fresh sets halves the measure's spread)."""
        return self._sw2_stat(projected_quantiles(y, self.directions, self.num), sig)

    def floors(self, sig: float) -> dict:
        """Noise floors at level ``sig``: the same measures applied to exact sets of the same size (sets
        ``TRUTH_SETS + r``, ``r < repeats``) -- the distribution an exact sampler's measures have: mean and
        standard deviation over ``repeats``."""
        key = round(float(sig), 15)
        if key not in self._floors:
            sw, we = [], []
            for r in range(self.repeats):
                sw.append(self._sw2_stat(self.truth_quantiles(sig, TRUTH_SETS + r), sig))
                we.append(weight_error(self.oracle, self.truth(sig, TRUTH_SETS + r), sig))
            std = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"))  # noqa: E731
            self._floors[key] = {"sw2_floor": float(np.mean(sw)), "sw2_floor_std": std(sw),
                                 "weight_floor": float(np.mean(we)), "weight_floor_std": std(we)}
        return self._floors[key]

    def reference(self, sig_start: float, sig_end: float) -> dict:
        """The ODE solution from :meth:`start` (``REFERENCE_TOL``) and an error estimate: its distance to a 10x looser
        solve (an upper bound, roughly 10x, of its own error)."""
        # starts that agree to 6 significant digits share a reference: a relative change of 1e-6 in sig_start
        # moves the ODE's end point by < 1e-7 on the benchmark mixtures (the flow contracts at high noise)
        key = (float(f"{float(sig_start):.6g}"), round(float(sig_end), 9))
        if key not in self._refs:
            y0 = self.start(sig_start)
            t0 = time.perf_counter()
            ref, nfe = reference_solution(self.oracle, y0, sig_start, sig_end)
            est = None
            if not self._refs:  # the error estimate once per problem (a second, looser solve)
                loose, _ = reference_solution(self.oracle, y0, sig_start, sig_end, 10 * REFERENCE_TOL,
                                              10 * REFERENCE_TOL)
                est = coupled_error(loose, ref)
            self._refs[key] = {"y": ref, "nfe": nfe, "error_estimate": est, "seconds": time.perf_counter() - t0}
        return self._refs[key]

    def score(self, y_end: torch.Tensor, sig_start: float, sig_end: float, deterministic: bool,
              coupled: bool = True) -> dict:
        """The three measures of a run (coupled error only for deterministic ones, and if ``coupled``) and the
        floors at ``sig_end``."""
        out = {"sw2": self.sliced_w2(y_end, sig_end),
               "weight_error": weight_error(self.oracle, y_end, sig_end), **self.floors(sig_end)}
        if deterministic and coupled and self.coupled:
            ref = self.reference(sig_start, sig_end)
            out["coupled"] = coupled_error(y_end, ref["y"])
            out["reference_nfe"] = ref["nfe"]
            out["reference_error"] = ref["error_estimate"]
        return out


def run_diffusionlab(problem: Problem, process, name: str, budget: int | None, grid: str | None = None,
                     dtype=_F64, coupled: bool = True) -> dict:
    """Run one of this library's samplers on ``problem`` (``oracle.process`` is ``process``) within ``budget``;
    returns the record of :func:`benchmark` (without the coupled error unless ``coupled``)."""
    oracle = problem.oracle
    g = torch.Generator(device=problem.device).manual_seed(problem.seed + 7)
    p = plan(name, process, budget, grid, generator=g)
    x = (p.s_start * problem.start(p.sig_start)).to(dtype)
    oracle.nfe = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        out = p.run(oracle, x)
    seconds = time.perf_counter() - t0
    rec = {"family": "diffusionlab", "sampler": name, "grid": p.grid_kind, "budget": budget, "nfe": oracle.nfe,
           "steps": p.steps, "sig_start": p.sig_start, "sig_end": p.sig_end, "deterministic": p.deterministic,
           "adaptive": p.spec.adaptive, "seconds": seconds}
    rec.update(problem.score(out.to(_F64) / p.s_end, p.sig_start, p.sig_end, p.deterministic, coupled))
    return rec


def floor_check(oracle: GaussianMixtureOracle, name: str, budget: int, grid: str | None = None, num: int = 4000,
                seeds=range(1, 17), projections: int = 256, repeats: int = 4, runner=None) -> dict:
    """Is sampler ``name`` at ``budget`` within the noise floor? One problem's measures depend on the luck of its
    shared draws (SW2 on multimodal data is heavy-tailed, and so is the weight error at 2000 samples), so compare
    over independent problems: for each seed a fresh :class:`Problem` (new shared draws, fresh sets, directions)
    gives the sampler's measures and the floor (the same measures of ``repeats`` exact sets of the same size).
    Returns the means and standard errors over seeds, Welch's ``z = (mean - floor mean) / sqrt(se^2 + se_floor^2)``
    for SW2 and weight error, ``within`` (both ``z < 2``) and the values per seed (``per_seed``). ``runner(problem)
    -> record`` runs something else than this library's ``name`` (a peer) on each problem."""
    sw, fl, we, wf = [], [], [], []
    label = grid.kind if isinstance(grid, TimeGrid) else (grid or parse_sampler(name)[0].default_grid)
    for seed in seeds:
        pb = Problem(oracle, num=num, seed=seed, projections=projections, repeats=repeats, coupled=False)
        if runner is not None:
            rec = runner(pb)
        else:
            rec = run_diffusionlab(pb, oracle.process, name, budget, grid, coupled=False)
        sw.append(rec["sw2"])
        fl.append(rec["sw2_floor"])
        we.append(rec["weight_error"])
        wf.append(rec["weight_floor"])
    n = len(sw)

    def stats(a, b):
        (ma, sa), (mb, sb) = mean_and_stderr(a), mean_and_stderr(b)
        sa, sb = (float("nan") if v is None else v for v in (sa, sb))
        return ma, sa, mb, sb, (ma - mb) / max(math.hypot(sa, sb), 1e-300)

    m, se, f, fse, z = stats(sw, fl)
    wm, wse, wfm, wfse, wz = stats(we, wf)
    return {"sampler": name, "budget": budget, "grid": label, "seeds": n, "num": num,
            "sw2_mean": m, "sw2_se": se, "sw2_floor_mean": f, "sw2_floor_se": fse, "sw2_z": z,
            "weight_mean": wm, "weight_se": wse, "weight_floor_mean": wfm, "weight_floor_se": wfse, "weight_z": wz,
            "within": bool(z < 2 and wz < 2), "per_seed": {"sw2": sw, "sw2_floor": fl, "weight": we, "weight_floor": wf}}


def benchmark(problem: Problem, process, budgets, samplers=None, grids=None, extra=None, progress=None) -> list[dict]:
    """Every sampler of ``samplers`` (default: those that run on ``process``) on every grid of ``grids`` (default:
    every kind and the sampler's own ``default`` grid for the deterministic few-step solvers, the default grid for
    the others) at every budget; ``extra`` is a callable ``extra(problem, budget) -> list of records`` for peers.
    Returns the records."""
    if samplers is None:
        samplers = bench_samplers(process)
    grids = [*GRID_KINDS, "default"] if grids is None else list(grids)
    if not process.discrete:
        grids = [g for g in grids if g != "trailing"]
    records = []
    for budget in budgets:
        for name in samplers:
            spec, opts = parse_sampler(name)
            every_grid = not spec.adaptive and not spec.is_stochastic(opts)
            kinds = grids if every_grid else [None]
            for kind in kinds:
                if spec.adaptive and budget != budgets[0]:
                    continue
                try:
                    rec = run_diffusionlab(problem, process, name, budget, kind)
                except DiffusionLabError as e:  # e.g. heun with --nfe 1
                    rec = {"family": "diffusionlab", "sampler": name, "grid": kind, "budget": budget, "skipped": str(e)}
                records.append(rec)
                if progress:
                    progress(rec)
        if extra is not None:
            for rec in extra(problem, budget):
                records.append(rec)
                if progress:
                    progress(rec)
    return records


# ---- tables and plots -----------------------------------------------------------------------------------------
def _label(rec: dict) -> str:
    g = rec.get("grid")
    return f"{rec['family']}:{rec['sampler']}" + (f" [{g}]" if g and g not in ("adaptive",) else "")


def best_by_budget(records: list[dict], family_pred, metric: str = "coupled") -> dict:
    """``{budget: record}``: the deterministic record with the smallest ``metric`` among families selected."""
    best = {}
    for r in records:
        if "skipped" in r or not r.get("deterministic") or metric not in r or not family_pred(r["family"]):
            continue
        if r.get("adaptive"):
            continue
        b = r["budget"]
        if b not in best or r[metric] < best[b][metric]:
            best[b] = r
    return best


def format_table(records: list[dict], metric: str = "coupled", title: str | None = None) -> str:
    """A text table: one row per sampler and grid, one column per budget, cells ``value (actual NFE)``."""
    budgets = sorted({r["budget"] for r in records if r.get("budget") is not None})
    rows: dict = {}
    for r in records:
        if "skipped" in r or metric not in r:
            continue
        rows.setdefault(_label(r), {})[r["budget"]] = r
    if not rows:
        return ""
    width = max(len(k) for k in rows) + 2
    lines = [title or metric, "sampler".ljust(width) + "".join(f"NFE<={b}".rjust(18) for b in budgets)]
    for label, cells in rows.items():
        line = label.ljust(width)
        for b in budgets:
            r = cells.get(b) or (cells.get(None) if b == budgets[0] else None)
            line += (f"{r[metric]:.3e} ({r['nfe']})".rjust(18) if r else "".rjust(18))
        lines.append(line)
    return "\n".join(lines)


def summary_lines(records: list[dict]) -> list[str]:
    """Per budget: the best deterministic sampler of this library and of the peers, and the floors."""
    ours = best_by_budget(records, lambda f: f == "diffusionlab")
    peers = best_by_budget(records, lambda f: f != "diffusionlab")
    lines = []
    for b in sorted(ours):
        o = ours[b]
        line = (f"NFE<={b}: best diffusionlab {_label(o)} coupled {o['coupled']:.3e}, SW2 {o['sw2']:.4f} "
                f"(floor {o['sw2_floor']:.4f} +- {o['sw2_floor_std']:.4f}), weight error {o['weight_error']:.4f} "
                f"(floor {o['weight_floor']:.4f})")
        if b in peers:
            p = peers[b]
            line += f"; best peer {_label(p)} coupled {p['coupled']:.3e}, SW2 {p['sw2']:.4f}"
        lines.append(line)
    return lines


def plot_records(records: list[dict], path, title: str = "") -> None:
    """Coupled error against actual NFE (log-log), one line per family and sampler at its best grid for each
    budget; diffusionlab solid (blues), diffusers dashed (oranges), k-diffusion dotted (greens)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    best: dict = {}
    for r in records:
        if "skipped" in r or "coupled" not in r or r.get("adaptive"):
            continue
        key = (r["family"], r["sampler"])
        cur = best.setdefault(key, {}).get(r["budget"])
        if cur is None or r["coupled"] < cur["coupled"]:
            best[key][r["budget"]] = r
    styles = {"diffusionlab": ("-", plt.cm.Blues), "diffusers": ("--", plt.cm.Oranges),
              "k-diffusion": (":", plt.cm.Greens)}
    fig, ax = plt.subplots(figsize=(9, 6))
    for fam, (ls, cmap) in styles.items():
        keys = [k for k in best if k[0] == fam]
        for i, key in enumerate(keys):
            pts = sorted((r["nfe"], r["coupled"]) for r in best[key].values())
            color = cmap(0.45 + 0.55 * i / max(1, len(keys) - 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3, lw=1.4 if fam == "diffusionlab"
                    else 1.0, color=color, label=f"{fam}:{key[1]}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo = min((p["coupled"] for v in best.values() for p in v.values()), default=1e-4)
    ax.set_ylim(max(lo / 2, 1e-8), 10.0)
    ax.set_xlabel("evaluations per sample (NFE)")
    ax.set_ylabel("coupled error vs reference ODE solution (RMS)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["ring_spec", "anisotropic_spec", "BUILTIN_SPECS", "resolve_spec", "random_directions", "sliced_w2", "projected_quantiles",
           "coupled_error", "weight_error", "reference_solution", "bench_samplers", "Plan", "plan", "Problem",
           "run_diffusionlab", "floor_check", "benchmark", "format_table", "summary_lines", "best_by_budget", "plot_records"]
