"""Exact log-likelihood through the probability-flow ODE, with a noise covariance C.

Song et al. 2021 ("Score-based generative modeling through stochastic differential equations", Appendix D.2)
after Chen et al. 2018 and Grathwohl et al. 2019 (FFJORD): along the ODE ``dx/dt = v(x, t)``,
``v = f(t) x - g(t)^2 C grad log p_t(x) / 2`` (the score enters as ``C grad log p``), the instantaneous change of variables gives
``d log p_t(x_t) / dt = -div v(x_t, t)``, so for a point ``x`` at time ``eps``::

    log p_eps(x) = log N(x_T; 0, prior_std^2 C) + int_eps^T div v(x_t, t) dt,     x_t the ODE path from x_eps = x

The augmented state ``[x_t, int div]`` is integrated from ``eps`` to ``T`` with torchdiffeq (Dormand-Prince
``dopri5`` by default) in float64. The divergence is computed either

- ``"exact"``: ``sum_i d v_i / d x_i`` by automatic differentiation, one backward pass per dimension (use for
  low dimension), or
- ``"hutchinson"``: ``E[e^T (dv/dx) e]`` over probes ``e`` with ``E[e e^T] = I`` (Rademacher or standard normal),
  one vector-Jacobian product per probe; as in FFJORD each point keeps the same ``K`` probes along its whole path,
  so each probe gives an unbiased estimate of the log-likelihood and their spread gives a standard error.

What is computed is ``log p_eps`` of the *model's* ODE, with ``p_T`` replaced by the prior (the mismatch is
``KL``-small for the SDEs here). VE convention: ``p_eps`` is the data convolved with ``N(0, sigma(eps)^2 C)``,
``sigma(eps) ~ sigma_min`` (the VE-SDE is started at ``t = -inf``; see :mod:`diffusionlab.processes.sde`), so
compare with the exact marginal at ``eps``, not with the data density. Results are in nats per sample; see
:mod:`diffusionlab.likelihood.bpd` for bits per dimension.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.odeint import solve
from diffusionlab.utils import mean_and_stderr, sum_except_batch

_F64 = torch.float64
DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def sample_probes(shape, kind: str = "rademacher", generator: torch.Generator | None = None, device=None,
                  dtype=_F64) -> torch.Tensor:
    """Hutchinson probes with ``E[e e^T] = I``: Rademacher (+-1) or standard normal, shaped ``shape``.

    Drawn on the generator's device (CPU if none is given and ``device`` is None), then moved to ``device``."""
    gdev = generator.device if generator is not None else device
    if kind == "rademacher":
        e = torch.randint(0, 2, tuple(shape), generator=generator, device=gdev).to(dtype) * 2 - 1
    elif kind == "gaussian":
        e = torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype)
    else:
        raise DiffusionLabError(f"unknown Hutchinson probe {kind!r}; allowed: {', '.join(PROBES)}")
    return e.to(device=device, dtype=dtype)


