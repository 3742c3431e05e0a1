"""Conditional sampling from an unconditional model: one catalogue of methods that fill in unknown values.

Given known values ``y`` and a mask (1 = known), a method samples the unknown part from the model's conditional
``p(x_u | x_k = y)`` -- inpainting for images, prediction (the first frames known) and interpolation (the first and
last known) for videos, any coordinates for points -- and returns full samples whose known part is ``y`` exactly. A
method is a plain function ``fn(model, known, grid, noise=None, progress=False, **options)`` (``known`` a
:class:`~diffusionlab.conditioning.known.Known`) that walks one :class:`~diffusionlab.processes.grid.TimeGrid` and only
calls the model interface, so it runs on chains and SDEs, on any parametrization, and on the wrappers of
:mod:`~diffusionlab.conditioning.guidance` (class labels and guidance combine with it). :func:`register_method`
records it as a :class:`ConditionalSpec` (the sampler catalogue's :class:`~diffusionlab.samplers.catalogue.SamplerSpec`
with what it needs to be exact and what it costs).

Every method but ``dps`` moves the known part along one forward path of the process (the bridge of
:meth:`~diffusionlab.conditioning.known.Known.bridge`) and the unknown part by the model's reverse kernel
``N(mu_theta, v C)`` (``mu_theta = A x + B x_theta``, DDPM's ancestral step on the grid, Ho et al. 2020, Alg. 2)
*conditioned on the known part's move*: with ``coupling="joint"`` (the default) the unknown entries' noise is drawn
given the known entries' by Matheron's rule (:class:`~diffusionlab.conditioning.known.NoiseConditioner`), so the
state keeps the noise covariance ``C`` across known and unknown frames; ``coupling="independent"`` draws the unknown
noise from its marginal and substitutes the independently noised known frames (what the i.i.d. recipes do), which is
wrong when C correlates them. With i.i.d. noise both are the same.

=========== ======================================================================= ==============================
``replace`` score_sde's imputation: the reverse step, then the known part substituted     ``steps`` NFE; biased
            (Song et al. 2021, appendix I.2)
``repaint`` RePaint: ``replace`` with resampling, ``jump`` steps down then back up by     ``steps * resample`` NFE;
            the forward process, ``resample`` times per block (Lugmayr et al. 2022,      biased (less with more
            Alg. 1)                                                                       resampling)
``dps``     reconstruction guidance: the ancestral step moved against                    ``steps`` NFE and as many
            ``grad ||y - x_theta,k||`` (Chung et al. 2023, Alg. 1)                        backward passes; biased
``smc``     SMCDiff (Trippe et al. 2022, Alg. 1): ``particles`` copies per row, weighted   ``steps * particles`` NFE
            by the model's predictive ``N(y'; mu_theta,k, v C_kk)`` of the known part's  (and as many backward
            next value, resampled (systematic) when the effective sample size drops;     passes with ``twist``);
            proposals twisted towards the known values (Wu et al. 2023, Alg. 1)          asymptotically exact
=========== ======================================================================= ==============================

NFE are evaluations per output sample (one row through the network); the model's ``nfe`` counter counts calls, and
``smc`` evaluates all ``particles * rows`` in one call per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffusionlab.conditioning.known import Known
from diffusionlab.errors import DiffusionLabError
from diffusionlab.parametrization import carries_x0, reorder_carried_x0
from diffusionlab.progress import progress as progress_display
from diffusionlab.samplers.ancestral import ancestral_variances, reverse_mean
from diffusionlab.samplers.catalogue import SamplerSpec, budget_per_step, flag, integer, number, one_of, per_step
from diffusionlab.samplers.noise import noise_source

COUPLINGS = ("joint", "independent")
VARIANCES = ("beta", "beta_tilde")


@dataclass
class ConditionalSpec(SamplerSpec):
    """One registered conditional method: a :class:`~diffusionlab.samplers.catalogue.SamplerSpec` (options, grid,
    NFE rule, reference) whose :meth:`run` takes known values and a mask instead of a starting point, plus
    ``exactness`` (what it converges to)."""

    exactness: str = ""

    def run(self, model, known: torch.Tensor, mask, grid=None, noise=None, progress: bool = False,
            kind: str | None = None, **options) -> torch.Tensor:
        """Validate the options and the process, build the grid, and sample the unknown part of ``known``
        (``(B, *sample_shape)``, model space; anything finite where the mask is 0) on ``mask`` (broadcastable, 1 =
        known). ``noise`` (a NoiseSource or a torch.Generator) supplies every random draw."""
        opts = self.validate(options)
        self.check_process(model.process)
        g = self.grid(model.process, grid, kind)
        obs = known if isinstance(known, Known) else Known(known, mask, model.process.cov)
        model.process.cov.check(obs.y)
        return self.fn(model, obs, g, noise=noise, progress=progress, **opts)

    __call__ = run

    def describe(self) -> str:
        return super().describe() + f" {self.exactness}."


CONDITIONAL_METHODS: dict[str, ConditionalSpec] = {}


def register_method(name: str, summary: str, reference: str, **meta):
    """Decorator registering a conditional method (the metadata of :class:`ConditionalSpec`); like
    :func:`~diffusionlab.samplers.catalogue.register_sampler` it returns ``fn`` run as one trajectory."""
    def deco(fn: Callable) -> Callable:
        fn = carries_x0(fn)
        CONDITIONAL_METHODS[name] = ConditionalSpec(name, fn, summary, reference, **meta)
        return fn
    return deco


def method_names() -> list[str]:
    return sorted(CONDITIONAL_METHODS)


def get_method(name) -> ConditionalSpec:
    """The spec of conditional method ``name``; :class:`DiffusionLabError` listing the methods otherwise."""
    key = str(name).strip().replace("_", "-") if isinstance(name, str) else name
    if key not in CONDITIONAL_METHODS:
        raise DiffusionLabError(f"unknown conditional method {name!r}; allowed: {', '.join(method_names())}")
    return CONDITIONAL_METHODS[key]


def parse_method(text: str) -> tuple[ConditionalSpec, dict]:
    """``"name"`` or ``"name:key=value,..."`` (values parsed as YAML scalars) -> ``(spec, options)``."""
    from diffusionlab.configuration import parse_scalar

    name, _, rest = str(text).partition(":")
    spec = get_method(name)
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DiffusionLabError(f"method spec {text!r}: options are key=value pairs separated by commas")
        options[key.strip()] = parse_scalar(raw.strip())
    return spec, spec.validate(options)


# ---- the shared steps -------------------------------------------------------------------------------------------
def _variances(grid, variance: str) -> list[float]:
    if variance not in VARIANCES:
        raise DiffusionLabError(f"unknown reverse variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    upper, lower = ancestral_variances(grid)
    return upper if variance == "beta" else lower


def _check_coupling(coupling: str) -> bool:
    if coupling not in COUPLINGS:
        raise DiffusionLabError(f"unknown noise coupling {coupling!r}; allowed: {', '.join(COUPLINGS)}")
    return coupling == "joint"


def _initial(model, known: Known, grid, y0: torch.Tensor, noise, joint: bool) -> torch.Tensor:
    """A prior draw ``N(0, std^2 C)`` with its known entries set to ``y0`` and (``joint``) its unknown entries drawn
    given them."""
    z = grid.start_std * noise(known.y)
    return _set_known(known, z, y0, joint)


def _set_known(known: Known, x: torch.Tensor, value: torch.Tensor, joint: bool) -> torch.Tensor:
    """``x`` with its known entries set to ``value``; ``joint``: its unknown entries moved by Matheron's rule to a
    draw given them (:meth:`~diffusionlab.conditioning.known.NoiseConditioner.condition`)."""
    return known.conditioner.condition(x, value) if joint else known.impose(x, value)


def _mean(model, x: torch.Tensor, grid, i: int, clip_x0: bool) -> torch.Tensor:
    """The reverse kernel's mean ``A x + B x_theta`` of step ``i`` (one evaluation)."""
    A, B, _ = grid.posterior(i)
    return reverse_mean(model, x, model.predict(x, grid.time(i, x)), A, B, clip_x0)


