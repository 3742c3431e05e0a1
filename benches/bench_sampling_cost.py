"""Sampling cost at equal quality: seconds and network evaluations per 1000 digits, diffusionlab against its peers.

    python benches/bench_sampling_cost.py --threads 1 --workers 2 --json runs/bench/sampling_cost.json \\
        --markdown runs/bench/sampling_cost.md --plot docs/benchmarks/sampling_cost.png
    python benches/bench_sampling_cost.py --quick                      # smoke run: few samplers and NFEs, N = 500
    python benches/bench_sampling_cost.py --checks-only                # schedule and adapter checks only (~1 min)

The oracle benchmark's method (benches/bench_samplers.py) on a trained network: every sampler -- diffusionlab's,
Hugging Face diffusers' schedulers, lucidrains' denoising-diffusion-pytorch's ``GaussianDiffusion`` -- drives the
SAME trained eps-prediction U-Net (a diffusionlab run, ``--run``; trained with configs/digits.yaml if missing)
through small adapters, so only the sampler differs. Every run of seed ``s`` starts from the same ``x_T``
(``torch.randn`` from a generator seeded with ``s``; checked by a checksum of the network's first input) and draws
its injected noise from that same stream after it. Quality is the Frechet distance of N samples to the held-out test
digits in the shipped classifier's feature space (:func:`diffusionlab.metrics.digits.evaluate_digits`); cost is the
network evaluations actually made (a counter around the network), and the wall and CPU seconds per 1000 samples
(CPU seconds of the sampling process: insensitive to other load on the machine, equal to wall seconds on an idle one
with ``--threads 1``).

Before the runs, :func:`schedule_checks` compares each peer's ``alphas_cumprod`` with diffusionlab's chain and
:func:`adapter_checks` verifies that the adapters return diffusionlab's eps bit for bit and that equivalent samplers
of the three libraries give the same samples from the same seed.

"Equal quality": the reference of each peer is its default sampler (diffusers' ``DDPMScheduler`` at 1000 steps, as
the ``train_unconditional`` example's ``DDPMPipeline`` runs it; denoising-diffusion-pytorch's 1000-step ancestral
``p_sample_loop``), run with ``--ref-seeds`` seeds. A configuration matches it when its FD (mean over its seeds) is
``<= mean_ref + 2 SE_ref``, ``SE_ref = std(FD over the reference seeds, ddof=1) / sqrt(#seeds)``. For each library
the table gives the smallest NFE of its best sampler that matches each reference.

Peers are imported only through ``benches/peer_imports.py``; a missing peer is reported and skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # denoising-diffusion-pytorch draws a tqdm bar per sampling loop

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_imports  # noqa: E402

DEFAULT_RUN = "runs/likelihood/digits_chain"
DEFAULT_CONFIG = "configs/digits.yaml"
T_TRAIN = 1000
FULL_NFE = (5, 8, 10, 15, 20, 25, 50)
QUICK_NFE = (10, 25)
ANCESTRAL_NFE = (5, 8, 10, 15, 20, 25, 50, 100, 200)  # the stochastic samplers on respaced chains
FAIL_NFE = (10, 25)  # grid of the solvers that start at t = T unclipped (they fail; shown, not tuned)
LAMBDA_MIN = -5.1  # diffusers' lambda_min_clipped for the cosine schedule (huggingface/diffusers PR #3314)


# ---- peers --------------------------------------------------------------------------------------------------------
_PEERS: dict = {}


def peers() -> dict:
    """``{"ddpm-pytorch": module or None, "diffusers": module or None, "k-diffusion": its sampling module or None}``,
    imported once per process through
    ``peer_imports`` (a missing peer prints why). denoising-diffusion-pytorch is imported first: it imports torchvision,
    after which ``peer_imports``' torchvision preparation is skipped; the other order makes the second preparation
    re-declare the op schemas and fail (``dir(torch.ops.torchvision)`` does not list declared ops)."""
    if not _PEERS:
        _PEERS["ddpm-pytorch"] = peer_imports.import_ddpm_pytorch()
        _PEERS["diffusers"] = peer_imports.import_diffusers()
        import peers as peer_samplers  # k_diffusion/sampling.py alone (benches/peers.py)

        _PEERS["k-diffusion"] = peer_samplers.k_sampling()
    return _PEERS


# ---- the network, counted ----------------------------------------------------------------------------------------
class CountingNet(nn.Module):
    """Wraps the raw network ``net(x, c_noise)``: counts every call and keeps a checksum of the first input (the
    start ``x_T`` as the network sees it), so that runs can be checked to start from the same draws."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.inner = net
        self.calls = 0
        self.first_input_sum: float | None = None

    def reset(self) -> None:
        self.calls, self.first_input_sum = 0, None

    def forward(self, x, c_noise):
        if self.first_input_sum is None:
            self.first_input_sum = float(x.double().sum())
        self.calls += 1
        return self.inner(x, c_noise)


def ensure_run(run_dir: Path, config: str) -> None:
    """Train the default digits run into ``run_dir`` if it does not exist (about 10 minutes on 2 cores)."""
    if run_dir.is_dir():
        return
    print(f"run {run_dir} not found: training one with the default recipe "
          f"(diffusionlab train {config} --out {run_dir}, ~10 min)", flush=True)
    subprocess.run(["diffusionlab", "train", config, "--out", str(run_dir)], check=True)


def load_counted(run_dir: str):
    """``(dataset, model, counter)``: the run's EMA weights (``diffusionlab.training.sampling.load_run``) on the CPU,
    the raw network wrapped in a :class:`CountingNet`."""
    from diffusionlab.training.sampling import load_run

    _, ds, model = load_run(run_dir, "cpu")
    counter = CountingNet(model.net)
    model.net = counter
    model.eval()
    return ds, model, counter


# ---- adapters: the same network behind each peer's model interface ----------------------------------------------
# the network's eps at a peer's 0-based timestep t (diffusionlab's chain step t + 1), and that role for diffusers'
# schedulers: shared with the package's diffusers interop
from diffusionlab.interop.diffusers import DiffusersEps  # noqa: E402
from diffusionlab.interop.diffusers import diffusionlab_eps as dl_eps  # noqa: E402


class DDPMPytorchUnet(nn.Module):
    """What denoising-diffusion-pytorch's ``GaussianDiffusion`` needs of its ``Unet``: ``channels``, ``out_dim``,
    ``self_condition``, ``random_or_learned_sinusoidal_cond`` and ``forward(x, t, x_self_cond=None)`` returning eps
    (``objective="pred_noise"``; ``t`` 0-based, a ``(B,)`` long tensor)."""

    def __init__(self, model, channels: int):
        super().__init__()
        self.dl_model = model
        self.channels = channels
        self.out_dim = channels
        self.self_condition = False
        self.random_or_learned_sinusoidal_cond = False

    def forward(self, x, t, x_self_cond=None):
        return dl_eps(self.dl_model, x, t)


# ---- samplers ----------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """One sampler configuration: ``library`` (diffusionlab | diffusers | ddpm-pytorch), ``name``, what it is,
    ``options`` for the runner, the NFE grid it is run at, and whether it is a library's reference default."""

    library: str
    name: str
    what: str
    options: dict = field(default_factory=dict)
    nfes: tuple = ()
    reference: bool = False
    seeds: int | None = None  # None: --seeds (--ref-seeds for references)
    run: str | None = None  # the network's run directory (None: --run)

    @property
    def key(self) -> str:
        return f"{self.library}:{self.name}"


