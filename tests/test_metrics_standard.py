"""FID, KID and precision/recall (diffusionlab.metrics.standard), the reference-statistics cache
(diffusionlab.training.image_metrics) and the Inception loader's errors (diffusionlab.interop.inception).

Every check runs with small randomly initialised stand-in extractors of the same interface as the FID Inception
network (uint8 (B, 3, H, W) -> (B, D), an ``identity``); the real network needs its standard weights file, which
is never downloaded, so only its loading path is exercised here (with random weights, when torch-fidelity is
installed)."""

import io
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from diffusionlab.errors import DiffusionLabError
from diffusionlab.metrics.standard import (
    extract_features, fid_from_features, image_scores, kid, mmd2_unbiased, precision_recall, to_uint8_rgb)


class StandIn(nn.Module):
    """A random conv feature extractor: uint8 (B, 3, H, W) -> (B, dim)."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(dim, generator=g) * 0.1)
        self.identity = f"stand-in-{dim}-{seed}"
        self.calls = 0

    def forward(self, u8):
        assert u8.dtype == torch.uint8 and u8.shape[1] == 3
        self.calls += 1
        x = (u8.float() - 128.0) / 128.0
        h = torch.tanh(self.conv(x))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


def _images(n, seed, c=1, hw=8):
    """Smooth random "images" in [0, 1] (blobs), distinct from uniform noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, hw), torch.linspace(-1, 1, hw), indexing="ij")
    centre = torch.rand(n, 2, generator=g) - 0.5
    width = 0.2 + 0.3 * torch.rand(n, generator=g)
    d2 = (xx - centre[:, :1, None]) ** 2 + (yy - centre[:, 1:, None]) ** 2
    img = torch.exp(-d2 / (2 * width[:, None, None] ** 2))
    return img[:, None].expand(n, c, hw, hw).clone()


# ---- preprocessing --------------------------------------------------------------------------------------------
def test_to_uint8_rgb_rounds_and_replicates_grey():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.5 / 255]).reshape(1, 1, 2, 3)
    u8 = to_uint8_rgb(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 2, 3)
    assert u8[0, 0].flatten().tolist() == [0, 128, 255, 255, 0, 0]  # round(127.5) = 128 (half to even: 128)
    assert torch.equal(u8[:, 0], u8[:, 1]) and torch.equal(u8[:, 0], u8[:, 2])
    with pytest.raises(DiffusionLabError, match="shape"):
        to_uint8_rgb(torch.zeros(2, 2, 4, 4))


def test_extract_features_batches_and_checks_the_extractor():
    ext = StandIn()
    x = _images(10, 0)
    f_all = extract_features(ext, x, batch_size=10)
    f_b = extract_features(ext, x, batch_size=3)
    assert f_all.shape == (10, 32) and f_all.dtype == torch.float64 and ext.calls == 1 + 4
    # the same per-image operations in other batch sizes: equal to float32 rounding of the conv reductions
    assert torch.allclose(f_all, f_b, rtol=0, atol=1e-6)
    with pytest.raises(DiffusionLabError, match=r"\(B, D\)"):
        extract_features(lambda u8: u8.float().mean(), x)