def _move(known: Known, mean: torch.Tensor, y_next: torch.Tensor, v: float, last: bool, noise,
          joint: bool) -> torch.Tensor:
    """The unknown part from ``N(mean, v C)`` given that its known part moved to ``y_next`` (``joint``: Matheron's
    rule; else the marginal), the known part set to ``y_next``. No noise on the last step (DDPM's)."""
    x = mean if last else mean + math.sqrt(v) * noise(mean)
    return _set_known(known, x, y_next, joint)


def _rep(v: torch.Tensor, m: int) -> torch.Tensor:
    return v if m == 1 else v.repeat_interleave(m, 0)


def _generator(noise):
    return getattr(noise, "generator", None)


def _systematic(logw: torch.Tensor, generator) -> torch.Tensor:
    """Systematic resampling (Kitagawa 1996) of each row of ``logw`` ``(B, P)``: ancestor indices ``(B, P)``."""
    b, p = logw.shape
    w = torch.softmax(logw, dim=1)
    cdf = torch.cumsum(w, dim=1)
    cdf[:, -1] = 1.0
    dev = logw.device
    u = (torch.rand(b, 1, generator=generator, device=generator.device if generator is not None else dev,
                    dtype=logw.dtype).to(dev) + torch.arange(p, device=dev, dtype=logw.dtype)) / p
    return torch.searchsorted(cdf, u).clamp(max=p - 1)


