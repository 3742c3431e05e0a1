"""Hugging Face diffusers models as diffusionlab models, and diffusionlab U-Nets as diffusers folders.

Import (:func:`load_diffusers`)
    A ``UNet2DModel`` folder written by ``save_pretrained`` (``config.json`` + safetensors weights), or a
    ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``), becomes a
    :class:`~diffusionlab.parametrization.DiffusionModel`, so every diffusionlab sampler, likelihood and metric
    drives it:

    - *the network*: diffusers calls ``unet(x_t, tau).sample`` with the 0-based timestep ``tau = 0..T-1`` at
      which ``x_t ~ q(x_t | x_0)`` has ``alphas_cumprod[tau]``; diffusionlab's chain step ``t = 1..T`` has that
      ``alpha-bar`` at ``t = tau + 1`` and the network sees ``c_noise = 1000 t / T``. :class:`DiffusersUNet` maps
      ``c_noise`` back: ``tau = round(c_noise T / 1000) - 1`` as an int64 tensor (what diffusers' schedulers pass),
      so the UNet runs exactly the operations a diffusers pipeline runs (its output bit for bit); with a
      continuous-time process ``tau = c_noise T / 1000 - 1`` is fractional (the UNet's sinusoidal embedding takes
      any real timestep);
    - *the process*, from the scheduler config: ``linear`` betas (Ho et al. 2020), ``scaled_linear`` (Rombach et
      al. 2022), ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, eq. 17, capped at 0.999) or ``trained_betas``
      give a :class:`~diffusionlab.processes.VPChain` through :mod:`diffusionlab.schedules` (float64; diffusers
      keeps float32 ``alphas_cumprod``). For continuous-time samplers and the ODE likelihood, linear betas give
      the VP-SDE (Song et al. 2021, eq. 32) with ``beta_min = T beta_start``, ``beta_max = T beta_end``, whose
      :meth:`~diffusionlab.processes.VPSDE.discretize` with ``N = T`` is that same chain (step ``t`` at time
      ``t / T``). What does not map is refused by name: other ``beta_schedule`` values, ``rescale_betas_zero_snr``
      (``alpha-bar_T = 0``), a ``learned`` variance, ``fourier`` time embeddings, class conditioning;
    - *the prediction*: ``epsilon`` -> ``eps``, ``sample`` -> ``x0``, ``v_prediction`` -> ``v`` (Salimans & Ho
      2022: ``v = sqrt(abar) eps - sqrt(1 - abar) x0``, diffusionlab's ``v`` for VP), ``variance_type:
      learned_range`` -> a learned variance (Nichol & Dhariwal 2021, eq. 15). The network gets ``x_t`` unscaled
      (``scale_input=False``), as in diffusers.

Export (:func:`export_unet_run`)
    A diffusionlab run with the 2-D U-Net (:class:`diffusionlab.models.unet.UNet`) on a VP chain becomes a
    ``DDPMPipeline`` folder (``unet/`` with a ``UNet2DModel`` and its safetensors weights, ``scheduler/`` with a
    ``DDPMScheduler`` config). Both U-Nets follow DDPM's layout, so the weights are renamed one to one (the
    attention's 1x1 conv ``qkv`` split into the ``to_q``/``to_k``/``to_v`` linear maps); the one real change is
    the time step: diffusers embeds ``tau`` where diffusionlab embeds ``c_noise = tau + 1`` (``T = 1000``), and
    ``[cos((tau+1) f), sin((tau+1) f)]`` is a rotation of ``[cos(tau f), sin(tau f)]`` by the angle ``f`` per
    frequency, so the rotation is folded into the first linear layer of the time MLP (float64, then rounded).
    The export loads the folder back with diffusers and compares the outputs with the run's network
    (:func:`check_export`). Options without a diffusers counterpart are refused, all named at once
    (:func:`export_blockers`).

Weights are only read from safetensors (``use_safetensors=True``, ``local_files_only=True``): nothing is
unpickled and nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusionlab.errors import DiffusionLabError

_F64 = torch.float64
PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
#: a diffusionlab parametrization as a diffusers prediction type and the sign its output takes there (the score
#: parametrization outputs -eps: exported as epsilon with the mean output negated)
PREDICTION_TO_DIFFUSERS = {"eps": ("epsilon", 1.0), "x0": ("sample", 1.0), "v": ("v_prediction", 1.0),
                           "score": ("epsilon", -1.0)}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FIXED_VARIANCES = {"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta",
                   "fixed_large_log": "beta"}
#: DDPMScheduler's defaults (used, and said so, when a UNet folder comes without a scheduler)
DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                 "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True}
EXPORT_T = 1000


def import_diffusers():
    """The ``diffusers`` module (extra ``diffusers``), or a :class:`DiffusionLabError` saying how to install it."""
    import safetensors.torch  # noqa: F401 - older diffusers use safetensors.torch without importing it

    from diffusionlab.interop.optional import import_optional

    return import_optional("diffusers", "diffusers", "the diffusers interop")


# ---- timesteps ---------------------------------------------------------------------------------------------------
def c_noise_to_timestep(c_noise: torch.Tensor, T: int, discrete: bool) -> torch.Tensor:
    """diffusers' 0-based timestep for diffusionlab's ``c_noise = 1000 t / T`` (module docstring): int64
    ``round(c_noise T / 1000) - 1`` for a chain, the float ``c_noise T / 1000 - 1`` for a continuous process."""
    tau = c_noise.to(_F64) * (T / 1000.0) - 1.0
    return tau.round().long() if discrete else tau.to(torch.float32)


def diffusionlab_step(tau) -> torch.Tensor:
    """diffusionlab's chain step ``t = tau + 1`` for diffusers' 0-based timestep(s) ``tau``."""
    return torch.as_tensor(tau).long() + 1


def diffusionlab_eps(model, x: torch.Tensor, tau) -> torch.Tensor:
    """A diffusionlab model's ``eps`` at diffusers' 0-based timestep ``tau`` (a scalar or ``(B,)``):
    ``model.predict(x, tau + 1).eps``."""
    t = diffusionlab_step(tau)
    return model.predict(x, t.expand(x.shape[0]) if t.ndim == 0 else t).eps


class DiffusersEps:
    """The other direction: a diffusionlab model in the role of diffusers' ``unet(sample, timestep).sample``
    (eps-prediction, 0-based ``timestep``), for driving diffusers' schedulers with a diffusionlab network."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x: torch.Tensor, tau) -> torch.Tensor:
        return diffusionlab_eps(self.model, x, tau)


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as a diffusionlab raw network ``net(x, c_noise) -> unet(x, tau).sample``
    (:func:`c_noise_to_timestep`)."""

    def __init__(self, unet: nn.Module, T: int, discrete: bool = True):
        super().__init__()
        self.unet = unet
        self.T = int(T)
        self.discrete = bool(discrete)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(c_noise, device=x.device)
        tau = c_noise_to_timestep(c.expand(x.shape[0]) if c.ndim == 0 else c, self.T, self.discrete)
        return self.unet(x, tau).sample


# ---- folders -----------------------------------------------------------------------------------------------------
@dataclass
class DiffusersFolder:
    """Where a diffusers model's parts are: the UNet folder, the scheduler config (None: DDPM defaults)."""

    root: Path
    unet_dir: Path
    scheduler: dict | None
    scheduler_source: str


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiffusionLabError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(obj, dict):
        raise DiffusionLabError(f"{what} {path} is not a JSON object")
    return obj


