"""Training recipes of diffusionlab and its peers behind one small interface (benchmarks only).

A recipe owns a network, its optimizer, EMA and noise schedule, and the training data (the same tensor for every
library: scikit-learn's digits, the 1500 training digits in [-1, 1], or toy-2D points). It offers

- ``step()``: one optimizer step exactly as that library's own training loop does it;
- ``sample(n, seed)``: ``n`` images in [0, 1] from the EMA weights with the library's own DDIM (50 steps unless set);
- ``params``: the trainable parameter count; ``sync()``: wait for the device.

**diffusionlab** runs :func:`diffusionlab.training.trainer.train_step` -- the trainer's own step -- on the parts
:func:`~diffusionlab.training.trainer.build_parts` builds from a config (``configs/digits.yaml`` by default).

**diffusers** (0.42.1) mirrors ``examples/unconditional_image_generation/train_unconditional.py`` with its
defaults: ``DDPMScheduler`` (1000 steps, linear betas, epsilon prediction), ``add_noise`` on random
``t ~ U{0..999}``, MSE, AdamW (lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8), gradient clipping at
1.0, a cosine learning-rate schedule with 500 warm-up steps over 100 epochs, ``EMAModel`` (decay 0.9999, warm-up
with inv_gamma 1.0 and power 3/4), batch 16. The network is ``UNet2DModel`` sized to match diffusionlab's digits
U-Net (below). Accelerate's single-process wrapper is left out (it adds nothing on one CPU process).

**denoising-diffusion-pytorch** (lucidrains, 2.3.4) mirrors ``Trainer.train`` with the ``Trainer`` and
``GaussianDiffusion`` defaults: v-prediction, sigmoid beta schedule, 1000 steps, Adam (lr 1e-4, betas
(0.9, 0.99)), clipping at 1.0, ``ema_pytorch.EMA`` (beta 0.995, update every 10 steps), batch 16, data
auto-normalized from [0, 1]. The network is its ``Unet`` sized to match.

Matched sizes for 1x8x8 digits (two resolutions 8 and 4, attention at 4 and in the middle):

====================  ===========================================================================  ==========
library               network                                                                      parameters
====================  ===========================================================================  ==========
diffusionlab          ``UNet`` base 24, mults (1, 2), 1 res block, attention at 4                    399,913
diffusers             ``UNet2DModel`` channels (24, 48), 1 layer per block, attention at 4           395,641
ddpm-pytorch          ``Unet`` dim 22, mults (1, 2) (its defaults: linear attention at 8, full at 4)   418,919
====================  ===========================================================================  ==========
"""

from __future__ import annotations

import copy
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_imports import import_ddpm_pytorch, import_diffusers  # noqa: E402

LIBRARIES = ("diffusionlab", "diffusers", "ddpm-pytorch")
DIGITS = {"name": "digits", "split": "train"}


