"""``evaluate --metric fid``: FID, KID and precision/recall of a model's samples against its dataset.

The samples are drawn as ``diffusionlab sample`` draws them (:func:`~diffusionlab.training.sampling.generate`:
the run's sampler and step count unless overridden, one seeded generator); the reference set is the dataset the
run was trained on (its ``data`` config, every image). Both go through the same feature extractor -- the FID
Inception-v3 with weights from a local file (:func:`diffusionlab.interop.inception.load_inception`), or any
object of :mod:`diffusionlab.metrics.standard`'s extractor interface -- and are scored by
:func:`diffusionlab.metrics.standard.image_scores`.

Reference features are computed once per (dataset, extractor) and cached: the file
``<cache>/<key>.safetensors`` holds the features and their mean and covariance, ``key`` the SHA-256 of the data
config, of the reference images' bytes (so an image folder whose contents changed gets new statistics), of the
preprocessing version and of the extractor's ``identity`` (for the Inception network, the SHA-256 of its weights
file). It is written atomically (a temporary file, fsync, rename), so an interrupted computation leaves no cache
entry. The cache folder is ``--stats-cache``, else ``$DIFFUSIONLAB_CACHE/fid``, else ``~/.cache/diffusionlab/fid``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError

PREPROCESS_VERSION = "uint8-round-rgb-v1"  # metrics.standard.to_uint8_rgb; bump if the preprocessing changes
DEFAULT_NUM = 1000


def default_cache_dir() -> Path:
    """``$DIFFUSIONLAB_CACHE/fid``, else ``~/.cache/diffusionlab/fid``."""
    root = os.environ.get("DIFFUSIONLAB_CACHE")
    return Path(root) / "fid" if root else Path.home() / ".cache" / "diffusionlab" / "fid"


def reference_key(data_cfg: dict, images01: torch.Tensor, identity: str) -> tuple[str, dict]:
    """``(key, description)``: the cache key of a reference set's features (module docstring)."""
    digest = hashlib.sha256(images01.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
    desc = {"data": data_cfg, "images_sha256": digest, "num": int(images01.shape[0]),
            "shape": list(images01.shape[1:]), "preprocess": PREPROCESS_VERSION, "extractor": str(identity)}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
    return key, desc


def _load_cached(path: Path, desc: dict):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("reference", "null"))
            if meta != json.loads(json.dumps(desc, sort_keys=True, default=str)):
                return None
            return (f.get_tensor("features").double(), (f.get_tensor("mu").numpy(), f.get_tensor("sigma").numpy()))
    except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed, never trusted
        return None


def reference_features(images01: torch.Tensor, data_cfg: dict, extractor, cache_dir: str | Path | None = None,
                       batch_size: int = 50, progress: bool = False, log=None):
    """``(features, (mu, sigma), info)`` of the reference images (display space), from the cache when present,
    else computed and cached (module docstring). ``info`` says where the entry is and whether it was reused."""
    from diffusionlab.metrics.frechet import feature_statistics
    from diffusionlab.metrics.standard import extract_features
    from diffusionlab.io import save_safetensors_atomic

    identity = getattr(extractor, "identity", None)
    if not isinstance(identity, str) or not identity:
        raise DiffusionLabError("a feature extractor needs a non-empty string attribute 'identity' (its cache key)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key, desc = reference_key(data_cfg, images01, identity)
    path = cache / f"{key}.safetensors"
    if path.is_file():
        hit = _load_cached(path, desc)
        if hit is not None:
            return hit[0], hit[1], {"cache": str(path), "cached": True, "num": int(images01.shape[0])}
    if log is not None:
        log(f"diffusionlab: reference features of {images01.shape[0]} images (cached afterwards in {path})")
    feats = extract_features(extractor, images01, batch_size, progress)
    mu, sigma = feature_statistics(feats)
    f32 = feats.float()
    stored = f32 if torch.equal(f32.double(), feats) else feats  # float32 when that is lossless
    try:
        save_safetensors_atomic({"features": stored, "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, path,
                                metadata={"reference": json.dumps(desc, sort_keys=True, default=str)})
    except OSError as e:
        raise DiffusionLabError(f"cannot write the reference-statistics cache {path}: {e}") from None
    return feats, (mu, sigma), {"cache": str(path), "cached": False, "num": int(images01.shape[0])}


def check_image_dataset(ds, where: str) -> None:
    """FID and friends are for image runs: refuse points and videos, naming the run's kind."""
    if ds.kind != "images":
        raise DiffusionLabError(f"--metric fid needs an image model; {where} has {ds.kind} ({ds.name!r})")


def evaluate_image_metrics(loaded, extractor, where: str, num: int = DEFAULT_NUM, seed: int = 0,
                           sampler: str | None = None, steps: int | None = None, cache_dir=None, batch_size: int = 50,
                           progress: bool = False, log=None) -> dict:
    """FID / KID / precision / recall of ``num`` samples of ``loaded = (cfg, ds, model)`` (a run or a diffusers
    model, :func:`~diffusionlab.training.sampling.load_run`'s triple) against the whole of ``ds``; ``where``
    names the model in messages. JSON-ready."""
    from diffusionlab.metrics.standard import extract_features, image_scores
    from diffusionlab.training.sampling import generate, sample_section

    cfg, ds, model = loaded
    check_image_dataset(ds, where)
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise DiffusionLabError(f"--num must be an integer >= 2 for --metric fid, got {num!r}")
    t0 = time.time()
    ref01 = ds.to_display(ds.data.cpu())
    ref_feats, ref_stats, ref_info = reference_features(ref01, dict(cfg["data"]), extractor, cache_dir, batch_size,
                                                        progress, log)
    scfg = sample_section(cfg, sampler, steps)
    t1 = time.time()
    x = generate(model, scfg, num=num, seed=seed, device=next(model.parameters()).device, shape=ds.sample_shape,
                 progress=progress)
    sampling_seconds = time.time() - t1
    fake = extract_features(extractor, ds.to_display(x), batch_size, progress)
    out = {"metric": "fid", "model": where, "num": num, "seed": seed, "sampler": scfg["sampler"],
           "steps": scfg.get("steps")}
    out.update(image_scores(fake, ref_feats, ref_stats, seed=seed))
    describe = getattr(extractor, "describe", None)
    out["extractor"] = describe() if callable(describe) else {"identity": extractor.identity}
    out["reference"] = dict(ref_info, data=dict(cfg["data"]))
    out["note"] = ("FID and KID from N samples depend on N (FID is biased upward at small N): compare models at "
                   "the same N and reference; published figures use N = 50000 and the standard Inception weights")
    if not out["extractor"].get("standard_weights", False):
        out["note"] += "; these features are NOT from the standard Inception weights: do not compare with papers"
    out["sampling_seconds"] = round(sampling_seconds, 2)
    out["seconds"] = round(time.time() - t0, 2)
    return out
