"""Datasets: shapes, ranges, determinism, the digits split, file formats written on the fly, and errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from diffusionlab.data import DATASETS, DIGITS_TEST_SIZE, ArrayDataset, dataset_options, load_dataset
from diffusionlab.data.scaling import from_uint8, to_model, to_uint8, to_unit
from diffusionlab.errors import DiffusionLabError

TOYS = ("ring", "moons", "swissroll", "checkerboard")




# ---- scaling ----------------------------------------------------------------------------------------------
def test_scaling_round_trip_and_uint8_exact():
    u = torch.rand(1000, dtype=torch.float64)
    assert torch.allclose(to_unit(to_model(u)), u, atol=1e-12)
    assert to_model(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]
    assert to_unit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]  # clamped
    b = torch.arange(256, dtype=torch.uint8)
    m = from_uint8(b)
    assert m.dtype == torch.float32 and m.min() == -1 and m.max() == 1
    assert torch.equal(to_uint8(m), b)  # every byte survives the round trip
    assert torch.equal(from_uint8(b.numpy()), m)


# ---- 2-D toys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOYS)
def test_toy_shape_scale_and_seed(name):
    a = load_dataset({"name": name, "num": 3000}, seed=1)
    assert isinstance(a, ArrayDataset) and a.kind == "points" and a.name == name
    assert a.data.shape == (3000, 2) and a.data.dtype == torch.float32 and a.sample_shape == (2,) and len(a) == 3000
    assert a.labels is None and torch.isfinite(a.data).all()
    # roughly unit scale: per-axis std in [0.3, 1.5], centred within 0.4 (swissroll is off-centre by ~0.29)
    std, mean = a.data.std(0), a.data.mean(0)
    assert ((std > 0.3) & (std < 1.5)).all(), std
    assert mean.abs().max() < 0.4, mean
    assert torch.equal(a.data, load_dataset({"name": name, "num": 3000}, seed=1).data)
    assert not torch.allclose(a.data, load_dataset({"name": name, "num": 3000}, seed=2).data)
    assert torch.equal(a.to_display(a.data), a.data)


def test_toy_geometry():
    r = load_dataset({"name": "ring", "num": 4000, "K": 6, "radius": 2.0, "std": 0.01}).data
    assert torch.allclose(r.norm(dim=1), torch.full((4000,), 2.0), atol=0.06)  # 6 std of the radial noise
    angles = torch.atan2(r[:, 1], r[:, 0]) * 6 / (2 * torch.pi)
    assert (angles - angles.round()).abs().max() < 0.05  # at the 6 centres
    c = load_dataset({"name": "checkerboard", "num": 4000}).data
    assert c.abs().max() <= 2
    assert ((torch.floor(c[:, 0]) + torch.floor(c[:, 1])) % 2 == 0).all()  # only the 8 even-parity squares
    assert len(torch.unique(torch.floor(c), dim=0)) == 8
    m = load_dataset({"name": "moons", "num": 4000, "noise": 0.0}).data
    outer = (m - torch.tensor([-0.5, -0.25])).norm(dim=1)
    inner = (m - torch.tensor([0.5, 0.25])).norm(dim=1)
    assert torch.minimum((outer - 1).abs(), (inner - 1).abs()).max() < 1e-5  # on one of two unit half circles


def test_toy_bad_options():
    with pytest.raises(DiffusionLabError, match="num"):
        load_dataset({"name": "ring", "num": 0})
    with pytest.raises(DiffusionLabError, match="std"):
        load_dataset({"name": "ring", "std": -1.0})
    with pytest.raises(DiffusionLabError, match="allowed: num, K, radius, std"):
        load_dataset({"name": "ring", "sigma": 1.0})
    with pytest.raises(DiffusionLabError, match="unknown dataset 'nope'"):
        load_dataset({"name": "nope"})
    with pytest.raises(DiffusionLabError, match="needs option"):
        load_dataset({"name": "mnist"})


def test_registry():
    assert set(DATASETS) >= {"ring", "moons", "swissroll", "checkerboard", "digits", "image_folder", "mnist",
                             "cifar10", "array"}
    assert dataset_options("digits") == ("split",)
    assert load_dataset("moons", seed=0).data.shape == (20000, 2)  # default num; a bare name works


# ---- digits -----------------------------------------------------------------------------------------------
def test_digits_count_range_labels_split():
    d = load_dataset({"name": "digits"})
    assert d.kind == "images" and d.data.shape == (1797, 1, 8, 8) and d.sample_shape == (1, 8, 8)
    assert d.data.min() == -1 and d.data.max() == 1
    assert d.labels.dtype == torch.long and set(d.labels.tolist()) == set(range(10))
    # pixel values 0..16 land exactly on the grid -1 + k/8
    assert torch.equal(d.data * 8, torch.round(d.data * 8))
    tr, te = load_dataset({"name": "digits", "split": "train"}), load_dataset({"name": "digits", "split": "test"})
    assert len(te) == DIGITS_TEST_SIZE == 297 and len(tr) == 1500
    assert torch.equal(torch.cat([tr.data, te.data]), d.data) and torch.equal(te.labels, d.labels[-297:])
    disp = d.to_display(d.data)
    assert disp.min() == 0 and disp.max() == 1
    with pytest.raises(DiffusionLabError, match="split"):
        load_dataset({"name": "digits", "split": "val"})


# ---- image folder -----------------------------------------------------------------------------------------
def test_image_folder(tmp_path):
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "a.png", rgb)
    iio.imwrite(tmp_path / "sub" / "b.png", np.full((8, 8), 255, dtype=np.uint8))  # grey, white
    iio.imwrite(tmp_path / "c.jpg", rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_dataset({"name": "image_folder", "path": str(tmp_path), "image_size": 8, "channels": 3})
    assert d.kind == "images" and d.data.shape == (3, 3, 8, 8) and d.labels is None
    assert d.data.min() >= -1 and d.data.max() <= 1
    # sorted walk: a.png, c.jpg, sub/b.png; the white grey image becomes white RGB
    assert torch.allclose(d.data[2], torch.ones(3, 8, 8))
    # a.png: centre crop of columns 2..13, resized 12 -> 8; the mean is preserved by antialiased resizing
    crop = torch.from_numpy(rgb[:, 2:14].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(to_unit(d.data[0]).mean((1, 2)), crop.mean((1, 2)), atol=0.02)
    g = load_dataset({"name": "image_folder", "path": str(tmp_path), "image_size": 4, "channels": 1})
    assert g.data.shape == (3, 1, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DiffusionLabError, match="missing_dir"):
        load_dataset({"name": "image_folder", "path": str(tmp_path / "missing_dir")})
    with pytest.raises(DiffusionLabError, match="holds no images"):
        load_dataset({"name": "image_folder", "path": str(tmp_path)})
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DiffusionLabError, match="bad.png"):
        load_dataset({"name": "image_folder", "path": str(tmp_path)})
    with pytest.raises(DiffusionLabError, match="channels"):
        load_dataset({"name": "image_folder", "path": str(tmp_path), "channels": 2})


# ---- MNIST ------------------------------------------------------------------------------------------------
def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write(path, data: bytes, gz: bool = False):
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labs = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx(imgs), gz)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx(labs), gz)
    d = load_dataset({"name": "mnist", "path": str(tmp_path), "split": "test"})
    assert d.data.shape == (5, 1, 28, 28) and d.labels.tolist() == [3, 1, 4, 1, 5]
    assert torch.equal(to_uint8(d.data)[:, 0], torch.from_numpy(imgs))
    with pytest.raises(DiffusionLabError, match="train-images-idx3-ubyte"):  # names the missing file
        load_dataset({"name": "mnist", "path": str(tmp_path), "split": "train"})


def test_mnist_malformed(tmp_path):
    imgs = np.zeros((4, 28, 28), dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(4, dtype=np.uint8)))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03" + _idx(imgs)[4:])
    with pytest.raises(DiffusionLabError, match="train-images-idx3-ubyte.*bad magic"):
        load_dataset({"name": "mnist", "path": str(tmp_path)})
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(imgs)[:-10])
    with pytest.raises(DiffusionLabError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset({"name": "mnist", "path": str(tmp_path)})
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(imgs[:3]))
    with pytest.raises(DiffusionLabError, match="3 images but 4 labels"):
        load_dataset({"name": "mnist", "path": str(tmp_path)})
    with pytest.raises(DiffusionLabError, match="no_mnist_here"):
        load_dataset({"name": "mnist", "path": str(tmp_path / "no_mnist_here")})


# ---- CIFAR-10 ---------------------------------------------------------------------------------------------
def _cifar_batch(rng, n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    pix = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels[:, None], pix], axis=1).tobytes(), labels, pix


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    all_pix, all_lab = [], []
    for i in range(1, 6):
        raw, lab, pix = _cifar_batch(rng, i)  # batches of 1..5 records: 15 in all
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        all_pix.append(pix)
        all_lab.append(lab)
    raw, tlab, tpix = _cifar_batch(rng, 2)
    (folder / "test_batch.bin").write_bytes(raw)
    d = load_dataset({"name": "cifar10", "path": str(tmp_path)})  # the parent folder works too
    assert d.data.shape == (15, 3, 32, 32) and d.labels.tolist() == np.concatenate(all_lab).tolist()
    assert torch.equal(to_uint8(d.data).reshape(15, -1), torch.from_numpy(np.concatenate(all_pix)))
    # channel-major layout: the first 1024 pixel bytes are the red plane
    assert torch.equal(to_uint8(d.data[0, 0]).flatten(), torch.from_numpy(all_pix[0][0, :1024]))
    t = load_dataset({"name": "cifar10", "path": str(folder), "split": "test"})
    assert t.data.shape == (2, 3, 32, 32) and t.labels.tolist() == tlab.tolist()
    (folder / "test_batch.bin").write_bytes(raw[:-5])
    with pytest.raises(DiffusionLabError, match="test_batch.bin.*malformed"):
        load_dataset({"name": "cifar10", "path": str(folder), "split": "test"})
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DiffusionLabError, match="data_batch_3.bin"):
        load_dataset({"name": "cifar10", "path": str(folder)})


def test_cifar10_refuses_pickle_version(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"\x80\x04 this would be a pickle")
    for path in (folder, tmp_path):
        with pytest.raises(DiffusionLabError, match="never unpickles.*cifar-10-batches-bin"):
            load_dataset({"name": "cifar10", "path": str(path)})
    with pytest.raises(DiffusionLabError, match="nowhere"):
        load_dataset({"name": "cifar10", "path": str(tmp_path / "nowhere")})


# ---- arrays -----------------------------------------------------------------------------------------------
def test_array_npy_npz(tmp_path):
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(50, 3)) * 5
    np.save(tmp_path / "pts.npy", pts)
    d = load_dataset({"name": "array", "path": str(tmp_path / "pts.npy")})
    assert d.kind == "points" and d.data.dtype == torch.float32 and torch.allclose(d.data.double(),
                                                                                      torch.from_numpy(pts), atol=1e-5)
    imgs = rng.random((4, 3, 8, 8)).astype(np.float32)
    vids = rng.integers(0, 256, (2, 1, 5, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "bundle.npz", images=imgs, videos=vids, y=np.arange(4))
    d = load_dataset({"name": "array", "path": str(tmp_path / "bundle.npz"), "range": "unit", "labels": "y"})
    assert d.kind == "images" and d.sample_shape == (3, 8, 8) and d.labels.tolist() == [0, 1, 2, 3]
    assert torch.allclose(d.data, to_model(torch.from_numpy(imgs)))
    v = load_dataset({"name": "array", "path": str(tmp_path / "bundle.npz"), "key": "videos"})
    assert v.kind == "videos" and v.sample_shape == (1, 5, 4, 4) and torch.equal(to_uint8(v.data), torch.from_numpy(vids))
    assert v.to_display(v.data).min() >= 0
    m = load_dataset({"name": "array", "path": str(tmp_path / "bundle.npz"), "range": "model"})
    assert torch.equal(m.data, torch.from_numpy(imgs))


def test_array_errors(tmp_path):
    imgs = np.random.default_rng(4).random((2, 1, 4, 4))
    np.save(tmp_path / "imgs.npy", imgs)
    with pytest.raises(DiffusionLabError, match="set range"):
        load_dataset({"name": "array", "path": str(tmp_path / "imgs.npy")})
    np.save(tmp_path / "big.npy", imgs * 3)
    with pytest.raises(DiffusionLabError, match=r"big.npy.*outside \[0, 1\]"):
        load_dataset({"name": "array", "path": str(tmp_path / "big.npy"), "range": "unit"})
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DiffusionLabError, match="obj.npy"):  # never unpickled
        load_dataset({"name": "array", "path": str(tmp_path / "obj.npy")})
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DiffusionLabError, match="junk.npy"):
        load_dataset({"name": "array", "path": str(tmp_path / "junk.npy")})
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DiffusionLabError, match="junk.npz"):
        load_dataset({"name": "array", "path": str(tmp_path / "junk.npz")})
    np.save(tmp_path / "three.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DiffusionLabError, match=r"three.npy.*\(2, 3, 4\)"):
        load_dataset({"name": "array", "path": str(tmp_path / "three.npy")})
    np.savez(tmp_path / "k.npz", a=np.zeros((3, 2)))
    with pytest.raises(DiffusionLabError, match="no array 'b'.*holds: a"):
        load_dataset({"name": "array", "path": str(tmp_path / "k.npz"), "key": "b"})
    with pytest.raises(DiffusionLabError, match="missing.npy"):
        load_dataset({"name": "array", "path": str(tmp_path / "missing.npy")})
    with pytest.raises(DiffusionLabError, match="range"):
        load_dataset({"name": "array", "path": str(tmp_path / "k.npz"), "range": "bytes"})
