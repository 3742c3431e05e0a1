"""Peer samplers driven by the exact mixture oracle through their own interfaces (benchmark only).

- **diffusers** (``pip install -c constraints.txt diffusers``): its schedulers on their own discrete VP chain
  (T = 1000, linear betas 1e-4 .. 0.02, ``timestep_spacing="trailing"``, epsilon prediction, no ``clip_sample``:
  DDIM's and DDPM's default clips ``x_0`` to ``[-1, 1]``, meant for images, which would wreck these mixtures). The oracle is
  wrapped as the epsilon model: at each call it answers ``E[eps | x]`` exactly at the noise level the scheduler's
  update assumes (``alphas_cumprod[t]`` for DDIM/DDPM, ``scheduler.sigmas[step_index]`` for the sigma-keeping
  schedulers, in ``float64`` from diffusers' own ``float32`` arrays), so the only error left is the scheduler's.
- **k-diffusion** (``pip install --no-deps k-diffusion torchsde``): its sampling functions with the oracle as the
  denoiser ``D(x, sigma)`` in VE/EDM form (``oracle.edm_denoiser``), on k-diffusion's own Karras and exponential
  (log-SNR) grids between the VP-SDE's ``sig(1)`` and ``sig(eps)`` (``sig = sigma / s``) -- ending there, as this
  library's solvers do (``[karras]``, ``[exp]``) -- and, as usually run, with the final step to ``sigma = 0``
  (``[karras+0]``).

``k_diffusion/__init__.py`` imports torchvision, scikit-image, clean-fid, wandb and more (a full ``pip install
k-diffusion`` would also downgrade NumPy 2 to 1.26 here); only ``k_diffusion/sampling.py`` is needed, and it needs
only ``utils.append_dims``, torchdiffeq, torchsde, scipy and tqdm. :func:`k_sampling` loads that one file from the
installed package with a stand-in ``k_diffusion.utils`` holding ``append_dims`` (when the real package imports, it
is used as is).

Every run starts from the same shared draws as this library's (``y_0 = x_0 + sig_start eps``, rescaled to the
peer's variable) and returns the record format of :func:`diffusionlab.oracles.bench.run_diffusionlab`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
import types

import torch

from diffusionlab.oracles.bench import Problem

_F64 = torch.float64
T_TRAIN = 1000


# ---- k-diffusion -----------------------------------------------------------------------------------------------
def k_sampling():
    """``k_diffusion.sampling``, or None with the reason printed if it cannot be loaded."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except Exception:  # the package's __init__ pulls torchvision etc.; load sampling.py alone
        pass
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        print("peers: k-diffusion is not installed (pip install --no-deps k-diffusion torchsde)", file=sys.stderr)
        return None
    pkg_dir = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [pkg_dir]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):  # the one helper sampling.py uses from k_diffusion.utils
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{pkg_dir}/sampling.py")
        mod = importlib.util.module_from_spec(sspec)
        sys.modules["k_diffusion.sampling"] = mod
        sspec.loader.exec_module(mod)
        return mod
    except Exception as e:  # noqa: BLE001 - report exactly why the peer cannot run
        print(f"peers: k_diffusion.sampling does not load: {type(e).__name__}: {e}", file=sys.stderr)
        return None


# name -> (function name, options, evaluations per step, whether a step to sigma = 0 costs one less)
K_SAMPLERS = {
    "euler": ("sample_euler", {}, 1),
    "heun": ("sample_heun", {}, 2),
    "dpm_2": ("sample_dpm_2", {}, 2),
    "lms": ("sample_lms", {}, 1),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, 1),
    "dpmpp_3m(eta=0)": ("sample_dpmpp_3m_sde", {"eta": 0.0}, 1),
}


def _k_steps(per_step: int, budget: int, to_zero: bool) -> int:
    if per_step == 1:
        return budget
    return (budget + 1) // 2 if to_zero else budget // 2


EDM_SIGMA_MAX = 80.0  # Karras et al. 2022's sigma_max: k-diffusion's Karras grid as EDM runs it


