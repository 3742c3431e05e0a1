"""Schedules: linear (Ho et al. 2020), cosine (Nichol & Dhariwal 2021), geometric (Song & Ermon 2019), validation.

Every closed form is compared with the paper's formula written out again here in plain Python floats.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionlab.errors import DiffusionLabError
from diffusionlab.schedules import (
    as_betas,
    as_sigmas,
    cosine_alpha_bar,
    cosine_betas,
    geometric_sigmas,
    linear_betas,
    make_betas,
    shift_snr,
)


# ---------------------------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------------------------
def test_linear_endpoints_spacing_and_dtype():
    b = linear_betas(1000, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-15)
    assert b[-1].item() == pytest.approx(0.02, rel=1e-15)
    # evenly spaced: every step is (0.02 - 1e-4) / 999 (float64 rounding of linspace only)
    step = (0.02 - 1e-4) / 999
    assert torch.allclose(b.diff(), torch.full((999,), step, dtype=torch.float64), rtol=0, atol=1e-15)


def test_linear_defaults_are_ddpm():
    b = linear_betas()
    expected = torch.tensor([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)], dtype=torch.float64)
    assert torch.allclose(b, expected, rtol=0, atol=1e-15)


def test_linear_single_step():
    b = linear_betas(1, 0.3, 0.5)
    assert b.tolist() == [0.3]


# ---------------------------------------------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------------------------------------------
def _nichol_dhariwal_alpha_bar(t: int, T: int, s: float = 0.008) -> float:
    """Improved DDPM eq. (17), written independently: abar_t = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    return f(t) / f(0)