# ---- FID --------------------------------------------------------------------------------------------------------
def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large():
    ext = StandIn()
    real = extract_features(ext, _images(400, 1))
    other = extract_features(ext, _images(400, 2))  # same distribution, other draw
    noise = extract_features(ext, torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    self_fid = fid_from_features(real, real)
    same = fid_from_features(other, real)
    far = fid_from_features(noise, real)
    # identical sets: mean term exactly 0, trace terms cancel to eigen-solver round-off (~1e-12 of tr S)
    tr = float(torch.cov(real.T).trace())
    assert abs(self_fid) <= 1e-9 * tr
    # two draws of one distribution: the small-sample bias only; noise is two orders of magnitude further
    assert same < 0.05 * far


# ---- KID --------------------------------------------------------------------------------------------------------
def _mmd2_brute(x, y):
    """The unbiased estimator term by term, in plain Python loops (Gretton et al. 2012, eq. 3)."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_a_brute_force_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(7, 3))
    brute = _mmd2_brute(x, y)
    # float64 sums in another order: agreement to ~1e-15 relative; 1e-12 leaves room and fails on any wrong term
    assert mmd2_unbiased(x, y) == pytest.approx(brute, rel=1e-12, abs=1e-12)
    # one subset of all points is a permutation of each set: the same estimator
    res = kid(x, y, subsets=1, subset_size=7)
    assert res["kid_mean"] == pytest.approx(brute, rel=1e-12, abs=1e-12) and res["kid_std"] == 0.0
    # several subsets of 5: the mean of brute-force values on the very subsets drawn
    res = kid(x, y, subsets=4, subset_size=5, seed=3)
    g = np.random.default_rng(3)
    vals = [_mmd2_brute(x[g.choice(7, 5, replace=False)], y[g.choice(7, 5, replace=False)]) for _ in range(4)]
    assert res["kid_mean"] == pytest.approx(np.mean(vals), rel=1e-12)
    assert res["kid_std"] == pytest.approx(np.std(vals), rel=1e-9)


def test_kid_estimator_is_unbiased_where_the_biased_one_is_not():
    """Two samples of one distribution: MMD^2 = 0. The unbiased estimator's mean over 2000 pairs of sets is 0
    within 4 standard errors; the biased V-statistic (diagonal kept) is detectably positive."""
    rng = np.random.default_rng(1)
    vals, biased = [], []
    for _ in range(2000):
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        vals.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = ((a @ b.T / 4 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    vals, biased = np.array(vals), np.array(biased)
    se = vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(vals.mean()) < 4 * se
    assert biased.mean() > 10 * biased.std(ddof=1) / np.sqrt(len(biased))


# ---- precision / recall -------------------------------------------------------------------------------------
def test_precision_recall_known_answers():
    real = torch.arange(10.0)[:, None]  # 0, 1, ..., 9 on a line: every k=1 radius is 1
    fake = torch.tensor([[0.5], [20.0]])  # k=1 radii: 19.5 each
    pr = precision_recall(fake, real, k=1)
    assert pr["precision"] == 0.5  # 0.5 lies within 1 of 0; 20 is 11 from the nearest real point
    assert pr["recall"] == 1.0  # every real point lies within 19.5 of 0.5
    # the boundary counts as inside: a fake point exactly at distance 1 from a real point (k = 1)
    assert precision_recall(torch.tensor([[10.0], [100.0]]), real, k=1)["precision"] == 0.5
    # k = 3: interior real points have radius 2 (0 and 9: radius 3); 11.9 is 2.9 from 9 -> inside
    assert precision_recall(torch.tensor([[11.9], [12.1], [50.0], [51.0]]), real, k=3)["precision"] == 0.25
    same = precision_recall(real, real, k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(real + 1000.0, real, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    with pytest.raises(DiffusionLabError, match="k must be"):
        precision_recall(fake, real, k=2)  # the fake set has 2 points: no 2nd neighbour


def test_precision_recall_detects_mode_dropping():
    """Real: two well-separated clusters; fake: one of them. Precision 1, recall about 1/2."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g) + 50.0
    real = torch.cat([a, b])
    fake = torch.randn(200, 2, generator=g)
    pr = precision_recall(fake, real, k=3)
    # each real point of cluster a has a fake point within its k-NN radius with high probability; cluster b none
    assert pr["recall"] <= 0.5 and pr["recall"] > 0.4
    assert pr["precision"] > 0.9


def test_image_scores_keys():
    ext = StandIn()
    f, r = extract_features(ext, _images(60, 4)), extract_features(ext, _images(80, 5))
    s = image_scores(f, r, kid_subsets=5, kid_subset_size=50)
    assert set(s) == {"fid", "kid_mean", "kid_std", "kid_subsets", "kid_subset_size", "precision", "recall", "pr_k"}
    assert s["kid_subset_size"] == 50 and 0.0 <= s["precision"] <= 1.0


# ---- the reference cache ---------------------------------------------------------------------------------------
def test_reference_features_are_cached_once_per_dataset_and_extractor(tmp_path):
    from diffusionlab.training.image_metrics import reference_features

    ext = StandIn()
    imgs = _images(30, 6)
    data = {"name": "array", "path": "x.npz"}
    f1, (mu1, s1), info1 = reference_features(imgs, data, ext, tmp_path)
    calls = ext.calls
    f2, (mu2, s2), info2 = reference_features(imgs, data, ext, tmp_path)
    assert not info1["cached"] and info2["cached"] and ext.calls == calls  # no extractor call the second time
    assert torch.equal(f1, f2) and np.array_equal(mu1, mu2) and np.array_equal(s1, s2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob(".*"))  # no temporary left
    # another extractor (weights), other images or another data config: other entries
    reference_features(imgs, data, StandIn(seed=1), tmp_path)
    reference_features(imgs[:20], data, ext, tmp_path)
    reference_features(imgs, {"name": "array", "path": "y.npz"}, ext, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    # a corrupt entry is recomputed, never trusted
    path = info1["cache"]
    with open(path, "wb") as fh:
        fh.write(b"not safetensors")
    f3, _, info3 = reference_features(imgs, data, ext, tmp_path)
    assert not info3["cached"] and torch.equal(f3, f1)


# ---- end to end: a run, the CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 2-step U-Net run on 24 blob images (an array dataset)."""
    from diffusionlab.training.config import load_config
    from diffusionlab.training.trainer import train

    root = tmp_path_factory.mktemp("fidrun")
    np.savez(root / "imgs.npz", x=_images(24, 7).numpy())
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(json.dumps({
        "data": {"name": "array", "path": str(root / "imgs.npz"), "range": "unit"},
        "model": {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1,
                  "attn_resolutions": []},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "device": "cpu", "threads": 1},
        "sample": {"sampler": "ddim", "steps": 3}}))
    train(load_config(cfg_path), root / "run", progress=False, log=lambda *a: None)
    return root / "run"


def test_evaluate_image_metrics_of_a_run(image_run, tmp_path):
    from diffusionlab.training.image_metrics import evaluate_image_metrics
    from diffusionlab.training.sampling import load_run

    ext = StandIn()
    out = evaluate_image_metrics(load_run(image_run, "cpu"), ext, str(image_run), num=10, cache_dir=tmp_path)
    assert out["metric"] == "fid" and out["num"] == 10 and out["reference"]["num"] == 24
    assert out["fid"] > 0 and not out["reference"]["cached"]
    assert "NOT from the standard Inception weights" in out["note"]
    again = evaluate_image_metrics(load_run(image_run, "cpu"), ext, str(image_run), num=10, cache_dir=tmp_path)
    assert again["reference"]["cached"] and again["fid"] == out["fid"]  # same seed: same samples, same scores


def test_cli_fid_with_a_stand_in_extractor(image_run, tmp_path, monkeypatch, capsys):
    import diffusionlab.interop.inception as inception
    from diffusionlab.cli import main

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setattr(inception, "load_inception", lambda path, device="cpu": StandIn())
    rc = main(["evaluate", "--run", str(image_run), "--metric", "fid", "--inception", str(weights), "--num", "6",
               "--stats-cache", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"fid", "kid_mean", "precision", "recall"} <= set(out) and out["num"] == 6


def test_fid_refuses_non_image_runs_and_misplaced_flags(tmp_path, capsys):
    from diffusionlab.cli import main

    assert main(["evaluate", "--run", str(tmp_path), "--metric", "digits", "--inception", "w.pth"]) == 2
    assert "--inception applies to --metric fid" in capsys.readouterr().err
    from diffusionlab.data import load_dataset
    from diffusionlab.training.image_metrics import check_image_dataset

    with pytest.raises(DiffusionLabError, match="needs an image model"):
        check_image_dataset(load_dataset({"name": "ring", "num": 10}), "run x")


# ---- the Inception loader ---------------------------------------------------------------------------------------
def test_missing_inception_weights_is_one_clear_error(tmp_path, capsys):
    from diffusionlab.cli import main
    from diffusionlab.interop.inception import load_inception

    with pytest.raises(DiffusionLabError, match="Inception weights file not found.*nothing is downloaded"):
        load_inception(tmp_path / "nope.pth")
    rc = main(["evaluate", "--run", str(tmp_path), "--metric", "fid", "--inception", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pt_inception-2015-12-05-6726825d.pth" in err


def test_a_pickle_with_code_is_refused_before_any_import(tmp_path):
    from diffusionlab.interop.inception import load_inception

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, bad)
    with pytest.raises(DiffusionLabError, match="refused to load"):
        load_inception(bad)


def _random_inception_state(monkeypatch):
    """torch-fidelity's Inception with its random initialisation (its loader stubbed for this one build)."""
    from diffusionlab.interop.optional import prepare_torchvision

    prepare_torchvision()
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    net = fe.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=buf)
    monkeypatch.undo()
    return net.state_dict()


def test_inception_loader_with_random_weights(tmp_path, monkeypatch):
    """The real loading path: weights-only read, torch-fidelity's network, 2048-d features, wrong weights
    refused. Random weights (the standard file is never downloaded), so no figure is checked."""
    from diffusionlab.interop.optional import prepare_torchvision

    prepare_torchvision()  # before the import: torch-fidelity imports torchvision (interop.optional)
    pytest.importorskip("torch_fidelity")
    from safetensors.torch import save_file

    from diffusionlab.interop.inception import STANDARD_SHA256, file_sha256, load_inception

    sd = _random_inception_state(monkeypatch)
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    ext = load_inception(path)
    assert ext.identity.endswith(file_sha256(path)) and not ext.standard and STANDARD_SHA256.startswith("6726825d")
    f = extract_features(ext, _images(2, 8), batch_size=2)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(DiffusionLabError, match="does not hold the FID Inception-v3 weights"):
        load_inception(wrong)
