"""configs/cifar10.yaml: the DDPM recipe's sizes (35.7M parameters, the FLOP count its GPU cost is derived from) and
a CPU smoke test through the CLI with ``--set`` overrides on a fake CIFAR-10 binary folder."""

from __future__ import annotations

import contextlib
import io
import json

import torch

import fakedata as fake
from diffusionlab.cli import main
from diffusionlab.commands import packaged_config
from diffusionlab.training.config import load_config

SMOKE = ["model.base_channels=8", "model.channel_mults=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
         "train.batch_size=4", "train.steps=2", "train.warmup=0", "train.device=cpu", "train.threads=1",
         "sample.steps=3"]


def test_the_recipe_is_ddpms_cifar10_model_and_its_flop_count_is_the_documented_one():
    """35,746,307 parameters (Ho et al. 2020: 35.7M) and 12.44 GFLOP per 32 x 32 forward pass, the figure the GPU
    cost in the config and docs/benchmarks.md is derived from (counted on the meta device: nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffusionlab.models import build_network

    cfg = load_config(packaged_config("cifar10"))
    assert cfg["data"]["flip"] and cfg["train"]["batch_size"] == 128 and cfg["process"]["T"] == 1000
    with torch.device("meta"):
        net = build_network(dict(cfg["model"]), (3, 32, 32))
        with FlopCounterMode(display=False) as count:
            net(torch.empty(1, 3, 32, 32), torch.empty(1))
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    assert round(count.get_total_flops() / 1e9, 2) == 12.44


def test_the_recipe_runs_on_a_cpu_with_overrides(tmp_path):
    data = fake.cifar10(tmp_path / "cifar-10-batches-bin")
    run = tmp_path / "run"
    args = ["train", "cifar10", "--out", str(run), "--quiet", "--set", f"data.path={data}"]
    for item in SMOKE:
        args += ["--set", item]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    assert rc == 0, err.getvalue()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and (run / "model.safetensors").exists()