def find_parts(path: str | Path) -> DiffusersFolder:
    """The UNet and scheduler of a ``save_pretrained`` UNet folder or a pipeline folder (``unet/``,
    ``scheduler/``); anything else is refused naming what is missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DiffusionLabError(f"diffusers folder not found: {root}")
    if (root / "unet" / "config.json").is_file():
        unet_dir = root / "unet"
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            return DiffusersFolder(root, unet_dir, _read_json(sched, "scheduler config"), str(sched))
        return DiffusersFolder(root, unet_dir, None, "DDPMScheduler defaults (the folder has no scheduler/)")
    if (root / "config.json").is_file():
        sched = root / "scheduler_config.json"
        if sched.is_file():
            return DiffusersFolder(root, root, _read_json(sched, "scheduler config"), str(sched))
        return DiffusersFolder(root, root, None, "DDPMScheduler defaults (the folder has no scheduler_config.json)")
    raise DiffusionLabError(
        f"{root} is not a diffusers model folder: expected config.json (a UNet2DModel saved with save_pretrained) "
        "or unet/config.json (a DDPMPipeline folder)")


def _check_unet_config(cfg: dict, where: Path) -> None:
    name = cfg.get("_class_name", "UNet2DModel")
    bad = []
    if name != "UNet2DModel":
        bad.append(f"_class_name {name!r} (only UNet2DModel maps)")
    if cfg.get("time_embedding_type", "positional") != "positional":
        bad.append(f"time_embedding_type {cfg.get('time_embedding_type')!r} (only 'positional' timesteps map to a chain)")
    for key in ("class_embed_type", "num_class_embeds"):
        if cfg.get(key) is not None:
            bad.append(f"{key} {cfg.get(key)!r} (class-conditional models are not supported)")
    if bad:
        raise DiffusionLabError(f"{where}: cannot use this diffusers model: {'; '.join(bad)}")


def load_unet(unet_dir: Path, device="cpu"):
    """``UNet2DModel.from_pretrained`` from a local folder, safetensors only, no network access."""
    cfg = _read_json(unet_dir / "config.json", "UNet config")
    _check_unet_config(cfg, unet_dir)
    if not any(unet_dir.glob("*.safetensors")):
        raise DiffusionLabError(
            f"{unet_dir} has no .safetensors weights (pickled .bin weights are refused: nothing is unpickled); "
            "convert them with diffusers' save_pretrained(safe_serialization=True)")
    diffusers = import_diffusers()
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True,
                                                     low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffusionLabError(f"cannot load the UNet2DModel in {unet_dir}: {first}") from None
    return unet.to(device).eval()


# ---- scheduler config -> process -----------------------------------------------------------------------------------
def betas_from_scheduler(sched: dict) -> torch.Tensor:
    """``beta_1..beta_T`` (float64) of a diffusers scheduler config, through :mod:`diffusionlab.schedules`."""
    from diffusionlab.schedules import as_betas, cosine_betas, linear_betas, scaled_linear_betas

    T = sched.get("num_train_timesteps", 1000)
    if sched.get("rescale_betas_zero_snr"):
        raise DiffusionLabError("scheduler option rescale_betas_zero_snr=True gives alpha-bar_T = 0 (beta_T = 1), "
                                "which a VP chain cannot represent (every beta_t must lie in (0, 1))")
    if sched.get("trained_betas") is not None:
        return as_betas(sched["trained_betas"])
    name = sched.get("beta_schedule", "linear")
    if name == "linear":
        return linear_betas(T, sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02))
    if name == "scaled_linear":
        return scaled_linear_betas(T, sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02))
    if name == "squaredcos_cap_v2":
        return cosine_betas(T, 0.008, 0.999)
    raise DiffusionLabError(f"scheduler beta_schedule {name!r} does not map to a diffusionlab schedule; "
                            f"allowed: {', '.join(BETA_SCHEDULES)} or trained_betas")


def process_from_scheduler(sched: dict, continuous: bool = False, cov=None):
    """The diffusionlab process of a scheduler config (module docstring): a :class:`VPChain`, or with
    ``continuous`` the VP-SDE whose discretization it is (linear betas only)."""
    from diffusionlab.processes import VPChain, VPSDE

    betas = betas_from_scheduler(sched)
    if not continuous:
        return VPChain(betas, cov=cov)
    name = "trained_betas" if sched.get("trained_betas") is not None else sched.get("beta_schedule", "linear")
    if name != "linear":
        raise DiffusionLabError(
            f"a continuous-time process (ODE/SDE samplers, --metric nll) needs linear betas, the discretization of "
            f"the VP-SDE; this model's schedule is {name!r}: use a discrete sampler (ddpm, ddim, dpmpp-2m, ...) "
            "or --metric elbo")
    T = int(sched.get("num_train_timesteps", 1000))
    return VPSDE(T * float(sched.get("beta_start", 1e-4)), T * float(sched.get("beta_end", 0.02)), cov=cov)


def parametrization_from_scheduler(sched: dict, out_channels: int, in_channels: int) -> tuple[str, bool]:
    """``(prediction, learn_variance)`` of a scheduler config and UNet channel counts."""
    ptype = sched.get("prediction_type", "epsilon")
    if ptype not in PREDICTION_FROM_DIFFUSERS:
        raise DiffusionLabError(f"scheduler prediction_type {ptype!r} does not map; allowed: "
                                f"{', '.join(PREDICTION_FROM_DIFFUSERS)}")
    var = sched.get("variance_type", "fixed_small") or "fixed_small"
    if var not in FIXED_VARIANCES and var != "learned_range":
        raise DiffusionLabError(f"scheduler variance_type {var!r} does not map; allowed: "
                                f"{', '.join([*FIXED_VARIANCES, 'learned_range'])}")
    learn = var == "learned_range"
    want = 2 * in_channels if learn else in_channels
    if out_channels != want:
        raise DiffusionLabError(f"the UNet outputs {out_channels} channels for {in_channels} input channels; "
                                f"variance_type {var!r} needs {want}")
    return PREDICTION_FROM_DIFFUSERS[ptype], learn


def load_diffusers(path: str | Path, device="cpu", continuous: bool = False, cov=None):
    """``(model, info)``: the diffusers model in ``path`` as a :class:`DiffusionModel` on ``device`` (module
    docstring); ``info`` says what was read and how it was mapped (JSON-ready)."""
    from diffusionlab.parametrization import DiffusionModel

    parts = find_parts(path)
    sched = dict(DDPM_DEFAULTS) if parts.scheduler is None else parts.scheduler
    unet = load_unet(parts.unet_dir, device)
    ucfg = dict(unet.config)
    prediction, learn = parametrization_from_scheduler(sched, ucfg["out_channels"], ucfg["in_channels"])
    process = process_from_scheduler(sched, continuous, cov)
    T = int(sched.get("num_train_timesteps", 1000))
    net = DiffusersUNet(unet, T, discrete=not continuous)
    model = DiffusionModel(net, process, prediction=prediction, learn_variance=learn, scale_input=False).to(device)
    size = ucfg["sample_size"]
    hw = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    info = {"folder": str(parts.root), "unet": str(parts.unet_dir), "scheduler": parts.scheduler_source,
            "T": T, "beta_schedule": "trained_betas" if sched.get("trained_betas") is not None
            else sched.get("beta_schedule", "linear"), "prediction": prediction, "learn_variance": learn,
            "process": "vp-sde" if continuous else "vp", "sample_shape": [int(ucfg["in_channels"]), *hw],
            "clip_sample": bool(sched.get("clip_sample", True)),
            "variance": FIXED_VARIANCES.get(sched.get("variance_type") or "fixed_small", "learned"),
            "parameters": sum(p.numel() for p in unet.parameters())}
    return model, info


@dataclass
class ImageSpace:
    """What sampling needs of a dataset when a diffusers model comes without one: the sample shape and the map
    to display space (``[-1, 1] -> [0, 1]``, as ``DDPMPipeline`` outputs ``(x / 2 + 0.5).clamp(0, 1)``)."""

    sample_shape: tuple
    name: str = "diffusers"
    kind: str = "images"

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        from diffusionlab.data.scaling import to_unit

        return to_unit(x)

    @property
    def data(self):
        raise DiffusionLabError("this needs the model's dataset: give --data NAME (a dataset name such as digits, "
                                "or a YAML file with the data section)")


def data_config(data) -> dict | None:
    """``--data``: None, a dataset name (``digits``) or a YAML file holding a data section (``name: ...``)."""
    if data is None:
        return None
    if isinstance(data, dict):
        return dict(data)
    p = Path(data)
    if p.suffix in (".yaml", ".yml"):
        from diffusionlab.training.config import safe_load

        if not p.is_file():
            raise DiffusionLabError(f"--data file not found: {p}")
        obj = safe_load(p.read_text())
        obj = obj.get("data", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict) or "name" not in obj:
            raise DiffusionLabError(f"--data {p} must hold a data section with a 'name' (e.g. name: digits)")
        return dict(obj)
    return {"name": str(data)}


def load_diffusers_run(path: str | Path, data=None, device: str = "auto", continuous: bool = False, cov=None):
    """``(cfg, ds, model)`` as :func:`~diffusionlab.training.sampling.load_run` returns for a run directory:
    ``cfg`` a run-like config (``data``, ``process``, ``sample``, ``train``, plus ``diffusers``: the mapping
    info), ``ds`` the ``--data`` dataset (its sample shape checked against the UNet's) or an :class:`ImageSpace`."""
    from diffusionlab.training.build import resolve_device

    dev = resolve_device(device)
    model, info = load_diffusers(path, dev, continuous, cov)
    dcfg = data_config(data)
    shape = tuple(info["sample_shape"])
    if dcfg is None:
        ds = ImageSpace(shape)
    else:
        from diffusionlab.data import load_dataset

        ds = load_dataset(dcfg, seed=0)
        if tuple(ds.sample_shape) != shape:
            raise DiffusionLabError(f"--data {dcfg['name']!r} has samples of shape {tuple(ds.sample_shape)}; the UNet "
                                    f"in {path} takes {shape}")
    sample = {"sampler": "ddim", "steps": 50, "clip_x0": bool(info["clip_sample"])}
    cfg = {"data": dcfg or {"name": "diffusers"}, "process": {"name": info["process"]}, "sample": sample,
           "train": {"seed": 0}, "parametrization": {"prediction": info["prediction"],
                                                     "learn_variance": info["learn_variance"], "scale_input": False},
           "diffusers": info}
    return cfg, ds, model


# ---- export: diffusionlab U-Net -> diffusers ---------------------------------------------------------------------
def export_blockers(cfg: dict, model) -> list[str]:
    """Everything about a run that has no ``UNet2DModel`` + ``DDPMScheduler`` counterpart (empty: exportable)."""
    from diffusionlab.models.unet import UNet

    bad = []
    mcfg, pcfg = cfg.get("model", {}), cfg.get("process", {})
    net = model.net
    if not isinstance(net, UNet):
        bad.append(f"model.name {mcfg.get('name')!r}: only the 2-D U-Net ('unet') maps to UNet2DModel")
    if not (model.process.discrete and model.process.variance_preserving):
        bad.append(f"process.name {pcfg.get('name')!r}: only the VP chain ('vp') maps to a DDPMScheduler")
    else:
        if model.process.T != EXPORT_T:
            bad.append(f"process.T = {model.process.T}: UNet2DModel embeds the raw timestep, which equals "
                       f"diffusionlab's c_noise - 1 only for T = {EXPORT_T}")
        if not model.process.cov.is_identity:
            bad.append(f"process.noise {pcfg.get('noise')!r}: diffusers' schedulers draw independent noise")
        if pcfg.get("schedule", "linear") not in ("linear", "cosine"):
            bad.append(f"process.schedule {pcfg.get('schedule')!r}")
        if pcfg.get("schedule") == "cosine" and float(pcfg.get("cosine_s", 0.008)) != 0.008:
            bad.append(f"process.cosine_s = {pcfg.get('cosine_s')}: squaredcos_cap_v2 has s = 0.008")
        if float(pcfg.get("snr_shift", 1.0)) != 1.0:
            bad.append(f"process.snr_shift = {pcfg.get('snr_shift')}: DDPMScheduler has no shifted schedule")
    if model.prediction not in PREDICTION_TO_DIFFUSERS:
        bad.append(f"parametrization.prediction {model.prediction!r}")
    if getattr(model, "self_condition", False):
        bad.append("parametrization.self_condition: UNet2DModel takes no x_0 estimate beside the sample (the first "
                   "convolution has twice the sample's channels)")
    if not isinstance(net, UNet):
        return bad
    if getattr(net, "num_classes", None) is not None:
        bad.append(f"model.num_classes = {net.num_classes}: the label embedding of a class-conditional U-Net is not "
                   "mapped to UNet2DModel's class embedding")
    if tuple(mcfg.get("channel_mults", (1, 2, 2)))[:1] != (1,):
        bad.append(f"model.channel_mults {list(mcfg.get('channel_mults'))}: the first must be 1 (UNet2DModel's input "
                   "conv and time embedding take the first level's width)")
    if not mcfg.get("conv_resample", True):
        bad.append("model.conv_resample = false: UNet2DModel's blocks always resample with convolutions")
    groups = int(mcfg.get("groups", 8))
    odd = sorted({m.num_channels for m in net.modules() if isinstance(m, nn.GroupNorm) and m.num_groups != groups})
    if odd:
        bad.append(f"model.groups = {groups} does not divide the channel counts {odd} (diffusionlab then uses fewer "
                   "groups there; UNet2DModel uses norm_num_groups everywhere)")
    if _head_dim(net) is False:
        bad.append(f"model.num_heads = {mcfg.get('num_heads')}: UNet2DModel fixes the head width "
                   "(attention_head_dim) across blocks, and these attention blocks have different widths")
    return bad


def _attention_blocks(net):
    from diffusionlab.models.unet import AttentionBlock

    return [m for m in net.modules() if isinstance(m, AttentionBlock)]


def _head_dim(net):
    """``attention_head_dim`` for the export: None with one head (each block one head of its full width), the
    common head width with several, False when the widths differ."""
    blocks = _attention_blocks(net)
    heads = {b.heads for b in blocks}
    if heads == {1}:
        return None
    widths = {b.qkv.in_channels // b.heads for b in blocks}
    return widths.pop() if len(widths) == 1 else False


def unet_config(cfg: dict, net) -> dict:
    """The ``UNet2DModel`` config of an exportable diffusionlab U-Net (:func:`export_blockers` empty)."""
    mcfg = cfg["model"]
    base = int(mcfg.get("base_channels", 64))
    mults = [int(m) for m in mcfg.get("channel_mults", (1, 2, 2))]
    levels = len(mults)
    h, w = net.image_hw
    attn = {i for i in range(levels)
            if any(_has_attention(layer) for layer in _down_level(net, i, int(mcfg.get("num_res_blocks", 2))))}
    return {
        "sample_size": h if h == w else [h, w], "in_channels": net.in_channels,
        "out_channels": net.out_mult * net.in_channels, "center_input_sample": False,
        "time_embedding_type": "positional", "freq_shift": 0, "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels))],
        "block_out_channels": [m * base for m in mults], "layers_per_block": int(mcfg.get("num_res_blocks", 2)),
        "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": float(mcfg.get("dropout", 0.0)), "act_fn": "silu", "attention_head_dim": _head_dim(net),
        "norm_num_groups": int(mcfg.get("groups", 8)), "attn_norm_num_groups": int(mcfg.get("groups", 8)),
        "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift" if mcfg.get("scale_shift", True) else "default",
        "add_attention": True,
    }


def _has_attention(layer) -> bool:
    from diffusionlab.models.unet import AttentionBlock

    return any(isinstance(m, AttentionBlock) for m in layer)


def _down_level(net, level: int, nrb: int):
    """The residual-block entries of down level ``level`` in ``net.down`` (each level: ``nrb`` blocks, then a
    down-sampling entry except after the last)."""
    start = level * (nrb + 1)
    return list(net.down)[start:start + nrb]


def scheduler_config(cfg: dict, model) -> dict:
    """The ``DDPMScheduler`` config of an exportable run's chain, parametrization and sampler clipping."""
    pcfg = cfg["process"]
    out = {"_class_name": "DDPMScheduler", "num_train_timesteps": int(model.process.T),
           "prediction_type": PREDICTION_TO_DIFFUSERS[model.prediction][0],
           "variance_type": "learned_range" if model.learn_variance else "fixed_small",
           "clip_sample": bool(cfg.get("sample", {}).get("clip_x0", True)), "clip_sample_range": 1.0}
    if pcfg.get("schedule", "linear") == "cosine":
        out["beta_schedule"] = "squaredcos_cap_v2"
    else:
        out.update(beta_schedule="linear", beta_start=float(pcfg.get("beta_start", 1e-4)),
                   beta_end=float(pcfg.get("beta_end", 0.02)))
    return out


def time_rotation(freqs: torch.Tensor, dim: int) -> torch.Tensor:
    """``R`` (float64, ``dim x dim``) with ``emb(c + 1) = R emb(c)`` for the embedding
    ``emb(c) = [cos(c f), sin(c f)]`` (zero-padded to ``dim``): ``cos((c+1)f) = cos(cf) cos f - sin(cf) sin f``,
    ``sin((c+1)f) = sin(cf) cos f + cos(cf) sin f``."""
    f = freqs.to(_F64)
    half = f.numel()
    r = torch.eye(dim, dtype=_F64)
    c, s = torch.diag(torch.cos(f)), torch.diag(torch.sin(f))
    r[:half, :half], r[:half, half:2 * half] = c, -s
    r[half:2 * half, :half], r[half:2 * half, half:2 * half] = s, c
    return r


def _linear_from_conv(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])


def _map_resblock(ours, prefix: str, out: dict) -> None:
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"),
                 ("conv2", "conv2")):
        for p in ("weight", "bias"):
            out[f"{prefix}.{b}.{p}"] = getattr(getattr(ours, a), p)
    if isinstance(ours.skip, nn.Conv2d):
        out[f"{prefix}.conv_shortcut.weight"] = ours.skip.weight
        out[f"{prefix}.conv_shortcut.bias"] = ours.skip.bias


