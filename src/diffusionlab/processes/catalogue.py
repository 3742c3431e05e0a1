"""The process catalogue: config names to constructors, with the one set of defaults training and the oracles share.

A ``process:`` section is ``{"name": N, "noise": SPEC, "noise_axis": AXIS, **options}``: the options are those of
constructor ``N`` below (their defaults are the defaults), ``noise`` / ``noise_axis`` choose the covariance C
(:func:`noise_options`, :data:`~diffusionlab.noise.COVARIANCES`) over an axis of the samples.

=============  ======================================================================================================
``vp``         DDPM's chain (Ho et al. 2020): ``T`` steps, linear betas ``beta_start .. beta_end`` or the cosine
               schedule (Nichol & Dhariwal 2021, eq. 17, offset ``cosine_s``); ``zero_terminal_snr`` rescales
               either to ``alpha-bar_T = 0`` (Lin et al. 2024, Algorithm 1); ``snr_shift`` divides every step's SNR
               by ``snr_shift^2`` (Hoogeboom et al. 2023)
``ve``         NCSN's chain (Song & Ermon 2019): ``L`` geometric levels ``sigma_min .. sigma_max`` (defaults: NCSNv2's
               CIFAR-10 levels, Song & Ermon 2020, technique 1-2: choose ``sigma_max`` near the largest distance
               between training points)
``vp-sde``     the VP-SDE, ``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. 2021)
``subvp-sde``  the sub-VP SDE, same ``beta(t)``
``ve-sde``     the VE-SDE, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``
=============  ======================================================================================================
"""

from __future__ import annotations

from diffusionlab.checks import brief, positive_int
from diffusionlab.configuration import Catalogue
from diffusionlab.errors import DiffusionLabError
from diffusionlab.processes.discrete import VEChain, VPChain
from diffusionlab.processes.sde import SubVPSDE, VESDE, VPSDE
from diffusionlab.schedules import cosine_betas, geometric_sigmas, linear_betas, rescale_zero_terminal_snr, shift_snr

PROCESSES = Catalogue("process", "process")
#: an upper bound on the number of chain steps (the schedule arrays are built in memory; DDPM uses 1000)
MAX_STEPS = 100_000
SCHEDULES = ("linear", "cosine")