def k_diffusion_runs(problem: Problem, budget: int, sig_max: float, sig_min: float, samplers=None,
                     grids=("karras", "exp", "karras+0", "karras80", "karras80+0")) -> list[dict]:
    """k-diffusion's deterministic samplers at ``budget`` evaluations per path (module docstring), plus
    ``sample_dpm_fast`` (DPM-Solver with exactly ``budget`` evaluations, ``eta = 0``). ``karras80``: the Karras grid
    from EDM's ``sigma_max = 80`` (where the process reaches higher), as EDM samples."""
    ks = k_sampling()
    if ks is None:
        return []
    oracle = problem.oracle
    records = []

    def denoiser(x, sigma):
        return oracle.edm_denoiser(x, sigma)

    for name, (fn_name, opts, per_step) in K_SAMPLERS.items():
        if samplers is not None and name not in samplers:
            continue
        for grid in grids:
            to_zero = grid.endswith("+0")
            steps = _k_steps(per_step, budget, to_zero)
            if steps < 1:
                continue
            n = steps + 1 if not to_zero else steps  # points before k-diffusion's appended zero
            if grid.startswith("karras80"):
                sig = ks.get_sigmas_karras(n, sig_min, min(sig_max, EDM_SIGMA_MAX), rho=7.0)
            elif grid.startswith("karras"):
                sig = ks.get_sigmas_karras(n, sig_min, sig_max, rho=7.0)
            else:
                sig = ks.get_sigmas_exponential(n, sig_min, sig_max)
            sig = sig.to(_F64)
            if not to_zero:
                sig = sig[:-1]
            records.append(_k_run(problem, ks, getattr(ks, fn_name), name, grid, budget, sig, opts))
    if samplers is None or "dpm_fast" in samplers:
        records.append(_k_fast(problem, ks, budget, sig_min, sig_max))
    return records


def _k_record(problem, name, grid, budget, sig_start, sig_end, y, seconds):
    rec = {"family": "k-diffusion", "sampler": name, "grid": grid, "budget": budget, "nfe": problem.oracle.nfe,
           "steps": None, "sig_start": sig_start, "sig_end": sig_end, "deterministic": True, "seconds": seconds}
    rec.update(problem.score(y, sig_start, sig_end, True))
    return rec


def _k_run(problem, ks, fn, name, grid, budget, sig, opts):
    oracle = problem.oracle
    y0 = problem.start(float(sig[0]))
    oracle.nfe = 0
    t0 = time.perf_counter()
    y = fn(lambda x, s: oracle.edm_denoiser(x, s), y0.clone(), sig, disable=True, **opts)
    return _k_record(problem, name, grid, budget, float(sig[0]), float(sig[-1]), y, time.perf_counter() - t0)


def _k_fast(problem, ks, budget, sig_min, sig_max):
    oracle = problem.oracle
    y0 = problem.start(sig_max)
    oracle.nfe = 0
    t0 = time.perf_counter()
    y = ks.sample_dpm_fast(lambda x, s: oracle.edm_denoiser(x, s), y0.clone(), sig_min, sig_max, budget,
                           disable=True, eta=0.0)
    return _k_record(problem, "dpm_fast", "logsnr", budget, sig_max, sig_min, y, time.perf_counter() - t0)


