"""Bad input everywhere in the CLI: one clear line on stderr, exit status 2, no traceback, no partial output.

Each case here is a row of the table in docs/errors.md (regenerate it with
``python tests/test_cli_errors.py > docs/errors.md``; the faults of tests/test_reliability.py make its second table).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffusionlab.cli import main

TINY = {
    "data": {"name": "ring", "num": 500},
    "process": {"name": "vp", "T": 50},
    "model": {"name": "mlp", "hidden": 16, "depth": 1, "emb_dim": 8},
    "train": {"steps": 2, "batch_size": 16, "checkpoint_every": 1, "log_every": 1, "device": "cpu"},
    "sample": {"sampler": "ddim", "steps": 5},
}


def _cfg(tmp: Path, **sections) -> str:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for name, values in sections.items():
        if values is None:
            cfg.pop(name)
        else:
            cfg[name] = values
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _quick_results(tmp: Path) -> str:
    """The shipped results.json of the noise-prior experiment's --quick run, copied under ``tmp``."""
    import shutil

    dst = tmp / "quick_results.json"
    shutil.copyfile(Path(__file__).parents[1] / "docs" / "video" / "noise_prior_quick" / "results.json", dst)
    return str(dst)


def _run(tmp: Path) -> str:
    """A finished tiny run (shared by the sample/evaluate cases)."""
    run = tmp / "run"
    if not (run / "model.safetensors").exists():
        assert main(["train", _cfg(tmp), "--out", str(run), "--quiet"]) == 0
    return str(run)


def _bad_yaml(tmp):
    p = tmp / "bad.yaml"
    p.write_text("train:\n  steps: [1, 2\n")
    return str(p)


def _garbage_npy(tmp):
    p = tmp / "garbage.npy"
    p.write_bytes(b"this is not a numpy file")
    return str(p)


def _garbage_pth(tmp):
    p = tmp / "garbage.pth"
    p.write_bytes(b"this is not a weights file")
    return str(p)


def _npy(tmp, name: str, arr) -> str:
    p = tmp / f"{name}.npy"
    np.save(p, arr)
    return str(p)


