"""Checkpoints: safetensors only, written atomically, verified on load.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN/`` holding

- ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights),
- ``state.safetensors`` (optimizer tensors and RNG states as uint8 tensors),
- ``meta.json`` (step, optimizer hyper-parameters, the size and SHA-256 of every file above).

It is first written to a temporary sibling directory, every file is fsync'ed, and the directory is renamed
into place (then the parent is fsync'ed): a kill at any moment leaves either the previous complete
checkpoint or the new one, never a half-written one under the final name. On load, sizes and hashes are
checked; a truncated or corrupted checkpoint is reported and the previous intact one is used.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusionlab.errors import DiffusionLabError
from diffusionlab.io import default_mode, fsync_dir, fsync_file

CKPT_DIR = "checkpoints"
FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- optimizer / RNG state <-> flat tensors ----------------------------------------------------------------
def _pack_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unpack_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """RNG states as uint8 tensors: torch's global CPU RNG, every CUDA device's, and the named generators."""
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    for name, g in generators.items():
        out[f"rng.gen.{name}"] = g.get_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, g in generators.items():
        g.set_state(tensors[f"rng.gen.{name}"])


# -- whole checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, model_sd: dict, ema_sd: dict, optimizer, generators: dict,
                    extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``; returns its directory."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=root))
    os.chmod(tmp, default_mode(directory=True))
    try:
        opt_tensors, opt_meta = _pack_optimizer(optimizer)
        save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, str(tmp / FILES[0]))
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_sd.items()}, str(tmp / FILES[1]))
        state = {**{k: v.detach().contiguous().cpu() for k, v in opt_tensors.items()}, **rng_state_tensors(generators)}
        save_file(state, str(tmp / FILES[2]))
        files = {}
        for name in FILES:
            fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        meta = {"step": step, "optimizer": opt_meta, "files": files, "extra": extra or {}}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories (temporary ones excluded), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> dict:
    """Return the checkpoint's meta after checking every file's size and SHA-256; raise DiffusionLabError."""
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusionLabError(f"checkpoint {path} has no readable meta.json ({e})") from None
    for name, info in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise DiffusionLabError(f"checkpoint {path} is missing {name}")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise DiffusionLabError(f"checkpoint file {f} is truncated or altered: {size} bytes, expected {info['bytes']}")
        if _sha256(f) != info["sha256"]:
            raise DiffusionLabError(f"checkpoint file {f} is corrupted: SHA-256 does not match meta.json")
    return meta


def load_latest_checkpoint(run_dir: str | Path, device="cpu", warn=print) -> dict | None:
    """The newest intact checkpoint as a dict (``step``, ``model``, ``ema``, ``optimizer``, ``state``, ``meta``),
    skipping (and reporting through ``warn``) corrupted ones; ``None`` if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            meta = verify_checkpoint(path)
            model = load_file(str(path / FILES[0]), device=str(device))
            ema = load_file(str(path / FILES[1]), device=str(device))
            state = load_file(str(path / FILES[2]))
        except (DiffusionLabError, SafetensorError, OSError) as e:
            warn(f"diffusionlab: warning: skipping checkpoint {path.name}: {e}")
            continue
        return {
            "step": int(meta["step"]),
            "model": model,
            "ema": ema,
            "optimizer": _unpack_optimizer(state, meta["optimizer"]),
            "state": state,
            "meta": meta,
            "path": path,
        }
    return None
