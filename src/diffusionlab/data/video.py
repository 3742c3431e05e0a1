"""Video datasets, all returned as float32 ``(N, C, F, H, W)`` in model space ``[-1, 1]`` (kind ``videos``).

- ``moving_digits`` -- built in, no download: scikit-learn's bundled 8x8 digits (pixel values 0..16, scaled by
  1/16) moving in straight lines on a dark ``size x size`` canvas and bouncing off its walls, the synthetic
  analogue of Moving MNIST (Srivastava et al. 2015, "Unsupervised learning of video representations using
  LSTMs"). Deterministic given ``seed``. Labels: the class of the (first) digit. ``moving_digit_frames``: the
  same videos' frames as images (kind ``images``), for image models to be inflated into video models.
- ``moving_mnist`` -- Srivastava et al.'s ``mnist_test_seq.npy`` (uint8, ``(20, 10000, 64, 64)``: frames first)
  from local disk, transposed to ``(N, 1, F, 64, 64)``; optionally fewer frames / videos and resized frames.
- ``video_folder`` -- every ``.gif``, ``.mp4`` (needs an imageio ffmpeg/pyav plugin) or ``.npy`` video under a
  folder (recursively, sorted); frames cropped to a square and resized as
  :func:`~diffusionlab.data.images.image_folder` does.

Nothing is downloaded: a missing path is a :class:`DiffusionLabError` naming it. ``moving_mnist`` and
``video_folder`` have :class:`~diffusionlab.data.sources.Source` readers for streaming (:class:`MovingMnistSource`,
:class:`VideoFolderSource`). The loaders share the signature
style of :mod:`diffusionlab.data.images` (keyword options with defaults; ``seed`` where generated), so they are
registered in ``diffusionlab.data._LOADERS`` as they are.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.nn import functional as F

from diffusionlab.data.arrays import ArrayDataset
from diffusionlab.data.images import _digits_arrays, _folder, _square_resize, digits_split
from diffusionlab.data.scaling import from_uint8, to_model
from diffusionlab.data.sources import Source, check_rule, read_all, scan
from diffusionlab.errors import DiffusionLabError
from diffusionlab.checks import choice, positive_int, real

DIGIT = 8  #: side of sklearn's digits
VIDEO_EXTENSIONS = (".gif", ".mp4", ".npy")


# ---- moving digits ------------------------------------------------------------------------------------------
def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, limit: float) -> np.ndarray:
    """Positions ``(frames, 2)`` of a point moving at ``velocity`` per frame from ``start`` inside ``[0, limit]``,
    reflected at both walls (the motion of Moving MNIST): ``p_f`` folded into ``[0, limit]`` by the triangle wave."""
    raw = start[None, :] + np.arange(frames)[:, None] * velocity[None, :]
    if limit <= 0:
        return np.zeros_like(raw)
    period = 2.0 * limit
    m = np.mod(raw, period)
    return np.where(m > limit, period - m, m)


def render(glyphs: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """Paste ``K`` glyphs ``(K, 8, 8)`` in ``[0, 1]`` at integer top-left ``positions`` ``(F, K, 2)`` (row, col)
    on a black ``size x size`` canvas per frame; overlapping digits combine by maximum. Returns ``(F, size, size)``."""
    n_frames, k = positions.shape[:2]
    out = np.zeros((n_frames, size, size), dtype=np.float32)
    for f in range(n_frames):
        for j in range(k):
            r, c = positions[f, j]
            win = out[f, r:r + DIGIT, c:c + DIGIT]
            np.maximum(win, glyphs[j], out=win)
    return out


def moving_digits(num: int = 2000, frames: int = 8, size: int = 16, speed: float = 1.0, num_digits: int = 1,
                  split: str = "train", seed: int = 0) -> ArrayDataset:
    """Synthetic videos of 8x8 digits bouncing in a ``size x size`` canvas: ``(num, 1, frames, size, size)``.

    Per video (numpy ``default_rng(seed)``, so the set is a function of its options): ``num_digits`` (1 or 2)
    digit images drawn uniformly from the ``split`` of sklearn's digits (``train``: the first 1500, ``test``: the
    last 297, ``all``; the same fixed split as the ``digits`` image set and the digits classifier), each from a
    uniform start in ``[0, size - 8]^2`` with a uniform direction and ``speed`` pixels per frame, reflected at
    the walls (:func:`bounce`) and rounded to whole pixels (digits stay crisp, values stay on the 17 levels
    ``k / 16``). Labels: the class of the first digit.

    Args:
        num: number of videos
        frames: frames per video
        size: side of the square canvas in pixels (>= 8, the digits' side)
        speed: pixels per frame each digit moves (>= 0; direction uniform; positions rounded to whole pixels)
        num_digits: digits per video, 1 or 2 (overlaps combine by maximum; the label is the first digit's class)
        split: the sklearn digits drawn from: train (the first 1500), test (the last 297) or all, the split of the
            digits image set (test is the held-out data of a train run)
    """
    positive_int("moving_digits option num", num)
    positive_int("moving_digits option frames", frames)
    positive_int("moving_digits option size", size, minimum=DIGIT)
    real("moving_digits option speed", speed, 0.0)
    choice("moving_digits option num_digits", num_digits, (1, 2))
    images, target = _digits_arrays()
    sl = digits_split(split, len(images))
    pool = images[sl].astype(np.float32) / 16.0
    pool_labels = target[sl]
    rng = np.random.default_rng(int(seed))
    limit = float(size - DIGIT)
    videos = np.empty((num, 1, frames, size, size), dtype=np.float32)
    labels = np.empty(num, dtype=np.int64)
    for n in range(num):
        idx = rng.integers(0, len(pool), size=num_digits)
        start = rng.uniform(0.0, limit, size=(num_digits, 2))
        angle = rng.uniform(0.0, 2.0 * math.pi, size=num_digits)
        vel = speed * np.stack([np.sin(angle), np.cos(angle)], axis=1)
        pos = np.stack([bounce(start[j], vel[j], frames, limit) for j in range(num_digits)], axis=1)
        pos = np.clip(np.rint(pos), 0, limit).astype(np.int64)
        videos[n, 0] = render(pool[idx], pos, size)
        labels[n] = pool_labels[idx[0]]
    return ArrayDataset(to_model(torch.from_numpy(videos)), "videos", "moving_digits", torch.from_numpy(labels),
                        levels=17, num_classes=10)


def moving_digit_frames(num: int = 2000, frames: int = 8, size: int = 16, speed: float = 1.0, num_digits: int = 1,
                        split: str = "train", seed: int = 0) -> ArrayDataset:
    """The frames of :func:`moving_digits` ``(num, frames, size, speed, num_digits, split, seed)`` as images
    ``(num * frames, 1, size, size)`` (video ``n``'s frames at rows ``n * frames ...``), each labelled with its
    video's digit: the image data of image-to-video fine-tuning, on the very canvas of the videos.

    Args:
        num: number of videos (the set holds num * frames images)
        frames: frames per video, each one image
        size: side of the square canvas (the images) in pixels (>= 8, the digits' side)
        speed: pixels per frame each digit moves (>= 0; direction uniform; positions rounded to whole pixels)
        num_digits: digits per video, 1 or 2 (overlaps combine by maximum; the label is the first digit's class)
        split: the sklearn digits drawn from: train (the first 1500), test (the last 297) or all, the split of the
            digits image set (test is the held-out data of a train run)
    """
    videos = moving_digits(num, frames, size, speed, num_digits, split, seed)
    x = videos.data.transpose(1, 2).reshape(num * frames, 1, size, size).contiguous()
    return ArrayDataset(x, "images", "moving_digit_frames", videos.labels.repeat_interleave(frames), levels=17,
                        num_classes=10)


# ---- shared frame handling ----------------------------------------------------------------------------------
def resize_frames(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop and resize every frame of ``(C, F, H, W)`` in ``[0, 1]`` to ``size x size`` (bilinear,
    antialiased; :func:`~diffusionlab.data.images._square_resize` per frame)."""
    c, f = x.shape[:2]
    frames = [_square_resize(x[:, k], size) for k in range(f)]
    return torch.stack(frames, dim=1).reshape(c, f, size, size)


def _take_frames(x: torch.Tensor, frames: int | None, what: str) -> torch.Tensor:
    """The first ``frames`` frames of ``(C, F, H, W)``; fewer available is an error naming ``what``."""
    if frames is None:
        return x
    if x.shape[1] < frames:
        raise DiffusionLabError(f"{what} has {x.shape[1]} frames, fewer than the {frames} asked for (option frames)")
    return x[:, :frames]


# ---- Moving MNIST -------------------------------------------------------------------------------------------
def _moving_mnist_map(path: str, frames: int, size: int, num: int | None) -> tuple[str, np.ndarray, int]:
    """``(file, memory map (F, N, H, W), videos used)`` of a Moving MNIST file, its options checked."""
    if not isinstance(path, (str, os.PathLike)):
        raise DiffusionLabError(f"moving_mnist option path must be a file path, got {path!r}")
    p = os.path.expanduser(os.fspath(path))
    if os.path.isdir(p):
        p = os.path.join(p, "mnist_test_seq.npy")
    if not os.path.isfile(p):
        raise DiffusionLabError(f"moving_mnist file {p!r} does not exist; diffusionlab never downloads: place "
                                f"mnist_test_seq.npy there")
    positive_int("moving_mnist option frames", frames)
    positive_int("moving_mnist option size", size)
    if num is not None:
        positive_int("moving_mnist option num", num)
    from diffusionlab.data.arrays import check_npy_file, first_line

    try:
        check_npy_file(p, f"moving_mnist file {p!r}")
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except DiffusionLabError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DiffusionLabError(f"cannot read moving_mnist file {p!r}: {first_line(e)}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.dtype != np.uint8 or min(arr.shape) < 1:
        raise DiffusionLabError(f"moving_mnist file {p!r} must hold a uint8 array (frames, videos, H, W), got "
                                f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}")
    if arr.shape[0] < frames:
        raise DiffusionLabError(f"moving_mnist file {p!r} has {arr.shape[0]} frames, fewer than frames={frames}")
    n = arr.shape[1] if num is None else min(num, arr.shape[1])
    return p, arr, n


def _moving_mnist_videos(arr: np.ndarray, frames: int, size: int) -> torch.Tensor:
    """Videos of a ``(F, n, H, W)`` uint8 block as ``(n, 1, frames, size, size)`` in model space."""
    sub = np.ascontiguousarray(arr[:frames]).transpose(1, 0, 2, 3)[:, None]  # (N, 1, F, H, W)
    x = from_uint8(sub)
    if size != x.shape[-1] or size != x.shape[-2]:
        b, c, f, h, w = x.shape
        y = F.interpolate((x.reshape(b * c * f, 1, h, w) + 1) / 2, size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        x = to_model(y.clamp(0, 1)).reshape(b, c, f, size, size)
    return x.contiguous()


def moving_mnist(path: str, frames: int = 20, size: int = 64, num: int | None = None) -> ArrayDataset:
    """Moving MNIST's ``mnist_test_seq.npy`` (``(20, 10000, 64, 64)`` uint8, frames first) as
    ``(N, 1, frames, size, size)``: the first ``num`` videos (all by default), their first ``frames`` frames,
    frames resized to ``size`` when it is not 64 (bilinear, antialiased). ``path`` is the ``.npy`` file or a
    folder holding ``mnist_test_seq.npy``. The array is memory-mapped, so a few videos load quickly.

    Args:
        path: the file mnist_test_seq.npy (Srivastava et al. 2015) or a folder holding it; nothing is downloaded
        frames: the first frames taken of each video (at most the file's 20)
        size: the side the 64x64 frames are resized to (bilinear, antialiased; 64 keeps them as they are)
        num: the first num videos of the file (unset: all, 10000)
    """
    from diffusionlab.data.arrays import check_array_bytes

    _, arr, n = _moving_mnist_map(path, frames, size, num)
    check_array_bytes(4 * frames * n * arr.shape[2] * arr.shape[3], f"moving_mnist ({n} videos of {frames} frames)")
    return ArrayDataset(_moving_mnist_videos(arr[:, :n], frames, size), "videos", "moving_mnist", levels=256)


class MovingMnistSource(Source):
    """Moving MNIST memory-mapped (opened lazily in each process), one video converted at a time."""

    kind, name, levels = "videos", "moving_mnist", 256

    def __init__(self, path: str, frames: int = 20, size: int = 64, num: int | None = None):
        super().__init__()
        self.path, _, self.n = _moving_mnist_map(path, frames, size, num)
        self.frames, self.size = frames, size
        self.sample_shape = (1, frames, size, size)
        self._arr = None

    def __getstate__(self):  # the memory map is not sent to worker processes: each opens its own
        return {**self.__dict__, "_arr": None}

    def __len__(self) -> int:
        return self.n

    def where(self, i: int) -> str:
        return f"video {i} of {self.path}"

    def load(self, i: int) -> torch.Tensor:
        if self._arr is None:
            self._arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return _moving_mnist_videos(self._arr[:, i:i + 1], self.frames, self.size)[0]


# ---- folders of videos --------------------------------------------------------------------------------------
def _video_files(folder: str) -> list[str]:
    from diffusionlab.data.images import regular_files

    return regular_files(folder, VIDEO_EXTENSIONS)


def _to_unit(arr: np.ndarray, path: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32)
        if not np.isfinite(a).all() or a.min() < -1e-4 or a.max() > 1 + 1e-4:
            raise DiffusionLabError(f"video {path!r} holds floats outside [0, 1]; store uint8 or values in [0, 1]")
        return np.clip(a, 0, 1)
    raise DiffusionLabError(f"video {path!r} has dtype {arr.dtype}; expected uint8 or float in [0, 1]")


def read_video(path: str, channels: int = 1) -> torch.Tensor:
    """One video file as float32 ``(channels, F, H, W)`` in ``[0, 1]``.

    ``.gif`` / ``.mp4`` via imageio (frames ``(F, H, W[, C])``; alpha dropped; MP4 needs the ffmpeg or pyav
    plugin); ``.npy`` (never unpickled) holding ``(F, H, W)`` or ``(F, H, W, C)``, uint8 or floats in [0, 1].
    Grey <-> RGB converted as for images (ITU-R BT.601 luma)."""
    from diffusionlab.data.arrays import first_line, load_npy

    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr = load_npy(path, f"video {path!r}")
    else:
        import imageio.v3 as iio

        if ext == ".gif":
            from diffusionlab.data.images import check_image_pixels

            check_image_pixels(path, frames_allowed=True, what="video")  # a decompression bomb is refused before decoding
        try:
            arr = np.asarray(iio.imread(path, index=None))
        except Exception as e:  # imageio raises many types for bad files or a missing plugin
            hint = ""
            if ext == ".mp4":
                from diffusionlab.video_io import mp4_available

                hint = "" if mp4_available() else " (MP4 needs an imageio plugin: pip install imageio[ffmpeg])"
            raise DiffusionLabError(f"cannot read video {path!r}{hint}: {first_line(e)}") from None
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 2, 3, 4) or min(arr.shape) < 1:
        raise DiffusionLabError(f"video {path!r} has shape {arr.shape}; expected frames (F, H, W) or (F, H, W, C), "
                                "each at least 1")
    x = _to_unit(arr, path)
    x = x[..., :3] if x.shape[-1] >= 3 else x[..., :1]
    if channels == 1 and x.shape[-1] == 3:
        x = x @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    elif channels == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2)))


def check_video_header(path: str, frames: int) -> None:
    """What a video file's header tells without decoding it: a GIF's pixels (a decompression bomb), mode and frame
    count, a ``.npy``'s shape; an MP4 is checked only when it is decoded."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gif":
        from diffusionlab.data.images import IMAGE_MODES, check_image_pixels

        _, _, n = check_image_pixels(path, frames_allowed=True, what="video", modes=IMAGE_MODES)
    elif ext == ".npy":
        from diffusionlab.data.arrays import check_npy_file

        what = f"video {path!r}"
        check_npy_file(path, what)
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        if len(shape) not in (3, 4) or min(shape) < 1 or (len(shape) == 4 and shape[-1] not in (1, 2, 3, 4)):
            raise DiffusionLabError(f"{what} has shape {shape}; expected frames (F, H, W) or (F, H, W, C), each at "
                                    "least 1")
        n = shape[0]
    else:
        return
    if n < frames:
        raise DiffusionLabError(f"video {path!r} has {n} frames, fewer than the {frames} asked for (option frames)")


class VideoFolderSource(Source):
    """The videos of a folder, read one at a time (:func:`video_folder`'s options; bad files by the rule of
    :mod:`diffusionlab.data.sources`, their headers checked when the source is made)."""

    kind, levels = "videos", 256

    def __init__(self, path: str, frames: int = 16, size: int = 64, channels: int = 1, bad_files: str = "error"):
        super().__init__()
        folder = _folder(path, "video_folder")
        positive_int("video_folder option frames", frames)
        positive_int("video_folder option size", size)
        choice("video_folder option channels", channels, (1, 3))
        self.bad_files = check_rule(bad_files, "video_folder")
        files = _video_files(folder)
        if not files:
            raise DiffusionLabError(f"video_folder {folder!r} holds no videos (looked for "
                                    f"{', '.join(VIDEO_EXTENSIONS)})")
        self.name = os.path.basename(os.path.normpath(folder)) or "video_folder"
        self.files, self.skipped = scan(files, lambda f: check_video_header(f, frames), f"video_folder {folder!r}",
                                        self.bad_files)
        self.frames, self.size, self.channels = frames, size, channels
        self.sample_shape = (channels, frames, size, size)

    def __len__(self) -> int:
        return len(self.files)

    def where(self, i: int) -> str:
        return self.files[i]

    def load(self, i: int) -> torch.Tensor:
        f = self.files[i]
        return to_model(resize_frames(_take_frames(read_video(f, self.channels), self.frames, f"video {f!r}"),
                                      self.size))


def video_folder(path: str, frames: int = 16, size: int = 64, channels: int = 1,
                 bad_files: str = "error") -> ArrayDataset:
    """Every ``.gif`` / ``.mp4`` / ``.npy`` video under ``path`` (recursively, sorted) as
    ``(N, channels, frames, size, size)``: the first ``frames`` frames of each, each frame centre-cropped to a
    square and resized to ``size``.

    Args:
        path: the folder
        frames: the frames taken from the start of each video (a shorter video is a bad file)
        size: the side the frames are centre-cropped and resized to
        channels: 1 (grey) or 3 (RGB)
        bad_files: error (refuse a folder with an unreadable, short or oversized video, naming it) or skip (leave
            such files out, each reported with its path)
    """
    src = VideoFolderSource(path, frames, size, channels, bad_files)
    x, skipped = read_all(src, f"video_folder {path!r}")
    return ArrayDataset(x.contiguous(), "videos", src.name, levels=256, skipped=tuple(skipped))


#: what to add to ``diffusionlab.data._LOADERS``
VIDEO_LOADERS = {"moving_digits": moving_digits, "moving_digit_frames": moving_digit_frames,
                 "moving_mnist": moving_mnist, "video_folder": video_folder}