def digits_data(device="cpu") -> torch.Tensor:
    """The 1500 training digits, ``(1500, 1, 8, 8)`` in [-1, 1] (the 297 test digits stay held out for the metric)."""
    from diffusionlab.data import load_dataset

    return load_dataset(dict(DIGITS), seed=0).data.to(device)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class _Batches:
    """Random minibatches of ``data`` from a seeded CPU generator (the same draw for every library)."""

    def __init__(self, data: torch.Tensor, batch: int, seed: int):
        self.data, self.batch = data, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        idx = torch.randint(self.data.shape[0], (self.batch,), generator=self.gen)
        return self.data[idx.to(self.data.device)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- diffusionlab -----------------------------------------------------------------------------------------------
class DiffusionLabRecipe:
    """diffusionlab's trainer step on a config (default ``configs/digits.yaml`` with the 1500 training digits)."""

    name = "diffusionlab"

    def __init__(self, device="cpu", batch: int | None = None, config: str = "configs/digits.yaml",
                 overrides: list[str] | None = None, seed: int = 0, data: dict | None = None):
        from diffusionlab.training.config import load_config, resolve
        from diffusionlab.training.trainer import build_parts

        cfg = load_config(config)
        if data is not None:
            cfg["data"] = dict(data)
        sets = [f"train.device={device}", f"train.seed={seed}"] + list(overrides or [])
        if batch is not None:
            sets.append(f"train.batch_size={batch}")
        if cfg["data"]["name"] == "digits":
            sets.append("data.split=train")
        self.cfg = resolve(cfg, sets)
        self.parts = build_parts(self.cfg)
        self.device = self.parts.data.device
        self.batch = self.cfg["train"]["batch_size"]
        self.params = count(self.parts.model)
        self.k = 0

    def step(self) -> None:
        from diffusionlab.training.trainer import train_step

        train_step(self.parts, self.k)
        self.k += 1

    def sync(self) -> None:
        _sync(self.device)

    @torch.no_grad()
    def sample(self, n: int, seed: int, steps: int = 50) -> torch.Tensor:
        from diffusionlab.training.sampling import generate

        model = copy.deepcopy(self.parts.model)
        model.load_state_dict(self.parts.ema.state_dict())
        scfg = {"sampler": "ddim", "steps": steps, "eta": 0.0, "clip_x0": True}
        x = generate(model, scfg, num=n, seed=seed, device=self.device, shape=self.parts.ds.sample_shape)
        return self.parts.ds.to_display(x)


class _PeerRecipe:
    """What the peers' recipes share: the import (a clear error if the peer is missing), seed, device, batch."""

    def _start(self, importer, package: str, device, batch: int, seed: int):
        lib = importer()
        if lib is None:
            raise RuntimeError(f"{package} is not installed")
        torch.manual_seed(seed)
        self.lib, self.device, self.batch = lib, torch.device(device), batch
        return lib

    def sync(self) -> None:
        _sync(self.device)


# ---- diffusers --------------------------------------------------------------------------------------------------
def diffusers_unet(diffusers, image_size: int = 8, channels=(24, 48), in_channels: int = 1):
    """``UNet2DModel`` matched to diffusionlab's digits U-Net (module docstring)."""
    return diffusers.UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=tuple(channels), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


class DiffusersRecipe(_PeerRecipe):
    """``train_unconditional.py``'s loop and defaults (module docstring)."""

    name = "diffusers"
    EPOCH_STEPS = math.ceil(1500 / 16)

    def __init__(self, device="cpu", batch: int = 16, seed: int = 0, data: torch.Tensor | None = None,
                 model: torch.nn.Module | None = None):
        self._start(import_diffusers, "diffusers", device, batch, seed)
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.model = (model or diffusers_unet(self.lib)).to(self.device)
        self.scheduler = self.lib.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6,
                                     eps=1e-8)
        self.lr_scheduler = get_scheduler("cosine", optimizer=self.opt, num_warmup_steps=500,
                                          num_training_steps=100 * self.EPOCH_STEPS)
        self.ema = EMAModel(self.model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        self.batches = _Batches(digits_data(self.device) if data is None else data.to(self.device), batch, seed)
        self.gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.params = count(self.model)

    def step(self) -> None:
        clean = self.batches()
        noise = torch.randn(clean.shape, generator=self.gen, device=self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  generator=self.gen, device=self.device).long()
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        out = self.model(noisy, timesteps).sample
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.lr_scheduler.step()
        self.opt.zero_grad()
        self.ema.step(self.model.parameters())

    @torch.no_grad()
    def sample(self, n: int, seed: int, steps: int = 50) -> torch.Tensor:
        """``DDIMScheduler`` (from the DDPM scheduler's config, diffusers' defaults: eta 0, clip_sample) on the
        EMA weights, the loop of ``DDIMPipeline.__call__``."""
        model = copy.deepcopy(self.model).eval()
        self.ema.copy_to(model.parameters())
        sched = self.lib.DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        size = model.config.sample_size
        x = torch.randn((n, model.config.in_channels, size, size), generator=gen, device=self.device)
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x, eta=0.0, generator=gen).prev_sample
        return (x / 2 + 0.5).clamp(0, 1)