@PROCESSES.register("vp", context=("cov",))
def vp(T: int = 1000, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
       cosine_s: float = 0.008, snr_shift: float = 1.0, zero_terminal_snr: bool = False, cov=None) -> VPChain:
    """DDPM's variance-preserving chain.

    Args:
        T: number of steps (1 .. 100000)
        schedule: linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021)
        beta_start: first beta of the linear schedule
        beta_end: last beta of the linear schedule
        cosine_s: offset s of the cosine schedule
        snr_shift: divide the SNR of every step by snr_shift^2 (> 0; 1: the schedule as it is; > 1 noises more, the
            shifted schedule of Hoogeboom et al. 2023 for large images; < 1 noises less); applied after
            zero_terminal_snr, so x_T stays pure noise
        zero_terminal_snr: rescale the betas so that x_T is pure noise (Lin et al. 2024, Algorithm 1; needs v- or
            x0-prediction)
    """
    T = positive_int("process.T", T)
    if T > MAX_STEPS:
        raise DiffusionLabError(f"process.T must be at most {MAX_STEPS}, got {T}")
    if schedule == "linear":
        betas = linear_betas(T, beta_start, beta_end)
    elif schedule == "cosine":
        betas = cosine_betas(T, cosine_s)
    else:
        raise DiffusionLabError(f"unknown process.schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return VPChain(shift_snr(betas, snr_shift), cov=cov)  # after the rescale: every step's SNR / snr_shift^2


@PROCESSES.register("ve", context=("cov",))
def ve(L: int = 232, sigma_min: float = 0.01, sigma_max: float = 50.0, cov=None) -> VEChain:
    """NCSN's variance-exploding chain of geometric noise levels.

    Args:
        L: number of levels (1 .. 100000)
        sigma_min: the smallest level
        sigma_max: the largest level (near the largest distance between training points)
    """
    L = positive_int("process.L", L)
    if L > MAX_STEPS:
        raise DiffusionLabError(f"process.L must be at most {MAX_STEPS}, got {L}")
    return VEChain(geometric_sigmas(L, sigma_min, sigma_max), cov=cov)


@PROCESSES.register("vp-sde", context=("cov",))
def vp_sde(beta_min: float = 0.1, beta_max: float = 20.0, cov=None) -> VPSDE:
    """The VP-SDE.

    Args:
        beta_min: beta(0)
        beta_max: beta(1)
    """
    return VPSDE(beta_min, beta_max, cov=cov)


@PROCESSES.register("subvp-sde", context=("cov",))
def subvp_sde(beta_min: float = 0.1, beta_max: float = 20.0, cov=None) -> SubVPSDE:
    """The sub-VP SDE.

    Args:
        beta_min: beta(0)
        beta_max: beta(1)
    """
    return SubVPSDE(beta_min, beta_max, cov=cov)


@PROCESSES.register("ve-sde", context=("cov",))
def ve_sde(sigma_min: float = 0.01, sigma_max: float = 50.0, cov=None) -> VESDE:
    """The VE-SDE.

    Args:
        sigma_min: sigma(0)
        sigma_max: sigma(1)
    """
    return VESDE(sigma_min, sigma_max, cov=cov)


def noise_options(noise: str = "iid", noise_axis: int | None = None) -> dict:
    """The covariance keys of a ``process:`` section.

    Args:
        noise: the covariance C: iid, mixed:ALPHA, progressive:ALPHA, toeplitz:a,b,..., file:PATH, fitted[:...]
        noise_axis: the sample axis C acts on (counting the batch axis as 0; default: 2, the frames, for videos
            (B, C, F, H, W), else 1)
    """
    return {"noise": noise, "noise_axis": noise_axis}


NOISE_KEYS = ("noise", "noise_axis")


def _split(section: dict) -> tuple[dict, dict]:
    if not isinstance(section, dict):
        raise DiffusionLabError(f"the process section must be a mapping with a 'name', got {brief(section)}")
    return ({k: v for k, v in section.items() if k not in NOISE_KEYS},
            {k: v for k, v in section.items() if k in NOISE_KEYS})


def resolve_process(section: dict) -> dict:
    """The full ``process:`` section: the constructor's options and the noise keys, defaults filled in."""
    from diffusionlab.configuration import Entry
    from diffusionlab.noise.covariance import parse_covariance_spec

    proc, noise = _split(section)
    out = PROCESSES.resolve(proc)
    noise = Entry("noise", noise_options, "process", ()).resolve(noise, "process")
    if noise["noise"] is not None:
        parse_covariance_spec(noise["noise"])  # a bad spec fails before anything runs
    axis = noise["noise_axis"]
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or axis < 1):
        raise DiffusionLabError(f"process.noise_axis must be an integer >= 1 (0 is the batch axis), got {brief(axis)}")
    return {**out, **noise}


def noise_covariance(section: dict, sample_shape: tuple):
    """The covariance C of a ``process:`` section over ``process.noise_axis`` of samples shaped ``sample_shape``
    (default: the frame axis 2 of videos ``(B, C, F, H, W)``, the first feature axis otherwise)."""
    from diffusionlab.noise import make_covariance

    spec, axis = section.get("noise", "iid"), section.get("noise_axis")
    if axis is None:
        axis = 2 if len(sample_shape) == 4 else 1
    if not (1 <= axis <= len(sample_shape)):
        raise DiffusionLabError(f"process.noise_axis = {axis} is not an axis of samples shaped {tuple(sample_shape)}")
    return make_covariance(spec, sample_shape[axis - 1], axis)


def build_process(section: dict, sample_shape: tuple, cov=None):
    """The process of a ``process:`` section for samples of ``sample_shape``, with its covariance (``cov`` if
    given: a covariance built already, e.g. fitted to the data, checked against the samples' shape)."""
    proc, _ = _split(section)
    if cov is None:
        cov = noise_covariance(section, sample_shape)
    return PROCESSES.build(proc, cov=cov)


def make_process(name: str, cov=None, **options):
    """The process called ``name`` with its default options (overridden by ``options``) and covariance ``cov``."""
    return PROCESSES.build({"name": name, **options}, cov=cov)
