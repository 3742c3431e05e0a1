"""Bad input everywhere in the CLI: one clear line on stderr, exit status 2, no traceback, no partial output.

Each case here is a row of the table in docs/errors.md (regenerate it with
``python tests/test_cli_errors.py > docs/errors.md``).
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
            msg = buf.getvalue().strip().splitlines()[-1].replace(str(t), "DIR").replace("|", "\\|")
        print(f"| {i} | {case} | {shows} | `{msg}` |")
