"""The in-memory dataset every loader returns, and the loader for user arrays (``.npy`` / ``.npz``).

:class:`ArrayDataset` holds the whole set as one float32 tensor in model space (images and videos in
``[-1, 1]``, points as generated). User arrays are read with ``np.load(..., allow_pickle=False)``: nothing is
ever unpickled.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from diffusionlab.data.scaling import from_uint8, to_model, to_unit
from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import choice

KINDS = ("points", "images", "videos")
_KIND_BY_NDIM = {2: "points", 4: "images", 5: "videos"}


@dataclass
class ArrayDataset:
    """A dataset in memory: ``data`` (N, *sample_shape) float32 in model space, optional ``labels`` (N,).

    The facts other modules need and must not guess: ``levels`` (the number of quantization levels of the values
    in model space: 17 for the digits' grey levels ``k / 16``, 256 for 8-bit images and videos, None for
    continuous data), :attr:`value_range` (``(-1, 1)`` for images and videos, None for points: what a sampler may
    clip its ``x_0`` prediction to) and ``num_classes`` (labels ``0 .. num_classes - 1``; None without labels).
    """

    data: torch.Tensor
    kind: str
    name: str
    labels: torch.Tensor | None = None
    levels: int | None = None
    num_classes: int | None = None
    #: files of a folder left out by ``bad_files: skip``, as ``(path, reason)`` (:mod:`diffusionlab.data.sources`)
    skipped: tuple = ()

    def __post_init__(self):
        choice("dataset kind", self.kind, KINDS)
        if self.data.dtype != torch.float32:
            raise DiffusionLabError(f"dataset {self.name!r}: data must be float32, got {self.data.dtype}")
        want = {"points": 2, "images": 4, "videos": 5}[self.kind]
        if self.data.ndim != want:
            raise DiffusionLabError(
                f"dataset {self.name!r}: {self.kind} need a {want}-D tensor, got shape {tuple(self.data.shape)}"
            )
        if len(self.data) == 0:
            raise DiffusionLabError(f"dataset {self.name!r} is empty")
        if min(self.data.shape) == 0:
            raise DiffusionLabError(f"dataset {self.name!r} has an empty axis: samples of shape "
                                    f"{tuple(self.data.shape[1:])}")
        if self.labels is not None and (self.labels.dtype != torch.long or self.labels.shape != (len(self.data),)):
            raise DiffusionLabError(
                f"dataset {self.name!r}: labels must be a LongTensor of shape ({len(self.data)},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels is not None and self.num_classes is None:
            self.num_classes = int(self.labels.max()) + 1 if self.labels.numel() else 0
        if self.levels is not None and (isinstance(self.levels, bool) or not isinstance(self.levels, int)
                                        or self.levels < 2):
            raise DiffusionLabError(f"dataset {self.name!r}: levels must be an integer >= 2, got {self.levels!r}")

    @property
    def value_range(self) -> tuple[float, float] | None:
        """``(-1, 1)`` for images and videos (model space), None for points (no known range)."""
        return value_range(self.kind)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        """Model space to display space: images and videos to ``[0, 1]``; points unchanged."""
        return to_display(self.kind, x)

    def to(self, device: torch.device | str) -> "ArrayDataset":
        """A copy with ``data`` and ``labels`` on ``device``."""
        labels = None if self.labels is None else self.labels.to(device)
        return ArrayDataset(self.data.to(device), self.kind, self.name, labels, self.levels, self.num_classes,
                            self.skipped)


def value_range(kind: str) -> tuple[float, float] | None:
    """The model-space range of a kind of data: ``(-1, 1)`` for images and videos, None for points."""
    return None if kind == "points" else (-1.0, 1.0)


def to_display(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Model space to display space for a kind of data: images and videos to ``[0, 1]``; points unchanged."""
    return x if kind == "points" else to_unit(x)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries such as imageio raise multi-line ones)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_array_bytes(nbytes: int, what: str) -> None:
    """Refuse loading an array of ``nbytes`` bytes larger than this machine's memory (or the override
    ``DIFFUSIONLAB_MAX_ARRAY_BYTES``): a file's header may claim any shape."""
    from diffusionlab.checks import limit

    top = limit("array_bytes", physical_memory() or 2**40)
    if nbytes > top:
        raise DiffusionLabError(f"{what} would need {nbytes / 2**30:.3g} GiB, more than the {top / 2**30:.3g} GiB "
                                "allowed (this machine's memory; DIFFUSIONLAB_MAX_ARRAY_BYTES overrides)")


