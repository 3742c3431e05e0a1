"""Small stand-ins for the file formats the loaders read, written into a test's tmp_path: folders of PNGs, the
CIFAR-10 binary batches (records of 1 label byte + 3072 pixel bytes, diffusionlab.data.images), MNIST's gzipped IDX
files, Moving MNIST's ``(frames, videos, 64, 64)`` uint8 array and a folder of ``.npy`` videos."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def pngs(folder: Path, n: int, seed: int = 0, size=(10, 12)) -> Path:
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        iio.imwrite(folder / f"{i:03d}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return folder


def cifar10(folder: Path, n: int = 20, others: int = 3) -> Path:
    """``data_batch_1.bin`` with ``n`` records, batches 2..5 with ``others`` each, ``test_batch.bin`` with ``others``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = [("data_batch_1.bin", n), *((f"data_batch_{i}.bin", others) for i in range(2, 6)),
             ("test_batch.bin", others)]
    for name, count in names:
        rec = np.concatenate([rng.integers(0, 10, (count, 1)), rng.integers(0, 256, (count, 3072))], axis=1)
        (folder / name).write_bytes(rec.astype(np.uint8).tobytes())
    return folder


def mnist(folder: Path, n: int = 15) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name, arr in (("train-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28))),
                      ("train-labels-idx1-ubyte", rng.integers(0, 10, (n,)))):
        data = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
        with gzip.open(folder / f"{name}.gz", "wb") as f:
            f.write(data)
    return folder


def moving_mnist(folder: Path, frames: int = 6, videos: int = 9) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(3).integers(0, 256, (frames, videos, 64, 64), dtype=np.uint8)
    np.save(folder / "mnist_test_seq.npy", arr)
    return folder


def npy_videos(folder: Path, n: int = 7) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    for i in range(n):
        np.save(folder / f"v{i}.npy", rng.integers(0, 256, (5, 12, 10), dtype=np.uint8))
    return folder
