"""Networks: the ``net(x, c_noise)`` contract (shapes, out_mult), conditioning, gradients, determinism, config errors.

Every network zero-initialises its output layer (and the last layer of each residual branch), so several tests
first perturb those zeros (``_perturb``) to make the conditioning visible.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.models import (
    DIGITS_UNET,
    MLP,
    SinusoidalEmbedding,
    UNet,
    build_network,
    count_parameters,
    default_network_config,
)

TINY_UNET = {"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "groups": 4}




def _perturb(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every all-zero parameter (the zero-initialised layers) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _c(b: int) -> torch.Tensor:
    return torch.rand(b) * 1000


# ---- embedding --------------------------------------------------------------------------------------------
def test_sinusoidal_embedding_matches_formula():
    emb = SinusoidalEmbedding(6, max_period=100.0)
    c = torch.tensor([0.0, 3.0, 999.0])
    freqs = torch.tensor([100.0 ** (-i / 3) for i in range(3)], dtype=torch.float64)
    c64 = c.double()[:, None] * freqs
    want = torch.cat([torch.cos(c64), torch.sin(c64)], dim=1).float()
    # float32 arguments up to 999 carry an absolute rounding error of ~1e-4 (999 * 2**-24 per operation)
    assert torch.allclose(emb(c), want, atol=5e-4)
    assert torch.allclose(emb(c[:2]), want[:2], atol=1e-6)
    assert SinusoidalEmbedding(7)(c).shape == (3, 7) and SinusoidalEmbedding(7)(c)[:, -1].eq(0).all()
    with pytest.raises(DiffusionLabError):
        SinusoidalEmbedding(1)


# ---- shapes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_mult", [1, 2])
@pytest.mark.parametrize(
    "cfg, shape",
    [
        ({"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8}, (2,)),
        ({"name": "mlp", "hidden": 16, "depth": 1, "emb_dim": 8}, (1, 8, 8)),  # flattened images
        ({**TINY_UNET, "attn_resolutions": [4]}, (1, 8, 8)),  # digits: 8 -> 4
        ({**TINY_UNET, "channel_mults": [1, 2, 2]}, (1, 28, 28)),  # MNIST: 28 -> 14 -> 7
        ({**TINY_UNET, "channel_mults": [1, 2, 2], "attn_resolutions": [16], "num_heads": 2}, (3, 32, 32)),
        ({**TINY_UNET, "scale_shift": False, "dropout": 0.1, "conv_resample": False}, (3, 8, 8)),
        (TINY_UNET, (2, 3, 8, 8)),  # videos (C, F, H, W): frames folded into channels
    ],
)
def test_output_shape(cfg, shape, out_mult):
    net = _perturb(build_network(cfg, shape, out_mult=out_mult))
    x = torch.randn(3, *shape)
    y = net(x, _c(3))
    assert y.shape == (3, out_mult * shape[0], *shape[1:])
    assert torch.isfinite(y).all()


def test_zero_init_output_and_block_layout():
    """Untrained output is exactly zero; with out_mult=2 the first block of channels is the out_mult=1 head."""
    x = torch.randn(4, 3, 8, 8)
    net = build_network(TINY_UNET, (3, 8, 8), out_mult=2)
    assert torch.equal(net(x, _c(4)), torch.zeros(4, 6, 8, 8))
    # the layout convention of the reshaping wrappers: out.chunk(out_mult, dim=1)[k] is head k for every sample
    torch.manual_seed(0)
    vid = _perturb(build_network(TINY_UNET, (2, 3, 8, 8), out_mult=2))
    v, c = torch.randn(2, 2, 3, 8, 8), _c(2)
    inner = vid.inner(v.reshape(2, 6, 8, 8), c)  # (B, 2 * 6, 8, 8): head-major, then (C, F)
    heads = vid(v, c).chunk(2, dim=1)  # the wrapper runs inner on this very reshape: equal bit for bit
    assert torch.equal(heads[1], inner[:, 6:].reshape(2, 2, 3, 8, 8))


# ---- conditioning, gradients, determinism ----------------------------------------------------------------
@pytest.mark.parametrize("cfg, shape", [({"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8}, (2,)),
                                        (TINY_UNET, (1, 8, 8))])
def test_c_noise_changes_output(cfg, shape):
    net = _perturb(build_network(cfg, shape))
    x = torch.randn(4, *shape)
    y0, y1 = net(x, torch.full((4,), 10.0)), net(x, torch.full((4,), 900.0))
    assert (y0 - y1).abs().max() > 1e-3 * y0.abs().max()
    # each sample only sees its own c_noise: changing sample 0's level leaves the others unchanged
    c = torch.full((4,), 10.0)
    c[0] = 900.0
    y2 = net(x, c)
    assert torch.allclose(y2[1:], y0[1:], atol=1e-5) and not torch.allclose(y2[0], y0[0], atol=1e-4)
    assert torch.allclose(net(x, torch.tensor(10.0)), y0)  # a scalar c_noise is broadcast to the batch


@pytest.mark.parametrize("cfg, shape", [({"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8}, (2,)),
                                        ({**TINY_UNET, "attn_resolutions": [4, 8]}, (1, 8, 8))])
def test_gradients_reach_every_parameter(cfg, shape):
    net = build_network(cfg, shape)
    x = torch.randn(4, *shape)
    # at initialisation only the zero-init output layer has a gradient (everything behind it is multiplied by 0)
    target = torch.randn(4, *shape)
    (net(x, _c(4)) - target).square().sum().backward()
    out_layer = net.out if hasattr(net, "out") else net.inner.out
    assert out_layer.weight.grad.abs().sum() > 0
    net.zero_grad()
    _perturb(net)
    (net(x, _c(4)) - target).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_determinism_under_manual_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = _perturb(build_network({**TINY_UNET, "attn_resolutions": [4]}, (1, 8, 8)))
        x = torch.randn(2, 1, 8, 8)
        outs.append((net(x, _c(2)), [p.clone() for p in net.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_channels_last_input_matches_contiguous():
    net = _perturb(build_network({**TINY_UNET, "attn_resolutions": [4]}, (3, 8, 8)))
    x, c = torch.randn(2, 3, 8, 8), _c(2)
    y = net(x, c)
    y_cl = net(x.contiguous(memory_format=torch.channels_last), c)
    net_cl = net.to(memory_format=torch.channels_last)
    y_both = net_cl(x.contiguous(memory_format=torch.channels_last), c)
    assert torch.allclose(y, y_cl, atol=1e-5) and torch.allclose(y, y_both, atol=1e-5)


def test_device_argument():
    net = build_network(TINY_UNET, (1, 8, 8), device="cpu")
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert net.time.sinusoid.freqs.device.type == "cpu"  # the sinusoid frequencies move with the module


# ---- configs and errors -----------------------------------------------------------------------------------
def test_group_norm_cap_and_parameter_count():
    net = UNet(in_channels=1, base_channels=12, channel_mults=(1,), num_res_blocks=1, groups=8, image_size=8)
    assert net.out_norm.num_groups == 6  # the largest count <= 8 dividing 12
    lin = MLP(2, hidden=4, depth=1, emb_dim=2)
    # time: (2*2+2) + (2*2+2); inp: 2*4+4; block: LN 8, fc1 20, emb 2*4+4, fc2 20; out LN 8, out 4*2+2
    assert count_parameters(lin) == 6 + 6 + 12 + 8 + 20 + 12 + 20 + 8 + 10
    assert count_parameters(lin, trainable_only=True) == count_parameters(lin)


def test_bench_helper_runs():
    from diffusionlab.models.bench import time_training_step

    r = time_training_step(TINY_UNET, (1, 8, 8), batch=4, steps=2, warmup=1)
    assert r["params"] == count_parameters(build_network(TINY_UNET, (1, 8, 8))) and r["wall_ms_min"] > 0


def test_default_configs_build():
    for shape in [(2,), (1, 8, 8), (1, 28, 28), (3, 32, 32)]:
        cfg = default_network_config(shape)
        assert cfg["name"] == ("mlp" if len(shape) == 1 else "unet")
    assert default_network_config((1, 8, 8)) == DIGITS_UNET
    assert default_network_config((1, 28, 28))["channel_mults"] == [1, 2, 2]
    net = build_network(DIGITS_UNET, (1, 8, 8))
    assert net(torch.randn(2, 1, 8, 8), _c(2)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "cfg, shape, match",
    [
        ({"name": "cnn"}, (1, 8, 8), "mlp, unet"),
        ({"hidden": 3}, (2,), "name"),
        ({"name": "mlp", "width": 3}, (2,), "allowed: hidden, depth, emb_dim"),
        ({"name": "unet", "in_channels": 1}, (1, 8, 8), "in_channels"),
        ({"name": "mlp", "dim": 2}, (2,), "dim"),
        ({**TINY_UNET, "channel_mults": [1, 2, 2, 2]}, (1, 28, 28), "28 is not divisible by 2\\*\\*\\(levels-1\\) = 8"),
        ({**TINY_UNET, "attn_resolutions": [16]}, (1, 8, 8), "attn_resolutions.*allowed: \\[8, 4\\]"),
        ({**TINY_UNET, "num_heads": 3}, (1, 8, 8), "num_heads 3"),
        ({**TINY_UNET, "dropout": 1.0}, (1, 8, 8), "dropout"),
        ({**TINY_UNET, "base_channels": 0}, (1, 8, 8), "base_channels"),
        ({**TINY_UNET, "channel_mults": []}, (1, 8, 8), "channel_mults"),
        (TINY_UNET, (2,), "use name: mlp"),
        ({"name": "mlp", "depth": 0}, (2,), "depth"),
        ({**TINY_UNET, "conv_resample": "yes"}, (1, 8, 8), "conv_resample"),
        ("unet", (1, 8, 8), "mapping"),
        (TINY_UNET, (0, 8, 8), "sample_shape"),
    ],
)
def test_bad_configs(cfg, shape, match):
    with pytest.raises(DiffusionLabError, match=match):
        build_network(cfg, shape)


def test_bad_inputs():
    net = build_network(TINY_UNET, (1, 8, 8))
    with pytest.raises(DiffusionLabError, match="c_noise"):
        net(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(DiffusionLabError, match=r"\(B, 1, 8, 8\)"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(DiffusionLabError, match="out_mult"):
        build_network(TINY_UNET, (1, 8, 8), out_mult=0)
    mlp = build_network({"name": "mlp"}, (2,))
    with pytest.raises(DiffusionLabError, match=r"\(B, 2\)"):
        mlp(torch.randn(2, 3), torch.rand(2))
    with torch.no_grad():
        assert math.isfinite(float(mlp(torch.randn(2, 2), torch.rand(2)).sum()))