def _npy_header(f, what: str) -> tuple[tuple, np.dtype, int]:
    """``(shape, dtype, data bytes)`` from an open ``.npy`` stream's header (the stream is left after it)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # format 3.0 (utf-8 field names) has no public reader
            import importlib

            impl = importlib.import_module("numpy.lib._format_impl" if hasattr(np.lib, "_format_impl")
                                           else "numpy.lib.format")
            shape, _, dtype = impl._read_array_header(f, version)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise DiffusionLabError(f"cannot read {what}: malformed .npy header ({first_line(e)})") from None
    if dtype.hasobject:
        raise DiffusionLabError(f"{what} holds pickled (object) data, which diffusionlab never loads")
    if any(n < 0 for n in shape):
        raise DiffusionLabError(f"{what} has a malformed shape {shape}")
    return tuple(shape), dtype, int(np.prod(shape, dtype=object)) * dtype.itemsize


def check_npy_file(path: str, what: str | None = None) -> None:
    """Refuse a ``.npy`` file whose header claims more data than the file holds (a truncated file, or a header
    claiming a huge shape) or more than :func:`check_array_bytes` allows, before anything is allocated."""
    what = what or f"array file {path!r}"
    with open(path, "rb") as f:
        shape, _, nbytes = _npy_header(f, what)
        offset = f.tell()
    size = os.path.getsize(path)
    if size - offset < nbytes:
        raise DiffusionLabError(f"{what} is truncated or lies about its size: its header claims shape {shape} "
                                f"({nbytes} bytes of data), the file holds {size - offset}")
    check_array_bytes(nbytes, what)


def check_npz_member(npz, key: str, what: str) -> None:
    """The same check for member ``key`` of an open ``np.load`` archive: a real ``.npy`` (not, say, a pickle) whose
    header agrees with the member's size."""
    name = key if key in npz.zip.namelist() else f"{key}.npy"
    try:
        info = npz.zip.getinfo(name)
        with npz.zip.open(name) as f:
            head = f.read(6)
            if head != b"\x93NUMPY":
                raise DiffusionLabError(f"{what}: member {key!r} is not a .npy array (a pickle or other data); refused")
            with npz.zip.open(name) as g:
                shape, _, nbytes = _npy_header(g, f"{what} member {key!r}")
                offset = g.tell()
    except DiffusionLabError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as e:
        raise DiffusionLabError(f"cannot read {what} member {key!r}: {first_line(e)}") from None
    if info.file_size - offset < nbytes:
        raise DiffusionLabError(f"{what} member {key!r} is truncated or lies about its size: its header claims shape "
                                f"{shape} ({nbytes} bytes), the member holds {info.file_size - offset}")
    check_array_bytes(nbytes, f"{what} member {key!r}")


def load_npy(path: str, what: str | None = None) -> np.ndarray:
    """A ``.npy`` file read safely: a regular file, never unpickled, its header checked (:func:`check_npy_file`)."""
    what = what or f"array file {path!r}"
    if not os.path.isfile(path):
        raise DiffusionLabError(f"{what} does not exist or is not a regular file")
    try:
        check_npy_file(path, what)
        arr = np.load(path, allow_pickle=False)
    except DiffusionLabError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DiffusionLabError(f"cannot read {what}: {first_line(e)}") from None
    if not isinstance(arr, np.ndarray):
        raise DiffusionLabError(f"{what} is not a single .npy array")
    return arr


