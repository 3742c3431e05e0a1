"""A video-quality metric for moving digits that needs no download (docs/video_metric.md).

The moving-digit videos of :func:`diffusionlab.data.video.moving_digits` (one sklearn 8x8 digit bouncing on a
dark square canvas at ``speed`` px/frame, integer positions) are scored by :func:`evaluate_videos` with

- ``fvd`` -- Frechet distance (Heusel et al. 2017, Eq. 6; the video form of Unterthiner et al. 2018, FVD)
  between Gaussians fitted to the :data:`FEATURE_DIM` features of a small video network trained here (below) on
  the samples and on :data:`NUM_REFERENCE` held-out real videos (``test`` split digits, seed
  :data:`REFERENCE_SEED`, generated at first use and cached per shape, speed and device);
- per frame, through the shipped 8x8 digit classifier (:mod:`diffusionlab.metrics.digits`) on the frame's
  digit window (:func:`~diffusionlab.metrics.video.digit_windows`, ``centred=True``: the 8x8 window holding the
  most ink, aligned like the training digits): ``digit_all_same`` (fraction of videos whose every frame gets one
  class), ``digit_agreement`` (fraction of frames predicted as their video's majority class),
  ``digit_confidence``, ``class_coverage`` (fraction of the 10 classes that are the majority class of at least
  1 % of the videos), ``frame_fd`` (the digits metric's Frechet distance between the classifier features of the
  sample crops and of all the reference videos' crops, computed for each frame index over the N videos and
  averaged over the frames: a real video repeats one glyph F times, so pooling its F crops would give real sets
  fewer distinct crops, hence a larger small-sample bias, than sets whose frames differ) and ``empty_frames``
  (frames whose window holds less than :data:`EMPTY_INK` of ink; the faintest real digit holds 11.6);
- ``background_mean`` (mean intensity outside the digit window) and ``background_fraction`` (fraction of those
  pixels above :data:`BACKGROUND_LEVEL`); both ``None`` on an 8x8 canvas, which has no outside;
- motion of the track ``p_f`` = ink centre of mass inside the digit window (exactly the digit's position plus
  a constant for a real video): ``speed`` (mean ``||p_{f+1} - p_f||``, px/frame), ``straightness`` (mean over
  videos of ``||p_{F-1} - p_0|| / sum_f ||p_{f+1} - p_f||``; 1 = straight, bounces lower it),
  ``acceleration`` (mean ``||p_{f+1} - 2 p_f + p_{f-1}||``; ``None`` for 2 frames), ``jump_fraction`` (steps
  longer than ``speed + 2`` px: a real digit moving at ``s`` px/frame with rounded positions moves at most
  ``sqrt(ceil(s|cos a|)^2 + ceil(s|sin a|)^2) <= s + sqrt 2`` px per frame, so real videos have none) and
  ``static_fraction`` (videos whose track never leaves a 0.5 px disc around ``p_0``).

Every figure comes as ``{"value", "real", "real_sd"}``: ``real`` and ``real_sd`` are the mean and standard
deviation of the same figure over :data:`REAL_REPEATS` sets of as many real videos from the ``train`` split
(what a perfect model of the training data scores at that N; FD is biased upward at small N, so compare at equal
N). Calibrated for the default 8 frames of 16x16 at 1 px/frame (``calibrated`` in the output); any
``F >= 2`` and square canvas ``>= 8`` px works, with reference values computed for that shape.

**The feature network** (:class:`VideoFeatureNet`, 44,640 parameters): a factorized space-time convolutional
net in the style of R(2+1)D (Tran et al. 2018, "A closer look at spatiotemporal convolutions", Sec. 3.5): three
blocks of a 3x3 spatial convolution and a kernel-3 temporal convolution added as a residual (16, 32, 64
channels, batch norm and ReLU after each; a 2x2 spatial max-pool after the first two blocks), mean and max
pooled over frames and pixels (128), a linear layer to the 32 features (ReLU), and three linear heads trained
jointly on synthetic moving digits of the ``train`` split (1500 digits) so that the features carry both content
and temporal coherence:

- ``class`` (10-way cross-entropy): the digit, on every video whose glyph does not change;
- ``motion`` (squared error, weight :data:`MOTION_WEIGHT`): the absolute velocity components
  ``(|v_row|, |v_col|)`` in px/frame -- unchanged by bounces -- on coherent videos, whose speed is 1 px/frame
  (half of them, the data's speed), 0 (a tenth: static videos) or uniform in [0.25, 2];
- ``kind`` (4-way cross-entropy, :data:`KINDS`): ``coherent`` (40 %) or one of three corruptions (20 % each)
  that leave every frame a clean digit, so that only time tells them apart: ``teleport`` (from a random frame
  on the digit continues from a new position at least 3 px away), ``swap`` (from a random frame on, another
  digit -- of the same class half of the time), ``order`` (the frames permuted, never the identity nor the
  reversal, which is a valid video; a permutation that changes nothing is labelled coherent).

Each corruption happens once per training video, at one random frame. The calibration's cases are different
(docs/video_metric.md): frames shuffled across videos, positions resampled at every frame, every frame from
another video of the same class, static videos; noise and blur are not seen in training, pixel noise only as
the augmentation below. Training (:func:`train_feature_net`): :data:`DEFAULT_STEPS` AdamW steps (weight decay
1e-4, one-cycle learning rate peaking at 3e-3) on fresh batches of 128 videos of 8 frames of 16x16 drawn from one
CPU generator seeded by ``seed``, half of them with Gaussian pixel noise of std U(0, 0.05) (clipped), one CPU
thread (360 s here): bit-identical weights for a seed, device type and torch build. In eval mode the batch norms
are fixed affine maps, so a video's features do not depend on the rest of its batch. The temporal convolution is
a residual, and batch norm follows each convolution, because without them the class loss sat at chance through
a whole 1000-step trial run.

Held-out figures of the shipped weights (seed 0; :func:`heldout_figures`, also in the file's metadata): digit
accuracy 0.9625 on 2000 real test-split ``moving_digits`` videos; on 2000 synthetic test-split videos with the
training mixture of corruptions, ``kind`` accuracy 0.867, coherent-vs-corrupted accuracy 0.8845 and velocity
RMSE 0.089 px/frame. ``python -m diffusionlab.metrics.video_digits`` prints them and the calibration table;
``--train`` retrains and rewrites the file.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffusionlab.errors import DiffusionLabError
from diffusionlab.io import save_safetensors_atomic
from diffusionlab.metrics.digits import _blur, _deterministic, _device, load_classifier, load_digits_split
from diffusionlab.metrics.frechet import feature_statistics, frechet_distance
from diffusionlab.metrics.video import DIGIT, crop_windows, digit_windows

FEATURE_DIM = 32  #: width of the feature layer
NUM_CLASSES = 10
KINDS = ("coherent", "teleport", "swap", "order")  #: the ``kind`` head's classes
KIND_PROBS = (0.4, 0.2, 0.2, 0.2)
WIDTHS = (16, 32, 64)
MOTION_WEIGHT = 10.0  #: weight of the velocity regression in the training loss
DEFAULT_SEED = 0
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 128
TRAIN_FRAMES, TRAIN_SIZE, TRAIN_SPEED = 8, 16, 1.0  #: the shape the net is trained and the metric calibrated on
MIN_TELEPORT = 3.0  #: a teleport moves the digit at least this far (px)
NUM_REFERENCE = 2000  #: held-out real videos behind the reference statistics
REFERENCE_SEED = 20240  #: their moving_digits seed (test split)
REAL_SEED = 30000  #: the real-value sets use train-split seeds REAL_SEED, REAL_SEED + 1, ...
REAL_REPEATS = 5
HELDOUT_SEED = 40000  #: seed of the held-out sets of :func:`heldout_figures`
EMPTY_INK = 4.0  #: a digit window with less ink than this (sum of intensities) counts as an empty frame
BACKGROUND_LEVEL = 0.1  #: background pixels above this count in ``background_fraction``
STATIC_RADIUS = 0.5  #: px; a track that never leaves this disc around its start is static
COVERAGE_SHARE = 0.01
WEIGHTS_PATH = Path(__file__).with_name("video_digits_net.safetensors")
_RANGE_TOL = 1e-6

_NETS: dict[tuple[str, str], "VideoFeatureNet"] = {}
_REF: dict[tuple, dict] = {}
_REAL: dict[tuple, dict] = {}


# ---- the network ------------------------------------------------------------------------------------------
class VideoFeatureNet(nn.Module):
    """Factorized space-time CNN on ``(B, 1, F, H, W)`` in [0, 1] (module docstring); :meth:`features` is the
    32-wide feature layer, :meth:`forward` returns ``(class logits, |velocity| (B, 2), kind logits)``."""

    def __init__(self):
        super().__init__()
        chans = (1,) + WIDTHS
        self.spatial = nn.ModuleList(nn.Conv3d(chans[i], chans[i + 1], (1, 3, 3), padding=(0, 1, 1)) for i in range(3))
        self.temporal = nn.ModuleList(nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)) for c in WIDTHS)
        self.norm_s = nn.ModuleList(nn.BatchNorm3d(c) for c in WIDTHS)
        self.norm_t = nn.ModuleList(nn.BatchNorm3d(c) for c in WIDTHS)
        self.fc = nn.Linear(2 * WIDTHS[-1], FEATURE_DIM)
        self.class_head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.motion_head = nn.Linear(FEATURE_DIM, 2)
        self.kind_head = nn.Linear(FEATURE_DIM, len(KINDS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(3):
            a = F.relu(self.norm_s[i](self.spatial[i](h)))
            h = F.relu(self.norm_t[i](a + self.temporal[i](a)))  # the temporal conv as a residual
            if i < 2:
                h = F.max_pool3d(h, (1, 2, 2))
        pooled = torch.cat([h.mean((2, 3, 4)), h.amax((2, 3, 4))], 1)
        return F.relu(self.fc(pooled))

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.class_head(f), self.motion_head(f), self.kind_head(f)


# ---- synthetic moving digits with known motion ----------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _glyphs(split: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Glyphs ``(G, 8, 8)`` of a digits split, labels ``(G,)`` and, per class, the indices of its glyphs."""
    x, y = load_digits_split(split, "cpu")
    return x[:, 0].contiguous(), y, [torch.nonzero(y == k)[:, 0] for k in range(NUM_CLASSES)]