def _corrupt_weights(tmp):
    run = Path(_run(tmp))
    bad = tmp / "corrupt_run"
    bad.mkdir(exist_ok=True)
    (bad / "config.yaml").write_text((run / "config.yaml").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    return str(bad)


# (case, what it shows, argv builder taking tmp_path, expected fragment of the message)
CASES = [
    ("missing config", "config file that does not exist",
     lambda t: ["train", str(t / "nope.yaml"), "--out", str(t / "o")], "config file not found"),
    ("malformed YAML", "unbalanced bracket",
     lambda t: ["train", _bad_yaml(t), "--out", str(t / "o")], "malformed YAML"),
    ("unknown key", "`--set train.bogus=1`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "train.bogus=1"], "unknown key train.bogus"),
    ("wrong type", "`--set train.steps=abc`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "train.steps=abc"], "train.steps must be"),
    ("beta >= 1", "`--set process.beta_end=1.5`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.beta_end=1.5"], "betas must lie in (0, 1)"),
    ("negative sigma", "VE chain with `sigma_min: -1`",
     lambda t: ["train", _cfg(t, process={"name": "ve", "L": 10, "sigma_min": -1.0, "sigma_max": 1.0}), "--out",
                str(t / "o")], "sigma_min must be positive"),
    ("non-PSD C", "`process.noise: toeplitz:1,2` over the 2 coordinates",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.noise=toeplitz:1,2"],
     "not positive semi-definite"),
    ("C axis not in data", "`process.noise_axis: 3` for 2-D points",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.noise=mixed:0.5",
                "--set", "process.noise_axis=3"], "noise_axis = 3"),
    ("missing data file", "`data: {name: array, path: /nonexistent.npy}`",
     lambda t: ["train", _cfg(t, data={"name": "array", "path": str(t / "nonexistent.npy")}), "--out", str(t / "o")],
     "nonexistent.npy"),
    ("malformed data file", "an `.npy` holding text",
     lambda t: ["train", _cfg(t, data={"name": "array", "path": _garbage_npy(t), "range": "raw"}), "--out",
                str(t / "o")], "garbage.npy"),
    ("unknown dataset", "`data.name: imagenet`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "data.name=imagenet"], "unknown dataset 'imagenet'"),
    ("shape the model cannot take", "a 4-level U-Net on 8x8 digits",
     lambda t: ["train", _cfg(t, data={"name": "digits"}, model={"name": "unet", "base_channels": 8,
                                                                  "channel_mults": [1, 2, 2, 2, 2]}),
                "--out", str(t / "o")], "is not divisible by"),
    ("unwritable output", "`--out` below a regular file",
     lambda t: ["train", _cfg(t), "--out", str(_file(t) / "sub")], "cannot write"),
    ("unknown sampler", "`sample --sampler nope`",
     lambda t: ["sample", "--run", _run(t), "--sampler", "nope", "--out", str(t / "o.npz")], "unknown sampler 'nope'"),
    ("bad output suffix", "`sample --out samples.txt`",
     lambda t: ["sample", "--run", _run(t), "--out", str(t / "o.txt")], "--out must end in"),
    ("missing run", "`sample --run` a directory that does not exist",
     lambda t: ["sample", "--run", str(t / "norun"), "--out", str(t / "o.npz")], "run directory not found"),
    ("bad number of samples", "`sample --num 0`",
     lambda t: ["sample", "--run", _run(t), "--num", "0", "--out", str(t / "o.npz")], "number of samples"),
    ("non-integer argument", "`sample --num many`",
     lambda t: ["sample", "--run", _run(t), "--num", "many", "--out", str(t / "o.npz")], "invalid int value"),
    ("corrupted weights", "`model.safetensors` overwritten with garbage",
     lambda t: ["sample", "--run", _corrupt_weights(t), "--out", str(t / "o.npz")], "not a valid safetensors"),
    ("malformed --set", "`--set trainsteps`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "trainsteps"], "section.key=value"),
    ("evaluate on wrong data", "`evaluate` (digits metric) on a 2-D run",
     lambda t: ["evaluate", "--run", _run(t), "--num", "10"], "needs a run trained on digits"),
    ("unknown command", "`diffusionlab fly`", lambda t: ["fly"], "invalid choice"),
    ("FID without weights", "`evaluate --metric fid` without `--inception`",
     lambda t: ["evaluate", "--run", _run(t), "--metric", "fid"], "needs --inception PATH"),
    ("missing Inception weights", "`evaluate --metric fid --inception` a file that does not exist",
     lambda t: ["evaluate", "--run", _run(t), "--metric", "fid", "--inception", str(t / "nope.pth")],
     "Inception weights file not found"),
    ("Inception file that is not weights", "`--inception` a `.pth` holding garbage",
     lambda t: ["evaluate", "--run", _run(t), "--metric", "fid", "--inception", _garbage_pth(t)], "refused to load"),
    ("no model", "`sample` with neither `--run` nor `--diffusers`",
     lambda t: ["sample", "--out", str(t / "o.npz")], "exactly one of --run"),
    ("missing diffusers folder", "`sample --diffusers` a folder that does not exist",
     lambda t: ["sample", "--diffusers", str(t / "nodir"), "--out", str(t / "o.npz")], "diffusers folder not found"),
    ("export that does not map", "`export` of an MLP run",
     lambda t: ["export", "--run", _run(t), "--out", str(t / "exp")], "cannot be exported to diffusers"),
    ("class of an unconditional model", "`sample --class 3` on a run without `model.num_classes`",
     lambda t: ["sample", "--run", _run(t), "--class", "3", "--out", str(t / "o.npz")], "not class-conditional"),
    ("guidance without a class", "`sample --guidance 2` without `--class`",
     lambda t: ["sample", "--run", _run(t), "--guidance", "2", "--out", str(t / "o.npz")], "needs classes"),
    ("mask that does not fit", "`oracle sample --known` of 2-D points with a mask of 3 entries",
     lambda t: ["oracle", "sample", "--gmm", "ring8", "--known", _npy(t, "k", np.zeros((4, 2))), "--mask",
                _npy(t, "m", np.ones(3)), "--method", "smc", "--nfe", "10", "--out", str(t / "o.npy")],
     "does not broadcast"),
    ("unknown conditional method", "`oracle sample --method inpaint`",
     lambda t: ["oracle", "sample", "--gmm", "ring8", "--known", _npy(t, "k", np.zeros((4, 2))), "--mask",
                _npy(t, "m", np.array([1, 0])), "--method", "inpaint", "--nfe", "10", "--out", str(t / "o.npy")],
     "unknown conditional method 'inpaint'"),
]


def _file(t: Path) -> Path:
    f = t / "a_file"
    f.write_text("x")
    return f


# ---- builders of hostile inputs (issue 18) ----------------------------------------------------------------
def _sde_run(tmp: Path) -> str:
    run = tmp / "sde_run"
    if not (run / "model.safetensors").exists():
        cfg = _cfg(tmp, process={"name": "vp-sde"}, objective={"name": "dsm"},
                   sample={"sampler": "euler-maruyama", "steps": 5})
        assert main(["train", cfg, "--out", str(run), "--quiet"]) == 0
    return str(run)


def _stopped_run(tmp: Path) -> str:
    """A tiny run stopped at a checkpoint (no final weights): what --resume continues."""
    run = Path(_run(tmp))
    (run / "model.safetensors").unlink(missing_ok=True)
    return str(run)


def _alias_bomb(tmp: Path) -> str:
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    p = tmp / "bomb.yaml"
    p.write_text("sample:\n" + "".join(f"  {line}\n" for line in lines) + "train:\n  lr: *a8\n")
    return str(p)


def _huge_config(tmp: Path) -> str:
    p = tmp / "huge.yaml"
    p.write_text("train:\n  steps: 2\n" + "# padding\n" * 200_000)
    return str(p)


def _array(tmp: Path, name: str, arr) -> str:
    p = tmp / name
    np.save(p, arr)
    return str(p)


def _lying_npy(tmp: Path) -> str:
    p = tmp / "huge.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 2)})
        f.write(np.zeros(8, np.float32).tobytes())
    return str(p)


def _pickle_npz(tmp: Path) -> str:
    import pickle
    import zipfile

    p = tmp / "pickled.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", pickle.dumps({"a": 1}))
    return str(p)


def _folder(tmp: Path, name: str, files: dict) -> str:
    d = tmp / name
    d.mkdir(exist_ok=True)
    for fname, write in files.items():
        write(d / fname)
    return str(d)


def _pixel_bomb(path: Path) -> None:
    from PIL import Image

    Image.new("L", (10000, 10000)).save(path, optimize=True)  # about 100 KB on disk, 10^8 pixels


def _video(name: str, shape: tuple) -> dict:
    return {name: lambda p: np.save(p, np.zeros(shape, np.uint8))}


def _held_lock(tmp: Path) -> str:
    """A run directory whose lock another writer holds (released by the fixture after the case)."""
    from diffusionlab.training.rundir import RunLock

    run = tmp / "locked"
    _HELD.append(RunLock(run).acquire())
    return str(run)


_HELD: list = []


def _unusable_checkpoints(tmp: Path) -> str:
    from diffusionlab.training.checkpoint import list_checkpoints

    run = Path(_stopped_run(tmp))
    for path in list_checkpoints(run):
        f = path / "state.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    return str(run)


def _checkpoints_file(tmp: Path) -> str:
    run = tmp / "run_with_file"
    run.mkdir(exist_ok=True)
    (run / "checkpoints").write_text("not a directory")
    return str(run)


def _nan_weights_run(tmp: Path) -> str:
    from safetensors.torch import load_file, save_file

    run = Path(_run(tmp))
    w = load_file(str(run / "model.safetensors"))
    key = next(iter(w))
    w[key] = w[key] * float("nan")
    save_file(w, str(run / "model.safetensors"))
    return str(run)


def _out_dir(tmp: Path) -> str:
    d = tmp / "samples.npz"
    d.mkdir(exist_ok=True)
    return str(d)


def _array_cfg(tmp: Path, path: str, **data) -> str:
    return _cfg(tmp, data={"name": "array", "path": path, **data}, model={"name": "mlp", "hidden": 16, "depth": 1})


def _image_cfg(tmp: Path, folder: str) -> str:
    return _cfg(tmp, data={"name": "image_folder", "path": folder, "image_size": 8, "channels": 1}, model=None)


def _video_cfg(tmp: Path, folder: str) -> str:
    return _cfg(tmp, data={"name": "video_folder", "path": folder, "frames": 4, "size": 8}, model=None)


HOSTILE = [
    # item 8: values not checked or bounded
    ("process key as a string", "`--set process.noise_axis='2'`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.noise_axis='2'"],
     "process.noise_axis must be an integer"),
    ("process key as a list", "`--set process.beta_end=[0.1]`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.beta_end=[0.1]"],
     "process.beta_end must be a number"),
    ("fractional axis", "`--set process.noise_axis=1.7`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.noise_axis=1.7"],
     "process.noise_axis must be an integer"),
    ("huge T", "`--set process.T=1000000000`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.T=1000000000"], "at most 100000"),
    ("huge batch", "`--set train.batch_size=1000000000000`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "train.batch_size=1000000000000"],
     "DIFFUSIONLAB_MAX_BATCH_SIZE"),
    ("seed of 2^63", "`--set train.seed=9223372036854775808`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "train.seed=9223372036854775808"],
     "train.seed must be an integer in [0, 2^63)"),
    ("bad device name", "`--set train.device=cuda:abc`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "train.device=cuda:abc"], "train.device must be"),
    ("overflowing noise prior", "`process.noise: mixed:1e200` (frames)",
     lambda t: ["train", _cfg(t, data={"name": "moving_digits", "num": 8, "frames": 4, "size": 8}, model=None),
                "--out", str(t / "o"), "--set", "process.noise=mixed:1e200"], "noise-prior alpha must be at most"),
    ("experiment sittings that differ", "`experiment noise-prior --preset cpu-finetune --reuse` of the `--quick` "
     "run's results.json", lambda t: ["experiment", "noise-prior", "--preset", "cpu-finetune", "--reuse",
                                      _quick_results(t), "--out", str(t / "o")], "were trained or scored otherwise"),
    ("vanishing Toeplitz noise", "`process.noise: toeplitz:1e-300`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "process.noise=toeplitz:1e-300"],
     "diagonal a = 1e-300 must lie in"),
    ("infinite weight decay", "`--set train.weight_decay=.inf`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "train.weight_decay=.inf"],
     "train.weight_decay must be a finite number"),
    ("bad sample: section found by train", "`--set sample.sampler=nope`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "sample.sampler=nope"], "unknown sampler 'nope'"),
    ("sample steps beyond T found by train", "`--set sample.steps=5000`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "sample.steps=5000"], "<= T = 50"),
    ("absurd thread count", "`--set train.threads=100000`",
     lambda t: ["train", _cfg(t), "--out", str(t / "o"), "--set", "train.threads=100000"],
     "train.threads must be an integer in [0, 1024]"),
    ("YAML alias bomb", "nine nested aliases of nine (10^9 values) in a 400-byte config",
     lambda t: ["train", _alias_bomb(t), "--out", str(t / "o")], "alias bomb"),
    ("oversized config", "a 2 MB config file", lambda t: ["train", _huge_config(t), "--out", str(t / "o")],
     "larger than the 1048576 bytes"),
    ("evaluate with zero steps", "`evaluate --steps 0`",
     lambda t: ["evaluate", "--run", _run(t), "--steps", "0", "--num", "10"], "--steps must be an integer >= 1"),
    ("demo with no samples", "`demo --num 0` (refused before training)",
     lambda t: ["demo", "--num", "0", "--out", str(t / "demo")], "number of samples must be an integer >= 1"),
    ("bench without projections", "`bench samplers --projections 0`",
     lambda t: ["bench", "samplers", "--gmm", "ring8", "--num", "50", "--nfe", "5", "--projections", "0"],
     "--projections must be an integer >= 1"),
    # item 9: sizes without limits
    ("SDE steps beyond the limit", "`sample --steps 1000000000` on an SDE run",
     lambda t: ["sample", "--run", _sde_run(t), "--steps", "1000000000", "--num", "1", "--out", str(t / "x.npz")],
     "DIFFUSIONLAB_MAX_STEPS"),
    ("samples beyond the limit", "`sample --num 10000000000`",
     lambda t: ["sample", "--run", _run(t), "--num", "10000000000", "--out", str(t / "x.npz")],
     "DIFFUSIONLAB_MAX_SAMPLES"),
    ("oracle budget beyond the limit", "`oracle sample --nfe 1000000000`",
     lambda t: ["oracle", "sample", "--gmm", "ring8", "--sampler", "ddim", "--nfe", "1000000000", "--out",
                str(t / "y.npy")], "--nfe = 1000000000 exceeds the limit"),
    ("decompression bomb", "a 100 KB PNG of 10000 x 10000 pixels in an image folder",
     lambda t: ["train", _image_cfg(t, _folder(t, "imgs", {"big.png": _pixel_bomb})), "--out", str(t / "o")],
     "DIFFUSIONLAB_MAX_IMAGE_PIXELS"),
    ("seed beyond 64 bits", "`sample --seed 99999999999999999999`",
     lambda t: ["sample", "--run", _run(t), "--seed", "99999999999999999999", "--out", str(t / "x.npz")],
     "seed must be an integer in [0, 2^63 - 2]"),
    ("bad sample device", "`sample --device cuda:abc`",
     lambda t: ["sample", "--run", _run(t), "--device", "cuda:abc", "--out", str(t / "x.npz")], "unknown device"),
    ("--out a directory", "`sample --out DIR.npz` where that is a directory",
     lambda t: ["sample", "--run", _run(t), "--out", _out_dir(t)], "it is a directory"),
    # item 10: data edge cases
    ("zero-width array", "`.npy` of shape (10, 0)",
     lambda t: ["train", _array_cfg(t, _array(t, "zw.npy", np.zeros((10, 0), np.float32))), "--out", str(t / "o")],
     "empty axis"),
    ("lying .npy header", "`.npy` whose header claims shape (10^11, 2)",
     lambda t: ["train", _array_cfg(t, _lying_npy(t)), "--out", str(t / "o")], "lies about its size"),
    ("pickle inside an .npz", "an `.npz` member holding a pickle",
     lambda t: ["train", _array_cfg(t, _pickle_npz(t)), "--out", str(t / "o")], "is not a .npy array"),
    ("video of height 0", "`.npy` video (8, 0, 16) in a video folder",
     lambda t: ["train", _video_cfg(t, _folder(t, "vids", _video("v.npy", (8, 0, 16)))), "--out", str(t / "o")],
     "each at least 1"),
    ("fake GIF", "text named `a.gif` in a video folder",
     lambda t: ["train", _video_cfg(t, _folder(t, "gifs", {"a.gif": lambda p: p.write_text("not a gif\nat all\n")})),
                "--out", str(t / "o")], "cannot read video"),
    ("fake MP4", "junk named `a.mp4` in a video folder",
     lambda t: ["train", _video_cfg(t, _folder(t, "mp4s", {"a.mp4": lambda p: p.write_bytes(b"\0\0\0\x18ftyp")})),
                "--out", str(t / "o")], "cannot read video"),
    ("untrainable data", "points near 3e38 (the loss overflows)",
     lambda t: ["train", _array_cfg(t, _array(t, "big.npy", np.full((64, 2), 3e38, np.float32))), "--out",
                str(t / "o")], "loss at initialisation is not finite"),
    # items 2-4, 7, 12: run directories
    ("changed config on --resume", "`--resume --set process.T=60`",
     lambda t: ["train", _cfg(t), "--out", _stopped_run(t), "--resume", "--set", "process.T=60"],
     "--resume with a config that differs"),
    ("second writer", "`train` into a run another process is writing",
     lambda t: ["train", _cfg(t), "--out", _held_lock(t)], "is being written by process"),
    ("no usable checkpoint", "`--resume` when every checkpoint is corrupted",
     lambda t: ["train", _cfg(t), "--out", _unusable_checkpoints(t), "--resume"], "can be used"),
    ("checkpoints path a file", "`DIR/checkpoints` is a regular file",
     lambda t: ["train", _cfg(t), "--out", _checkpoints_file(t)], "it is a file, not a directory"),
    ("NaN weights", "`sample` from weights holding NaN",
     lambda t: ["sample", "--run", _nan_weights_run(t), "--out", str(t / "s.npz")], "hold NaN"),
]
CASES += HOSTILE


@pytest.fixture(autouse=True)
def _release_held_locks():
    yield
    while _HELD:
        _HELD.pop().release()


@pytest.mark.parametrize("case, shows, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, case, shows, argv, fragment):
    args = argv(tmp_path)
    capsys.readouterr()
    before = {p for p in tmp_path.rglob("*")}
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("diffusionlab: error: "), err
    assert fragment in err[0], err[0]
    after = {p for p in tmp_path.rglob("*")}
    assert after == before, f"partial output written: {sorted(map(str, after - before))}"


def test_no_traceback_through_the_real_console(tmp_path):
    res = subprocess.run([sys.executable, "-m", "diffusionlab", "train", str(tmp_path / "nope.yaml"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"diffusionlab: error: config file not found: {tmp_path / 'nope.yaml'}"]


def _doc(msg: str, tmp: Path) -> str:
    """A message as the docs show it: the temporary directory as DIR, a lock holder's PID and host as PID / HOST."""
    import re

    msg = re.sub(r"process \d+ on \S+", "process PID on HOST", msg.replace(str(tmp), "DIR"))
    return msg.replace("|", "\\|")


if __name__ == "__main__":  # print the docs table with the messages as they are now
    import contextlib
    import io
    import tempfile

    print("# Bad input and what it gets\n")
    print("Every case is a test in `tests/test_cli_errors.py`: exit status 2, exactly one line on stderr, no")
    print("traceback, and nothing written. Regenerate with `python tests/test_cli_errors.py > docs/errors.md`.\n")
    print("| # | case | input | message |")
    print("| --- | --- | --- | --- |")
    for i, (case, shows, argv, _) in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as d:
            t = Path(d)
            args = argv(t)
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
                main(args)
            while _HELD:
                _HELD.pop().release()
            msg = _doc(buf.getvalue().strip().splitlines()[-1], t)
        print(f"| {i} | {case} | {shows} | `{msg}` |")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reliability import BEHAVIOURS, FAULTS  # noqa: E402

    print("\n## Faults during a run\n")
    print("Every case is a test in `tests/test_reliability.py` (`FAULTS`): exit status 2, one error line, no")
    print("traceback, no temporary left behind, no final weights, and every checkpoint written before the fault intact.")
    print("The faults that end well (a kill, SIGTERM, two writers, bad checkpoint metadata, ...) are the third table.\n")
    print("| # | class | case | message |")
    print("| --- | --- | --- | --- |")
    for i, (klass, case, scenario, _) in enumerate(FAULTS, 1):
        with tempfile.TemporaryDirectory() as d:
            t = Path(d)
            _, lines = scenario(t)
            msg = _doc([m for m in lines if m.startswith("diffusionlab: error:")][-1], t)
        print(f"| {i} | {klass} | {case} | `{msg}` |")
    print("\n## Faults that end well\n")
    print("Each row is asserted by the named test in `tests/test_reliability.py`.\n")
    print("| # | class | case | outcome | test |")
    print("| --- | --- | --- | --- | --- |")
    for i, (klass, case, outcome, test) in enumerate(BEHAVIOURS, 1):
        print(f"| {i} | {klass} | {case} | {outcome} | `{test}` |")
