"""DiffusionModel: conversions between eps / x0 / v / score, conditioning, t broadcasting, nfe, learned variance."""

import math

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.noise import Identity, Mixed, Progressive
from diffusionlab.parametrization import (
    PREDICTIONS,
    DiffusionModel,
    get_parametrization,
    learned_log_variance,
    reverse_variances,
)
from diffusionlab.processes import VEChain, VESDE, VPChain, VPSDE
from diffusionlab.schedules import geometric_sigmas, linear_betas
from nets import ChannelNet as _ChannelNet

F64 = torch.float64




def ChannelNet(channels, out_mult=1, dtype=F64, seed=0):
    """The shared tiny net (tests/nets.py), recording its inputs."""
    return _ChannelNet(channels, out_mult, dtype, seed, record=True)


SHAPES = [(5, 3), (4, 2, 3, 3), (3, 2, 4, 3, 3)]  # points, images, videos (B, C, F, H, W)


def _chain():
    return VPChain(linear_betas(50, 1e-3, 0.3))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_decode_is_consistent_and_inverts_encode(shape, prediction):
    """Decoded (eps, x0) always satisfy x_t = s x0 + sigma eps; encode(decode(out)) = out; any rank."""
    g = torch.Generator().manual_seed(1)
    x_t, out = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    s = (0.2 + torch.rand(shape[0], generator=g, dtype=F64)).reshape(-1, *([1] * (len(shape) - 1)))
    sigma = (0.1 + 3 * torch.rand(shape[0], generator=g, dtype=F64)).reshape(s.shape)
    param = get_parametrization(prediction)
    eps, x0 = param.decode(out, x_t, s, sigma)
    torch.testing.assert_close(s * x0 + sigma * eps, x_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(param.target(eps, x0, s, sigma), out, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_x0_error_scale_and_min_snr_weight_follow_from_the_decoding(prediction):
    """x_theta - x_0 = -c (d_theta - d) with c^2 = error_scale2 (checked by decoding a perturbed output), and the
    Min-SNR weight is min(SNR, gamma) c^2 (Hang et al. 2023): the x0-error weight written for this output."""
    param = get_parametrization(prediction)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(7, 3, generator=g, dtype=F64), torch.randn(7, 3, generator=g, dtype=F64)
    s = (0.05 + torch.rand(7, 1, generator=g, dtype=F64))
    sigma = (0.05 + 2 * torch.rand(7, 1, generator=g, dtype=F64))
    x_t = s * x0 + sigma * eps
    d = param.target(eps, x0, s, sigma)
    delta = 1e-3 * torch.randn(7, 3, generator=g, dtype=F64)
    eps_h, x0_h = param.decode(d + delta, x_t, s, sigma)
    c2 = param.error_scale2(s, sigma)
    torch.testing.assert_close((x0_h - x0) ** 2, c2 * delta**2, rtol=1e-8, atol=1e-14)
    snr = (s / sigma).reshape(-1) ** 2
    torch.testing.assert_close(param.min_snr_weight(snr, 5.0), snr.clamp(max=5.0) * c2.reshape(-1), rtol=1e-12,
                               atol=0)
    with pytest.raises(DiffusionLabError, match="unknown prediction 'noise'"):
        get_parametrization("noise")


def test_v_is_salimans_ho_on_vp_and_score_is_sigma_c_score():
    chain = _chain()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    t = torch.tensor([1, 5, 10, 20, 40, 50])
    ab = chain.alpha_bar[t][:, None]
    model = DiffusionModel(ChannelNet(4), chain, prediction="v")
    v = model.target(x0, eps, t)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=1e-12, atol=1e-12)
    # score parametrization: target -eps = sigma * C grad log q(x_t | x_0) with C = I
    model = DiffusionModel(ChannelNet(4), chain, prediction="score")
    sigma = (1 - ab).sqrt()
    torch.testing.assert_close(model.target(x0, eps, t), sigma * (-eps / sigma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("process", [_chain(), VEChain(geometric_sigmas(20, 0.01, 50.0)), VPSDE(), VESDE()])
def test_conditioning_c_noise_and_input_scaling(process):
    """The net sees c_in x_t with c_in = 1/sqrt(s^2 + sigma^2), and c_noise = 1000 t / T as a float."""
    net = ChannelNet(3)
    model = DiffusionModel(net, process)
    x = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([1, 2, 7, 20]) if hasattr(process, "post_A") else torch.tensor([0.01, 0.3, 0.5, 1.0], dtype=F64)
    model(x, t)
    x_in, c = net.seen[-1]
    s, sigma = process.coeffs(t)
    torch.testing.assert_close(x_in, x / (s**2 + sigma**2).sqrt()[:, None], rtol=1e-12, atol=0)
    assert c.dtype == F64 and c.is_floating_point()
    torch.testing.assert_close(c, 1000.0 * t.to(F64) / process.T, rtol=1e-12, atol=0)
    DiffusionModel(net, process, scale_input=False)(x, t)
    assert torch.equal(net.seen[-1][0], x)


def test_t_may_be_int_0d_or_batch_and_bad_shapes_raise():
    model = DiffusionModel(ChannelNet(3), _chain())
    x = torch.randn(4, 3, dtype=F64)
    a = model.eps(x, 7)
    b = model.eps(x, torch.tensor(7))
    c = model.eps(x, torch.full((4,), 7))
    assert torch.equal(a, b) and torch.equal(a, c)  # every form becomes the same (B,) batch before any arithmetic
    with pytest.raises(DiffusionLabError, match="time t"):
        model.eps(x, torch.full((3,), 7))
    with pytest.raises(DiffusionLabError, match="out of range"):
        model.eps(x, 51)
    with pytest.raises(DiffusionLabError, match="unknown prediction 'noise'"):
        DiffusionModel(ChannelNet(3), _chain(), prediction="noise")


def test_nfe_counts_each_network_evaluation():
    model = DiffusionModel(ChannelNet(3), _chain())
    x = torch.randn(2, 3, dtype=F64)
    model(x, 3)
    model.predict(x, 3)
    model.eps(x, 3)
    model.x0(x, 3)
    model.score(x, 3)
    model.c_score(x, 3)
    assert model.nfe == 6


@pytest.mark.parametrize("cov", [Identity(), Progressive(1.0, 4, axis=2), Mixed(0.7, 4, axis=2)])
def test_score_and_c_score(cov):
    """score = -C^{-1} eps / sigma (checked with the dense C), c_score = -eps / sigma = C score."""
    chain = VPChain(linear_betas(50, 1e-3, 0.3), cov=cov)
    model = DiffusionModel(ChannelNet(3), chain)
    x = torch.randn(2, 3, 4, 5, dtype=F64)  # (B, C, F, W): frames on axis 2
    t = torch.tensor([3, 40])
    eps, sigma = model.eps(x, t), chain.sigma[t].reshape(2, 1, 1, 1)
    C = cov.matrix(4)
    score = model.score(x, t)
    dense = -torch.einsum("fg,bcgw->bcfw", torch.linalg.inv(C), eps) / sigma
    torch.testing.assert_close(score, dense, rtol=1e-10, atol=1e-10)
    c_score = model.c_score(x, t)
    torch.testing.assert_close(c_score, -eps / sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.einsum("fg,bcgw->bcfw", C, score), c_score, rtol=1e-10, atol=1e-10)


def test_learned_variance_split_and_interpolation():
    chain = _chain()
    net = ChannelNet(3, out_mult=2)
    model = DiffusionModel(net, chain, learn_variance=True)
    assert model.out_mult == 2
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    p = model.predict(x, 9)
    raw = model(x, 9)
    assert torch.equal(p.out, raw[:, :3]) and torch.equal(p.v_var, raw[:, 3:])
    assert p.eps.shape == x.shape
    # Nichol & Dhariwal eq. 15 endpoints: v = 1 -> log beta, v = -1 -> log beta-tilde
    lb, lbt = math.log(0.02), math.log(0.01)
    assert learned_log_variance(torch.tensor(1.0, dtype=F64), lb, lbt).item() == pytest.approx(lb, abs=1e-15)
    assert learned_log_variance(torch.tensor(-1.0, dtype=F64), lb, lbt).item() == pytest.approx(lbt, abs=1e-15)
    mid = learned_log_variance(torch.tensor(0.0, dtype=F64), lb, lbt).item()
    assert mid == pytest.approx(0.5 * (lb + lbt), abs=1e-15)
    odd = DiffusionModel(ChannelNet(3), chain, learn_variance=True)
    with pytest.raises(DiffusionLabError, match="even number of channels"):
        odd.predict(torch.randn(2, 3, dtype=F64), 1)


def test_reverse_variances_clip_beta_tilde_1():
    chain = _chain()
    upper, lower = reverse_variances(chain.b**2, chain.post_var)
    assert chain.post_var[1] == 0
    torch.testing.assert_close(upper[1:], chain.beta[1:], rtol=1e-12, atol=0)
    assert lower[1] == chain.beta_tilde[2] and torch.equal(lower[2:], chain.beta_tilde[2:])
