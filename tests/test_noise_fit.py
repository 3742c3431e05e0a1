"""The frame covariance fitted to data (diffusionlab.noise.fit): estimation, nearest-correlation projection,
persistence.

Estimation tolerances: for n independent Gaussian F-vectors the sample correlation r_ij has standard error
(1 - rho_ij^2) / sqrt(n) (Fisher); entries are checked within 5 standard errors (15 entries: false alarm < 1e-5).
"""

import math

import numpy as np
import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Dense, Progressive, make_covariance
from diffusionlab.noise.fit import (
    fit_frame_covariance,
    frame_correlation,
    load_covariance,
    make_noise_covariance,
    nearest_correlation,
    parse_fitted_spec,
    read_covariance_meta,
    resolve_fitted_noise,
    save_covariance,
    toeplitz_average,
    toeplitz_spec,
)

F64 = torch.float64
FR = 6


def _ar1_videos(n=1000, alpha=1.5, seed=0, offsets=True):
    """Videos (n, 1, F, 4, 4): AR(1) noise across frames (rho = alpha / sqrt(1 + alpha^2)), independent pixels,
    plus (``offsets``) a different constant offset per frame (removed by the frame centering)."""
    g = torch.Generator().manual_seed(seed)
    x = Progressive(alpha, FR, axis=2).sample((n, 1, FR, 4, 4), generator=g, dtype=F64)
    shift = torch.linspace(-2, 3, FR, dtype=F64).reshape(1, 1, FR, 1, 1) if offsets else 0.0
    return 0.7 * x + shift, alpha / math.sqrt(1 + alpha**2)


def _ar1(rho, f=FR):
    i = torch.arange(f, dtype=F64)
    return rho ** (i[:, None] - i[None, :]).abs()


def test_recovers_ar1_correlation_within_mc_error():
    videos, rho = _ar1_videos()
    n = 1000 * 16
    truth = _ar1(rho)
    se = (1 - truth**2) / math.sqrt(n) + 1e-12
    r = frame_correlation(videos, axis=2, center="frame")
    assert torch.equal(torch.diagonal(r), torch.ones(FR, dtype=F64))
    assert ((r - truth).abs() / se).max() < 5
    for toeplitz in (False, True):
        cov = fit_frame_covariance(videos, toeplitz=toeplitz)
        assert isinstance(cov, Dense) and cov.axis == 2 and cov.definite
        c = cov.matrix()
        off = ~torch.eye(FR, dtype=torch.bool)
        assert ((c - truth).abs() / se)[off].max() < 5
    # without centering the per-frame offsets dominate: the estimate is far off (the option matters)
    raw = frame_correlation(videos, axis=2, center="none")
    assert ((raw - truth).abs() / se).max() > 50


def test_video_centering_matches_its_closed_form():
    """center='video' removes each vector's temporal mean: x -> (I - 11^T/F) x, whose correlation is that of
    (I - J) C (I - J), J = 11^T / F. Per-video per-pixel offsets (a static background) then cancel exactly."""
    videos, rho = _ar1_videos(seed=1, offsets=False)
    g = torch.Generator().manual_seed(2)
    static = 3 * torch.randn(videos.shape[0], 1, 1, 4, 4, generator=g, dtype=F64)
    r = frame_correlation(videos + static, axis=2, center="video")
    P = torch.eye(FR, dtype=F64) - torch.full((FR, FR), 1 / FR, dtype=F64)
    s = P @ _ar1(rho) @ P
    d = torch.diagonal(s).rsqrt()
    truth = d[:, None] * s * d[None, :]
    se = (1 - truth**2) / math.sqrt(1000 * 16) + 1e-12
    assert ((r - truth).abs() / se).max() < 5
    # the centered estimate is singular (ones vector in its null space); the fit makes it definite
    assert torch.linalg.eigvalsh(r)[0].abs() < 1e-9
    cov = fit_frame_covariance(videos + static, center="video", min_eig=0.01)
    assert torch.linalg.eigvalsh(cov.matrix())[0] > 0.01 - 1e-8


