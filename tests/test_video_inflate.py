"""Image-to-video inflation: every image weight loads, the temporal layers start as the identity, and the inflated
network equals the image network frame by frame; ``train.init_from`` / ``--init-from`` and ``freeze_spatial``."""

from __future__ import annotations

import json

import pytest
import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.models.inflate import freeze_spatial, inflate, split_keys
from diffusionlab.models.unet import UNet
from diffusionlab.models.video_unet import VideoUNet, is_temporal_key

OPTS = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2,
            conv_resample=True)


def _randomize(net, generator, scale=0.2):
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator))


def _per_frame(image, x, c):
    return torch.stack([image(x[:, :, f], c) for f in range(x.shape[2])], dim=2)


@pytest.mark.parametrize("temporal", ["conv", "attention", "both"])
def test_inflated_network_is_the_image_network_frame_by_frame(temporal):
    g = torch.Generator().manual_seed(0)
    image = UNet(in_channels=1, image_size=8, **OPTS)
    _randomize(image, g)  # every weight nonzero, the zero-initialised output conv included
    video = VideoUNet(in_channels=1, frames=5, image_size=8, temporal=temporal, **OPTS)
    spatial, temporal_keys = split_keys(video.state_dict())
    # the whole image state dict, mid block included, has a namesake in the video network, and nothing else is left
    assert set(spatial) == set(image.state_dict()) and temporal_keys
    counts = inflate(video, image.state_dict())
    assert counts["loaded"] == len(image.state_dict()) and counts["temporal"] == len(temporal_keys)
    x = torch.randn(3, 1, 5, 8, 8, generator=g)
    c = torch.tensor([3.0, 400.0, 990.0])
    with torch.no_grad():
        ref, out = _per_frame(image, x, c), video(x, c)
        # the same operations on a batch of B * F frames instead of F batches of B: equal up to float32 rounding
        # accumulated through ~30 layers of O(1) activations (observed ~1e-6); 1e-5 is far below the O(0.1)
        # differences below
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert ref.abs().max() > 0.1  # a non-trivial output
        # the check can fail: a temporal layer away from the identity mixes frames
        _randomize(video.mid.temporal, g)
        assert (video(x, c) - ref).abs().max() > 1e-2


def test_inflate_refuses_what_does_not_fit():
    image = UNet(in_channels=1, image_size=8, **OPTS)
    wider = VideoUNet(in_channels=1, frames=4, image_size=8, **{**OPTS, "base_channels": 16})
    with pytest.raises(DiffusionLabError, match="shape mismatches"):
        inflate(wider, image.state_dict())
    other = VideoUNet(in_channels=1, frames=4, image_size=8, **{**OPTS, "attn_resolutions": ()})
    with pytest.raises(DiffusionLabError, match="no place for"):
        inflate(other, image.state_dict())
    video = VideoUNet(in_channels=1, frames=4, image_size=8, **OPTS)
    partial = {k: v for k, v in image.state_dict().items() if not k.startswith("mid.")}
    with pytest.raises(DiffusionLabError, match="without an image weight: .*mid"):
        inflate(video, partial)


def test_freeze_spatial_leaves_only_temporal_parameters_trainable():
    video = VideoUNet(in_channels=1, frames=4, image_size=8, temporal="both", **OPTS)
    n = freeze_spatial(video)
    trainable = [k for k, p in video.named_parameters() if p.requires_grad]
    assert trainable and all(is_temporal_key(k) for k in trainable)
    assert n == sum(p.numel() for p in video.parameters() if p.requires_grad)


