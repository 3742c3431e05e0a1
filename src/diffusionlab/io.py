"""Writing files so that nothing is ever half-written, and reading weights without unpickling.

Every file the package writes goes through :func:`atomic_write_bytes` (bytes) or :func:`atomic_path` (a writer that
needs a path, e.g. imageio or matplotlib): the data go to a temporary file in the target's directory, are
fsync'ed, and the file is renamed over the target (then the directory is fsync'ed). A kill at any moment leaves
either the previous file or the new one. Every temporary (file or directory: checkpoints use
:func:`temp_dir`) is named ``.dltmp.<pid>.<name>.<random>``, so :func:`clean_stale_temporaries` can remove those
of writers that died (kill -9) without touching a live writer's. :func:`load_weights` reads safetensors, or
``.pt`` files with ``torch.load(weights_only=True)``: a pickle that carries code is refused and never executed.
:func:`os_error` turns an operating-system error into the one-line message of a :class:`DiffusionLabError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError

#: prefix of every temporary file or directory the package writes next to its target
TMP_PREFIX = ".dltmp."


def fsync_file(path: str | Path) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (after a rename inside it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open(..., "w")`` / ``mkdir`` would give (``mkstemp``/``mkdtemp`` use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (``kill(pid, 0)``; a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def temp_owner(name: str) -> int | None:
    """The writer's PID in a temporary's name ``.dltmp.<pid>.*``; None for any other name."""
    if not name.startswith(TMP_PREFIX):
        return None
    pid, _, _ = name[len(TMP_PREFIX):].partition(".")
    return int(pid) if pid.isdigit() else None


def clean_stale_temporaries(directory: str | Path, extra=None) -> list[Path]:
    """Remove the temporaries (files or directories) of dead writers directly inside ``directory``; return them.

    A temporary is stale when its writer (the PID in its name) no longer runs; ``extra(name) -> bool`` marks other
    names as stale too (e.g. an older naming scheme). A live writer's temporaries are never touched."""
    import shutil

    root = Path(directory)
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        pid = temp_owner(entry.name)
        stale = (pid is not None and pid != os.getpid() and not pid_alive(pid)) or bool(extra and extra(entry.name))
        if not stale:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass  # a permission problem surfaces when the run writes there
    return removed


def os_error(e: OSError, doing: str) -> DiffusionLabError:
    """A one-line error for an operating-system error while ``doing`` something (``"write DIR/x"``): the
    system's own wording (``No space left on device``, ``File too large``, ``Permission denied``)."""
    what = e.strerror or type(e).__name__
    if e.errno == errno.EFBIG:
        what += " (the file-size limit, ulimit -f)"
    return DiffusionLabError(f"cannot {doing}: {what}")


def temp_dir(parent: str | Path, name: str) -> Path:
    """A new temporary directory ``.dltmp.<pid>.<name>.<random>`` in ``parent`` with default permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}.{name}.", dir=parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def _temp_name(path: Path) -> str:
    """A unique temporary path next to ``path`` that keeps its suffix (imageio picks the format from it) and
    names the writing process (so stale temporaries of dead writers can be recognised)."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}.{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """``with atomic_path(p) as tmp: write(tmp)``: the file written to ``tmp`` replaces ``p`` only when the block
    succeeds (fsync'ed, renamed); on any error the temporary is removed and ``p`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (module docstring)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors`` serialisation written through :func:`atomic_write_bytes`."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a weights file without unpickling: safetensors, or ``torch.load(weights_only=True)`` for
    ``.pt``/``.pth``/``.bin``/``.ckpt`` files from elsewhere. A file carrying pickled code is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DiffusionLabError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise DiffusionLabError(f"{path} is not a valid safetensors file ({e})") from None
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        import pickle

        try:
            obj = torch.load(str(path), map_location=device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ValueError, IndexError,
                KeyError) as e:  # garbage bytes can stop the weights-only unpickler in any of these
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffusionLabError(
                f"refused to load {path}: it is not a plain weights file (weights_only load failed: {first}); "
                "nothing in it was executed"
            ) from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise DiffusionLabError(f"{path} does not hold a flat mapping of tensors")
        return obj
    raise DiffusionLabError(f"unsupported weights file {path}: use .safetensors (or .pt/.pth loaded weights-only)")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (the training settings and figures a shipped network records)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_frozen(cache: dict, build, path: str | Path, device: torch.device, what: str, hint: str) -> torch.nn.Module:
    """``build()`` loaded with the safetensors weights at ``path`` (never pickle), frozen, in eval mode on
    ``device``; cached in ``cache`` per (path, device). A missing file or weights that do not fit are one
    DiffusionLabError naming ``what`` (``hint``: how to make the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    key = (str(p.resolve()), str(device))
    if key not in cache:
        if not p.is_file():
            raise DiffusionLabError(f"{what} {str(p)!r} not found; {hint}")
        model = build()
        try:
            model.load_state_dict(load_file(str(p), device="cpu"))
        except (RuntimeError, SafetensorError, OSError) as e:
            raise DiffusionLabError(f"{what} {str(p)!r} do not load into {type(model).__name__}: "
                                    f"{str(e).strip().splitlines()[0]}") from None
        for prm in model.parameters():
            prm.requires_grad_(False)
        cache[key] = model.to(device).eval()
    return cache[key]
