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


# ---- one trajectory through every wrapper and entry point -------------------------------------------------------
class LabelledRecording(Recording):
    num_classes = 3

    def forward(self, x, c_noise, labels=None):
        return super().forward(x, c_noise)


def _recording_x0(model):
    """Record the x_0 of every evaluation of ``model`` (what the next one should be fed)."""
    seen_x0, predict = [], model.predict

    def recording_predict(*a, **k):
        p = predict(*a, **k)
        seen_x0.append(p.x0.detach().clone())
        return p

    model.predict = recording_predict
    return seen_x0


def test_a_direct_sampler_call_is_one_trajectory_too():
    from diffusionlab.samplers import ddim

    model, net = _model()
    seen_x0 = _recording_x0(model)
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(4))
    ddim(model, x, 4)  # the exported function, not the catalogue
    assert torch.equal(net.seen[0], torch.zeros_like(x))
    assert all(torch.equal(net.seen[k], seen_x0[k - 1]) for k in range(1, 4))
    assert model._carry is None


def test_guidance_switched_by_its_interval_keeps_the_estimate_row_for_row():
    """Inside the interval the net sees the doubled batch (conditional, unconditional), outside it the batch: the
    estimate is repeated into the doubled batch and cut back to its conditional half, never reset to zeros."""
    from diffusionlab.conditioning import condition_on_class

    net = LabelledRecording(2)
    model = DiffusionModel(net, make_process("vp", T=20), prediction="v", self_condition=True)
    seen_x0 = _recording_x0(model)
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(5))
    guided = condition_on_class(model, [0, 1, 2], guidance=2.0, interval=(0.3, 2.0))
    SAMPLERS["ddim"].run(guided, x, 10)
    sizes = [s.shape[0] for s in net.seen]
    assert 3 in sizes and 6 in sizes  # the interval switches the doubling off (and on: 0.3 < sigma / s <= 2)
    assert net.seen[0].abs().max() == 0
    for k in range(1, len(sizes)):
        prev, fed = seen_x0[k - 1], net.seen[k]
        want = torch.cat([prev, prev]) if fed.shape[0] == 2 * prev.shape[0] else prev[:fed.shape[0]]
        assert torch.equal(fed, want), k


def test_resampling_reorders_the_estimate_with_the_particles():
    from diffusionlab.parametrization import reorder_carried_x0, resize_carried_x0

    model, net = _model()
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(6))
    idx = torch.tensor([2, 2, 0, 3])
    reorder_carried_x0(model, idx)  # outside a trajectory: nothing to do
    with model.carry_x0():
        p = model.predict(x, 10)
        reorder_carried_x0(model, idx)
        model.predict(x, 9)
        assert torch.equal(net.seen[-1], p.x0[idx])
    with model.carry_x0():  # a guided model's doubled batch: each half reordered alike
        q = model.predict(torch.cat([x, x * 0.5]), 10)
        reorder_carried_x0(model, idx)
        assert torch.equal(model._carry[0], torch.cat([q.x0[:4][idx], q.x0[4:][idx]]))
        resize_carried_x0(model, 4)
        assert torch.equal(model._carry[0], q.x0[:4][idx])
        with pytest.raises(DiffusionLabError, match="neither its doubled nor its halved"):
            resize_carried_x0(model, 3)


def test_smc_runs_a_self_conditioned_model_with_the_estimate_fed():
    from diffusionlab.conditioning import get_method

    model, net = _model((1, 4))
    known = torch.zeros(2, 1, 4)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 4)
    out = get_method("smc").run(model, known, mask, 6, noise=torch.Generator().manual_seed(7), particles=4, ess=1.0,
                                twist=0.0)
    assert out.shape == (2, 1, 4) and torch.isfinite(out).all()
    assert all(s.abs().sum() > 0 for s in net.seen[1:])  # every evaluation after the first is fed an estimate


