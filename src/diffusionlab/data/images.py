"""Image datasets, all returned as float32 ``(N, C, H, W)`` in model space ``[-1, 1]``.

- ``digits``: scikit-learn's bundled ``load_digits`` (1797 8x8 grey images, pixel values 0..16, mapped by
  ``/ 16`` then :func:`~diffusionlab.data.scaling.to_model`); labels kept. Fixed split: the last
  :data:`DIGITS_TEST_SIZE` images are the test split, the rest the train split.
- ``image_folder``: every PNG / JPEG under a folder (recursively, sorted), read with imageio, centre-cropped to
  a square and resized with :func:`torch.nn.functional.interpolate` (bilinear, antialiased).
- ``mnist``: the standard IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``), parsed with numpy.
- ``cifar10``: the *binary* version (``cifar-10-batches-bin``: records of 1 label byte + 3072 pixel bytes).
  The python version is a pickle and is refused: nothing here ever unpickles.

Nothing is downloaded: a missing file is a :class:`DiffusionLabError` naming the path. Each file format also has a
:class:`~diffusionlab.data.sources.Source` (:class:`ImageFolderSource`, :class:`MnistSource`,
:class:`Cifar10Source`) that reads one sample at a time for streaming; the in-memory image folder is built from its
source, so both decode alike, and a folder's bad files follow the rule of :mod:`diffusionlab.data.sources`.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib

import numpy as np
import torch
from torch.nn import functional as F

from diffusionlab.data.arrays import ArrayDataset
from diffusionlab.data.scaling import from_uint8, to_model
from diffusionlab.data.sources import Source, check_rule, read_all, scan
from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import choice, positive_int

#: Size of the fixed digits test split: the last 297 of the 1797 images (1500 train).
DIGITS_TEST_SIZE = 297
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# ---- digits -----------------------------------------------------------------------------------------------
def digits_split(split: str, n: int = 1797) -> slice:
    """Index range of a digits split: ``all``, ``train`` (first ``n - 297``) or ``test`` (last 297)."""
    choice("digits option split", split, ("all", "train", "test"))
    return {"all": slice(0, n), "train": slice(0, n - DIGITS_TEST_SIZE), "test": slice(n - DIGITS_TEST_SIZE, n)}[split]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def digits(split: str = "all") -> ArrayDataset:
    """scikit-learn's 8x8 digits (bundled, no download) as ``(N, 1, 8, 8)`` in ``[-1, 1]`` with labels.

    Args:
        split: all (the 1797 images), train (the first 1500) or test (the last 297, the held-out split)
    """
    images, target = _digits_arrays()
    sl = digits_split(split, len(images))
    x = torch.tensor(images[sl], dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(target[sl], dtype=torch.long)
    return ArrayDataset(to_model(x), "images", "digits", labels, levels=17, num_classes=10)


# ---- shared file helpers ----------------------------------------------------------------------------------
def _folder(path, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise DiffusionLabError(f"{what} option path must be a folder path, got {path!r}")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise DiffusionLabError(f"{what} folder {path!r} does not exist (or is not a folder)")
    return path


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it ends in ``.gz`` (at most what :func:`check_array_bytes` allows: a small
    archive may claim any size); a corrupt archive names the file."""
    from diffusionlab.checks import limit
    from diffusionlab.data.arrays import check_array_bytes, first_line, physical_memory

    try:
        if path.endswith(".gz"):
            cap = limit("array_bytes", physical_memory() or 2**40)
            with gzip.open(path, "rb") as fh:
                data = fh.read(cap + 1)
            check_array_bytes(len(data), f"{path!r} (decompressed)")
            return data
        check_array_bytes(os.path.getsize(path), repr(path))
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DiffusionLabError(f"cannot read {path!r}: {first_line(e)}") from None


# ---- image folder -----------------------------------------------------------------------------------------
def regular_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Every regular file under ``folder`` (recursively, sorted) whose name ends in one of ``extensions``: named
    pipes, sockets and devices are skipped (opening a pipe would wait forever), symlinks to regular files kept."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(extensions) and os.path.isfile(os.path.join(root, n))]
    return files


def _image_files(folder: str) -> list[str]:
    return regular_files(folder, IMAGE_EXTENSIONS)


#: the most pixels an image file may have without an override (DIFFUSIONLAB_MAX_IMAGE_PIXELS): a 97 KB PNG can
#: claim 10000 x 10000 pixels and take 2.7 GB to decode
MAX_IMAGE_PIXELS = 1 << 25


