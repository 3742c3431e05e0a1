"""The trainer's step: a non-finite step is skipped on the device (weights, AdamW state and EMA untouched), the fused
AdamW is used where torch has it, and the speed switches (channels-last, torch.compile) train the same model."""

import copy

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.config import resolve
from diffusionlab.training.trainer import build_parts, train_step

TINY = {
    "data": {"name": "ring", "num": 512},
    "process": {"name": "vp", "T": 100},
    "model": {"name": "mlp", "hidden": 32, "depth": 2, "emb_dim": 16},
    "train": {"steps": 10, "batch_size": 32, "lr": 1e-3, "warmup": 0, "seed": 3, "device": "cpu"},
}
IMAGES = {
    "data": {"name": "digits"},
    "process": {"name": "vp", "T": 100},
    "model": {"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
              "attn_resolutions": [4], "groups": 4},
    "train": {"steps": 10, "batch_size": 16, "lr": 1e-3, "warmup": 0, "seed": 0, "device": "cpu"},
}


def _snapshot(p):
    return (copy.deepcopy(p.model.state_dict()), copy.deepcopy(p.opt.state_dict()),
            {k: v.clone() for k, v in p.ema.state_dict().items()})


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_changes_nothing_and_a_finite_one_does(fused):
    p = build_parts(resolve(TINY))
    if not fused:
        p.opt = torch.optim.AdamW(p.params, lr=1e-3, weight_decay=0.0, fused=False)
    assert p.fused is fused
    for k in range(3):
        assert train_step(p, k)[2].item() == 1.0
    before = _snapshot(p)
    good_data = p.data.clone()
    p.data[:] = float("nan")
    stats = train_step(p, 3)
    assert stats[2].item() == 0.0 and not torch.isfinite(stats[0])
    assert _same(_snapshot(p), before), "a skipped step changed the weights, the AdamW state or the EMA"
    p.data[:] = good_data
    assert train_step(p, 4)[2].item() == 1.0
    after = _snapshot(p)
    assert not _same(after[0], before[0]) and not _same(after[2], before[2])
    assert after[1]["state"][0]["step"].item() == 4  # the skipped step is not counted by AdamW


def test_fused_adamw_is_used_on_cpu():
    assert build_parts(resolve(TINY)).fused


def test_fused_and_unfused_adamw_train_the_same_weights():
    a, b = build_parts(resolve(TINY)), build_parts(resolve(TINY))
    b.opt = torch.optim.AdamW(b.params, lr=1e-3, weight_decay=0.0, fused=False)
    for k in range(5):
        train_step(a, k), train_step(b, k)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6, msg=name)


def _train(cfg_dict, overrides, steps=4):
    p = build_parts(resolve(cfg_dict, overrides))
    losses = [train_step(p, k)[0].item() for k in range(steps)]
    return p, losses


def test_channels_last_trains_the_same_network():
    a, la = _train(IMAGES, [])
    b, lb = _train(IMAGES, ["train.channels_last=true"])
    conv = next(m for m in b.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert la == pytest.approx(lb, rel=1e-4)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(wa, wb.contiguous(), rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_on_points_is_a_clear_error():
    with pytest.raises(DiffusionLabError, match=r"train.channels_last applies to images .* shape \(2,\)"):
        build_parts(resolve(TINY, ["train.channels_last=true"]))


@pytest.mark.parametrize("key", ["channels_last", "compile"])
def test_speed_switches_must_be_booleans(key):
    with pytest.raises(DiffusionLabError, match=f"train.{key} must be true or false"):
        resolve(TINY, [f"train.{key}=1"])


@pytest.mark.slow
def test_compiled_network_trains_the_same_weights_under_the_same_names():
    a, la = _train(TINY, [], steps=3)
    b, lb = _train(TINY, ["train.compile=true"], steps=3)
    assert list(a.model.state_dict()) == list(b.model.state_dict())  # checkpoints stay loadable eagerly
    assert la == pytest.approx(lb, rel=1e-4)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-5, msg=name)
