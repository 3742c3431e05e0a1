"""Streaming data: the counter-based order, streaming against in-memory, workers against none, resume in the middle
of an epoch, the horizontal flip, data-parallel slices, bad files, and the choice ``data.stream: auto``.

Equality checks here use ``torch.equal`` only where the very same operations run: both paths decode every sample
with the same :class:`~diffusionlab.data.sources.Source` code (one sample at a time), gather and mirror without
arithmetic, and then train with the same code on equal tensors.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fakedata as fake

from diffusionlab.data import load_dataset, open_source
from diffusionlab.data.order import epoch_permutation, flip_mask, step_indices
from diffusionlab.data.sources import MAX_SUBSTITUTES
from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.config import resolve
from diffusionlab.training.trainer import build_parts, train

UNET = {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1, "attn_resolutions": []}


def _image_cfg(folder: Path, **train) -> dict:
    return {"data": {"name": "image_folder", "path": str(folder), "image_size": 8},
            "process": {"name": "vp", "T": 20}, "model": UNET,
            "train": {"steps": 6, "batch_size": 4, "warmup": 2, "checkpoint_every": 3, "log_every": 2,
                      "device": "cpu", "threads": 1, "seed": 3, **train},
            "sample": {"sampler": "ddim", "steps": 3}}


def _batches(cfg: dict, overrides: list[str], steps, rank_slice=None) -> torch.Tensor:
    p = build_parts(resolve(cfg, overrides), log=lambda m: None)
    if rank_slice is not None:
        p.batches.part = rank_slice
        if hasattr(p.batches, "batches"):
            p.batches.batches.part = rank_slice
    try:
        return torch.stack([p.batches.get(k) for k in steps])
    finally:
        p.batches.close()


# ---- the order --------------------------------------------------------------------------------------------------
def test_every_epoch_is_a_permutation_and_batches_run_on_across_epochs():
    n, b = 13, 4
    # steps 0..12 read exactly 4 epochs (52 positions): every sample once per epoch, in that epoch's order
    flat = torch.cat([step_indices(7, k, b, n) for k in range(13)])
    for e in range(4):
        assert torch.equal(flat[e * n:(e + 1) * n], epoch_permutation(7, e, n))
        assert sorted(flat[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(epoch_permutation(7, 0, n), epoch_permutation(7, 1, n))  # each epoch shuffled anew
    # a batch larger than the set spans several epochs
    big = step_indices(7, 2, 30, n)
    assert torch.equal(big, torch.cat([epoch_permutation(7, e, n) for e in range(4, 7)])[60 - 52:90 - 52])


def test_the_batch_of_a_step_is_a_function_of_seed_and_step_alone():
    epoch_permutation.cache_clear()
    a = step_indices(5, 1000, 8, 50)
    epoch_permutation.cache_clear()
    assert torch.equal(a, step_indices(5, 1000, 8, 50))  # no state: computed afresh, the same
    assert not torch.equal(a, step_indices(6, 1000, 8, 50))
    assert torch.equal(flip_mask(5, 3, 8), flip_mask(5, 3, 8)) and not torch.equal(flip_mask(5, 3, 64),
                                                                                  flip_mask(5, 4, 64))


def test_rank_slices_concatenate_to_the_global_batch():
    for step in (0, 3, 11):
        whole = step_indices(1, step, 12, 29)
        parts = [step_indices(1, step, 12, 29, slice(r * 3, (r + 1) * 3)) for r in range(4)]
        assert torch.equal(torch.cat(parts), whole)
        assert torch.equal(torch.cat([flip_mask(1, step, 12, slice(r * 3, (r + 1) * 3)) for r in range(4)]),
                           flip_mask(1, step, 12))


# ---- streaming against in-memory, workers against none ------------------------------------------------------------
SETS = {
    "image_folder": (lambda t: {"name": "image_folder", "path": str(fake.pngs(t / "imgs", 11)), "image_size": 8},
                     UNET),
    "cifar10": (lambda t: {"name": "cifar10", "path": str(fake.cifar10(t / "cifar"))}, UNET),
    "mnist": (lambda t: {"name": "mnist", "path": str(fake.mnist(t / "mnist"))}, UNET),
    "moving_mnist": (lambda t: {"name": "moving_mnist", "path": str(fake.moving_mnist(t / "mm")), "frames": 4,
                                "size": 16}, None),
    "video_folder": (lambda t: {"name": "video_folder", "path": str(fake.npy_videos(t / "vids")), "frames": 4,
                                "size": 8}, None),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_streaming_and_in_memory_give_the_same_batches(tmp_path, name):
    """The same seed: the in-memory path and the loader with 0 and with 2 workers give the very same batches of
    steps 0..5 (several epochs of the small sets), flipped or not; the in-memory set is the loader's samples."""
    data, model = SETS[name]
    d = data(tmp_path)
    cfg = {"data": {**d, "flip": True}, "process": {"name": "vp", "T": 20},
           "train": {"batch_size": 4, "device": "cpu", "seed": 9}, "sample": {"sampler": "ddim", "steps": 3}}
    if model:
        cfg["model"] = model
    else:
        cfg["model"] = {"name": "video_unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1,
                        "attn_resolutions": []}
    steps = range(6)
    memory = _batches(cfg, ["data.stream=false"], steps)
    assert torch.equal(memory, _batches(cfg, ["data.stream=true", "data.workers=0"], steps))
    assert torch.equal(memory, _batches(cfg, ["data.stream=true", "data.workers=2"], steps))
    src, ds = open_source(d), load_dataset(d)
    assert len(src) == len(ds) and all(torch.equal(src.load(i), ds.data[i]) for i in range(len(ds)))