def _map_attention(ours, prefix: str, out: dict) -> None:
    c = ours.qkv.in_channels
    w, b = _linear_from_conv(ours.qkv.weight), ours.qkv.bias
    out[f"{prefix}.group_norm.weight"], out[f"{prefix}.group_norm.bias"] = ours.norm.weight, ours.norm.bias
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{prefix}.{name}.weight"] = w[i * c:(i + 1) * c]
        out[f"{prefix}.{name}.bias"] = b[i * c:(i + 1) * c]
    out[f"{prefix}.to_out.0.weight"] = _linear_from_conv(ours.proj.weight)
    out[f"{prefix}.to_out.0.bias"] = ours.proj.bias


def _map_entry(layer, prefix: str, index: int, out: dict) -> None:
    """One ``EmbSequential`` of the down/up path: its ResBlock, attention and resampler."""
    from diffusionlab.models.unet import AttentionBlock, Downsample, ResBlock, Upsample

    for m in layer:
        if isinstance(m, ResBlock):
            _map_resblock(m, f"{prefix}.resnets.{index}", out)
        elif isinstance(m, AttentionBlock):
            _map_attention(m, f"{prefix}.attentions.{index}", out)
        elif isinstance(m, Downsample):
            out[f"{prefix}.downsamplers.0.conv.weight"], out[f"{prefix}.downsamplers.0.conv.bias"] = m.conv.weight, m.conv.bias
        elif isinstance(m, Upsample):
            out[f"{prefix}.upsamplers.0.conv.weight"], out[f"{prefix}.upsamplers.0.conv.bias"] = m.conv.weight, m.conv.bias