@pytest.mark.parametrize("T", [10, 50, 1000])
def test_cosine_matches_nichol_dhariwal(T):
    b = cosine_betas(T)
    expected = []
    for t in range(1, T + 1):
        beta = 1 - _nichol_dhariwal_alpha_bar(t, T) / _nichol_dhariwal_alpha_bar(t - 1, T)
        expected.append(min(beta, 0.999))
    # float64 round-off only: both are a handful of cosines and a ratio
    assert torch.allclose(b, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    # the product of (1 - beta) reproduces abar_t wherever no clipping happened
    ab = torch.cumprod(1 - b, 0)
    unclipped = b < 0.999
    ref = torch.tensor([_nichol_dhariwal_alpha_bar(t, T) for t in range(1, T + 1)], dtype=torch.float64)
    # the first clipped step is the last (abar_T = 0 exactly at t = T); compare the steps before it
    k = int(unclipped.long().cumprod(0).sum())
    assert k >= T - 1
    assert torch.allclose(ab[:k], ref[:k], rtol=1e-10, atol=1e-15)


def test_cosine_clipping():
    # abar_T = f(T)/f(0) = cos^2(pi/2)/f(0) ~ 0, so beta_T = 1 - ~0 would be 1: clipped at 0.999
    b = cosine_betas(1000)
    assert b[-1].item() == 0.999
    assert b.max().item() == 0.999
    # without the clip the last beta would reach 1 (to rounding), so the clip really acts
    raw_last = 1 - _nichol_dhariwal_alpha_bar(1000, 1000) / _nichol_dhariwal_alpha_bar(999, 1000)
    assert raw_last > 0.999
    # a smaller clip is honoured too, and only where the raw beta exceeds it
    b2 = cosine_betas(100, max_beta=0.2)
    raw = torch.tensor(
        [1 - _nichol_dhariwal_alpha_bar(t, 100) / _nichol_dhariwal_alpha_bar(t - 1, 100) for t in range(1, 101)],
        dtype=torch.float64,
    )
    assert torch.allclose(b2, raw.clamp(max=0.2), rtol=1e-12, atol=1e-14)
    assert (raw > 0.2).sum() >= 2  # the clip binds at more than one step


def test_cosine_alpha_bar_function():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    ab = cosine_alpha_bar(t)
    ref = [_nichol_dhariwal_alpha_bar(u * 4, 4) for u in t.tolist()]
    assert torch.allclose(ab, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=1e-15)
    assert ab[0].item() == pytest.approx(1.0, abs=1e-15)
    assert abs(ab[-1].item()) < 1e-30


@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
def test_shifted_cosine_matches_the_closed_form(shift):
    # Hoogeboom et al. 2023: SNR'_t = SNR_t / shift^2, i.e. abar' = abar / (abar + shift^2 (1 - abar)), written out
    # in plain floats from Nichol & Dhariwal's abar; the steps before the cosine clip (k of them) are exact there
    T = 1000
    b = shift_snr(cosine_betas(T), shift)
    ab = torch.cumprod(1 - b, 0)
    k2 = shift * shift
    ref = []
    for t in range(1, T):
        a = _nichol_dhariwal_alpha_bar(t, T)
        ref.append(a / (a + k2 * (1 - a)))
    # float64 round-off of a product of up to 1000 factors (as in the cosine test above)
    assert torch.allclose(ab[:T - 1], torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-15)
    assert ((b > 0) & (b < 1)).all()
    plain = torch.cumprod(1 - cosine_betas(T), 0)
    # shift > 1 noises more at every step, shift < 1 less
    assert ((ab < plain) if shift > 1 else (ab > plain)).all()


def test_shift_one_is_the_schedule_and_bad_shifts_are_refused():
    b = cosine_betas(100)
    assert torch.equal(shift_snr(b, 1.0), b)  # returned as validated, no arithmetic
    for bad in (0, -1.0, float("inf"), float("nan"), "x", None):
        with pytest.raises(DiffusionLabError, match="snr_shift"):
            shift_snr(b, bad)


# ---------------------------------------------------------------------------------------------------------------
# geometric
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,lo,hi", [(10, 0.01, 1.0), (232, 0.01, 50.0), (2, 0.5, 3.0)])
def test_geometric_ratios_constant(L, lo, hi):
    s = geometric_sigmas(L, lo, hi)
    assert s.dtype == torch.float64 and s.shape == (L,)
    assert s[0].item() == pytest.approx(lo, rel=1e-13)
    assert s[-1].item() == pytest.approx(hi, rel=1e-13)
    ratios = s[1:] / s[:-1]
    q = (hi / lo) ** (1 / (L - 1))
    assert torch.allclose(ratios, torch.full_like(ratios, q), rtol=1e-12)
    assert (ratios > 1).all()  # increasing, as seed 004 orders them


def test_geometric_single_level():
    assert geometric_sigmas(1, 0.2, 5.0).tolist() == [0.2]


# ---------------------------------------------------------------------------------------------------------------
# validation: every error is a DiffusionLabError naming the bad value
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values,pattern",
    [
        ([0.1, 0.0, 0.2], r"beta_2 \(index 1\) = 0\b"),
        ([0.1, 0.2, 1.0], r"beta_3 \(index 2\) = 1\b"),
        ([1.5], r"beta_1 \(index 0\) = 1\.5"),
        ([0.1, -0.01], r"= -0\.01"),
        ([0.1, float("nan")], r"betas\[1\] = nan"),
        ([float("inf")], r"betas\[0\] = inf"),
        ([], r"non-empty.*\(0,\)"),
        ([[0.1, 0.2]], r"1-D.*\(1, 2\)"),
        ("abc", r"betas"),
    ],
)
def test_as_betas_rejects(values, pattern):
    with pytest.raises(DiffusionLabError, match=pattern):
        as_betas(values)


@pytest.mark.parametrize(
    "values,pattern",
    [
        ([0.1, 0.5, 0.3], r"sigma_3 = 0\.3 is not above sigma_2 = 0\.5"),
        ([0.1, 0.1], r"sigma_2 = 0\.1 is not above sigma_1 = 0\.1"),
        ([-0.1, 0.5], r"sigma_1 \(index 0\) = -0\.1"),
        ([0.0, 0.5], r"sigma_1 \(index 0\) = 0\b"),
        ([0.1, float("nan")], r"sigmas\[1\] = nan"),
        ([], r"non-empty"),
    ],
)
def test_as_sigmas_rejects(values, pattern):
    with pytest.raises(DiffusionLabError, match=pattern):
        as_sigmas(values)


