"""A sample-quality metric for 8x8 digits that needs no download (docs/digits_metric.md).

A tiny CNN, trained deterministically on scikit-learn's bundled digits (``sklearn.datasets.load_digits``:
1797 images of 8x8 pixels, values 0..16, scaled here by 1/16 to [0, 1]), ships with the package as
``digits_classifier.safetensors``. Split (shared with the data loader): the first 1500 images are ``train``,
the last 297 are the held-out ``test`` set; the classifier was trained on ``train`` only.

:func:`evaluate_digits` scores a batch of samples with

- ``fd`` -- Frechet distance between Gaussians fitted to the classifier's penultimate-layer features
  (``FEATURE_DIM`` = 32 after the ReLU) of the samples and of a reference set (default: the 297 held-out
  ``test`` digits, which neither the classifier nor a model trained on ``train`` has seen);
- ``class_coverage`` -- fraction of the 10 classes predicted for at least ``COVERAGE_SHARE`` (= 1/10 of the
  uniform share 1/10, i.e. 1 %) of the samples;
- ``class_entropy`` -- entropy of the predicted-class histogram divided by ``log 10`` (1 = uniform);
- ``confidence`` -- mean max softmax probability;
- ``class_histogram`` (10 fractions) and ``num``.

``python -m diffusionlab.metrics.digits --retrain`` retrains the weights (seeded) and rewrites the file;
without ``--retrain`` it prints the shipped classifier's test accuracy and the reference table of the docs.
"""

from __future__ import annotations

import argparse
import contextlib
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
from diffusionlab.metrics.frechet import feature_statistics, frechet_distance

NUM_IMAGES = 1797
NUM_TEST = 297  #: the last 297 images are the held-out test split
NUM_TRAIN = NUM_IMAGES - NUM_TEST  #: the first 1500 are the training split
NUM_CLASSES = 10
FEATURE_DIM = 32  #: width of the penultimate (feature) layer
COVERAGE_SHARE = 0.1 / NUM_CLASSES  #: a class is "covered" when predicted for >= 1 % of the samples
STATED_TEST_ACCURACY = 0.97  #: floor guaranteed (and tested) for the shipped weights on the 297 test images
WEIGHTS_PATH = Path(__file__).with_name("digits_classifier.safetensors")
REFERENCES = ("test", "train", "all")
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 40
DROPOUT = 0.3  #: on the flattened conv features, training only
LABEL_SMOOTHING = 0.1
_RANGE_TOL = 1e-6  #: samples may exceed [0, 1] by this much (float round-off), no more

_CLASSIFIERS: dict[tuple[str, str], "DigitsClassifier"] = {}
_REF_STATS: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}


# ---- data -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    if x.shape[0] != NUM_IMAGES:
        raise RuntimeError(f"sklearn's digits changed: expected {NUM_IMAGES} images, got {x.shape[0]}")
    return x, y


