"""Video diffusion with frame-correlated noise C: samplers, ELBO and loss on video tensors, the video U-Net,
the video data sets, video output and the temporal metrics.

Sampler tests (Gaussian video data, exact score). Samples have shape ``(1, F, 2, 2)`` (F = 4 frames of 2x2
pixels), the covariance C acts on axis 2 of the batch ``(B, 1, F, 2, 2)``, and the data are
``N(m, Sigma)`` with ``Sigma = 0.3 AR_0.6 (x) P`` (frames AR(1) with rho 0.6, pixels a random SPD P). What is
compared is the *frame covariance*: the F x F covariance pooled over the 4 pixels, ``S_ij = mean_p
Cov(x_{p,i}, x_{p,j})``. Its Monte Carlo error from n draws is known in closed form (Isserlis):
``E ||S_hat - S||_F^2 = sum_ij Var(mean_p x_pi x_pj) / n`` with ``Var = sum_{p,q} (S_{pi,qi} S_{pj,qj} +
S_{pi,qj} S_{pj,qi}) / P^2``; the tests allow 4 times that RMS. ``||S_hat - S||_F^2`` is a weighted chi-square
with 10 weights, so exceeding 16 times its mean has probability below 1e-4 even for one degree of freedom.
The samplers' own discretisation bias (measured once with n = 40000: relative error <= 0.009 for DDPM with 200
respaced steps, Euler-Maruyama with 200 steps and Heun with 50 steps, against an RMS of 0.006 at that n) is far
below the tolerance (0.10 at n = 2000). With i.i.d. noise in place of ``L z`` the error is 0.66 (mixed) to 2.3
(progressive), 7x to 20x the tolerance.
"""

import math

import numpy as np
import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Identity, Mixed, Progressive
from diffusionlab.objectives import SimpleLoss, full_vlb, vlb_terms
from diffusionlab.oracles import GaussianOracle
from diffusionlab.parametrization import DiffusionModel
from diffusionlab.processes import VPChain, VPSDE
from diffusionlab.processes.grid import make_grid
from diffusionlab.samplers import NoiseSource, ddim, ddpm, euler_maruyama, ode_heun
from diffusionlab.schedules import linear_betas
from rounding import sum_rtol

F64 = torch.float64
FR, PIX = 4, 4  # frames, pixels per frame (2 x 2)
SHAPE = (1, FR, 2, 2)
N_SAMPLES = 2000
COVS = {"progressive": lambda: Progressive(2.0, FR, axis=2), "mixed": lambda: Mixed(1.0, FR, axis=2)}


# ---- Gaussian video data and its frame covariance -------------------------------------------------------------
def data_moments():
    i = torch.arange(FR, dtype=F64)
    frames = 0.6 ** (i[:, None] - i[None, :]).abs()
    a = torch.randn(PIX, PIX, generator=torch.Generator().manual_seed(0), dtype=F64)
    pixels = a @ a.T / PIX + 0.3 * torch.eye(PIX, dtype=F64)
    sigma = 0.3 * torch.kron(frames, pixels)  # flat index f * PIX + p: the layout of (1, F, 2, 2)
    mean = 0.3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)
    return mean, sigma


def pooled_frame_cov_true(sigma):
    return torch.stack([torch.stack([torch.diagonal(sigma[i * PIX:(i + 1) * PIX, j * PIX:(j + 1) * PIX]).mean()
                                     for j in range(FR)]) for i in range(FR)])


def pooled_frame_cov(x):
    xf = torch.movedim(x.to(F64), 2, -1).reshape(x.shape[0], -1, FR)  # (n, pixels, F)
    xf = xf - xf.mean(0, keepdim=True)
    return torch.einsum("npi,npj->ij", xf, xf) / (xf.shape[0] * xf.shape[1])


def mc_rms(sigma, n):
    """sqrt(E ||S_hat - S||_F^2) for n Gaussian draws (module docstring)."""
    s = sigma.reshape(FR, PIX, FR, PIX)  # s[i, p, j, q] = Cov(x_{p,i}, x_{q,j})
    total = 0.0
    for i in range(FR):
        for j in range(FR):
            total += (torch.einsum("pq,pq->", s[i, :, i, :], s[j, :, j, :])
                      + torch.einsum("pq,pq->", s[i, :, j, :], s[j, :, i, :])).item() / PIX**2
    return math.sqrt(total / n)