def _tracks(start: torch.Tensor, vel: torch.Tensor, frames: int, limit: float) -> torch.Tensor:
    """Integer positions ``(N, F, 2)`` of :func:`diffusionlab.data.video.bounce` tracks, rounded and clipped as
    :func:`~diffusionlab.data.video.moving_digits` does (``bounce`` is elementwise, so all coordinates at once)."""
    from diffusionlab.data.video import bounce

    n = start.shape[0]
    raw = bounce(start.reshape(-1).double().numpy(), vel.reshape(-1).double().numpy(), frames, limit)  # (F, 2N)
    pos = np.clip(np.rint(raw), 0, limit).astype(np.int64).reshape(frames, n, 2).transpose(1, 0, 2)
    return torch.from_numpy(np.ascontiguousarray(pos))


def render_videos(glyphs: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Paste per-frame glyphs ``(N, F, 8, 8)`` at integer top-left ``positions`` ``(N, F, 2)`` on black
    ``size x size`` canvases: ``(N, 1, F, size, size)`` float32 (the single-digit case of
    :func:`~diffusionlab.data.video.render`, vectorised)."""
    n, f = positions.shape[:2]
    out = torch.zeros(n, f, size, size, dtype=torch.float32)
    ar = torch.arange(DIGIT)
    rows = (positions[..., 0, None] + ar)[..., :, None]  # (N, F, 8, 1)
    cols = (positions[..., 1, None] + ar)[..., None, :]  # (N, F, 1, 8)
    out[torch.arange(n)[:, None, None, None], torch.arange(f)[None, :, None, None], rows, cols] = glyphs.float()
    return out[:, None]


def _uniform(n, gen, lo=0.0, hi=1.0, shape=()):
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen, dtype=torch.float64)


def synthetic_videos(n: int, gen: torch.Generator, split: str = "train", frames: int = TRAIN_FRAMES,
                     size: int = TRAIN_SIZE, noise: bool = True) -> dict[str, torch.Tensor]:
    """A training batch (module docstring): ``videos`` ``(n, 1, F, S, S)`` in [0, 1], ``label`` (class),
    ``class_mask``, ``motion`` ``(n, 2)`` = ``(|v_row|, |v_col|)``, ``motion_mask``, ``kind`` (index into
    :data:`KINDS`). All randomness from the CPU generator ``gen``."""
    glyphs, labels, by_class = _glyphs(split)
    limit = float(size - DIGIT)
    g0 = torch.randint(0, glyphs.shape[0], (n,), generator=gen)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    speed = torch.where(u < 0.5, 1.0, torch.where(u < 0.6, 0.0, _uniform(n, gen, 0.25, 2.0)))
    angle = _uniform(n, gen, 0.0, 2 * math.pi)
    vel = speed[:, None] * torch.stack([torch.sin(angle), torch.cos(angle)], 1)
    pos = _tracks(_uniform(n, gen, 0.0, limit, (2,)), vel, frames, limit)
    kind = torch.multinomial(torch.tensor(KIND_PROBS), n, replacement=True, generator=gen)
    at = torch.randint(1, frames, (n,), generator=gen)  # the frame where a corruption starts
    after = torch.arange(frames)[None, :] >= at[:, None]  # (n, F)
    gidx = g0[:, None].expand(n, frames).clone()

    tele = torch.nonzero(kind == 1)[:, 0]  # ---- teleport: a second track, far enough from the first
    if len(tele):
        new = _tracks(_uniform(len(tele), gen, 0.0, limit, (2,)), vel[tele], frames, limit)
        for _ in range(50):
            prev = pos[tele, at[tele] - 1].double()
            bad = (new[torch.arange(len(tele)), at[tele]].double() - prev).norm(dim=1) < MIN_TELEPORT
            if not bool(bad.any()):
                break
            redo = torch.nonzero(bad)[:, 0]
            new[redo] = _tracks(_uniform(len(redo), gen, 0.0, limit, (2,)), vel[tele[redo]], frames, limit)
        jump = new[torch.arange(len(tele)), at[tele]].double() - pos[tele, at[tele] - 1].double()
        ok = jump.norm(dim=1) >= MIN_TELEPORT
        pos[tele] = torch.where(after[tele, :, None], new, pos[tele])
        kind[tele[~ok]] = 0  # (a canvas too small to jump 3 px)

    swap = torch.nonzero(kind == 2)[:, 0]  # ---- swap: another glyph from frame `at` on
    if len(swap):
        same = torch.rand(len(swap), generator=gen) < 0.5
        other = torch.randint(0, glyphs.shape[0], (len(swap),), generator=gen)
        for j in range(len(swap)):
            pool = by_class[int(labels[g0[swap[j]]])] if bool(same[j]) else None
            if pool is not None:
                other[j] = pool[torch.randint(0, len(pool), (1,), generator=gen)]
            while int(other[j]) == int(g0[swap[j]]):
                p = pool if pool is not None else torch.arange(glyphs.shape[0])
                other[j] = p[torch.randint(0, len(p), (1,), generator=gen)]
        gidx[swap] = torch.where(after[swap], other[:, None], gidx[swap])

    order = torch.nonzero(kind == 3)[:, 0]  # ---- order: frames permuted
    ident, rev = torch.arange(frames), torch.arange(frames - 1, -1, -1)
    for i in order.tolist():
        perm = ident
        while torch.equal(perm, ident) or torch.equal(perm, rev):
            perm = torch.randperm(frames, generator=gen)
            if frames < 3:
                break
        new = pos[i, perm]
        if torch.equal(new, pos[i]) or torch.equal(new, pos[i].flip(0)):
            kind[i] = 0  # nothing visible changed (static digit, or too few frames)
        pos[i] = new

    videos = render_videos(glyphs[gidx], pos, size)
    if noise:
        noisy = torch.rand(n, generator=gen) < 0.5
        std = 0.05 * torch.rand(n, generator=gen) * noisy
        videos = (videos + std.reshape(n, 1, 1, 1, 1) * torch.randn(videos.shape, generator=gen)).clamp(0.0, 1.0)
    coherent = kind == 0
    return {"videos": videos, "label": labels[g0], "class_mask": kind != 2, "kind": kind,
            "motion": vel.abs().float(), "motion_mask": coherent}


# ---- training ---------------------------------------------------------------------------------------------
def _loss(model, batch, dev):
    logits, motion, kind = model(batch["videos"].to(dev))
    cm, mm = batch["class_mask"].to(dev), batch["motion_mask"].to(dev)
    ce_class = F.cross_entropy(logits[cm], batch["label"].to(dev)[cm]) if bool(cm.any()) else logits.sum() * 0
    mse = F.mse_loss(motion[mm], batch["motion"].to(dev)[mm]) if bool(mm.any()) else motion.sum() * 0
    ce_kind = F.cross_entropy(kind, batch["kind"].to(dev))
    return ce_class + ce_kind + MOTION_WEIGHT * mse, (ce_class, mse, ce_kind)


def _check_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise DiffusionLabError(f"{name} must be an int >= {minimum}, got {v!r}")


def train_feature_net(seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
                      device=None, verbose: bool = False) -> VideoFeatureNet:
    """Train :class:`VideoFeatureNet` on synthetic ``train``-split moving digits (module docstring),
    deterministically for a seed, device type and torch build; global RNG, threads and flags restored."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DiffusionLabError(f"seed must be an int, got {seed!r}")
    _check_int("steps", steps)
    _check_int("batch_size", batch_size, 2)
    dev = _device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), _deterministic(dev):
        torch.manual_seed(seed)
        model = VideoFeatureNet().to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        run = None
        for step in range(steps):
            loss, parts = _loss(model, synthetic_videos(batch_size, gen), dev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            vals = torch.stack([loss.detach(), *[p.detach() for p in parts]]).cpu()
            run = vals if run is None else 0.98 * run + 0.02 * vals
            if verbose and (step + 1) % 50 == 0:
                print(f"step {step + 1:5d}/{steps}  loss {run[0]:.4f}  class {run[1]:.4f}  motion mse {run[2]:.5f}  "
                      f"kind {run[3]:.4f}", file=sys.stderr)
    return model.eval()


@torch.no_grad()
def heldout_figures(model: VideoFeatureNet | None = None, num: int = 2000, device=None) -> dict[str, float]:
    """Held-out figures of ``model`` (default: the shipped net) on ``test``-split digits: ``class_accuracy`` on
    ``num`` real :func:`~diffusionlab.data.video.moving_digits` videos, ``kind_accuracy``, coherent-vs-corrupted
    ``coherence_accuracy`` and ``motion_rmse`` (px/frame) on ``num`` synthetic ones (seed :data:`HELDOUT_SEED`)."""
    from diffusionlab.data.video import moving_digits

    dev = _device(device) if model is None else next(model.parameters()).device
    model = load_feature_net(dev) if model is None else model
    ds = moving_digits(num=num, frames=TRAIN_FRAMES, size=TRAIN_SIZE, speed=TRAIN_SPEED, split="test",
                       seed=HELDOUT_SEED)
    with _deterministic(dev):
        logits = torch.cat([model(v.to(dev))[0].cpu() for v in torch.split(ds.to_display(ds.data), 500)])
        b = synthetic_videos(num, torch.Generator().manual_seed(HELDOUT_SEED), split="test")
        outs = [model(v.to(dev)) for v in torch.split(b["videos"], 500)]
    motion = torch.cat([o[1].cpu() for o in outs]).double()
    kind = torch.cat([o[2].cpu() for o in outs]).argmax(1)
    mm = b["motion_mask"]
    return {
        "class_accuracy": float((logits.argmax(1) == ds.labels).double().mean()),
        "kind_accuracy": float((kind == b["kind"]).double().mean()),
        "coherence_accuracy": float(((kind == 0) == (b["kind"] == 0)).double().mean()),
        "motion_rmse": float((motion[mm] - b["motion"][mm].double()).square().mean().sqrt()),
        "num": num,
    }


def save_feature_net(model: VideoFeatureNet, path: str | Path = WEIGHTS_PATH, metadata: dict | None = None) -> Path:
    """Write the weights as safetensors (float32, CPU) with string ``metadata``, atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DiffusionLabError(f"cannot write {path}: directory {path.parent} does not exist")
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_safetensors_atomic(state, path, {k: str(v) for k, v in (metadata or {}).items()})
    return path


def read_metadata(path: str | Path = WEIGHTS_PATH) -> dict[str, str]:
    """The string metadata of a weights file (training settings and held-out figures)."""
    from diffusionlab.io import safetensors_metadata

    return safetensors_metadata(path)


def load_feature_net(device=None, path: str | Path | None = None) -> VideoFeatureNet:
    """The feature net in eval mode on ``device``, loaded with safetensors (never pickle); cached."""
    from diffusionlab.io import load_frozen

    return load_frozen(_NETS, VideoFeatureNet, WEIGHTS_PATH if path is None else path, _device(device),
                       "video feature weights", "run `python -m diffusionlab.metrics.video_digits --train`")


# ---- input checks -----------------------------------------------------------------------------------------
def check_videos(videos, name: str = "videos") -> torch.Tensor:
    """Validate display-space grey videos: float32 ``(N, 1, F, H, W)`` on their device, N >= 2, F >= 2,
    ``H == W >= 8``, finite, values in [0, 1] (a round-off of 1e-6 is clamped)."""
    if not torch.is_tensor(videos):
        try:
            arr = np.asarray(videos)
        except (TypeError, ValueError) as e:
            raise DiffusionLabError(f"{name} must be a tensor or array (N, 1, F, H, W), got "
                                    f"{type(videos).__name__}: {e}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DiffusionLabError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        videos = torch.from_numpy(np.ascontiguousarray(arr))
    if videos.is_complex() or videos.dtype == torch.bool:
        raise DiffusionLabError(f"{name} must hold real numbers, got dtype {videos.dtype}")
    shape = tuple(videos.shape)
    if len(shape) != 5:
        raise DiffusionLabError(f"{name} must have shape (N, 1, F, H, W) (rank 5), got rank {len(shape)} shape {shape}")
    n, c, f, h, w = shape
    if c != 1:
        raise DiffusionLabError(f"{name} must be grey (C = 1 in (N, C, F, H, W)), got C = {c}")
    if n < 2:
        raise DiffusionLabError(f"{name} needs at least 2 videos (a covariance needs 2; use >= 64), got N = {n}")
    if f < 2:
        raise DiffusionLabError(f"{name} needs at least 2 frames to have motion, got F = {f}")
    if h != w or h < DIGIT:
        raise DiffusionLabError(f"{name} frames must be square canvases of at least 8x8 (as moving_digits makes), "
                                f"got {h}x{w}")
    x = videos.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DiffusionLabError(f"{name} contains {bad} NaN or infinite values; only finite values in [0, 1] are "
                                "allowed")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise DiffusionLabError(f"{name} values must lie in [0, 1] (display space), got min {lo:.4g} and max "
                                f"{hi:.4g}; map model outputs to [0, 1] and clamp before evaluating")
    return x.clamp(0.0, 1.0).to(torch.float32)


# ---- per-video and per-frame measurements -----------------------------------------------------------------
@torch.no_grad()
def video_features(videos: torch.Tensor, device=None, batch: int = 512) -> np.ndarray:
    """The feature net's ``(N, 32)`` features (float64) of checked videos (:func:`check_videos`)."""
    dev = _device(device)
    net = load_feature_net(dev)
    with _deterministic(dev):
        return torch.cat([net.features(v.to(dev)).to("cpu", torch.float64) for v in torch.split(videos, batch)]).numpy()


@torch.no_grad()
def frame_measurements(videos: torch.Tensor, device=None, batch: int = 4096) -> dict[str, torch.Tensor]:
    """Per-frame measurements of checked videos ``(N, 1, F, S, S)``: the digit window (:func:`digit_windows`,
    centred), its ``ink``, the ``track`` ``(N, F, 2)`` (ink centre of mass in the window, float64; the window
    centre for an empty window), the classifier's ``pred``, ``conf`` ``(N, F)`` and ``crop_features``
    ``(N F, 32)`` on the crops, and the background ``(sum, count above BACKGROUND_LEVEL, pixels)`` per frame."""
    dev = _device(device)
    n, _, f, s, _ = videos.shape
    frames = videos.transpose(1, 2).reshape(n * f, 1, s, s).to(dev, torch.float64)
    r, c, ink = digit_windows(frames, centred=True)
    crops = crop_windows(frames, r, c)  # (M, 1, 8, 8) float64
    ar = torch.arange(DIGIT, dtype=torch.float64, device=dev)
    safe = ink.clamp_min(1e-12)
    com_r = (crops[:, 0].sum(2) * ar).sum(1) / safe
    com_c = (crops[:, 0].sum(1) * ar).sum(1) / safe
    empty = ink < EMPTY_INK
    half = (DIGIT - 1) / 2.0
    track = torch.stack([r + torch.where(empty, half, com_r), c + torch.where(empty, half, com_c)], 1)
    total = frames.sum((1, 2, 3))
    inside_bright = (crops > BACKGROUND_LEVEL).sum((1, 2, 3))
    bright = (frames > BACKGROUND_LEVEL).sum((1, 2, 3)) - inside_bright
    clf = load_classifier(dev)
    feats, probs = [], []
    with _deterministic(dev):
        for xb in torch.split(crops.to(torch.float32), batch):
            h = clf.features(xb)
            feats.append(h.to("cpu", torch.float64))
            probs.append(torch.softmax(clf.fc2(h).double(), 1).cpu())
    conf, pred = torch.cat(probs).max(1)
    cpu = lambda t: t.detach().to("cpu")  # noqa: E731
    return {"pred": pred.reshape(n, f), "conf": conf.reshape(n, f), "crop_features": torch.cat(feats).numpy(),
            "ink": cpu(ink).reshape(n, f), "track": cpu(track).reshape(n, f, 2),
            "background_sum": cpu(total - ink).reshape(n, f), "background_bright": cpu(bright).reshape(n, f).double(),
            "background_pixels": s * s - DIGIT * DIGIT}


def _mean_or_none(t: torch.Tensor):
    return None if t.numel() == 0 else float(t.double().mean())


def motion_statistics(track: torch.Tensor, speed: float = TRAIN_SPEED) -> dict[str, float | None]:
    """``speed``, ``straightness``, ``acceleration``, ``jump_fraction``, ``static_fraction`` of tracks
    ``(N, F, 2)`` (module docstring); ``speed`` is the data's px/frame (it sets the jump threshold)."""
    step = track[:, 1:] - track[:, :-1]
    length = step.norm(dim=-1)  # (N, F - 1)
    path = length.sum(1)
    moving = path > 1e-9
    net = (track[:, -1] - track[:, 0]).norm(dim=-1)
    acc = (track[:, 2:] - 2 * track[:, 1:-1] + track[:, :-2]).norm(dim=-1)
    radius = (track - track[:, :1]).norm(dim=-1).amax(1)
    return {"speed": float(length.mean()),
            "straightness": _mean_or_none(net[moving] / path[moving]),
            "acceleration": _mean_or_none(acc),
            "jump_fraction": float((length > speed + 2.0).double().mean()),
            "static_fraction": float((radius < STATIC_RADIUS).double().mean())}


def _consistency(pred: torch.Tensor, conf: torch.Tensor) -> dict[str, float]:
    n, f = pred.shape
    counts = F.one_hot(pred, NUM_CLASSES).sum(1)  # (N, 10)
    top, majority = counts.max(1)
    share = torch.bincount(majority, minlength=NUM_CLASSES).double() / n
    return {"digit_all_same": float((top == f).double().mean()), "digit_agreement": float(top.double().sum() / (n * f)),
            "digit_confidence": float(conf.double().mean()),
            "class_coverage": float((share >= COVERAGE_SHARE).double().mean())}


# ---- reference statistics ---------------------------------------------------------------------------------
def _check_speed(speed) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) or speed < 0:
        raise DiffusionLabError(f"speed must be a finite number >= 0 (px/frame of the real videos), got {speed!r}")
    return float(speed)