def _twisted_mean(model, x: torch.Tensor, known: Known, grid, i: int, clip_x0: bool, twist: float):
    """The reverse mean of step ``i`` and the twisting function ``log p~_i(y | x) = -twist ||y - x_theta,k(x)||^2 /
    (2 r_i^2)`` (Wu et al. 2023, sec. 3.2: a Gaussian at the denoiser's prediction of the known part) with
    ``r^2 = sig^2 / (1 + sig^2)``, ``sig = sigma / s`` (the posterior variance of unit-variance data, Song et al.
    2023, "Pseudoinverse-guided diffusion models", sec. 3.2), and its gradient in ``x`` (one evaluation, one
    backward pass)."""
    A, B, _ = grid.posterior(i)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        pred = model.predict(xg, grid.time(i, xg))
        x0 = pred.x0.clamp(-1.0, 1.0) if clip_x0 else pred.x0
        r = known.mask.to(x0.dtype) * (known.y - x0)
        r2 = grid.sig[i] ** 2 / (1.0 + grid.sig[i] ** 2)
        lt = -0.5 * twist * r.square().reshape(r.shape[0], -1).sum(1) / r2
        (grad,) = torch.autograd.grad(lt.sum(), xg)
    with torch.no_grad():
        mean = reverse_mean(model, x, pred, A, B, clip_x0)
    return mean, lt.detach().to(torch.float64), grad


