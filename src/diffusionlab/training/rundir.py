"""A run directory's safety: one writer, checks before training, what may change on ``--resume``, movable paths.

- :class:`RunLock`: an exclusive lock (``flock`` on ``run.lock``) held by the one process that writes a run, for
  the run's lifetime. The kernel releases it when that process ends in any way (kill -9 included), so a lock left
  by a dead writer is never an obstacle; the file names the holder's PID for the message that refuses a second
  writer. Where ``flock`` is not supported, the PID in the file decides (a dead PID is a stale lock).
- :func:`preflight`: what can be checked before a step is taken (every path the run writes, writable; free disk
  space for a checkpoint and the final weights; the file-size limit ``ulimit -f``), each failure one line.
- :func:`check_resume_config`: ``--resume`` accepts a changed config only in the keys of :data:`MAY_CHANGE`
  (more steps, logging and checkpoint cadence, device, threads, gradient accumulation, how the data are read, the
  ``sample:`` section); any other difference
  is refused, naming the keys. Both configs are full resolutions (:func:`diffusionlab.training.config.resolve`),
  so a key left at its default and the same key written out compare equal.
- :func:`portable` / :func:`localize`: ``process.noise: file:PATH`` is saved relative to the run directory when
  ``PATH`` lies inside it (the fitted covariance), absolute otherwise, so a run directory can be moved.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import socket
from pathlib import Path

from diffusionlab.errors import DiffusionLabError
from diffusionlab.io import os_error, pid_alive

LOCK_NAME = "run.lock"

#: keys of a run config that ``--resume`` may change (section -> keys; ``"*"``: the whole section)
MAY_CHANGE = {
    "train": {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "device", "threads",
              "max_bad_steps", "compile", "tensorboard", "accumulate"},
    # how the data are read (the batches are the same), and which bad files are left out (reported on resume)
    "data": {"stream", "workers", "prefetch", "bad_files"},
    "sample": "*",
}

#: files a training run writes directly in its directory (each must be a file or absent)
RUN_FILES = ("config.yaml", "log.csv", "model.safetensors", "model_raw.safetensors", "train_summary.json",
             "loss.png", "noise_covariance.safetensors")


# ---- the lock -----------------------------------------------------------------------------------------------------
class RunLock:
    """``with RunLock(run_dir):`` -- the exclusive writer's lock of a run directory (module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "another process"
        return f"process {text}" if text else "another process"

    def acquire(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, f"write to the run directory {self.run_dir}") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            raise DiffusionLabError(f"{self.run_dir} is being written by {self._holder()} (lock {self.path}); wait "
                                    "for it to finish, or train into another --out") from None
        except (ImportError, OSError) as e:  # no flock here (some network file systems): the PID decides
            if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise os_error(e, f"lock {self.path}") from None
            pid = self._pid_in_file()
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                os.close(fd)
                raise DiffusionLabError(f"{self.run_dir} is being written by {self._holder()} (lock {self.path}); "
                                        "wait for it to finish, or train into another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def _pid_in_file(self) -> int | None:
        try:
            first = self.path.read_text().split()
        except OSError:
            return None
        return int(first[0]) if first and first[0].isdigit() else None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no stale PID left behind; the file stays (unlinking it would race)
        except OSError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- checks before training ---------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def preflight(out: Path, parameters: int, sample_every: int = 0, world_size: int = 1) -> None:
    """Refuse, before any step, what would fail later (module docstring). ``parameters``: trainable float32
    parameters (a checkpoint holds about 16 bytes each: weights, EMA and the two AdamW moments)."""
    from diffusionlab.training.checkpoint import CKPT_DIR

    if out.exists() and not out.is_dir():
        raise DiffusionLabError(f"cannot write to the run directory {out}: it is a file")
    if not out.exists():  # nothing to check inside yet: the nearest existing parent must take the new directory
        parent = next((q for q in out.absolute().parents if q.exists()), Path("/"))
        if not parent.is_dir():
            raise DiffusionLabError(f"cannot write to the run directory {out}: {parent} is not a directory")
        _probe(parent, out)
        _space(parent, parameters, out)
        return
    for name in RUN_FILES:
        if (out / name).is_dir():
            raise DiffusionLabError(f"cannot write {out / name}: it is a directory")
    subdirs = [CKPT_DIR] + (["samples"] if sample_every else [])
    for name in subdirs:
        d = out / name
        if d.exists() and not d.is_dir():
            raise DiffusionLabError(f"cannot write checkpoints to {d}: it is a file, not a directory" if name == CKPT_DIR
                                    else f"cannot write samples to {d}: it is a file, not a directory")
        if d.is_dir():
            _probe(d, out)
    _probe(out, out)
    _space(out, parameters, out)


def _space(where: Path, parameters: int, out: Path) -> None:
    checkpoint_bytes = 16 * parameters + (64 << 10)
    final_bytes = 8 * parameters + (64 << 10)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    need = checkpoint_bytes + final_bytes
    if free is not None and free < need:
        raise DiffusionLabError(f"not enough disk space for {out}: a checkpoint and the final weights need about "
                                f"{_mb(need)}, {_mb(free)} are free")
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return
    largest = 8 * parameters + (64 << 10)  # the optimizer-state file: two moments per parameter, RNG states
    if limit != resource.RLIM_INFINITY and limit < largest:
        raise DiffusionLabError(f"the file-size limit (ulimit -f) of {limit} bytes is below the about {largest} bytes "
                                "of a checkpoint file of this model; raise it (ulimit -f unlimited)")


def _probe(d: Path, out: Path) -> None:
    probe = d / f".dltmp.{os.getpid()}.write_test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise os_error(e, f"write to {d}" if d == out or out in d.parents else
                       f"create the run directory {out} in {d}") from None


