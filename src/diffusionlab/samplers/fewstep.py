"""Few-step solvers of the probability-flow ODE in the EDM level: EDM Euler/Heun, DPM-Solver++(2M/3M), UniPC.

Every solver is a plain function ``fn(model, x, grid, progress=False, **opts) -> x`` of a
:class:`~diffusionlab.parametrization.DiffusionModel`, a start ``x`` at the grid's first point and a
:class:`~diffusionlab.processes.grid.TimeGrid` of any process (an SDE's times or a chain's steps, whose last point
is the data); no hidden state, the model counts its evaluations (``model.nfe``), everything runs in ``x``'s dtype
and device with float64 host coefficients.

The common variable (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models",
sec. 4): with ``x_t = s_t x_0 + sigma_t eps``, ``eps ~ N(0, C)``, the scaled state ``y = x / s`` has
``y = x_0 + sig eps`` with the EDM noise level ``sig = sigma / s = exp(-lambda)``, ``lambda = log(s / sigma)``
(half the log-SNR: DPM-Solver's lambda). For every process the probability-flow ODE is then one and the same::

    dy / d sig = eps_hat(y, sig) = (y - D(y, sig)) / sig,      D = E[x_0 | x_t],  eps_hat = E[eps | x_t]
    dy / d lambda = D(y, sig) - y      (linear part exact: y(lambda') = e^{-h} y + int e^{-(lambda' - u)} D du)

(with C: ``eps_hat = -sig C grad_y log p``, the probability-flow ODE ``dX = [f X - g^2 C grad log p / 2] dt`` in
these variables). The processes differ only in which ``sig`` their grids visit and the scale ``s``.

- :func:`edm_euler`, :func:`edm_heun` -- Karras et al. 2022 Algorithms 1 and 2 on ``dy/dsig``, with optional
  churn (``s_churn, s_tmin, s_tmax, s_noise``; the injected noise is ``L z``, ``L L^T = C``). Without churn the
  Euler step is the deterministic DDIM step (:func:`~diffusionlab.samplers.ancestral.ddim_update`);
- :func:`dpmpp_2m`, :func:`dpmpp_3m` -- multistep data-prediction DPM-Solver++ (Lu et al. 2022, "DPM-Solver++:
  fast solver for guided sampling of diffusion probabilistic models", Algorithm 2), exact in the linear part;
- :func:`unipc` -- UniPC with ``B(h) = e^h - 1`` (bh2; bh1 ``B(h) = h`` as an option), predictor UniP-p and
  corrector UniC-p (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast sampling of
  diffusion models", Algorithms 2-3, data prediction; the corrector reuses the next evaluation, so it is free).

DPM-Solver++(3M) here integrates the quadratic through the last three denoised values exactly:
``y' = e^{-h} y + A1 D_0 + A2 D_1 + A3 D_2`` with ``D(u) = D_0 + D_1 (u/h) + D_2 (u/h)^2`` and
``A1 = 1 - e^{-h}``, ``A2 = (h - 1 + e^{-h}) / h``, ``A3 = (h^2 - 2h + 2 - 2 e^{-h}) / h^2``. The reference codes
(dpm-solver, diffusers, k-diffusion ``sample_dpmpp_3m_sde`` at ``eta = 0``) weight ``D_2`` by ``A3 / 2``, which
is not exact for a quadratic ``D`` and leaves a local error ``h^3 D'' / 12`` (second order overall); the tests
check third order here.

Default grids (right for trained networks; ``SamplerSpec.default_grid`` / ``default_sig_max``): a data-prediction
solver turns a network's eps error ``delta`` at level ``sig`` into an x0 error ``sig * delta``, and its first step
carries it to the next level relative to that level's noise as ``(sig_0 / sig_1) delta``. Started where the
cosine chain starts (``sigma_T / s_T = 2e4``) on a quadratic grid (``sig_1 = 2.9``) that is ``7000 delta``: FD 27
on the digits U-Net, whose ``delta`` is 0.02 (pure noise is 34). So Heun, DPM-Solver++(2M) and UniPC start at EDM's
``sig = 80`` on EDM's rho = 7 grid (``edm``), and the two that the error hurts most start lower, at ``sig = 10``
(:data:`LOW_START`): first-order Euler on that grid, and DPM-Solver++(3M), whose quadratic extrapolation through
three denoised values amplifies their errors on the uneven Karras steps, on the log-SNR grid. Measured on the
digits run (configs/digits.yaml, 10 steps, FD of 1000 samples, seeds 0-2): DDIM with clipping 2.97; Euler 2.66,
Heun 1.70 (19 NFE), DPM-Solver++(2M) 1.73, DPM-Solver++(3M) 1.97, UniPC 1.77 (docs/fewstep.md). A ``sig_max`` (the
``sample:`` section's, ``inf`` for ``T``) or an explicit grid overrides them.

NFE: one evaluation per step for Euler, DPM-Solver++ and UniPC; two for Heun, one on a last step to ``sig = 0``
(then Euler, as in EDM); churn adds none. On a step to ``sig = 0`` (a chain's last step to the data, or VP at
``t = 0``) every solver returns the denoised value (first order), as the reference codes do.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.grid import EDM_SIG_MAX, as_grid
from diffusionlab.progress import progress as progress_display
from diffusionlab.samplers.ancestral import ddim_update
from diffusionlab.samplers.catalogue import flag, integer, number, one_of, register_sampler
from diffusionlab.samplers.noise import noise_source

_F64 = torch.float64


def _finite_start(grid, name: str):
    """``grid`` if its first level ``sig = sigma / s`` is finite; these solvers work in ``y = x / s``, which a
    zero-terminal-SNR chain's ``t = T`` (``s = 0``) does not have."""
    if not math.isfinite(grid.sig[0]):
        raise DiffusionLabError(f"{name} works in y = x / s and cannot start at t = {grid.times[0]}, where s = 0 (zero "
                                "terminal SNR): start below it (the default grid 'edm', or sig_max), or use ddim / ddpm")
    return grid


