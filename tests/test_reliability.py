"""Nothing lost, ever: exact resume for every shipped config, checkpoints kept by integrity, one writer per run,
clean stops, operating-system errors as one line with the previous checkpoint intact, bad metadata falling back,
runs without progress failing, skipped steps reported.

One test (at least) per class of fault; each fails on the code before its fix. The fault scenarios that end in one
line and exit status 2 after something was legitimately written (a full disk mid-run, ...) are the rows of
:data:`FAULTS`, printed as the second table of docs/errors.md by ``python tests/test_cli_errors.py``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from diffusionlab.cli import main
from diffusionlab.errors import DiffusionLabError
from diffusionlab.training import checkpoint as ck
from diffusionlab.training.config import load_config, resolve
from diffusionlab.training.trainer import train

from ports import free_port

TINY = {
    "data": {"name": "ring", "num": 256},
    "process": {"name": "vp", "T": 50},
    "model": {"name": "mlp", "hidden": 16, "depth": 1, "emb_dim": 8},
    "train": {"steps": 6, "batch_size": 16, "warmup": 2, "checkpoint_every": 2, "log_every": 2, "device": "cpu",
              "threads": 1, "seed": 1},
    "sample": {"sampler": "ddim", "steps": 5},
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cfg_file(tmp: Path, name: str = "cfg.yaml", **sections) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _cli(args: list[str]) -> tuple[int, list[str]]:
    """``main(args)`` in-process: (exit status, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in args])
    return rc, err.getvalue().strip().splitlines()


def _weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_file(str(run / name))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _log_rows(run: Path) -> list[list[str]]:
    """log.csv without its wall-clock column."""
    rows = [line.split(",") for line in (run / "log.csv").read_text().splitlines()]
    i = rows[0].index("seconds")
    return [r[:i] + r[i + 1:] for r in rows]


def _one_error(lines: list[str], fragment: str) -> str:
    errors = [line for line in lines if line.startswith("diffusionlab: error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    assert fragment in errors[0], errors[0]
    return errors[0]


def _temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.startswith((".dltmp.", ".step_"))]


# ==== 1. exact resume for every shipped config ===========================================================
#: overrides that make each shipped config a few-second run (the model, the memory format, the objective, the
#: process and the noise stay those of the config)
SMALL = {
    "digits": ["train.batch_size=8"],
    "digits_sde": ["train.batch_size=8"],
    "toy2d": ["data.num=512", "train.batch_size=32", "model.hidden=32"],
    "toy2d_sde": ["data.num=512", "train.batch_size=32", "model.hidden=32"],
    "video": ["data.num=8", "data.frames=4", "train.batch_size=2", "model.base_channels=8"],
    # DDPM's U-Net at width 8 (attention at 16 x 16 and dropout 0.1 kept) on a fake binary folder, streamed by a
    # worker process with the recipe's random flips
    "cifar10": ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.groups=4",
                "train.batch_size=4", "train.warmup=2", "data.stream=true", "data.workers=1"],
}
DEFAULT_SMALL = ["train.batch_size=4"]
SHIPPED = sorted(p.stem for p in Path(str(resources.files("diffusionlab") / "configs")).glob("*.yaml"))


def _data_files(name: str, tmp: Path) -> list[str]:
    """Overrides pointing a shipped config that reads files at small fakes of them."""
    if name == "cifar10":
        import fakedata

        return [f"data.path={fakedata.cifar10(tmp / 'cifar-10-batches-bin', n=30)}"]
    return []


def _shipped(name: str, steps: int, extra=()) -> dict:
    from diffusionlab.commands import packaged_config

    return load_config(packaged_config(name), [*SMALL.get(name, DEFAULT_SMALL), "train.device=cpu",
                                               "train.threads=1", "train.log_every=4", "train.checkpoint_every=3",
                                               f"train.steps={steps}", *extra])


