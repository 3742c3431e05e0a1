"""CLI contract of ``oracle sample``, ``oracle nll`` and ``bench samplers`` (through the main CLI's error handling),
the budget plans of every sampler, and the benchmark's error measures checked against closed forms."""

import json
import math

import numpy as np
import pytest
import torch

import diffusionlab.cli as cli
from diffusionlab.errors import DiffusionLabError
from diffusionlab.oracles import bench as B
from diffusionlab.oracles.mixture import GaussianMixtureOracle, make_process
from diffusionlab.processes.grid import make_grid
from diffusionlab.samplers import ode_adaptive

F64 = torch.float64


@pytest.fixture
def run(monkeypatch, capsys):
    """``run(*argv) -> (exit code, stdout, stderr)`` through ``diffusionlab.cli.main``; registers the oracle
    commands unless ``commands.register`` already does."""
    orig = cli._register

    def _register(sub):
        orig(sub)
        if "oracle" not in sub.choices:
            from diffusionlab.oracles.cli import register

            register(sub)

    monkeypatch.setattr(cli, "_register", _register)

    def _run(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


@pytest.fixture
def frames_spec(tmp_path):
    g = np.random.default_rng(0)
    means = g.standard_normal((2, 6))
    covs = np.stack([np.eye(6) * 0.2, np.eye(6) * 0.1 + 0.05])
    p = tmp_path / "frames.json"
    p.write_text(json.dumps({"weights": [1, 2], "means": means.tolist(), "covs": covs.tolist(), "frames": 3}))
    return p


def test_sample_json_and_output(run, tmp_path):
    out = tmp_path / "x.npy"
    code, stdout, _ = run("oracle", "sample", "--gmm", "ring8", "--process", "vp-sde", "--sampler", "dpmpp-2m",
                          "--nfe", 8, "--num", 50, "--seed", 1, "--out", out)
    assert code == 0
    info = json.loads(stdout)
    assert info["nfe"] == 8 and info["steps"] == 8 and info["grid"] == "edm"
    assert {"nfe", "nfe_budget", "steps", "sampler", "process", "grid", "num", "out", "sigma_end"} <= set(info)
    x = np.load(out)
    assert x.shape == (50, 2) and x.dtype == np.float64 and np.isfinite(x).all()
    # same seed, same output; different seed, different output
    code, _, _ = run("oracle", "sample", "--gmm", "ring8", "--sampler", "dpmpp-2m", "--nfe", 8, "--num", 50,
                     "--seed", 1, "--out", tmp_path / "x2.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "x2.npy"), x)


@pytest.mark.parametrize("process,sampler,budget,expect", [
    ("vp-sde", "heun", 10, 10), ("vp-sde", "heun", 5, 4), ("vp", "heun", 5, 5), ("vp", "heun", 10, 9),
    ("vp-sde", "euler", 7, 7), ("vp-sde", "dpmpp-3m", 6, 6), ("vp-sde", "unipc", 6, 6), ("vp-sde", "unipc:order=3", 6, 6),
    ("vp-sde", "ddim", 6, 6), ("vp", "ddim", 6, 6), ("vp", "ddpm", 6, 6), ("vp-sde", "euler-maruyama", 6, 6), ("vp-sde", "ddpm", 6, 6), ("ve", "ve-reverse", 6, 6),
    ("vp-sde", "pc", 7, 6), ("ve-sde", "pc", 6, 6), ("subvp-sde", "dpmpp-2m", 5, 5), ("ve", "annealed-langevin", 41, 41),
    ("ve", "annealed-langevin", 5, 5), ("ve", "unipc", 5, 5), ("ve-sde", "heun", 9, 8),
])
def test_actual_nfe_never_exceeds_the_budget(run, tmp_path, process, sampler, budget, expect):
    code, stdout, stderr = run("oracle", "sample", "--gmm", "ring8", "--process", process, "--sampler", sampler,
                               "--nfe", budget, "--num", 20, "--out", tmp_path / "x.npy")
    assert code == 0, stderr
    assert json.loads(stdout)["nfe"] == expect <= budget


def test_adaptive_solver_reports_its_count(run, tmp_path):
    code, stdout, _ = run("oracle", "sample", "--gmm", "ring8", "--sampler", "ode-adaptive", "--num", 20,
                          "--out", tmp_path / "x.npy")
    info = json.loads(stdout)
    assert code == 0 and info["nfe"] > 20 and info["budget_applies"] is False


def test_init_shapes_and_shared_start(run, tmp_path, frames_spec):
    """--init (N, D) and (N, F, d) start the same paths; two deterministic samplers from the same start agree
    to their discretisation error; a bad shape or a --num that disagrees is exit 2 with one line."""
    proc = make_process("vp-sde")
    x_T = proc.prior_sample((30, 6), generator=torch.Generator().manual_seed(0), dtype=F64).numpy()
    np.save(tmp_path / "flat.npy", x_T)
    np.save(tmp_path / "frames.npy", x_T.reshape(30, 3, 2))
    outs = {}
    for name in ("flat", "frames"):
        code, stdout, stderr = run("oracle", "sample", "--gmm", frames_spec, "--noise", "mixed:0.5", "--sampler",
                                   "unipc", "--nfe", 40, "--init", tmp_path / f"{name}.npy", "--out",
                                   tmp_path / f"o_{name}.npy")
        assert code == 0, stderr
        outs[name] = np.load(tmp_path / f"o_{name}.npy")
        assert outs[name].shape == (30, 3, 2) and json.loads(stdout)["num"] == 30
    np.testing.assert_array_equal(outs["flat"], outs["frames"])  # the same float64 start, reshaped: same operations
    code, _, _ = run("oracle", "sample", "--gmm", frames_spec, "--noise", "mixed:0.5", "--sampler", "ode-adaptive", "--init",
                     tmp_path / "flat.npy", "--out", tmp_path / "ref.npy")
    assert code == 0
    assert np.sqrt(((np.load(tmp_path / "ref.npy") - outs["flat"]) ** 2).sum((1, 2)).mean()) < 2e-2
    np.save(tmp_path / "bad.npy", x_T[:, :5])
    for extra in (["--init", tmp_path / "bad.npy"], ["--init", tmp_path / "flat.npy", "--num", 7],
                  ["--init", tmp_path / "missing.npy"]):
        code, stdout, stderr = run("oracle", "sample", "--gmm", frames_spec, "--sampler", "euler", "--nfe", 4,
                                   *extra, "--out", tmp_path / "x.npy")
        assert code == 2 and stdout == "" and stderr.count("\n") == 1 and stderr.startswith("diffusionlab: error:")


@pytest.mark.parametrize("argv,match", [
    (["--sampler", "magic", "--nfe", 4], "unknown sampler"),
    (["--sampler", "euler", "--nfe", 4, "--process", "vp-ode"], "unknown process"),
    (["--sampler", "euler", "--nfe", 4, "--grid", "cubic"], "unknown time grid"),
    (["--sampler", "euler", "--nfe", 4, "--noise", "mixed"], "needs a parameter"),
    (["--sampler", "euler"], "needs --nfe"),
    (["--sampler", "heun", "--nfe", 1], "heun needs a budget of at least 2"),
    (["--sampler", "pc", "--nfe", 4, "--process", "vp"], "needs a continuous-time SDE"),
    (["--sampler", "ve-reverse", "--nfe", 4], "needs a variance-exploding process"),
    (["--sampler", "annealed-langevin", "--nfe", 40, "--process", "vp"], "needs a variance-exploding process"),
    (["--sampler", "unipc:order=5", "--nfe", 4], "order must be an integer in [1, 3]"),
    (["--sampler", "unipc:magic=1", "--nfe", 4], "takes no option magic"),
    (["--sampler", "euler", "--nfe", 4, "--num", 0], "--num"),
    (["--sampler", "euler", "--nfe", 1001, "--process", "vp"], "more than the chain"),
])
def test_bad_arguments_exit_2(run, tmp_path, argv, match):
    code, stdout, stderr = run("oracle", "sample", "--gmm", "ring8", *argv, "--out", tmp_path / "x.npy")
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and match in stderr, stderr


def test_bad_specs_and_outputs_exit_2(run, tmp_path):
    bad = tmp_path / "bad.json"
    for text, match in (("{not json", "not valid JSON"),
                        (json.dumps({"weights": [1], "means": [[0, 0]], "covs": [[[1, 0], [0, -2]]]}),
                         "not positive semi-definite"),
                        (json.dumps({"weights": [1], "means": [[0, 0]], "covs": [[[1, 0, 0]]]}), "shape")):
        bad.write_text(text)
        code, _, stderr = run("oracle", "sample", "--gmm", bad, "--sampler", "euler", "--nfe", 3, "--out",
                              tmp_path / "x.npy")
        assert code == 2 and match in stderr and stderr.count("\n") == 1, stderr
    for out, match in ((tmp_path / "nodir" / "x.npy", "does not exist"), (tmp_path / "x.txt", "must end in .npy"),
                       (tmp_path, "must end in .npy")):
        code, _, stderr = run("oracle", "sample", "--gmm", "ring8", "--sampler", "euler", "--nfe", 3, "--out", out)
        assert code == 2 and match in stderr, stderr
    code, _, stderr = run("oracle", "sample", "--gmm", tmp_path / "none.json", "--sampler", "euler", "--nfe", 3,
                          "--out", tmp_path / "x.npy")
    assert code == 2 and "not found" in stderr


def test_nll_matches_the_exact_density(run, tmp_path):
    """ODE log-likelihood (exact divergence) of exact draws of p_eps equals -log p_eps within the solver's
    tolerance; its JSON has mean_nll, nfe, exact_mean_nll."""
    oracle = GaussianMixtureOracle.from_spec(B.ring_spec(), "vp-sde")
    x = oracle.sample_marginal(25, 1e-5, torch.Generator().manual_seed(0))
    np.save(tmp_path / "pts.npy", x.numpy())
    code, stdout, stderr = run("oracle", "nll", "--gmm", "ring8", "--points", tmp_path / "pts.npy", "--out",
                               tmp_path / "nll.npy")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert {"mean_nll", "nfe", "exact_mean_nll", "data_mean_nll"} <= set(info)
    assert abs(info["mean_nll"] - info["exact_mean_nll"]) < 5e-3 and info["nfe"] > 10
    exact = -oracle.marginal_log_prob(x, torch.tensor(1e-5, dtype=F64)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "nll.npy"), exact, atol=5e-3)
    code, _, stderr = run("oracle", "nll", "--gmm", "ring8", "--process", "vp", "--points", tmp_path / "pts.npy",
                          "--out", tmp_path / "nll.npy")
    assert code == 2 and "SDE" in stderr


def test_bench_samplers_small(run, tmp_path):
    out = tmp_path / "b.json"
    code, stdout, stderr = run("bench", "samplers", "--gmm", "ring8", "--num", 300, "--nfe", "4,8", "--samplers",
                               "euler,dpmpp-2m,euler-maruyama", "--grids", "logsnr", "--floor-seeds", 2,
                               "--json", out)
    assert code == 0, stderr
    assert "coupled" in stdout and "floor check" in stdout
    payload = json.loads(out.read_text())
    recs = [r for r in payload["records"] if "skipped" not in r]
    assert {r["sampler"] for r in recs} == {"euler", "dpmpp-2m", "euler-maruyama"}
    assert all(r["nfe"] <= r["budget"] for r in recs)
    det = [r for r in recs if r["deterministic"]]
    assert all("coupled" in r and "sw2" in r and "weight_error" in r for r in det)
    assert payload["floor_checks"] and "within" in payload["floor_checks"][0]
    code, _, stderr = run("bench", "samplers", "--gmm", "ring8", "--nfe", "4,x")
    assert code == 2 and "--nfe" in stderr
    code, _, stderr = run("bench", "samplers", "--gmm", "ring8", "--samplers", "magic")
    assert code == 2 and "unknown sampler" in stderr


# ---- the benchmark's measures ----------------------------------------------------------------------------------
def test_sliced_w2_of_shifted_gaussians():
    """SW2 between N(0, I) and N(mu, I) over directions theta is sqrt(mean_theta (theta . mu)^2) (1-D W2 of two
    Gaussians with equal variance is the shift), evaluated with the same directions so that only the sample noise
    remains: n = 10000 puts the estimate within 3% (the shift's standard error is sqrt(2 / n) = 0.014 against
    shifts ~0.7). Unequal sizes go through quantiles; a set against itself is 0."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 10000
    mu = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64)
    a = torch.randn(n, d, generator=g, dtype=F64)
    b = torch.randn(n, d, generator=g, dtype=F64) + mu
    dirs = B.random_directions(d, 128, g)
    expect = float((dirs.T @ mu).square().mean().sqrt())
    assert B.sliced_w2(a, b, dirs) == pytest.approx(expect, rel=0.03)
    assert B.sliced_w2(a, b[: n // 3], dirs) == pytest.approx(expect, rel=0.04)
    assert B.sliced_w2(a, a, dirs) == 0.0
    assert expect == pytest.approx(float(mu.norm()) / math.sqrt(d), rel=0.25)  # E (theta . mu)^2 = |mu|^2 / D


def test_coupled_and_weight_errors():
    assert B.coupled_error(torch.zeros(4, 2), torch.tensor([[3.0, 4.0]] * 4)) == pytest.approx(5.0)
    oracle = GaussianMixtureOracle([1, 3], [[-5.0, 0.0], [5.0, 0.0]], [np.eye(2).tolist()] * 2, make_process("vp-sde"))
    y = torch.tensor([[-5.0, 0.0]] * 5 + [[5.0, 0.0]] * 5, dtype=F64)
    assert B.weight_error(oracle, y, 0.0) == pytest.approx(0.5)  # |0.5 - 0.25| + |0.5 - 0.75|


def test_reference_solution_is_the_flow():
    """K = 1: the flow of dy/dsig = E[eps | y] is linear, y(sig) = m + A (y0 - m), A = (S + sig^2)^{1/2}
    (S + sig0^2)^{-1/2}; and for a mixture the sig-parametrised reference agrees with ode_adaptive in t."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    S = a @ a.T / 3 + 0.05 * torch.eye(3, dtype=F64)
    m = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    oracle = GaussianMixtureOracle([1.0], m[None], S[None], make_process("vp-sde"))
    y0 = oracle.sample_at(40, 1.0, 80.0, g)
    y, nfe = B.reference_solution(oracle, y0, 80.0, 0.02)
    lam, V = torch.linalg.eigh(S)
    A = V @ torch.diag(((lam + 0.02**2) / (lam + 80.0**2)).sqrt()) @ V.T
    torch.testing.assert_close(y, m + (y0 - m) @ A.T, rtol=0, atol=1e-7)
    y_zero, _ = B.reference_solution(oracle, y0, 80.0, 0.0)
    A0 = V @ torch.diag((lam / (lam + 80.0**2)).sqrt()) @ V.T
    torch.testing.assert_close(y_zero, m + (y0 - m) @ A0.T, rtol=0, atol=1e-7)
    mix = GaussianMixtureOracle.from_spec(B.ring_spec(), "vp-sde")
    proc = mix.process
    grid = make_grid(proc, 1).t
    (s0, s1), (sg0, sg1) = (v.tolist() for v in proc.coeffs(grid))
    x = proc.prior_sample((20, 2), generator=g, dtype=F64)
    via_t = ode_adaptive(mix, x, grid, rtol=1e-11, atol=1e-11) / s1
    via_sig, _ = B.reference_solution(mix, x / s0, sg0 / s0, sg1 / s1)
    assert B.coupled_error(via_t, via_sig) < 1e-6


def test_floors_and_plans():
    oracle = GaussianMixtureOracle.from_spec(B.ring_spec(), "vp-sde")
    pb = B.Problem(oracle, num=500, seed=0, projections=64, repeats=4)
    fl = pb.floors(0.0)
    assert 0 < fl["sw2_floor"] < 0.5 and fl["sw2_floor_std"] > 0 and 0 < fl["weight_floor"] < 0.2
    from diffusionlab.samplers import get_sampler, sampler_names

    for proc_name in ("vp", "ve", "vp-sde", "subvp-sde", "ve-sde"):
        proc = make_process(proc_name)
        for name in sampler_names() + list(B.BENCH_VARIANTS):
            spec = get_sampler(name.split(":")[0])
            if not spec.runs_on(proc):
                with pytest.raises(DiffusionLabError):
                    B.plan(name, proc, 10)
                continue
            assert name in B.bench_samplers(proc)
            p = B.plan(name, proc, None if spec.adaptive else 10)
            assert p.nfe is None or p.nfe <= 10
            assert p.sig_start > p.sig_end >= 0