def test_generated_sets_stream_the_draw_of_the_runs_seed():
    """A set without a file reader (the 2-D ring, generated from train.seed) streamed from memory: the same draw,
    so the same batches, as the in-memory path (seed 5, not the loader's default)."""
    cfg = {"data": {"name": "ring", "num": 50}, "model": {"name": "mlp", "hidden": 8, "depth": 1, "emb_dim": 8},
           "train": {"batch_size": 8, "device": "cpu", "seed": 5}}
    memory = _batches(cfg, ["data.stream=false"], range(8))
    assert torch.equal(memory, _batches(cfg, ["data.stream=true", "data.workers=1"], range(8)))


def test_data_parallel_ranks_read_their_slices_of_the_same_global_batch(tmp_path):
    """Each rank of a 2-process job reads its half of the global batch (streamed or in memory): together, the batch
    one process reads."""
    cfg = _image_cfg(fake.pngs(tmp_path / "imgs", 9), batch_size=6)
    whole = _batches(cfg, ["data.stream=true", "data.workers=0"], range(4))
    halves = [_batches(cfg, [f"data.stream={s}", "data.workers=0"], range(4), slice(r * 3, (r + 1) * 3))
              for r, s in ((0, "true"), (1, "false"))]
    assert torch.equal(torch.cat(halves, dim=1), whole)


def test_flip_mirrors_the_chosen_samples_and_nothing_else(tmp_path):
    cfg = _image_cfg(fake.pngs(tmp_path / "imgs", 9), batch_size=8)
    plain = _batches(cfg, ["data.stream=true", "data.workers=0"], range(3))
    flipped = _batches(cfg, ["data.stream=true", "data.workers=0", "data.flip=true"], range(3))
    masks = [flip_mask(3, k, 8) for k in range(3)]
    assert 0 < int(sum(m.sum() for m in masks)) < 24  # some mirrored, some not
    for k, m in enumerate(masks):
        assert torch.equal(flipped[k][m], plain[k][m].flip(-1)) and torch.equal(flipped[k][~m], plain[k][~m])


@pytest.mark.parametrize("key, value, fragment", [
    ("stream", "sometimes", "data.stream must be true, false or auto"),
    ("workers", -1, "data.workers must be an integer in [0, 256] or auto"),
    ("prefetch", 0, "data.prefetch must be an integer in [1, 64]"),
    ("flip", "yes", "data.flip must be true or false"),
    ("bad_files", "ignore", "bad_files must be one of error, skip"),
])
def test_bad_loading_keys_are_refused_naming_them(tmp_path, key, value, fragment):
    cfg = _image_cfg(fake.pngs(tmp_path / "imgs", 2))
    cfg["data"][key] = value
    with pytest.raises(DiffusionLabError) as e:
        build_parts(resolve(cfg), log=lambda m: None)
    assert fragment in str(e.value)


