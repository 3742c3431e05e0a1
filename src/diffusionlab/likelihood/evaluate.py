"""Likelihood reports of a trained run: ``evaluate --metric nll`` and ``evaluate --metric elbo``.

- ``nll`` -- continuous-time runs (``vp-sde``, ``subvp-sde``, ``ve-sde``): the exact log-likelihood of the
  probability-flow ODE (:func:`~diffusionlab.likelihood.dataset_log_likelihood`, float64), with the exact or
  Hutchinson divergence;
- ``elbo`` -- discrete chains (``vp``, ``ve``): DDPM's negative ELBO with every one of the ``T`` terms evaluated
  (:func:`~diffusionlab.objectives.full_vlb`, float64): prior ``L_T``, decoder ``L_0`` and ``sum_{t=2}^T L_{t-1}``.

Both are reported in nats per point and bits per dimension with the standard error over points (and, for
Hutchinson's estimator, the part of it due to the probes). What the bits measure depends on the data:

- **quantized data** (``L`` levels: the digits' 17 grey levels ``k / 16``, 8-bit images): an upper bound on the
  *discrete* model's bits per dimension. The points ``x = 2 k / (L - 1) - 1`` are dequantized to
  ``2 (k + u) / L - 1``, ``u ~ U[0, 1)^D``, and ``bpd = nll / (D ln 2) + log2(L / 2)``
  (:mod:`diffusionlab.likelihood.bpd`). Exception: the ELBO of 8-bit data with independent noise uses Ho et al.'s
  discretized decoder, already a discrete probability, so there is neither dequantization nor offset;
- **continuous data** (2-D points, images off any grid): the continuous density, ``nll`` nats per point and
  ``nll / (D ln 2)`` bits per dimension (negative when the density exceeds 1).

The evaluation points are held out where the run allows: the digits test split for a run trained on
``split: train``; a fresh draw (seed ``train.seed + 1``) for the generated 2-D sets; otherwise the training data.
``--num`` of them are chosen by a seeded permutation. Simple baselines are reported on the same points in the
same units: a Gaussian fitted by maximum likelihood to the (dequantized) training data, and for quantized data
the uniform density (exactly ``log2 L`` bits) and independent per-dimension histograms (exact discrete bits).
"""

from __future__ import annotations

import math
import time

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.likelihood.bpd import dequantize, nats_to_bpd, offset_bits, on_grid, to_levels
from diffusionlab.utils import mean_and_stderr

_F64 = torch.float64
METRICS = ("digits", "nll", "elbo")
LIKELIHOOD_METRICS = ("nll", "elbo")


# ---- data ---------------------------------------------------------------------------------------------------
def data_levels(ds) -> int | None:
    """The number of quantization levels of a dataset's values in model space (its own ``levels`` fact), when
    its data are indeed on that grid; None for continuous data (points, resized images, anything off the grid)."""
    if ds.levels is None:
        return None
    return ds.levels if on_grid(ds.data, ds.levels) else None


def convention(levels: int | None, decoder: str | None = None) -> str:
    """The one-line statement, put in the JSON, of what ``bits_per_dim`` means for these data."""
    if levels is None:
        return "continuous data, no dequantization: bits_per_dim = nll / (D ln 2) of the density"
    if decoder == "discretized":
        return ("8-bit data: Ho et al.'s discretized decoder gives a discrete probability; "
                "bits_per_dim = nll / (D ln 2), no dequantization, no offset")
    return (f"{levels}-level data x = 2k/{levels - 1} - 1 (k = 0..{levels - 1}) dequantized to 2(k + u)/{levels} - 1, "
            f"u ~ U[0,1)^D (cells of side 2/{levels}); bits_per_dim = nll / (D ln 2) + log2({levels}/2) "
            f"= nll / (D ln 2) + {offset_bits(levels):.4f}, an upper bound on the discrete bits per dimension")