# ---- through the config and the trainer ----------------------------------------------------------------------
def _image_cfg(out_steps=2):
    return {"data": {"name": "moving_digit_frames", "num": 6, "frames": 4, "size": 8},
            "process": {"name": "vp", "T": 50},
            "model": {"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                      "attn_resolutions": [4]},
            "train": {"steps": out_steps, "batch_size": 4, "warmup": 1, "checkpoint_every": 100, "log_every": 1,
                      "device": "cpu", "ema_decay": 0.5},
            "sample": {"sampler": "ddim", "steps": 3}}


def _video_cfg(init_from, **train):
    return {"data": {"name": "moving_digits", "num": 6, "frames": 4, "size": 8},
            "process": {"name": "vp", "T": 50, "noise": "mixed:1.0"},
            "model": {"name": "video_unet", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                      "attn_resolutions": [4], "temporal": "both"},
            "train": {"steps": 2, "batch_size": 2, "warmup": 1, "checkpoint_every": 100, "log_every": 1,
                      "device": "cpu", "init_from": str(init_from), **train},
            "sample": {"sampler": "ddim", "steps": 3}}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from diffusionlab.training.config import resolve
    from diffusionlab.training.trainer import train

    out = tmp_path_factory.mktemp("image_run")
    train(resolve(_image_cfg()), out, progress=False, log=lambda m: None)
    return out


def test_moving_digit_frames_are_the_videos_frames():
    from diffusionlab.data import load_dataset

    v = load_dataset({"name": "moving_digits", "num": 5, "frames": 3, "size": 9}, seed=4)
    f = load_dataset({"name": "moving_digit_frames", "num": 5, "frames": 3, "size": 9}, seed=4)
    assert f.kind == "images" and tuple(f.data.shape) == (15, 1, 9, 9) and f.levels == 17
    assert torch.equal(f.data[7], v.data[2, :, 1]) and torch.equal(f.labels, v.labels.repeat_interleave(3))


def test_init_from_inflates_an_image_run_and_records_it(image_run, tmp_path):
    from diffusionlab.io import load_weights
    from diffusionlab.training.config import resolve
    from diffusionlab.training.sampling import load_run
    from diffusionlab.training.trainer import build_parts

    cfg = resolve(_video_cfg(image_run))
    p = build_parts(cfg, log=lambda m: None)
    image_sd = load_weights(image_run / "model.safetensors")
    assert p.init["mode"] == "inflate" and p.init["loaded"] == len(image_sd)
    state = p.model.state_dict()
    for k, v in image_sd.items():  # a copy: the very values
        assert torch.equal(state[k], v), k
    _, _, image_model = load_run(image_run, device="cpu")
    x = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.stack([image_model(x[:, :, f], 17) for f in range(4)], dim=2)
        # rounding through the layers only (see the network test)
        torch.testing.assert_close(p.model(x, 17), ref, rtol=1e-5, atol=1e-5)


def test_freeze_spatial_through_the_trainer_and_cli(image_run, tmp_path):
    from diffusionlab.cli import main
    from diffusionlab.io import load_weights
    from diffusionlab.training.config import dump, resolve

    cfg_path = tmp_path / "video.yaml"
    user = _video_cfg(image_run)
    del user["train"]["init_from"]
    cfg_path.write_text(dump(user))
    out = tmp_path / "video_run"
    assert main(["train", str(cfg_path), "--out", str(out), "--init-from", str(image_run), "--freeze-spatial",
                 "--quiet"]) == 0
    record = json.loads((out / "init.json").read_text())
    assert record["mode"] == "inflate" and record["trainable_parameters"] > 0 and len(record["sha256"]) == 64
    assert (out / "init_config.yaml").is_file()
    saved = resolve(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert saved["train"]["init_from"] == str(image_run) and saved["train"]["freeze_spatial"] is True
    image_sd, raw = load_weights(image_run / "model.safetensors"), load_weights(out / "model_raw.safetensors")
    for k, v in image_sd.items():  # frozen: unchanged by two AdamW steps
        assert torch.equal(raw[k], v), k
    moved = [k for k in raw if is_temporal_key(k) and k.endswith("weight") and raw[k].abs().max() > 0]
    assert moved  # the zero-initialised temporal projections have left zero


def test_init_from_refuses_a_source_that_does_not_fit(image_run, tmp_path):
    from diffusionlab.training.config import resolve
    from diffusionlab.training.trainer import build_parts

    cfg = _video_cfg(image_run)
    cfg["model"]["base_channels"] = 16
    with pytest.raises(DiffusionLabError, match="model.base_channels: 16 vs 8"):
        build_parts(resolve(cfg), log=lambda m: None)
    cfg = _video_cfg(image_run)
    cfg["process"]["T"] = 60
    with pytest.raises(DiffusionLabError, match="process.T: 60 vs 50"):
        build_parts(resolve(cfg), log=lambda m: None)
    cfg = _video_cfg(image_run)
    cfg["data"]["size"] = 16
    cfg["model"]["attn_resolutions"] = [8]
    with pytest.raises(DiffusionLabError, match="frame shape"):
        build_parts(resolve(cfg), log=lambda m: None)
    with pytest.raises(DiffusionLabError, match="not a run directory"):
        build_parts(resolve(_video_cfg(tmp_path / "nowhere")), log=lambda m: None)
    with pytest.raises(DiffusionLabError, match="freeze_spatial needs train.init_from"):
        resolve({**_video_cfg(image_run), "train": {"freeze_spatial": True}})