def _denoise(model, y: torch.Tensor, s: float, t):
    """``(D, eps_hat)`` at ``x = s y`` and time ``t``: one evaluation."""
    p = model.predict(y * s, t)
    return p.x0, p.eps


# ---- default grids ----------------------------------------------------------------------------------------------
#: the start level of the solvers that a trained network's error at high noise hurts most: first-order Euler and the
#: quadratic extrapolation of DPM-Solver++(3M) (module docstring, "Default grids")
LOW_START = 10.0


# ---- EDM Euler / Heun -----------------------------------------------------------------------------------------
CHURN_OPTIONS = {
    "s_churn": number("total churn S_churn (0: deterministic)", 0.0),
    "s_tmin": number("churn only where sig >= S_tmin", 0.0),
    "s_tmax": number("churn only where sig <= S_tmax", 0.0),
    "s_noise": number("noise inflation S_noise", 0.0),
}


def _edm(model, x, grid, noise, progress, s_churn, s_tmin, s_tmax, s_noise, second: bool):
    """Karras et al. 2022 Algorithm 2 (Algorithm 1 when ``s_churn = 0``); Euler only when not ``second``."""
    grid = _finite_start(as_grid(model.process, grid), "heun" if second else "euler")
    n = grid.steps
    if s_churn > 0 and grid.discrete:
        raise DiffusionLabError("churn (s_churn > 0) needs a continuous SDE: a chain has no times between its steps")
    model.process.cov.check(x)
    noise = noise_source(model, noise) if s_churn > 0 else None
    gamma_max = math.sqrt(2.0) - 1.0
    for i in progress_display(range(n), desc="heun" if second else "euler", enabled=progress):
        sig, sig_next = grid.sig[i], grid.sig[i + 1]
        s, t = grid.s[i], grid.time(i, x)
        gamma = min(s_churn / n, gamma_max) if s_churn > 0 and s_tmin <= sig <= s_tmax else 0.0
        if gamma > 0:  # raise the noise level to sig_hat, adding fresh noise L z (covariance C), in y = x / s
            sig_hat = sig * (1.0 + gamma)
            y_hat = x / s + (math.sqrt(sig_hat**2 - sig**2) * s_noise) * noise(x)
            t = model.process.time_at_edm_sigma(torch.tensor(sig_hat, dtype=_F64)).to(x.device)
            s = float(model.process.coeffs(t)[0])
            x, sig = y_hat * s, sig_hat
        pred = model.predict(x, t)
        x_next = ddim_update(x, pred.x0, pred.eps, grid.s[i + 1], grid.sigma[i + 1])  # Euler in y: y + (sig' - sig) d
        if second and sig_next > 0:
            _, d2 = _denoise(model, x_next / grid.s[i + 1], grid.s[i + 1], grid.time(i + 1, x))
            x_next = grid.s[i + 1] * (x / s + (sig_next - sig) * (0.5 * (pred.eps + d2)))
        x = x_next
    return x