#: the Pillow modes an image may have: grey, RGB or palette, with or without alpha, at 1, 8 or 16 bits (CMYK, YCbCr,
#: LAB, HSV, 32-bit integer or float images are refused: read as channels they would be silently wrong colours)
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "I;16", "I;16B", "I;16L", "I;16N")


def check_image_pixels(path: str, frames_allowed: bool = False, what: str = "image",
                       modes: tuple[str, ...] | None = None) -> tuple[int, int, int]:
    """``(width, height, frames)`` of an image file from its header (Pillow, nothing decoded), refused when the
    pixels (times the frames of an animation) exceed :data:`MAX_IMAGE_PIXELS` (a decompression bomb) or, when
    ``modes`` is given, when its mode is not one of them."""
    import warnings

    from PIL import Image

    from diffusionlab.checks import limit
    from diffusionlab.data.arrays import first_line

    top = limit("image_pixels", MAX_IMAGE_PIXELS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                mode = im.mode
                frames = int(getattr(im, "n_frames", 1) or 1) if frames_allowed else 1
    except Image.DecompressionBombError:
        raise DiffusionLabError(f"{what} {path!r} claims more pixels than Pillow allows (a decompression bomb); "
                                "refused") from None
    except Exception as e:  # Pillow raises many types for bad files
        raise DiffusionLabError(f"cannot read {what} {path!r}: {first_line(e)}") from None
    if w * h * frames > top:
        raise DiffusionLabError(f"{what} {path!r} has {w} x {h} pixels{f' x {frames} frames' if frames > 1 else ''}, "
                                f"more than the {top} allowed (a decompression bomb?); set "
                                f"DIFFUSIONLAB_MAX_IMAGE_PIXELS to allow more")
    if w < 1 or h < 1:
        raise DiffusionLabError(f"{what} {path!r} has no pixels ({w} x {h})")
    if modes is not None and mode not in modes:
        raise DiffusionLabError(f"{what} {path!r} has mode {mode}; expected grey, RGB or palette (with or without "
                                "alpha) at 1, 8 or 16 bits")
    return w, h, frames


def _read_image(path: str, channels: int) -> torch.Tensor:
    """One image file as float32 ``(channels, H, W)`` in ``[0, 1]`` (alpha dropped, grey <-> RGB converted)."""
    import imageio.v3 as iio

    from diffusionlab.data.arrays import first_line

    check_image_pixels(path, modes=IMAGE_MODES)
    try:
        arr = np.asarray(iio.imread(path, plugin="pillow"))
    except Exception as e:  # imageio raises many types (OSError, ValueError, plugin errors) for bad files
        raise DiffusionLabError(f"cannot read image {path!r}: {first_line(e)}") from None
    if arr.dtype == np.bool_:  # 1-bit images
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / 65535.0
    else:
        raise DiffusionLabError(f"image {path!r} has pixel type {arr.dtype}; expected 8- or 16-bit PNG/JPEG")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 2, 3, 4):
        raise DiffusionLabError(f"image {path!r} has shape {arr.shape}; expected H x W or H x W x 1..4")
    x = x[:, :, :3] if x.shape[2] >= 3 else x[:, :, :1]  # drop alpha
    if channels == 1 and x.shape[2] == 3:
        x = x @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)  # ITU-R BT.601 luma
    elif channels == 3 and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _square_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``(C, H, W)`` to a square, then resize to ``size x size`` (bilinear, antialiased)."""
    _, h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, top:top + s, left:left + s]
    if s != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1)


class ImageFolderSource(Source):
    """The images of a folder, read one at a time (:func:`image_folder`'s options; bad files by the rule of
    :mod:`diffusionlab.data.sources`, their headers checked when the source is made)."""

    kind, levels = "images", 256

    def __init__(self, path: str, image_size: int = 32, channels: int = 3, bad_files: str = "error"):
        super().__init__()
        folder = _folder(path, "image_folder")
        positive_int("image_folder option image_size", image_size)
        choice("image_folder option channels", channels, (1, 3))
        self.bad_files = check_rule(bad_files, "image_folder")
        files = _image_files(folder)
        if not files:
            raise DiffusionLabError(f"image_folder {folder!r} holds no images (looked for "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
        self.name = os.path.basename(os.path.normpath(folder)) or "image_folder"
        self.files, self.skipped = scan(files, lambda f: check_image_pixels(f, modes=IMAGE_MODES),
                                        f"image_folder {folder!r}", self.bad_files)
        self.size, self.channels = image_size, channels
        self.sample_shape = (channels, image_size, image_size)

    def __len__(self) -> int:
        return len(self.files)

    def where(self, i: int) -> str:
        return self.files[i]

    def load(self, i: int) -> torch.Tensor:
        return to_model(_square_resize(_read_image(self.files[i], self.channels), self.size))


def image_folder(path: str, image_size: int = 32, channels: int = 3, bad_files: str = "error") -> ArrayDataset:
    """Every PNG/JPEG under ``path`` (recursively, sorted) as ``(N, channels, image_size, image_size)``.

    Args:
        path: the folder
        image_size: the side the images are centre-cropped and resized to
        channels: 1 (grey) or 3 (RGB)
        bad_files: error (refuse a folder with an unreadable, wrong-mode or oversized image, naming it) or skip
            (leave such files out, each reported with its path)
    """
    src = ImageFolderSource(path, image_size, channels, bad_files)
    x, skipped = read_all(src, f"image_folder {path!r}")
    return ArrayDataset(x, "images", src.name, levels=256, skipped=tuple(skipped))


# ---- MNIST ------------------------------------------------------------------------------------------------
def read_idx(path: str, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (LeCun's MNIST format: magic ``00 00 08 ndim``, big-endian int32 dims)."""
    raw = _read_bytes(path)
    if len(raw) < 4 + 4 * ndim:
        raise DiffusionLabError(f"IDX file {path!r} is truncated ({len(raw)} bytes, shorter than its header)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DiffusionLabError(
            f"IDX file {path!r} has bad magic number {raw[:4].hex()}; expected 000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    n = int(np.prod(dims))
    body = len(raw) - 4 - 4 * ndim
    if body != n:
        raise DiffusionLabError(
            f"IDX file {path!r} is malformed: header dims {dims} need {n} bytes, the file has {body} "
            f"({'truncated' if body < n else 'trailing data'})"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=n, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: str, names: list[str], what: str) -> str:
    for name in names:
        for candidate in (name, name + ".gz"):
            p = os.path.join(folder, candidate)
            if os.path.isfile(p):
                return p
    raise DiffusionLabError(
        f"{what}: {os.path.join(folder, names[0])!r} (or .gz) not found; diffusionlab never downloads, "
        f"place the files there"
    )


def _mnist_arrays(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's ``(N, 28, 28)`` uint8 images and ``(N,)`` labels of ``split`` from the IDX files in ``path``."""
    folder = _folder(path, "mnist")
    choice("mnist option split", split, ("train", "test"))
    raw = os.path.join(folder, "MNIST", "raw")
    if not any(n.startswith(("train-", "t10k-")) for n in os.listdir(folder)) and os.path.isdir(raw):
        folder = raw
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"], "mnist"), 3)
    labels = read_idx(_find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"], "mnist"), 1)
    if len(images) != len(labels):
        raise DiffusionLabError(f"mnist in {folder!r}: {len(images)} images but {len(labels)} labels")
    return images, labels


def mnist(path: str, split: str = "train") -> ArrayDataset:
    """MNIST from its IDX files in ``path`` (or ``path/MNIST/raw``) as ``(N, 1, 28, 28)`` with labels.

    Args:
        path: the folder of the IDX files (train-images-idx3-ubyte etc., optionally .gz), or one holding MNIST/raw;
            nothing is downloaded
        split: train (the 60000 training images) or test (the 10000 test images)
    """
    images, labels = _mnist_arrays(path, split)
    return ArrayDataset(from_uint8(images[:, None]), "images", "mnist", torch.from_numpy(labels.astype(np.int64)),
                        levels=256, num_classes=10)


class MnistSource(Source):
    """MNIST kept as its bytes (``(N, 28, 28)`` uint8, a quarter of the float32 set), converted one image at a time."""

    kind, name, levels, num_classes, sample_shape = "images", "mnist", 256, 10, (1, 28, 28)

    def __init__(self, path: str, split: str = "train"):
        super().__init__()
        self.images, _ = _mnist_arrays(path, split)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> torch.Tensor:
        return from_uint8(self.images[i][None])


# ---- CIFAR-10 (binary version only) -----------------------------------------------------------------------
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_PICKLE_HINT = (
    "is the python (pickle) version of CIFAR-10, which diffusionlab never unpickles; use the binary version "
    "(cifar-10-binary.tar.gz, extracted to a folder cifar-10-batches-bin with data_batch_1.bin ... test_batch.bin)"
)


def _cifar_folder(path) -> str:
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.expanduser(os.fspath(path))):
        raise DiffusionLabError(f"cifar10 option path {os.fspath(path)!r} is a file; give the extracted folder "
                                f"cifar-10-batches-bin")
    folder = _folder(path, "cifar10")
    for candidate in (folder, os.path.join(folder, "cifar-10-batches-bin")):
        if os.path.isfile(os.path.join(candidate, "data_batch_1.bin")) or os.path.isfile(
                os.path.join(candidate, "test_batch.bin")):
            return candidate
    for candidate in (folder, os.path.join(folder, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, "data_batch_1")) or os.path.isfile(
                os.path.join(candidate, "test_batch")):
            raise DiffusionLabError(f"cifar10 folder {candidate!r} {_CIFAR_PICKLE_HINT}")
    raise DiffusionLabError(
        f"cifar10 folder {folder!r} holds no data_batch_1.bin / test_batch.bin (nor a cifar-10-batches-bin "
        f"folder); diffusionlab never downloads: extract cifar-10-binary.tar.gz there"
    )


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` labels."""
    raw = _read_bytes(path)
    if not raw or len(raw) % _CIFAR_RECORD:
        raise DiffusionLabError(
            f"CIFAR-10 binary batch {path!r} is malformed: {len(raw)} bytes is not a positive multiple of the "
            f"{_CIFAR_RECORD}-byte record (1 label byte + 3072 pixel bytes)"
        )
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0]
    if labels.max() > 9:
        raise DiffusionLabError(f"CIFAR-10 binary batch {path!r} is malformed: label {int(labels.max())} > 9")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _cifar_files(path: str, split: str) -> list[str]:
    choice("cifar10 option split", split, ("train", "test"))
    folder = _cifar_folder(path)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    files = [os.path.join(folder, name) for name in names]
    for p in files:
        if not os.path.isfile(p):
            raise DiffusionLabError(f"cifar10: {p!r} not found (the {split} split needs {', '.join(names)})")
    return files


class Cifar10Source(Source):
    """CIFAR-10's binary batches memory-mapped (opened lazily in each process), one record converted at a time."""

    kind, name, levels, num_classes, sample_shape = "images", "cifar10", 256, 10, (3, 32, 32)

    def __init__(self, path: str, split: str = "train"):
        super().__init__()
        self.files = _cifar_files(path, split)
        self.counts = []
        for p in self.files:
            size = os.path.getsize(p)
            if not size or size % _CIFAR_RECORD:
                raise DiffusionLabError(f"CIFAR-10 binary batch {p!r} is malformed: {size} bytes is not a positive "
                                        f"multiple of the {_CIFAR_RECORD}-byte record (1 label byte + 3072 pixel "
                                        "bytes)")
            labels = self._records(p)[:, 0]
            if labels.max() > 9:
                raise DiffusionLabError(f"CIFAR-10 binary batch {p!r} is malformed: label {int(labels.max())} > 9")
            self.counts.append(size // _CIFAR_RECORD)
        self.starts = np.cumsum([0, *self.counts])
        self._maps: dict = {}

    def _records(self, p: str) -> np.ndarray:
        return np.memmap(p, dtype=np.uint8, mode="r").reshape(-1, _CIFAR_RECORD)

    def __getstate__(self):  # memory maps are not sent to worker processes: each opens its own
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def where(self, i: int) -> str:
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f"record {i - int(self.starts[f])} of {self.files[f]}"

    def load(self, i: int) -> torch.Tensor:
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        if f not in self._maps:
            self._maps[f] = self._records(self.files[f])
        rec = self._maps[f][i - int(self.starts[f])]
        return from_uint8(rec[1:].reshape(3, 32, 32))


def cifar10(path: str, split: str = "train") -> ArrayDataset:
    """CIFAR-10 from the binary batches as ``(N, 3, 32, 32)`` with labels (train: batches 1-5, test: test_batch).

    Args:
        path: the extracted binary version's folder cifar-10-batches-bin (data_batch_1.bin ... test_batch.bin), or
            one holding it; the python (pickle) version is refused, nothing is downloaded
        split: train (data_batch_1.bin ... data_batch_5.bin, 50000 images) or test (test_batch.bin, 10000)
    """
    parts = [read_cifar_batch(p) for p in _cifar_files(path, split)]
    images = np.concatenate([im for im, _ in parts])
    labels = np.concatenate([lab for _, lab in parts]).astype(np.int64)
    return ArrayDataset(from_uint8(images), "images", "cifar10", torch.from_numpy(labels), levels=256, num_classes=10)