def _real_videos(num: int, frames: int, size: int, speed: float, split: str, seed: int) -> torch.Tensor:
    from diffusionlab.data.video import moving_digits

    ds = moving_digits(num=num, frames=frames, size=size, speed=speed, num_digits=1, split=split, seed=seed)
    return ds.to_display(ds.data)


def reference_statistics(frames: int = TRAIN_FRAMES, size: int = TRAIN_SIZE, speed: float = TRAIN_SPEED,
                         device=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Feature mean and covariance (float64) of the :data:`NUM_REFERENCE` held-out reference videos (``test``
    split, seed :data:`REFERENCE_SEED`) of this shape and speed: ``video`` (feature net) and ``crops`` (digit
    classifier on the frames' digit windows). Computed deterministically at first use, cached per device."""
    dev = _device(device)
    key = (str(WEIGHTS_PATH), frames, size, _check_speed(speed), str(dev))
    if key not in _REF:
        x = _real_videos(NUM_REFERENCE, frames, size, speed, "test", REFERENCE_SEED)
        _REF[key] = {"video": feature_statistics(video_features(x, dev)),
                     "crops": feature_statistics(frame_measurements(x, dev)["crop_features"])}
    return _REF[key]


def _figures(x: torch.Tensor, speed: float, dev: torch.device) -> dict[str, float | None]:
    n, _, f, s, _ = x.shape
    ref = reference_statistics(f, s, speed, dev)
    fm = frame_measurements(x, dev)
    crops = fm["crop_features"].reshape(n, f, -1)
    frame_fd = np.mean([frechet_distance(*feature_statistics(crops[:, k]), *ref["crops"]) for k in range(f)])
    out = {"fvd": frechet_distance(*feature_statistics(video_features(x, dev)), *ref["video"]),
           "frame_fd": float(frame_fd)}
    out.update(_consistency(fm["pred"], fm["conf"]))
    out["empty_frames"] = float((fm["ink"] < EMPTY_INK).double().mean())
    px = fm["background_pixels"]
    out["background_mean"] = float(fm["background_sum"].sum() / (n * f * px)) if px else None
    out["background_fraction"] = float(fm["background_bright"].sum() / (n * f * px)) if px else None
    out.update(motion_statistics(fm["track"], speed))
    return out


def _real_figures(n: int, frames: int, size: int, speed: float, dev: torch.device) -> dict[str, tuple]:
    key = (str(WEIGHTS_PATH), n, frames, size, speed, str(dev))
    if key not in _REAL:
        runs = [_figures(_real_videos(n, frames, size, speed, "train", REAL_SEED + k), speed, dev)
                for k in range(REAL_REPEATS)]
        stats = {}
        for name in runs[0]:
            vals = [r[name] for r in runs]
            if any(v is None for v in vals):
                stats[name] = (None, None)
            else:
                stats[name] = (float(np.mean(vals)), float(np.std(vals, ddof=1)))
        _REAL[key] = stats
    return _REAL[key]


def evaluate_videos(videos, speed: float = TRAIN_SPEED, device=None, real: bool = True) -> dict:
    """Score display-space moving-digit videos ``(N, 1, F, H, W)`` in [0, 1] (module docstring and
    docs/video_metric.md). ``speed``: the real videos' px/frame (reference sets and jump threshold).
    ``device``: where the networks run (default: the videos' device if a tensor, else CPU). ``real``: also
    compute each figure's real value at this N (:data:`REAL_REPEATS` train-split sets; ``False`` skips them).

    Returns a JSON-serialisable dict: each figure as ``{"value", "real", "real_sd"}`` (``None`` where undefined),
    plus ``num``, ``frames``, ``size``, ``data_speed``, ``calibrated`` and ``reference``."""
    x = check_videos(videos)
    if device is None and torch.is_tensor(videos):
        device = videos.device
    dev = _device(device)
    speed = _check_speed(speed)
    n, _, f, s, _ = x.shape
    values = _figures(x, speed, dev)
    ref = _real_figures(n, f, s, speed, dev) if real else {}
    out = {name: {"value": v, "real": ref.get(name, (None, None))[0], "real_sd": ref.get(name, (None, None))[1]}
           for name, v in values.items()}
    out.update({"num": int(n), "frames": int(f), "size": int(s), "data_speed": speed,
                "calibrated": (f, s, speed) == (TRAIN_FRAMES, TRAIN_SIZE, TRAIN_SPEED),
                "reference": f"FDs against {NUM_REFERENCE} held-out moving_digits videos (test split, seed "
                             f"{REFERENCE_SEED}); real = mean and sd over {REAL_REPEATS if real else 0} sets of "
                             f"{n} train-split videos (seeds {REAL_SEED}..)"})
    return out


# ---- calibration ------------------------------------------------------------------------------------------
def calibration_cases(n: int = 64, seed: int = 0, frames: int = TRAIN_FRAMES, size: int = TRAIN_SIZE,
                      speed: float = TRAIN_SPEED) -> dict[str, torch.Tensor]:
    """The video sets of the calibration table (docs/video_metric.md), ``n`` videos each, made from held-out
    ``test``-split videos (seeds disjoint from the reference's), except the "perfect model" sets: ``train``-split
    videos, as a model of the training data makes them, and those with pixel noise or blur added."""
    _check_int("n", n, 2)
    gen = torch.Generator().manual_seed(1000 + seed)
    base = 50000 + 10 * seed
    real = _real_videos(n, frames, size, speed, "test", base)
    pool = _real_videos(8 * n, frames, size, speed, "test", base + 1)
    from diffusionlab.data.video import moving_digits

    pool_labels = moving_digits(num=8 * n, frames=frames, size=size, speed=speed, split="test", seed=base + 1).labels
    real_labels = moving_digits(num=n, frames=frames, size=size, speed=speed, split="test", seed=base).labels
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(frames)], 1)  # (n, F)
    shuffled = real[perm, :, torch.arange(frames)[None, :]].permute(0, 2, 1, 3, 4)
    glyphs, _, _ = _glyphs("test")
    gi = torch.randint(0, glyphs.shape[0], (n,), generator=gen)
    jump_pos = torch.randint(0, size - DIGIT + 1, (n, frames, 2), generator=gen)
    jumping = render_videos(glyphs[gi][:, None].expand(n, frames, DIGIT, DIGIT), jump_pos, size)
    indep = torch.empty_like(real)
    for i in range(n):
        same = torch.nonzero(pool_labels == real_labels[i])[:, 0]
        pick = same[torch.randperm(len(same), generator=gen)[:frames] % len(same)]  # distinct videos while they last
        pick = pick.repeat(-(-frames // len(pick)))[:frames]
        indep[i, :, :] = pool[pick, :, torch.arange(frames)].permute(1, 0, 2, 3)
    train = _real_videos(n, frames, size, speed, "train", base + 2)
    blurred = _blur(train.transpose(1, 2).reshape(n * frames, 1, size, size)).reshape(n, frames, 1, size, size)
    return {
        "real held-out (test digits, other seed)": real,
        "real train-split videos (a perfect model)": train,
        "independent frames (same class, other videos)": indep,
        "frames shuffled across videos": shuffled,
        "static (first frame repeated)": real[:, :, :1].expand_as(real).clone(),
        "jumping (position resampled every frame)": jumping,
        "perfect model + N(0, 0.1^2) pixel noise, clipped":
            (train + 0.1 * torch.randn(train.shape, generator=gen)).clamp(0, 1),
        "perfect model, frames blurred (Gaussian, sigma = 1 px)": blurred.transpose(1, 2).contiguous(),
        "uniform noise U[0, 1]": torch.rand(real.shape, generator=gen),
        "Gaussian N(0.5, 0.5^2), clipped": (0.5 + 0.5 * torch.randn(real.shape, generator=gen)).clamp(0, 1),
    }


TABLE_COLUMNS = ("fvd", "frame_fd", "digit_all_same", "digit_agreement", "background_mean", "speed",
                 "straightness", "acceleration", "jump_fraction", "static_fraction")


def calibration_table(n: int = 64, seeds: int = 10, device=None) -> dict[str, dict[str, list[float]]]:
    """Every :data:`TABLE_COLUMNS` figure of every :func:`calibration_cases` set, over ``seeds`` seeds:
    ``{case: {figure: [value per seed]}}``."""
    table: dict[str, dict[str, list]] = {}
    for seed in range(seeds):
        for name, x in calibration_cases(n, seed).items():
            m = evaluate_videos(x, device=device, real=False)
            row = table.setdefault(name, {c: [] for c in TABLE_COLUMNS})
            for c in TABLE_COLUMNS:
                row[c].append(m[c]["value"])
    return table


def _cell(vals: list) -> str:
    if any(v is None for v in vals):
        return "--"
    a = np.asarray(vals, dtype=np.float64)
    fmt = ".2f" if np.abs(a).max() >= 10 else ".3f"
    return f"{a.mean():{fmt}}" if len(a) == 1 else f"{a.mean():{fmt}} ± {a.std(ddof=1):{fmt}}"


def format_table(table: dict, n: int) -> str:
    lines = ["| videos | N | " + " | ".join(TABLE_COLUMNS) + " |", "|---|---:|" + "---:|" * len(TABLE_COLUMNS)]
    for name, row in table.items():
        lines.append(f"| {name} | {n} | " + " | ".join(_cell(row[c]) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m diffusionlab.metrics.video_digits",
        description="The shipped moving-digits video feature net: print its held-out figures and the calibration "
                    "table (docs/video_metric.md), or --train it.")
    p.add_argument("--train", action="store_true", help="retrain (seeded, one CPU thread) and rewrite the weights")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--out", default=str(WEIGHTS_PATH), help="weights file to write (default: the shipped one)")
    p.add_argument("--num", type=int, default=64, help="videos per set in the calibration table (default 64)")
    p.add_argument("--seeds", type=int, default=10, help="seeds of the calibration table (default 10)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    args = p.parse_args(argv)
    try:
        if args.train:
            t0 = time.perf_counter()
            model = train_feature_net(args.seed, args.steps, args.batch_size, args.device, verbose=True)
            seconds = time.perf_counter() - t0
            held = heldout_figures(model)
            meta = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
                    "train_seconds": f"{seconds:.0f}", "torch_version": torch.__version__,
                    "device": str(_device(args.device)), "parameters": sum(q.numel() for q in model.parameters()),
                    "data": f"synthetic moving digits, train split (first 1500 of sklearn load_digits), "
                            f"{TRAIN_FRAMES} frames of {TRAIN_SIZE}x{TRAIN_SIZE}",
                    **{f"heldout_{k}": (f"{v:.4f}" if isinstance(v, float) else v) for k, v in held.items()}}
            path = save_feature_net(model, args.out, meta)
            _NETS.clear()
            _REF.clear()
            _REAL.clear()
            print(f"wrote {path} ({seconds:.0f} s): " + json.dumps(held))
            return 0
        meta = read_metadata() if WEIGHTS_PATH.is_file() else {}
        held = heldout_figures(None, device=args.device)
        print(f"shipped net {WEIGHTS_PATH.name} (seed {meta.get('seed')}, {meta.get('steps')} steps): "
              + json.dumps(held))
        table = calibration_table(args.num, args.seeds, args.device)
        print(json.dumps(table) if args.json else format_table(table, args.num))
        return 0
    except DiffusionLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
