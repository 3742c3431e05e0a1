"""Importing the optional libraries the interop modules wrap (diffusers, torch-fidelity), and one known clash.

**torchvision on a CPU-only torch.** diffusers (through ``diffusers.models.transformers``) and torch-fidelity
(through its package ``__init__``) import torchvision wherever it is installed, though nothing used here calls a
torchvision op. PyPI's torchvision wheel is built against CUDA torch; next to the CPU build of torch (this
project's ``constraints.txt``) its compiled ops library does not load (``libtorch_cuda.so`` missing), and
torchvision 0.28 then fails at import in ``_meta_registrations.py``:
``RuntimeError: operator torchvision::nms does not exist``. :func:`prepare_torchvision` checks for exactly that
case and declares the two op schemas (``nms``, ``qnms``) that torchvision registers fake kernels for
unconditionally, so that its pure-Python parts import; calling a torchvision op would still fail, loudly. Where
torchvision's ops load (a CUDA torch, or torchvision built for the CPU) or torchvision is absent, nothing is
changed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from diffusionlab.errors import DiffusionLabError

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBS: list = []  # keep the torch.library.Library objects alive


def torchvision_ops_missing() -> bool:
    """True where torchvision is installed but its compiled ops cannot be loaded by this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    pkg = list(spec.submodule_search_locations)[0]
    lib = next((os.path.join(pkg, f) for f in os.listdir(pkg) if f.startswith("_C") and f.endswith(".so")), None)
    if lib is None:
        return True
    try:
        torch.ops.load_library(lib)
    except (OSError, RuntimeError):
        return True
    return False


def _declare_torchvision_schemas() -> None:
    import torch

    if "torchvision" in sys.modules or _LIBS:  # imported already, or declared by an earlier call
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        lib.define(schema)
    _LIBS.append(lib)


def prepare_torchvision() -> None:
    """Make ``import torchvision`` succeed next to a CPU torch when only its compiled ops are missing (module
    docstring). Idempotent; a no-op once torchvision is imported."""
    if "torchvision" not in sys.modules and torchvision_ops_missing():
        _declare_torchvision_schemas()


def import_optional(module: str, extra: str, what: str):
    """``importlib.import_module(module)`` after :func:`prepare_torchvision`; a missing or broken install is a
    :class:`DiffusionLabError` naming the extra that installs it (``what``: what needed it)."""
    try:
        prepare_torchvision()
        return importlib.import_module(module)
    except ImportError as e:
        raise DiffusionLabError(
            f"{what} needs the optional package {module.split('.')[0]!r} ({e}); install it with "
            f"pip install 'diffusionlab[{extra}]'"
        ) from None
    except RuntimeError as e:  # e.g. a torchvision whose ops clash with this torch in another way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffusionLabError(f"{what}: importing {module!r} failed: {first}") from None