@pytest.mark.parametrize("name", SHIPPED)
def test_resume_is_bit_exact_for_every_shipped_config(tmp_path, name):
    """10 steps, then --resume to 20, equal 20 straight steps bit for bit (the same machine and the very same
    operations: torch.equal is right); checkpoints every 3 steps and log rows every 4, so a log window straddles
    the resumed checkpoint. digits.yaml trains channels-last: its AdamW moments must come back channels-last."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    files = _data_files(name, tmp_path)
    train(_shipped(name, 20, files), straight, progress=False, log=lambda m: None)
    train(_shipped(name, 10, files), resumed, progress=False, log=lambda m: None)
    (resumed / "model.safetensors").unlink()
    train(_shipped(name, 20, files), resumed, resume=True, progress=False, log=lambda m: None)
    for weights in ("model.safetensors", "model_raw.safetensors"):
        assert _same(_weights(straight, weights), _weights(resumed, weights)), f"{name}: {weights} differs"
    # the 10-step run logged its own last step (10, not a multiple of 4); every other row, the first after the
    # resume (12, averaging steps 9..12 across the checkpoint) included, is the straight run's
    rows = [r for r in _log_rows(resumed) if r[0] != "10"]
    assert rows == _log_rows(straight), f"{name}: the resumed log differs from the straight one"


#: the training features of issue 17 on the tiny config, each changing state a checkpoint must carry: the
#: gradient scaler's scale (fp16 starting at 2^24 halves it over the first steps), the micro-batches, a list of
#: learning-rate knots, TensorBoard and sample grids alongside
FEATURES = {
    "fp16 scaler": ["train.precision=fp16", "train.max_bad_steps=100"],
    "accumulate 4": ["train.accumulate=4"],
    "lr knots": ["train.lr_schedule=[[0, 1e-3], [8, 5e-3, cosine], [15, 1e-4, constant], [17, 2e-4]]",
                 "train.warmup=0"],
    "tensorboard, sample grids": ["train.tensorboard=true", "train.sample_every=5"],
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_resume_is_bit_exact_with_the_new_training_features(tmp_path, monkeypatch, feature):
    """The same check as for the shipped configs (10 steps, --resume to 20, against 20 straight) with each feature
    on; fp16 starts its scaler at 2^24 so that overflowing steps halve the scale before the checkpoint: a resume
    that restarted the scaler would skip other steps."""
    import diffusionlab.training.precision as precision

    monkeypatch.setattr(precision, "FP16_INIT_SCALE", 2.0 ** 24)
    over = [*FEATURES[feature], "train.checkpoint_every=3", "train.log_every=4"]

    def cfg(steps):
        return resolve({k: dict(v) for k, v in TINY.items()}, [*over, f"train.steps={steps}"])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = train(cfg(20), straight, progress=False, log=lambda m: None)
    if feature == "fp16 scaler":
        assert summary["skipped_steps"] >= 3 and summary["grad_scale"] < 2.0 ** 22, summary  # the scale moved
    train(cfg(10), resumed, progress=False, log=lambda m: None)
    (resumed / "model.safetensors").unlink()
    train(cfg(20), resumed, resume=True, progress=False, log=lambda m: None)
    for weights in ("model.safetensors", "model_raw.safetensors"):
        assert _same(_weights(straight, weights), _weights(resumed, weights)), f"{feature}: {weights} differs"
    assert [r for r in _log_rows(resumed) if r[0] != "10"] == _log_rows(straight)
    assert json.loads((resumed / "train_summary.json").read_text())["skipped_steps"] == summary["skipped_steps"]


def test_restored_adamw_moments_keep_the_parameters_memory_format(tmp_path):
    """The mechanism behind digits' inexact resume: Optimizer.load_state_dict keeps the saved (contiguous) layout."""
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3, fused=True)
    conv(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    opt.step()
    ck.save_checkpoint(tmp_path, 1, conv.state_dict(), conv.state_dict(), opt, {}, keep=1)
    conv2 = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt2 = torch.optim.AdamW(conv2.parameters(), lr=1e-3, fused=True)
    ck.restore_optimizer(opt2, ck.load_latest_checkpoint(tmp_path)["optimizer"])
    for p in conv2.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][key].stride() == p.stride(), key
    w = conv2.weight
    assert torch.equal(opt2.state[w]["exp_avg"], opt.state[conv.weight]["exp_avg"])


def _wait_for(pred, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def _has_trained(run: Path) -> bool:
    """Whether the run's log has its first data row (``train.log_every=1``: a step is done): signalled from then on,
    a run is mid-training on any CPU, however fast (a fixed sleep could outlast a whole short run)."""
    try:
        return len((run / "log.csv").read_text().splitlines()) >= 2
    except OSError:
        return False


def test_sigterm_checkpoints_says_so_exits_0_and_resume_is_bit_exact(tmp_path):
    """SIGTERM mid-run (digits, channels-last): a checkpoint at the step it stopped, one line saying so, exit 0;
    --resume then reaches the weights of an uninterrupted run bit for bit."""
    from diffusionlab.commands import packaged_config

    args = ["-m", "diffusionlab", "train", str(packaged_config("digits")), "--quiet", "--set", "train.device=cpu",
            "--set", "train.threads=1", "--set", "train.batch_size=4", "--set", "train.steps=120",
            "--set", "train.checkpoint_every=1000", "--set", "train.log_every=1"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(run)], env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _has_trained(run))  # training has started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM at step" in err and "Traceback" not in err, err
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 0 < stopped < 120, "the run finished before the signal"
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.checkpoint_name(stopped)]
    assert not (run / "model.safetensors").exists()
    rc, lines = _cli([*args[2:], "--out", run, "--resume"])  # the same command, in this process
    assert rc == 0, lines
    rc, lines = _cli([*args[2:], "--out", ref])
    assert rc == 0, lines
    assert _same(_weights(ref), _weights(run)) and _same(_weights(ref, "model_raw.safetensors"),
                                                         _weights(run, "model_raw.safetensors"))