def exact_divergence(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``div v = sum_i d v_i / d x_i`` per sample, ``(B,)``, by one backward pass per dimension.

    ``v`` must be computed from ``x`` (which requires grad) sample by sample: each backward pass of
    ``sum_b v_b[i]`` then gives row ``i`` of every sample's Jacobian at once."""
    b = x.shape[0]
    vf = v.reshape(b, -1)
    d = vf.shape[1]
    div = torch.zeros(b, dtype=v.dtype, device=v.device)
    for i in range(d):
        (grad,) = torch.autograd.grad(vf[:, i].sum(), x, retain_graph=True)
        div = div + grad.reshape(b, -1)[:, i]
    return div


def hutchinson_divergence(v: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimates ``e_k^T (dv/dx) e_k`` per probe and sample, ``(K, B)``, for probes ``(K, *x.shape)``;
    one vector-Jacobian product each. Unbiased for ``div v`` when ``E[e e^T] = I``."""
    k = probes.shape[0]
    out = []
    for j in range(k):
        (vjp,) = torch.autograd.grad(v, x, grad_outputs=probes[j], retain_graph=True)
        out.append(sum_except_batch(vjp * probes[j]))
    return torch.stack(out)


def drift_and_divergence(model, x: torch.Tensor, t, divergence: str = "exact", probes: torch.Tensor | None = None):
    """The ODE velocity at ``(x, t)`` and its divergence: ``(v, div)`` with ``div`` of shape ``(1, B)`` (exact)
    or ``(K, B)`` (Hutchinson, one row per probe). Both detached; one model evaluation."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = model.process.ode_drift(xg, t, model.c_score(xg, t))
        if divergence == "exact":
            div = exact_divergence(v, xg)[None]
        else:
            div = hutchinson_divergence(v, xg, probes)
    return v.detach(), div.detach()


def _check_options(divergence, probe, num_probes):
    if divergence not in DIVERGENCES:
        raise DiffusionLabError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise DiffusionLabError(f"unknown Hutchinson probe {probe!r}; allowed: {', '.join(PROBES)}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise DiffusionLabError(f"num_probes must be an integer >= 1, got {num_probes!r}")


def ode_log_likelihood(model, x: torch.Tensor, eps: float = 1e-5, method: str = "dopri5", rtol: float = 1e-5,
                       atol: float = 1e-5, divergence: str = "exact", probe: str = "rademacher", num_probes: int = 1,
                       generator: torch.Generator | None = None, dtype=_F64, options: dict | None = None) -> dict:
    """``log p_eps(x)`` per sample (nats) through the probability-flow ODE (module docstring).

    Args:
        model: a :class:`~diffusionlab.parametrization.DiffusionModel` on a continuous SDE; it is evaluated in
            ``dtype`` (float64 by default; a network of another dtype is evaluated through a copy converted to
            ``dtype``, the model itself is left as it is).
        x: points ``(B, ...)`` at time ``eps``.
        eps: start time (1e-5, score_sde's likelihood ``eps``).
        method, rtol, atol, options: torchdiffeq solver, tolerances (on the augmented state) and solver options
            (adaptive solvers are made to land on ``T`` exactly, never evaluating the model beyond it).
        divergence: ``"exact"`` or ``"hutchinson"``; ``probe``: ``"rademacher"`` or ``"gaussian"``;
            ``num_probes``: ``K`` probes per point, fixed along the path; drawn from ``generator``.

    Returns a dict: ``log_likelihood`` ``(B,)`` (the mean over probes), ``nfe`` (model evaluations),
    ``stderr_probes`` ``(B,)`` (standard error of that mean over the ``K`` probes; None for the exact divergence
    or ``K = 1``), ``prior_log_prob`` ``(B,)`` and ``delta_log_prob`` ``(B,)`` (the divergence integral), and
    ``z`` (the points mapped to ``T``).
    """
    process = model.process
    process.require_continuous("the probability-flow ODE likelihood")
    _check_options(divergence, probe, num_probes)
    T = float(process.T)
    if not (0.0 < float(eps) < T):
        raise DiffusionLabError(f"eps must lie in (0, T = {T}), got {eps!r}")
    x = x.detach().to(dtype)
    process.cov.check(x)
    model = in_dtype(model, dtype)
    b = x.shape[0]
    probes = None
    if divergence == "hutchinson":
        probes = sample_probes((num_probes, *x.shape), probe, generator, x.device, dtype)
    rows = 1 if divergence == "exact" else num_probes
    start = model.nfe

    def augmented(t, state):
        return drift_and_divergence(model, state[0], t, divergence, probes)

    state0 = (x, torch.zeros(rows, b, dtype=dtype, device=x.device))
    with torch.no_grad():
        z, int_div = solve(augmented, state0, float(eps), T, method, rtol, atol, options)
    prior = process.prior_log_prob(z)
    per_probe = prior[None] + int_div  # (rows, B)
    ll = per_probe.mean(0)
    stderr = per_probe.std(0) / math.sqrt(rows) if rows > 1 else None
    return {"log_likelihood": ll, "nfe": model.nfe - start, "stderr_probes": stderr, "prior_log_prob": prior,
            "delta_log_prob": int_div.mean(0), "z": z}


def in_dtype(model, dtype):
    """``model`` if its floating parameters and buffers are already ``dtype``, else a converted copy (the report's
    ``nfe`` counts the copy's evaluations)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in tensors):
        return model
    import copy

    return copy.deepcopy(model).to(dtype)


def _batches(data, batch_size: int):
    """Tensors of at most ``batch_size`` points from a tensor ``(N, ...)`` or an iterable of batches (tensors
    or tuples whose first element is the data, as a ``DataLoader`` of ``(x, label)`` yields)."""
    if torch.is_tensor(data):
        yield from torch.split(data, batch_size)
        return
    for item in data:
        xb = item[0] if isinstance(item, (tuple, list)) else item
        yield from torch.split(torch.as_tensor(xb), batch_size)


def dataset_log_likelihood(model, data, batch_size: int = 256, progress: bool = False, **kwargs) -> dict:
    """Negative log-likelihood of a data set through :func:`ode_log_likelihood` (``kwargs`` passed on).

    Returns ``mean_nll`` (nats per point), ``stderr`` (standard error of that mean over points: the sample
    standard deviation of the per-point estimates over ``sqrt(N)``; with Hutchinson probes each estimate also
    carries its probe noise, so this already includes it), ``stderr_probes`` (the part of ``stderr`` due to the
    probes alone, ``sqrt(sum_i se_i^2) / N``; None for the exact divergence or one probe), ``nll`` ``(N,)``,
    ``num_points``, ``dim`` (entries per point) and ``nfe`` (model evaluations over all batches).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DiffusionLabError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    from diffusionlab.progress import progress as progress_display

    batches = progress_display(_batches(data, batch_size), desc="log-likelihood", enabled=progress)
    nll, se2, nfe, dim = [], [], 0, None
    for xb in batches:
        out = ode_log_likelihood(model, xb, **kwargs)
        nll.append(-out["log_likelihood"].cpu())
        if out["stderr_probes"] is not None:
            se2.append(out["stderr_probes"].cpu() ** 2)
        nfe += out["nfe"]
        dim = xb[0].numel()
    if not nll:
        raise DiffusionLabError("dataset_log_likelihood got no data")
    nll = torch.cat(nll)
    n = nll.numel()
    stderr = mean_and_stderr(nll)[1]
    stderr = float("nan") if stderr is None else stderr
    stderr_probes = (torch.cat(se2).sum().sqrt() / n).item() if se2 else None
    return {"mean_nll": nll.mean().item(), "stderr": stderr, "stderr_probes": stderr_probes, "nll": nll,
            "num_points": n, "dim": dim, "nfe": nfe}