def rel_error(x, sigma):
    s = pooled_frame_cov_true(sigma)
    return ((pooled_frame_cov(x) - s).norm() / s.norm()).item()


def oracle(process):
    mean, sigma = data_moments()
    return GaussianOracle(mean, sigma, process)


def tolerance():
    _, sigma = data_moments()
    return 4.0 * mc_rms(sigma, N_SAMPLES) / pooled_frame_cov_true(sigma).norm().item()


def test_mc_rms_formula_matches_direct_simulation():
    """The tolerance's RMS formula against the spread of the estimator over repeated exact draws."""
    mean, sigma = data_moments()
    orc = GaussianOracle(mean, sigma, VPChain(linear_betas(10)))
    g = torch.Generator().manual_seed(5)
    s = pooled_frame_cov_true(sigma)
    errs = torch.tensor([(pooled_frame_cov(orc.sample_data(200, generator=g)) - s).norm().item() ** 2
                         for _ in range(300)])
    # mean of 300 weighted chi-squares: relative standard error < sqrt(2 / 300) = 0.08; allow 0.3
    assert errs.mean().sqrt().item() == pytest.approx(mc_rms(sigma, 200), rel=0.3)


@pytest.mark.parametrize("name", sorted(COVS))
def test_ddpm_reproduces_frame_covariance_and_fails_with_iid_noise(name):
    orc = oracle(VPChain(linear_betas(1000), cov=COVS[name]()))
    g = torch.Generator().manual_seed(3)
    x_T = orc.process.prior_sample((N_SAMPLES, *SHAPE), generator=g, dtype=F64)  # N(0, C)
    tol = tolerance()
    assert rel_error(ddpm(orc, x_T, 200, noise=g), orc.Sigma) < tol
    wrong = ddpm(orc, x_T, 200, noise=NoiseSource(Identity(), g))
    assert rel_error(wrong, orc.Sigma) > 5 * tol


@pytest.mark.parametrize("name", sorted(COVS))
def test_reverse_sde_reproduces_frame_covariance_and_fails_with_iid_noise(name):
    sde = VPSDE(cov=COVS[name]())
    orc = oracle(sde)
    g = torch.Generator().manual_seed(4)
    ts = make_grid(sde, 200)
    x_T = sde.prior_sample((N_SAMPLES, *SHAPE), generator=g, dtype=F64)
    tol = tolerance()
    assert rel_error(euler_maruyama(orc, x_T, ts, noise=g), orc.Sigma) < tol
    wrong = euler_maruyama(orc, x_T, ts, noise=NoiseSource(Identity(), g))
    assert rel_error(wrong, orc.Sigma) > 5 * tol


@pytest.mark.parametrize("name", sorted(COVS))
def test_ode_reproduces_frame_covariance_and_fails_from_iid_start(name):
    """The probability-flow ODE ``dX = -beta/2 (X + C grad log p) dt`` is deterministic: C enters through the
    score term and the start ``N(0, C)``; started from ``N(0, I)`` the frame covariance is wrong."""
    sde = VPSDE(cov=COVS[name]())
    orc = oracle(sde)
    g = torch.Generator().manual_seed(6)
    ts = make_grid(sde, 50)
    tol = tolerance()
    assert rel_error(ode_heun(orc, sde.prior_sample((N_SAMPLES, *SHAPE), generator=g, dtype=F64), ts), orc.Sigma) < tol
    wrong = ode_heun(orc, torch.randn((N_SAMPLES, *SHAPE), generator=g, dtype=F64), ts)
    assert rel_error(wrong, orc.Sigma) > 5 * tol


def test_ddim_runs_on_videos_with_correlated_C():
    """DDIM (eta = 1: noise L z every step) on the same data: the frame covariance within tolerance."""
    orc = oracle(VPChain(linear_betas(1000), cov=COVS["progressive"]()))
    g = torch.Generator().manual_seed(7)
    x_T = orc.process.prior_sample((N_SAMPLES, *SHAPE), generator=g, dtype=F64)
    assert rel_error(ddim(orc, x_T, 200, eta=1.0, noise=g), orc.Sigma) < tolerance()