def test_a_fitted_covariance_needs_the_set_in_memory(tmp_path):
    """process.noise: fitted is fitted to the whole training set: refused when it is streamed, nothing written."""
    cfg = {"data": {"name": "video_folder", "path": str(fake.npy_videos(tmp_path / "vids")), "frames": 4, "size": 8,
                    "stream": True},
           "process": {"name": "vp", "T": 20, "noise": "fitted"},
           "model": {"name": "video_unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1,
                     "attn_resolutions": []}, "train": {"batch_size": 2, "device": "cpu", "steps": 2}}
    with pytest.raises(DiffusionLabError, match="a streamed set does not hold in memory: set data.stream=false"):
        _run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    _run(cfg, tmp_path / "run", ["data.stream=false"])  # in memory it is fitted and trains
    assert (tmp_path / "run" / "noise_covariance.safetensors").exists()


def test_flip_is_refused_for_points():
    with pytest.raises(DiffusionLabError, match="data.flip mirrors images and videos"):
        resolve({"data": {"name": "ring", "flip": True}})


def test_auto_keeps_small_sets_in_memory_and_streams_large_ones(tmp_path, monkeypatch):
    import diffusionlab.training.batches as batches

    cfg = _image_cfg(fake.pngs(tmp_path / "imgs", 5))
    assert not build_parts(resolve(cfg), log=lambda m: None).batches.streaming  # 5 KB decoded
    assert not build_parts(resolve({"data": {"name": "digits"}, "train": {"device": "cpu"}})).batches.streaming
    monkeypatch.setattr(batches, "AUTO_STREAM_FRACTION", 1e-12)  # any set is then "larger than the memory"
    p = build_parts(resolve(cfg), log=lambda m: None)
    assert p.batches.streaming and p.data is None
    p.batches.close()
    # a set without a file reader stays in memory however small the budget
    assert not build_parts(resolve({"data": {"name": "digits"}, "train": {"device": "cpu"}})).batches.streaming


# ---- resume in the middle of an epoch ---------------------------------------------------------------------------
def _run(cfg: dict, out: Path, overrides=(), resume=False, log=None) -> dict:
    return train(resolve(cfg, list(overrides)), out, resume=resume, progress=False, log=log or (lambda m: None))


def _same_weights(a: Path, b: Path) -> bool:
    return all(torch.equal(x, y) for name in ("model.safetensors", "model_raw.safetensors")
               for x, y in zip(load_file(str(a / name)).values(), load_file(str(b / name)).values()))


def test_resume_in_the_middle_of_an_epoch_continues_with_the_same_batches(tmp_path):
    """13 images, batch 4: the checkpoint at step 3 is 12 samples into the first epoch. A streamed run (2 workers
    prefetching past the checkpoint) stopped there and resumed -- once streamed again, once in memory -- reaches
    the weights of an uninterrupted in-memory run bit for bit: the batches after the checkpoint are the same."""
    folder = fake.pngs(tmp_path / "imgs", 13)
    cfg = _image_cfg(folder, steps=7, checkpoint_every=3)
    cfg["data"]["flip"] = True
    straight = tmp_path / "straight"
    _run(cfg, straight, ["data.stream=false"])
    for how in ("true", "false"):
        run = tmp_path / f"resumed_{how}"
        _run(cfg, run, ["data.stream=true", "data.workers=2", "train.steps=3"])
        _run(cfg, run, [f"data.stream={how}", "data.workers=2"], resume=True)
        assert _same_weights(straight, run), how