def _random_indefinite(f, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(f, f, generator=g, dtype=F64) * 2 - 1
    a = 0.5 * (a + a.T)
    a.fill_diagonal_(1.0)
    return a


@pytest.mark.parametrize("toeplitz", [False, True])
def test_projection_is_valid_and_optimal(toeplitz):
    """Output: symmetric, exactly unit diagonal, lambda_min >= min_eig (up to the stopping tolerance), Toeplitz
    when asked. Optimality of the projection X onto the convex set K: <A - X, Y - X> <= 0 for every Y in K
    (checked against 300 random members of K: AR(1), compound symmetric and their convex combinations)."""
    min_eig = 0.05
    for seed in range(3):
        a = _random_indefinite(FR, seed)
        assert torch.linalg.eigvalsh(a)[0] < 0
        x = nearest_correlation(a, min_eig=min_eig, toeplitz=toeplitz)
        assert torch.equal(x, x.T) and torch.equal(torch.diagonal(x), torch.ones(FR, dtype=F64))
        assert torch.linalg.eigvalsh(x)[0] > min_eig - 1e-6
        if toeplitz:
            torch.testing.assert_close(toeplitz_average(x), x, rtol=0, atol=1e-12)
        g = torch.Generator().manual_seed(10 + seed)
        worst = -1.0
        for _ in range(300):
            rho, r, w = torch.rand(3, generator=g, dtype=F64)
            cs = (1 - r) * torch.eye(FR, dtype=F64) + r * torch.ones(FR, FR, dtype=F64)
            y = w * _ar1(2 * rho.item() - 1) + (1 - w) * cs
            if torch.linalg.eigvalsh(y)[0] < min_eig:
                continue
            worst = max(worst, torch.sum((a - x) * (y - x)).item())
        assert worst <= 1e-7


def test_projection_is_idempotent_on_valid_input():
    for c in (_ar1(0.8), Progressive(0.7, FR).matrix(), make_covariance("mixed:1.0", FR).matrix()):
        assert torch.linalg.eigvalsh(c)[0] > 1e-3
        torch.testing.assert_close(nearest_correlation(c), c, rtol=0, atol=1e-12)
        torch.testing.assert_close(nearest_correlation(c, toeplitz=True), c, rtol=0, atol=1e-12)
    x = nearest_correlation(_random_indefinite(FR, 5))
    torch.testing.assert_close(nearest_correlation(x), x, rtol=0, atol=1e-10)


HIGHAM_4 = [[2, -1, 0, 0], [-1, 2, -1, 0], [0, -1, 2, -1], [0, 0, -1, 2]]
# Higham 2002 (and NAG's g02aa example): its nearest correlation matrix to 4 decimals
HIGHAM_4_ANSWER = [[1.0000, -0.8084, 0.1916, 0.1068], [-0.8084, 1.0000, -0.6562, 0.1916],
                   [0.1916, -0.6562, 1.0000, -0.8084], [0.1068, 0.1916, -0.8084, 1.0000]]
HIGHAM_3 = [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
HIGHAM_3_ANSWER = [[1.0000, 0.7607, 0.1573], [0.7607, 1.0000, 0.7607], [0.1573, 0.7607, 1.0000]]


def _brute_force_nearest(a: np.ndarray, starts: int = 8) -> np.ndarray:
    """Minimise ||V V^T - A||_F over V with unit rows (every correlation matrix is such a V V^T), with
    scipy's L-BFGS from several random starts; an independent check of the alternating projections."""
    from scipy.optimize import minimize

    f = a.shape[0]
    rng = np.random.default_rng(0)

    def corr(v):
        v = v.reshape(f, f)
        u = v / np.linalg.norm(v, axis=1, keepdims=True)
        return u @ u.T

    best = None
    for _ in range(starts):
        res = minimize(lambda v: np.sum((corr(v) - a) ** 2), rng.standard_normal(f * f), method="L-BFGS-B",
                       options={"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-15})
        if best is None or res.fun < best.fun:
            best = res
    return corr(best.x)


@pytest.mark.parametrize("a,answer", [(HIGHAM_4, HIGHAM_4_ANSWER), (HIGHAM_3, HIGHAM_3_ANSWER)])
def test_higham_examples(a, answer):
    a = torch.tensor(a, dtype=F64)
    x, info = nearest_correlation(a, min_eig=0.0, return_info=True)
    assert info["converged"]
    torch.testing.assert_close(x, torch.tensor(answer, dtype=F64), rtol=0, atol=5e-5)
    brute = torch.tensor(_brute_force_nearest(a.numpy()))
    torch.testing.assert_close(x, brute, rtol=0, atol=1e-4)
    assert torch.linalg.norm(x - a) <= torch.linalg.norm(brute - a) + 1e-9


def test_toeplitz_average_is_the_orthogonal_projection():
    a = _random_indefinite(5, 3)
    t = toeplitz_average(a)
    torch.testing.assert_close(toeplitz_average(t), t)
    # a - t is orthogonal to every symmetric Toeplitz matrix (basis: the diagonals' indicator matrices)
    i = torch.arange(5)
    lag = (i[:, None] - i[None, :]).abs()
    for k in range(5):
        assert abs(torch.sum((a - t) * (lag == k).to(F64)).item()) < 1e-12


def test_save_load_roundtrip_and_specs(tmp_path):
    videos, _ = _ar1_videos(n=200)
    cov = fit_frame_covariance(videos, toeplitz=True)
    path = save_covariance(cov, tmp_path / "c.safetensors", meta={"note": "test"})
    back = load_covariance(path)
    assert torch.equal(back.matrix(), cov.matrix()) and back.axis == 2
    meta = read_covariance_meta(path)
    assert meta["size"] == FR and meta["fit"]["toeplitz"] is True and meta["note"] == "test"
    assert load_covariance(path, axis=-3).axis == -3
    via_spec = make_noise_covariance(f"file:{path}", FR, 2)
    assert torch.equal(via_spec.matrix(), cov.matrix())
    x = torch.randn(3, 1, FR, 2, 2, dtype=F64)
    torch.testing.assert_close(via_spec.solve(via_spec.apply(x)), x)
    # the Toeplitz spec reproduces the matrix bit for bit
    assert torch.equal(make_covariance(toeplitz_spec(cov), FR, 2).matrix(), cov.matrix())
    with pytest.raises(DiffusionLabError, match="not Toeplitz"):
        toeplitz_spec(fit_frame_covariance(videos))
    assert isinstance(make_noise_covariance("progressive:1.0", FR, 2), Progressive)
    with pytest.raises(DiffusionLabError, match="entries on axis"):
        make_noise_covariance(f"file:{path}", FR + 1, 2)
    with pytest.raises(DiffusionLabError, match="not found"):
        load_covariance(tmp_path / "missing.safetensors")
    with pytest.raises(DiffusionLabError, match="needs the training data"):
        make_noise_covariance("fitted", FR, 2)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(DiffusionLabError, match="cannot read"):
        load_covariance(tmp_path / "junk.safetensors")


def test_fitted_spec_resolution(tmp_path):
    assert parse_fitted_spec("fitted") == {"center": "frame", "toeplitz": False, "min_eig": 1e-3}
    assert parse_fitted_spec("fitted:toeplitz,video,min_eig=0.02") == {"center": "video", "toeplitz": True,
                                                                        "min_eig": 0.02}
    with pytest.raises(DiffusionLabError, match="unknown option"):
        parse_fitted_spec("fitted:bogus")
    videos, rho = _ar1_videos(n=300)
    cfg = {"process": {"name": "vp", "noise": "fitted:toeplitz"}}
    out = resolve_fitted_noise(cfg, videos, tmp_path)
    assert cfg["process"]["noise"] == "fitted:toeplitz"  # the input is not modified
    spec = out["process"]["noise"]
    assert spec.startswith("file:") and (tmp_path / "noise_covariance.safetensors").is_file()
    cov = make_noise_covariance(spec, FR, 2)
    assert abs(cov.matrix()[0, 1].item() - rho) < 0.05
    same = {"process": {"name": "vp", "noise": "mixed:1.0"}}
    assert resolve_fitted_noise(same, videos, tmp_path) is same


def test_validation():
    with pytest.raises(DiffusionLabError, match="centering"):
        frame_correlation(torch.zeros(4, 1, 3, 2, 2), center="median")
    with pytest.raises(DiffusionLabError, match="NaN"):
        frame_correlation(torch.full((4, 1, 3, 2, 2), float("nan")))
    with pytest.raises(DiffusionLabError, match="square"):
        nearest_correlation(torch.zeros(2, 3))
    with pytest.raises(DiffusionLabError, match="min_eig"):
        nearest_correlation(torch.eye(3), min_eig=2.0)
    # a frame that never varies: correlation 0 with the others, 1 with itself
    v = torch.randn(50, 1, 3, 2, 2, dtype=F64)
    v[:, :, 1] = 0.5
    r = frame_correlation(v)
    assert r[1, 1] == 1 and r[0, 1] == 0 and r[1, 2] == 0
