"""Checkpoints: safetensors only, written atomically, verified on load.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN/`` holding

- ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights),
- ``state.safetensors`` (optimizer tensors and RNG states as uint8 tensors),
- ``meta.json`` (step, optimizer hyper-parameters, the size and SHA-256 of every file above).

It is first written to a temporary sibling directory (``.dltmp.<pid>.step_N.*``, removed at the next start once its
writer is dead: :func:`diffusionlab.io.clean_stale_temporaries`), every file is fsync'ed, and the directory is
renamed into place (then the parent is fsync'ed): a kill at any moment leaves either the previous complete
checkpoint or the new one, never a half-written one under the final name. ``meta.json`` carries the SHA-256 of
its own content too, and its fields are checked (types, the step matching the directory's name).

Checkpoints are ordered by the step recorded inside, never by name, and kept by integrity
(:func:`prune_checkpoints`): only verified checkpoints count towards ``keep``, the newest intact one is never
deleted, and a damaged one is removed only once a newer intact one supersedes it. On load
(:func:`load_latest_checkpoint`) sizes, hashes and fields are checked and the checkpoint is applied; any failure
(a truncated file, bad metadata, a missing RNG entry, an optimizer that does not match) is reported and the
previous intact one is tried; when checkpoints exist but none can be used, that is an error, never a silent
restart. Nothing is ever unpickled.
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
from safetensors.torch import load_file, save

from diffusionlab.errors import DiffusionLabError
from diffusionlab.io import TMP_PREFIX, fsync_dir, temp_dir

CKPT_DIR = "checkpoints"
#: a meta.json larger than this is not one a checkpoint wrote (it holds hashes, step, optimizer hyper-parameters)
MAX_META_BYTES = 16 << 20
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


def restore_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> list[str]:
    """Set torch's global RNGs and the named generators from :func:`rng_state_tensors`' tensors; a missing or
    malformed entry is a :class:`DiffusionLabError` (checked before anything is set).

    A generator's state is specific to its kind of device (a CPU generator's Mersenne-Twister state, a CUDA
    generator's seed and offset), so a run resumed on another kind of device (``train.device`` may change) cannot
    take it over: that generator is seeded from a digest of the saved state instead -- deterministic, the same on
    every such resume, but not the stream an uninterrupted run would have drawn. Returns the names of the generators
    reseeded that way (empty when the resume is exact)."""
    want = ["rng.torch_cpu", *(f"rng.gen.{name}" for name in generators)]
    missing = [k for k in want if k not in tensors]
    if missing:
        raise DiffusionLabError(f"checkpoint state has no RNG entry {', '.join(missing)}")
    bad = [k for k in want if tensors[k].dtype != torch.uint8 or tensors[k].ndim != 1]
    if bad:
        raise DiffusionLabError(f"checkpoint RNG entry {bad[0]} is not a byte vector")
    reseeded = [name for name, g in generators.items()
                if tensors[f"rng.gen.{name}"].numel() != g.get_state().numel()]
    try:
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
            if states:
                torch.cuda.set_rng_state_all(states)
        for name, g in generators.items():
            saved = tensors[f"rng.gen.{name}"]
            if name in reseeded:
                digest = hashlib.sha256(saved.numpy().tobytes()).digest()
                g.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            else:
                g.set_state(saved)
    except RuntimeError as e:  # a state of the right length that the generator still refuses
        raise DiffusionLabError(f"checkpoint RNG state does not fit: {str(e).splitlines()[0]}") from None
    return reseeded


def restore_optimizer(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load an optimizer state and give every state tensor its parameter's memory format, dtype and device.

    ``Optimizer.load_state_dict`` casts the saved tensors (written contiguous) to the parameter's dtype and device
    but keeps their layout; a channels-last parameter would then get contiguous moments, and the fused AdamW,
    which pairs parameter and moment elements by memory, would scramble them. Each state tensor shaped like its
    parameter is therefore rebuilt with ``empty_like(param)`` (which keeps the parameter's strides). Groups,
    parameter counts and state shapes are checked first (a :class:`DiffusionLabError`), so a checkpoint of another
    model never half-loads."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise DiffusionLabError(f"checkpoint optimizer has {len(groups) if isinstance(groups, list) else groups!r} "
                                f"parameter group(s); this optimizer has {len(opt.param_groups)}")
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(live["params"]):
            raise DiffusionLabError(f"checkpoint optimizer group {i} does not match this optimizer's "
                                    f"{len(live['params'])} parameters")
    ids = [i for g in groups for i in g["params"]]
    for pid, st in state_dict.get("state", {}).items():
        if pid not in ids:
            raise DiffusionLabError(f"checkpoint optimizer state names parameter {pid!r}, which no group holds")
        p = params[ids.index(pid)]
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != tuple(p.shape):
                raise DiffusionLabError(f"checkpoint optimizer state {k} of parameter {pid} has shape "
                                        f"{tuple(v.shape)}; the parameter has {tuple(p.shape)}")
    try:
        opt.load_state_dict(state_dict)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DiffusionLabError(f"checkpoint optimizer state does not load: {str(e).splitlines()[0]}") from None
    for p in params:
        st = opt.state.get(p)
        for k, v in (st or {}).items():
            if torch.is_tensor(v) and v.shape == p.shape and v.ndim > 0:
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


# -- whole checkpoints --------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def name_step(path: Path) -> int | None:
    """The step in a checkpoint directory's name (``step_00001000`` -> 1000), None if it has none."""
    digits = path.name[len("step_"):]
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, model_sd: dict, ema_sd: dict, optimizer, generators: dict,
                    extra: dict | None = None, keep: int = 2, warn=None) -> Path:
    """Write checkpoint ``step`` atomically, then keep the newest ``keep`` intact ones (:func:`prune_checkpoints`);
    returns its directory. An :class:`OSError` (a full disk, a file-size limit) leaves the previous checkpoints
    as they were, with no temporary left behind."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = temp_dir(root, final.name)
    try:
        opt_tensors, opt_meta = _pack_optimizer(optimizer)
        state = {**opt_tensors, **rng_state_tensors(generators)}
        files = {}
        for name, tensors in zip(FILES, (model_sd, ema_sd, state)):
            # serialised in memory and written by Python, so a full disk or a file-size limit is an OSError
            data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta = {"format": 1, "step": step, "optimizer": opt_meta, "files": files, "extra": extra or {}}
        meta["meta_sha256"] = _meta_digest(meta)
        _write_json(tmp / "meta.json", meta)
        fsync_dir(tmp)
        if final.exists():  # the same step written again (a resume from an older checkpoint): move the old aside
            old = temp_dir(root, "old." + final.name)
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _VERIFIED[str(final)] = _fingerprint(final)
    prune_checkpoints(run_dir, keep, warn=warn)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories (temporary ones excluded, intact or not), by the step in their names, oldest first
    (numerically: ``step_100000000`` comes after ``step_99999999``)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    try:
        found = [p for p in root.iterdir() if p.name.startswith("step_") and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return sorted(found, key=lambda p: (name_step(p) is None, name_step(p) or 0, p.name))


#: fingerprints (name, size, mtime, inode of every file) of checkpoints verified by this process: verifying again
#: after each save would re-hash every kept checkpoint
_VERIFIED: dict[str, tuple] = {}


def _fingerprint(path: Path) -> tuple:
    out = []
    for name in (*FILES, "meta.json"):
        st = (path / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class UnreadableCheckpoint(DiffusionLabError):
    """A checkpoint whose files cannot be read (permissions, I/O): not known to be damaged."""


def _bad(path: Path, what: str) -> DiffusionLabError:
    return DiffusionLabError(f"checkpoint {path.name} {what}")


def _check_meta(path: Path, meta) -> dict:
    """The fields of ``meta.json`` checked (types, sizes, the step against the directory's name, its own digest)."""
    if not isinstance(meta, dict):
        raise _bad(path, "has a meta.json that is not a JSON object")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
        raise _bad(path, "has a corrupted meta.json (its SHA-256 does not match)")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _bad(path, f"has a bad step in meta.json: {str(step)[:40]!r}")
    if name_step(path) is not None and name_step(path) != step:
        raise _bad(path, f"records step {step} in meta.json, not the {name_step(path)} of its name")
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise _bad(path, f"meta.json does not list its files {', '.join(FILES)}")
    for name, info in files.items():
        ok = isinstance(info, dict) and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool) \
            and isinstance(info.get("sha256"), str) and len(info["sha256"]) == 64
        if not ok:
            raise _bad(path, f"meta.json has no byte count and SHA-256 for {name}")
    opt = meta.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) \
            or not isinstance(opt.get("scalars", {}), dict):
        raise _bad(path, "meta.json has no optimizer parameter groups")
    if not isinstance(meta.get("extra", {}), dict):
        raise _bad(path, "meta.json has a malformed extra field")
    return meta


