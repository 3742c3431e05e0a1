"""Config validation and checkpoint safety: atomic files, corruption detection, no unpickling."""

import json
import pickle

import pytest
import torch

from diffusionlab import io as dio
from diffusionlab.errors import DiffusionLabError
from diffusionlab.training import checkpoint as ck
from diffusionlab.training.config import apply_overrides, load_config, load_yaml, resolve


# -- config -------------------------------------------------------------------------------------------------
def test_packaged_configs_resolve_and_carry_required_keys():
    from diffusionlab.commands import packaged_config

    for name in ("digits", "toy2d"):
        cfg = load_config(packaged_config(name))
        for key in ("steps", "batch_size", "checkpoint_every", "seed"):
            assert key in cfg["train"]
        assert isinstance(cfg["data"]["name"], str)


def test_set_overrides_parse_yaml_values():
    cfg = resolve({}, ["train.steps=17", "train.lr=1e-3", "sample.clip_x0=false", "data.name=ring"])
    assert cfg["train"]["steps"] == 17 and cfg["train"]["lr"] == 1e-3
    assert cfg["sample"]["clip_x0"] is False and cfg["data"]["name"] == "ring"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.steps=0"], "train.steps must be an integer >= 1"),
        (["train.steps=abc"], "train.steps"),
        (["train.lr=2"], "train.lr"),
        (["train.bogus=1"], "unknown key train.bogus"),
        (["train.ema_decay=1.0"], "train.ema_decay"),
        (["train.steps=true"], "train.steps"),
        (["nosection.x=1"], "unknown section"),
        (["process.name=foo"], "unknown process 'foo'"),
        (["process.beta_max=3"], "unknown option(s) 'beta_max' for process 'vp'"),
        (["sample.eta=1.5"], "sample.eta"),
        (["parametrization.prediction=noise"], "parametrization.prediction"),
        (["trainsteps"], "section.key=value"),
    ],
)
def test_bad_config_values_name_the_key(overrides, fragment):
    with pytest.raises(DiffusionLabError) as e:
        resolve({}, overrides)
    assert fragment in str(e.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(DiffusionLabError) as e:
        load_yaml(p)
    assert str(p) in str(e.value) and "line" in str(e.value)


def test_yaml_is_parsed_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(DiffusionLabError):
        load_yaml(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(DiffusionLabError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_apply_overrides_does_not_mutate_input():
    base = {"train": {"steps": 3}}
    apply_overrides(base, ["train.steps=5"])
    assert base["train"]["steps"] == 3


# -- checkpoints --------------------------------------------------------------------------------------------
def _tiny_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    model, opt = _tiny_state()
    gen = torch.Generator().manual_seed(123)
    torch.randn(5, generator=gen)
    path = ck.save_checkpoint(tmp_path, 7, model.state_dict(), model.state_dict(), opt, {"data": gen}, keep=2)
    assert path.name == "step_00000007"
    expected_next = torch.randn(3, generator=gen)
    loaded = ck.load_latest_checkpoint(tmp_path)
    assert loaded["step"] == 7
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    gen2 = torch.Generator()
    ck.restore_rng(loaded["state"], {"data": gen2})
    assert torch.equal(torch.randn(3, generator=gen2), expected_next)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(loaded["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
    for pid in a["state"]:
        for name, v in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][name]))


def test_generator_state_from_another_kind_of_device_is_reseeded_deterministically():
    """A CUDA generator's state (16 bytes: seed and offset) cannot become a CPU generator's (5056 bytes), nor the
    reverse: such a generator is seeded from a digest of the saved state and named, so a resume with a changed
    ``train.device`` goes on (the same way every time) and says it is not exact; same-kind states are restored."""
    state = {"rng.torch_cpu": torch.get_rng_state(), "rng.gen.noise": torch.arange(16, dtype=torch.uint8),
             "rng.gen.data": torch.Generator().manual_seed(5).get_state()}
    draws = []
    for _ in range(2):
        gens = {"noise": torch.Generator(), "data": torch.Generator()}
        assert ck.restore_rng(state, gens) == ["noise"]
        draws.append((torch.randn(4, generator=gens["noise"]), torch.randn(4, generator=gens["data"])))
    assert torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][1], torch.randn(4, generator=torch.Generator().manual_seed(5)))
    other = dict(state, **{"rng.gen.noise": torch.arange(1, 17, dtype=torch.uint8)})
    gen = torch.Generator()
    ck.restore_rng(other, {"noise": gen})
    assert not torch.equal(torch.randn(4, generator=gen), draws[0][0])  # the seed follows the saved state


def test_only_last_k_checkpoints_kept(tmp_path):
    model, opt = _tiny_state()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model.state_dict(), model.state_dict(), opt, {}, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_truncated_checkpoint_detected_and_previous_used(tmp_path):
    model, opt = _tiny_state()
    ck.save_checkpoint(tmp_path, 1, model.state_dict(), model.state_dict(), opt, {}, keep=3)
    newest = ck.save_checkpoint(tmp_path, 2, model.state_dict(), model.state_dict(), opt, {}, keep=3)
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5])  # truncate
    with pytest.raises(DiffusionLabError, match="truncated"):
        ck.verify_checkpoint(newest)
    warnings = []
    loaded = ck.load_latest_checkpoint(tmp_path, warn=warnings.append)
    assert loaded["step"] == 1
    assert len(warnings) == 1 and "step_00000002" in warnings[0]


def test_bitflip_detected_by_hash(tmp_path):
    model, opt = _tiny_state()
    path = ck.save_checkpoint(tmp_path, 1, model.state_dict(), model.state_dict(), opt, {}, keep=1)
    f = path / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DiffusionLabError, match="SHA-256"):
        ck.verify_checkpoint(path)


def test_pickle_with_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')",))

    with open(evil, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(DiffusionLabError, match="refused"):
        dio.load_weights(evil)
    assert not marker.exists(), "the pickled code ran"


def test_plain_torch_weights_load_weights_only(tmp_path):
    p = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, p)
    assert torch.equal(dio.load_weights(p)["a"], torch.ones(2))


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage")
    with pytest.raises(DiffusionLabError, match="not a valid safetensors"):
        dio.load_weights(p)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    dio.atomic_write_bytes(tmp_path / "a.json", json.dumps({"x": 1}).encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