def unet_state_dict(net, levels: int, nrb: int) -> dict:
    """diffusionlab U-Net weights under ``UNet2DModel`` names (module docstring), float32 copies."""
    from diffusionlab.models.unet import Downsample

    out: dict = {}
    te = net.time
    rot = time_rotation(te.sinusoid.freqs, te.fc1.in_features)
    out["time_embedding.linear_1.weight"] = (te.fc1.weight.detach().to(_F64) @ rot).to(te.fc1.weight.dtype)
    out["time_embedding.linear_1.bias"] = te.fc1.bias
    out["time_embedding.linear_2.weight"], out["time_embedding.linear_2.bias"] = te.fc2.weight, te.fc2.bias
    out["conv_in.weight"], out["conv_in.bias"] = net.inp.weight, net.inp.bias
    level, index = 0, 0
    for layer in net.down:
        if isinstance(layer[0], Downsample):
            _map_entry(layer, f"down_blocks.{level}", 0, out)
            level, index = level + 1, 0
        else:
            _map_entry(layer, f"down_blocks.{level}", index, out)
            index += 1
    mid = list(net.mid)
    _map_resblock(mid[0], "mid_block.resnets.0", out)
    _map_attention(mid[1], "mid_block.attentions.0", out)
    _map_resblock(mid[2], "mid_block.resnets.1", out)
    for j, layer in enumerate(net.up):
        _map_entry(layer, f"up_blocks.{j // (nrb + 1)}", j % (nrb + 1), out)
    out["conv_norm_out.weight"], out["conv_norm_out.bias"] = net.out_norm.weight, net.out_norm.bias
    out["conv_out.weight"], out["conv_out.bias"] = net.out.weight, net.out.bias
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in out.items()}


