"""The FID Inception-v3 of torch-fidelity as a feature extractor, weights from a local file (extra ``metrics``).

FID, KID and precision/recall figures are comparable with published ones only in the features of one network:
the Inception-v3 graph of the original TensorFlow FID code (Heusel et al. 2017; the 2015-12-05 ImageNet
checkpoint), ported to PyTorch by pytorch-fid and torch-fidelity. This module builds torch-fidelity's port,
``torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3`` (its layers, its TensorFlow-1.x-exact
bilinear resize of the input to 299 x 299, its ``(x - 128) / 128`` normalisation) and returns its 2048-d pool
features; it needs no torchvision op (torchvision is only imported by torch-fidelity's package, see
:mod:`diffusionlab.interop.optional`).

The weights come from a file the user gives (``--inception PATH``); nothing is ever downloaded. The standard file
is ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` is the same file, same name suffix -- torch hub names a file by the
first 8 hex digits of its SHA-256). It is a pickled state dict: it is read with ``torch.load(weights_only=True)``
(:func:`diffusionlab.io.load_weights`, which refuses anything but plain tensors); a
``.safetensors`` copy works too. torch-fidelity's constructor loads weights only from a path or file object (with
a full unpickler), so the tensors read safely here are handed to it re-serialised in memory: the user's file is
never unpickled with code allowed.

``identity`` (the cache key of reference statistics) is ``torch-fidelity-inception-v3-2048:<sha256 of the file>``;
``standard`` says whether that SHA-256 is :data:`STANDARD_SHA256`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from torch import nn

from diffusionlab.errors import DiffusionLabError

STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: SHA-256 of the standard file as a public record gives it; its first 8 hex digits are the ``6726825d`` of its name
STANDARD_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURES = "2048"
IDENTITY_PREFIX = "torch-fidelity-inception-v3-2048"
RESIZE = ("torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x to 299 x 299 (align_corners=False), "
          "the resize of the original TensorFlow FID graph")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _missing(path: Path) -> DiffusionLabError:
    return DiffusionLabError(
        f"Inception weights file not found: {path} (give --inception PATH to a local copy of the FID Inception "
        f"weights, {STANDARD_FILE}; nothing is downloaded)")


class InceptionFeatures(nn.Module):
    """``(B, 3, H, W)`` uint8 images -> ``(B, 2048)`` float32 pool features of the FID Inception-v3 (module
    docstring); a feature extractor for :mod:`diffusionlab.metrics.standard`."""

    def __init__(self, extractor: nn.Module, sha256: str, path: str):
        super().__init__()
        self.extractor = extractor
        self.sha256 = sha256
        self.path = path
        self.identity = f"{IDENTITY_PREFIX}:{sha256}"
        self.standard = sha256 == STANDARD_SHA256

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.extractor(images)
        return features

    def describe(self) -> dict:
        """What the JSON reports say about the extractor."""
        return {"extractor": IDENTITY_PREFIX, "weights": self.path, "weights_sha256": self.sha256,
                "standard_weights": self.standard, "resize": RESIZE,
                "input": "uint8 RGB (grey images replicated to 3 channels)"}


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception-v3 feature extractor with the weights in ``path`` (``.pth``/``.pt`` read weights-only,
    or ``.safetensors``), on ``device``. A missing file, a file that is not plain weights, or weights of another
    network are each one :class:`DiffusionLabError`."""
    from diffusionlab.interop.optional import import_optional
    from diffusionlab.io import load_weights

    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing(path)
    state = load_weights(path)
    import_optional("torch_fidelity", "metrics", "the FID Inception network")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buf = io.BytesIO()
    torch.save(state, buf)  # plain tensors, just read weights-only: safe to hand to torch-fidelity's loader
    buf.seek(0)
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURES], feature_extractor_weights_path=buf)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DiffusionLabError(
            f"{path} does not hold the FID Inception-v3 weights ({first[:200]}); expected {STANDARD_FILE}") from None
    return InceptionFeatures(net, file_sha256(path), str(path)).to(device)