# ---- ELBO and loss on video tensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COVS))
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_mahalanobis_elbo_of_exact_model_matches_closed_form(name, variance):
    """Monte Carlo ``full_vlb`` (one x_t per term, R = 500 repeats of 4 videos) against
    ``elbo_closed_form``: within 4.5 standard errors (4 comparisons per case; false alarm < 3e-5). Power: the same
    Monte Carlo bound computed with the identity in place of C (noise draws and KL metric; the oracle keeps its
    C-aware predictions) misses the closed form by > 20 standard errors for the progressive C (measured 27-38;
    for the mixed C, r = 0.5 over 4 frames, the miss is only 1-6 standard errors, so it is not asserted)."""
    cov = COVS[name]()
    orc = oracle(VPChain(linear_betas(50, 1e-3, 0.3), cov=cov))
    g = torch.Generator().manual_seed(8)
    x0 = orc.sample_data(4, generator=g)
    R = 500
    nll = full_vlb(orc, x0.repeat(R, 1, 1, 1, 1), variance=variance, generator=g).reshape(R, 4)
    se = nll.std(0) / math.sqrt(R)
    closed = -orc.elbo_closed_form(x0, variance=variance)
    assert ((nll.mean(0) - closed).abs() / se).max() < 4.5
    if name == "progressive" and variance == "beta":
        orc.process = VPChain(linear_betas(50, 1e-3, 0.3))  # C ignored by the bound, not by the predictions
        wrong = full_vlb(orc, x0.repeat(R, 1, 1, 1, 1), variance=variance, generator=g).reshape(R, 4)
        assert ((wrong.mean(0) - closed).abs() / (wrong.std(0) / math.sqrt(R))).min() > 20


def test_elbo_weighted_loss_is_the_thesis_kl_term():
    """Thesis eq. 3: with reverse variance beta-tilde, ``L_{t-1} = beta_t / (2 alpha_t (1 - abar_{t-1}))
    ||eps - eps_theta||^2_{C^{-1}}`` for t >= 2: the ELBO-weighted loss, the VLB term and that formula agree."""
    cov = COVS["progressive"]()
    proc = VPChain(linear_betas(50, 1e-3, 0.3), cov=cov)
    orc = oracle(proc)
    g = torch.Generator().manual_seed(9)
    x0 = orc.sample_data(64, generator=g)
    t = torch.randint(2, 51, (64,), generator=g)
    noise = cov.sample(x0.shape, generator=g, dtype=F64)
    kl = vlb_terms(orc, x0, t, noise=noise, variance="beta_tilde")
    loss = SimpleLoss(proc, weighting="elbo")(orc, x0, t=t, noise=noise)
    x_t, _ = proc.sample_marginal(x0, t, noise=noise)
    eps_theta = orc.predict(x_t, t).eps
    diff = (noise - eps_theta).reshape(64, 1, FR, 4)  # frames on axis 2, then a dense C^{-1} by hand
    cinv = torch.linalg.inv(cov.matrix())
    maha = torch.einsum("bcfp,fg,bcgp->b", diff, cinv, diff)
    w = proc.beta[t] / (2 * proc.alpha[t] * (1 - proc.alpha_bar[t - 1]))
    torch.testing.assert_close(loss, kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, w * maha, rtol=1e-10, atol=1e-12)