# ---- denoising-diffusion-pytorch --------------------------------------------------------------------------------
def ddpm_pytorch_unet(lib, dim: int = 22, channels: int = 1):
    """lucidrains' ``Unet`` matched to diffusionlab's digits U-Net (module docstring)."""
    return lib.Unet(dim=dim, dim_mults=(1, 2), channels=channels)


class DDPMPytorchRecipe(_PeerRecipe):
    """``Trainer.train``'s loop with the ``Trainer`` / ``GaussianDiffusion`` defaults (module docstring)."""

    name = "ddpm-pytorch"

    def __init__(self, device="cpu", batch: int = 16, seed: int = 0, data: torch.Tensor | None = None,
                 model: torch.nn.Module | None = None, image_size: int = 8):
        lib = self._start(import_ddpm_pytorch, "denoising-diffusion-pytorch", device, batch, seed)
        self.unet = model or ddpm_pytorch_unet(lib)
        data = digits_data(self.device) if data is None else data.to(self.device)
        # its Dataset gives [0, 1]; GaussianDiffusion normalizes to [-1, 1] itself
        self._train_with(lib.GaussianDiffusion(self.unet, image_size=image_size, timesteps=1000), (data + 1) / 2, seed)

    def _train_with(self, diffusion, data: torch.Tensor, seed: int) -> None:
        """``Trainer``'s optimizer (Adam, lr 1e-4, betas (0.9, 0.99)) and EMA (0.995 every 10 steps) on ``data``."""
        from ema_pytorch import EMA

        self.diffusion = diffusion.to(self.device)
        self.opt = torch.optim.Adam(self.diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
        self.ema = EMA(self.diffusion, beta=0.995, update_every=10).to(self.device)
        self.batches = _Batches(data, self.batch, seed)
        self.params = count(self.unet)

    def step(self) -> None:
        self.diffusion.train()
        loss = self.diffusion(self.batches())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.ema.update()

    @torch.no_grad()
    def sample(self, n: int, seed: int, steps: int = 50) -> torch.Tensor:
        """Its ``ddim_sample`` (``sampling_timesteps`` < ``timesteps``; eta 0) on the EMA model."""
        model = self.ema.ema_model
        model.eval()
        saved = model.sampling_timesteps
        model.sampling_timesteps = steps
        torch.manual_seed(seed)  # it draws from the global generator
        try:
            return model.ddim_sample((n, model.channels, model.image_size[0], model.image_size[1])).clamp(0, 1)
        finally:
            model.sampling_timesteps = saved


RECIPES = {"diffusionlab": DiffusionLabRecipe, "diffusers": DiffusersRecipe, "ddpm-pytorch": DDPMPytorchRecipe}


# ---- the toy-2D MLP inside each library's loop ------------------------------------------------------------------
def toy_data(device="cpu", num: int = 20000) -> torch.Tensor:
    """configs/toy2d.yaml's ring of 8 Gaussians, ``(num, 2)``."""
    from diffusionlab.data import load_dataset

    return load_dataset({"name": "ring", "num": num}, seed=0).data.to(device)


def toy_mlp():
    """configs/toy2d.yaml's network: diffusionlab's ``MLP`` (hidden 256, depth 4) on 2-D points."""
    from diffusionlab.models import build_network
    from diffusionlab.training.config import load_config

    return build_network(dict(load_config("configs/toy2d.yaml")["model"]), (2,))


class _Output:
    def __init__(self, sample):
        self.sample = sample


class DiffusersMLP(torch.nn.Module):
    """The MLP as a diffusers model: ``model(x, timesteps).sample`` with integer timesteps 0..999."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, timesteps):
        return _Output(self.net(x, timesteps.float()))


class DDPMPytorchMLP(torch.nn.Module):
    """The MLP as a ``GaussianDiffusion1D`` model: ``(B, 2, 1)`` sequences of length 1, ``forward(x, t, x_self_cond)``."""

    channels, self_condition, random_or_learned_sinusoidal_cond = 2, False, False

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, x_self_cond=None):
        return self.net(x[..., 0], t.float())[..., None]


class DDPMPytorchToyRecipe(DDPMPytorchRecipe):
    """``Trainer1D.train``'s step with ``GaussianDiffusion1D`` defaults (eps prediction, cosine betas, 1000 steps;
    ``auto_normalize`` off: the points are not images in [0, 1])."""

    def __init__(self, device="cpu", batch: int = 512, seed: int = 0):
        lib = self._start(import_ddpm_pytorch, "denoising-diffusion-pytorch", device, batch, seed)
        self.unet = DDPMPytorchMLP(toy_mlp())
        diffusion = lib.GaussianDiffusion1D(self.unet, seq_length=1, timesteps=1000, auto_normalize=False)
        self._train_with(diffusion, toy_data(self.device)[..., None], seed)


def toy_recipe(library: str, device="cpu", batch: int = 512, seed: int = 0):
    """The toy-2D MLP (configs/toy2d.yaml's network and data) in ``library``'s training loop."""
    if library == "diffusionlab":
        return DiffusionLabRecipe(device, batch, config="configs/toy2d.yaml", seed=seed)
    if library == "diffusers":
        return DiffusersRecipe(device, batch, seed, data=toy_data(device), model=DiffusersMLP(toy_mlp()))
    if library == "ddpm-pytorch":
        return DDPMPytorchToyRecipe(device, batch, seed)
    raise ValueError(f"unknown library {library!r}; allowed: {', '.join(LIBRARIES)}")


# ---- scaling: other resolutions, videos -------------------------------------------------------------------------
def random_images(resolution: int, num: int = 512, channels: int = 1, frames: int | None = None) -> str:
    """A ``.npy`` of random images (or videos) in [-1, 1] in a temporary folder; its path."""
    import tempfile

    import numpy as np

    shape = (num, channels, resolution, resolution) if frames is None else (num, channels, frames, resolution, resolution)
    arr = np.random.default_rng(0).uniform(-1, 1, size=shape).astype(np.float32)
    path = os.path.join(tempfile.mkdtemp(prefix="dl_bench_"), "images.npy")
    np.save(path, arr)
    return path


def image_recipe(library: str, device, batch: int, resolution: int, overrides=None):
    """The digits-sized networks on random ``1 x R x R`` images: the same layout (two levels, attention at R/2 and in
    the middle) and so the same parameter counts as at 8 x 8."""
    path = random_images(resolution)
    if library == "diffusionlab":
        sets = [f"model.attn_resolutions=[{resolution // 2}]"] + list(overrides or [])
        return DiffusionLabRecipe(device, batch, overrides=sets, data={"name": "array", "path": path, "range": "model"})
    import numpy as np

    data = torch.from_numpy(np.load(path))
    if library == "diffusers":
        return DiffusersRecipe(device, batch, data=data, model=diffusers_unet(import_diffusers(), image_size=resolution))
    if library == "ddpm-pytorch":
        return DDPMPytorchRecipe(device, batch, data=data, image_size=resolution)
    raise ValueError(f"unknown library {library!r}; allowed: {', '.join(LIBRARIES)}")


def video_recipe(device, batch: int, frames: int, resolution: int = 16, overrides=None):
    """diffusionlab's space-time U-Net (configs/video.yaml) on random ``1 x F x R x R`` videos with its
    frame-correlated noise (``progressive:1.0``). The peers have no video training loop to compare with."""
    path = random_images(resolution, num=256, frames=frames)
    return DiffusionLabRecipe(device, batch, config="configs/video.yaml", overrides=overrides,
                              data={"name": "array", "path": path, "range": "model"})
