"""Few-step solvers of the probability-flow ODE: EDM Euler/Heun, DPM-Solver++(2M/3M), UniPC-bh2, DDIM.

Every solver is a plain function ``fn(model, x, times=None, noise=None, progress=False, **opts) -> x`` of a
:class:`~diffusionlab.parametrization.DiffusionModel`, a start ``x`` at ``times[0]`` and a decreasing grid; no
hidden state, the model counts its evaluations (``model.nfe``), everything runs in ``x``'s dtype and device with
float64 host coefficients. On the SDEs (VP, sub-VP, VE) the grid is a float time grid
(:func:`~diffusionlab.samplers.grids.time_grid`: uniform, quadratic, logsnr, karras; an int means that many
uniform steps); on a discrete chain it is an integer grid ``T >= t_1 > ... > t_N >= 1`` (:func:`chain_timesteps`)
followed by a last step to the data ``t = 0``. ``timesteps=`` is an alias of ``times``.

The common variable (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models",
sec. 4): with ``x_t = s_t x_0 + sigma_t eps``, ``eps ~ N(0, C)``, the scaled state ``y = x / s`` has
``y = x_0 + sig eps`` with the EDM noise level ``sig = sigma / s = exp(-lambda)``, ``lambda = log(s / sigma)``
(half the log-SNR: DPM-Solver's lambda). For every process the probability-flow ODE is then one and the same::

    dy / d sig = eps_hat(y, sig) = (y - D(y, sig)) / sig,      D = E[x_0 | x_t],  eps_hat = E[eps | x_t]
    dy / d lambda = D(y, sig) - y      (linear part exact: y(lambda') = e^{-h} y + int e^{-(lambda' - u)} D du)

(with C: ``eps_hat = -sig C grad_y log p``, the thesis's probability-flow ODE ``dX = [f X - g^2 C grad log p / 2]
dt`` in these variables). The processes differ only in which ``sig`` their grids visit and the scale ``s``.

- :func:`edm_euler`, :func:`edm_heun` -- Karras et al. 2022 Algorithms 1 and 2 on ``dy/dsig``, with optional
  churn (``S_churn, S_tmin, S_tmax, S_noise``; the injected noise is ``L z``, ``L L^T = C``);
- :func:`dpmpp_2m`, :func:`dpmpp_3m` -- multistep data-prediction DPM-Solver++ (Lu et al. 2022, "DPM-Solver++:
  fast solver for guided sampling of diffusion probabilistic models", Algorithm 2), exact in the linear part;
- :func:`unipc` -- UniPC with ``B(h) = e^h - 1`` (bh2; bh1 ``B(h) = h`` as an option), predictor UniP-p and
  corrector UniC-p (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast sampling of
  diffusion models", Algorithms 2-3, data prediction; the corrector reuses the next evaluation, so it is free);
- :func:`ddim_continuous` -- DDIM (Song, Meng & Ermon 2021) on any process: DPM-Solver++(1), equal to
  :func:`edm_euler` without churn.

DPM-Solver++(3M) here integrates the quadratic through the last three denoised values exactly:
``y' = e^{-h} y + A1 D_0 + A2 D_1 + A3 D_2`` with ``D(u) = D_0 + D_1 (u/h) + D_2 (u/h)^2`` and
``A1 = 1 - e^{-h}``, ``A2 = (h - 1 + e^{-h}) / h``, ``A3 = (h^2 - 2h + 2 - 2 e^{-h}) / h^2``. The reference codes
(dpm-solver, diffusers, k-diffusion ``sample_dpmpp_3m_sde`` at ``eta = 0``) weight ``D_2`` by ``A3 / 2``, which
is not exact for a quadratic ``D`` and leaves a local error ``h^3 D'' / 12`` (second order overall); the tests
check third order here.

NFE: one evaluation per step for Euler, DDIM, DPM-Solver++ and UniPC; two for Heun, one on a last step to
``sig = 0`` (then Euler, as in EDM); churn adds none. On a step to ``sig = 0`` (a chain's last step to the data,
or VP at ``t = 0``) every solver returns the denoised value (first order), as the reference codes do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.discrete import GaussianChain
from diffusionlab.samplers.continuous import resolve_times
from diffusionlab.samplers.grids import GRIDS, t_from_logsnr
from diffusionlab.samplers.noise import NoiseSource
from diffusionlab.samplers.timesteps import check_timesteps, make_timesteps

_F64 = torch.float64


# ---- the grid in the scaled variable ------------------------------------------------------------------------
@dataclass
class ScaledGrid:
    """A sampler's grid: ``times`` the model's times (N + 1, the last never evaluated), ``s``, ``sigma``, the EDM
    level ``sig = sigma / s`` and ``lam = log(s / sigma)`` (``+inf`` at ``sig = 0``) as float64 host lists, and
    ``continuous`` (SDE) or not (chain)."""

    times: list
    s: list
    sigma: list
    sig: list
    lam: list
    continuous: bool

    @property
    def steps(self) -> int:
        return len(self.times) - 1


def chain_timesteps(chain: GaussianChain, steps: int, kind: str = "uniform", rho: float = 7.0) -> torch.Tensor:
    """``steps`` integer steps ``T >= t_1 > ... > t_N >= 1`` of a chain (descending int64), the last jump going to
    the data. ``uniform`` / ``quadratic``: :func:`~diffusionlab.samplers.timesteps.make_timesteps`; ``logsnr`` /
    ``karras``: the chain steps nearest (in ``log sig``) to the continuous grids of
    :func:`~diffusionlab.samplers.grids.time_grid` between ``sig_T`` and ``sig_1``, pushed apart where rounding
    would repeat a step."""
    if kind in ("uniform", "quadratic"):
        return make_timesteps(chain.T, steps, kind)
    if kind not in GRIDS:
        raise DiffusionLabError(f"unknown time grid {kind!r}; allowed: {', '.join(GRIDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= chain.T:
        raise DiffusionLabError(f"number of sampling steps must be an integer in 1..{chain.T}, got {steps!r}")
    log_sig = torch.log(chain.sigma[1:] / chain.mean_scale[1:])  # index t - 1, increasing in t
    hi, lo = float(log_sig[-1]), float(log_sig[0])
    if steps == 1:
        return torch.tensor([chain.T], dtype=torch.long)
    u = torch.arange(steps, dtype=_F64) / (steps - 1)
    if kind == "logsnr":
        target = hi + u * (lo - hi)
    else:
        smax, smin = math.exp(hi / rho), math.exp(lo / rho)
        target = rho * torch.log(smax + u * (smin - smax))
    ts = ((log_sig[None, :] - target[:, None]).abs().argmin(1) + 1).tolist()  # descending
    ts[0] = chain.T
    for k in range(1, steps):  # strictly decreasing, each >= the room left below
        ts[k] = min(ts[k], ts[k - 1] - 1)
    for k in range(steps - 1, -1, -1):
        ts[k] = max(ts[k], steps - k)
    return torch.tensor(ts, dtype=torch.long)


def scaled_grid(model, x: torch.Tensor, times=None, timesteps=None) -> ScaledGrid:
    """The grid of a few-step solver (module docstring): SDE times (float grid, None: 1000 uniform steps, int:
    that many), or chain steps (None: all ``T``, int: that many uniform, or a decreasing integer sequence)
    followed by the data ``t = 0``."""
    if timesteps is not None:
        if times is not None:
            raise DiffusionLabError("give the time grid once: as times or as timesteps, not both")
        times = timesteps
    process = model.process
    process.cov.check(x)
    if isinstance(process, GaussianChain):
        ts = check_timesteps(times, process.T)
        ts = torch.cat([ts, torch.zeros(1, dtype=torch.long)])
        s, sigma = process.mean_scale[ts], process.sigma[ts]
        host = [int(v) for v in ts.tolist()]
        continuous = False
    else:
        from diffusionlab.samplers.grids import check_continuous

        check_continuous(process)
        ts = resolve_times(process, times)
        s, sigma = process.coeffs(ts)
        host = ts.tolist()
        continuous = True
    sig = (sigma / s).tolist()
    if not all(a > b for a, b in zip(sig[:-1], sig[1:])) or sig[0] <= 0:
        raise DiffusionLabError(f"the grid's noise levels sigma/s must decrease strictly, got {sig}")
    lam = [math.inf if v == 0 else -math.log(v) for v in sig]
    return ScaledGrid(host, s.tolist(), sigma.tolist(), sig, lam, continuous)


def _time(grid: ScaledGrid, i: int, x: torch.Tensor):
    """The model's time at grid point ``i``: a float64 0-d tensor on ``x``'s device (SDE) or an int (chain)."""
    t = grid.times[i]
    return torch.tensor(t, dtype=_F64, device=x.device) if grid.continuous else t


def _denoise(model, y: torch.Tensor, s: float, t):
    """``(D, eps_hat)`` at ``x = s y`` and time ``t``: one evaluation."""
    p = model.predict(y * s, t)
    return p.x0, p.eps


def _steps(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


# ---- EDM Euler / Heun -----------------------------------------------------------------------------------------
def _number(name: str, v, lo: float = 0.0) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise DiffusionLabError(f"{name} must be a number >= {lo}, got {v!r}") from None
    if math.isnan(v) or v < lo:
        raise DiffusionLabError(f"{name} must be a number >= {lo}, got {v!r}")
    return v


def _edm(model, x, times, noise, progress, s_churn, s_tmin, s_tmax, s_noise, generator, timesteps, second: bool):
    """Karras et al. 2022 Algorithm 2 (Algorithm 1 when ``s_churn = 0``); Euler only when not ``second``."""
    s_churn, s_tmin = _number("S_churn", s_churn), _number("S_tmin", s_tmin)
    s_tmax, s_noise = _number("S_tmax", s_tmax), _number("S_noise", s_noise)
    grid = scaled_grid(model, x, times, timesteps)
    n = grid.steps
    if s_churn > 0 and not grid.continuous:
        raise DiffusionLabError("churn (S_churn > 0) needs a continuous SDE: a chain has no times between its steps")
    noise = NoiseSource(model.process.cov, generator) if noise is None else noise
    gamma_max = math.sqrt(2.0) - 1.0
    y = x / grid.s[0]
    for i in _steps(n, progress, "edm-heun" if second else "edm-euler"):
        sig, sig_next = grid.sig[i], grid.sig[i + 1]
        gamma = min(s_churn / n, gamma_max) if s_churn > 0 and s_tmin <= sig <= s_tmax else 0.0
        if gamma > 0:  # raise the noise level to sig_hat, adding fresh noise L z (covariance C)
            sig_hat = sig * (1.0 + gamma)
            y = y + (math.sqrt(sig_hat**2 - sig**2) * s_noise) * noise(y)
            t_hat = t_from_logsnr(model.process, -2.0 * math.log(sig_hat))
            s_hat = float(model.process.coeffs(t_hat)[0])
            _, d = _denoise(model, y, s_hat, t_hat.to(x.device))
            sig = sig_hat
        else:
            _, d = _denoise(model, y, grid.s[i], _time(grid, i, x))
        y_next = y + (sig_next - sig) * d
        if second and sig_next > 0:
            _, d2 = _denoise(model, y_next, grid.s[i + 1], _time(grid, i + 1, x))
            y_next = y + (sig_next - sig) * (0.5 * (d + d2))
        y = y_next
    return y * grid.s[-1]


def edm_euler(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, s_churn: float = 0.0,
              s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
              generator: torch.Generator | None = None, timesteps=None) -> torch.Tensor:
    """Euler on ``dy/dsig = eps_hat`` (Karras et al. 2022, Algorithm 2 without its correction): one evaluation
    per step, first order. Churn as in :func:`edm_heun`."""
    return _edm(model, x, times, noise, progress, s_churn, s_tmin, s_tmax, s_noise, generator, timesteps, False)


def edm_heun(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
             generator: torch.Generator | None = None, timesteps=None) -> torch.Tensor:
    """Heun's method on ``dy/dsig = eps_hat`` (Karras et al. 2022, Algorithms 1-2), second order.

    Per step ``i``: with churn, ``gamma = min(S_churn / N, sqrt(2) - 1)`` where ``S_tmin <= sig_i <= S_tmax``
    (EDM noise levels ``sigma / s``), ``sig_hat = sig_i (1 + gamma)`` and ``y <- y + sqrt(sig_hat^2 - sig_i^2)
    S_noise L z`` (``L L^T = C``; the model is evaluated at the time whose level is ``sig_hat``, so churn needs an
    SDE); then ``y' = y + (sig_{i+1} - sig_hat) d(y)`` and, unless ``sig_{i+1} = 0``, the trapezoid
    ``y <- y + (sig_{i+1} - sig_hat) (d(y) + d(y')) / 2``. Two evaluations per step (one on a step to 0).
    ``generator`` seeds the churn noise (unused without churn)."""
    return _edm(model, x, times, noise, progress, s_churn, s_tmin, s_tmax, s_noise, generator, timesteps, True)


# ---- exponential-integrator weights ---------------------------------------------------------------------------
def phi_weights(h: float) -> tuple[float, float, float]:
    """``(A1, A2, A3)``: ``int_0^h e^{-(h-u)} (u/h)^k du`` for ``k = 0, 1, 2`` (float64; series for small ``h``)::

        A1 = 1 - e^{-h},   A2 = (h - 1 + e^{-h}) / h,   A3 = (h^2 - 2h + 2 - 2 e^{-h}) / h^2
    """
    if h <= 0:
        raise DiffusionLabError(f"log-SNR step h must be positive, got {h!r}")
    a1 = -math.expm1(-h)
    if math.isinf(h):
        return 1.0, 1.0, 1.0
    if h < 0.5:  # alternating series, 25 terms: error below h^26 / 26!
        a2 = sum((-1) ** n * h ** (n - 1) / math.factorial(n) for n in range(2, 27))
        a3 = sum(-2.0 * (-1) ** n * h ** (n - 2) / math.factorial(n) for n in range(3, 28))
        return a1, a2, a3
    em1 = math.expm1(-h)
    return a1, (h + em1) / h, (h * h - 2.0 * h - 2.0 * em1) / (h * h)


# ---- DPM-Solver++ (multistep) ---------------------------------------------------------------------------------
SOLVER_TYPES = ("midpoint", "heun")


def _multistep(model, x, times, progress, timesteps, order: int, solver_type: str = "midpoint",
               lower_order_final: bool = False, desc: str = "dpm-solver++"):
    """Multistep DPM-Solver++ of ``order`` 1-3 in ``y = x / s`` and ``lambda = -log sig`` (module docstring)."""
    if solver_type not in SOLVER_TYPES:
        raise DiffusionLabError(f"unknown DPM-Solver++ solver_type {solver_type!r}; allowed: {', '.join(SOLVER_TYPES)}")
    grid = scaled_grid(model, x, times, timesteps)
    n = grid.steps
    lam = grid.lam
    if lower_order_final == "auto":  # diffusers' rule: lower the orders on the last steps of short grids
        lower_order_final = n < 15
    y = x / grid.s[0]
    hist: list[torch.Tensor] = []  # denoised values at grid points i, i-1, ... (most recent first)
    for i in _steps(n, progress, desc):
        d0, _ = _denoise(model, y, grid.s[i], _time(grid, i, x))
        hist = [d0] + hist[: order - 1]
        if grid.sig[i + 1] == 0:  # to the data: first order, y = D
            y = d0
            continue
        h = lam[i + 1] - lam[i]
        a1, a2, a3 = phi_weights(h)
        k = min(order, len(hist), n - i) if lower_order_final else min(order, len(hist))  # warm-up / final
        y = (grid.sig[i + 1] / grid.sig[i]) * y + a1 * d0
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (d0 - hist[1]) / r0
            if k == 2:
                y = y + (0.5 * a1 if solver_type == "midpoint" else a2) * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (hist[1] - hist[2]) / r1
                d2 = (d1_0 - d1_1) / (r0 + r1)  # D(u) = d0 + d1 (u/h) + d2 (u/h)^2 through the last three
                y = y + a2 * (d1_0 + r0 * d2) + a3 * d2
    return y * grid.s[-1]


def _check_order(order, allowed) -> int:
    if isinstance(order, bool) or order not in allowed:
        raise DiffusionLabError(f"solver order must be one of {allowed}, got {order!r}")
    return order


def dpmpp_2m(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, solver_type: str = "midpoint",
             lower_order_final="auto", generator=None, timesteps=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in ``y = x / s``, ``h_i = lambda_{i+1} - lambda_i``::

        y_{i+1} = e^{-h} y_i + (1 - e^{-h}) [(1 + 1/(2r)) D_i - D_{i-1} / (2r)],   r = h_{i-1} / h_i

    (first step first order). ``solver_type="heun"`` weights the difference ``(D_i - D_{i-1}) / r`` by
    ``A2 = (h - 1 + e^{-h}) / h`` (the exact integral of the linear interpolant, diffusers' "heun") instead of
    ``(1 - e^{-h}) / 2``. ``lower_order_final`` drops to first order on the last step; ``"auto"`` (default) does so
    on grids of fewer than 15 steps (diffusers' rule; it steadies very short grids, e.g. 5 steps uniform in t: 4x
    smaller error on the benchmark's ring). One evaluation per step; ``noise`` and ``generator`` are unused."""
    return _multistep(model, x, times, progress, timesteps, 2, solver_type, lower_order_final, "dpm-solver++(2m)")


def dpmpp_3m(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, lower_order_final="auto",
             generator=None, timesteps=None) -> torch.Tensor:
    """DPM-Solver++(3M): the exact integral of the quadratic through the last three denoised values (module
    docstring), after a first- and a second-order (2M, ``A2`` weight) warm-up step. Third order. With
    ``lower_order_final`` (``"auto"``: on grids of fewer than 15 steps) the last two steps are of orders 2 and 1.
    One evaluation per step; ``noise`` and ``generator`` are unused."""
    return _multistep(model, x, times, progress, timesteps, 3, "heun", lower_order_final, "dpm-solver++(3m)")


def ddim_continuous(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, generator=None,
                    timesteps=None) -> torch.Tensor:
    """Deterministic DDIM on any process = DPM-Solver++(1): ``y_{i+1} = (sig_{i+1}/sig_i) y_i + (1 - sig_{i+1}/sig_i)
    D_i`` (Song, Meng & Ermon 2021, eq. 12 with ``eta = 0``, in ``y = x / s``). Algebraically equal to
    :func:`edm_euler` without churn. One evaluation per step."""
    return _multistep(model, x, times, progress, timesteps, 1, desc="ddim")


# ---- UniPC (bh2) ----------------------------------------------------------------------------------------------
def _b_h(h: float, variant: str) -> float:
    """UniPC's ``B(h)`` at ``hh = -h`` (data prediction): ``bh1``: ``hh``; ``bh2``: ``e^{hh} - 1``."""
    return -h if variant == "bh1" else math.expm1(-h)


def _unipc_coeffs(rks: list[float], h: float, order: int, variant: str = "bh2") -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC's ``R`` (``order x order``, rows ``r_k^(j-1)``) and ``b`` for ``B(h)`` of ``variant`` (bh1: ``h``,
    bh2: ``e^h - 1``) for the data prediction (Zhao et al. 2023, Algorithm 3; diffusers'
    ``multistep_uni_*_bh_update``), float64."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = _b_h(h, variant)
    fact = 1
    r = torch.tensor(rks + [1.0], dtype=_F64)
    rows, b = [], []
    for j in range(1, order + 1):
        rows.append(r ** (j - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return torch.stack(rows), torch.tensor(b, dtype=_F64)


def _unipc_update(y_s, m_t, hist, lams, lam_t, sig_ratio, order, corrector: bool, variant: str = "bh2"):
    """One UniP (``corrector=False``) or UniC step from ``lams[0]`` to ``lam_t`` in ``y = x / s``.

    ``hist``/``lams``: denoised values and their lambdas, most recent first (``hist[0] = m_0`` at ``s_0``).
    ``y_t = e^{-h} y_s + (1 - e^{-h}) m_0 - B(h) sum_k rho_k D_k``, ``D_k = (m_k - m_0) / r_k``,
    ``r_k = (lambda_k - lambda_0) / h`` (the corrector adds ``rho_p (m_t - m_0)`` to the sum); ``-B(h) = 1 - e^{-h}``
    for bh2, ``h`` for bh1. The predictor of order 2 uses ``rho = 1/2`` (as the reference)."""
    h = lam_t - lams[0]
    a1 = -math.expm1(-h)
    bh = -_b_h(h, variant)
    m0 = hist[0]
    rks = [(lams[k] - lams[0]) / h for k in range(1, order)]
    d1s = [(hist[k] - m0) / rks[k - 1] for k in range(1, order)]
    y_t = sig_ratio * y_s + a1 * m0
    if corrector:
        if order == 1:
            rhos = [0.5]
        else:
            R, b = _unipc_coeffs(rks, h, order, variant)
            rhos = torch.linalg.solve(R, b).tolist()
        res = rhos[-1] * (m_t - m0)
        for rho, d in zip(rhos[:-1], d1s):
            res = res + rho * d
        return y_t + bh * res
    if order == 1:
        return y_t
    if order == 2:
        rhos = [0.5]
    else:
        R, b = _unipc_coeffs(rks, h, order, variant)
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    res = 0.0
    for rho, d in zip(rhos, d1s):
        res = res + rho * d
    return y_t + bh * res


def unipc(model, x: torch.Tensor, times=None, noise=None, progress: bool = False, order: int = 2,
          corrector: bool = True, lower_order_final: bool = True, variant: str = "bh2", generator=None,
          timesteps=None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, in ``y = x / s``: at each grid point the model is evaluated
    once; the corrector UniC-p re-does the last step with that new value (no extra evaluation), then the predictor
    UniP-p steps on. Orders warm up from 1; ``lower_order_final`` lowers them on the last steps (the reference's
    default). Order ``p`` with the corrector is ``p + 1``. ``variant``: ``"bh2"`` (``B(h) = e^h - 1``, default) or
    ``"bh1"`` (``B(h) = h``, the paper's choice for unconditional sampling with very few steps). One evaluation per
    step; ``noise``, ``generator`` unused.
    """
    order = _check_order(order, (1, 2, 3))
    if variant not in ("bh1", "bh2"):
        raise DiffusionLabError(f"unknown UniPC variant {variant!r}; allowed: bh1, bh2")
    grid = scaled_grid(model, x, times, timesteps)
    n, lam = grid.steps, grid.lam
    y = x / grid.s[0]
    hist: list[torch.Tensor] = []
    lams: list[float] = []
    y_last, order_last = None, 1
    for i in _steps(n, progress, "unipc"):
        m_t, _ = _denoise(model, y, grid.s[i], _time(grid, i, x))
        if corrector and y_last is not None:
            y = _unipc_update(y_last, m_t, hist, lams, lam[i], grid.sig[i] / grid.sig[i - 1], order_last, True,
                              variant)
        hist = [m_t] + hist[: order - 1]
        lams = [lam[i]] + lams[: order - 1]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(hist))
        if grid.sig[i + 1] == 0:
            this_order = 1
        y_last, order_last = y, this_order
        if grid.sig[i + 1] == 0:
            y = m_t
        else:
            y = _unipc_update(y, None, hist, lams, lam[i + 1], grid.sig[i + 1] / grid.sig[i], this_order, False,
                              variant)
    return y * grid.s[-1]


FEWSTEP_SAMPLERS = {
    "euler": edm_euler,
    "heun": edm_heun,
    "dpmpp-2m": dpmpp_2m,
    "dpmpp-3m": dpmpp_3m,
    "unipc": unipc,
    "ddim_continuous": ddim_continuous,
}


def nfe_per_path(name: str, steps: int, ends_at_zero: bool, **options) -> int:
    """Model evaluations one of these solvers makes on ``steps`` steps (Heun: 2 per step, 1 on a step to 0)."""
    if name in ("heun", "edm_heun"):
        return 2 * steps - (1 if ends_at_zero else 0)
    return steps


__all__ = ["edm_euler", "edm_heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ddim_continuous", "chain_timesteps",
           "scaled_grid", "phi_weights", "FEWSTEP_SAMPLERS", "nfe_per_path", "ScaledGrid"]