# ---- what --resume may change -------------------------------------------------------------------------------------
def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def config_changes(saved: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ between two full configs, except those of :data:`MAY_CHANGE`."""
    out = []
    for section in dict.fromkeys([*saved, *new]):
        allowed = MAY_CHANGE.get(section, set())
        if allowed == "*":
            continue
        a, b = saved.get(section), new.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if _plain(a) != _plain(b):
                out.append(section)
            continue
        for key in dict.fromkeys([*a, *b]):
            if key in allowed:
                continue
            if key not in a or key not in b or _plain(a[key]) != _plain(b[key]):
                out.append(f"{section}.{key}")
    return out


def _show(v) -> str:
    from diffusionlab.checks import brief

    return brief(v, 40)


def check_resume_config(saved: dict, new: dict, run_dir: Path) -> None:
    """Refuse a ``--resume`` whose config differs from the run's saved one outside :data:`MAY_CHANGE`."""
    changed = config_changes(saved, new)
    if not changed:
        return

    def value(cfg, key):
        section, _, name = key.partition(".")
        node = cfg.get(section, {})
        return node.get(name, "(absent)") if name and isinstance(node, dict) else node

    shown = ", ".join(f"{k} ({_show(value(saved, k))} -> {_show(value(new, k))})" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    allowed = ", ".join(f"{s}.{k}" for s, keys in MAY_CHANGE.items() if keys != "*" for k in sorted(keys))
    raise DiffusionLabError(f"--resume with a config that differs from {run_dir / 'config.yaml'} in {shown}{more}; "
                            f"a resumed run may change only {allowed} and the sample: section; train into another "
                            "--out to change the rest")


# ---- movable paths ------------------------------------------------------------------------------------------------
def _noise_file(cfg: dict) -> str | None:
    spec = (cfg.get("process") or {}).get("noise")
    if isinstance(spec, str) and spec.strip().lower().startswith("file:"):
        return spec.strip()[len("file:"):]
    return None


def _with_noise(cfg: dict, path: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["process"]["noise"] = f"file:{path}"
    return cfg


def portable(cfg: dict, run_dir: Path) -> dict:
    """``cfg`` as saved in ``run_dir/config.yaml``: a ``file:`` noise path inside the run directory relative to it,
    any other one absolute (the run directory can then be moved)."""
    path = _noise_file(cfg)
    if path is None:
        return cfg
    p = Path(os.path.expanduser(path))
    absolute = p if p.is_absolute() else Path.cwd() / p
    root = Path(os.path.abspath(run_dir))
    try:
        return _with_noise(cfg, str(Path(os.path.abspath(absolute)).relative_to(root)))
    except ValueError:
        return _with_noise(cfg, os.path.abspath(absolute))


def localize(cfg: dict, run_dir: Path) -> dict:
    """``cfg`` read from ``run_dir/config.yaml`` with a relative ``file:`` noise path made absolute against the
    run directory (the inverse of :func:`portable`)."""
    path = _noise_file(cfg)
    if path is None or Path(os.path.expanduser(path)).is_absolute():
        return cfg
    return _with_noise(cfg, str(Path(os.path.abspath(run_dir)) / path))


def absolute_noise_path(cfg: dict) -> dict:
    """``cfg`` of a user's config with a relative ``file:`` noise path made absolute against the working directory
    (what it means when ``train`` reads it)."""
    path = _noise_file(cfg)
    if path is None or Path(os.path.expanduser(path)).is_absolute():
        return cfg
    return _with_noise(cfg, os.path.abspath(os.path.expanduser(path)))