def diffusers_cfg(extra: dict) -> dict:
    """Scheduler config on diffusionlab's chain: T = 1000, ``squaredcos_cap_v2`` (the cosine betas of Nichol &
    Dhariwal, capped at 0.999 -- equal in float32 to diffusionlab's ``cosine_betas``, checked by
    :func:`schedule_checks`), epsilon prediction; ``extra`` on top."""
    cfg = dict(num_train_timesteps=T_TRAIN, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    cfg.update(extra)
    return cfg


def recipe_specs(runs: dict, few: tuple) -> list[Spec]:
    """The configurations beyond the shared network: diffusionlab's samplers on their default grids and on grids
    fitted to the network (``diffusionlab fit-grid``, fitted here when missing), on the default recipe's network
    (``--run``) and on the EDM recipe's (``runs["edm"]``); the distilled students (``runs["distilled"]``: a
    ``diffusionlab distill`` run, its rounds' students for the other step counts); k-diffusion's samplers on the EDM
    recipe's network (its denoiser ``D(x, sigma)``, Karras grid from 80 to 0.002 then 0, as k-diffusion runs EDM)."""
    out = []
    for sampler in ("dpmpp-2m", "unipc", "dpmpp-3m", "heun"):
        out.append(Spec("diffusionlab", f"{sampler}[default]", f"{sampler} on its default grid (the catalogue's)",
                        {"sampler": sampler, "grid": "default"}, few))
    for sampler in ("dpmpp-2m", "unipc"):
        out.append(Spec("diffusionlab", f"{sampler}[fitted]", f"{sampler} on its default grid fitted to the network "
                        "(diffusionlab fit-grid: coupled error against a dense reference, 128 trajectories)",
                        {"sampler": sampler, "grid": "fitted"}, few))
    if runs.get("edm"):
        for sampler in ("dpmpp-2m", "unipc", "heun"):
            out.append(Spec("diffusionlab-edm", f"{sampler}[default]", f"EDM recipe (configs/digits_edm.yaml), "
                            f"{sampler} on its default grid", {"sampler": sampler, "grid": "default"}, few,
                            run=runs["edm"]))
        for sampler in ("dpmpp-2m", "unipc"):
            out.append(Spec("diffusionlab-edm", f"{sampler}[fitted]", f"EDM recipe, {sampler} on its fitted grid",
                            {"sampler": sampler, "grid": "fitted"}, few, run=runs["edm"]))
        for name in K_EDM_SAMPLERS:
            out.append(Spec("k-diffusion", name, f"k_diffusion.sampling.sample_{name} on the EDM recipe's network, "
                            "get_sigmas_karras(sigma_max=80, sigma_min=0.002, rho=7) then 0", {"fn": name}, few,
                            run=runs["edm"]))
    if runs.get("distilled"):
        out.append(Spec("diffusionlab-distilled", "ddim", "progressive distillation (diffusionlab distill) of the EDM "
                        "recipe: DDIM on the student's grid; each NFE its round's student",
                        {}, DISTILLED_NFE, run=runs["distilled"]))
    return out


def make_specs(nfes: tuple, ancestral: tuple = ANCESTRAL_NFE) -> list[Spec]:
    """Every sampler configuration of the benchmark (``--samplers`` selects among them by key).

    On this chain (cosine betas capped at 0.999: ``alpha-bar_T = 2.4e-9``, ``sigma_T / s_T = 2e4``, lambda_T = -9.9)
    a data-prediction solver that starts at ``t = T`` without clipping turns the network's eps error at ``t = T``
    into an x0 error ~2e4 times larger: DDIM survives by clipping x0 to [-1, 1]; DPM-Solver++ and UniPC need the
    start moved to ``lambda >= -5.1`` (diffusers' ``lambda_min_clipped``, documented as "critical for the cosine
    (squaredcos_cap_v2) noise schedule"; for diffusionlab the same start, t <= 996, as an explicit grid). The
    unclipped runs from ``t = T`` are kept at two NFEs to show this. ``nfes``: the grid of the deterministic
    samplers; ``ancestral``: that of the stochastic ones on respaced chains (ancestral, DDIM eta = 1)."""
    few = tuple(nfes)
    fail = tuple(v for v in FAIL_NFE if v in few) or few[:1]
    lam = f"[lambda>={LAMBDA_MIN}]"
    return [
        # diffusionlab: sample_in_chunks(get_sampler(name), ...), as diffusionlab.training.sampling.generate
        Spec("diffusionlab", "ddpm", "ancestral (Ho et al. Alg. 2) on the respaced chain, beta-tilde variance, "
             "clip_x0, uniform grid", {"sampler": "ddpm", "variance": "beta_tilde", "clip_x0": True}, ancestral),
        Spec("diffusionlab", "ddim", "DDIM eta=0, clip_x0 (eps re-derived), uniform grid from t = T",
             {"sampler": "ddim", "eta": 0.0, "clip_x0": True}, few),
        Spec("diffusionlab", f"dpmpp-2m{lam}", "DPM-Solver++(2M), uniform grid from t = 996 (lambda >= -5.1)",
             {"sampler": "dpmpp-2m", "lambda_min": LAMBDA_MIN}, few),
        Spec("diffusionlab", f"dpmpp-3m{lam}", "DPM-Solver++(3M), exact quadratic weights, grid as 2M",
             {"sampler": "dpmpp-3m", "lambda_min": LAMBDA_MIN}, few),
        Spec("diffusionlab", f"unipc{lam}", "UniPC-bh2 (p = 2), grid as 2M",
             {"sampler": "unipc", "lambda_min": LAMBDA_MIN}, few),
        Spec("diffusionlab", "dpmpp-2m", "DPM-Solver++(2M), uniform grid from t = T (unclipped: fails)",
             {"sampler": "dpmpp-2m"}, fail, seeds=1),
        Spec("diffusionlab", "unipc", "UniPC-bh2, uniform grid from t = T (unclipped: fails)", {"sampler": "unipc"},
             fail, seeds=1),
        # diffusers: its schedulers in the usual loop
        Spec("diffusers", "ddpm", "DDPMScheduler defaults (fixed_small variance, clip_sample, leading), 1000 steps",
             {"cls": "DDPMScheduler", "cfg": {}}, (T_TRAIN,), reference=True),
        Spec("diffusers", "ddpm-respaced", "DDPMScheduler defaults at fewer inference steps (respaced, leading)",
             {"cls": "DDPMScheduler", "cfg": {}}, ancestral),
        Spec("diffusers", "ddim", "DDIMScheduler eta=0, clip_sample (default), trailing (from t = 999)",
             {"cls": "DDIMScheduler", "cfg": {"timestep_spacing": "trailing"}}, few),
        Spec("diffusers", f"dpmpp-2m{lam}", "DPMSolverMultistepScheduler order 2, lambda_min_clipped=-5.1, linspace",
             {"cls": "DPMSolverMultistepScheduler", "cfg": {"solver_order": 2, "lambda_min_clipped": LAMBDA_MIN}}, few),
        Spec("diffusers", f"dpmpp-3m{lam}", "DPMSolverMultistepScheduler order 3, lambda_min_clipped=-5.1, linspace",
             {"cls": "DPMSolverMultistepScheduler", "cfg": {"solver_order": 3, "lambda_min_clipped": LAMBDA_MIN}}, few),
        Spec("diffusers", "dpmpp-2m", "DPMSolverMultistepScheduler order 2, trailing from t = 999 (fails)",
             {"cls": "DPMSolverMultistepScheduler", "cfg": {"solver_order": 2, "timestep_spacing": "trailing"}}, fail,
             seeds=1),
        Spec("diffusers", "unipc", "UniPCMultistepScheduler (bh2, order 2), trailing from t = 999 (no "
             "lambda_min_clipped option; fails)", {"cls": "UniPCMultistepScheduler",
                                                   "cfg": {"timestep_spacing": "trailing"}}, fail, seeds=1),
        # denoising-diffusion-pytorch: GaussianDiffusion.sample
        Spec("ddpm-pytorch", "ancestral", "GaussianDiffusion.p_sample_loop (its default: sampling_timesteps = 1000)",
             {}, (T_TRAIN,), reference=True),
        Spec("ddpm-pytorch", "ddim", "GaussianDiffusion.ddim_sample (sampling_timesteps < 1000, eta = 0, clips x0)",
             {}, tuple(sorted(set(few) | {100}))),
        Spec("ddpm-pytorch", "ddim-eta1", "GaussianDiffusion.ddim_sample with ddim_sampling_eta = 1 (ancestral, "
             "beta-tilde, on the respaced chain)", {"eta": 1.0}, ancestral),
    ]


def dl_grid(model, steps: int, lambda_min: float | None):
    """diffusionlab's grid: ``steps`` uniform integer steps from ``T``, or from the largest ``t`` with
    ``lambda_t = log(s_t / sigma_t) >= lambda_min`` (a uniform grid started there)."""
    from diffusionlab.processes.grid import make_grid

    chain = model.process
    if lambda_min is None:
        return make_grid(chain, steps, "uniform")
    lam = torch.log(chain.mean_scale[1:] / chain.sigma[1:])  # decreasing in t
    t_max = int((lam >= lambda_min).sum())
    return make_grid(chain, steps, "uniform", sig_max=float(chain.edm_sigma(t_max)))


def run_diffusionlab(spec: Spec, ds, model, nfe: int, seed: int, num: int, batch: int) -> torch.Tensor:
    """diffusionlab's own path, as ``diffusionlab.training.sampling.generate``: ``samplers.sample_in_chunks`` with
    one generator seeded with ``seed`` for the prior and every injected noise, on the grid of :func:`dl_grid`;
    mapped to [0, 1] by ``dataset.to_display``."""
    from diffusionlab.samplers import get_sampler, sample_in_chunks

    opts = {k: v for k, v in spec.options.items() if k not in ("sampler", "lambda_min", "grid")}
    sampler = get_sampler(spec.options["sampler"])
    kind = spec.options.get("grid")
    if kind == "default":  # the catalogue's own grid and start, the steps that fit the budget
        ts = sampler.grid(model.process, sampler.steps_for_budget(nfe, model.process, sampler.resolve(opts)))
    elif kind == "fitted":
        ts = fitted_grid(spec, model, nfe)
    else:
        ts = dl_grid(model, nfe, spec.options.get("lambda_min"))
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        x = sample_in_chunks(get_sampler(spec.options["sampler"]), model, ds.sample_shape, num, chunk=batch,
                             generator=gen, device="cpu", store_device="cpu", grid=ts, kind="uniform",
                             **opts)
    return ds.to_display(x)


def fitted_grid(spec: Spec, model, nfe: int):
    """The run's fitted grid of ``spec``'s sampler at the steps of ``nfe`` (``<run>/grids/``), fitted and saved
    first if missing (:func:`ensure_fitted`)."""
    from diffusionlab.processes.grid import TimeGrid
    from diffusionlab.samplers.fitgrid import fitted_grid_path, read_times

    run = spec.run or _STATE["main"]
    sampler = spec.options["sampler"]
    steps = fit_steps(sampler, model, nfe)
    return TimeGrid(model.process, read_times(fitted_grid_path(run, sampler, steps)), "fitted")


def fit_steps(sampler: str, model, nfe: int) -> int:
    from diffusionlab.samplers import get_sampler

    spec = get_sampler(sampler)
    return spec.steps_for_budget(nfe, model.process, spec.resolve({}))


def ensure_fitted(spec: Spec, ds, model, counter, nfe: int) -> None:
    """Fit and save the run's grid for ``spec`` at ``nfe`` if it is not there (``diffusionlab fit-grid`` with its
    defaults: 128 trajectories, seed 0, 4 sweeps, a 200-step reference), outside the timed and counted run."""
    from diffusionlab.samplers.fitgrid import fit_grid, fitted_grid_path, save_fit

    run = spec.run or _STATE["main"]
    sampler = spec.options["sampler"]
    steps = fit_steps(sampler, model, nfe)
    if fitted_grid_path(run, sampler, steps).is_file():
        return
    with torch.no_grad():
        res = fit_grid(model, sampler, steps, shape=ds.sample_shape, num=128, seed=0, device="cpu")
    save_fit(res, run)
    print(f"  fitted {sampler} {steps} steps on {run}: coupled error {res.error_start:.4f} -> {res.error:.4f}",
          flush=True)
    counter.reset()


#: k-diffusion's samplers run on the EDM recipe's network: name -> (evaluations per step, options)
K_EDM_SAMPLERS = {"dpmpp_2m": (1, {}), "heun": (2, {}), "lms": (1, {}), "euler": (1, {}),
                  "dpmpp_3m_sde": (1, {"eta": 0.0})}
K_SIGMA_MAX, K_SIGMA_MIN = 80.0, 0.002
DISTILLED_NFE = (1, 2, 4)


def run_kdiffusion(spec: Spec, ds, model, nfe: int, seed: int, num: int, batch: int) -> torch.Tensor:
    """k-diffusion's sampler on the run's network (a process with ``s = 1``, the VE-SDE of the EDM recipe) as its
    denoiser ``D(x, sigma) = E[x_0 | x]``: ``x = randn * sigma_max``, ``sample_<name>(D, x, sigmas)`` on
    ``get_sigmas_karras(n, 0.002, 80, rho=7)`` (which appends sigma = 0); ``n`` the steps that fit ``nfe`` (Heun:
    2 per step, 1 on the step to 0)."""
    import peers as peer_samplers

    ks = peer_samplers.k_sampling()
    per_step, opts = K_EDM_SAMPLERS[spec.options["fn"]]
    steps = nfe if per_step == 1 else (nfe + 1) // 2
    process = model.process
    if not process.unit_scale:
        raise ValueError("the k-diffusion rows need a variance-exploding network (s = 1): the EDM recipe's")

    def denoiser(x, sigma):
        t = process.time_at_edm_sigma(sigma.double().cpu()).clamp(0.0, float(process.T)).to(torch.float64)
        return model.predict(x, t).x0

    sigmas = ks.get_sigmas_karras(steps, K_SIGMA_MIN, K_SIGMA_MAX, rho=7.0)
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    with torch.no_grad():
        for start in range(0, num, batch):
            n = min(batch, num - start)
            x = torch.randn((n, *ds.sample_shape), generator=gen) * sigmas[0]
            fn = getattr(ks, f"sample_{spec.options['fn']}")
            out.append(fn(denoiser, x, sigmas, disable=True, **opts))
    return ds.to_display(torch.cat(out))


def run_distilled(spec: Spec, ds, model, nfe: int, seed: int, num: int, batch: int) -> torch.Tensor:
    """A distilled student as ``diffusionlab sample`` runs it (its config's ``sample:`` section: DDIM on its
    explicit grid): the student of ``nfe`` steps (the run itself, or its ``rounds/<nfe>-steps``)."""
    from diffusionlab.samplers import get_sampler, sample_in_chunks
    from diffusionlab.training.sampling import load_run, sampler_options, section_grid

    cfg, _, _ = load_run(_distilled_dir(spec.run, nfe), "cpu")
    scfg = cfg["sample"]
    grid = section_grid(scfg, model.process)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        x = sample_in_chunks(get_sampler(scfg["sampler"]), model, ds.sample_shape, num, chunk=batch, generator=gen,
                             device="cpu", store_device="cpu", grid=grid, **sampler_options(scfg))
    return ds.to_display(x)


def _distilled_dir(run: str, nfe: int) -> str:
    sub = Path(run) / "rounds" / f"{nfe}-steps"
    return str(sub) if sub.is_dir() and not _is_final(run, nfe) else run


def _is_final(run: str, nfe: int) -> bool:
    try:
        return json.loads((Path(run) / "distill.json").read_text())["steps"] == nfe
    except (OSError, KeyError, ValueError):
        return False


def run_diffusers(spec: Spec, ds, model, nfe: int, seed: int, num: int, batch: int) -> torch.Tensor:
    """diffusers' usual loop (as ``DDPMPipeline``/``DDIMPipeline``): ``scheduler.set_timesteps(k)``, then for each
    ``t`` in ``scheduler.timesteps``: ``eps = net(scale_model_input(x, t), t)``,
    ``x = scheduler.step(eps, t, x[, generator]).prev_sample`` (``DDPMScheduler.step``, ``DDIMScheduler.step``,
    ``DPMSolverMultistepScheduler.step``, ``UniPCMultistepScheduler.step``)."""
    diffusers = peers()["diffusers"]
    sched = getattr(diffusers, spec.options["cls"])(**diffusers_cfg(spec.options["cfg"]))
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    net = DiffusersEps(model)
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    with torch.no_grad():
        for start in range(0, num, batch):
            n = min(batch, num - start)
            x = torch.randn((n, *ds.sample_shape), generator=gen) * sched.init_noise_sigma
            sched.set_timesteps(nfe)
            for t in sched.timesteps:
                eps = net(sched.scale_model_input(x, t), t)
                kw = {"generator": gen} if takes_gen else {}
                x = sched.step(eps, t, x, **kw).prev_sample
            out.append(x)
    return ds.to_display(torch.cat(out))


def run_ddpm_pytorch(spec: Spec, ds, model, nfe: int, seed: int, num: int, batch: int) -> torch.Tensor:
    """denoising-diffusion-pytorch's ``GaussianDiffusion(unet, image_size=8, timesteps=1000,
    sampling_timesteps=nfe, objective="pred_noise", beta_schedule="cosine")`` and its ``sample(batch_size)``:
    ``p_sample_loop`` at ``sampling_timesteps = 1000`` (its default), ``ddim_sample`` below (``ddim_sampling_eta`` from
    ``options["eta"]``, default 0). It draws from torch's
    global generator (no generator argument), seeded here with ``torch.manual_seed(seed)`` -- the same stream as
    the others' ``torch.Generator().manual_seed(seed)``. Its samples come back in [0, 1] (``auto_normalize``: the
    network works in [-1, 1], as diffusionlab's); clamped to [0, 1] as ``to_display`` clamps."""
    ddp = peers()["ddpm-pytorch"]
    unet = DDPMPytorchUnet(model, ds.sample_shape[0])
    gd = ddp.GaussianDiffusion(unet, image_size=ds.sample_shape[-1], timesteps=T_TRAIN, sampling_timesteps=nfe,
                               objective="pred_noise", beta_schedule="cosine", auto_normalize=True,
                               ddim_sampling_eta=spec.options.get("eta", 0.0))
    gd.eval()
    torch.manual_seed(int(seed))
    out = [gd.sample(batch_size=min(batch, num - s)) for s in range(0, num, batch)]
    return torch.cat(out).clamp(0.0, 1.0)


RUNNERS = {"diffusionlab": run_diffusionlab, "diffusionlab-edm": run_diffusionlab,
           "diffusionlab-distilled": run_distilled, "k-diffusion": run_kdiffusion, "diffusers": run_diffusers,
           "ddpm-pytorch": run_ddpm_pytorch}
#: the libraries that are diffusionlab (its recipes), for the ratios
OURS = ("diffusionlab", "diffusionlab-edm", "diffusionlab-distilled")


# ---- workers ------------------------------------------------------------------------------------------------------
_STATE: dict = {}


def _init_worker(run_dir: str, threads: int) -> None:
    """Per process: one thread for torch, the main run loaded once (the others when first needed)."""
    torch.set_num_threads(threads)
    _STATE["main"] = run_dir
    _STATE["runs"] = {run_dir: load_counted(run_dir)}


def _network(spec: Spec, nfe: int):
    """``(ds, model, counter)`` of the spec's network (loaded once per process)."""
    run = spec.run or _STATE["main"]
    if spec.library == "diffusionlab-distilled":
        run = _distilled_dir(run, nfe)
    if run not in _STATE["runs"]:
        _STATE["runs"][run] = load_counted(run)
    return _STATE["runs"][run]


def run_job(spec: Spec, nfe: int, seed: int, num: int, batch: int) -> dict:
    """One (sampler, NFE, seed): draw ``num`` samples, count network calls, time the sampling, score FD. A run that
    raises or returns non-finite samples is recorded with ``fd`` None and the reason in ``failure``."""
    from diffusionlab.metrics.digits import evaluate_digits

    ds, model, counter = _network(spec, nfe)
    if spec.options.get("grid") == "fitted":
        ensure_fitted(spec, ds, model, counter, nfe)
    counter.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    failure, x01 = None, None
    try:
        x01 = RUNNERS[spec.library](spec, ds, model, nfe, seed, num, batch)
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a reason to stop the benchmark
        failure = f"{type(e).__name__}: {e}"
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if x01 is not None and not bool(torch.isfinite(x01).all()):
        failure = f"{int((~torch.isfinite(x01)).sum())} of {x01.numel()} sample values are NaN or infinite"
    scores = evaluate_digits(x01, reference="test") if failure is None else {}
    return {"library": spec.library, "sampler": spec.name, "what": spec.what, "reference": spec.reference,
            "nfe_requested": nfe, "nfe": counter.calls / math.ceil(num / batch), "network_calls": counter.calls,
            "seed": seed, "num": num, "batch": batch, "seconds": seconds, "seconds_per_1000": seconds * 1000.0 / num,
            "cpu_seconds_per_1000": cpu * 1000.0 / num, "x_T_checksum": counter.first_input_sum,
            "fd": scores.get("fd"), "class_coverage": scores.get("class_coverage"),
            "class_entropy": scores.get("class_entropy"), "confidence": scores.get("confidence"), "failure": failure}


def run_jobs(jobs: list, args) -> list[dict]:
    """All jobs, longest first, on ``--workers`` processes (1: in this process)."""
    jobs = sorted(jobs, key=lambda j: -j[1])
    records = []
    if args.workers <= 1:
        _init_worker(args.run, args.threads)
        for spec, nfe, seed in jobs:
            records.append(_report(run_job(spec, nfe, seed, args.num, args.batch)))
        return records
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(args.run, args.threads)) as ex:
        futures = [ex.submit(run_job, spec, nfe, seed, args.num, args.batch) for spec, nfe, seed in jobs]
        for f in futures:
            records.append(_report(f.result()))
    return records