@register_sampler("euler", "Euler on dy/dsig = eps_hat (DDIM without churn), with EDM's churn",
                  "Karras et al. 2022, Algorithm 2", options=CHURN_OPTIONS,
                  stochastic=lambda o: o["s_churn"] > 0, default_grid="edm", default_steps=50,
                  default_sig_max=LOW_START)
def edm_euler(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False, s_churn: float = 0.0,
              s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Euler on ``dy/dsig = eps_hat`` (Karras et al. 2022, Algorithm 2 without its correction): one evaluation
    per step, first order; without churn it is the deterministic DDIM step. Churn as in :func:`edm_heun`."""
    return _edm(model, x, grid, noise, progress, s_churn, s_tmin, s_tmax, s_noise, False)


def _heun_nfe(grid, opts) -> int:
    return 2 * grid.steps - (1 if grid.ends_at_data else 0)


def _heun_budget(budget: int, process, opts) -> int:
    steps = (budget + 1) // 2 if process.discrete else budget // 2
    if steps < 1:
        raise DiffusionLabError(f"heun needs a budget of at least 2 evaluations on an SDE (two per step), got {budget}")
    return steps


@register_sampler("heun", "Heun's method on dy/dsig = eps_hat, with EDM's churn", "Karras et al. 2022, Algorithms 1-2",
                  options=CHURN_OPTIONS, stochastic=lambda o: o["s_churn"] > 0, default_grid="edm",
                  default_steps=18, default_sig_max=EDM_SIG_MAX, nfe=_heun_nfe, steps_for_budget=_heun_budget)
def edm_heun(model, x: torch.Tensor, grid=None, noise=None, progress: bool = False, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Heun's method on ``dy/dsig = eps_hat`` (Karras et al. 2022, Algorithms 1-2), second order.

    Per step ``i``: with churn, ``gamma = min(s_churn / N, sqrt(2) - 1)`` where ``s_tmin <= sig_i <= s_tmax``
    (EDM noise levels ``sigma / s``), ``sig_hat = sig_i (1 + gamma)`` and ``y <- y + sqrt(sig_hat^2 - sig_i^2)
    s_noise L z`` (``L L^T = C``; the model is evaluated at the time whose level is ``sig_hat``, so churn needs an
    SDE); then ``y' = y + (sig_{i+1} - sig_hat) d(y)`` and, unless ``sig_{i+1} = 0``, the trapezoid
    ``y <- y + (sig_{i+1} - sig_hat) (d(y) + d(y')) / 2``. Two evaluations per step (one on a step to 0)."""
    return _edm(model, x, grid, noise, progress, s_churn, s_tmin, s_tmax, s_noise, True)


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


def _multistep(model, x, grid, progress, order: int, solver_type: str = "midpoint",
               lower_order_final: bool | str = False, desc: str = "dpm-solver++"):
    """Multistep DPM-Solver++ of ``order`` 1-3 in ``y = x / s`` and ``lambda = -log sig`` (module docstring)."""
    if solver_type not in SOLVER_TYPES:
        raise DiffusionLabError(f"unknown DPM-Solver++ solver_type {solver_type!r}; allowed: {', '.join(SOLVER_TYPES)}")
    grid = _finite_start(as_grid(model.process, grid), desc)
    model.process.cov.check(x)
    n = grid.steps
    lam = grid.lam
    if lower_order_final == "auto":  # diffusers' rule: lower the orders on the last steps of short grids
        lower_order_final = n < 15
    y = x / grid.s[0]
    hist: list[torch.Tensor] = []  # denoised values at grid points i, i-1, ... (most recent first)
    for i in progress_display(range(n), desc=desc, enabled=progress):
        d0, _ = _denoise(model, y, grid.s[i], grid.time(i, x))
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


LOWER_ORDER_FINAL = ("auto", True, False)


@register_sampler("dpmpp-2m", "multistep DPM-Solver++(2M), data prediction, exact in the linear part",
                  "Lu et al. 2022, Algorithm 2",
                  options={"solver_type": one_of(*SOLVER_TYPES, doc="midpoint (the paper) or heun (diffusers)"),
                           "lower_order_final": one_of(*LOWER_ORDER_FINAL,
                                                       doc="first order on the last step; auto: below 15 steps")},
                  default_grid="edm", default_steps=20, default_sig_max=EDM_SIG_MAX)
def dpmpp_2m(model, x: torch.Tensor, grid=None, progress: bool = False, solver_type: str = "midpoint",
             lower_order_final="auto") -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in ``y = x / s``, ``h_i = lambda_{i+1} - lambda_i``::

        y_{i+1} = e^{-h} y_i + (1 - e^{-h}) [(1 + 1/(2r)) D_i - D_{i-1} / (2r)],   r = h_{i-1} / h_i

    (first step first order). ``solver_type="heun"`` weights the difference ``(D_i - D_{i-1}) / r`` by
    ``A2 = (h - 1 + e^{-h}) / h`` (the exact integral of the linear interpolant, diffusers' "heun") instead of
    ``(1 - e^{-h}) / 2``. ``lower_order_final`` drops to first order on the last step; ``"auto"`` (default) does so
    on grids of fewer than 15 steps (diffusers' rule; it steadies very short grids, e.g. 5 steps uniform in t: 4x
    smaller error on the benchmark's ring). One evaluation per step."""
    return _multistep(model, x, grid, progress, 2, solver_type, lower_order_final, "dpmpp-2m")


@register_sampler("dpmpp-3m", "multistep DPM-Solver++(3M): the exact integral of the quadratic through three D",
                  "Lu et al. 2022, sec. 4 (3M); this module's note on its weights",
                  options={"lower_order_final": one_of(*LOWER_ORDER_FINAL,
                                                       doc="orders 2, 1 on the last two steps; auto: below 15 steps")},
                  default_grid="logsnr", default_steps=20, default_sig_max=LOW_START)
def dpmpp_3m(model, x: torch.Tensor, grid=None, progress: bool = False, lower_order_final="auto") -> torch.Tensor:
    """DPM-Solver++(3M): the exact integral of the quadratic through the last three denoised values (module
    docstring), after a first- and a second-order (2M, ``A2`` weight) warm-up step. Third order. With
    ``lower_order_final`` (``"auto"``: on grids of fewer than 15 steps) the last two steps are of orders 2 and 1.
    One evaluation per step."""
    return _multistep(model, x, grid, progress, 3, "heun", lower_order_final, "dpmpp-3m")


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


@register_sampler("unipc", "UniPC: predictor UniP-p and a free corrector UniC-p, data prediction",
                  "Zhao et al. 2023, Algorithms 2-3",
                  options={"order": integer("predictor order p (1-3); with the corrector p + 1", 1, 3),
                           "corrector": flag("use the corrector UniC"),
                           "lower_order_final": flag("lower the orders on the last steps (the reference's default)"),
                           "variant": one_of("bh1", "bh2", doc="B(h) = h (bh1) or e^h - 1 (bh2)")},
                  default_grid="edm", default_steps=20, default_sig_max=EDM_SIG_MAX)
def unipc(model, x: torch.Tensor, grid=None, progress: bool = False, order: int = 2, corrector: bool = True,
          lower_order_final: bool = True, variant: str = "bh2") -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, in ``y = x / s``: at each grid point the model is evaluated
    once; the corrector UniC-p re-does the last step with that new value (no extra evaluation), then the predictor
    UniP-p steps on. Orders warm up from 1; ``lower_order_final`` lowers them on the last steps (the reference's
    default). Order ``p`` with the corrector is ``p + 1``. ``variant``: ``"bh2"`` (``B(h) = e^h - 1``, default) or
    ``"bh1"`` (``B(h) = h``, the paper's choice for unconditional sampling with very few steps). One evaluation per
    step.
    """
    order = _check_order(order, (1, 2, 3))
    if variant not in ("bh1", "bh2"):
        raise DiffusionLabError(f"unknown UniPC variant {variant!r}; allowed: bh1, bh2")
    grid = _finite_start(as_grid(model.process, grid), "unipc")
    model.process.cov.check(x)
    n, lam = grid.steps, grid.lam
    y = x / grid.s[0]
    hist: list[torch.Tensor] = []
    lams: list[float] = []
    y_last, order_last = None, 1
    for i in progress_display(range(n), desc="unipc", enabled=progress):
        m_t, _ = _denoise(model, y, grid.s[i], grid.time(i, x))
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


__all__ = ["edm_euler", "edm_heun", "dpmpp_2m", "dpmpp_3m", "unipc", "phi_weights"]