def test_sigterm_with_streaming_workers_checkpoints_and_resume_is_bit_exact(tmp_path):
    """SIGTERM to a run that streams an image folder through 2 prefetching worker processes (which ignore the
    signal): the same clean stop, and --resume (streamed again) reaches the weights of an uninterrupted in-memory
    run bit for bit (the same batches, the same operations)."""
    import fakedata

    folder = fakedata.pngs(tmp_path / "imgs", 13)
    cfg = {"data": {"name": "image_folder", "path": str(folder), "image_size": 8, "flip": True},
           "process": {"name": "vp", "T": 20},
           "model": {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1,
                     "attn_resolutions": []},
           "train": {"steps": 400, "batch_size": 4, "checkpoint_every": 1000, "log_every": 1, "device": "cpu",
                     "threads": 1, "seed": 2},
           "sample": {"sampler": "ddim", "steps": 3}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    stream = ["--set", "data.stream=true", "--set", "data.workers=2"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    proc = subprocess.Popen([sys.executable, "-m", "diffusionlab", "train", str(path), "--quiet", *stream, "--out",
                             str(run)], env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _has_trained(run))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM at step" in err and "Traceback" not in err, err
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 0 < stopped < 400, "the run finished before the signal"
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.checkpoint_name(stopped)]
    rc, lines = _cli(["train", path, "--quiet", *stream, "--out", run, "--resume"])
    assert rc == 0, lines
    rc, lines = _cli(["train", path, "--quiet", "--set", "data.stream=false", "--out", ref])
    assert rc == 0, lines
    assert _same(_weights(ref), _weights(run)) and _same(_weights(ref, "model_raw.safetensors"),
                                                         _weights(run, "model_raw.safetensors"))


# ==== 2. retention by integrity ===========================================================================
def _tiny_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def _save(tmp: Path, step: int, keep: int = 2, warn=None) -> Path:
    model, opt = _tiny_state()
    return ck.save_checkpoint(tmp, step, model.state_dict(), model.state_dict(), opt, {"g": torch.Generator()},
                              keep=keep, warn=warn)


def _flip(path: Path, name: str = "model.safetensors") -> None:
    f = path / name
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def test_fresh_intact_checkpoints_are_kept_over_newer_corrupted_ones(tmp_path):
    """A run restarted after its checkpoints 3 and 4 were corrupted writes 1 and 2: pruning by name kept the two
    corrupted ones and deleted the fresh ones; by integrity the fresh ones stay and the newest intact is used."""
    for step in (3, 4):
        _save(tmp_path, step)
        _flip(tmp_path / "checkpoints" / ck.checkpoint_name(step))
    for step in (1, 2):
        _save(tmp_path, step)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert ck.checkpoint_name(1) in names and ck.checkpoint_name(2) in names
    assert ck.load_latest_checkpoint(tmp_path, warn=lambda m: None)["step"] == 2
    # once the run passes them, intact checkpoints supersede the damaged ones, which are then removed
    warnings = []
    for step in (3, 4, 5):
        _save(tmp_path, step, warn=warnings.append)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.checkpoint_name(4), ck.checkpoint_name(5)]


def test_checkpoints_past_step_1e8_are_ordered_by_the_step_inside(tmp_path):
    for step in (99_999_998, 99_999_999, 100_000_000, 100_000_001):
        _save(tmp_path, step)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_100000000", "step_100000001"]
    assert ck.load_latest_checkpoint(tmp_path)["step"] == 100_000_001


def test_the_newest_intact_checkpoint_is_never_deleted(tmp_path):
    _save(tmp_path, 1, keep=1)
    _save(tmp_path, 3, keep=1)
    _flip(tmp_path / "checkpoints" / ck.checkpoint_name(3))
    _save(tmp_path, 2, keep=1)  # older than the damaged 3: 2 is the newest intact one and stays, 1 goes
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == [ck.checkpoint_name(2), ck.checkpoint_name(3)]


def _finished_run(tmp: Path, name: str = "run", **sections) -> Path:
    run = tmp / name
    rc, lines = _cli(["train", _cfg_file(tmp, f"{name}.yaml", **sections), "--out", run, "--quiet"])
    assert rc == 0, lines
    return run


def test_resume_refuses_when_checkpoints_exist_but_none_can_be_used(tmp_path):
    run = _finished_run(tmp_path)
    (run / "model.safetensors").unlink()
    for path in ck.list_checkpoints(run):
        _flip(path, "state.safetensors")
    def files():  # (the lock file names its holder of the moment)
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}

    before = files()
    rc, lines = _cli(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet", "--set",
                      "train.steps=8"])
    assert rc == 2
    _one_error(lines, "can be used")
    assert files() == before, "something was replaced"