def _report(rec: dict) -> dict:
    fd = f"FD {rec['fd']:.4f}" if rec["fd"] is not None else f"FAILED ({rec['failure']})"
    print(f"  {rec['library']:>12} {rec['sampler']:<10} NFE {rec['nfe']:>6.0f}  seed {rec['seed']}  {fd}  "
          f"{rec['seconds_per_1000']:.1f} s/1000 (CPU {rec['cpu_seconds_per_1000']:.1f})", flush=True)
    return rec


# ---- checks -------------------------------------------------------------------------------------------------------
def schedule_checks(model) -> dict:
    """Max |alpha-bar_peer(t) - alpha-bar_diffusionlab(t + 1)| (absolute and relative) over t = 0..999 for
    diffusers' ``squaredcos_cap_v2`` (``scheduler.alphas_cumprod``) and denoising-diffusion-pytorch's ``cosine``
    (``GaussianDiffusion.alphas_cumprod`` buffer); also the betas (``scheduler.betas``, ``GaussianDiffusion.betas``)."""
    chain = model.process
    ab, beta = chain.alpha_bar[1:], chain.beta[1:]
    out = {}

    def diff(name, a, b, ref_b):
        dtype = str(a.dtype)
        a = a.double()
        out[name] = {"alpha_bar_max_abs": float((a - ab).abs().max()),
                     "alpha_bar_max_rel": float(((a - ab).abs() / ab).max()),
                     "alpha_bar_max_abs_vs_float32": float((a - ab.float().double()).abs().max()),
                     "beta_max_abs": float((b.double() - beta).abs().max()),
                     "beta_max_abs_vs_float32": float((b.double() - ref_b.float().double()).abs().max()),
                     "alphas_cumprod_dtype": dtype}

    diffusers = peers()["diffusers"]
    if diffusers is not None:
        s = diffusers.DDPMScheduler(**diffusers_cfg({}))
        diff("diffusers", s.alphas_cumprod, s.betas, beta)
    ddp = peers()["ddpm-pytorch"]
    if ddp is not None:
        gd = ddp.GaussianDiffusion(DDPMPytorchUnet(model, 1), image_size=8, timesteps=T_TRAIN,
                                   objective="pred_noise", beta_schedule="cosine")
        diff("ddpm-pytorch", gd.alphas_cumprod, gd.betas, beta)
    return out