def heldout_points(cfg: dict, ds):
    """``(data, description, heldout)``: the points a likelihood is measured on: the dataset's held-out part
    (:func:`diffusionlab.data.heldout_dataset`: a test split, a fresh draw of a generated set) or, when it has
    none, the training data."""
    from diffusionlab.data import heldout_dataset

    found = heldout_dataset(cfg["data"], int(cfg["train"]["seed"]))
    if found is not None:
        held, description = found
        return held.data, description, True
    return ds.data, f"the training data of {cfg['data']['name']!r} (the run has no held-out split)", False


def choose(data: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``min(num, N)`` points of ``data``, by a permutation drawn from ``generator`` (CPU)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DiffusionLabError(f"--num must be an integer >= 1, got {num!r}")
    idx = torch.randperm(data.shape[0], generator=generator)[:num]
    return data[idx.to(data.device)]


def prepare(x: torch.Tensor, levels: int | None, generator: torch.Generator, dtype=_F64) -> torch.Tensor:
    """``x`` in ``dtype``, uniformly dequantized when it has ``levels`` levels (drawn from ``generator``)."""
    x = x.to(dtype)
    return x if levels is None else dequantize(x, generator, levels)


# ---- summaries ----------------------------------------------------------------------------------------------
def _se_bits(se: float | None, dim: int) -> float | None:
    return None if se is None else nats_to_bpd(se, dim)


def bits(nats: float, dim: int, levels: int | None, decoder: str | None = None) -> float:
    """Bits per dimension from nats per point, with the dequantization offset where it applies."""
    b = nats_to_bpd(nats, dim)
    return b + offset_bits(levels) if levels is not None and decoder != "discretized" else b


def nll_summary(nll: torch.Tensor, dim: int, levels: int | None, decoder: str | None = None) -> dict:
    """``nll_nats_per_point``, ``bits_per_dim`` and their standard errors over points from per-point NLLs."""
    m, se = mean_and_stderr(nll)
    return {"nll_nats_per_point": m, "nll_nats_per_point_stderr": se, "bits_per_dim": bits(m, dim, levels, decoder),
            "bits_per_dim_stderr": _se_bits(se, dim)}


# ---- baselines ----------------------------------------------------------------------------------------------
def gaussian_baseline(train: torch.Tensor, x_eval: torch.Tensor, levels: int | None,
                      generator: torch.Generator) -> dict:
    """A Gaussian (full covariance, maximum likelihood) fitted to the training data -- dequantized like the
    evaluation points when ``levels`` is set -- and its exact NLL at ``x_eval`` (already prepared)."""
    tr = prepare(train.cpu(), levels, generator).reshape(train.shape[0], -1)
    mean = tr.mean(0)
    cov = (tr - mean).T @ (tr - mean) / tr.shape[0]
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    nll = -dist.log_prob(x_eval.cpu().to(_F64).reshape(x_eval.shape[0], -1))
    out = {"name": "gaussian fitted to the training data (full covariance, maximum likelihood)"}
    out.update(nll_summary(nll, tr.shape[1], levels))
    return out


def histogram_baseline(train: torch.Tensor, x_eval: torch.Tensor, levels: int) -> dict:
    """Independent per-dimension histograms over the ``levels`` values (add-one smoothing) fitted to the
    training data: the exact discrete NLL of the (not dequantized) evaluation points."""
    k_tr = to_levels(train.cpu(), levels=levels).reshape(train.shape[0], -1)
    k_ev = to_levels(x_eval.cpu(), levels=levels).reshape(x_eval.shape[0], -1)
    d = k_tr.shape[1]
    counts = torch.ones(d, levels, dtype=_F64)
    counts.scatter_add_(1, k_tr.T, torch.ones_like(k_tr.T, dtype=_F64))
    logp = torch.log(counts / counts.sum(1, keepdim=True))
    nll = -logp.gather(1, k_ev.T).sum(0)
    out = {"name": f"independent {levels}-bin histogram per dimension (add-one smoothing), exact discrete NLL"}
    out.update(nll_summary(nll, d, None))
    return out


def baselines(train: torch.Tensor, x_eval_raw: torch.Tensor, x_eval: torch.Tensor, levels: int | None,
              generator: torch.Generator) -> dict:
    """The baselines of the module docstring, keyed by name: ``x_eval_raw`` are the evaluation points as
    stored, ``x_eval`` the same points dequantized when ``levels`` is set (bits then bound the discrete bits)."""
    out = {"gaussian": gaussian_baseline(train, x_eval, levels, generator)}
    if levels is not None:
        d = x_eval[0].numel()
        out["uniform"] = {"name": "uniform density on [-1, 1]^D", "nll_nats_per_point": d * math.log(2.0),
                          "bits_per_dim": bits(d * math.log(2.0), d, levels)}
        out["histogram"] = histogram_baseline(train, x_eval_raw, levels)
    return out


# ---- the two metrics ------------------------------------------------------------------------------------------
def _batches(x: torch.Tensor, batch_size: int, desc: str, progress: bool):
    """``x`` split into batches of ``batch_size`` points, behind a progress display (stderr) when ``progress``."""
    from diffusionlab.progress import progress as progress_display

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DiffusionLabError(f"batch size must be an integer >= 1, got {batch_size!r}")
    return progress_display(torch.split(x, batch_size), desc=desc, enabled=progress)


def nll_metrics(model, x: torch.Tensor, levels: int | None = None, batch_size: int = 128, divergence: str = "exact",
                num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
                generator: torch.Generator | None = None, progress: bool = False) -> dict:
    """The probability-flow ODE's NLL of prepared (already dequantized) points ``x`` in float64.

    ``model`` is converted to float64 in place. Returns :func:`nll_summary`'s keys, plus the probe part of the
    standard errors (Hutchinson with ``num_probes > 1``), ``network_calls`` (the ODE solver's evaluations of the
    velocity, each on a whole batch of points, summed over batches), ``num``, ``dim`` and the options."""
    from diffusionlab.likelihood.ode import dataset_log_likelihood

    model.to(_F64).eval()
    res = dataset_log_likelihood(model, _batches(x, batch_size, "nll", progress), batch_size=batch_size, eps=eps,
                                 rtol=rtol, atol=atol, divergence=divergence, num_probes=num_probes,
                                 generator=generator, dtype=_F64)
    dim = res["dim"]
    out = nll_summary(res["nll"], dim, levels)
    sp = res["stderr_probes"]
    out["nll_nats_per_point_stderr_probes"] = sp
    out["bits_per_dim_stderr_probes"] = _se_bits(sp, dim)
    out.update({"network_calls": res["nfe"], "num": res["num_points"], "dim": dim, "divergence": divergence,
                "probes": num_probes if divergence == "hutchinson" else None,
                "probe": "rademacher" if divergence == "hutchinson" else None, "rtol": rtol, "atol": atol,
                "eps": eps, "solver": "dopri5"})
    return out


def elbo_decoder(levels: int | None, process) -> str:
    """``discretized`` for 8-bit data with independent noise, ``gaussian`` otherwise."""
    return "discretized" if levels == 256 and process.cov.is_identity else "gaussian"


def elbo_per_point(model, x: torch.Tensor, batch_size: int = 128, variance: str | None = None,
                   decoder: str = "gaussian", generator: torch.Generator | None = None, progress: bool = False,
                   clip_x0: bool = False) -> dict:
    """DDPM's negative ELBO of prepared points ``x`` per point (nats, float64; ``model`` converted in place),
    every term evaluated once per point by :func:`~diffusionlab.objectives.full_vlb`: ``total``, ``prior``
    (``L_T``), ``decoder`` (``L_0``) and ``middle`` (``sum_{t=2}^T L_{t-1}``), each ``(N,)`` on the CPU, plus the
    resolved ``variance`` and ``network_calls`` (batched calls: each evaluates the network on a chunk of steps
    ``t`` for a batch of points, about 8192 samples; every point gets ``T`` evaluations in all). The progress display
    advances once per network call."""
    import math

    from diffusionlab.objectives.vlb import full_vlb, resolve_variance, vlb_chunk
    from diffusionlab.progress import progress as progress_display

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DiffusionLabError(f"batch size must be an integer >= 1, got {batch_size!r}")
    model.to(_F64).eval()
    variance = resolve_variance(variance, model)
    parts = {"total": [], "prior": [], "decoder": [], "middle": []}
    start = model.nfe
    batches = torch.split(x.to(_F64), batch_size)
    T = int(model.process.T)
    calls = sum(math.ceil(T / vlb_chunk(xb.shape[0])) for xb in batches)
    bar = progress_display(total=calls, desc=f"elbo ({x.shape[0]} points x {T} terms)", enabled=progress)
    for xb in batches:
        total, terms, prior = full_vlb(model, xb, variance=variance, decoder=decoder, generator=generator,
                                       return_terms=True, bar=bar, clip_x0=clip_x0)
        for key, val in (("total", total), ("prior", prior), ("decoder", terms[:, 0]), ("middle", terms[:, 1:].sum(1))):
            parts[key].append(val.cpu())
    bar.close()
    out = {key: torch.cat(v) for key, v in parts.items()}
    out.update({"variance": variance, "network_calls": model.nfe - start})
    return out


def elbo_metrics(model, x: torch.Tensor, levels: int | None = None, batch_size: int = 128, variance: str | None = None,
                 decoder: str = "gaussian", generator: torch.Generator | None = None, progress: bool = False,
                 clip_x0: bool = False) -> dict:
    """DDPM's negative ELBO of prepared points ``x`` (dequantized unless ``decoder="discretized"``) summarised
    (:func:`elbo_per_point`): :func:`nll_summary`'s keys for the total and, under ``terms``, the prior ``L_T``,
    the decoder ``L_0`` and ``sum_{t=2}^T L_{t-1}`` in nats per point and bits per dimension (no offset: the
    offset belongs to the total)."""
    per = elbo_per_point(model, x, batch_size, variance, decoder, generator, progress, clip_x0)
    dim = x[0].numel()
    out = nll_summary(per["total"], dim, levels, decoder)
    out["terms"] = {"prior_L_T": _term(per["prior"], dim), "decoder_L_0": _term(per["decoder"], dim),
                    "sum_L_1_to_L_T-1": _term(per["middle"], dim)}
    out.update({"network_calls": per["network_calls"], "num": x.shape[0], "dim": dim, "T": int(model.process.T),
                "network_evaluations_per_point": int(model.process.T), "decoder": decoder,
                "variance": per["variance"], "clip_x0": clip_x0})
    return out


def _term(values: torch.Tensor, dim: int) -> dict:
    m, se = mean_and_stderr(values)
    return {"nats_per_point": m, "nats_per_point_stderr": se, "bits_per_dim": nats_to_bpd(m, dim),
            "bits_per_dim_stderr": _se_bits(se, dim)}


# ---- a run ----------------------------------------------------------------------------------------------------
def check_metric(metric: str, process, process_name: str, run) -> None:
    """Refuse ``nll`` on a chain and ``elbo`` on an SDE, naming the metric to use instead."""
    if metric not in LIKELIHOOD_METRICS:
        raise DiffusionLabError(f"unknown likelihood metric {metric!r}; allowed: {', '.join(LIKELIHOOD_METRICS)}")
    if metric == "nll" and process.discrete:
        raise DiffusionLabError(
            f"--metric nll needs a continuous-time run (process vp-sde, subvp-sde or ve-sde); {run} uses the discrete "
            f"chain {process_name!r}: use --metric elbo"
        )
    if metric == "elbo" and not process.discrete:
        raise DiffusionLabError(
            f"--metric elbo needs a discrete-chain run (process vp or ve); {run} uses the SDE {process_name!r}: "
            "use --metric nll"
        )


def _seeds(seed: int, n: int = 4) -> list[int]:
    """``n`` independent seeds derived from ``seed`` (point choice, dequantization, estimator, baselines)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DiffusionLabError(f"--seed must be an integer >= 0, got {seed!r}")
    g = torch.Generator().manual_seed(seed)
    return [int(v) for v in torch.randint(0, 2**62, (n,), generator=g)]


def check_options(metric: str, num, batch_size, divergence: str, probes, rtol, atol, variance) -> None:
    """Refuse options that do not apply to ``metric`` or are out of range, before any work."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DiffusionLabError(f"--num must be an integer >= 1, got {num!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise DiffusionLabError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if metric == "nll":
        if variance is not None:
            raise DiffusionLabError(f"--variance {variance} applies to --metric elbo, not to --metric nll")
        if divergence not in ("exact", "hutchinson"):
            raise DiffusionLabError(f"unknown --divergence {divergence!r}; allowed: exact, hutchinson")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise DiffusionLabError(f"--probes must be an integer >= 1, got {probes!r}")
        if divergence == "exact" and probes != 1:
            raise DiffusionLabError(f"--probes {probes} needs --divergence hutchinson")
        for flag, tol in (("--rtol", rtol), ("--atol", atol)):
            if not (isinstance(tol, (int, float)) and 0 < tol < 1):
                raise DiffusionLabError(f"{flag} must be a number in (0, 1), got {tol!r}")
    elif divergence != "exact" or probes != 1:
        raise DiffusionLabError("--divergence and --probes apply to --metric nll, not to --metric elbo")


def _device_of(model) -> torch.device:
    """The device of the model's parameters or buffers (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def check_request(metric: str, num: int = 1000, batch_size: int | None = None, divergence: str = "exact",
                  probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, variance: str | None = None) -> None:
    """Validate an ``evaluate --metric nll | elbo`` request before any model is loaded."""
    check_options(metric, num, batch_size, divergence, probes, rtol, atol, variance)


def evaluate_likelihood(loaded, metric: str, num: int = 1000, seed: int = 0, batch_size: int | None = None,
                        divergence: str = "exact", probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                        variance: str | None = None, progress: bool = False, log=None, run="",
                        clip_x0: bool = False) -> dict:
    """The ``nll`` or ``elbo`` report of a loaded run ``(cfg, ds, model)`` (module docstring: a run directory's
    :func:`~diffusionlab.training.sampling.load_run`, or a diffusers model), as a JSON-ready dict; ``run`` names
    it in the report.

    Deterministic given ``seed`` (CPU generators for the choice of points, the dequantization, the probes or the
    ELBO's noise, and the baselines' dequantization), on the model's device."""
    t0 = time.time()
    check_options(metric, num, batch_size, divergence, probes, rtol, atol, variance)
    s_choose, s_deq, s_est, s_base = _seeds(seed)
    cfg, ds, model = loaded
    pname = cfg["process"]["name"]
    check_metric(metric, model.process, pname, run)
    levels = data_levels(ds)
    pool, description, heldout = heldout_points(cfg, ds)
    raw = choose(pool, num, torch.Generator().manual_seed(s_choose))
    if raw.shape[0] < num and log is not None:
        log(f"diffusionlab: --num {num} asked for, {raw.shape[0]} points available: using {raw.shape[0]}")
    decoder = elbo_decoder(levels, model.process) if metric == "elbo" else None
    deq_levels = None if decoder == "discretized" else levels  # the discretized decoder takes the grid values
    x_deq = prepare(raw, levels, torch.Generator().manual_seed(s_deq))  # what the baselines see
    x = x_deq if deq_levels == levels else prepare(raw, None, torch.Generator())
    x = x.to(_device_of(model))
    bs = batch_size if batch_size is not None else 128
    est_gen = torch.Generator().manual_seed(s_est)
    if metric == "nll":
        body = nll_metrics(model, x, levels, batch_size=bs, divergence=divergence, num_probes=probes, rtol=rtol,
                           atol=atol, generator=est_gen, progress=progress)
    else:
        body = elbo_metrics(model, x, levels, batch_size=bs, variance=variance, decoder=decoder, clip_x0=clip_x0,
                            generator=est_gen,
                            progress=progress)
    out = {"metric": metric, "run": str(run), "process": pname, "data": description, "heldout": heldout,
           "num_available": int(pool.shape[0]), "seed": seed, "batch_size": bs, "levels": levels,
           "dequantized": deq_levels is not None, "convention": convention(levels, decoder)}
    out.update(body)
    out["baselines"] = baselines(ds.data, raw, x_deq, levels, torch.Generator().manual_seed(s_base))
    out["seconds"] = round(time.time() - t0, 2)
    return out
