"""Tests for diffusionlab.metrics: the Frechet distance against closed forms, the shipped digits classifier
and the digits sample-quality metric (docs/digits_metric.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.metrics import digits as dg
from diffusionlab.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_features




# ---- Frechet distance ----------------------------------------------------------------------------------
def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _diag_closed_form(mu1, a, mu2, b) -> float:
    """FD of N(mu1, diag a) and N(mu2, diag b): ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_frechet_diagonal_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = _diag_closed_form(mu1, a, mu2, b)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    # float64 eigendecompositions of O(1) matrices: errors ~1e-15 relative; 1e-10 leaves a wide margin.
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    # torch inputs give the same value
    got_t = frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(a)), torch.tensor(mu2), torch.tensor(np.diag(b)))
    assert got_t == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_frechet_commuting_rotated_covariances_match_closed_form():
    """S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute: the FD is the diagonal closed form."""
    rng = np.random.default_rng(1)
    d = 6
    q = _random_orthogonal(rng, d)
    a, b = rng.uniform(0.05, 2.0, d), rng.uniform(0.05, 2.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_diag_closed_form(mu1, a, mu2, b), rel=1e-9)


def test_frechet_singular_covariance_matches_closed_form():
    """Rank-deficient covariances (a collapsed sample set has covariance 0) still follow the closed form."""
    rng = np.random.default_rng(2)
    d = 5
    a = np.array([0.0, 1.0, 0.0, 2.5, 0.3])
    b = np.array([1.2, 0.0, 0.0, 0.7, 0.3])
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(_diag_closed_form(mu1, a, mu2, b), rel=1e-9)
    # zero covariance against a full one: ||dmu||^2 + tr(S2)
    s2 = np.cov(rng.standard_normal((50, d)), rowvar=False)
    assert frechet_distance(mu1, np.zeros((d, d)), mu2, s2) == pytest.approx(
        float(np.sum((mu1 - mu2) ** 2) + np.trace(s2)), rel=1e-10
    )


def test_frechet_full_covariance_matches_scipy_sqrtm():
    rng = np.random.default_rng(3)
    d = 8
    for _ in range(3):
        m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
        s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        want = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
        # traces are O(10); sqrtm and eigh agree to ~1e-12 here, 1e-8 relative is a loose bound
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-8)  # symmetric


def test_frechet_one_dimensional():
    # N(m1, v1) vs N(m2, v2): (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2
    got = frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]])
    assert got == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_features_identical_and_shifted_sets():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-9)
    # a pure shift leaves the covariance unchanged: FD = ||shift||^2 exactly
    shift = rng.standard_normal(10)
    assert frechet_distance_features(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # an independent draw from the same Gaussian is close but not identical
    g = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10))
    assert frechet_distance_features(f, g) > 1.0


def test_feature_statistics_matches_numpy():
    rng = np.random.default_rng(5)
    f = rng.standard_normal((40, 6))
    mu, s = feature_statistics(torch.tensor(f, dtype=torch.float32))
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)  # float32 input: 1e-6 covers its rounding
    np.testing.assert_allclose(s, np.cov(f, rowvar=False), atol=1e-6)


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)),  # dimension mismatch
        (np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)),  # covariance shape mismatch
        (np.array([0.0, np.nan, 0.0]), np.eye(3), np.zeros(3), np.eye(3)),  # NaN
        (np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)),  # not symmetric
        (np.zeros((3, 1)), np.eye(3), np.zeros((3, 1)), np.eye(3)),  # means not 1-D
    ],
)
def test_frechet_bad_input_raises(args):
    with pytest.raises(DiffusionLabError):
        frechet_distance(*args)


