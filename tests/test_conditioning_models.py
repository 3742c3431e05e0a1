"""Class-conditional networks, labels through the model interface and the objectives, label dropout in training."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusionlab.errors import DiffusionLabError
from diffusionlab.models import build_network
from diffusionlab.objectives import make_objective
from diffusionlab.parametrization import DiffusionModel
from diffusionlab.processes import make_process
from diffusionlab.training.config import resolve
from diffusionlab.training.labels import batch_labels
from diffusionlab.training.trainer import train

NETS = [
    ({"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8}, (3,)),
    ({"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8}, (3, 2)),
    ({"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": []},
     (1, 8, 8)),
    ({"name": "video_unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
      "attn_resolutions": []}, (1, 3, 8, 8)),
]


def _randomise(net):
    """Non-zero weights everywhere (the zero-initialised output layers would hide any dependence on the labels)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("cfg,shape", NETS)
def test_labels_change_the_output_and_none_is_the_no_label_index(cfg, shape):
    net = _randomise(build_network({**cfg, "num_classes": 4}, shape))
    x, c = torch.randn(5, *shape), torch.rand(5) * 1000
    a = net(x, c, torch.tensor([0, 1, 2, 3, 0]))
    b = net(x, c, torch.tensor([1, 1, 2, 3, 0]))
    assert a.shape == x.shape
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])  # rows are independent
    assert torch.equal(net(x, c), net(x, c, torch.full((5,), 4)))  # None = index num_classes = "no label"
    assert torch.equal(net(x, c, 2), net(x, c, torch.full((5,), 2)))
    with pytest.raises(DiffusionLabError, match="labels must lie in 0..4"):
        net(x, c, torch.tensor([0, 1, 2, 3, 5]))
    with pytest.raises(DiffusionLabError, match="integers"):
        net(x, c, torch.zeros(5))


@pytest.mark.parametrize("cfg,shape", NETS)
def test_unconditional_net_refuses_labels_and_keeps_its_initial_weights(cfg, shape):
    torch.manual_seed(0)
    plain = build_network(cfg, shape)
    torch.manual_seed(0)
    cond = build_network({**cfg, "num_classes": 3}, shape)
    ps, cs = plain.state_dict(), cond.state_dict()
    assert set(cs) - set(ps) == {k for k in cs if k.endswith("label.table.weight")} and len(cs) == len(ps) + 1
    assert all(torch.equal(ps[k], cs[k]) for k in ps)  # the label table is created last
    with pytest.raises(DiffusionLabError, match="without num_classes"):
        plain(torch.randn(2, *shape), torch.rand(2), torch.tensor([0, 1]))


def test_model_interface_passes_labels_and_refuses_them_without_classes():
    process = make_process("vp-sde")
    net = _randomise(build_network({**NETS[0][0], "num_classes": 3}, (3,)))
    model = DiffusionModel(net, process, "v")
    x, t = torch.randn(4, 3), torch.full((4,), 0.4)
    lab = torch.tensor([0, 1, 2, 0])
    p = model.predict(x, t, labels=lab)
    _, s, sigma = model.coeffs(t, x)
    # the very same operations the model runs (its input scale, multiplied in), so equality is exact on any CPU
    raw = net(x * model.parametrization.input_scale(s, sigma), model.c_noise(t), lab)
    assert torch.equal(p.out, raw) and model.num_classes == 3
    assert torch.equal(model.c_score(x, t, labels=lab), p.c_score)
    assert not torch.allclose(model.eps(x, t), p.eps)  # None: the no-label index
    assert model.nfe == 3
    plain = DiffusionModel(build_network(NETS[0][0], (3,)), process)
    assert plain.num_classes is None
    with pytest.raises(DiffusionLabError, match="no class labels"):
        plain.predict(x, t, labels=lab)


@pytest.mark.parametrize("objective", [{"name": "simple"}, {"name": "simple", "weighting": "min_snr"}, {"name": "ncsn"},
                                       {"name": "dsm"}])
def test_objectives_pass_labels_to_the_model(objective):
    process = make_process("vp-sde")
    net = _randomise(build_network({**NETS[0][0], "num_classes": 3}, (3,)))
    model = DiffusionModel(net, process)
    obj = make_objective(objective, process)
    x0, t, noise = torch.randn(6, 3), torch.full((6,), 0.3), torch.randn(6, 3)
    lab = torch.tensor([0, 1, 2, 0, 1, 2])
    with_labels = obj(model, x0, t=t, noise=noise, labels=lab)
    assert with_labels.shape == (6,)
    assert not torch.allclose(with_labels, obj(model, x0, t=t, noise=noise))
    # the same as the loss of the model with those labels bound by hand
    from diffusionlab.conditioning import LabelledModel

    bound = obj(LabelledModel(model, lab), x0, t=t, noise=noise)
    assert torch.allclose(with_labels, bound, rtol=1e-6, atol=1e-7)