def _unprivileged() -> list[str] | None:
    """A command prefix that runs without the permission-bypassing capabilities of root (None: impossible here)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    probe = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"], capture_output=True)
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if probe.returncode == 0 else None


UNPRIVILEGED = _unprivileged()
needs_permissions = pytest.mark.skipif(UNPRIVILEGED is None, reason="cannot drop the permission bypass of root here")


def _cli_unprivileged(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "diffusionlab", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300)


_CASES_SCRIPT = """
import contextlib, io, json, sys
from diffusionlab.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    out.append([rc, err.getvalue().strip().splitlines()])
print(json.dumps(out))
"""


def _cli_cases_unprivileged(cases: list[list]) -> list:
    """Several CLI calls in one unprivileged process (one torch import): ``[(exit status, stderr lines)]``."""
    res = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", _CASES_SCRIPT,
                          json.dumps([[str(a) for a in c] for c in cases])], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@needs_permissions
def test_unreadable_checkpoints_refuse_resume_instead_of_restarting(tmp_path):
    """Checkpoints that exist but cannot be read: a silent restart from step 0 (exit 0) replaced them; now one line,
    exit 2, and they are untouched."""
    run = _finished_run(tmp_path)
    (run / "model.safetensors").unlink()
    files = [p for p in (run / "checkpoints").rglob("*") if p.is_file()]
    for p in files:
        p.chmod(0)
    try:
        res = _cli_unprivileged(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet", "--set",
                                 "train.steps=8"])
        assert res.returncode == 2, res.stderr
        _one_error(res.stderr.strip().splitlines(), "can be used")
        assert all(p.exists() and p.stat().st_mode & 0o777 == 0 for p in files)
        assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000004", "step_00000006"]
    finally:
        for p in files:
            p.chmod(0o644)


# ==== 3. one writer per run directory =====================================================================
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    from diffusionlab.training.rundir import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        rc, lines = _cli(["train", _cfg_file(tmp_path), "--out", run, "--quiet"])
        assert rc == 2
        _one_error(lines, "is being written by process")
    assert not (run / "config.yaml").exists()
    rc, lines = _cli(["train", tmp_path / "cfg.yaml", "--out", run, "--quiet"])  # released: the run proceeds
    assert rc == 0, lines


def test_a_stale_lock_of_a_dead_writer_does_not_block(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(f"{dead.pid} on somewhere\n")
    rc, lines = _cli(["train", _cfg_file(tmp_path), "--out", run, "--quiet"])
    assert rc == 0, lines


def test_two_concurrent_train_processes_one_is_refused(tmp_path):
    cfg = _cfg_file(tmp_path, train={"steps": 300, "checkpoint_every": 100, "log_every": 100})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffusionlab", "train", str(cfg), "--out", str(run), "--quiet"]
    procs = [subprocess.Popen(cmd + ["--set", f"train.seed={s}"], env=ENV, stderr=subprocess.PIPE, text=True)
             for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert len(err.strip().splitlines()) == 1 and ("being written by" in err or "already holds a run" in err), err
    seed = yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"]
    winner = next(i for i, (rc, _) in enumerate(results) if rc == 0)
    assert seed == (1, 2)[winner], "config.yaml describes the refused run"


# ==== 4. what --resume may change =========================================================================
@pytest.mark.parametrize("override, key", [
    ("process.T=60", "process.T"), ("parametrization.prediction=x0", "parametrization.prediction"),
    ("data.name=moons", "data.name"), ("train.seed=9", "train.seed"), ("model.hidden=32", "model.hidden"),
    ("train.weight_decay=0.1", "train.weight_decay"), ("objective.name=vlb", "objective.name"),
])
def test_resume_refuses_a_changed_config_naming_the_key(tmp_path, override, key):
    run = _finished_run(tmp_path)
    (run / "model.safetensors").unlink()
    rc, lines = _cli(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet", "--set", override])
    assert rc == 2
    _one_error(lines, key)


def test_resume_accepts_more_steps_and_a_new_cadence_and_refuses_fewer_steps(tmp_path):
    run = _finished_run(tmp_path)
    rc, lines = _cli(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet", "--set", "train.steps=10",
                      "--set", "train.log_every=5", "--set", "train.checkpoint_every=5", "--set", "sample.steps=7"])
    assert rc == 0, lines
    rc, lines = _cli(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet", "--set", "train.steps=3"])
    assert rc == 2
    _one_error(lines, "train.steps = 3 is below step 10")


# ==== 5. the log ===========================================================================================
def test_log_truncation_is_atomic(tmp_path, monkeypatch):
    """A kill while the log is cut back to the resumed checkpoint leaves the old log whole (it was rewritten in
    place, and a kill in that window cut a 1.5M-row log to 215k rows)."""
    from diffusionlab import io as dio
    from diffusionlab.training import trainer

    log = tmp_path / "log.csv"
    rows = ["step,loss,lr,grad_norm,seconds,bad_steps"] + [f"{k},0.5,0.001,1.0,{k}.0,0" for k in range(1, 2001)]
    log.write_text("\r\n".join(rows) + "\r\n")
    before = log.read_bytes()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer._rewrite_log(log, 1000)
    assert log.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"], "a temporary was left behind"
    monkeypatch.undo()
    trainer._rewrite_log(log, 1000)
    assert log.read_text().splitlines()[-1].startswith("1000,")


def test_a_row_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    run = _finished_run(tmp_path)
    (run / "model.safetensors").unlink()
    with open(run / "log.csv", "a") as f:
        f.write("8,0.12")  # a kill in the middle of writing a row
    rc, lines = _cli(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet", "--set", "train.steps=8"])
    assert rc == 0, lines
    steps = [int(r[0]) for r in _log_rows(run)[1:]]
    assert steps == [2, 4, 6, 8]


# ==== 6. temporaries and signals ===========================================================================
def test_stale_temporaries_of_dead_writers_are_removed_at_start(tmp_path):
    run = _finished_run(tmp_path)
    (run / "model.safetensors").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run / f".dltmp.{dead.pid}.config.abc.yaml", run / "checkpoints" / f".dltmp.{dead.pid}.step_00000008.x",
             run / "checkpoints" / ".step_00000008.legacy"]
    stale[0].write_text("half")
    for d in stale[1:]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    live = run / f".dltmp.{os.getppid()}.sample.xyz.npz"  # a live writer's (the test runner's parent)
    live.write_bytes(b"in progress")
    rc, lines = _cli(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet", "--set", "train.steps=8"])
    assert rc == 0, lines
    assert not any(p.exists() for p in stale)
    assert live.exists()


def test_max_minutes_stops_cleanly_and_resume_continues(tmp_path):
    cfg = _cfg_file(tmp_path, train={"steps": 10**7, "checkpoint_every": 10**6, "log_every": 10**6})
    run = tmp_path / "run"
    # 0.1 min: the budget counts from the command's start, and on a loaded machine the build alone took 0.6 s
    rc, lines = _cli(["train", cfg, "--out", run, "--quiet", "--max-minutes", "0.1"])
    assert rc == 0, lines
    assert any("stopped after the --max-minutes budget of 0.1 min at step" in line for line in lines), lines
    stopped = ck.load_latest_checkpoint(run)["step"]
    assert 0 < stopped < 10**7 and not (run / "model.safetensors").exists()
    rc, lines = _cli(["train", cfg, "--out", run, "--quiet", "--resume", "--max-minutes", "0.1"])
    assert rc == 0 and f"resuming {run} from step {stopped}" in " ".join(lines), lines
    assert ck.load_latest_checkpoint(run)["step"] > stopped
    rc, lines = _cli(["train", cfg, "--out", tmp_path / "other", "--max-minutes", "-1"])
    assert rc == 2
    _one_error(lines, "--max-minutes must be a positive number")


def test_a_second_signal_stops_at_once():
    from diffusionlab.training.stop import Interrupted, StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == "SIGTERM"
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # handlers restored


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_during_start_up_is_one_line(tmp_path, sig):
    """Ctrl-C (or SIGTERM) while the CLI imports torch: one line, no traceback -- never the abort of a
    KeyboardInterrupt raised into code that torch's import runs from C++ (``terminate called after throwing an
    instance of 'pybind11::error_already_set'``, exit -6, which a raising handler gave now and then)."""
    def foreground():  # as a shell starts a foreground job: SIGINT delivered and handled by default, whatever
        # this test process inherited (a blocked or ignored SIGINT would be passed on to the child)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "diffusionlab", "train", "digits", "--out", str(tmp_path / "x")],
                            env=ENV, stderr=subprocess.PIPE, text=True, preexec_fn=foreground)
    time.sleep(0.4)  # the CLI is still importing torch (about 2 s here; later on a loaded machine)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)  # never hangs: the exit after an interrupt skips finalisation
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        parent = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
        raise AssertionError(f"no exit 120 s after SIGINT (this process's SIGINT handler and blocked set: "
                             f"{parent}); stderr: {err[-2000:]}") from None
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if proc.returncode == 128 + sig:  # the signal landed while importing or building
        assert lines == [f"diffusionlab: {'interrupted' if sig == signal.SIGINT else 'terminated (SIGTERM)'}"], err
    else:  # a slow start: the trainer's own handler had already taken it
        assert proc.returncode == 0 and lines[-1:] == [
            f"diffusionlab: stopped by {sig.name} before training started; nothing was written"], (proc.returncode, err)


# ==== 7. operating-system errors ==========================================================================
def _fault_disk_full_at_second_checkpoint(tmp: Path):
    from diffusionlab.training import checkpoint as module

    real, calls = module.save, {"n": 0}

    def full(tensors, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # three files per checkpoint: the second checkpoint hits a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, *a, **k)

    module.save = full
    try:
        return _cli(["train", _cfg_file(tmp), "--out", tmp / "run", "--quiet"])
    finally:
        module.save = real


def _fault_file_size_limit_on_final_weights(tmp: Path):
    from diffusionlab import io as dio

    real = dio.atomic_write_bytes

    def limited(path, data):
        if Path(path).name == "model.safetensors":
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real(path, data)

    dio.atomic_write_bytes = limited
    try:
        return _cli(["train", _cfg_file(tmp), "--out", tmp / "run", "--quiet"])
    finally:
        dio.atomic_write_bytes = real


def _fault_every_step_non_finite(tmp: Path):
    import diffusionlab.objectives as objectives

    real = objectives.make_objective

    def poisoned(cfg, process):
        obj = real(cfg, process)

        def nan(model, x0, **kw):
            loss = obj(model, x0, **kw)
            return loss * float("nan") if torch.is_grad_enabled() else loss

        return nan

    objectives.make_objective = poisoned
    try:
        return _cli(["train", _cfg_file(tmp, train={"steps": 5}), "--out", tmp / "run", "--quiet"])
    finally:
        objectives.make_objective = real


def _fault_nan_after_a_checkpoint(tmp: Path):
    import diffusionlab.objectives as objectives

    real, calls = objectives.make_objective, {"n": 0}

    def poisoned(cfg, process):
        obj = real(cfg, process)

        def late_nan(model, x0, **kw):
            loss = obj(model, x0, **kw)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] > 4:
                    return loss * float("nan")
            return loss

        return late_nan

    objectives.make_objective = poisoned
    try:
        return _cli(["train", _cfg_file(tmp, train={"steps": 40, "max_bad_steps": 3, "checkpoint_every": 4}), "--out",
                     tmp / "run", "--quiet"])
    finally:
        objectives.make_objective = real


def _fault_cut_image_mid_run(tmp: Path):
    """A PNG whose header is fine and whose body is cut, sorted last (the checks before training decode only the
    first 8 files), first read at step 2 (0-based) of a run streaming the folder through 2 workers."""
    import fakedata

    folder = fakedata.pngs(tmp / "imgs", 9)
    data = (folder / "004.png").read_bytes()
    (folder / "zz_cut.png").write_bytes(data[: len(data) // 2])
    cfg = {"data": {"name": "image_folder", "path": str(folder), "image_size": 8, "stream": True, "workers": 2},
           "process": {"name": "vp", "T": 20},
           "model": {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1,
                     "attn_resolutions": []},
           "train": {"steps": 12, "batch_size": 4, "checkpoint_every": 100, "device": "cpu", "threads": 1, "seed": 3},
           "sample": {"sampler": "ddim", "steps": 3}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return _cli(["train", path, "--out", tmp / "run", "--quiet"])


#: (class, case, scenario(tmp) -> (exit status, stderr lines), fragment of the one error line)
FAULTS = [
    ("OS error", "full disk at the second checkpoint", _fault_disk_full_at_second_checkpoint,
     "No space left on device; the last checkpoint (step 2) is intact"),
    ("OS error", "file-size limit on the final weights", _fault_file_size_limit_on_final_weights,
     "File too large (the file-size limit, ulimit -f); the last checkpoint (step 6) is intact"),
    ("no progress", "every step non-finite (fewer steps than max_bad_steps)", _fault_every_step_non_finite,
     "no step of the 5 made progress"),
    ("no progress", "non-finite from step 5 on", _fault_nan_after_a_checkpoint,
     "the last checkpoint (step 4) is intact"),
    ("data", "a PNG whose body is cut, met at step 3 by the streaming loader (2 workers; `bad_files: error`)",
     _fault_cut_image_mid_run, "zz_cut.png': image file is truncated; set data.bad_files=skip to go on without it "
     "(each bad file is reported); the last checkpoint (step 2) is intact"),
]


#: (class, case, outcome, test): the faults that end well, for the third table of docs/errors.md
BEHAVIOURS = [
    ("resume", "10 steps, then `--resume` to 20, every shipped config (digits channels-last included; cifar10 "
     "streamed by a worker with random flips and dropout)",
     "weights, EMA weights and log.csv equal 20 straight steps bit for bit",
     "test_resume_is_bit_exact_for_every_shipped_config"),
    ("resume", "the same with fp16 (the gradient scaler's scale moving), gradient accumulation, a list of "
     "learning-rate knots, TensorBoard and sample grids", "bit for bit, the skipped-step count too",
     "test_resume_is_bit_exact_with_the_new_training_features"),
    ("signals", "SIGTERM to a run streaming an image folder through 2 prefetching worker processes", "checkpoint, "
     "one line, exit 0; `--resume` equals an uninterrupted in-memory run bit for bit",
     "test_sigterm_with_streaming_workers_checkpoints_and_resume_is_bit_exact"),
    ("resume", "SIGTERM mid-run, then `--resume`", "checkpoint at the step reached, one line, exit 0; the resumed "
     "weights equal an uninterrupted run's", "test_sigterm_checkpoints_says_so_exits_0_and_resume_is_bit_exact"),
    ("stop", "`train --max-minutes M`", "stops with a checkpoint after M minutes, says so, exit 0; `--resume` "
     "continues", "test_max_minutes_stops_cleanly_and_resume_continues"),
    ("stop", "a second SIGTERM / SIGINT", "stops at once (temporaries removed, previous checkpoint intact)",
     "test_a_second_signal_stops_at_once"),
    ("stop", "Ctrl-C or SIGTERM during start-up", "`diffusionlab: interrupted` (`terminated (SIGTERM)`), exit 130 "
     "(143), no traceback, never an abort",
     "test_ctrl_c_during_start_up_is_one_line"),
    ("retention", "checkpoints 3, 4 corrupted, then a restarted run writes 1, 2", "1 and 2 kept and used; 3 and "
     "4 removed once intact 4 and 5 supersede them", "test_fresh_intact_checkpoints_are_kept_over_newer_corrupted_ones"),
    ("retention", "steps past 10^8", "ordered by the step inside: the newest kept and resumed",
     "test_checkpoints_past_step_1e8_are_ordered_by_the_step_inside"),
    ("retention", "unreadable checkpoints (permissions)", "`--resume` refuses, one line, exit 2; nothing replaced",
     "test_unreadable_checkpoints_refuse_resume_instead_of_restarting"),
    ("metadata", "meta.json without a byte count, a step that is a string or a list, a wrong optimizer group "
     "count, a state without its RNG entry, an altered or non-JSON meta.json", "reported, and the older intact "
     "checkpoint used", "test_bad_checkpoint_metadata_falls_back_to_the_older_checkpoint"),
    ("lock", "two `train` processes into one `--out`", "one trains, the other is refused with one line; "
     "config.yaml is the winner's", "test_two_concurrent_train_processes_one_is_refused"),
    ("lock", "a lock left by a dead writer", "ignored (the kernel released it)",
     "test_a_stale_lock_of_a_dead_writer_does_not_block"),
    ("log", "a kill while log.csv is cut back to the checkpoint", "the old log stays whole (atomic replacement)",
     "test_log_truncation_is_atomic"),
    ("log", "a row cut by a kill", "dropped on resume; no glued rows", "test_a_row_cut_by_a_kill_is_dropped_on_resume"),
    ("temporaries", "temporaries of dead writers (and the old `.step_N.*` directories)", "removed at the next "
     "start; a live writer's kept", "test_stale_temporaries_of_dead_writers_are_removed_at_start"),
    ("OS error", "a real full disk mid-run (tmpfs)", "one line naming the intact checkpoint, exit 2",
     "test_a_really_full_disk_mid_run_is_one_line_with_the_previous_checkpoint_intact"),
    ("OS error", "`ulimit -f` below a checkpoint file", "refused before training",
     "test_the_file_size_limit_is_checked_before_training"),
    ("OS error", "run directory, checkpoint directory or config not writable / readable", "one line before "
     "training, checkpoints untouched", "test_permission_denied_is_one_line_before_training"),
    ("NaN", "a sampler producing non-finite samples", "refused, nothing written (.npz, .npy, .png)",
     "test_non_finite_samples_are_refused_and_nothing_is_written"),
    ("sizes", "`sample --num 2500`", "streamed in chunks of 1000 with progress, equal to one draw",
     "test_sample_streams_chunks_identical_to_one_draw"),
    ("data", "a named pipe in an image folder", "skipped (only regular files are opened); no hang",
     "test_an_image_folder_with_a_named_pipe_does_not_hang"),
    ("torchrun", "a user error under torchrun (2 processes)", "printed once, by rank 0, before the process group "
     "starts (torchrun then prints its own failure report)", "test_torchrun_user_error_is_printed_once_by_rank_0"),
    ("fitted noise", "`noise: fitted` with a bad sample: section; a moved run", "nothing written; the moved run "
     "samples and resumes (the covariance path is relative)",
     "test_fitted_noise_writes_nothing_on_bad_input_and_the_run_can_move"),
    ("skipped steps", "2 non-finite steps in a window of 10", "counted in the progress bar, train_summary.json and "
     "the final line; a warning line for the window", "test_skipped_steps_are_counted_warned_and_summarised"),
]


@pytest.mark.parametrize("klass, case, scenario, fragment", FAULTS, ids=[f[1] for f in FAULTS])
def test_fault_is_one_line_and_the_previous_checkpoint_stays_intact(tmp_path, klass, case, scenario, fragment):
    rc, lines = scenario(tmp_path)
    assert rc == 2
    _one_error(lines, fragment)
    run = tmp_path / "run"
    assert not _temporaries(run), _temporaries(run)
    assert not (run / "model.safetensors").exists()
    intact, broken = ck.survey_checkpoints(run)
    assert not broken
    if "intact" in fragment:
        step = int(fragment.split("(step ")[1].split(")")[0])
        assert intact[-1][0] == step


def test_after_a_failed_final_write_resume_writes_the_weights(tmp_path):
    _fault_file_size_limit_on_final_weights(tmp_path)
    rc, lines = _cli(["train", tmp_path / "cfg.yaml", "--out", tmp_path / "run", "--quiet", "--resume"])
    assert rc == 0, lines
    assert (tmp_path / "run" / "model.safetensors").is_file()


def _small_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_mid_run_is_one_line_with_the_previous_checkpoint_intact(tmp_path):
    """A real small file system (tmpfs, where the test may mount one), filled once the first checkpoint exists."""
    mnt = tmp_path / "small"
    if not _small_tmpfs(mnt, "4m"):
        pytest.skip("cannot mount a small file system here")
    try:
        cfg = _cfg_file(tmp_path, train={"steps": 10**6, "checkpoint_every": 200, "log_every": 10})
        run = mnt / "run"
        proc = subprocess.Popen([sys.executable, "-m", "diffusionlab", "train", str(cfg), "--out", str(run),
                                 "--quiet"], env=ENV, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: len(ck.list_checkpoints(run)) >= 1)
        with open(mnt / "filler", "wb") as f:  # fill the disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        line = _one_error(err.strip().splitlines(), "No space left on device")
        assert "is intact" in line
        (mnt / "filler").unlink()
        intact, broken = ck.survey_checkpoints(run)
        assert intact and not broken and not _temporaries(run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_the_file_size_limit_is_checked_before_training(tmp_path):
    import resource

    cfg = _cfg_file(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # ulimit -f 4 (KB), for this call only
    try:
        rc, lines = _cli(["train", cfg, "--out", tmp_path / "run", "--quiet"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert rc == 2
    _one_error(lines, "file-size limit (ulimit -f)")
    assert not (tmp_path / "run").exists()


def test_a_checkpoints_path_that_is_a_file_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")
    rc, lines = _cli(["train", _cfg_file(tmp_path), "--out", run, "--quiet"])
    assert rc == 2
    _one_error(lines, "it is a file, not a directory")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


@needs_permissions
def test_permission_denied_is_one_line_before_training(tmp_path):
    """The run directory, its checkpoint directory or the config not writable / readable: one line, exit 2, the
    checkpoints untouched (each case in one unprivileged process)."""
    runs, targets = [], []
    for what in ("run directory", "checkpoint directory", "config"):
        run = _finished_run(tmp_path, what.replace(" ", "_"))
        (run / "model.safetensors").unlink()
        cfg = tmp_path / f"{what.replace(' ', '_')}.yaml"
        target = {"run directory": run, "checkpoint directory": run / "checkpoints", "config": cfg}[what]
        runs.append((run, cfg))
        targets.append((target, target.stat().st_mode))
        target.chmod(0o555 if target.is_dir() else 0)
    try:
        results = _cli_cases_unprivileged([["train", cfg, "--out", run, "--resume", "--quiet", "--set",
                                            "train.steps=8"] for run, cfg in runs])
    finally:
        for target, mode in targets:
            target.chmod(mode)
    for (rc, lines), (run, _) in zip(results, runs):
        assert rc == 2, lines
        _one_error(lines, "Permission denied")
        assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000004", "step_00000006"]


# ==== 11. bad checkpoint metadata falls back to the older intact checkpoint ================================
def _rewrite_meta(path: Path, change) -> None:
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    if "meta_sha256" in meta:
        meta["meta_sha256"] = ck._meta_digest(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _drop_rng(path: Path) -> None:
    state = load_file(str(path / "state.safetensors"))
    state.pop("rng.gen.noise")
    save_file(state, str(path / "state.safetensors"))
    data = (path / "state.safetensors").read_bytes()
    import hashlib

    _rewrite_meta(path, lambda m: m["files"]["state.safetensors"].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


BAD_META = {
    "no byte count": lambda p: _rewrite_meta(p, lambda m: m["files"]["model.safetensors"].pop("bytes")),
    "step a string": lambda p: _rewrite_meta(p, lambda m: m.update(step="six")),
    "step a list": lambda p: _rewrite_meta(p, lambda m: m.update(step=[6])),
    "wrong optimizer group count": lambda p: _rewrite_meta(
        p, lambda m: m["optimizer"].update(param_groups=m["optimizer"]["param_groups"] * 2)),
    "state without its RNG entry": _drop_rng,
    "meta.json altered without its digest": lambda p: (p / "meta.json").write_text(
        (p / "meta.json").read_text().replace('"step": 6', '"step": 7')),
    "meta.json not JSON": lambda p: (p / "meta.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", list(BAD_META), ids=list(BAD_META))
def test_bad_checkpoint_metadata_falls_back_to_the_older_checkpoint(tmp_path, damage):
    run = _finished_run(tmp_path)
    (run / "model.safetensors").unlink()
    BAD_META[damage](run / "checkpoints" / "step_00000006")
    rc, lines = _cli(["train", tmp_path / "run.yaml", "--out", run, "--resume", "--quiet"])
    assert rc == 0, lines
    text = " ".join(lines)
    assert "skipping checkpoint step_00000006" in text and f"resuming {run} from step 4" in text, lines


# ==== 12. NaN is never written as a result =================================================================
def test_nan_weights_are_refused_by_sample_and_nothing_is_written(tmp_path):
    run = _finished_run(tmp_path)
    w = _weights(run)
    w[next(iter(w))] = torch.full_like(w[next(iter(w))], float("nan"))
    save_file(w, str(run / "model.safetensors"))
    rc, lines = _cli(["sample", "--run", run, "--num", "4", "--out", tmp_path / "s.npz", "--quiet"])
    assert rc == 2
    _one_error(lines, "hold NaN or infinite values")
    assert not (tmp_path / "s.npz").exists()


def test_non_finite_samples_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    from diffusionlab.samplers import catalogue

    run = _finished_run(tmp_path)
    spec = catalogue.get_sampler("ddim")
    real = spec.fn
    monkeypatch.setattr(spec, "fn", lambda *a, **k: real(*a, **k) * float("inf"))
    for suffix in (".npz", ".npy", ".png"):
        rc, lines = _cli(["sample", "--run", run, "--num", "1500", "--out", tmp_path / f"s{suffix}", "--quiet"])
        assert rc == 2
        _one_error(lines, "non-finite values")
        assert not (tmp_path / f"s{suffix}").exists() and not _temporaries(tmp_path)


# ==== 9. sizes: long outputs are streamed in chunks with progress ==========================================
def test_sample_streams_chunks_identical_to_one_draw(tmp_path):
    from diffusionlab.training.sampling import generate, load_run

    run = _finished_run(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["sample", "--run", str(run), "--num", "2500", "--seed", "3", "--out", str(tmp_path / "s.npy")]) == 0
        assert main(["sample", "--run", str(run), "--num", "2500", "--seed", "3", "--out", str(tmp_path / "s.npz"),
                     "--quiet"]) == 0
    assert "sample: 40% 1000/2500" in err.getvalue()  # progress over the chunks
    cfg, ds, model = load_run(run)
    x = generate(model, cfg["sample"], num=2500, seed=3, device="cpu", shape=ds.sample_shape).numpy()
    assert np.array_equal(np.load(tmp_path / "s.npy"), x)
    assert np.array_equal(np.load(tmp_path / "s.npz")["x"], x)


# ==== 10. a named pipe in a data folder ====================================================================
def test_an_image_folder_with_a_named_pipe_does_not_hang(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (12, 12), 128).save(folder / "a.png")
    os.mkfifo(folder / "pipe.png")  # opening it would wait for a writer forever
    from diffusionlab.data import load_dataset

    def hung(signum, frame):
        raise TimeoutError("loading an image folder with a named pipe hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        ds = load_dataset({"name": "image_folder", "path": str(folder), "image_size": 8})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(ds) == 1


# ==== 13. torchrun user errors =============================================================================
@pytest.mark.slow
def test_torchrun_user_error_is_printed_once_by_rank_0(tmp_path):
    cfg = _cfg_file(tmp_path, train={"batch_size": 15})
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "diffusionlab", "train", str(cfg), "--out",
                          str(tmp_path / "run"), "--quiet"], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("diffusionlab: error:")]
    assert len(ours) == 1 and "does not divide by the 2 processes" in ours[0], res.stderr
    assert not (tmp_path / "run").exists()


# ==== 14. the fitted noise covariance =======================================================================
FITTED = {
    "data": {"name": "moving_digits", "num": 16, "frames": 4, "size": 8},
    "process": {"name": "vp", "T": 20, "noise": "fitted"},
    "model": {"name": "video_unet", "base_channels": 8, "channel_mults": [1], "attn_resolutions": []},
    "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "device": "cpu", "threads": 1},
    "sample": {"sampler": "ddpm", "num": 4},
}


def test_fitted_noise_writes_nothing_on_bad_input_and_the_run_can_move(tmp_path):
    cfg = tmp_path / "fitted.yaml"
    cfg.write_text(yaml.safe_dump(FITTED))
    rc, lines = _cli(["train", cfg, "--out", tmp_path / "bad", "--quiet", "--set", "sample.steps=500"])
    assert rc == 2 and not (tmp_path / "bad").exists(), lines
    rc, lines = _cli(["train", cfg, "--out", tmp_path / "run", "--quiet"])
    assert rc == 0, lines
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["process"]["noise"] == "file:noise_covariance.safetensors"
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "run").rename(moved)
    rc, lines = _cli(["sample", "--run", moved, "--num", "2", "--out", tmp_path / "v.npz", "--quiet"])
    assert rc == 0, lines
    rc, lines = _cli(["train", cfg, "--out", moved, "--quiet", "--resume", "--set", "train.steps=4"])
    assert rc == 0, lines  # the fitted spec is answered by the run's own file: not a changed config


# ==== skipped steps are reported ============================================================================
def test_skipped_steps_are_counted_warned_and_summarised(tmp_path, monkeypatch):
    import diffusionlab.objectives as objectives

    real, calls = objectives.make_objective, {"n": 0}

    def poisoned(cfg, process):
        obj = real(cfg, process)

        def some_nan(model, x0, **kw):
            loss = obj(model, x0, **kw)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] in (3, 7):
                    return loss * float("nan")
            return loss

        return some_nan

    monkeypatch.setattr(objectives, "make_objective", poisoned)
    run = tmp_path / "run"
    rc, lines = _cli(["train", _cfg_file(tmp_path, train={"steps": 20, "log_every": 10}), "--out", run])
    assert rc == 0, lines
    warnings = [line for line in lines if "were skipped" in line]
    assert len(warnings) == 1 and "2 of the 10 steps up to step 10" in warnings[0], lines
    assert lines[-1].endswith(f"(2 skipped: non-finite loss or gradient); weights: {run / 'model.safetensors'}")
    assert json.loads((run / "train_summary.json").read_text())["skipped_steps"] == 2
    assert any("skipped=2" in line for line in lines if line.startswith("train:")), lines


def test_every_documented_behaviour_names_a_test_of_this_file():
    assert all(callable(globals().get(test)) for *_, test in BEHAVIOURS)
