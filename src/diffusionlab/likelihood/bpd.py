"""Bits per dimension for quantized (8-bit, or any ``L``-level) data with uniform dequantization, in model
space ``[-1, 1]``.

Conventions (stated, not left implicit). A pixel value ``k in {0, ..., 255}`` is stored in model space as
``x = 2 k / 255 - 1`` (the usual ``k / 255`` in ``[0, 1]``, then ``2 y - 1``). Uniform dequantization, as in
score_sde's likelihood evaluation (``(255 y + u) / 256``, Song et al. 2021) and Theis et al. 2016 / Ho et al. 2020:

    y = (k + u) / 256 in [0, 1),   u ~ U[0, 1)^D,        x_deq = 2 y - 1 = (2 k + 2 u) / 256 - 1 in [-1, 1)

so the cell of ``k`` in model space is ``[2k/256 - 1, (2k + 2)/256 - 1)``, of side ``2 / 256`` per dimension.
For a continuous density ``p_x`` on model space, the discrete model ``P(k) = int_cell p_x`` satisfies

    P(k) = (2/256)^D E_u[p_x(x_deq)] >= (2/256)^D exp(E_u[log p_x(x_deq)])          (Jensen)

hence ``-log2 P(k) <= E_u[-log p_x(x_deq)] / ln 2 + D log2(256 / 2)`` and, per dimension,

    bpd = nll_model_space / (D ln 2) + log2(128) = nll_model_space / (D ln 2) + 7

``7 = 8 - 1``: 8 bits for the 256 levels, minus 1 bit because model space is twice as wide as ``[0, 1]``. This
is score_sde's ``+ 7`` (written there without the derivation); a model evaluated on ``[0, 1]`` data would add 8,
one on ``[0, 255]`` would add 0. The dequantized bound is an upper bound on the discrete model's bpd.

**Any number of levels ``L``** (every helper takes ``levels``, default 256). Data ``k / (L - 1)`` in ``[0, 1]``,
``k in {0, ..., L - 1}``, is ``x = 2 k / (L - 1) - 1`` in model space; it is dequantized to
``x_deq = 2 (k + u) / L - 1``, cells of side ``2 / L``, and

    bpd = nll_model_space / (D ln 2) + log2(L / 2)

(``7`` for ``L = 256``; ``log2(8.5) = 3.087`` for the 17 grey levels of the 8x8 digits). A density uniform on
``[-1, 1]^D`` (``nll = D ln 2``) gives each cell probability ``L^-D``: exactly ``log2 L`` bits per dimension.

This ``"cells"`` convention (the ``L`` cells partition ``[-1, 1]``) is the one every evaluation of the package
uses. The other common one, ``"centred"``, centres a cell of side ``2 / (L - 1)`` on each level,
``x_deq = x + u``, ``u ~ U(-1/(L-1), 1/(L-1))``, and adds ``log2((L - 1) / 2)`` (``3.000`` for 17 levels, ``6.989``
for 8 bits); both are upper bounds on the same discrete bpd but differ in the offset and in where the density is
probed, so compare figures only within one convention (``convention=`` selects it).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError

LEVELS = 256
#: ``log2(LEVELS / 2)``: bits per dimension added to ``nll / (D ln 2)`` for model space ``[-1, 1]``
MODEL_SPACE_OFFSET_BITS = math.log2(LEVELS / 2)
#: dequantization conventions (module docstring); the first is the package's
CONVENTIONS = ("cells", "centred")


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise DiffusionLabError(f"unknown dequantization convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    return convention


def check_levels(levels) -> int:
    """``levels`` if it is an integer >= 2, else :class:`DiffusionLabError`."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise DiffusionLabError(f"the number of quantization levels must be an integer >= 2, got {levels!r}")
    return levels


def offset_bits(levels: int = LEVELS, convention: str = "cells") -> float:
    """``log2(L / 2)``: bits per dimension that turn the model-space NLL of ``L``-level data, dequantized
    into cells of side ``2 / L``, into a bound on the discrete bpd (``7`` for ``L = 256``); ``log2((L - 1) / 2)``
    for the ``"centred"`` cells of side ``2 / (L - 1)``."""
    cells = check_levels(levels) if check_convention(convention) == "cells" else levels - 1
    return math.log2(cells / 2)


def nats_to_bpd(nll_nats, dim: int):
    """``nll / (D ln 2)``: nats per sample to bits per dimension, no offset."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise DiffusionLabError(f"dimension D must be an integer >= 1, got {dim!r}")
    return nll_nats / (dim * math.log(2.0))


def bpd_from_model_space_nll(nll_nats, dim: int, levels: int = LEVELS, convention: str = "cells"):
    """Bits per dimension of ``L``-level data from the continuous NLL (nats per sample) of uniformly dequantized
    points in model space ``[-1, 1]``: ``nll / (D ln 2) + log2(L / 2)`` (``+ 7`` for 8-bit data; module
    docstring), or the ``"centred"`` convention's offset."""
    return nats_to_bpd(nll_nats, dim) + offset_bits(levels, convention)


def _levels_name(levels: int) -> str:
    return "8-bit" if levels == 256 else f"{levels}-level"


def to_levels(x_model: torch.Tensor, atol: float = 1e-3, levels: int = LEVELS) -> torch.Tensor:
    """The levels ``k = (L - 1) (x + 1) / 2`` (int64) of model-space data ``x = 2 k / (L - 1) - 1``; refuses
    values off that grid by more than ``atol`` levels."""
    check_levels(levels)
    k_float = (x_model.to(torch.float64) + 1.0) * ((levels - 1) / 2.0)
    k = torch.round(k_float)
    off = (k_float - k).abs()
    bad = (k < 0) | (k > levels - 1) | (off > atol)
    if bool(bad.any()):
        v = x_model.reshape(-1)[int(torch.nonzero(bad.reshape(-1))[0])].item()
        raise DiffusionLabError(
            f"dequantize expects {_levels_name(levels)} data in model space, x = 2k/{levels - 1} - 1 with k in "
            f"0..{levels - 1}; got the value {v!r}"
        )
    return k.long()


def on_grid(x_model: torch.Tensor, levels: int = LEVELS, atol: float = 1e-3) -> bool:
    """Whether every entry of ``x_model`` is ``2 k / (L - 1) - 1`` for an integer ``k in 0..L-1`` (within
    ``atol`` levels)."""
    try:
        to_levels(x_model, atol, levels)
    except DiffusionLabError:
        return False
    return True


def dequantize(x_model: torch.Tensor, generator: torch.Generator | None = None, levels: int = LEVELS,
               convention: str = "cells") -> torch.Tensor:
    """Uniform dequantization of model-space ``L``-level data: ``x = 2k/(L-1) - 1  ->  2 (k + u) / L - 1``,
    ``u ~ U[0, 1)`` per entry (drawn from ``generator`` on its device), in ``x_model``'s dtype and device; the
    ``"centred"`` convention gives ``x + (2 u - 1) / (L - 1)`` instead (module docstring)."""
    k = to_levels(x_model, levels=levels)
    check_convention(convention)
    dev = generator.device if generator is not None else x_model.device
    u = torch.rand(x_model.shape, generator=generator, device=dev, dtype=torch.float64).to(x_model.device)
    if convention == "centred":
        x = 2.0 * (k.to(torch.float64) + u - 0.5) / (levels - 1) - 1.0
    else:
        x = 2.0 * (k.to(torch.float64) + u) / levels - 1.0
    return x.to(x_model.dtype)
