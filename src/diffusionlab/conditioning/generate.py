"""Drawing many conditional samples in bounded memory: class labels, guidance and known values, in chunks.

:func:`labels_for` spreads a list of classes over ``num`` samples in contiguous blocks (so a grid of
``num / len(classes)`` columns has one row per class); :func:`generate_conditional` draws the samples, either with a
sampler of the catalogue on the class-conditioned (guided) model, or with a conditional method of
:data:`~diffusionlab.conditioning.methods.CONDITIONAL_METHODS` given known values; :func:`load_known` reads the CLI's
``--known`` / ``--mask`` files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusionlab.conditioning.guidance import check_guidance, class_labels, condition_on_class, evaluation_note
from diffusionlab.conditioning.methods import get_method
from diffusionlab.errors import DiffusionLabError
from diffusionlab.utils import as_mask


def parse_classes(text) -> list[int]:
    """``"3"`` or ``"0,1,2"`` (or a list / an int) -> a list of ints."""
    if isinstance(text, bool):
        raise DiffusionLabError(f"--class takes integers, got {text!r}")
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [v.strip() for v in str(text).split(",") if v.strip()]
    out = []
    for v in items:
        try:
            if isinstance(v, bool) or float(v) != int(v):
                raise ValueError
            out.append(int(v))
        except (TypeError, ValueError):
            raise DiffusionLabError(f"classes are integers separated by commas, got {text!r}") from None
    if not out:
        raise DiffusionLabError("no class given")
    return out


def labels_for(classes, num: int, num_classes: int | None) -> torch.Tensor:
    """``num`` labels, the classes in contiguous blocks (``labels[i] = classes[i * len(classes) // num]``),
    checked against the model's ``num_classes``."""
    lab = class_labels(classes, num_classes)
    idx = torch.arange(num) * lab.numel() // num
    return lab[idx]


def parse_interval(text):
    """``"lo,hi"`` (``hi`` may be ``inf``) -> ``(lo, hi)``; None stays None."""
    if text is None or isinstance(text, (list, tuple)):
        return None if text is None else tuple(text)
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise DiffusionLabError(f"a guidance interval is lo,hi (EDM noise levels sigma / s), got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise DiffusionLabError(f"a guidance interval is two numbers lo,hi, got {text!r}") from None


def _read_array(path, key: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise DiffusionLabError(f"{what} file not found: {p}")
    try:
        obj = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DiffusionLabError(f"{what} {p} is not a readable .npy/.npz array: {e}") from None
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        with obj:
            if key not in obj.files:
                raise DiffusionLabError(f"{what} {p} has no array {key!r}; it holds: {', '.join(obj.files) or 'none'}")
            arr = obj[key]
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise DiffusionLabError(f"{what} {p} must hold finite numbers")
    return arr


def load_known(known_path, mask_path, sample_shape, to_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Known values (``.npz`` key ``x`` or ``.npy``, ``(N, *sample_shape)``, display space) mapped to model space
    by ``to_model`` and a mask (``.npz`` key ``mask`` or ``.npy``; 1 = known, broadcastable to the known values):
    ``(known float32, mask bool)`` with the mask broadcast to ``(N, *sample_shape)``."""
    x = _read_array(known_path, "x", "--known")
    shape = tuple(sample_shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.shape[0] < 1:
        raise DiffusionLabError(f"--known {known_path} has shape {tuple(x.shape)}; the samples need (N, "
                                f"{', '.join(map(str, shape))})")
    m = torch.as_tensor(_read_array(mask_path, "mask", "--mask"))
    mask = as_mask(m, x.shape)
    if not bool(mask.any()):
        raise DiffusionLabError(f"--mask {mask_path} marks nothing as known (1 = known)")
    y = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if to_model is not None:
        y = to_model(y)
    return torch.where(mask, y, torch.zeros_like(y)), mask


def generate_conditional(model, shape, num: int, seed: int, device, sampler=None, sampler_options=None, grid=None,
                         kind=None, classes=None, guidance=None, interval=None, known=None, mask=None, method=None,
                         method_options=None, chunk: int = 1000, progress: bool = False):
    """Draw ``num`` samples (model space, on the CPU) in chunks of at most ``chunk`` rows; returns
    ``(samples, info)``.

    - ``classes`` (a list of ints, spread by :func:`labels_for`), ``guidance`` ``w`` and ``interval``: the model is
      wrapped by :func:`~diffusionlab.conditioning.guidance.condition_on_class` (the no-label index, i.e. the
      unconditional model, when ``classes`` is None but ``guidance`` is 0 -- anything else needs classes).
    - ``known`` ``(num, *shape)`` and ``mask`` (model space): the conditional ``method`` (a name or a spec of
      :data:`~diffusionlab.conditioning.methods.CONDITIONAL_METHODS`, ``method_options`` its options) fills in the
      unknown part; ``grid`` / ``kind`` are the method's (default: its own). Without ``known``, ``sampler`` (a
      :class:`~diffusionlab.samplers.catalogue.SamplerSpec`) with ``sampler_options`` on ``grid``.

    One generator on ``device`` seeded by ``seed`` supplies every draw. ``info`` holds the network calls counted by
    the model (``network_calls``; a doubled guidance batch is one call), the evaluations per sample path of the
    sampler or method (``nfe_per_sample``), and the calls by kind for guidance."""
    from diffusionlab.samplers import sample_in_chunks

    if (known is None) != (method is None):
        raise DiffusionLabError("known values and a conditional method go together (--known, --mask and --method)")
    guidance = check_guidance(guidance)
    if classes is None and guidance not in (None, 0.0):
        raise DiffusionLabError("guidance needs classes to guide towards (--class K[,K2,...])")
    spec = None
    opts = dict(method_options or {})
    if method is not None:
        spec = get_method(method) if isinstance(method, str) else method
        spec.validate(opts)
        spec.check_process(model.process)
        if known.shape[0] != num:
            raise DiffusionLabError(f"{known.shape[0]} known rows for {num} samples: give one known row per sample")
    labels = None if classes is None else labels_for(classes, num, model.num_classes)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    start_nfe = model.nfe
    out, calls = [], {}
    g = (spec or sampler).grid(model.process, grid, kind)
    model.eval()
    with torch.no_grad():
        for a in range(0, num, chunk):
            n = min(chunk, num - a)
            m = model
            if labels is not None:
                m = condition_on_class(model, labels[a:a + n], guidance, interval)
            if spec is not None:
                x = spec.run(m, known[a:a + n].to(device), mask[a:a + n].to(device), g, noise=gen, progress=progress,
                             **opts)
            else:
                x = sample_in_chunks(sampler, m, shape, n, chunk=n, generator=gen, device=device, grid=g,
                                     progress=progress, **dict(sampler_options or {}))
            out.append(x.cpu())
            for k, v in evaluation_note(m).get("evaluations_by_kind", {}).items():
                calls[k] = calls.get(k, 0) + v
    info = {"network_calls": model.nfe - start_nfe, "steps": g.steps, "grid": g.kind,
            "nfe_per_sample": (spec or sampler).count(g, opts if spec is not None else dict(sampler_options or {}))}
    if spec is not None:
        info.update({"method": spec.name, "method_options": spec.resolve(opts)})
    if labels is not None:
        info.update({"classes": list(parse_classes(classes)), "guidance": 1.0 if guidance is None else float(guidance),
                     "guidance_interval": None if interval is None else list(interval)})
        if calls:
            info["evaluations_by_kind"] = calls
        if calls.get("doubled"):
            info["nfe_note"] = ("classifier-free guidance: each doubled evaluation is one network call on a doubled "
                                "batch (conditional and unconditional rows together), counted as one NFE")
    return torch.cat(out, 0), info


__all__ = ["parse_classes", "labels_for", "parse_interval", "load_known", "generate_conditional"]