def test_schedule_constructors_reject_bad_parameters():
    with pytest.raises(DiffusionLabError, match=r"beta_1 \(index 0\) = 0\b"):
        linear_betas(10, 0.0, 0.02)
    with pytest.raises(DiffusionLabError, match=r"= 1\b"):
        linear_betas(10, 1e-4, 1.0)
    with pytest.raises(DiffusionLabError, match=r"T must be an integer >= 1, got 0"):
        linear_betas(0)
    with pytest.raises(DiffusionLabError, match=r"got 2\.5"):
        cosine_betas(2.5)
    with pytest.raises(DiffusionLabError, match=r"max_beta.*got 1\.0"):
        cosine_betas(10, max_beta=1.0)
    with pytest.raises(DiffusionLabError, match=r"sigma_min must be positive, got -1"):
        geometric_sigmas(10, -1, 1.0)
    with pytest.raises(DiffusionLabError, match=r"sigma_max must exceed sigma_min = 1\.0, got 0\.5"):
        geometric_sigmas(10, 1.0, 0.5)
    with pytest.raises(DiffusionLabError, match=r"unknown beta schedule 'quadratic'; allowed: linear, cosine"):
        make_betas("quadratic", 10)
    with pytest.raises(DiffusionLabError, match=r"got True"):
        linear_betas(True)


def test_make_betas_dispatch():
    assert torch.equal(make_betas("linear", 20), linear_betas(20))
    assert torch.equal(make_betas("cosine", 20, s=0.01), cosine_betas(20, s=0.01))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=0.999, allow_nan=False), min_size=1, max_size=20))
def test_valid_user_betas_pass_through_unchanged(values):
    b = as_betas(values)
    assert b.dtype == torch.float64
    assert b.tolist() == values  # float64 holds every Python float exactly


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=15, unique=True))
def test_sorted_unique_sigmas_pass_and_reversed_fail(values):
    inc = sorted(values)
    assert as_sigmas(inc).tolist() == inc
    if len(inc) > 1:
        with pytest.raises(DiffusionLabError, match="strictly increasing"):
            as_sigmas(inc[::-1])


def test_the_vp_chain_takes_the_shift():
    from diffusionlab.processes import make_process

    plain = make_process("vp", schedule="cosine")
    shifted = make_process("vp", schedule="cosine", snr_shift=2.0)
    t = torch.tensor([1, 250, 500, 999])
    (s0, g0), (s1, g1) = plain.coeffs(t), shifted.coeffs(t)
    # SNR / 4 at every step: a ratio of cumulative products, a few hundred ulps
    assert torch.allclose((s0 / g0) ** 2 / (s1 / g1) ** 2, torch.full((4,), 4.0, dtype=torch.float64), rtol=1e-10)
    with pytest.raises(DiffusionLabError, match=r"snr_shift must lie in \(0, inf\], got -2"):
        make_process("vp", schedule="cosine", snr_shift=-2)
    # on a zero-terminal-SNR chain the shift applies to the rescaled SNR, and x_T stays pure noise
    zero = make_process("vp", schedule="cosine", zero_terminal_snr=True)
    zero_shifted = make_process("vp", schedule="cosine", zero_terminal_snr=True, snr_shift=2.0)
    (s0, g0), (s1, g1) = zero.coeffs(t), zero_shifted.coeffs(t)
    assert torch.allclose((s0 / g0) ** 2 / (s1 / g1) ** 2, torch.full((4,), 4.0, dtype=torch.float64), rtol=1e-10)
    assert zero_shifted.zero_terminal_snr and float(zero_shifted.coeffs(torch.tensor(zero.T))[0]) == 0.0
