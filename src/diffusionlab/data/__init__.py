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
image_folder    path, image_size=32, channels=3 (1 | 3),            images
                bad_files=error (error | skip)
mnist           path, split=train (train | test)                    images
cifar10         path (the binary version), split=train              images
array           path (.npy/.npz), key, range (unit|model|raw),      points / images / videos
                labels (an .npz member)
=============== =================================================== ==========

The 2-D sets are generated from ``seed``; the others ignore it. Every section also takes the loading keys of
:func:`diffusionlab.data.stream.loading_options` (``stream``, ``workers``, ``prefetch``, ``flip``), which say how
training reads the set (:func:`split_loading` separates them); the file formats (folders, CIFAR-10, MNIST,
Moving MNIST) can be streamed through a ``DataLoader`` (:func:`open_source`).
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

from diffusionlab.data import images, toy2d, video
from diffusionlab.data.arrays import ArrayDataset, load_array
from diffusionlab.data.images import DIGITS_TEST_SIZE, digits_split
from diffusionlab.data.scaling import from_uint8, to_model, to_uint8, to_unit
from diffusionlab.configuration import Catalogue
from diffusionlab.errors import DiffusionLabError

#: the dataset catalogue: a ``data:`` section is ``{"name": N, **options}`` with the options of loader ``N``
DATASETS = Catalogue("dataset", "data")


def _register(name: str, loader: Callable[..., ArrayDataset], kind: str | None, heldout=None, source=None) -> None:
    """Register ``loader`` (its keyword options and defaults are the section's); ``kind`` (points, images, videos;
    None when it depends on the file) picks the default network; ``heldout(options, seed)`` gives ``(options,
    seed, description)`` of the held-out data, when the dataset has a held-out part; ``source`` (the same options)
    reads the set sample by sample for streaming (:mod:`diffusionlab.data.sources`)."""
    takes_seed = "seed" in inspect.signature(loader).parameters
    DATASETS.register(name, context=("seed",) if takes_seed else (), kind=kind, heldout=heldout,
                      source=source)(loader)


def _fresh_draw(opts: dict, seed: int):
    return opts, seed + 1, f"a fresh draw (seed {seed + 1}; trained on seed {seed})"


def _test_split(what: str):
    def heldout(opts: dict, seed: int):
        if opts.get("split") != "train":
            return None
        return {**opts, "split": "test"}, seed, f"the {what} test split (not trained on)"
    return heldout


for _name, _loader in (("ring", toy2d.ring), ("moons", toy2d.moons), ("swissroll", toy2d.swissroll),
                       ("checkerboard", toy2d.checkerboard)):
    _register(_name, _loader, "points", _fresh_draw)
_register("digits", images.digits, "images", _test_split("digits (the last 297 images)"))
_register("image_folder", images.image_folder, "images", source=images.ImageFolderSource)
_register("mnist", images.mnist, "images", _test_split("MNIST"), source=images.MnistSource)
_register("cifar10", images.cifar10, "images", _test_split("CIFAR-10"), source=images.Cifar10Source)
_register("array", load_array, None)
_register("moving_digits", video.moving_digits, "videos", _test_split("moving digits (test-split digits)"))
_register("moving_digit_frames", video.moving_digit_frames, "images",
          _test_split("moving digits' frames (test-split digits)"))
_register("moving_mnist", video.moving_mnist, "videos", source=video.MovingMnistSource)
_register("video_folder", video.video_folder, "videos", source=video.VideoFolderSource)
DATASET_NAMES = tuple(DATASETS.names())


def split_loading(cfg: Mapping) -> tuple[dict, dict]:
    """``(dataset section, loading keys)``: a ``data:`` section without and with only the generic keys of
    :func:`diffusionlab.data.stream.loading_options` (stream, workers, prefetch, flip)."""
    from diffusionlab.data.stream import LOADING_KEYS

    cfg = dict(cfg)
    return {k: v for k, v in cfg.items() if k not in LOADING_KEYS}, {k: v for k, v in cfg.items() if k in LOADING_KEYS}


def resolve_data(cfg: Mapping) -> dict:
    """The full ``data:`` section: the dataset's options (its catalogue entry) then the loading keys."""
    from diffusionlab.configuration import Entry
    from diffusionlab.data.stream import loading_options

    dataset, loading = split_loading(cfg)
    out = {**DATASETS.resolve(dataset), **Entry("data", loading_options, "data").build(loading)}
    if out["flip"] and DATASETS.get(out["name"]).meta.get("kind") == "points":
        raise DiffusionLabError(f"data.flip mirrors images and videos; {out['name']!r} holds 2-D points")
    return out


def has_source(cfg: Mapping) -> bool:
    """Whether the dataset of ``cfg`` has a sample-by-sample reader (a file format: folders, CIFAR-10, MNIST,
    Moving MNIST); the others are generated or read whole."""
    entry, _ = DATASETS.split(split_loading(cfg)[0])
    return entry.meta.get("source") is not None


def open_source(cfg: Mapping, seed: int = 0):
    """The dataset of ``cfg`` as a :class:`~diffusionlab.data.sources.Source` (nothing decoded yet for the file
    formats; the others are loaded into memory and served sample by sample)."""
    from diffusionlab.data.sources import ArraySource

    entry, opts = DATASETS.split(split_loading(cfg)[0])
    source = entry.meta.get("source")
    if source is None:
        return ArraySource(load_dataset(cfg, seed))
    return source(**entry.resolve(opts))


def dataset_options(name: str) -> tuple[str, ...]:
    """The options dataset ``name`` accepts (besides ``name``)."""
    return tuple(DATASETS.get(name).parameters())


def load_dataset(cfg: Mapping | str, seed: int = 0) -> ArrayDataset:
    """Load the dataset ``cfg`` describes (a mapping with ``name``, or just the name); ``seed`` reaches the
    generated sets."""
    entry, opts = DATASETS.split(split_loading(cfg)[0] if isinstance(cfg, Mapping) else cfg)
    return entry.build(opts, **({"seed": seed} if entry.context else {}))


def heldout_dataset(cfg: Mapping, seed: int = 0):
    """``(dataset, description)`` of the held-out data of the dataset ``cfg`` was trained on (its test split, or a
    fresh draw of a generated set), or None when it has no held-out part."""
    entry, opts = DATASETS.split(split_loading(cfg)[0])
    rule = entry.meta.get("heldout")
    found = rule(entry.resolve(opts), seed) if rule else None
    if found is None:
        return None
    options, hseed, description = found
    return entry.build(options, **({"seed": hseed} if entry.context else {})), description


__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DATASET_NAMES",
    "has_source",
    "heldout_dataset",
    "open_source",
    "resolve_data",
    "split_loading",
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
