"""Tolerances for two computations of one quantity that round differently.

``torch.equal`` is kept only where the very same operations run on the same inputs (the same function twice, a
copy, a zero layer). Two different code paths -- a mean against a sum divided by ``n``, another SIMD width or
blocking of a reduction (another CPU: torch picks AVX-512, AVX2 or scalar kernels at run time), a fused kernel --
agree only up to rounding, and the bounds below say how far.
"""

import torch


def unit_roundoff(dtype) -> float:
    """``u = eps / 2``: the largest relative error of one correctly rounded operation in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def sum_rtol(n: int, dtype) -> float:
    """Relative tolerance between two floating-point sums (or means) of the same ``n`` non-negative terms, added
    in any two orders: each is within ``gamma_{n-1} ~ (n - 1) u`` of the exact sum (Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2nd ed. 2002, eq. 4.4), so the two are within ``2 (n - 1) u``; a final
    division by ``n`` against a multiplication by a rounded ``1 / n`` adds ``3 u``. Hence ``(2 n + 2) u``, a
    first-order bound (the ``O(n^2 u^2)`` term is far below one ``u`` for the sizes of the tests)."""
    return (2 * n + 2) * unit_roundoff(dtype)