def test_vlb_objectives_take_labels():
    process = make_process("vp")
    net = _randomise(build_network({**NETS[0][0], "num_classes": 3}, (3,), out_mult=2))
    model = DiffusionModel(net, process, learn_variance=True)
    x0, t, noise = torch.randn(4, 3), torch.tensor([1, 5, 500, 1000]), torch.randn(4, 3)
    lab = torch.tensor([0, 1, 2, 1])
    for cfg in ({"name": "vlb"}, {"name": "hybrid"}):
        obj = make_objective(cfg, process)
        assert not torch.allclose(obj(model, x0, t=t, noise=noise, labels=lab), obj(model, x0, t=t, noise=noise))


class _Indices:
    """The ``indices(step)`` of a batch provider (training/batches.py): step ``k`` holds ``idx[k]``."""

    def __init__(self, idx):
        self.idx = idx

    def indices(self, step):
        return self.idx[step]


def test_label_dropout_rate_and_stream():
    labels = torch.arange(10).repeat(1000)
    idx = torch.arange(10000)
    g = torch.Generator().manual_seed(0)
    out = batch_labels(labels, _Indices([idx]), 0, 0.2, 10, g, 10000, slice(0, 10000))
    frac = float((out == 10).double().mean())
    # Binomial(10000, 0.2): sd = 0.004; 5 sd
    assert abs(frac - 0.2) < 0.02
    assert torch.equal(out[out != 10], labels[out != 10])
    # a rank's slice of the global batch: the same labels and the same dropout draws as that slice of one process
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    whole = batch_labels(labels, _Indices([idx[:64]]), 0, 0.5, 10, ga, 64, slice(0, 64))
    part = batch_labels(labels, _Indices([idx[16:32]]), 0, 0.5, 10, gb, 64, slice(16, 32))
    assert torch.equal(whole[16:32], part)
    # p_uncond = 0 draws nothing from the generator
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(batch_labels(labels, _Indices([idx[:5]]), 0, 0.0, 10, g1, 5, slice(0, 5)), labels[:5])
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


COND = {
    "data": {"name": "digits", "split": "train"},
    "process": {"name": "vp", "T": 50},
    "model": {"name": "unet", "base_channels": 8, "channel_mults": [1], "num_res_blocks": 1, "attn_resolutions": [],
              "num_classes": 10},
    "train": {"steps": 16, "batch_size": 16, "lr": 1e-3, "warmup": 2, "checkpoint_every": 4, "log_every": 4,
              "seed": 5, "device": "cpu", "p_uncond": 0.3},
    "sample": {"sampler": "ddim", "steps": 5, "num": 4},
}


def test_conditional_training_resumes_bit_for_bit(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(resolve(COND), full, progress=False)
    train(resolve(COND, ["train.steps=8"]), part, progress=False)
    (part / "model.safetensors").unlink()
    train(resolve(COND), part, resume=True, progress=False)
    a, b = load_file(str(full / "model_raw.safetensors")), load_file(str(part / "model_raw.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the label dropout changes the trajectory (its draws are part of the saved noise stream)
    other = tmp_path / "other"
    train(resolve(COND, ["train.p_uncond=0.0"]), other, progress=False)
    c = load_file(str(other / "model_raw.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_refuses_labels_that_do_not_fit(tmp_path):
    with pytest.raises(DiffusionLabError, match="needs class labels"):
        train(resolve({**COND, "data": {"name": "ring", "num": 100},
                       "model": {"name": "mlp", "hidden": 8, "depth": 1, "emb_dim": 4, "num_classes": 2}}),
              tmp_path / "a", progress=False)
    with pytest.raises(DiffusionLabError, match=r"outside 0..4"):
        train(resolve(COND, ["model.num_classes=5"]), tmp_path / "b", progress=False)
    with pytest.raises(DiffusionLabError, match="needs a class-conditional network"):
        train(resolve(COND, ["model.num_classes=null"]), tmp_path / "c", progress=False)
    with pytest.raises(DiffusionLabError, match="p_uncond"):
        resolve(COND, ["train.p_uncond=1.0"])
    assert not any(Path(tmp_path).glob("*/model.safetensors"))