def _np_load(path: str, key: str | None, labels_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The array at ``path`` (the ``key`` member of an ``.npz``, default its first) and the ``labels_key``
    member if asked; pickles refused, headers checked against the data (:func:`check_npy_file`), the archive
    closed on return."""
    if not os.path.isfile(path):
        raise DiffusionLabError(f"array file {path!r} does not exist (expected a .npy or .npz file)")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:
            check_npy_file(path)
        obj = np.load(path, allow_pickle=False)
    except DiffusionLabError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DiffusionLabError(f"cannot read array file {path!r} (malformed .npy/.npz or pickled data): "
                                f"{first_line(e)}") from None
    if isinstance(obj, np.ndarray):
        for opt, val in (("key", key), ("labels", labels_key)):
            if val is not None:
                raise DiffusionLabError(f"option {opt}={val!r} needs an .npz archive; {path!r} holds one array")
        return obj, None
    with obj:
        if not obj.files:
            raise DiffusionLabError(f"array archive {path!r} holds no arrays")
        key = obj.files[0] if key is None else key
        return _npz_member(obj, key, path), None if labels_key is None else _npz_member(obj, labels_key, path)


def _npz_member(npz, key: str, path: str) -> np.ndarray:
    if key not in npz.files:
        raise DiffusionLabError(f"array archive {path!r} has no array {key!r}; it holds: {', '.join(npz.files)}")
    check_npz_member(npz, key, f"array archive {path!r}")
    try:
        arr = npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DiffusionLabError(f"cannot read array {key!r} of {path!r}: {first_line(e)}") from None
    if not isinstance(arr, np.ndarray):
        raise DiffusionLabError(f"array archive {path!r}: member {key!r} is not a .npy array; refused")
    return arr


def _to_model_space(arr: np.ndarray, kind: str, value_range: str | None, path: str) -> torch.Tensor:
    """Float32 model-space tensor from a numeric array, following ``range`` (see :func:`load_array`)."""
    if arr.dtype == np.uint8 and value_range in (None, "unit"):
        return from_uint8(arr)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DiffusionLabError(f"array in {path!r} has dtype {arr.dtype}; expected a numeric (float or integer) array")
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise DiffusionLabError(f"array in {path!r} contains NaN or infinite values")
    if value_range is None:
        if kind != "points":
            raise DiffusionLabError(
                f"array in {path!r} holds {kind} as {arr.dtype}: set range to unit (values in [0, 1]), "
                f"model (values in [-1, 1]) or raw (used as they are)"
            )
        value_range = "raw"
    lo, hi = float(t.min()), float(t.max())
    tol = 1e-4
    if value_range == "unit":
        if lo < -tol or hi > 1 + tol:
            raise DiffusionLabError(f"array in {path!r} has values in [{lo:.4g}, {hi:.4g}], outside [0, 1] (range: unit)")
        return to_model(t.clamp(0, 1))
    if value_range == "model":
        if lo < -1 - tol or hi > 1 + tol:
            raise DiffusionLabError(
                f"array in {path!r} has values in [{lo:.4g}, {hi:.4g}], outside [-1, 1] (range: model)")
        return t.clamp(-1, 1)
    return t


def load_array(path: str, key: str | None = None, range: str | None = None,  # noqa: A002 (config key)
               labels: str | None = None) -> ArrayDataset:
    """Load a user array: ``.npy``, or one array of an ``.npz`` (``key``, default the first).

    The rank sets the kind: 2-D points ``(N, D)``, 4-D images ``(N, C, H, W)``, 5-D videos ``(N, C, F, H, W)``.
    ``range`` says where the values lie: ``unit`` ``[0, 1]`` (mapped by :func:`~diffusionlab.data.scaling.to_model`),
    ``model`` ``[-1, 1]`` (kept), ``raw`` (kept as they are). Unset, points are ``raw``, ``uint8`` arrays are bytes
    ``0..255``, and float images/videos must say. ``labels`` names an integer array of the same ``.npz``.

    Args:
        path: a .npy file or .npz archive (read without unpickling); its rank sets the kind: points (N, D), images
            (N, C, H, W) or videos (N, C, F, H, W)
        key: the .npz member holding the data (unset: the archive's first; a .npy takes none)
        range: unit (values in [0, 1], mapped to [-1, 1]), model (values in [-1, 1], kept) or raw (kept as they
            are); unset: points raw, uint8 arrays bytes 0..255 (mapped to [-1, 1]), float images/videos must set it
        labels: the .npz member holding integer class labels of shape (N,) (unset: no labels)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DiffusionLabError(f"array path must be a file path, got {path!r}")
    path = os.path.expanduser(os.fspath(path))
    if range is not None:
        choice("array option range", range, ("unit", "model", "raw"))
    arr, lab = _np_load(path, key, labels)
    kind = _KIND_BY_NDIM.get(arr.ndim)
    if kind is None:
        raise DiffusionLabError(
            f"array in {path!r} has shape {arr.shape}; expected 2-D points (N, D), 4-D images (N, C, H, W) "
            f"or 5-D videos (N, C, F, H, W)"
        )
    if arr.shape[0] == 0:
        raise DiffusionLabError(f"array in {path!r} is empty (shape {arr.shape})")
    if min(arr.shape) == 0:
        raise DiffusionLabError(f"array in {path!r} has an empty axis (shape {arr.shape}): every sample needs at "
                                "least one value per axis")
    if arr.dtype == np.uint8 and range == "model":
        raise DiffusionLabError(f"array in {path!r} is uint8 (bytes 0..255), which cannot be in range model [-1, 1]")
    data = _to_model_space(arr, kind, range, path)
    levels = 256 if arr.dtype == np.uint8 else None
    return ArrayDataset(data, kind, os.path.basename(path), _labels(lab, labels, len(data), path), levels)


def _labels(lab: np.ndarray | None, key: str | None, n: int, path: str) -> torch.Tensor | None:
    if lab is None:
        return None
    if not np.issubdtype(lab.dtype, np.integer) or lab.shape != (n,):
        raise DiffusionLabError(
            f"labels {key!r} in {path!r} must be an integer array of shape ({n},), got {lab.dtype} {lab.shape}"
        )
    return torch.from_numpy(lab.astype(np.int64))
