"""Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", sec. 3): the network is fed an x_0 estimate -- its own,
without gradient, on half of every training batch, and the previous evaluation's along a sampling trajectory."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffusionlab.errors import DiffusionLabError
from diffusionlab.models import build_network
from diffusionlab.objectives import make_objective
from diffusionlab.parametrization import DiffusionModel, carrying_x0
from diffusionlab.processes import make_process
from diffusionlab.samplers import SAMPLERS
from diffusionlab.training.config import resolve
from diffusionlab.training.trainer import train


class Recording(nn.Module):
    """``net(cat[x, cond], c_noise)``: a fixed smooth function of both halves; records every ``cond`` it is fed."""

    def __init__(self, channels: int):
        super().__init__()
        self.c = channels
        self.seen: list[torch.Tensor] = []

    def forward(self, x, c_noise):
        x_in, cond = x[:, :self.c], x[:, self.c:]
        self.seen.append(cond.detach().clone())
        return torch.tanh(x_in) * 0.5 + 0.25 * cond + 1e-4 * c_noise.reshape(-1, *([1] * (x.ndim - 1)))


def _model(shape=(2, 3)):
    net = Recording(shape[0])
    return DiffusionModel(net, make_process("vp", T=20), prediction="v", self_condition=True), net


def test_outside_a_trajectory_the_net_is_fed_zeros_and_inside_it_the_last_estimate():
    model, net = _model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, generator=g)
    model.predict(x, 10)
    assert torch.equal(net.seen[-1], torch.zeros_like(x))
    with model.carry_x0():
        p1 = model.predict(x, 10)
        assert torch.equal(net.seen[-1], torch.zeros_like(x))  # the first evaluation of a trajectory: zeros
        p2 = model.predict(x * 0.9, 9)
        assert torch.equal(net.seen[-1], p1.x0)
        model.predict(x[:2], 8)  # another batch shape: not this trajectory's estimate
        assert torch.equal(net.seen[-1], torch.zeros_like(x[:2]))
        with model.carry_x0():  # a nested trajectory starts afresh and leaves the outer one's estimate alone
            model.predict(x, 7)
            assert torch.equal(net.seen[-1], torch.zeros_like(x))
    model.predict(x, 10)
    assert torch.equal(net.seen[-1], torch.zeros_like(x))
    assert not torch.equal(p1.x0, p2.x0)


def test_the_training_estimate_is_the_model_own_x0_on_the_first_half_without_gradient():
    model, net = _model()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 2, 3, generator=g), torch.tensor([3, 7, 11, 15, 19])
    cond = model.self_condition_estimate(x, t)
    ref = model.predict(x[:2], t[:2], x0_cond=torch.zeros_like(x[:2])).x0  # the same operations on the same rows
    assert torch.equal(cond[:2], ref)
    assert torch.equal(cond[2:], torch.zeros_like(x[2:]))
    assert not cond.requires_grad
    assert model.self_condition_estimate(x[:1], t[:1]).abs().max() == 0  # a batch of one: no half to feed


def test_a_sampler_call_feeds_each_evaluation_the_estimate_before_it():
    model, net = _model()
    seen_x0 = []
    predict = model.predict

    def recording_predict(*a, **k):
        p = predict(*a, **k)
        seen_x0.append(p.x0.detach().clone())
        return p

    model.predict = recording_predict
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(2))
    SAMPLERS["ddim"].run(model, x, 6)
    assert len(net.seen) == len(seen_x0) == 6
    assert torch.equal(net.seen[0], torch.zeros_like(x))
    for k in range(1, 6):
        assert torch.equal(net.seen[k], seen_x0[k - 1])
    model.predict(x, 5)  # the call closed the trajectory
    assert torch.equal(net.seen[-1], torch.zeros_like(x))


def test_wrappers_reach_the_model_and_plain_models_need_nothing():
    model, _ = _model()
    wrapper = nn.Module()
    wrapper.inner = model
    with carrying_x0(wrapper):
        assert model._carry is not None
    assert model._carry is None
    plain = DiffusionModel(build_network({"name": "mlp", "hidden": 8, "depth": 1, "emb_dim": 4}, (2,)),
                           make_process("vp", T=20))
    with carrying_x0(plain) as m:
        assert m is plain
    with pytest.raises(DiffusionLabError, match="without self-conditioning"):
        plain(torch.zeros(2, 2), 3, x0_cond=torch.zeros(2, 2))


@pytest.mark.parametrize("cfg,shape", [
    ({"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": []},
     (1, 8, 8)),
    ({"name": "video_unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
      "attn_resolutions": [], "temporal": "both", "temporal_attention": "spacetime"}, (1, 3, 8, 8)),
])
def test_networks_take_the_estimate_as_extra_input_channels(cfg, shape):
    net = build_network(cfg, shape, out_mult=2, self_condition=True)
    with torch.no_grad():
        net.out.weight.normal_()  # the zero-initialised output would hide the estimate's effect
    x = torch.randn(2, *shape)
    cond = torch.randn(2, *shape)
    a = net(torch.cat([x, torch.zeros_like(cond)], 1), torch.full((2,), 300.0))
    b = net(torch.cat([x, cond], 1), torch.full((2,), 300.0))
    assert a.shape == (2, 2 * shape[0], *shape[1:])  # the output keeps out_mult * C channels
    assert not torch.allclose(a, b)
    with pytest.raises(DiffusionLabError, match="expects"):
        net(x, torch.full((2,), 300.0))


def test_networks_without_extra_inputs_refuse_it():
    with pytest.raises(DiffusionLabError, match="self_condition needs a network"):
        build_network({"name": "mlp"}, (2,), self_condition=True)
    with pytest.raises(DiffusionLabError, match="self_condition needs a network"):
        build_network({"name": "unet", "base_channels": 8, "channel_mults": [1]}, (1, 2, 8, 8), self_condition=True)
    with pytest.raises(DiffusionLabError, match="cond_channels"):
        build_network({"name": "unet", "cond_channels": 1}, (1, 8, 8))


def test_a_registered_network_without_cond_channels_builds_and_refuses_only_self_conditioning():
    """A third-party factory that never heard of cond_channels is not handed it (CI caught this once)."""
    from diffusionlab.models import NETWORKS

    name = "plain-mlp-for-self-condition-test"
    NETWORKS.register(name, context=("sample_shape", "out_mult"), inferred=("dim", "out_mult"))(
        lambda sample_shape, out_mult: torch.nn.Linear(sample_shape[0], out_mult * sample_shape[0]))
    try:
        assert isinstance(build_network({"name": name}, (3,), out_mult=1), torch.nn.Linear)
        with pytest.raises(DiffusionLabError, match=f"self_condition needs a network.*{name} does not"):
            build_network({"name": name}, (3,), self_condition=True)
    finally:
        NETWORKS.unregister(name)


SC = {
    "data": {"name": "digits", "split": "train"},
    "process": {"name": "vp", "T": 50},
    "model": {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1, "attn_resolutions": []},
    "parametrization": {"prediction": "v", "self_condition": True},
    "train": {"steps": 12, "batch_size": 16, "lr": 1e-3, "warmup": 2, "checkpoint_every": 4, "log_every": 4,
              "seed": 3, "device": "cpu"},
    "sample": {"sampler": "ddim", "steps": 5, "num": 4},
}


def test_self_conditioned_training_resumes_bit_for_bit_and_differs_from_plain(tmp_path):
    full, part, plain = tmp_path / "full", tmp_path / "part", tmp_path / "plain"
    train(resolve(SC), full, progress=False)
    train(resolve(SC, ["train.steps=8"]), part, progress=False)
    (part / "model.safetensors").unlink()
    train(resolve(SC, []), part, resume=True, progress=False)
    a, b = load_file(str(full / "model_raw.safetensors")), load_file(str(part / "model_raw.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["net.inp.weight"].shape[1] == 2  # the image and its estimate
    train(resolve(SC, ["parametrization.self_condition=false"]), plain, progress=False)
    assert load_file(str(plain / "model_raw.safetensors"))["net.inp.weight"].shape[1] == 1


def test_objectives_that_cannot_feed_the_estimate_are_refused(tmp_path):
    with pytest.raises(DiffusionLabError, match="self_condition trains with objective simple or edm"):
        train(resolve(SC, ["objective.name=vlb"]), tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "model.safetensors").exists()
    for name in ("simple", "edm"):
        assert make_objective({"name": name}, make_process("vp", T=50)).self_conditioning