def _negate_mean_output(sd: dict, in_channels: int) -> None:
    """``score`` parametrization: the net outputs ``-eps``; negating the mean half of the output conv makes it an
    epsilon-prediction net (exact: a sign flip)."""
    sd["conv_out.weight"][:in_channels] *= -1
    sd["conv_out.bias"][:in_channels] *= -1


def check_export(model, unet, num: int = 4, seed: int = 0, taus=(0, 1, 250, 500, 999)) -> dict:
    """Max |diffusers output - diffusionlab output| over a random batch at diffusers timesteps ``taus``, absolute
    and relative to the largest output, with the network weights as exported (float32, CPU)."""
    net = model.net
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, net.in_channels, *net.image_hw, generator=g)
    sign = PREDICTION_TO_DIFFUSERS[model.prediction][1]
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for tau in taus:
            ours = net(x, torch.full((num,), float(tau + 1) * 1000.0 / model.process.T))
            if sign < 0:
                ours = torch.cat([-ours[:, :net.in_channels], ours[:, net.in_channels:]], 1)
            theirs = unet(x, torch.full((num,), tau, dtype=torch.long)).sample
            worst = max(worst, float((ours - theirs).abs().max()))
            scale = max(scale, float(ours.abs().max()))
    return {"max_abs_diff": worst, "max_abs_output": scale, "max_rel_diff": worst / max(scale, 1e-30),
            "timesteps": list(taus), "batch": num}


