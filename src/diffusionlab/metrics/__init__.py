"""Sample-quality metrics that need no download.

- :mod:`diffusionlab.metrics.frechet` -- Frechet distance between Gaussians fitted to feature sets (float64);
- :mod:`diffusionlab.metrics.digits` -- :func:`evaluate_digits` for 8x8 digits, using a tiny CNN shipped as
  safetensors and trained on scikit-learn's bundled digits (docs/digits_metric.md);
- :mod:`diffusionlab.metrics.standard` -- FID, KID and precision/recall on the features of any extractor (the
  FID Inception network: :mod:`diffusionlab.interop.inception`, weights from a local file; docs/metrics.md);
- :mod:`diffusionlab.metrics.video_digits` -- :func:`evaluate_videos` for moving-digit videos, using a small
  space-time CNN shipped as safetensors and trained on synthetic moving digits (docs/video_metric.md).

Names are imported lazily, so ``python -m diffusionlab.metrics.digits`` (or ``.video_digits``) runs the module
only once.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "frechet": ("feature_statistics", "frechet_distance", "frechet_distance_features"),
    "standard": ("extract_features", "fid_from_features", "image_scores", "kid", "mmd2_unbiased", "precision_recall",
                 "to_uint8_rgb"),
    "digits": (
        "COVERAGE_SHARE",
        "FEATURE_DIM",
        "NUM_TEST",
        "NUM_TRAIN",
        "STATED_TEST_ACCURACY",
        "DigitsClassifier",
        "classifier_accuracy",
        "evaluate_digits",
        "load_classifier",
        "load_digits_split",
        "reference_statistics",
        "train_classifier",
    ),
    "video_digits": ("VideoFeatureNet", "evaluate_videos", "load_feature_net", "train_feature_net"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"diffusionlab.metrics.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'diffusionlab.metrics' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