def verify_checkpoint(path: Path) -> dict:
    """Return the checkpoint's meta after checking its fields and every file's size and SHA-256; raise
    :class:`DiffusionLabError` (an unreadable file too: ``OSError`` is reported, not raised)."""
    meta_path = path / "meta.json"
    try:
        size = meta_path.stat().st_size
        if size > MAX_META_BYTES:
            raise DiffusionLabError(f"checkpoint {path.name} has a {size}-byte meta.json, more than any checkpoint "
                                    f"writes ({MAX_META_BYTES}); corrupted")
        meta = json.loads(meta_path.read_text())
    except OSError as e:
        raise UnreadableCheckpoint(f"checkpoint {path} has no readable meta.json ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffusionLabError(f"checkpoint {path} has a malformed meta.json ({e})") from None
    meta = _check_meta(path, meta)
    try:
        if _VERIFIED.get(str(path)) == _fingerprint(path):
            return meta
    except OSError:
        pass
    for name, info in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise DiffusionLabError(f"checkpoint {path} is missing {name}")
        try:
            size = f.stat().st_size
            if size != info["bytes"]:
                raise DiffusionLabError(
                    f"checkpoint file {f} is truncated or altered: {size} bytes, expected {info['bytes']}")
            digest = _sha256(f)
        except OSError as e:
            raise UnreadableCheckpoint(f"checkpoint file {f} cannot be read ({e.strerror or e})") from None
        if digest != info["sha256"]:
            raise DiffusionLabError(f"checkpoint file {f} is corrupted: SHA-256 does not match meta.json")
    try:
        _VERIFIED[str(path)] = _fingerprint(path)
    except OSError:
        pass
    return meta


def survey_checkpoints(run_dir: str | Path) -> tuple[list[tuple[int, Path, dict]], list[tuple[Path, str, bool]]]:
    """``(intact, broken)``: the verified checkpoints as ``(step, path, meta)`` ordered by the step recorded inside
    (oldest first), and the others as ``(path, reason, unreadable)`` (``unreadable``: not known to be damaged)."""
    intact, broken = [], []
    for path in list_checkpoints(run_dir):
        try:
            meta = verify_checkpoint(path)
        except DiffusionLabError as e:
            broken.append((path, str(e), isinstance(e, UnreadableCheckpoint)))
            continue
        intact.append((meta["step"], path, meta))
    intact.sort(key=lambda x: x[0])
    return intact, broken


def prune_checkpoints(run_dir: str | Path, keep: int, warn=None) -> None:
    """Keep the newest ``keep`` intact checkpoints (by the step inside) and delete older intact ones; a damaged
    checkpoint is deleted only when a newer intact one supersedes it (reported through ``warn``); an unreadable
    one (permissions) is left alone. The newest intact checkpoint is never deleted."""
    keep = max(1, int(keep))
    intact, broken = survey_checkpoints(run_dir)
    if not intact:
        return
    for _, path, _ in intact[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        _VERIFIED.pop(str(path), None)
    newest = intact[-1][0]
    for path, reason, unreadable in broken:
        step = name_step(path)
        if step is None or step > newest or unreadable:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if warn is not None:
            warn(f"diffusionlab: warning: removed damaged checkpoint {path.name}, superseded by step {newest} "
                 f"({reason})")


def stale_checkpoint_temp(name: str) -> bool:
    """Temporary checkpoint directories of the naming before :func:`diffusionlab.io.temp_dir` (``.step_N.*``),
    which carry no PID; only the run's (locked) writer writes checkpoints, so at its start they are stale."""
    return name.startswith(".step_") and not name.startswith(TMP_PREFIX)


class NoUsableCheckpoint(DiffusionLabError):
    """Checkpoints exist but none can be read and applied."""


def load_latest_checkpoint(run_dir: str | Path, device="cpu", warn=print, apply=None) -> dict | None:
    """The newest usable checkpoint as a dict (``step``, ``model``, ``ema``, ``optimizer``, ``state``, ``meta``,
    ``path``), ordered by the step recorded inside; ``None`` if the run has no checkpoint at all.

    A checkpoint is usable when it verifies, its files load and ``apply(ck)`` (if given: load it into the
    model, optimizer and generators) succeeds; otherwise the next older one is tried, and the skipped ones are
    reported through ``warn``. Checkpoints that exist but none usable raise :class:`NoUsableCheckpoint`."""
    paths = list_checkpoints(run_dir)
    if not paths:
        return None
    intact, broken = survey_checkpoints(run_dir)
    skipped = [f"{p.name}: {reason}" for p, reason, _ in broken]
    for step, path, meta in reversed(intact):
        try:
            model = load_file(str(path / FILES[0]), device=str(device))
            ema = load_file(str(path / FILES[1]), device=str(device))
            state = load_file(str(path / FILES[2]))
            ck = {"step": step, "model": model, "ema": ema, "optimizer": _unpack_optimizer(state, meta["optimizer"]),
                  "state": state, "meta": meta, "path": path}
            if apply is not None:
                apply(ck)
        except (DiffusionLabError, SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError,
                AttributeError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            skipped.append(f"{path.name}: {first[:300]}")
            continue
        for line in skipped:
            warn(f"diffusionlab: warning: skipping checkpoint {line}")
        return ck
    root = Path(run_dir) / CKPT_DIR
    shown = "; ".join(skipped[-3:]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    raise NoUsableCheckpoint(f"none of the {len(paths)} checkpoint(s) in {root} can be used ({shown}); nothing was "
                             "changed: restore them (or their permissions), or train into another --out")
