"""One time grid for every process: :class:`TimeGrid`, the points a sampler walks.

A grid is ``N + 1`` points ``p_0 > p_1 > ... > p_N`` of a process; a sampler makes ``N`` steps ``p_i -> p_{i+1}``
and evaluates the model at (some of) the points. On a discrete chain the points are integer steps
``T >= p_0 > ... > p_{N-1} >= 1`` followed by ``p_N = 0``, the data; on an SDE they are float times from ``p_0``
(``T`` by default) down to a small ``eps`` (the process's ``default_eps``). Every grid carries, in float64, the
marginal coefficients ``s`` and ``sigma`` at its points, the EDM level ``sig = sigma / s`` (Karras et al. 2022,
sec. 4: the noise level of the scaled variable ``y = x / s``) and ``lam = log(s / sigma) = -log sig`` (half the
log-SNR: DPM-Solver's lambda, ``+inf`` at the data), plus the exact transition and posterior of each step
(:meth:`~diffusionlab.processes.GaussianProcess.transition`): so DDPM, DDIM, Euler/Heun, DPM-Solver++, UniPC and
the SDE samplers all run on chains and SDEs alike where their maths allows.

Kinds (:func:`make_grid`; ``u_i = i / N``):

=============  =================================================================================================
``uniform``    SDE: ``t_i = T + u_i (eps - T)`` (score_sde). Chain: ``round(1 + (T - 1) k / (N - 1))``, from ``T``
               to 1 (DDIM's uniform skip)
``trailing``   chain only: ``round(T k / N)``, ``k = N .. 1``, from ``T`` to ``T / N`` (Lin et al. 2024, table 2:
               the same spacing all the way to the data, no evaluation spent at ``t = 1``)
``quadratic``  denser near the data: SDE ``t_i = eps + (T - eps)(1 - u_i)^2``; chain ``1 + (T - 1) q^2``
               (Song, Meng & Ermon 2021's quadratic skip)
``logsnr``     uniform in ``lambda`` between the ends (the DPM-Solver grid, Lu et al. 2022)
``karras``     EDM's grid (Karras et al. 2022, eq. 5) in ``sig``, exponent ``rho`` (7):
               ``sig_i = (sig_max^(1/rho) + u_i (sig_min^(1/rho) - sig_max^(1/rho)))^rho``
``edm``        ``karras`` started at EDM's ``sig_max = 80`` (Karras et al. 2022, sec. 3 and Table 1: the same
               ``sigma_max`` for every data set) where the process reaches higher (the cosine chain's last step
               has ``sig = 2e4``, the VP-SDE's 152), else at ``T``: the few-step solvers' default. A solver that
               predicts the data multiplies a network's eps error by ``sig``, so the levels far above the data's
               scale cost evaluations and accuracy and buy nothing: from ``sig = 80`` the start ``N(0, sigma^2 C)``
               misses the data's share ``s x_0`` by about ``sigma_data / 80`` of the noise.
=============  =================================================================================================

``logsnr`` and ``karras`` are mapped back to times by the process's inverse log-SNR (closed forms for the SDEs,
the nearest step on a chain, pushed apart where rounding would repeat a step; on a zero-terminal-SNR chain they
start at ``T - 1``, the last finite level). ``sig_max`` (optional) starts the grid at the time whose level is
``sig_max`` instead of at ``T`` (a clipped start); explicit times
(:class:`TimeGrid` itself) give any other grid.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.base import posterior_coefficients_between, transition_coefficients

_F64 = torch.float64
GRID_KINDS = ("uniform", "trailing", "quadratic", "logsnr", "karras", "edm")
#: the ``edm`` grid's start level (Karras et al. 2022, Table 1: sigma_max = 80)
EDM_SIG_MAX = 80.0
#: steps of an SDE grid when none are given (score_sde's N for the reverse SDE and PC samplers)
DEFAULT_SDE_STEPS = 1000


class TimeGrid:
    """The points ``p_0 > ... > p_N`` of ``process`` a sampler walks (module docstring).

    ``times``: for a chain, strictly decreasing integer steps in ``1..T`` (a final 0, the data, is appended when
    missing); for an SDE, strictly decreasing finite times in ``[0, T]``. Attributes (float64 host lists, index
    ``0..N``): ``times``, ``s``, ``sigma``, ``sig``, ``lam``; ``t`` the same times as a float64 tensor.
    """

    def __init__(self, process, times, kind: str = "explicit"):
        self.process = process
        self.kind = kind
        self.discrete = bool(process.discrete)
        t = self._checked(process, times)
        self.t = t
        s, sigma = process.coeffs(t.long() if self.discrete else t)
        self.s_t, self.sigma_t = s.to(_F64), sigma.to(_F64)
        sig = self.sigma_t / self.s_t
        if not bool((sig[1:] < sig[:-1]).all()) or float(sig[0]) <= 0:
            raise DiffusionLabError(f"the grid's noise levels sigma/s must decrease strictly, got {sig.tolist()}")
        self.times = [int(v) for v in t.tolist()] if self.discrete else t.tolist()
        self.s, self.sigma, self.sig = self.s_t.tolist(), self.sigma_t.tolist(), sig.tolist()
        self.lam = [math.inf if v == 0 else -math.log(v) for v in self.sig]

    # -- construction ---------------------------------------------------------------------------------------
    @staticmethod
    def _checked(process, times) -> torch.Tensor:
        try:
            t = torch.as_tensor(times).detach().cpu().reshape(-1)
            if not torch.is_tensor(times) and t.dtype.is_floating_point:
                t = torch.as_tensor(times, dtype=_F64).reshape(-1)  # Python floats keep all their digits
        except (TypeError, ValueError, RuntimeError):
            raise DiffusionLabError(f"a time grid must be a sequence of numbers, got {times!r}") from None
        if t.dtype == torch.bool or t.numel() < 1:
            raise DiffusionLabError(f"a time grid must be a non-empty sequence of numbers, got {times!r}")
        if process.discrete:
            if t.dtype.is_floating_point:
                if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
                    raise DiffusionLabError(f"a chain's grid holds integer steps in 0..{process.T}, got {t.tolist()}")
            t = t.long()
            if int(t.min()) < 0 or int(t.max()) > process.T:
                raise DiffusionLabError(f"grid steps must lie in 1..{process.T}, got {t.min().item()}..{t.max().item()}")
            if int(t[-1]) != 0:
                t = torch.cat([t, torch.zeros(1, dtype=torch.long)])
            if t.numel() < 2:
                raise DiffusionLabError("a chain's grid needs at least one step above the data (t >= 1)")
            t = t.to(_F64)
        else:
            t = t.to(_F64)
            if t.numel() < 2:
                raise DiffusionLabError(f"a time grid needs at least 2 times (start and end), got {t.tolist()}")
            if not bool(torch.isfinite(t).all()):
                raise DiffusionLabError(f"time grid has a non-finite time: {t.tolist()}")
            if float(t[-1]) < 0 or float(t[0]) > float(process.T):
                raise DiffusionLabError(f"grid times must lie in [0, T = {process.T}], got {t.tolist()}")
        if not bool((t[1:] < t[:-1]).all()):
            i = int(torch.nonzero(t[1:] >= t[:-1])[0])
            raise DiffusionLabError(
                f"a time grid must be strictly decreasing, but t[{i}] = {t[i].item():g} <= t[{i + 1}] = "
                f"{t[i + 1].item():g}"
            )
        return t

    # -- what samplers read ---------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """``N``: the number of steps (intervals)."""
        return len(self.times) - 1

    @property
    def ends_at_data(self) -> bool:
        """Whether the last point is the data (``sigma = 0``: a chain, or an SDE grid ending at ``t = 0``)."""
        return self.sig[-1] == 0.0

    def time(self, i: int, like: torch.Tensor):
        """The model's time at point ``i``: an int on a chain, a float64 0-d tensor on ``like``'s device on an SDE."""
        v = self.times[i]
        return v if self.discrete else torch.tensor(v, dtype=_F64, device=like.device)

    @property
    def start_std(self) -> float:
        """The scale of the draw a sampler starts from: the process's prior ``N(0, prior_std^2 C)`` at ``T``, and at
        a grid started below ``T`` (a clipped start) the marginal's noise there, ``N(0, sigma_0^2 C)``."""
        return self.process.prior_std if self.times[0] >= self.process.T else self.sigma[0]

    def start_sample(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """``shape`` draws at the grid's first point (:attr:`start_std`), from the process's prior sampler."""
        x = self.process.prior_sample(tuple(shape), generator=generator, device=device, dtype=dtype)
        scale = self.start_std / self.process.prior_std  # exactly 1.0 at T: the prior draw itself
        return x if scale == 1.0 else x * scale

    def transition(self, i: int) -> tuple[float, float]:
        """``(a, G^2)`` of step ``i``: ``x_{p_i} = a x_{p_{i+1}} + G L z`` exactly."""
        a, g2 = transition_coefficients(self.s_t[i], self.sigma_t[i], self.s_t[i + 1], self.sigma_t[i + 1])
        return float(a), float(g2)

    def posterior(self, i: int) -> tuple[float, float, float]:
        """``(A, B, V)`` of step ``i``: ``q(x_{p_{i+1}} | x_{p_i}, x_0) = N(A x + B x_0, V C)``."""
        A, B, V = posterior_coefficients_between(self.s_t[i], self.sigma_t[i], self.s_t[i + 1], self.sigma_t[i + 1])
        return float(A), float(B), float(V)

    def __len__(self) -> int:
        return len(self.times)

    def __repr__(self) -> str:
        ends = f"{self.times[0]:g} .. {self.times[-1]:g}"
        return f"TimeGrid({self.kind}, {self.steps} steps, t = {ends}, sig = {self.sig[0]:.4g} .. {self.sig[-1]:.4g})"


# ---- builders -------------------------------------------------------------------------------------------------
#: the most steps a grid may have without an override (DIFFUSIONLAB_MAX_STEPS): a grid holds float64 host arrays
#: and each step is one or more network evaluations, so 10^9 steps (8 GB of times alone) is a typing error
MAX_GRID_STEPS = 100_000


def _check_steps(steps, upper: int | None = None) -> int:
    from diffusionlab.checks import at_most, brief

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DiffusionLabError(f"number of sampling steps must be an integer >= 1, got {brief(steps)}")
    if upper is not None and steps > upper:
        raise DiffusionLabError(f"number of sampling steps must be <= T = {upper} on this chain, got {steps}")
    return at_most("the number of sampling steps", steps, "steps", MAX_GRID_STEPS)


def _spread(ts: list[int], top: int) -> list[int]:
    """Descending integers made strictly decreasing and >= the room left below (each step >= 1), top kept <= ``top``."""
    n = len(ts)
    ts[0] = min(ts[0], top)
    for k in range(1, n):
        ts[k] = min(ts[k], ts[k - 1] - 1)
    for k in range(n - 1, -1, -1):
        ts[k] = max(ts[k], n - k)
    return ts


def _chain_steps(chain, steps: int, kind: str, rho: float, start: int) -> list[int]:
    """Integer steps ``start >= t_1 > ... > t_N >= 1`` of a chain (descending)."""
    if steps == 1:
        return [start]
    u = torch.arange(steps, dtype=_F64) / (steps - 1)
    if kind == "trailing":  # start k / N >= k and at least 1 apart since N <= start
        k = torch.arange(steps, 0, -1, dtype=_F64)
        return torch.floor(start * k / steps + 0.5).long().tolist()
    if kind in ("uniform", "quadratic"):
        q = u if kind == "uniform" else u**2
        ts = torch.floor(1.0 + (start - 1) * q + 0.5).long().tolist()  # ascending
        for k in range(1, steps):  # strictly increasing (quadratic crowds the low end)
            ts[k] = max(ts[k], ts[k - 1] + 1)
        return _spread(ts[::-1], start)
    log_sig = torch.log(chain.edm_sigma(torch.arange(1, start + 1)))  # index t - 1, increasing in t
    hi, lo = float(log_sig[-1]), float(log_sig[0])
    if kind == "logsnr":
        target = hi + u * (lo - hi)
    else:
        smax, smin = math.exp(hi / rho), math.exp(lo / rho)
        target = rho * torch.log(smax + u * (smin - smax))
    ts = ((log_sig[None, :] - target[:, None]).abs().argmin(1) + 1).tolist()
    return _spread(ts, start)


def _sde_times(process, steps: int, kind: str, rho: float, eps: float, start: float) -> torch.Tensor:
    u = torch.arange(steps + 1, dtype=_F64) / steps
    if kind == "uniform":
        t = start + u * (eps - start)
    elif kind == "quadratic":
        t = eps + (start - eps) * (1.0 - u) ** 2
    elif kind == "trailing":
        raise DiffusionLabError("grid 'trailing' is for discrete chains (it ends at T / N); on an SDE use uniform, "
                                "quadratic, logsnr or karras")
    else:
        lam_0, lam_e = process.logsnr(torch.tensor(start, dtype=_F64)), process.logsnr(torch.tensor(eps, dtype=_F64))
        if kind == "logsnr":
            lam = lam_0 + u * (lam_e - lam_0)
        else:
            smax, smin = torch.exp(-0.5 * lam_0), torch.exp(-0.5 * lam_e)
            sig = (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            lam = -2.0 * torch.log(sig)
        t = process.time_at_logsnr(lam).clamp(eps, start)
    t[0], t[-1] = start, eps  # exact ends whatever the rounding of the inverse
    return t


def make_grid(process, steps: int | None = None, kind: str = "uniform", rho: float = 7.0, eps: float | None = None,
              sig_max: float | None = None) -> TimeGrid:
    """A :class:`TimeGrid` of ``steps`` steps of ``kind`` (module docstring) on ``process``.

    ``steps``: None means every step of a chain, :data:`DEFAULT_SDE_STEPS` on an SDE. ``eps``: an SDE grid's last
    time (default ``process.default_eps``; chains end at the data). ``rho``: EDM's exponent (``karras``).
    ``sig_max``: start at the (nearest) time whose EDM level ``sigma / s`` is ``sig_max`` rather than at ``T`` (a
    level at or above the process's top, ``inf`` included, starts at ``T``; ``edm`` without it: 80).
    """
    if kind not in GRID_KINDS:
        raise DiffusionLabError(f"unknown time grid {kind!r}; allowed: {', '.join(GRID_KINDS)}")
    try:
        rho = float(rho)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"karras grid needs a number rho > 0, got {rho!r}") from None
    if not rho > 0 or math.isinf(rho):
        raise DiffusionLabError(f"karras grid needs rho > 0, got {rho!r}")
    if kind == "edm":  # karras from EDM's sig_max, where the process reaches above it
        return _relabel(make_grid(process, steps, "karras", rho, eps, EDM_SIG_MAX if sig_max is None else sig_max),
                        "edm")
    start_t = None
    if sig_max is not None:
        try:
            sig_max = float(sig_max)
        except (TypeError, ValueError):
            raise DiffusionLabError(f"sig_max must be a positive number, got {sig_max!r}") from None
        if not sig_max > 0:
            raise DiffusionLabError(f"sig_max must be a positive number, got {sig_max!r}")
    if sig_max is not None and sig_max < top_level(process):  # at or above the top: start at T
        start_t = process.time_at_edm_sigma(torch.tensor(sig_max, dtype=_F64))
    if process.discrete:
        if eps is not None:
            raise DiffusionLabError("eps applies to SDE grids only (a chain's grid ends at the data, t = 0)")
        top = process.T if start_t is None else max(1, min(process.T, int(start_t)))
        if kind in ("logsnr", "karras") and top > 1 and math.isinf(float(process.edm_sigma(torch.tensor(top)))):
            top -= 1  # a zero-terminal-SNR chain's level at T is infinite: these grids start at the last finite one
        n = _check_steps(top if steps is None else steps, top)
        return TimeGrid(process, _chain_steps(process, n, kind, rho, top), kind)
    n = _check_steps(DEFAULT_SDE_STEPS if steps is None else steps)
    eps = process.check_eps(process.default_eps if eps is None else eps)
    start = float(process.T) if start_t is None else float(start_t.clamp(max=float(process.T)))
    if not start > eps:
        raise DiffusionLabError(f"the grid's start t = {start:g} (sig_max = {sig_max}) must lie above eps = {eps:g}")
    return TimeGrid(process, _sde_times(process, n, kind, rho, eps, start), kind)


def top_level(process) -> float:
    """The EDM level ``sigma_T / s_T`` at the process's last time ``T`` (``inf`` at a zero terminal SNR)."""
    t = torch.tensor(process.T) if process.discrete else torch.tensor(float(process.T), dtype=_F64)
    s, sigma = process.coeffs(t)
    return math.inf if float(s) == 0.0 else float(sigma / s)


def _relabel(grid: TimeGrid, kind: str) -> TimeGrid:
    grid.kind = kind
    return grid


def _same_coefficients(grid: TimeGrid, process) -> bool:
    """Whether ``process`` has the grid's very coefficients at its points (an equal process built twice)."""
    if bool(process.discrete) != grid.discrete:
        return False
    try:
        s, sigma = process.coeffs(grid.t.long() if grid.discrete else grid.t)
    except (DiffusionLabError, IndexError, RuntimeError):
        return False
    return torch.equal(s.to(_F64), grid.s_t) and torch.equal(sigma.to(_F64), grid.sigma_t)


def as_grid(process, grid=None, kind: str = "uniform", **options) -> TimeGrid:
    """A sampler's grid from what a caller gave: a :class:`TimeGrid` of ``process`` (as is), None or an int (that
    many steps of ``kind``, :func:`make_grid` with ``options``) or a sequence of times (explicit)."""
    if isinstance(grid, TimeGrid):
        if grid.process is not process and not _same_coefficients(grid, process):
            raise DiffusionLabError(f"the time grid was built for another process ({grid.process!r}) than the model's "
                                    f"({process!r})")
        return grid
    if grid is None or (isinstance(grid, int) and not isinstance(grid, bool)):
        return make_grid(process, grid, kind, **options)
    return TimeGrid(process, grid)