class _FrameNet(torch.nn.Module):
    """A network with a nonzero output that mixes frames: ``tanh(conv over the frame axis)``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, (3, 3, 3), padding=1)

    def forward(self, x, c_noise):
        return torch.tanh(self.conv(x) + c_noise.reshape(-1, 1, 1, 1, 1) / 1000.0)


class _AsImage(torch.nn.Module):
    """The same network seen as an image network on (B, F, H, W) (frames as channels)."""

    def __init__(self, net, frames):
        super().__init__()
        self.net, self.frames = net, frames

    def forward(self, x, c_noise):
        b, f, h, w = x.shape
        return self.net(x.reshape(b, 1, f, h, w), c_noise).reshape(b, f, h, w)


@pytest.mark.parametrize("weighting", ["simple", "elbo", "min_snr"])
def test_identity_video_loss_equals_image_loss_bit_for_bit(weighting):
    torch.manual_seed(0)
    net = _FrameNet()
    b, f, h, w = 6, 5, 4, 4
    x0 = torch.rand(b, 1, f, h, w) * 2 - 1
    t = torch.randint(1, 101, (b,))
    noise = torch.randn_like(x0)
    video = DiffusionModel(net, VPChain(linear_betas(100), cov=Identity()))
    image = DiffusionModel(_AsImage(net, f), VPChain(linear_betas(100), cov=Identity()))
    lv = SimpleLoss(video.process, weighting=weighting)(video, x0, t=t, noise=noise)
    li = SimpleLoss(image.process, weighting=weighting)(image, x0.reshape(b, f, h, w), t=t,
                                                          noise=noise.reshape(b, f, h, w))
    # bit for bit: the very same operations (the same net on the same reshaped tensors, C = I, the same sum over
    # the same 80 contiguous entries); only the batch layout of the wrapper differs
    assert torch.equal(lv, li)
    if weighting == "simple":  # and it is the plain mean squared error
        with torch.no_grad():
            x_t, _ = video.process.sample_marginal(x0, t, noise=noise)
            out = video(x_t, t)
        # a mean is another reduction than the loss's sum / D: equal up to the rounding bound of rounding.sum_rtol
        torch.testing.assert_close(lv, ((noise - out) ** 2).mean(dim=(1, 2, 3, 4)), rtol=sum_rtol(f * h * w, lv.dtype),
                                   atol=0)


def test_mse_weighting_ignores_C_and_mahalanobis_uses_it():
    torch.manual_seed(0)
    net = _FrameNet()
    x0 = torch.rand(6, 1, 5, 4, 4, dtype=F64) * 2 - 1
    net = net.double()
    t = torch.randint(1, 101, (6,))
    cov = Progressive(1.5, 5, axis=2)
    noise = cov.sample(x0.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    corr = DiffusionModel(net, VPChain(linear_betas(100), cov=cov))
    iid = DiffusionModel(net, VPChain(linear_betas(100), cov=Identity()))
    mse = SimpleLoss(corr.process, weighting="mse")(corr, x0, t=t, noise=noise)
    # bit for bit: "mse" is the identity's Mahalanobis norm over D, the very code of the i.i.d. loss
    assert torch.equal(mse, SimpleLoss(iid.process)(iid, x0, t=t, noise=noise))
    maha = SimpleLoss(corr.process)(corr, x0, t=t, noise=noise)
    with torch.no_grad():
        x_t, _ = corr.process.sample_marginal(x0, t, noise=noise)
        d = (noise - corr(x_t, t)).reshape(6, 5, 16)
    dense = torch.einsum("bfp,fg,bgp->b", d, torch.linalg.inv(cov.matrix()), d) / 80
    torch.testing.assert_close(maha, dense, rtol=1e-10, atol=0)
    assert (maha - mse).abs().max() > 0.1 * mse.abs().max()


# ---- the video U-Net --------------------------------------------------------------------------------------------
def _randomize(net, skip_temporal=False):
    from diffusionlab.models.video_unet import TemporalAttention, TemporalConv

    temporal = {id(p) for m in net.modules() if isinstance(m, (TemporalConv, TemporalAttention))
                for p in m.parameters()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if skip_temporal and id(p) in temporal:
                continue
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("temporal", ["conv", "attention", "both"])
def test_video_unet_shapes_zero_init_and_frame_interaction(temporal):
    from diffusionlab.models.video_unet import build_video_unet

    opts = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
            "temporal": temporal}
    net = build_video_unet(opts, (1, 6, 8, 8), out_mult=2)
    x = torch.randn(3, 1, 6, 8, 8)
    c = torch.tensor([0.0, 500.0, 999.0])
    out = net(x, c)
    assert out.shape == (3, 2, 6, 8, 8) and torch.equal(out, torch.zeros_like(out))  # zero-initialised output
    assert net(x, torch.tensor(10.0)).shape == (3, 2, 6, 8, 8)  # scalar c_noise
    # spatial weights random, temporal layers as initialised (zero residual): frames are processed independently
    _randomize(net, skip_temporal=True)
    y = x.clone()
    y[:, :, 0] += 1.0
    a, b = net(x, c), net(y, c)
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3
    torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:], rtol=0, atol=1e-5)
    # with the temporal layers trained (random), frame 0 reaches the others
    _randomize(net)
    a, b = net(x, c), net(y, c)
    assert (a[:, :, 3:] - b[:, :, 3:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4
    # samples of a batch do not interact
    torch.testing.assert_close(net(x[1:2], c[1:2]), a[1:2], rtol=1e-4, atol=1e-5)


def test_video_unet_trains_and_validates():
    from diffusionlab.models.video_unet import build_video_unet

    net = build_video_unet({"base_channels": 8, "channel_mults": [1, 2]}, (1, 4, 8, 8))
    x = torch.randn(4, 1, 4, 8, 8)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(15):
        loss = (net(x, torch.full((4,), 100.0)) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(DiffusionLabError, match="video_unet needs videos"):
        build_video_unet({}, (1, 8, 8))
    with pytest.raises(DiffusionLabError, match="unknown option"):
        build_video_unet({"bogus": 1}, (1, 4, 8, 8))
    with pytest.raises(DiffusionLabError, match="temporal must be"):
        build_video_unet({"temporal": "lstm"}, (1, 4, 8, 8))
    with pytest.raises(DiffusionLabError, match="VideoUNet expects"):
        net(torch.randn(2, 1, 4, 6, 6), torch.zeros(2))


# ---- data -------------------------------------------------------------------------------------------------------
def test_moving_digits_is_deterministic_and_physical():
    from diffusionlab.data.images import digits
    from diffusionlab.data.video import moving_digits

    a = moving_digits(num=40, frames=6, size=16, seed=3)
    b = moving_digits(num=40, frames=6, size=16, seed=3)
    c = moving_digits(num=40, frames=6, size=16, seed=4)
    assert torch.equal(a.data, b.data) and torch.equal(a.labels, b.labels) and not torch.equal(a.data, c.data)
    assert a.kind == "videos" and a.data.shape == (40, 1, 6, 16, 16) and a.data.dtype == torch.float32
    levels = (a.data + 1) * 8  # model space 2 k / 16 - 1 -> k
    assert torch.equal(levels, levels.round()) and levels.min() >= 0 and levels.max() <= 16
    # one digit, never cut by the walls: every frame holds the whole digit's ink, and it is one of the train digits
    ink = ((a.data + 1) / 2).sum(dim=(1, 3, 4))  # (N, F)
    torch.testing.assert_close(ink, ink[:, :1].expand_as(ink))
    train = (digits("train").data + 1) / 2
    from diffusionlab.metrics.video import digit_crops

    crop = digit_crops(((a.data[:, :, 0] + 1) / 2))  # (N, 1, 8, 8) first frames
    assert torch.isin(crop.sum(dim=(1, 2, 3)), train.sum(dim=(1, 2, 3))).all()
    # the centre of mass moves by at most speed + 1 pixel per frame (rounding), and does move
    w = (a.data + 1) / 2
    ys = torch.arange(16.0)
    cy = (w.sum(dim=4) * ys).sum(-1) / w.sum(dim=(3, 4))
    step = cy[:, 0, 1:] - cy[:, 0, :-1]
    assert step.abs().max() <= 2.0 + 1e-4 and step.abs().mean() > 0.2
    still = moving_digits(num=3, frames=4, size=12, speed=0.0, seed=0).data
    assert torch.equal(still, still[:, :, :1].expand_as(still))
    two = moving_digits(num=5, frames=3, size=24, num_digits=2, seed=0)
    assert two.data.shape == (5, 1, 3, 24, 24)
    with pytest.raises(DiffusionLabError, match="size"):
        moving_digits(num=2, size=6)
    with pytest.raises(DiffusionLabError, match="num_digits"):
        moving_digits(num=2, num_digits=3)


def test_bounce_reflects_at_the_walls():
    from diffusionlab.data.video import bounce

    p = bounce(np.array([0.5]), np.array([1.0]), 6, 2.0)[:, 0]
    np.testing.assert_allclose(p, [0.5, 1.5, 1.5, 0.5, 0.5, 1.5])
    q = bounce(np.array([1.0]), np.array([-0.75]), 4, 2.0)[:, 0]
    np.testing.assert_allclose(q, [1.0, 0.25, 0.5, 1.25])


def test_moving_mnist_loader(tmp_path):
    from diffusionlab.data.video import moving_mnist

    arr = np.random.default_rng(0).integers(0, 256, size=(20, 7, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "mnist_test_seq.npy", arr)
    ds = moving_mnist(str(tmp_path), frames=10, num=5)
    assert ds.kind == "videos" and ds.data.shape == (5, 1, 10, 64, 64)
    assert ds.data[3, 0, 7, 11, 13].item() == pytest.approx(2 * arr[7, 3, 11, 13] / 255 - 1, abs=1e-6)
    small = moving_mnist(str(tmp_path / "mnist_test_seq.npy"), frames=4, size=16)
    assert small.data.shape == (7, 1, 4, 16, 16) and small.data.min() >= -1 and small.data.max() <= 1
    with pytest.raises(DiffusionLabError, match="never downloads"):
        moving_mnist(str(tmp_path / "missing"))
    np.save(tmp_path / "bad.npy", arr[0])
    with pytest.raises(DiffusionLabError, match="uint8 array"):
        moving_mnist(str(tmp_path / "bad.npy"))
    with pytest.raises(DiffusionLabError, match="fewer than frames"):
        moving_mnist(str(tmp_path), frames=21)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio probing its plugins on the junk .mp4
def test_video_folder_loader(tmp_path):
    import imageio.v3 as iio

    from diffusionlab.data.video import video_folder
    from diffusionlab.video_io import mp4_available

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(6, 10, 12), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    iio.imwrite(tmp_path / "sub" / "a.gif", grey, extension=".gif", duration=100, loop=0)
    np.save(tmp_path / "b.npy", rng.random((5, 12, 12, 3)).astype(np.float32))
    ds = video_folder(str(tmp_path), frames=5, size=8)
    assert ds.kind == "videos" and ds.data.shape == (2, 1, 5, 8, 8)
    assert ds.data.min() >= -1 and ds.data.max() <= 1
    same = video_folder(str(tmp_path), frames=5, size=10, channels=3)
    assert same.data.shape == (2, 3, 5, 10, 10)
    with pytest.raises(DiffusionLabError, match="fewer than the 6 asked for"):
        video_folder(str(tmp_path), frames=6)
    with pytest.raises(DiffusionLabError, match="does not exist"):
        video_folder(str(tmp_path / "nowhere"))
    if not mp4_available():
        (tmp_path / "c.mp4").write_bytes(b"not a video")
        with pytest.raises(DiffusionLabError, match=r"imageio\[ffmpeg\]"):
            video_folder(str(tmp_path), frames=5)


def test_video_loaders_registered():
    """Once registered in diffusionlab.data._LOADERS, load_dataset builds the video sets."""
    from diffusionlab.data import DATASETS, load_dataset

    if "moving_digits" not in DATASETS:
        pytest.skip("moving_digits is not registered in diffusionlab.data._LOADERS yet")
    ds = load_dataset({"name": "moving_digits", "num": 4, "frames": 3}, seed=2)
    from diffusionlab.data.video import moving_digits

    assert torch.equal(ds.data, moving_digits(num=4, frames=3, seed=2).data)


# ---- video output -------------------------------------------------------------------------------------------------
def test_video_io_roundtrips(tmp_path):
    import imageio.v3 as iio

    from diffusionlab.video_io import frame_grid, load_npz, mp4_available, save_videos, tile_frames

    v = torch.rand(3, 1, 4, 5, 6)
    save_videos(v, tmp_path / "v.npz")
    assert np.array_equal(load_npz(tmp_path / "v.npz"), v.numpy())
    save_videos(v, tmp_path / "new_dir" / "v.png")  # the parent directory is created
    save_videos(v, tmp_path / "v.png")
    png = iio.imread(tmp_path / "v.png")
    scale, pad = 4, 1
    assert png.shape == ((3 * (5 + pad) + pad) * scale, (4 * (6 + pad) + pad) * scale)
    g = frame_grid(v, scale=1)  # video 2 (row 2), frame 3 (column 3)
    block = g[1 + 2 * 6: 1 + 2 * 6 + 5, 1 + 3 * 7: 1 + 3 * 7 + 6]
    np.testing.assert_array_equal(block, (v[2, 0, 3].numpy() * 255 + 0.5).astype(np.uint8))
    save_videos(v, tmp_path / "v.gif", scale=1)
    gif = np.asarray(iio.imread(tmp_path / "v.gif", index=None))
    assert gif.shape[0] == 4
    # grey frames come back as (palette) RGB images; each is the tiled grid of that frame
    first = gif[1][..., 0] if gif.ndim == 4 else gif[1]
    assert np.abs(first.astype(int) - tile_frames(v, scale=1)[1].astype(int)).max() <= 1
    if mp4_available():
        save_videos(v, tmp_path / "v.mp4")
        assert (tmp_path / "v.mp4").stat().st_size > 0
    else:
        with pytest.raises(DiffusionLabError, match=r"imageio\[ffmpeg\]"):
            save_videos(v, tmp_path / "v.mp4")
        assert not (tmp_path / "v.mp4").exists()
    with pytest.raises(DiffusionLabError, match="must end in"):
        save_videos(v, tmp_path / "v.avi")
    with pytest.raises(DiffusionLabError, match=r"\(N, C, F, H, W\)"):
        save_videos(torch.rand(2, 2, 3, 4, 4), tmp_path / "w.npz")


# ---- metrics -------------------------------------------------------------------------------------------------------
def test_lag_correlations_and_differences_on_known_videos():
    from diffusionlab.metrics.video import consecutive_difference, lag_correlations

    g = torch.Generator().manual_seed(0)
    cov = Progressive(1.0, 6, axis=2)  # rho = 0.707 between consecutive frames, pixels independent
    x = cov.sample((200, 1, 6, 32, 32), generator=g, dtype=F64)
    rho = 1 / math.sqrt(2)
    # each video's correlation is over 1024 pixels (sd ~ (1 - rho^2)/32 = 0.016), averaged over >= 600 pairs
    torch.testing.assert_close(lag_correlations(x, 3), torch.tensor([rho, rho**2, rho**3], dtype=F64), rtol=0,
                               atol=0.01)
    ramp = torch.arange(5, dtype=F64).reshape(1, 1, 5, 1, 1).expand(2, 1, 5, 3, 3) / 10
    assert consecutive_difference(ramp) == pytest.approx(0.1)
    with pytest.raises(DiffusionLabError, match="max_lag"):
        lag_correlations(x, 6)


def test_digit_crop_finds_the_digit():
    from diffusionlab.metrics.video import digit_crops

    glyph = torch.rand(8, 8) * 0.5 + 0.5
    frames = torch.zeros(3, 1, 16, 16)
    for k, (r, c) in enumerate([(0, 0), (5, 3), (8, 8)]):
        frames[k, 0, r:r + 8, c:c + 8] = glyph
    crops = digit_crops(frames)
    assert crops.shape == (3, 1, 8, 8) and torch.equal(crops[:, 0], glyph.expand(3, 8, 8))
    with pytest.raises(DiffusionLabError, match="at least 8x8"):
        digit_crops(torch.zeros(1, 1, 6, 6))


def test_digit_consistency_real_vs_shuffled():
    """Real moving digits: the classifier (0.973 held-out accuracy) keeps one digit through >= 95 % of the
    frames (measured 0.997 on 500 videos); frames shuffled across videos: consistency < 0.6 (measured 0.30)."""
    from diffusionlab.data.video import moving_digits
    from diffusionlab.metrics.video import digit_consistency

    ds = moving_digits(num=100, frames=6, size=16, split="test", seed=1)
    x = ds.to_display(ds.data)
    real = digit_consistency(x, ds.labels)
    assert real["consistency"] > 0.95 and real["accuracy"] > 0.9
    perm = torch.stack([torch.randperm(100, generator=torch.Generator().manual_seed(f)) for f in range(6)], 1)
    shuffled = x[perm, :, torch.arange(6)[None, :]].permute(0, 2, 1, 3, 4)
    assert digit_consistency(shuffled)["consistency"] < 0.6


def test_dequantization_conventions():
    """Both conventions score a density uniform on the union of their cells at exactly log2(levels) bits per
    dimension, and keep each point in its own level's cell: the package's cells [2k/L - 1, 2(k+1)/L - 1) and
    the centred cells of half-width 1/(L - 1)."""
    from diffusionlab.likelihood.bpd import bpd_from_model_space_nll, dequantize

    for levels in (2, 17, 256):
        h = 1.0 / (levels - 1)
        assert bpd_from_model_space_nll(10 * math.log(2.0), 10, levels) == pytest.approx(math.log2(levels))
        assert bpd_from_model_space_nll(10 * math.log(2 + 2 * h), 10, levels, "centred") == pytest.approx(
            math.log2(levels))
    x = torch.linspace(-1, 1, 17).repeat(100).to(F64)
    k = torch.round((x + 1) * 8)
    cells = dequantize(x, torch.Generator().manual_seed(0), 17)
    assert torch.equal(torch.floor((cells + 1) * 17 / 2), k)
    centred = dequantize(x, torch.Generator().manual_seed(0), 17, "centred")
    assert (centred - x).abs().max() <= 1 / 16 and (centred - x).abs().max() > 0.9 / 16
    assert torch.equal(torch.round((centred + 1) * 8), k)


def test_elbo_bpd_matches_closed_form_on_gaussian_video():
    """``elbo_bpd`` (dequantize, full_vlb, convert) against the closed-form ELBO at the same dequantized points:
    within 4 standard errors of the mean over 200 videos (se ~ 0.02 bits; the 17-level offset is 3.09 bits).
    The Gaussian videos are first put on the 17-level grid (clamped and rounded), as the metric requires."""
    from diffusionlab.likelihood.bpd import bpd_from_model_space_nll, dequantize
    from diffusionlab.metrics.video import elbo_bpd

    orc = oracle(VPChain(linear_betas(50, 1e-3, 0.3), cov=COVS["mixed"]()))
    x = orc.sample_data(200, generator=torch.Generator().manual_seed(2))
    x = torch.round((x.clamp(-1, 1) + 1) * 8) / 8 - 1
    res = elbo_bpd(orc, x, levels=17, batch=200, t_chunk=50, generator=torch.Generator().manual_seed(11))
    xd = dequantize(x, torch.Generator().manual_seed(11), 17)
    exact = bpd_from_model_space_nll(-orc.elbo_closed_form(xd), 16, 17)
    assert abs(res["bpd"] - exact.mean().item()) < 4 * res["stderr"]
    assert res["num"] == 200 and res["dim"] == 16 and res["convention"] == "cells"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sde_view_is_the_chain_model_at_matched_times(schedule):
    """At the SDE time with the chain step's log-SNR, the SDE view predicts exactly what the chain model does
    (same net input, conditioning and coefficients), whatever the chain's schedule."""
    from diffusionlab.metrics.video import sde_view
    from diffusionlab.schedules import cosine_betas

    torch.manual_seed(0)
    net = _FrameNet().double()
    betas = linear_betas(100, 1e-3, 0.2) if schedule == "linear" else cosine_betas(100)
    chain_model = DiffusionModel(net, VPChain(betas, cov=Mixed(1.0, 5, axis=2)))
    sde_model = sde_view(chain_model)
    assert sde_model.net is net and sde_model.process.cov is chain_model.process.cov
    i = torch.tensor([1, 2, 37, 99])
    t = sde_model.time_of_step(i)
    torch.testing.assert_close(sde_model.c_noise(t), chain_model.c_noise(i), rtol=1e-5, atol=1e-4)
    x = torch.randn(4, 1, 5, 3, 3, dtype=F64)
    a, b = sde_model.predict(x, t), chain_model.predict(x, i)
    torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-9, atol=0)
    torch.testing.assert_close(a.eps, b.eps, rtol=1e-5, atol=1e-6)
    with pytest.raises(DiffusionLabError, match=r"variance-preserving \(VP\) chain"):
        sde_view(DiffusionModel(net, VPSDE()))


# ---- the packaged config ------------------------------------------------------------------------------------------
def test_video_config_validates():
    from diffusionlab.training.config import load_config
    from diffusionlab.commands import packaged_config

    cfg = load_config(packaged_config("video"))
    assert cfg["data"]["name"] == "moving_digits" and cfg["model"]["name"] == "video_unet"
    frames = load_config(packaged_config("video_frames"))
    assert frames["data"]["name"] == "moving_digit_frames" and frames["model"]["name"] == "unet"
    # the image model starts the video model (--init-from): the same process, the noise's covariance apart
    from diffusionlab.training.init import FREE_PROCESS_OPTIONS

    same = {k: v for k, v in cfg["process"].items() if k not in FREE_PROCESS_OPTIONS}
    assert same == {k: v for k, v in frames["process"].items() if k not in FREE_PROCESS_OPTIONS}
    assert same["snr_shift"] == 0.5