def adapter_checks(ds, model, counter, available: set) -> dict:
    """Exactness of the adapters and agreement of equivalent samplers, on 16 samples (cheap).

    - ``eps_exact``: the diffusers and denoising-diffusion-pytorch adapters at 0-based ``t`` return bit-for-bit
      ``model.predict(x, t + 1).eps`` (t = 0, 499, 999);
    - ``ancestral_max_abs``: 1000-step ancestral samples of diffusers' ``DDPMScheduler``, denoising-diffusion-pytorch's
      ``p_sample_loop`` and diffusionlab's ``ddpm(variance="beta_tilde", clip_x0=True)`` from the same seed (same
      ``x_T``, same noise stream), max |difference| in [0, 1] pixel units;
    - ``ddim10_max_abs``: 10-step deterministic DDIM on the same grid (peers' t = 999, 899, ..., 99; diffusionlab's
      ``timesteps=[1000, 900, ..., 100]``), diffusionlab ``ddim(clip_x0=True)`` vs denoising-diffusion-pytorch
      ``ddim_sample`` (both clip x0 and re-derive eps), and diffusionlab ``ddim(clip_x0=False)`` vs diffusers
      ``DDIMScheduler(clip_sample=False, trailing)``;
    - ``dpmpp2m10``: diffusionlab ``dpmpp-2m`` vs diffusers' ``DPMSolverMultistepScheduler`` (order 2,
      ``lambda_min_clipped=-5.1``, 10 steps), diffusionlab given diffusers' grid (its timesteps + 1).
    """
    from diffusionlab.samplers import get_sampler, sample_in_chunks

    torch.manual_seed(0)
    x = torch.randn(16, *ds.sample_shape)
    checks = {"eps_exact": {}}
    with torch.no_grad():
        for t in (0, 499, 999):
            ref = model.predict(x, t + 1).eps
            checks["eps_exact"][f"diffusers t={t}"] = bool(torch.equal(DiffusersEps(model)(x, torch.tensor(t)), ref))
            unet = DDPMPytorchUnet(model, ds.sample_shape[0])
            checks["eps_exact"][f"ddpm-pytorch t={t}"] = bool(torch.equal(unet(x, torch.full((16,), t)), ref))

    def dl(name, ts, **opts):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return ds.to_display(sample_in_chunks(get_sampler(name), model, ds.sample_shape, 16, generator=g,
                                                  grid=ts, kind="uniform", **opts))

    grid10 = list(range(T_TRAIN, 0, -T_TRAIN // 10))
    ddpm_dl = dl("ddpm", None, variance="beta_tilde", clip_x0=True)
    res = {}
    if "diffusers" in available:
        res["ancestral diffusers DDPMScheduler vs diffusionlab ddpm"] = _maxdiff(
            _peer(run_diffusers, "diffusers", {"cls": "DDPMScheduler", "cfg": {}}, ds, model, T_TRAIN), ddpm_dl)
        res["ddim10 diffusers DDIMScheduler(clip_sample=False) vs diffusionlab ddim(clip_x0=False)"] = _maxdiff(
            _peer(run_diffusers, "diffusers", {"cls": "DDIMScheduler",
                                               "cfg": {"timestep_spacing": "trailing", "clip_sample": False}},
                  ds, model, 10), dl("ddim", grid10, clip_x0=False))
        dpm = {"cls": "DPMSolverMultistepScheduler", "cfg": {"solver_order": 2, "lambda_min_clipped": LAMBDA_MIN}}
        sched = peers()["diffusers"].DPMSolverMultistepScheduler(**diffusers_cfg(dpm["cfg"]))
        sched.set_timesteps(10)
        res["dpmpp2m10 diffusers DPMSolverMultistepScheduler(lambda_min_clipped) vs diffusionlab dpmpp-2m"] = _maxdiff(
            _peer(run_diffusers, "diffusers", dpm, ds, model, 10), dl("dpmpp-2m", (sched.timesteps + 1).tolist()))
        checks["diffusers_dpmpp2m10_timesteps"] = sched.timesteps.tolist()
    if "ddpm-pytorch" in available:
        res["ancestral ddpm-pytorch p_sample_loop vs diffusionlab ddpm"] = _maxdiff(
            _peer(run_ddpm_pytorch, "ddpm-pytorch", {}, ds, model, T_TRAIN), ddpm_dl)
        res["ddim10 ddpm-pytorch ddim_sample vs diffusionlab ddim(clip_x0=True)"] = _maxdiff(
            _peer(run_ddpm_pytorch, "ddpm-pytorch", {}, ds, model, 10), dl("ddim", grid10, clip_x0=True))
    checks["samples_max_abs_diff"] = res
    counter.reset()
    return checks


def _peer(runner, library, options, ds, model, nfe):
    return runner(Spec(library, "check", "", options), ds, model, nfe, 0, 16, 16)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---- analysis -----------------------------------------------------------------------------------------------------
def aggregate(records: list[dict]) -> list[dict]:
    """One row per (library, sampler, NFE): mean FD over seeds (and its SE where > 1 seed), NFE, seconds."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["library"], r["sampler"], r["nfe_requested"]), []).append(r)
    rows = []
    for (lib, name, _), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        failures = [r["failure"] for r in rs if r.get("failure")]
        fds = np.array([r["fd"] for r in rs]) if not failures else np.array([])
        rows.append({"library": lib, "sampler": name, "nfe": rs[0]["nfe"], "seeds": [r["seed"] for r in rs],
                     "fd": float(fds.mean()) if len(fds) else None,
                     "fd_std": float(fds.std(ddof=1)) if len(fds) > 1 else None,
                     "fd_se": float(fds.std(ddof=1) / math.sqrt(len(fds))) if len(fds) > 1 else None,
                     "fds": [r["fd"] for r in rs], "reference": rs[0]["reference"],
                     "failure": f"{len(failures)} of {len(rs)} runs: {failures[0]}" if failures else None,
                     "seconds_per_1000": float(np.mean([r["seconds_per_1000"] for r in rs])),
                     "cpu_seconds_per_1000": float(np.mean([r["cpu_seconds_per_1000"] for r in rs])),
                     "class_coverage": float(np.mean([r["class_coverage"] for r in rs])) if not failures else None})
    order = {lib: i for i, lib in enumerate(RUNNERS)}
    return sorted(rows, key=lambda r: (order[r["library"]], r["sampler"], r["nfe"]))


def paired(row: dict, ref: dict) -> dict | None:
    """FD(row) - FD(reference) seed by seed over their common seeds (every run of a seed starts from the same x_T, so
    much of the seed-to-seed variation cancels): ``{"mean", "se" (None for one seed), "seeds"}``."""
    ref_fd = dict(zip(ref["seeds"], ref["fds"]))
    d = [fd - ref_fd[sd] for sd, fd in zip(row["seeds"], row["fds"]) if sd in ref_fd and fd is not None]
    if not d:
        return None
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return {"mean": float(np.mean(d)), "se": se, "seeds": len(d)}


def references(rows: list[dict]) -> dict:
    """Each peer's default: mean FD, SE over seeds, threshold mean + 2 SE, NFE and seconds."""
    out = {}
    for r in rows:
        if r["reference"] and r["fd"] is not None:
            se = r["fd_se"] if r["fd_se"] is not None else 0.0
            out[r["library"]] = {"sampler": r["sampler"], "nfe": r["nfe"], "fd": r["fd"], "se": se,
                                 "std": r["fd_std"], "fds": r["fds"], "threshold": r["fd"] + 2.0 * se,
                                 "seconds_per_1000": r["seconds_per_1000"],
                                 "cpu_seconds_per_1000": r["cpu_seconds_per_1000"], "seeds": r["seeds"]}
    return out


def min_nfe(rows: list[dict], library: str, threshold: float, min_seeds: int = 1) -> dict | None:
    """The best sampler of ``library`` against ``threshold``: the smallest NFE at which the mean FD is <=
    ``threshold`` (its seconds; ties: fewer seconds), among the rows run with at least ``min_seeds`` seeds (the
    reference's: a mean over fewer seeds is not comparable). ``stable``: the smallest NFE from which every larger
    NFE on the grid (with enough seeds) also matches."""
    best = None
    for name in sorted({r["sampler"] for r in rows if r["library"] == library}):
        pts = sorted((r for r in rows if r["library"] == library and r["sampler"] == name
                      and len(r["seeds"]) >= min_seeds), key=lambda r: r["nfe"])
        ok = [r for r in pts if r["fd"] is not None and r["fd"] <= threshold]
        if not ok:
            continue
        first = ok[0]
        stable = None
        for i in range(len(pts)):
            if all(p["fd"] is not None and p["fd"] <= threshold for p in pts[i:]):
                stable = pts[i]["nfe"]
                break
        cand = {"sampler": name, "nfe": first["nfe"], "fd": first["fd"], "seconds_per_1000": first["seconds_per_1000"],
                "cpu_seconds_per_1000": first["cpu_seconds_per_1000"], "stable_nfe": stable}
        if best is None or (cand["nfe"], cand["seconds_per_1000"]) < (best["nfe"], best["seconds_per_1000"]):
            best = cand
    return best


def equal_quality(rows: list[dict], refs: dict) -> dict:
    """For each reference (peer default) and each library: the best sampler's min NFE; and diffusionlab's ratios."""
    out = {}
    libs = [lib for lib in RUNNERS if any(r["library"] == lib for r in rows)]
    for ref_lib, ref in refs.items():
        per = {lib: min_nfe(rows, lib, ref["threshold"], len(ref["seeds"])) for lib in libs}
        dl = per.get("diffusionlab")
        ratios = {}
        if dl is not None:
            ratios["diffusionlab_vs_peer_default"] = dl["nfe"] / ref["nfe"]
            for lib, m in per.items():
                if lib != "diffusionlab" and m is not None:
                    ratios[f"diffusionlab_vs_{lib}_best"] = dl["nfe"] / m["nfe"]
        peers_best = [m["nfe"] for lib, m in per.items() if lib not in OURS and m is not None]
        best_peer = min(peers_best) if peers_best else None
        goals = {}
        for lib, limit in (("diffusionlab", 8), ("diffusionlab-edm", 8), ("diffusionlab-distilled", 4)):
            m = per.get(lib)
            if lib in per:
                goals[lib] = {"nfe": None if m is None else m["nfe"], "goal_nfe": limit, "best_peer_nfe": best_peer,
                              "met": m is not None and m["nfe"] <= limit,
                              "ratio_to_best_peer": None if (m is None or not best_peer) else m["nfe"] / best_peer}
        out[ref_lib] = {"reference": ref, "min_nfe": per, "ratios": ratios,
                        "goal_met": dl is not None and dl["nfe"] <= ref["nfe"] / 5, "few_step_goals": goals}
    return out


# ---- output -------------------------------------------------------------------------------------------------------
def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _paired(p: dict | None) -> str:
    if p is None:
        return "-"
    return f"{p['mean']:+.3f} ± {p['se']:.3f} ({p['seeds']})" if p["se"] is not None else f"{p['mean']:+.3f} (1)"


def _fd(r: dict) -> str:
    if r["fd"] is None:
        return f"failed ({r['failure']})"
    return f"{r['fd']:.4f} ± {r['fd_se']:.4f}" if r["fd_se"] is not None else f"{r['fd']:.4f}"


def markdown(rows: list[dict], eq: dict, meta: dict) -> str:
    """The tables: every configuration; the references; the min NFE per library at each reference's quality."""
    lines = [f"N = {meta['num']} samples per run, batch {meta['batch']}, {meta['threads']} torch thread(s), "
             f"{meta['workers']} worker process(es); network: `{meta['run']}` ({meta['params']:,} parameters). "
             "FD: Frechet distance to the 297 held-out test digits in the shipped classifier's feature space "
             "(lower is better); mean over seeds, ± SE where > 1 seed. Paired difference: FD minus the FD of "
             "diffusers' 1000-step DDPM (the reference) of the same seed (same x_T), mean ± SE over the common seeds "
             "(count).",
             "",
             "| library | sampler | NFE | FD | seeds | FD - reference FD, paired by seed | wall s / 1000 samples "
             "| CPU s / 1000 samples | class coverage |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tag = " (reference)" if r["reference"] else ""
        lines.append(f"| {r['library']} | {r['sampler']}{tag} | {r['nfe']:.0f} | {_fd(r)} | {len(r['seeds'])} | "
                     f"{_paired(r.get('paired_vs_reference', {}).get('diffusers'))} | {r['seconds_per_1000']:.1f} | "
                     f"{r['cpu_seconds_per_1000']:.1f} | {_num(r['class_coverage'])} |")
    lines += ["", "Equal quality: FD (mean over its seeds) <= reference mean + 2 SE; SE = std(ddof=1) of the "
              "reference's per-seed FDs / sqrt(#seeds); only rows run with as many seeds as the reference count.", ""]
    for ref_lib, e in eq.items():
        ref = e["reference"]
        lines += [f"Reference: {ref_lib} {ref['sampler']} ({ref['nfe']:.0f} NFE, {ref['seconds_per_1000']:.1f} wall s"
                  f" / {ref['cpu_seconds_per_1000']:.1f} CPU s per 1000): FD {ref['fd']:.4f} ± {ref['se']:.4f} (seeds "
                  f"{ref['seeds']}: {', '.join(f'{v:.4f}' for v in ref['fds'])}), threshold {ref['threshold']:.4f}", "",
                  "| library | best sampler | min NFE | FD there | wall s / 1000 | CPU s / 1000 "
                  "| NFE from which all larger match |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for lib, m in e["min_nfe"].items():
            if m is None:
                lines.append(f"| {lib} | none on the grid | - | - | - | - | - |")
                continue
            stable = f"{m['stable_nfe']:.0f}" if m["stable_nfe"] is not None else "-"
            lines.append(f"| {lib} | {m['sampler']} | {m['nfe']:.0f} | {m['fd']:.4f} | {m['seconds_per_1000']:.1f} | "
                         f"{m['cpu_seconds_per_1000']:.1f} | {stable} |")
        ratios = ", ".join(f"{k} = {v:.3f}" for k, v in e["ratios"].items())
        lines += ["", f"Ratios: {ratios}; goal (<= 1/5 of the peer default's NFE) met: {e['goal_met']}", ""]
        goals = e.get("few_step_goals", {})
        if goals:
            lines += ["| recipe | fewest NFE at equal quality | goal | best peer's fewest NFE | ratio | met |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for lib, gl in goals.items():
                nfe = "none on the grid" if gl["nfe"] is None else f"{gl['nfe']:.0f}"
                ratio = "-" if gl["ratio_to_best_peer"] is None else f"{gl['ratio_to_best_peer']:.3f}"
                lines.append(f"| {lib} | {nfe} | <= {gl['goal_nfe']} | {gl['best_peer_nfe']} | {ratio} | "
                             f"{'yes' if gl['met'] else 'no'} |")
            lines.append("")
    return "\n".join(lines)


_COLORS = {"ddim": "tab:brown", "dpmpp-2m": "tab:red", "dpmpp-3m": "tab:purple", "unipc": "tab:orange",
           "ddpm": "tab:green", "ancestral": "tab:green", "ddpm-respaced": "tab:green", "ddim-eta1": "tab:olive",
           "heun": "tab:blue", "dpmpp_2m": "tab:red", "dpmpp_3m_sde": "tab:purple", "lms": "tab:cyan",
           "euler": "tab:gray"}
_STYLES = {"diffusionlab": ("-", "o"), "diffusionlab-edm": ("-", "D"), "diffusionlab-distilled": ("-", "*"),
           "k-diffusion": ("-.", "v"), "diffusers": ("--", "s"), "ddpm-pytorch": (":", "^")}


def plot(rows: list[dict], refs: dict, path: str) -> None:
    """FD against NFE (log-log), one line per library/sampler (colour: the method; line and marker: the library;
    grey: the unclipped solvers started at t = T), each reference's mean ± 2 SE as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 6))
    keys = sorted({(r["library"], r["sampler"]) for r in rows}, key=lambda k: (list(RUNNERS).index(k[0]), k[1]))
    for lib, name in keys:
        pts = sorted((r for r in rows if r["library"] == lib and r["sampler"] == name and r["fd"] is not None),
                     key=lambda r: r["nfe"])
        base = name.split("[")[0]
        failing = base in ("dpmpp-2m", "unipc") and "[" not in name and lib in ("diffusionlab", "diffusers")
        ls, mk = _STYLES[lib]
        ax.errorbar([r["nfe"] for r in pts], [r["fd"] for r in pts],
                    yerr=[2 * r["fd_se"] if r["fd_se"] else 0.0 for r in pts], linestyle=ls, marker=mk, ms=4,
                    capsize=2, color="0.6" if failing else _COLORS.get(base, "k"),
                    label=f"{lib}: {name}" + (" (from t = T, unclipped)" if failing else ""))
    for (lib, ref), color in zip(refs.items(), ("tab:gray", "tab:olive")):
        ax.axhspan(ref["fd"] - 2 * ref["se"], ref["fd"] + 2 * ref["se"], color=color, alpha=0.2,
                   label=f"{lib} default ({ref['nfe']:.0f}-step ancestral): FD ± 2 SE")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FD to the test digits (classifier features; lower is better)")
    ax.set_title("Sampling cost at equal quality: one trained digits U-Net driven by each library's samplers",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.01, 0.01, "error bars: ± 2 SE over the seeds; points without bars: one seed (seed 0)", fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=DEFAULT_RUN, help="trained diffusionlab digits run (trained if missing)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config to train with if --run is missing")
    p.add_argument("--edm-run", default=None, help="a run of configs/digits_edm.yaml: the EDM recipe's rows and "
                   "k-diffusion's samplers on it")
    p.add_argument("--distilled-run", default=None, help="a `diffusionlab distill` run: the distilled rows")
    p.add_argument("--recipe-nfe", default="3,4,5,6,8,10,15",
                   help="NFE grid of the default-grid, fitted, EDM-recipe and k-diffusion rows")
    p.add_argument("--num", type=int, default=None, help="samples per run (default 1000; --quick: 500)")
    p.add_argument("--batch", type=int, default=None, help="samples per network call (default: all at once)")
    p.add_argument("--nfe", default=None, help="comma-separated NFE grid of the deterministic few-step samplers")
    p.add_argument("--ancestral-nfe", default=None,
                   help="comma-separated NFE grid of the stochastic samplers on respaced chains (default 5,8,10,15,20,25,50,100,200)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of every non-reference configuration (default: "
                   "--ref-seeds, as the equal-quality rule needs; the failing unclipped runs: 1)")
    p.add_argument("--ref-seeds", type=int, default=3, help="seeds of the peers' 1000-step references")
    p.add_argument("--samplers", default=None, help="comma-separated keys, e.g. diffusers:ddpm,diffusionlab:unipc")
    p.add_argument("--dl-ancestral", action="store_true",
                   help="also run diffusionlab's ddpm at all 1000 steps (equal to the peers' ancestral: see checks)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 5 samplers (one reference), NFE 10 and 25, N = 500, 2 seeds (~8 CPU min)")
    p.add_argument("--checks-only", action="store_true", help="only the schedule and adapter checks")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=1, help="processes running configurations concurrently")
    p.add_argument("--resume", default=None,
                   help="a previous --json: its records are kept and the runs it already has are not repeated")
    p.add_argument("--report-only", action="store_true",
                   help="with --resume: no checks and no runs, only the tables and plot of that JSON")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    return p.parse_args(argv)


QUICK_KEYS = ("diffusionlab:ddim", "diffusionlab:ddpm", "diffusers:ddpm", "diffusers:ddim", "ddpm-pytorch:ddim")


def select_specs(args) -> list[Spec]:
    """The configurations to run: all (or ``--samplers``; ``--quick``: a few), minus unavailable peers."""
    nfes = tuple(int(v) for v in args.nfe.split(",")) if args.nfe else (QUICK_NFE if args.quick else FULL_NFE)
    anc = (tuple(int(v) for v in args.ancestral_nfe.split(",")) if args.ancestral_nfe
           else ((25,) if args.quick else ANCESTRAL_NFE))
    specs = make_specs(nfes, anc) + recipe_specs({"edm": args.edm_run, "distilled": args.distilled_run},
                                                 tuple(int(v) for v in args.recipe_nfe.split(",")))
    keys = args.samplers.split(",") if args.samplers else (QUICK_KEYS if args.quick else None)
    if keys is not None:
        unknown = set(keys) - {s.key for s in specs}
        if unknown:
            raise SystemExit(f"unknown sampler keys {sorted(unknown)}; known: {', '.join(s.key for s in specs)}")
        specs = [s for s in specs if s.key in keys]
    if args.dl_ancestral:
        specs = [Spec(s.library, s.name, s.what, s.options, s.nfes + (T_TRAIN,)) if s.key == "diffusionlab:ddpm" else s
                 for s in specs]
    if args.quick and args.nfe is None:  # ddpm-pytorch's extra ddim point (100) is dropped too
        specs = [Spec(s.library, s.name, s.what, s.options, tuple(v for v in s.nfes if v in nfes or s.reference),
                      s.reference, s.seeds, s.run) for s in specs]
    missing = {lib for lib, mod in peers().items() if mod is None}
    for lib in sorted(missing):
        print(f"skipping {lib}: not importable (reason above)", file=sys.stderr)
    return [s for s in specs if s.library not in missing]


def job_key(library: str, sampler: str, nfe: int, seed: int, num: int, batch: int) -> tuple:
    return (library, sampler, int(nfe), int(seed), int(num), int(batch))


def make_jobs(specs: list[Spec], args, done: set = frozenset()) -> list:
    """``(spec, nfe, seed)`` for every configuration and seed, less those in ``done`` (keys of :func:`job_key`)."""
    jobs = []
    for s in specs:
        seeds = args.ref_seeds if s.reference else (args.seeds if s.seeds is None else min(s.seeds, args.seeds))
        jobs += [(s, nfe, seed) for nfe in s.nfes for seed in range(seeds)
                 if job_key(s.library, s.name, nfe, seed, args.num, args.batch) not in done]
    return jobs


def previous_records(path: str | None) -> list[dict]:
    """The records of an earlier ``--json`` (``--resume``), or []."""
    if not path:
        return []
    return json.loads(Path(path).read_text())["records"]


def measure(args) -> tuple[dict, dict, dict, list[dict]]:
    """Checks, then every configuration not already in ``--resume``: ``(meta, schedule checks, adapter checks,
    records)`` (``--checks-only``: records None)."""
    ensure_run(Path(args.run), args.config)
    t_start = time.perf_counter()
    specs = select_specs(args)
    ds, model, counter = load_counted(args.run)
    available = {s.library for s in specs} | {"diffusionlab"}
    meta = {"run": args.run, "params": sum(p.numel() for p in model.parameters()), "num": args.num,
            "batch": args.batch, "threads": args.threads, "workers": args.workers, "seeds": args.seeds,
            "ref_seeds": args.ref_seeds, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
    for lib, mod in peers().items():
        if lib in available and mod is not None:
            meta[f"{lib}_version"] = _version(lib, mod)
    print("schedule checks (alpha-bar of each peer vs diffusionlab's chain):", flush=True)
    sched = schedule_checks(model)
    print(json.dumps(sched, indent=1), flush=True)
    print("adapter checks (16 samples):", flush=True)
    checks = adapter_checks(ds, model, counter, available)
    print(json.dumps(checks, indent=1), flush=True)
    if args.checks_only:
        return meta, sched, checks, None
    old = previous_records(args.resume)
    done = {job_key(r["library"], r["sampler"], r["nfe_requested"], r["seed"], r["num"], r["batch"]) for r in old}
    jobs = make_jobs(specs, args, done)
    print(f"{len(jobs)} runs, {sum(j[1] for j in jobs)} NFE of batch {args.batch}"
          + (f" ({len(old)} earlier runs kept from {args.resume})" if old else "") + ":", flush=True)
    records = old + run_jobs(jobs, args)
    meta["wall_seconds"] = time.perf_counter() - t_start
    if args.resume:
        earlier = json.loads(Path(args.resume).read_text())["meta"]
        meta["earlier_runs"] = earlier.get("earlier_runs", []) + [{k: earlier.get(k) for k in ("argv", "wall_seconds")}]
    return meta, sched, checks, records


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick and args.ref_seeds == 3:
        args.ref_seeds = 2
    args.seeds = args.seeds or args.ref_seeds
    args.num = args.num or (500 if args.quick else 1000)
    args.batch = args.batch or args.num
    torch.set_num_threads(args.threads)
    if args.report_only:
        if not args.resume:
            raise SystemExit("--report-only needs --resume PATH (the JSON to report)")
        saved = json.loads(Path(args.resume).read_text())
        meta, sched, checks = saved["meta"], saved["schedule_checks"], saved["adapter_checks"]
        records = saved["records"]
    else:
        meta, sched, checks, records = measure(args)
        if records is None:
            return 0
    rows = aggregate(records)
    refs = references(rows)
    for r in rows:
        r["paired_vs_reference"] = {lib: paired(r, ref) for lib, ref in refs.items()}
    eq = equal_quality(rows, refs)
    _same_start(records, meta)
    md = markdown(rows, eq, meta)
    print(md)
    earlier = ", ".join(f"{e['wall_seconds']:.0f} s" for e in meta.get("earlier_runs", []) if e.get("wall_seconds"))
    print(f"wall time {meta['wall_seconds']:.0f} s"
          + (f" (earlier runs kept via --resume: {earlier})" if earlier else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "schedule_checks": sched, "adapter_checks": checks,
                                               "records": records, "rows": rows, "equal_quality": eq}, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md + "\n")
    if args.plot:
        plot(rows, refs, args.plot)
    return 0


def _version(lib: str, mod) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("denoising_diffusion_pytorch" if lib == "ddpm-pytorch" else lib)
    except PackageNotFoundError:
        return getattr(mod, "__version__", "?")


def _same_start(records: list[dict], meta: dict) -> None:
    """Whether all runs of each seed saw the same ``x_T`` (checksum of the network's first input; the few-step
    solvers feed ``(x / s) * s``, equal up to float rounding, hence the relative tolerance 1e-6)."""
    by_seed: dict = {}
    for r in records:
        by_seed.setdefault(r["seed"], []).append(r["x_T_checksum"])
    meta["same_x_T_per_seed"] = {str(k): (max(v) - min(v)) <= 1e-6 * max(1.0, abs(v[0])) for k, v in by_seed.items()}
    print(f"same x_T for every run of a seed: {meta['same_x_T_per_seed']}")


if __name__ == "__main__":
    sys.exit(main())
