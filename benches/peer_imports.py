"""Import the training peers (benchmarks only): Hugging Face diffusers and lucidrains' denoising-diffusion-pytorch.

Both come with the optional ``bench`` extra (``pip install -c constraints.txt -e ".[bench]"``); the library never
imports them.

**torchvision on a CPU-only torch.** ``denoising-diffusion-pytorch`` imports torchvision (for its image
transforms and ``save_image``, nothing we call). PyPI's torchvision wheel is built against CUDA torch; next to the
CPU build of torch (this project's ``constraints.txt``) its compiled ops library does not load
(``libtorch_cuda.so`` missing), and torchvision 0.28 then fails at import in ``_meta_registrations.py``:
``RuntimeError: operator torchvision::nms does not exist``. :func:`import_ddpm_pytorch` checks for exactly that
case and declares the two op schemas (``nms``, ``qnms``) that torchvision registers fake kernels for
unconditionally, so the pure-Python parts import; no torchvision op is ever run by these benchmarks. Where
torchvision's ops load (a CUDA torch, or torchvision built for the CPU), nothing is changed.
"""

from __future__ import annotations

import importlib
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBS: list = []  # keep the torch.library.Library objects alive


def _torchvision_ops_missing() -> bool:
    """True where torchvision is installed but its compiled ops cannot be loaded by this torch."""
    import importlib.util
    import os

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


def _prepare_torchvision() -> None:
    if _torchvision_ops_missing():
        _declare_torchvision_schemas()


def import_diffusers():
    """The ``diffusers`` module, or None with the reason printed (diffusers imports torchvision where it is
    installed, e.g. from ``diffusers.training_utils``: the same preparation as :func:`import_ddpm_pytorch`)."""
    try:
        _prepare_torchvision()
        return importlib.import_module("diffusers")
    except Exception as e:  # noqa: BLE001 - report exactly why the peer cannot run
        print(f"peers: diffusers is not available ({type(e).__name__}: {e}); pip install -c constraints.txt -e '.[bench]'",
              file=sys.stderr)
        return None


def import_ddpm_pytorch():
    """The ``denoising_diffusion_pytorch`` module, or None with the reason printed (module docstring)."""
    try:
        _prepare_torchvision()
        return importlib.import_module("denoising_diffusion_pytorch")
    except Exception as e:  # noqa: BLE001
        print(f"peers: denoising-diffusion-pytorch is not available ({type(e).__name__}: {e}); "
              "pip install -c constraints.txt -e '.[bench]'", file=sys.stderr)
        return None