# ---- diffusers -------------------------------------------------------------------------------------------------
def _diffusers_configs():
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           HeunDiscreteScheduler, UniPCMultistepScheduler)

    return {
        "ddim": (DDIMScheduler, {"clip_sample": False}),  # its default clips x0 to [-1, 1] (images); not here
        "dpmpp-2m": (DPMSolverMultistepScheduler, {"solver_order": 2}),
        "dpmpp-2m[karras]": (DPMSolverMultistepScheduler, {"solver_order": 2, "use_karras_sigmas": True}),
        "dpmpp-2m[sigma_min]": (DPMSolverMultistepScheduler, {"solver_order": 2, "final_sigmas_type": "sigma_min"}),
        "dpmpp-3m": (DPMSolverMultistepScheduler, {"solver_order": 3}),
        "unipc": (UniPCMultistepScheduler, {}),
        "unipc-3": (UniPCMultistepScheduler, {"solver_order": 3}),
        "unipc[karras]": (UniPCMultistepScheduler, {"use_karras_sigmas": True}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler[karras]": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
        "heun": (HeunDiscreteScheduler, {}),
        "ddpm": (DDPMScheduler, {"clip_sample": False}),
    }


SIGMA_SCALED = ("EulerDiscreteScheduler", "HeunDiscreteScheduler")  # their sample is x / s (EDM/VE form)
ALPHA_KEYED = ("DDIMScheduler", "DDPMScheduler")  # no sigmas: the model's level is alphas_cumprod[t]


def diffusers_runs(problem: Problem, budget: int, names=None, seed: int = 0) -> list[dict]:
    """diffusers' schedulers at ``budget`` evaluations per path (module docstring); [] if diffusers is missing."""
    try:
        configs = _diffusers_configs()
    except Exception as e:  # noqa: BLE001
        print(f"peers: diffusers does not import: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    records = []
    for name, (cls, extra) in configs.items():
        if names is not None and name not in names:
            continue
        steps = (budget + 1) // 2 if cls.__name__ == "HeunDiscreteScheduler" else budget
        records.append(_diffusers_run(problem, name, cls, extra, budget, steps, seed))
    return records


def _diffusers_run(problem, name, cls, extra, budget, steps, seed):
    oracle = problem.oracle
    kind = cls.__name__
    cfg = dict(num_train_timesteps=T_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               prediction_type="epsilon", timestep_spacing="trailing")
    cfg.update(extra)
    sched = cls(**cfg)
    sched.set_timesteps(steps)
    ab = sched.alphas_cumprod.to(_F64)

    def level(i, t):
        """``(s, sigma)`` of the model input at call ``i`` (timestep ``t``)."""
        if kind in ALPHA_KEYED:
            a = float(ab[int(t)])
            return math.sqrt(a), math.sqrt(1.0 - a)
        idx = sched.step_index if sched.step_index is not None else i
        sg = float(sched.sigmas[idx])
        return 1.0 / math.sqrt(1.0 + sg * sg), sg / math.sqrt(1.0 + sg * sg)

    t_first = sched.timesteps[0]
    s0, sigma0 = level(0, t_first) if kind in ALPHA_KEYED else (None, None)
    if kind not in ALPHA_KEYED:
        sg = float(sched.sigmas[0])
        s0, sigma0 = 1.0 / math.sqrt(1.0 + sg * sg), sg / math.sqrt(1.0 + sg * sg)
    sig_start = sigma0 / s0
    y0 = problem.start(sig_start)
    sample = y0.clone() if kind in SIGMA_SCALED else s0 * y0
    g = torch.Generator().manual_seed(seed)
    oracle.nfe = 0
    t0 = time.perf_counter()
    for i, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(sample, t)
        s, sigma = level(i, t)
        eps, _ = oracle.posterior_at(model_input.to(_F64), s, sigma)
        kwargs = {"generator": g} if kind == "DDPMScheduler" else {}
        sample = sched.step(eps.to(model_input.dtype), t, sample, **kwargs).prev_sample.to(_F64)
    seconds = time.perf_counter() - t0
    # where the scheduler ends: sigma-keeping schedulers at sigmas[-1]; DDIM/DDPM at the data (alpha-bar = 1)
    if kind in ALPHA_KEYED:
        prev = int(sched.timesteps[-1]) - T_TRAIN // steps
        a_end = float(ab[prev]) if prev >= 0 else float(getattr(sched, "final_alpha_cumprod", torch.tensor(1.0)))
        s_end, sig_end = math.sqrt(a_end), math.sqrt((1.0 - a_end) / a_end)
    else:
        sig_end = float(sched.sigmas[-1])
        s_end = 1.0 / math.sqrt(1.0 + sig_end * sig_end)
    y = sample if kind in SIGMA_SCALED else sample / s_end
    det = kind != "DDPMScheduler"
    rec = {"family": "diffusers", "sampler": name, "grid": "trailing", "budget": budget, "nfe": oracle.nfe,
           "steps": steps, "sig_start": sig_start, "sig_end": sig_end, "deterministic": det, "seconds": seconds}
    rec.update(problem.score(y, sig_start, sig_end, det))
    return rec


def peer_runs(problem: Problem, budget: int, sig_max: float, sig_min: float, use_diffusers: bool = True,
              use_k: bool = True) -> list[dict]:
    """All peers at one budget."""
    recs = []
    if use_diffusers:
        recs += diffusers_runs(problem, budget)
    if use_k:
        recs += k_diffusion_runs(problem, budget, sig_max, sig_min)
    return recs