def _walk(model, known: Known, grid, noise, progress: bool, particles: int, weighted: bool, variance: str,
          coupling: str, clip_x0: bool, ess: float = 0.5, twist: float = 0.0, desc: str = "replace") -> torch.Tensor:
    """``replace`` (one particle, no weights) and ``smc`` (module docstring; ``twist > 0``: twisted proposals)."""
    joint = _check_coupling(coupling)
    noise = noise_source(model, noise)
    var = _variances(grid, variance)
    b, p = known.num, particles
    kp = known.repeat(p)
    y_t = known.start(grid, noise)
    x = _initial(model, kp, grid, _rep(y_t, p), noise, joint)
    logw = torch.zeros(b, p, dtype=torch.float64, device=x.device)
    lt_prev = torch.zeros(b * p, dtype=torch.float64, device=x.device)
    unknown = (~kp.mask).to(x.dtype)
    gen = _generator(noise)
    n = grid.steps
    for i in progress_display(range(n), desc=desc, enabled=progress):
        last = i == n - 1
        grad = None
        if twist > 0:
            mean, lt, grad = _twisted_mean(model, x, kp, grid, i, clip_x0, twist)
            logw = logw + (lt - lt_prev).reshape(b, p)  # p~_i(y | x_i) / p~_{i-1}(y | x_{i-1}) of the last move
        else:
            mean = _mean(model, x, grid, i, clip_x0)
        y_next = known.bridge(y_t, grid, i, noise)
        y_rep = _rep(y_next, p)
        if weighted:
            # the target's factor for the known part's move: N(y'; mu_k, v C_kk) (the proposal is the rest)
            logw = logw - 0.5 * kp.conditioner.quad(y_rep - mean).to(torch.float64).reshape(b, p) / var[i]
            w = torch.softmax(logw, dim=1)
            low = (1.0 / (w * w).sum(1)) < ess * p
            if bool(low.any()):
                anc = torch.where(low[:, None], _systematic(logw, gen),
                                  torch.arange(p, device=x.device).expand(b, p))
                flat = (anc + p * torch.arange(b, device=x.device)[:, None]).reshape(-1)
                mean = mean[flat]
                reorder_carried_x0(model, flat)  # a self-conditioned particle keeps its own estimate
                if grad is not None:
                    grad, lt = grad[flat], lt[flat]
                logw = torch.where(low[:, None], torch.zeros_like(logw), logw)
        if grad is None or last:
            x = _move(kp, mean, y_rep, var[i], last, noise, joint)
        else:
            x, log_ratio = _twisted_move(kp, mean, y_rep, var[i], noise, joint, grad * unknown)
            logw = logw + log_ratio.reshape(b, p)
        if twist > 0:
            lt_prev = lt
        y_t = y_next
    if twist > 0:
        logw = logw - lt_prev.reshape(b, p)  # the twisting function is constant at the data
    x = kp.impose(x)  # exactly y (an SDE grid ends at eps, where the known part's path is s y + sigma e)
    if p == 1:
        return x
    w = torch.softmax(logw, dim=1)
    pick = torch.multinomial(w if gen is None else w.to(gen.device), 1, generator=gen).reshape(-1).to(x.device)
    return x.reshape(b, p, *x.shape[1:])[torch.arange(b, device=x.device), pick]


def _twisted_move(known: Known, mean: torch.Tensor, y_next: torch.Tensor, v: float, noise, joint: bool,
                  g: torch.Tensor):
    """:func:`_move` with the unknown part's proposal shifted by ``delta = Sigma g`` (``Sigma = v C_u|k`` its
    covariance, ``g`` the twisting function's gradient on the unknown entries; Wu et al. 2023, eq. 8), and the
    log ratio ``log p_theta(x_u) / q(x_u) = -g . xi - g . delta / 2`` (``xi`` the proposal's noise) the weights
    need. ``Sigma g`` by Matheron's rule: ``C_u|k g = (C g - shift(C g))_u``. The shift is capped at the norm of
    the proposal's noise (``sqrt(v)`` per unknown entry) by scaling ``g`` per particle -- the weights stay exact for the
    scaled ``g``, so the target is unchanged; a learned denoiser's ``x_theta`` can have a large Jacobian at high noise
    (``1 / s``), which uncapped would throw the particles far outside the data."""
    cond = known.conditioner
    e = math.sqrt(v) * noise(mean)
    kg = known.cov.apply(g)
    if joint:
        base = mean + cond.shift(y_next - mean)
        xi = e - cond.shift(e)
        sg = kg - cond.shift(kg)
    else:
        base, xi, sg = mean, e, kg
    unknown = (~known.mask).to(mean.dtype)
    b = mean.shape[0]
    delta = v * sg * unknown
    cap = math.sqrt(v) * unknown.reshape(b, -1).sum(1).sqrt()
    norm = delta.reshape(b, -1).norm(dim=1)
    c = torch.where(norm > cap, cap / norm.clamp(min=1e-30), torch.ones_like(norm)).reshape(b, *([1] * (g.ndim - 1)))
    g, delta = c * g, c * delta
    xi = xi * unknown
    x = known.impose(base + delta + xi, y_next)
    log_ratio = -(g * xi).reshape(b, -1).sum(1) - 0.5 * (g * delta).reshape(b, -1).sum(1)
    return x, log_ratio.to(torch.float64)


