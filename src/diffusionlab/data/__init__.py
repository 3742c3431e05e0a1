"""Datasets behind one interface: :func:`load_dataset` returns an :class:`ArrayDataset` in model space.

``cfg = {"name": <one of DATASETS>, **options}``; an unknown option is a :class:`DiffusionLabError` listing
the allowed ones. :mod:`diffusionlab.data.scaling` is the one map between display ``[0, 1]`` and model
``[-1, 1]`` space.

=============== =================================================== ==========
name            options (defaults)                                  kind
=============== =================================================== ==========
ring            num=20000, K=8, radius=1.0, std=0.05                points
moons           num=20000, noise=0.05                               points
swissroll       num=20000, noise=0.05                               points
checkerboard    num=20000                                           points
digits          split=all (all | train | test: the last 297)        images
image_folder    path, image_size=32, channels=3 (1 | 3)             images
mnist           path, split=train (train | test)                    images
cifar10         path (the binary version), split=train              images
array           path (.npy/.npz), key, range (unit|model|raw),      points / images / videos
                labels (an .npz member)
=============== =================================================== ==========

The 2-D sets are generated from ``seed``; the others ignore it.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

from diffusionlab.data import images, toy2d, video
from diffusionlab.data.arrays import ArrayDataset, load_array
from diffusionlab.data.images import DIGITS_TEST_SIZE, digits_split
from diffusionlab.data.scaling import from_uint8, to_model, to_uint8, to_unit
from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import check_keys

_LOADERS: dict[str, Callable[..., ArrayDataset]] = {
    "ring": toy2d.ring,
    "moons": toy2d.moons,
    "swissroll": toy2d.swissroll,
    "checkerboard": toy2d.checkerboard,
    "digits": images.digits,
    "image_folder": images.image_folder,
    "mnist": images.mnist,
    "cifar10": images.cifar10,
    "array": load_array,
    **video.VIDEO_LOADERS,  # moving_digits, moving_mnist, video_folder
}
DATASETS = tuple(_LOADERS)


def dataset_options(name: str) -> tuple[str, ...]:
    """The options dataset ``name`` accepts (besides ``name``)."""
    if name not in _LOADERS:
        raise DiffusionLabError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return tuple(p for p in inspect.signature(_LOADERS[name]).parameters if p != "seed")


def _required(name: str) -> tuple[str, ...]:
    params = inspect.signature(_LOADERS[name]).parameters.values()
    return tuple(p.name for p in params if p.default is inspect.Parameter.empty)


def load_dataset(cfg: Mapping | str, seed: int = 0) -> ArrayDataset:
    """Load the dataset ``cfg`` describes (a mapping with ``name``, or just the name)."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    if not isinstance(cfg, Mapping):
        raise DiffusionLabError(f"dataset config must be a mapping with a 'name', got {cfg!r}")
    opts = dict(cfg)
    name = opts.pop("name", None)
    allowed = dataset_options(name)
    check_keys(opts, allowed, f"dataset {name!r}")
    missing = [k for k in _required(name) if k not in opts]
    if missing:
        raise DiffusionLabError(f"dataset {name!r} needs option(s) {', '.join(missing)}")
    if "seed" in inspect.signature(_LOADERS[name]).parameters:
        opts["seed"] = seed
    return _LOADERS[name](**opts)


__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DIGITS_TEST_SIZE",
    "dataset_options",
    "digits_split",
    "from_uint8",
    "load_array",
    "load_dataset",
    "to_model",
    "to_uint8",
    "to_unit",
]