def load_digits_split(split: str = "test", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 8, 8)`` float32 in [0, 1] and labels ``(N,)`` int64 of one split of sklearn's digits.

    ``split``: ``"train"`` (first 1500), ``"test"`` (last 297) or ``"all"`` (1797).
    """
    if split not in REFERENCES:
        raise DiffusionLabError(f"digits split must be one of {list(REFERENCES)}, got {split!r}")
    x, y = _all_digits()
    sl = {"train": slice(0, NUM_TRAIN), "test": slice(NUM_TRAIN, NUM_IMAGES), "all": slice(0, NUM_IMAGES)}[split]
    dev = _device(device)
    return x[sl].clone().to(dev), y[sl].clone().to(dev)


# ---- the classifier -------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """conv3x3(1->16) -> conv3x3(16->32) -> maxpool -> conv3x3(32->64) -> maxpool -> fc(256->32) -> fc(32->10).

    ReLU after every layer but the last; dropout (``DROPOUT``, training only) on the 256 conv features;
    :meth:`features` is the 32-wide penultimate activation (after its ReLU).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        h = F.dropout(h.flatten(1), DROPOUT, self.training)
        return F.relu(self.fc1(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


_USABLE_DEVICES: set[str] = set()


def _device(device) -> torch.device:
    """``device`` as a torch.device (None -> CPU), checked once to be usable on this machine."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DiffusionLabError(f"device must be a torch device or a string like 'cpu' or 'cuda:0', got {device!r}: {e}") from None
    if str(dev) not in _USABLE_DEVICES:
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise DiffusionLabError(f"device {str(dev)!r} is not available on this machine: {e}") from None
        _USABLE_DEVICES.add(str(dev))
    return dev


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine jitter plus pixel noise, per image: rotation U(-10, 10) degrees, scale 1 + U(-0.1, 0.1),
    shear U(-0.15, 0.15), shift U(-1, 1) pixel on each axis (bilinear, zero fill), then Gaussian noise of
    std U(0, 0.05), clamped to [0, 1].

    All randomness is drawn on the CPU from ``gen`` so the stream does not depend on the device.
    """
    b = x.shape[0]
    theta = (2 * torch.rand(b, generator=gen) - 1) * (10.0 * math.pi / 180.0)
    scale = 1 + 0.1 * (2 * torch.rand(b, generator=gen) - 1)
    shift = (2 * torch.rand(b, 2, generator=gen) - 1) * (2.0 / 8.0)  # 1 pixel in [-1, 1] grid units
    shear = 0.15 * (2 * torch.rand(b, generator=gen) - 1)
    noise_std = 0.05 * torch.rand(b, 1, 1, 1, generator=gen)
    noise = torch.randn(b, 1, 8, 8, generator=gen)
    c, s = torch.cos(theta) / scale, torch.sin(theta) / scale
    affine = torch.stack(
        [torch.stack([c, shear - s, shift[:, 0]], 1), torch.stack([s, c, shift[:, 1]], 1)], 1
    ).to(x.device, x.dtype)
    grid = F.affine_grid(affine, [b, 1, 8, 8], align_corners=False)
    xs = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (xs + (noise_std * noise).to(x.device, x.dtype)).clamp(0.0, 1.0)


@contextlib.contextmanager
def _deterministic(dev: torch.device):
    """On CPU one intra-op thread (CPU kernels are then deterministic, whatever the machine's core count);
    elsewhere torch's deterministic algorithms and deterministic, non-benchmarked cuDNN. Restored afterwards.

    (``use_deterministic_algorithms`` is not needed on CPU and costs seconds of imports there.)
    """
    if dev.type == "cpu":
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(prev_threads)
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[1], prev[2]


def train_classifier(
    seed: int = DEFAULT_SEED, epochs: int = DEFAULT_EPOCHS, device=None, batch_size: int = 64, verbose: bool = False
) -> DigitsClassifier:
    """Train the classifier on the 1500 ``train`` digits, deterministically for a given seed, device and torch build.

    AdamW (weight decay 1e-4) with a one-cycle learning rate peaking at 3e-3, ``epochs`` passes over
    shuffled batches of ``batch_size``, each batch augmented by :func:`_augment`, cross-entropy with label
    smoothing ``LABEL_SMOOTHING``. On CPU one thread, elsewhere deterministic kernels (:func:`_deterministic`);
    the global RNG state, thread count and determinism flags are restored afterwards. Bit-identical
    weights for the same seed, epochs, batch size, device type and torch build.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DiffusionLabError(f"seed must be an int, got {seed!r}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise DiffusionLabError(f"epochs must be an int >= 1, got {epochs!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DiffusionLabError(f"batch_size must be an int >= 1, got {batch_size!r}")
    dev = _device(device)
    x, y = load_digits_split("train", dev)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), _deterministic(dev):
        torch.manual_seed(seed)
        model = DigitsClassifier()
        model.to(dev).train()
        steps_per_epoch = math.ceil(x.shape[0] / batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
        for epoch in range(epochs):
            perm = torch.randperm(x.shape[0], generator=gen).to(dev)
            total = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                xb = _augment(x[idx], gen)
                loss = F.cross_entropy(model(xb), y[idx], label_smoothing=LABEL_SMOOTHING)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * idx.shape[0]
            if verbose:
                print(f"epoch {epoch + 1:3d}/{epochs}  train loss {total / x.shape[0]:.4f}", file=sys.stderr)
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier | None = None, split: str = "test", device=None) -> float:
    """Accuracy of ``model`` (default: the shipped classifier) on a digits split."""
    dev = _device(device) if model is None else next(model.parameters()).device
    if model is None:
        model = load_classifier(device=dev)
    x, y = load_digits_split(split, dev)
    return float((model(x).argmax(1) == y).double().mean())


def save_classifier(model: DigitsClassifier, path: str | Path = WEIGHTS_PATH, metadata: dict | None = None) -> Path:
    """Write the weights as safetensors (float32, CPU) with string ``metadata``."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    save_file(state, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def read_metadata(path: str | Path = WEIGHTS_PATH) -> dict[str, str]:
    """The string metadata stored in a classifier file (seed, epochs, test accuracy, torch version)."""
    from diffusionlab.io import safetensors_metadata

    return safetensors_metadata(path)


def load_classifier(device=None, path: str | Path | None = None) -> DigitsClassifier:
    """The classifier in eval mode on ``device``, loaded with safetensors (never pickle); cached per (path, device)."""
    from diffusionlab.io import load_frozen

    return load_frozen(_CLASSIFIERS, DigitsClassifier, WEIGHTS_PATH if path is None else path, _device(device), "classifier weights",
                       "run `python -m diffusionlab.metrics.digits --retrain`")


# ---- the metric -----------------------------------------------------------------------------------------
def _check_samples(samples, name: str = "samples") -> torch.Tensor:
    """Validate and reshape to float32 ``(N, 1, 8, 8)``; accepts (N, 1, 8, 8), (N, 8, 8) or (N, 64)."""
    if not torch.is_tensor(samples):
        try:
            arr = np.asarray(samples)
        except (TypeError, ValueError) as e:
            raise DiffusionLabError(f"{name} must be a tensor or array of shape (N, 1, 8, 8), got {type(samples).__name__}: {e}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DiffusionLabError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        samples = torch.from_numpy(np.ascontiguousarray(arr))
    if samples.is_complex() or samples.dtype == torch.bool:
        raise DiffusionLabError(f"{name} must hold real numbers, got dtype {samples.dtype}")
    shape = tuple(samples.shape)
    if len(shape) == 4 and shape[1:] == (1, 8, 8):
        x = samples
    elif len(shape) == 3 and shape[1:] == (8, 8):
        x = samples.unsqueeze(1)
    elif len(shape) == 2 and shape[1] == 64:
        x = samples.reshape(-1, 1, 8, 8)
    else:
        raise DiffusionLabError(f"{name} must have shape (N, 1, 8, 8), (N, 8, 8) or (N, 64), got {shape}")
    n = x.shape[0]
    if n < 2:
        raise DiffusionLabError(f"{name} needs at least 2 images (a covariance needs 2; use >= 1000 to compare), got N={n}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DiffusionLabError(f"{name} contains {bad} NaN or infinite values; only finite values in [0, 1] are allowed")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise DiffusionLabError(
            f"{name} values must lie in [0, 1] (pixel/16 scale), got min {lo:.4g} and max {hi:.4g}; "
            "map model outputs to [0, 1] and clamp before evaluating"
        )
    return x.clamp(0.0, 1.0).to(torch.float32)


@torch.no_grad()
def _forward(model: DigitsClassifier, x: torch.Tensor, dev: torch.device, batch: int = 4096):
    feats, probs = [], []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].to(dev)
        f = model.features(xb)
        feats.append(f.to("cpu", torch.float64))
        probs.append(torch.softmax(model.fc2(f).double(), dim=1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs)


def predict_digits(samples, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped classifier's ``(predicted class, max probability)`` of 8x8 digit samples in [0, 1] (``(N,)``
    int64 and float64, on the CPU)."""
    x = _check_samples(samples)
    dev = _device(device)
    _, probs = _forward(load_classifier(dev), x, dev)
    conf, pred = probs.max(1)
    return pred, conf


def reference_statistics(reference: str = "test", device=None) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance (float64) of a reference split of the real digits; cached per device."""
    if not isinstance(reference, str) or reference not in REFERENCES:
        raise DiffusionLabError(f"reference must be one of {list(REFERENCES)} or an array of images, got {reference!r}")
    dev = _device(device)
    key = (str(WEIGHTS_PATH), reference, str(dev))
    if key not in _REF_STATS:
        x, _ = load_digits_split(reference, "cpu")
        feats, _ = _forward(load_classifier(dev), x, dev)
        _REF_STATS[key] = feature_statistics(feats)
    return _REF_STATS[key]


def evaluate_digits(samples, reference="test", device=None) -> dict:
    """Score 8x8 digit samples in [0, 1]; see the module docstring and docs/digits_metric.md.

    ``samples``: tensor or array ``(N, 1, 8, 8)``, ``(N, 8, 8)`` or ``(N, 64)``, values in [0, 1], N >= 2
    (FD is biased upward for small N: use N >= 1000 when comparing models, and the same N for all of them).
    ``reference``: ``"test"`` (the 297 held-out digits, default), ``"train"`` (the 1500 training digits),
    ``"all"``, or an array of real images in the same format. ``device``: where the classifier runs
    (default: the samples' device if a tensor, else CPU).

    Returns JSON-serialisable ``{"fd", "class_coverage", "class_entropy", "confidence",
    "class_histogram", "num"}``.
    """
    x = _check_samples(samples)
    if device is None and torch.is_tensor(samples):
        device = samples.device
    dev = _device(device)
    model = load_classifier(dev)
    feats, probs = _forward(model, x, dev)
    if isinstance(reference, str):
        mu_r, s_r = reference_statistics(reference, dev)
    elif torch.is_tensor(reference) or isinstance(reference, np.ndarray):
        mu_r, s_r = feature_statistics(_forward(model, _check_samples(reference, "reference"), dev)[0])
    else:
        raise DiffusionLabError(f"reference must be one of {list(REFERENCES)} or an array of images, got {type(reference).__name__}")
    mu, s = feature_statistics(feats)
    fd = frechet_distance(mu, s, mu_r, s_r)
    n = x.shape[0]
    counts = torch.bincount(probs.argmax(1), minlength=NUM_CLASSES).double()
    hist = counts / n
    nz = hist[hist > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(NUM_CLASSES))
    return {
        "fd": float(fd),
        "class_coverage": float((hist >= COVERAGE_SHARE).double().mean()),
        "class_entropy": min(max(entropy, 0.0), 1.0) + 0.0,  # + 0.0 turns -0.0 into 0.0
        "confidence": float(probs.max(1).values.mean()),
        "class_histogram": [float(h) for h in hist],
        "num": int(n),
    }


# ---- reference table ------------------------------------------------------------------------------------
def _blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur with std ``sigma`` pixels (5x5 normalised kernel, zero padding)."""
    r = torch.arange(-2, 3, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (r / sigma) ** 2)
    k1 = k1 / k1.sum()
    k = (k1[:, None] * k1[None, :]).to(x.dtype).reshape(1, 1, 5, 5)
    return F.conv2d(x, k, padding=2).clamp(0.0, 1.0)


def baseline_cases(n: int = NUM_TRAIN, seed: int = 0) -> dict[str, torch.Tensor]:
    """The sample sets of the reference table (docs/digits_metric.md), each of ``n`` images (n <= 1500).

    Real and blurred sets come from the ``train`` split, so they are disjoint from the default ``test``
    reference.
    """
    if not isinstance(n, int) or not 2 <= n <= NUM_TRAIN:
        raise DiffusionLabError(f"n must be an int in [2, {NUM_TRAIN}], got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr = load_digits_split("train", "cpu")
    real = xtr[:n]
    one = xtr[int(torch.nonzero(ytr == 3)[0])]  # the first training "3"
    return {
        "real (train digits)": real,
        "uniform noise U[0,1]": torch.rand(n, 1, 8, 8, generator=gen),
        "Gaussian N(0.5, 0.5^2) clipped": (0.5 + 0.5 * torch.randn(n, 1, 8, 8, generator=gen)).clamp(0, 1),
        "collapsed (one '3' repeated)": one.expand(n, 1, 8, 8).clone(),
        "blurred real (Gaussian, sigma=1 px)": _blur(real, 1.0),
        "real + N(0, 0.1^2) noise, clipped": (real + 0.1 * torch.randn(n, 1, 8, 8, generator=gen)).clamp(0, 1),
    }


def baseline_table(n: int = NUM_TRAIN, reference: str = "test", device=None, seed: int = 0) -> dict[str, dict]:
    """:func:`evaluate_digits` of every :func:`baseline_cases` set against ``reference``."""
    return {name: evaluate_digits(x, reference=reference, device=device) for name, x in baseline_cases(n, seed).items()}


def _format_table(table: dict[str, dict]) -> str:
    lines = [
        "| samples | N | fd | class_coverage | class_entropy | confidence |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in table.items():
        lines.append(
            f"| {name} | {m['num']} | {m['fd']:.3f} | {m['class_coverage']:.2f} | {m['class_entropy']:.3f} | {m['confidence']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m diffusionlab.metrics.digits",
        description="The shipped 8x8-digits classifier: print its test accuracy and the reference metric table, or --retrain it.",
    )
    p.add_argument("--retrain", action="store_true", help="retrain (seeded) and rewrite the weights file")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=str(WEIGHTS_PATH), help="weights file to write (default: the shipped one)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    args = p.parse_args(argv)
    try:
        if args.retrain:
            t0 = time.perf_counter()
            model = train_classifier(
                seed=args.seed, epochs=args.epochs, device=args.device, batch_size=args.batch_size, verbose=True
            )
            acc = classifier_accuracy(model, "test")
            train_acc = classifier_accuracy(model, "train")
            if acc < STATED_TEST_ACCURACY:
                print(f"warning: test accuracy {acc:.4f} is below the stated {STATED_TEST_ACCURACY}", file=sys.stderr)
            meta = {
                "seed": args.seed,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "test_accuracy": f"{acc:.6f}",
                "train_accuracy": f"{train_acc:.6f}",
                "torch_version": torch.__version__,
                "device": str(_device(args.device)),
                "split": f"train=first {NUM_TRAIN}, test=last {NUM_TEST} of sklearn load_digits, pixels/16",
            }
            path = save_classifier(model, args.out, meta)
            _CLASSIFIERS.clear()
            _REF_STATS.clear()
            print(f"wrote {path}: test accuracy {acc:.4f}, train accuracy {train_acc:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)")
            return 0
        acc = classifier_accuracy(None, "test", args.device)
        print(f"shipped classifier {WEIGHTS_PATH.name}: test accuracy {acc:.4f} ({round(acc * NUM_TEST)}/{NUM_TEST})")
        table = baseline_table(device=args.device)
        print(json.dumps(table, indent=1) if args.json else _format_table(table))
        return 0
    except DiffusionLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