# ---- the methods ------------------------------------------------------------------------------------------------
_COMMON = {
    "variance": one_of(*VARIANCES, doc="reverse variance of the ancestral step: beta (G^2) or beta_tilde (V)"),
    "coupling": one_of(*COUPLINGS, doc="noise of the unknown entries given the known entries' (joint) or not"),
    "clip_x0": flag("clamp x_theta to [-1, 1] in the reverse mean (images, videos)"),
}


@register_method(
    "replace", "the reverse step, then the known part (forward-noised) substituted",
    "Song et al. 2021, appendix I.2 (score_sde's imputation)", options=dict(_COMMON), stochastic=True,
    default_grid="uniform", default_steps=100, exactness="biased: nothing weights the unknown part by the known one",
)
def replace(model, known: Known, grid, noise=None, progress: bool = False, variance: str = "beta",
            coupling: str = "joint", clip_x0: bool = False) -> torch.Tensor:
    """score_sde's imputation (Song et al. 2021, appendix I.2) on the ancestral step: at every step the unknown part
    takes the model's reverse step and the known part its forward-noised value (module docstring)."""
    return _walk(model, known, grid, noise, progress, 1, False, variance, coupling, clip_x0, desc="replace")


@register_method(
    "repaint", "replace with resampling: jump steps down, then back up by the forward process, resample times",
    "Lugmayr et al. 2022, Algorithm 1", options={
        "jump": integer("steps walked down before jumping back up (RePaint's j)", 1),
        "resample": integer("walks of each block (RePaint's r; 1 is replace)", 1), **_COMMON},
    stochastic=True, default_grid="uniform", default_steps=100,
    nfe=lambda grid, o: grid.steps * o["resample"], steps_for_budget=lambda budget, process, o: max(1, budget // o["resample"]),
    exactness="biased, less so with more resampling",
)
def repaint(model, known: Known, grid, noise=None, progress: bool = False, jump: int = 10, resample: int = 10,
            variance: str = "beta", coupling: str = "joint", clip_x0: bool = False) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1) on the grid: the steps in blocks of ``jump``; each block walked down
    ``resample`` times (each step as in ``replace``), jumping back to the block's start by the exact forward
    transitions (noise ``L z`` over all entries) between walks. ``resample = 1`` is ``replace``."""
    joint = _check_coupling(coupling)
    noise = noise_source(model, noise)
    var = _variances(grid, variance)
    n = grid.steps
    y_t = known.start(grid, noise)
    x = _initial(model, known, grid, y_t, noise, joint)
    bar = progress_display(total=n * resample, desc="repaint", enabled=progress)
    try:
        for b0 in range(0, n, jump):
            b1 = min(b0 + jump, n)
            for r in range(resample):
                for i in range(b0, b1):
                    mean = _mean(model, x, grid, i, clip_x0)
                    y_t = known.bridge(y_t, grid, i, noise)
                    x = _move(known, mean, y_t, var[i], i == n - 1, noise, joint)
                    bar.update(1)
                if r < resample - 1:
                    for i in reversed(range(b0, b1)):  # back up: x_{p_i} = a x_{p_{i+1}} + G L z over all entries
                        a, g2 = grid.transition(i)
                        x = a * x + math.sqrt(g2) * noise(x)
                    y_t = x
    finally:
        bar.close()
    return known.impose(x)  # exactly y (an SDE grid ends at eps)


@register_method(
    "dps", "the ancestral step moved against the gradient of the known part's error through the denoiser",
    "Chung et al. 2023, Algorithm 1", options={
        "scale": number("step size zeta: x <- x - zeta grad ||y - x_theta,k||", 0.0),
        "precondition": flag("apply C to the gradient (the reverse SDE's C grad log p under correlated noise)"),
        "variance": _COMMON["variance"], "clip_x0": _COMMON["clip_x0"]},
    stochastic=True, default_grid="uniform", default_steps=100,
    exactness="biased: a point estimate of p(y | x_t) through x_theta (Chung et al. 2023, sec. 3.1)",
)
def dps(model, known: Known, grid, noise=None, progress: bool = False, scale: float = 0.5, precondition: bool = True,
        variance: str = "beta", clip_x0: bool = False) -> torch.Tensor:
    """Diffusion posterior sampling for the noise-free measurement ``y = x_k`` (Chung et al. 2023, Alg. 1 with the
    step ``zeta_i = zeta' / ||y - x_theta,k||`` of their appendix C.1): the ancestral step of the whole sample, then
    ``x <- x - zeta grad_x ||y - x_theta,k(x)||`` (the gradient through the denoiser, one backward pass per step; the
    form of the authors' code, ``zeta = 2 zeta'``; with ``precondition`` multiplied by C, as the score enters the
    reverse SDE as ``C grad log p``). The known part is set to ``y`` at the end."""
    noise = noise_source(model, noise)
    var = _variances(grid, variance)
    n = grid.steps
    cov = model.process.cov
    x = grid.start_std * noise(known.y)
    m = known.mask.to(x.dtype)
    for i in progress_display(range(n), desc="dps", enabled=progress):
        A, B, _ = grid.posterior(i)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            pred = model.predict(xg, grid.time(i, xg))
            x0 = pred.x0.clamp(-1.0, 1.0) if clip_x0 else pred.x0
            r = m * (known.y - x0)
            norm = r.square().reshape(r.shape[0], -1).sum(1).clamp(min=1e-24).sqrt()
            (grad,) = torch.autograd.grad(norm.sum(), xg)  # rows are independent: one backward pass for all
        with torch.no_grad():
            mean = reverse_mean(model, x, pred, A, B, clip_x0)
            if i < n - 1:
                mean = mean + math.sqrt(var[i]) * noise(x)
            g = cov.apply(grad) if precondition else grad
            x = mean - scale * g
    return known.impose(x)


@register_method(
    "smc", "SMCDiff with twisted proposals: particles weighted by the model's predictive of the known part, resampled",
    "Trippe et al. 2022, Algorithm 1 (SMCDiff); Wu et al. 2023, Algorithm 1 (twisting)", options={
        "particles": integer("particles per output sample", 1),
        "ess": number("resample a row when its effective sample size falls below ess * particles", 0.0, 1.0),
        "twist": number("weight of the twisting function (Wu et al. 2023; 0: SMCDiff's untwisted proposals)", 0.0),
        **_COMMON},
    stochastic=True, default_grid="uniform", default_steps=100,
    nfe=lambda grid, o: grid.steps * o["particles"],
    steps_for_budget=lambda budget, process, o: max(1, budget // o["particles"]),
    exactness="asymptotically exact as the particles grow, for an exact model on a fine grid",
)
def smc(model, known: Known, grid, noise=None, progress: bool = False, particles: int = 16, ess: float = 0.5,
        twist: float = 1.0, variance: str = "beta", coupling: str = "joint", clip_x0: bool = False) -> torch.Tensor:
    """SMCDiff (Trippe et al. 2022, Alg. 1): for each output row, ``particles`` copies of the state walk the grid;
    the known part follows one forward path shared by the row's particles (the bridge), each particle is weighted by
    the model's predictive density of that path's next value, ``N(y'; mu_theta,k, v C_kk)``, and moved by the reverse
    kernel conditioned on it (``coupling``; module docstring); rows whose effective sample size falls below
    ``ess * particles`` are resampled (systematic). At the end one particle per row is drawn by its weight. For an
    exact model whose reverse kernel is the true one (fine grids) the draws converge to ``p(x_u | x_k = y)`` as the
    particles grow (Trippe et al. 2022, Thm. 1).

    With ``twist > 0`` (the twisted diffusion sampler's idea, Wu et al. 2023, Alg. 1) the unknown part's proposal is
    moved by ``Sigma grad log p~(y | x_t)``, ``p~ = N(y; x_theta,k(x_t), r^2 / twist)`` (:func:`_twisted_mean`), and
    the weights carry the ratio ``p_theta / proposal`` and the twisting functions' ratio between steps, which
    telescopes: the target is unchanged, the particles are spent where the known values are likely (one backward
    pass per step)."""
    return _walk(model, known, grid, noise, progress, particles, True, variance, coupling, clip_x0, ess, twist,
                 desc="smc")


__all__ = ["ConditionalSpec", "CONDITIONAL_METHODS", "register_method", "method_names", "get_method", "parse_method",
           "COUPLINGS", "replace", "repaint", "dps", "smc"]
