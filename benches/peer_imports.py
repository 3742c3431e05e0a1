"""Import the training peers (benchmarks only): Hugging Face diffusers and lucidrains' denoising-diffusion-pytorch.

Both come with the optional ``bench`` extra (``pip install -c constraints.txt -e ".[bench]"``); the library never
imports them.

**torchvision on a CPU-only torch.** ``denoising-diffusion-pytorch`` and diffusers import torchvision (for image
transforms and ``save_image``, nothing we call); next to this project's CPU torch, PyPI's CUDA torchvision fails at
import. The package's :func:`diffusionlab.interop.optional.prepare_torchvision` (its docstring says how) makes the
pure-Python parts import; it is called before each peer import. Where torchvision's ops load, nothing is changed.
"""

from __future__ import annotations

import importlib
import sys


def _prepare_torchvision() -> None:
    from diffusionlab.interop.optional import prepare_torchvision

    prepare_torchvision()


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