# ---- bad files --------------------------------------------------------------------------------------------------
def _bad_folder(tmp: Path) -> tuple[Path, dict]:
    """9 good PNGs and four bad files: text named .png, a CMYK JPEG, a decompression bomb (refused by their
    headers) and a truncated PNG (its header is fine, its body does not decode)."""
    from PIL import Image

    folder = fake.pngs(tmp / "imgs", 9)
    bad = {"text": folder / "a_text.png", "cmyk": folder / "b_cmyk.jpg", "bomb": folder / "c_bomb.png",
           "truncated": folder / "004_cut.png"}
    bad["text"].write_text("not an image")
    Image.new("CMYK", (8, 8)).save(bad["cmyk"])
    Image.new("L", (300, 300)).save(bad["bomb"], optimize=True)  # 90000 pixels > the 65536 the tests allow
    data = (folder / "004.png").read_bytes()
    bad["truncated"].write_bytes(data[: len(data) // 2])
    return folder, bad


def test_bad_files_are_refused_by_default_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONLAB_MAX_IMAGE_PIXELS", str(1 << 16))
    folder, bad = _bad_folder(tmp_path)
    for stream in ("true", "false"):
        with pytest.raises(DiffusionLabError, match=r"a_text\.png.*and 2 other file\(s\) of the 13.*bad_files=skip"):
            build_parts(resolve(_image_cfg(folder), [f"data.stream={stream}"]), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_skipped_bad_files_are_reported_with_their_paths_and_training_completes(tmp_path, monkeypatch):
    """bad_files: skip -- the three files refused by their headers are left out (each named); the truncated PNG,
    found only when decoded, is replaced in its batch by the next file (streamed) or left out (in memory); training
    runs every step."""
    monkeypatch.setenv("DIFFUSIONLAB_MAX_IMAGE_PIXELS", str(1 << 16))
    folder, bad = _bad_folder(tmp_path)
    for stream in ("true", "false"):
        lines = []
        cfg = _image_cfg(folder, steps=10)
        cfg["data"]["bad_files"] = "skip"
        summary = _run(cfg, tmp_path / f"run_{stream}", [f"data.stream={stream}", "data.workers=2"],
                       log=lines.append)
        assert "stopped" not in summary and summary["data"] == ("streamed" if stream == "true" else "in memory")
        assert (tmp_path / f"run_{stream}" / "model.safetensors").exists()
        text = "\n".join(lines)
        for key in ("text", "cmyk", "bomb", "truncated"):
            assert str(bad[key]) in text, (stream, key, text)
        assert text.count(str(bad["truncated"])) == 1, text  # reported once, though read in several epochs
        if stream == "true":
            assert "took the next file in its place" in text


def test_a_file_that_does_not_decode_mid_run_stops_cleanly_with_a_checkpoint(tmp_path):
    """bad_files: error (the default) and a PNG whose header is fine but whose body is cut (sorted last, so the
    checks before training, which decode the first 8 files, do not meet it): the streamed run stops before the
    first step that reads it, with a checkpoint of the steps done and one line naming the file; after the file is
    removed, --resume (a folder of another size: reported) finishes the run."""
    folder = fake.pngs(tmp_path / "imgs", 9)
    cut = folder / "zz_cut.png"
    data = (folder / "004.png").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    cfg = _image_cfg(folder, steps=12, checkpoint_every=100)  # seed 3: the cut file (index 9) is first read at step 2
    assert min(k for k in range(12) if 9 in step_indices(3, k, 4, 10).tolist()) == 2
    run = tmp_path / "run"
    with pytest.raises(DiffusionLabError, match=r"training stopped before step 3: cannot read image .*zz_cut\.png.*"
                                                 r"image file is truncated.*the last checkpoint \(step 2\) is intact.*"
                                                 r"--resume"):
        _run(cfg, run, ["data.stream=true", "data.workers=2"])
    from diffusionlab.training.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    cut.unlink()
    lines = []
    _run(cfg, run, ["data.stream=true", "data.workers=2"], resume=True, log=lines.append)
    assert (run / "model.safetensors").exists()
    assert any("had 10 samples when the checkpoint was written and has 9 now" in line for line in lines), lines


def test_the_substitution_gives_up_after_a_bounded_number_of_files(tmp_path):
    from diffusionlab.data.sources import DataError, load_or_next

    folder = fake.pngs(tmp_path / "imgs", MAX_SUBSTITUTES + 2)
    src = open_source({"name": "image_folder", "path": str(folder), "image_size": 8, "bad_files": "skip"})
    for f in src.files:
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="do not load either"):
        load_or_next(src, 0)


def test_worker_errors_do_not_leak_tracebacks(tmp_path):
    """A failing read in a worker arrives as the message of the file, not as a worker traceback."""
    folder = fake.pngs(tmp_path / "imgs", 4)
    p = build_parts(resolve(_image_cfg(folder), ["data.stream=true", "data.workers=1"]), log=lambda m: None)
    for f in p.ds.files:
        Path(f).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    from diffusionlab.data.sources import DataError

    with pytest.raises(DataError) as e:
        p.batches.get(0)
    p.batches.close()
    assert "Traceback" not in str(e.value) and "cannot read image" in str(e.value)


def test_cli_training_from_a_streamed_folder_is_one_line_per_bad_file(tmp_path):
    from diffusionlab.cli import main

    folder = fake.pngs(tmp_path / "imgs", 6)
    (folder / "zz.png").write_text("junk")
    cfg = _image_cfg(folder, steps=4)
    cfg["data"].update(stream=True, workers=1, bad_files="skip")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 0, lines
    assert sum("zz.png" in line for line in lines) == 1 and not any("Traceback" in line for line in lines), lines
    assert "samples/s" in lines[-1], lines[-1]