def test_feature_statistics_bad_input_raises():
    with pytest.raises(DiffusionLabError, match="at least 2"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(DiffusionLabError, match="shape"):
        feature_statistics(np.zeros(4))
    with pytest.raises(DiffusionLabError, match="dimension"):
        frechet_distance_features(np.zeros((5, 3)), np.zeros((5, 4)))


# ---- the shipped classifier ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def splits():
    xtr, ytr = dg.load_digits_split("train")
    xte, yte = dg.load_digits_split("test")
    return xtr, ytr, xte, yte


def test_splits_are_the_documented_ones(splits):
    from sklearn.datasets import load_digits

    xtr, ytr, xte, yte = splits
    d = load_digits()
    assert xtr.shape == (1500, 1, 8, 8) and xte.shape == (297, 1, 8, 8)
    np.testing.assert_array_equal(xte.reshape(297, 64).numpy(), (d.data[-297:] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(yte.numpy(), d.target[-297:])
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0


def test_shipped_classifier_reaches_stated_accuracy():
    assert dg.WEIGHTS_PATH.is_file()
    acc = dg.classifier_accuracy(None, "test", "cpu")
    assert acc >= dg.STATED_TEST_ACCURACY
    # and reproduces the accuracy recorded when the weights were written (one image of slack for
    # platform-dependent float round-off on a borderline logit)
    recorded = float(dg.read_metadata()["test_accuracy"])
    assert abs(acc - recorded) <= 1.0 / dg.NUM_TEST + 1e-9
    assert dg.classifier_accuracy(None, "train", "cpu") >= 0.99


def test_classifier_is_cached_per_device():
    a = dg.load_classifier("cpu")
    assert dg.load_classifier(torch.device("cpu")) is a
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_training_is_deterministic_and_leaves_global_state_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    # one epoch in batches of 500 keeps this fast; the code path is the one --retrain uses
    m1 = dg.train_classifier(seed=7, epochs=1, batch_size=500)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    m2 = dg.train_classifier(seed=7, epochs=1, batch_size=500)
    m3 = dg.train_classifier(seed=8, epochs=1, batch_size=500)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_retrain_cli_writes_loadable_safetensors(tmp_path, capsys):
    out = tmp_path / "clf.safetensors"
    assert dg.main(["--retrain", "--epochs", "1", "--batch-size", "500", "--out", str(out)]) == 0
    meta = dg.read_metadata(out)
    assert meta["seed"] == "0" and meta["epochs"] == "1" and meta["batch_size"] == "500"
    model = dg.load_classifier("cpu", path=out)
    assert model is not dg.load_classifier("cpu")  # cached per file as well as per device
    # the recorded accuracy is the accuracy of the weights that were written (6 decimals)
    assert dg.classifier_accuracy(model, "test") == pytest.approx(float(meta["test_accuracy"]), abs=1e-6)
    with open(out, "rb") as f:  # a safetensors file starts with an 8-byte header length, then JSON
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))


# ---- the metric ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table(splits):
    """Measured values (docs/digits_metric.md): real 1.74, uniform noise 43.4, collapsed 152, blurred 39.8."""
    xtr = splits[0]
    cases = dg.baseline_cases(n=1500, seed=0)
    return {name: dg.evaluate_digits(x, device="cpu") for name, x in cases.items()} | {"_xtr": xtr}


def test_real_digits_score_well(table):
    m = table["real (train digits)"]
    assert m["num"] == 1500
    # measured 1.74 (N=1500 vs the 297 test digits); 3.0 allows for a retrained classifier
    assert m["fd"] < 3.0
    assert m["class_coverage"] == 1.0
    assert m["class_entropy"] > 0.99
    assert m["confidence"] > 0.85
    assert sum(m["class_histogram"]) == pytest.approx(1.0, abs=1e-12)
    json.dumps(m)  # JSON-serialisable


def test_noise_scores_far_worse_than_real(table):
    real = table["real (train digits)"]["fd"]
    for name in ("uniform noise U[0,1]", "Gaussian N(0.5, 0.5^2) clipped", "blurred real (Gaussian, sigma=1 px)"):
        m = table[name]
        assert m["fd"] > 10 * real, name  # measured ratios 19-25
        assert m["confidence"] < 0.8, name  # measured 0.45-0.53 against 0.94 on real digits
    # slightly noisy real digits sit between real and pure noise
    noisy = table["real + N(0, 0.1^2) noise, clipped"]["fd"]
    assert real < noisy < table["uniform noise U[0,1]"]["fd"] / 5


def test_collapsed_model_has_one_class(table):
    m = table["collapsed (one '3' repeated)"]
    assert m["class_coverage"] == pytest.approx(0.1)
    assert m["class_entropy"] == 0.0
    assert m["class_histogram"][3] == 1.0
    assert m["fd"] > 20 * table["real (train digits)"]["fd"]  # measured 152 vs 1.74


def test_shapes_and_containers_agree(splits):
    xte = splits[2][:100]
    ref = dg.evaluate_digits(xte)
    for alt in (xte.reshape(100, 64), xte.reshape(100, 8, 8), xte.numpy(), xte.double().numpy().reshape(100, 64)):
        got = dg.evaluate_digits(alt)
        assert got["class_histogram"] == ref["class_histogram"]
        assert got["fd"] == pytest.approx(ref["fd"], rel=1e-6)


def test_reference_options(splits):
    xtr, _, xte, _ = splits
    # the test set against itself: exactly the same statistics, FD 0
    assert dg.evaluate_digits(xte, reference="test")["fd"] == pytest.approx(0.0, abs=1e-9)
    # an explicit array of reference images equals the named split
    a = dg.evaluate_digits(xtr[:400], reference="test")["fd"]
    b = dg.evaluate_digits(xtr[:400], reference=xte.numpy())["fd"]
    assert a == pytest.approx(b, rel=1e-9)
    # FD is symmetric in the two sets
    # (features are float32 and conv kernels depend on the batch size, so only to ~1e-7 relative)
    c = dg.evaluate_digits(xte, reference="train")["fd"]
    d = dg.evaluate_digits(xtr, reference="test")["fd"]
    assert c == pytest.approx(d, rel=1e-5)


def test_coverage_threshold():
    """A class is covered at >= 1 % of the samples: 10 of 1000 counts, 9 of 1000 does not."""
    xte, yte = dg.load_digits_split("test")
    model = dg.load_classifier("cpu")
    with torch.no_grad():
        pred = model(xte).argmax(1)
    ok = (pred == yte)
    ones = xte[ok & (yte == 1)][:1]
    zeros = xte[ok & (yte == 0)][:1]
    for k, want in ((10, 0.2), (9, 0.1)):
        x = torch.cat([zeros.expand(1000 - k, 1, 8, 8), ones.expand(k, 1, 8, 8)])
        m = dg.evaluate_digits(x)
        assert m["class_histogram"][1] == pytest.approx(k / 1000)
        assert m["class_coverage"] == pytest.approx(want)
        p = np.array([(1000 - k) / 1000, k / 1000])
        assert m["class_entropy"] == pytest.approx(float(-(p * np.log(p)).sum() / math.log(10)), rel=1e-9)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((4, 1, 8, 8), 16.0), r"\[0, 1\]"),
        (-0.1 * torch.ones(4, 64), r"\[0, 1\]"),
        (torch.zeros(4, 3, 8, 8), "shape"),
        (torch.zeros(4, 63), "shape"),
        (torch.zeros(1, 1, 8, 8), "at least 2"),
        (torch.zeros(4, 8, 8, dtype=torch.complex64), "real"),
        (np.array([["a"] * 64] * 3), "real"),
    ],
)
def test_bad_samples_raise(bad, match):
    with pytest.raises(DiffusionLabError, match=match):
        dg.evaluate_digits(bad)


def test_bad_reference_and_device_raise():
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(DiffusionLabError, match="reference"):
        dg.evaluate_digits(x, reference="validation")
    with pytest.raises(DiffusionLabError, match="reference"):
        dg.evaluate_digits(x, reference=3)
    with pytest.raises(DiffusionLabError, match="device"):
        dg.evaluate_digits(x, device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(DiffusionLabError, match="not available"):
            dg.evaluate_digits(x, device="cuda")
    with pytest.raises(DiffusionLabError, match="split"):
        dg.load_digits_split("val")
    with pytest.raises(DiffusionLabError, match="epochs"):
        dg.train_classifier(epochs=0)
