"""Noise covariances over one axis: every operation against dense linear algebra on the expanded matrix.

For a sample of shape ``S = (s_1, ..., s_k)`` with the covariance on position ``j`` the full covariance of the
flattened (row-major) sample is ``kron(I_{s_1..s_{j-1}}, kron(C, I_{s_{j+1}..s_k}))``; the references below
are built with ``torch.kron`` and ``torch.linalg`` only, never with the module's own helpers.
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise.covariance import Dense, Identity, Mixed, Progressive, make_covariance, toeplitz

F64 = torch.float64
F = 5


def _spd(f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(f, f, generator=g, dtype=F64)
    return a @ a.T / f + 0.3 * torch.eye(f, dtype=F64)


def _toeplitz_ref(coeffs, f):
    return torch.tensor([[coeffs[abs(i - j)] if abs(i - j) < len(coeffs) else 0.0 for j in range(f)] for i in range(f)],
                        dtype=F64)


def _mixed_ref(alpha, f):
    r = alpha**2 / (1 + alpha**2)
    return torch.tensor([[1.0 if i == j else r for j in range(f)] for i in range(f)], dtype=F64)


def _progressive_ref(alpha, f):
    rho = alpha / math.sqrt(1 + alpha**2)
    return torch.tensor([[rho ** abs(i - j) for j in range(f)] for i in range(f)], dtype=F64)


# name -> (factory(F, axis), the dense F x F matrix written independently)
CASES = {
    "identity": (lambda f, axis: Identity(axis), lambda f: torch.eye(f, dtype=F64)),
    "mixed": (lambda f, axis: Mixed(0.8, f, axis), lambda f: _mixed_ref(0.8, f)),
    "progressive": (lambda f, axis: Progressive(1.5, f, axis), lambda f: _progressive_ref(1.5, f)),
    "toeplitz": (lambda f, axis: toeplitz([1.0, 0.5, 0.25], f, axis), lambda f: _toeplitz_ref([1.0, 0.5, 0.25], f)),
    "dense": (lambda f, axis: Dense(_spd(f, 7), axis), lambda f: _spd(f, 7)),
    "spec-iid": (lambda f, axis: make_covariance("iid", f, axis), lambda f: torch.eye(f, dtype=F64)),
    "spec-mixed": (lambda f, axis: make_covariance("mixed:0.5", f, axis), lambda f: _mixed_ref(0.5, f)),
    "spec-progressive": (
        lambda f, axis: make_covariance("progressive:1.5", f, axis),
        lambda f: _progressive_ref(1.5, f),
    ),
    "spec-toeplitz": (
        lambda f, axis: make_covariance("toeplitz:1,0.5,0.25", f, axis),
        lambda f: _toeplitz_ref([1.0, 0.5, 0.25], f),
    ),
}

# (full tensor shape with the F axis marked by None, axis argument)
LAYOUTS = [
    ((4, None), 1),
    ((4, None), -1),
    ((3, None, 2), 1),
    ((3, 2, None), -1),
    ((3, 2, None), 2),
    ((2, 2, None, 2, 3), 2),
    ((2, 2, None, 2, 3), -3),
    ((2, 2, 1, 3, None), -1),
]


def _shape(layout):
    return tuple(F if s is None else s for s in layout)


def _full(C: torch.Tensor, shape, axis) -> torch.Tensor:
    """``C (x) I`` for one sample of ``shape`` (batch axis included), by Kronecker products."""
    sample = shape[1:]
    j = (axis % len(shape)) - 1
    before = int(np.prod(sample[:j])) if j else 1
    after = int(np.prod(sample[j + 1:])) if j + 1 < len(sample) else 1
    # .contiguous(): torch.kron fails on some transposed (non-contiguous) inputs
    return torch.kron(torch.eye(before, dtype=F64), torch.kron(C.contiguous(), torch.eye(after, dtype=F64)))


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# the dense matrix
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_matrix_equals_reference(name):
    make, ref = CASES[name]
    assert torch.allclose(make(F, 1).matrix(F), ref(F), rtol=0, atol=1e-15)


def test_mixed_correlation_formula():
    for alpha in (0.0, 0.3, 1.0, 2.5):
        m = Mixed(alpha, 6).matrix()
        off = m[~torch.eye(6, dtype=torch.bool)]
        assert torch.allclose(off, torch.full_like(off, alpha**2 / (1 + alpha**2)), rtol=0, atol=1e-15)
        assert torch.allclose(m.diagonal(), torch.ones(6, dtype=F64))


def test_progressive_correlation_formula():
    for alpha in (0.0, 0.3, 1.0, 2.5):
        rho = alpha / math.sqrt(1 + alpha**2)
        m = Progressive(alpha, 6).matrix()
        for i in range(6):
            for j in range(6):
                assert m[i, j].item() == pytest.approx(rho ** abs(i - j), rel=1e-14, abs=1e-300)


def test_progressive_is_ge_et_al_recursion():
    # eps_0 = z_0, eps_i = rho eps_{i-1} + sqrt(1 - rho^2) z_i  (Ge et al. 2023): unwhiten must be this recursion
    alpha, f = 1.2, 6
    rho = alpha / math.sqrt(1 + alpha**2)
    z = _rand((50, f), 1)
    eps = torch.empty_like(z)
    eps[:, 0] = z[:, 0]
    for i in range(1, f):
        eps[:, i] = rho * eps[:, i - 1] + math.sqrt(1 - rho**2) * z[:, i]
    assert torch.allclose(Progressive(alpha, f).unwhiten(z), eps, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# operations against dense linear algebra, ranks 2, 3, 5, axis positions incl. negative
# ---------------------------------------------------------------------------------------------------------------
# the make_covariance specs build the same classes; three layouts (ranks 2, 3, 5) suffice for them
_OP_CASES = [(n, lay, ax) for n in CASES for (lay, ax) in LAYOUTS if not n.startswith("spec") or (lay, ax) in
             (LAYOUTS[1], LAYOUTS[3], LAYOUTS[6])]


@pytest.mark.parametrize("name,layout,axis", _OP_CASES)
def test_operations_match_dense_linear_algebra(name, layout, axis):
    make, ref = CASES[name]
    shape = _shape(layout)
    cov = make(F, axis)
    C = ref(F)
    full = _full(C, shape, axis)  # d x d
    x = _rand(shape, 3)
    xf = _flat(x)
    cov.check(x)

    # apply: C x ; solve: C^{-1} x  (round-off of a 5x5 / <=60x60 solve in float64)
    assert torch.allclose(_flat(cov.apply(x)), xf @ full.T, rtol=1e-12, atol=1e-12)
    solved = torch.linalg.solve(full, xf.T).T
    assert torch.allclose(_flat(cov.solve(x)), solved, rtol=1e-10, atol=1e-10)

    # mahalanobis: x^T (C (x) I)^{-1} x per sample
    assert torch.allclose(cov.mahalanobis(x), (xf * solved).sum(1), rtol=1e-10, atol=1e-10)

    # logdet of the F x F matrix and of the expanded one
    assert cov.logdet() == pytest.approx(torch.linalg.slogdet(C)[1].item(), rel=1e-10, abs=1e-12)
    assert cov.logdet_for(x) == pytest.approx(torch.linalg.slogdet(full)[1].item(), rel=1e-10, abs=1e-10)

    # unwhiten is "L along the axis, identity elsewhere" with L L^T = C: extract L from the rank-2 action
    # (row b of unwhiten(e_b) is L[:, b]) and compare the rank-k action with kron(I, L, I)
    L = make(F, 1).unwhiten(torch.eye(F, dtype=F64)).T
    assert torch.allclose(L @ L.T, C, rtol=0, atol=1e-12)
    assert torch.allclose(_flat(cov.unwhiten(x)), xf @ _full(L, shape, axis).T, rtol=1e-12, atol=1e-12)
    # whiten is its inverse: W L = I, and whiten(unwhiten(x)) = x, unwhiten(whiten(x)) = x
    W = make(F, 1).whiten(torch.eye(F, dtype=F64)).T
    assert torch.allclose(W @ L, torch.eye(F, dtype=F64), rtol=0, atol=1e-12)
    assert torch.allclose(cov.whiten(cov.unwhiten(x)), x, rtol=0, atol=1e-12)
    assert torch.allclose(cov.unwhiten(cov.whiten(x)), x, rtol=0, atol=1e-12)
    # whitening makes the Mahalanobis norm Euclidean
    assert torch.allclose(cov.mahalanobis(x), _flat(cov.whiten(x)).square().sum(1), rtol=1e-10)


@pytest.mark.parametrize("name", ["mixed", "progressive", "dense"])
def test_operations_keep_float32_and_device(name):
    make, ref = CASES[name]
    cov = make(F, 2)
    x = _rand((3, 2, F, 4), 5).float()
    for op in (cov.apply, cov.solve, cov.unwhiten, cov.whiten):
        y = op(x)
        assert y.dtype == torch.float32 and y.device == x.device and y.shape == x.shape
    # and agree with the float64 computation to float32 precision
    assert torch.allclose(cov.apply(x).double(), cov.apply(x.double()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# sampling: the empirical covariance matches C
# ---------------------------------------------------------------------------------------------------------------
def _frobenius_tolerance(C: torch.Tensor, n: int, k: float = 4.0) -> float:
    """Relative Frobenius tolerance for the empirical covariance S = X^T X / n of n i.i.d. N(0, C) rows (known
    mean): E||S - C||_F^2 = (||C||_F^2 + tr(C)^2) / n (Wishart moments, Var S_ij = (C_ij^2 + C_ii C_jj) / n).
    k = 4 times that RMS error: ||S - C||_F^2 is a sum of F^2 terms whose mean it is, so exceeding 16x its mean
    has negligible probability."""
    return k * math.sqrt((C.square().sum() + C.trace() ** 2).item() / n) / torch.linalg.matrix_norm(C).item()


@pytest.mark.parametrize("name", list(CASES))
def test_sample_covariance_matches(name):
    make, ref = CASES[name]
    cov = make(F, 1)
    C = ref(F)
    g = torch.Generator().manual_seed(11)
    x = cov.sample((20000, F, 3), generator=g, dtype=F64)  # 60000 independent F-vectors along axis 1
    assert x.dtype == F64 and x.shape == (20000, F, 3)
    rows = x.movedim(1, -1).reshape(-1, F)
    n = rows.shape[0]
    S = rows.T @ rows / n
    err = torch.linalg.matrix_norm(S - C).item() / torch.linalg.matrix_norm(C).item()
    tol = _frobenius_tolerance(C, n)
    assert err < tol, (err, tol)
    # the check can fail: i.i.d. noise in place of L z is far off for every correlated C
    if not torch.equal(C, torch.eye(F, dtype=F64)):
        wrong = torch.linalg.matrix_norm(torch.eye(F, dtype=F64) - C).item() / torch.linalg.matrix_norm(C).item()
        assert wrong > 5 * tol
    # the mean is zero: 5 standard errors of a mean of n draws, per frame
    assert (rows.mean(0).abs() < 5 * C.diagonal().sqrt() / math.sqrt(n)).all()


def test_sample_on_other_axis_and_rank5():
    cov = Progressive(1.5, 4, axis=-3)
    C = _progressive_ref(1.5, 4)
    x = cov.sample((5000, 2, 4, 2, 3), generator=torch.Generator().manual_seed(2), dtype=F64)
    rows = x.movedim(-3, -1).reshape(-1, 4)
    n = rows.shape[0]
    S = rows.T @ rows / n
    err = torch.linalg.matrix_norm(S - C).item() / torch.linalg.matrix_norm(C).item()
    assert err < _frobenius_tolerance(C, n)
    # pixels and channels stay uncorrelated: correlation between two non-frame positions is ~0
    # (5 standard errors, 1/sqrt(n) each, of a correlation of independent unit-variance draws)
    a = x[:, 0, :, 0, 0].reshape(-1)
    b = x[:, 1, :, 1, 2].reshape(-1)
    assert abs((a * b).mean().item()) < 5 / math.sqrt(a.numel())


# ---------------------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------------------
def _numbers(msg: str):
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", msg)]


def test_non_psd_toeplitz_refused_with_eigenvalue():
    coeffs = [1.0, 0.9, -0.9]
    lam_min = float(np.linalg.eigvalsh(_toeplitz_ref(coeffs, 3).numpy())[0])
    assert lam_min < -0.5
    with pytest.raises(DiffusionLabError, match="not positive semi-definite") as e:
        toeplitz(coeffs, 3)
    assert any(abs(v - lam_min) < 1e-5 for v in _numbers(str(e.value))), str(e.value)
    with pytest.raises(DiffusionLabError, match="not positive semi-definite"):
        make_covariance("toeplitz:1,0.9,-0.9", 3)


def test_dense_with_negative_eigenvalue_refused():
    q, _ = torch.linalg.qr(_rand((4, 4), 9))
    m = q @ torch.diag(torch.tensor([2.0, 1.0, 0.5, -0.37], dtype=F64)) @ q.T
    with pytest.raises(DiffusionLabError, match="not positive semi-definite") as e:
        Dense(m)
    assert any(abs(v + 0.37) < 1e-5 for v in _numbers(str(e.value))), str(e.value)


def test_non_symmetric_refused():
    with pytest.raises(DiffusionLabError, match=r"not symmetric: C\[\d,\d\] = 0\.(2|3)"):
        Dense([[1.0, 0.2], [0.3, 1.0]])


@pytest.mark.parametrize(
    "matrix,pattern",
    [
        ([[1.0, float("nan")], [float("nan"), 1.0]], "non-finite entry nan"),
        ([1.0, 2.0], r"square matrix, got shape \(2,\)"),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], r"shape \(2, 3\)"),
    ],
)
def test_malformed_dense_refused(matrix, pattern):
    with pytest.raises(DiffusionLabError, match=pattern):
        Dense(matrix)


def test_check_refuses_wrong_frame_count_and_axis():
    cov = Mixed(0.5, 4, axis=2)
    cov.check(torch.zeros(2, 3, 4, 5))
    with pytest.raises(DiffusionLabError, match=r"4x4 over axis 2, but the tensor has 5 entries there"):
        cov.check(torch.zeros(2, 3, 5, 5))
    with pytest.raises(DiffusionLabError, match=r"acts on axis 2.*shape \(2, 4\)"):
        cov.check(torch.zeros(2, 4))
    with pytest.raises(DiffusionLabError, match="has 3 entries"):
        Progressive(1.0, 4, axis=-1).sample((2, 3))
    with pytest.raises(DiffusionLabError, match="non-batch axis"):
        Mixed(0.5, 4, axis=0)
    Identity().check(torch.zeros(3, 7, 2))  # the identity takes any shape


def test_singular_psd_dense_samples_but_refuses_solve():
    v = torch.tensor([[1.0, 2.0, -1.0]], dtype=F64)
    C = v.T @ v + torch.diag(torch.tensor([0.0, 1.0, 0.0], dtype=F64))  # rank 2, PSD
    assert abs(torch.linalg.eigvalsh(C)[0].item()) < 1e-12
    cov = Dense(C)
    assert not cov.definite
    rows = cov.sample((40000, 3), generator=torch.Generator().manual_seed(4), dtype=F64)
    n = rows.shape[0]
    S = rows.T @ rows / n
    err = torch.linalg.matrix_norm(S - C).item() / torch.linalg.matrix_norm(C).item()
    assert err < _frobenius_tolerance(C, n)
    # L L^T = C for the spectral factor too
    L = cov.unwhiten(torch.eye(3, dtype=F64)).T
    assert torch.allclose(L @ L.T, C, atol=1e-12)
    for op in (cov.solve, cov.whiten, cov.mahalanobis):
        with pytest.raises(DiffusionLabError, match="singular"):
            op(rows[:2])
    with pytest.raises(DiffusionLabError, match="singular"):
        cov.logdet()


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("gaussian:1", r"unknown noise covariance 'gaussian:1'; allowed"),
        ("mixed", r"needs a parameter"),
        ("mixed:abc", r"got 'abc'"),
        ("progressive:-1", r"alpha must be finite and >= 0, got -1"),
        ("toeplitz:1,x", r"must be numbers, got '1,x'"),
        ("toeplitz:1,0.5,0.2,0.1,0.05,0.01", r"6 coefficients but only 5 frames"),
    ],
)
def test_make_covariance_rejects(spec, pattern):
    with pytest.raises(DiffusionLabError, match=pattern):
        make_covariance(spec, F)


def test_make_covariance_needs_frames():
    with pytest.raises(DiffusionLabError, match="no frames"):
        make_covariance("mixed:0.5", None)
    assert make_covariance(None).is_identity and make_covariance("iid", None).is_identity


def test_bad_alpha_and_size_refused():
    with pytest.raises(DiffusionLabError, match=r"got nan"):
        Mixed(float("nan"), 4)
    with pytest.raises(DiffusionLabError, match=r"size F must be an integer >= 1, got 0"):
        Progressive(0.5, 0)


# ---------------------------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["mixed", "progressive"]),
    alpha=st.floats(min_value=0.0, max_value=3.0),
    f=st.integers(min_value=1, max_value=6),
    pos=st.integers(min_value=1, max_value=3),
    negative=st.booleans(),
)
def test_property_structured_ops_against_dense(kind, alpha, f, pos, negative):
    shape = [2, 2, 3, 2]
    shape[pos] = f
    axis = pos - len(shape) if negative else pos
    cov = (Mixed if kind == "mixed" else Progressive)(alpha, f, axis)
    C = (_mixed_ref if kind == "mixed" else _progressive_ref)(alpha, f)
    full = _full(C, tuple(shape), axis)
    x = _rand(tuple(shape), 0)
    xf = _flat(x)
    # C is well conditioned for alpha <= 3: smallest eigenvalue 1/(1+alpha^2) >= 0.1 (Mixed) and
    # >= (1-rho)/(1+rho) > 0.02 (AR(1)), so a float64 dense solve is good to ~1e-13
    assert torch.allclose(_flat(cov.apply(x)), xf @ full.T, atol=1e-11)
    assert torch.allclose(_flat(cov.solve(x)), torch.linalg.solve(full, xf.T).T, rtol=1e-8, atol=1e-8)
    assert torch.allclose(cov.whiten(cov.unwhiten(x)), x, atol=1e-10)
    assert cov.logdet() == pytest.approx(torch.linalg.slogdet(C)[1].item(), rel=1e-9, abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(min_value=0, max_value=10_000), f=st.integers(min_value=1, max_value=6))
def test_property_dense_factor(seed, f):
    C = _spd(f, seed)
    cov = Dense(C, axis=-1)
    x = _rand((3, 2, f), seed + 1)
    L = cov.unwhiten(torch.eye(f, dtype=F64)).T
    assert torch.allclose(L @ L.T, C, atol=1e-12)
    assert torch.allclose(cov.whiten(cov.unwhiten(x)), x, atol=1e-10)
    assert torch.allclose(cov.mahalanobis(cov.unwhiten(x)), _flat(x).square().sum(1), rtol=1e-10)