def test_smc_resampling_feeds_each_particle_its_ancestor_estimate(monkeypatch):
    """With the ancestors fixed (each row's particles reversed) every evaluation after a resampling step is fed
    the previous estimates reordered by the ancestors, not in the old order."""
    import diffusionlab.conditioning.methods as methods
    from diffusionlab.conditioning import get_method

    b, p = 2, 4
    monkeypatch.setattr(methods, "_systematic", lambda logw, gen: torch.arange(p - 1, -1, -1).expand(b, p))
    flat = (torch.arange(p - 1, -1, -1)[None] + p * torch.arange(b)[:, None]).reshape(-1)
    class Mixing(Recording):  # the known part's prediction depends on the unknown part: unequal weights
        def forward(self, x, c_noise):
            return super().forward(x, c_noise) + 0.3 * x[:, :self.c].mean(-1, keepdim=True)

    net = Mixing(1)
    model = DiffusionModel(net, make_process("vp", T=20), prediction="v", self_condition=True)
    seen_x0 = _recording_x0(model)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 4)
    get_method("smc").run(model, torch.zeros(b, 1, 4), mask, 6, noise=torch.Generator().manual_seed(9),
                          particles=p, ess=1.0, twist=0.0)
    reordered = 0
    for k in range(1, len(net.seen)):
        prev, fed = seen_x0[k - 1], net.seen[k]
        assert torch.equal(fed, prev) or torch.equal(fed, prev[flat]), k  # not resampled, or resampled
        reordered += torch.equal(fed, prev[flat]) and not torch.equal(fed, prev)
    assert reordered > 0


def test_each_window_of_a_long_video_is_one_trajectory():
    from diffusionlab.samplers.extend import extend_videos

    model, net = _model((1, 4, 2, 2))
    seen_x0 = _recording_x0(model)
    out = extend_videos(model, 2, 6, 4, overlap=2, grid=5, shape=(1, 4, 2, 2),
                        generator=torch.Generator().manual_seed(8))
    assert out.shape == (2, 1, 6, 2, 2) and len(net.seen) == 10  # two windows of 5 evaluations
    for k in range(10):
        want = torch.zeros_like(net.seen[k]) if k % 5 == 0 else seen_x0[k - 1]  # each window starts afresh
        assert torch.equal(net.seen[k], want), k


def test_self_conditioned_accumulation_and_ranks_take_the_global_batch_rows():
    """The rows fed the estimate are the global batch's first half, sliced like t and the noise: accumulate 2
    gives the plain step's loss to rounding, while the first half of each micro-batch would change it."""
    from diffusionlab.parametrization import self_condition_rows
    from diffusionlab.training.trainer import build_parts, train_step
    from rounding import sum_rtol

    a, b = build_parts(resolve(SC)), build_parts(resolve(SC, ["train.accumulate=2"]))
    for step in range(4):  # away from the zero-initialised output layer
        train_step(a, step)
    b.model.load_state_dict(a.model.state_dict())
    state = a.generators["noise"].get_state()
    b.generators["noise"].set_state(state)
    la, lb = train_step(a, 4), train_step(b, 4)
    tol = sum_rtol(16, torch.float32)
    torch.testing.assert_close(lb[0], la[0], rtol=tol, atol=0)
    rows = self_condition_rows(16)
    assert rows.sum() == 8 and rows[:8].all()
    # the alternative, each micro-batch's own first half, is another loss by far more than rounding
    from diffusionlab.training.trainer import draw_inputs
    b.model.load_state_dict(a.model.state_dict())
    b.generators["noise"].set_state(state)
    x0 = b.batches.get(4)
    t, noise = draw_inputs(b.objective, b.process, x0, b.generators["noise"])
    with torch.no_grad():
        b.model.train()
        wrong = torch.stack([b.step_module(x0[s], t[s], noise[s], self_cond_rows=self_condition_rows(8)).mean()
                             for s in (slice(0, 8), slice(8, 16))]).mean()
    assert abs(float(wrong) - float(la[0])) > 100 * tol * float(la[0])


def test_distillation_and_diffusers_export_refuse_self_conditioned_models():
    from diffusionlab.interop.diffusers import export_blockers
    from diffusionlab.training.distill import distill_model

    cfg = {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1, "attn_resolutions": []}
    net = build_network(cfg, (1, 8, 8), self_condition=True)
    model = DiffusionModel(net, make_process("vp", T=1000), prediction="eps", self_condition=True)
    with pytest.raises(DiffusionLabError, match="does not train self-conditioned models"):
        distill_model(model, model, torch.zeros(4, 1, 8, 8), None, 1)
    bad = export_blockers({"model": cfg, "process": {"name": "vp", "T": 1000}}, model)
    assert any("self_condition" in line for line in bad)