#: the export check's bound on the relative output difference: both libraries compute the sinusoid arguments
#: ``tau f`` and ``(tau + 1) f`` in float32, which round differently by up to ulp(1000) ~ 6e-5; propagated through
#: the network that stays far below 1e-3, while a mis-mapped weight changes the output by O(1)
EXPORT_RTOL = 1e-3


def export_unet_run(run_dir: str | Path, out_dir: str | Path, weights: str = "ema") -> dict:
    """Write the U-Net run ``run_dir`` as a ``DDPMPipeline`` folder ``out_dir`` (module docstring), load it back
    with diffusers and compare outputs; returns a JSON-ready summary. ``out_dir`` must not exist; it appears
    whole or not at all (written to a temporary sibling, then renamed)."""
    import os
    import shutil
    import tempfile

    from diffusionlab.training.sampling import load_run

    out = Path(out_dir)
    if out.exists():
        raise DiffusionLabError(f"--out {out} exists; choose a new folder (nothing is overwritten)")
    if not out.parent.is_dir():
        raise DiffusionLabError(f"cannot write {out}: directory {out.parent} does not exist")
    cfg, _, model = load_run(run_dir, device="cpu", weights=weights)
    bad = export_blockers(cfg, model)
    if bad:
        raise DiffusionLabError(f"{run_dir} cannot be exported to diffusers: " + "; ".join(bad))
    diffusers = import_diffusers()
    model = model.float().eval()
    net = model.net
    ucfg = unet_config(cfg, net)
    sd = unet_state_dict(net, len(ucfg["block_out_channels"]), ucfg["layers_per_block"])
    negated = PREDICTION_TO_DIFFUSERS[model.prediction][1] < 0
    if negated:
        _negate_mean_output(sd, net.in_channels)
    unet = diffusers.UNet2DModel(**ucfg)
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    if missing or unexpected:  # a layout diffusers builds differently: a bug here, never a silent partial export
        raise DiffusionLabError(f"internal: the weight mapping does not match UNet2DModel (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
    sched = diffusers.DDPMScheduler(**{k: v for k, v in scheduler_config(cfg, model).items() if k != "_class_name"})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(tmp), safe_serialization=True)
        loaded = load_unet(tmp / "unet", "cpu")
        check = check_export(model, loaded)
        if not check["max_rel_diff"] <= EXPORT_RTOL:
            raise DiffusionLabError(f"internal: the exported UNet2DModel differs from the run's network "
                                    f"(max relative difference {check['max_rel_diff']:.3g} > {EXPORT_RTOL})")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "run": str(run_dir), "weights": weights, "unet_config": ucfg,
            "scheduler": scheduler_config(cfg, model), "check": check,
            "note": "score parametrization exported as epsilon (output conv negated)" if negated else None}


def register(sub) -> None:
    """``diffusionlab export --run DIR --out DIR``."""
    p = sub.add_parser("export", help="write a U-Net run as a diffusers DDPMPipeline folder",
                       description="Write a diffusionlab U-Net run (VP chain, T = 1000) as a diffusers DDPMPipeline "
                                   "folder (unet/ + scheduler/, safetensors), check it by loading it with diffusers "
                                   "and comparing outputs; options that do not map are refused, all named.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--format", default="diffusers", choices=("diffusers",))
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA (default) or raw weights")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    summary = export_unet_run(args.run, args.out, weights=args.weights)
    print(json.dumps(summary, indent=2))
    return 0
