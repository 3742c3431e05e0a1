"""``evaluate --metric nll | elbo`` (diffusionlab.likelihood.evaluate) and the L-level dequantization of bpd.py.

- The offset ``log2(L / 2)`` of L-level data against exact discrete probabilities (Gauss-Legendre over each cell);
- the nll path on Gaussian oracles equals the exact log-density (with and without dequantization), and the elbo
  path equals the oracle's closed-form ELBO within its Monte Carlo error;
- the CLI on tiny trained runs (a chain and an SDE on the ring, a chain on the digits): finite JSON with the
  documented keys, deterministic given ``--seed``; metric/process mismatches exit 2 with one line.
"""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusionlab.cli import main
from diffusionlab.errors import DiffusionLabError
from diffusionlab.likelihood import bpd_from_model_space_nll, dequantize, offset_bits, on_grid, to_levels
from diffusionlab.likelihood.evaluate import (
    data_levels,
    elbo_metrics,
    elbo_per_point,
    nll_metrics,
    prepare,
)
from diffusionlab.oracles import GaussianOracle
from diffusionlab.processes import VPChain
from diffusionlab.processes.sde import VPSDE
from diffusionlab.schedules import linear_betas

F64 = torch.float64
EPS = 1e-5


# ---- the L-level offset -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_uniform_density_gives_log2_levels_bits(levels):
    """The uniform density on ``[-1, 1]^D`` (``nll = D ln 2``) gives each of the ``L^D`` cells probability
    ``L^-D``: exactly ``log2 L`` bits per dimension; 7 is kept as the 8-bit offset."""
    D = 64
    assert bpd_from_model_space_nll(D * math.log(2.0), D, levels=levels) == pytest.approx(math.log2(levels), abs=1e-12)
    assert offset_bits(256) == 7.0 and bpd_from_model_space_nll(0.0, D) == 7.0
    with pytest.raises(DiffusionLabError, match="levels"):
        offset_bits(1)


@pytest.mark.parametrize("levels", [17, 5])
def test_offset_against_exact_discrete_probability(levels):
    """An independent check of ``log2(L / 2)``: a 1-D model ``N(0.1, 1)`` on model space; each level's exact
    probability is the Gaussian mass of its cell ``[2k/L - 1, 2(k+1)/L - 1)``, and the dequantized bound
    (``E_u[-log p]`` by 16-point Gauss-Legendre, exact to ~1e-15 for this smooth integrand, plus the offset) must
    lie above it by Jensen's gap only: ``Var_u(log p) / 2 <= (slope * 2/L)^2 / 24 <= 1e-2`` nats for slope
    ``|x - 0.1| <= 1.1`` and ``L >= 5``. The centred-cell offset ``log2((L - 1) / 2)`` would fail the first
    inequality by ``log2(L / (L - 1)) >= 0.087`` bits."""
    k = torch.arange(levels, dtype=F64)
    lo, hi = 2 * k / levels - 1, 2 * (k + 1) / levels - 1
    exact = -torch.log2(torch.from_numpy(norm.cdf(hi.numpy(), 0.1, 1.0) - norm.cdf(lo.numpy(), 0.1, 1.0)))
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(16))
    u, w = (nodes + 1) / 2, weights / 2
    x = 2 * (k[:, None] + u[None]) / levels - 1
    nll = -torch.distributions.Normal(torch.tensor(0.1, dtype=F64), torch.tensor(1.0, dtype=F64)).log_prob(x)
    bound = bpd_from_model_space_nll((nll * w).sum(1), 1, levels=levels)
    gap = bound - exact
    assert (gap >= -1e-12).all() and gap.max() < 1e-2 / math.log(2.0), gap.tolist()


def test_dequantize_cells_for_17_levels():
    g = torch.Generator().manual_seed(1)
    k = torch.randint(0, 17, (3000, 4), generator=g)
    x = 2 * k.to(torch.float32) / 16 - 1
    assert torch.equal(to_levels(x, levels=17), k) and on_grid(x, 17) and not on_grid(x, 256)
    y = dequantize(x, torch.Generator().manual_seed(2), levels=17).to(F64)
    lo = 2 * k.to(F64) / 17 - 1
    assert ((y >= lo - 1e-6) & (y < lo + 2 / 17 + 1e-6)).all()
    u = 17 * (y + 1) / 2 - k  # U[0, 1): 12000 draws, se of the mean 0.0026
    assert abs(u.mean().item() - 0.5) < 4.5 / math.sqrt(12 * u.numel())
    with pytest.raises(DiffusionLabError, match="17-level"):
        dequantize(torch.tensor([0.3]), levels=17)
    with pytest.raises(DiffusionLabError, match="8-bit"):  # the 8-bit message is unchanged
        dequantize(torch.tensor([0.123]))


# ---- oracles: the nll path is the exact density, the elbo path the closed-form bound ----------------------------
def _oracle(process, seed=3):
    return GaussianOracle.random((2,), process, generator=torch.Generator().manual_seed(seed))


def test_nll_path_equals_exact_log_density():
    """VP-SDE with ``beta_max = 40``: ``p_T`` matches the prior to < 1e-4 nats (tests/test_likelihood.py), so the
    ODE NLL is ``-log p_eps`` to the solver's error (dopri5 at 1e-6: 3e-6 nats on the mean here, 2.5e-7 bits on the
    dequantized points; the tolerance 1e-4 leaves a 30x margin).
    Continuous points: nats and ``nats / (2 ln 2)`` bits. Points on a 17-level grid: dequantized by ``prepare``
    with the same generator, then ``bits = nats / (2 ln 2) + log2(8.5)``."""
    orc = _oracle(VPSDE(beta_max=40.0))
    x = orc.sample_data(24, generator=torch.Generator().manual_seed(4))
    out = nll_metrics(orc, x, batch_size=10, rtol=1e-6, atol=1e-6)
    exact = -orc.marginal_log_prob(x, EPS)
    assert out["nll_nats_per_point"] == pytest.approx(exact.mean().item(), abs=1e-4)
    assert out["nll_nats_per_point_stderr"] == pytest.approx(exact.std().item() / math.sqrt(24), rel=1e-3)
    assert out["bits_per_dim"] == pytest.approx(exact.mean().item() / (2 * math.log(2.0)), abs=1e-4)
    assert out["num"] == 24 and out["dim"] == 2 and out["network_calls"] > 0 and out["bits_per_dim_stderr_probes"] is None

    grid = (2 * torch.round(8 * (x.clamp(-1, 1) + 1)) / 16 - 1)
    xd = prepare(grid, 17, torch.Generator().manual_seed(5))
    assert torch.equal(xd, dequantize(grid.to(F64), torch.Generator().manual_seed(5), levels=17))
    out = nll_metrics(orc, xd, levels=17, rtol=1e-6, atol=1e-6)
    exact = -orc.marginal_log_prob(xd, EPS)
    assert out["bits_per_dim"] == pytest.approx(exact.mean().item() / (2 * math.log(2.0)) + math.log2(8.5), abs=1e-4)

    hut = nll_metrics(orc, x, divergence="hutchinson", num_probes=4, rtol=1e-5, atol=1e-5,
                      generator=torch.Generator().manual_seed(6))
    se = hut["nll_nats_per_point_stderr_probes"]
    assert se > 0 and hut["probes"] == 4
    assert abs(hut["nll_nats_per_point"] + orc.marginal_log_prob(x, EPS).mean().item()) < 4.5 * se + 1e-3


def test_elbo_path_matches_closed_form():
    """A 50-step VP chain: each point's ``-ELBO`` by full_vlb (one noise draw per term) minus the oracle's exact
    expectation has mean zero; checked within 4.5 standard errors of that difference over 200 points. The
    prior term is deterministic and must agree to rounding."""
    orc = _oracle(VPChain(linear_betas(50, 1e-3, 0.2)))
    x = orc.sample_data(200, generator=torch.Generator().manual_seed(7))
    per = elbo_per_point(orc, x, batch_size=64, generator=torch.Generator().manual_seed(8))
    elbo, terms, prior = orc.elbo_closed_form(x, variance="beta", return_terms=True)
    torch.testing.assert_close(per["prior"], prior, rtol=1e-10, atol=1e-12)
    for got, want in ((per["total"], -elbo), (per["decoder"], terms[:, 0]), (per["middle"], terms[:, 1:].sum(1))):
        diff = got - want
        assert diff.mean().abs() <= 4.5 * diff.std() / math.sqrt(200) + 1e-9
    torch.testing.assert_close(per["total"], per["prior"] + per["decoder"] + per["middle"], rtol=1e-12, atol=1e-12)
    summary = elbo_metrics(orc, x[:20], batch_size=64, generator=torch.Generator().manual_seed(8))
    assert summary["bits_per_dim"] == pytest.approx(summary["nll_nats_per_point"] / (2 * math.log(2.0)), rel=1e-12)
    assert summary["variance"] == "beta" and summary["T"] == 50


# ---- the CLI on tiny trained runs ---------------------------------------------------------------------------------
TINY_RING = ["--set", "train.steps=20", "--set", "train.threads=1", "--set", "data.num=400", "--set", "model.hidden=32",
             "--set", "model.depth=2", "--set", "train.log_every=10", "--quiet"]
NLL_KEYS = {"metric", "process", "data", "heldout", "convention", "levels", "dequantized", "num", "dim", "network_calls",
            "divergence", "nll_nats_per_point", "nll_nats_per_point_stderr", "bits_per_dim", "bits_per_dim_stderr",
            "baselines", "seed"}
ELBO_KEYS = (NLL_KEYS - {"divergence"}) | {"terms", "decoder", "variance", "T"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "toy2d_sde", "--out", str(root / "sde"), *TINY_RING]) == 0
    assert main(["train", "toy2d", "--out", str(root / "chain"), *TINY_RING, "--set", "process.T=40",
                 "--set", "sample.steps=20"]) == 0
    assert main(["train", "digits", "--out", str(root / "digits"), "--set", "train.steps=3", "--set", "train.threads=1",
                 "--set", "data.split=train", "--set", "process.T=20", "--set", "sample.steps=10",
                 "--set", "model.base_channels=8", "--set", "model.attn_resolutions=[]", "--quiet"]) == 0
    return root


def _strict(constant):
    raise ValueError(f"not valid JSON: {constant}")


def _evaluate(capsys, *argv):
    capsys.readouterr()
    assert main(["evaluate", *argv, "--quiet"]) == 0
    return json.loads(capsys.readouterr().out, parse_constant=_strict)  # NaN / Infinity refused


def _finite(d: dict):
    for key, val in d.items():
        if isinstance(val, dict):
            _finite(val)
        elif isinstance(val, float):
            assert math.isfinite(val), (key, val)


def test_cli_nll_on_a_tiny_sde_run(runs, capsys):
    argv = ["--run", str(runs / "sde"), "--metric", "nll", "--num", "40", "--rtol", "1e-4", "--atol", "1e-4",
            "--seed", "3"]
    out = _evaluate(capsys, *argv)
    assert NLL_KEYS <= set(out) and out["num"] == 40 and out["dim"] == 2 and out["heldout"]
    assert out["levels"] is None and not out["dequantized"] and out["divergence"] == "exact"
    _finite(out)
    assert out["bits_per_dim"] == pytest.approx(out["nll_nats_per_point"] / (2 * math.log(2.0)), rel=1e-12)
    again = _evaluate(capsys, *argv)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in out.items() if k != "seconds"}
    hut = _evaluate(capsys, *argv, "--divergence", "hutchinson", "--probes", "3")
    assert hut["probes"] == 3 and hut["bits_per_dim_stderr_probes"] > 0
    _finite(hut)
    one = _evaluate(capsys, "--run", str(runs / "sde"), "--metric", "nll", "--num", "1", "--rtol", "1e-3",
                    "--atol", "1e-3")
    assert one["num"] == 1 and one["nll_nats_per_point_stderr"] is None and math.isfinite(one["nll_nats_per_point"])


def test_cli_elbo_on_tiny_chain_runs(runs, capsys):
    out = _evaluate(capsys, "--run", str(runs / "chain"), "--metric", "elbo", "--num", "30", "--batch-size", "16")
    assert ELBO_KEYS <= set(out) and out["num"] == 30 and out["T"] == 40 and out["decoder"] == "gaussian"
    assert set(out["terms"]) == {"prior_L_T", "decoder_L_0", "sum_L_1_to_L_T-1"}
    _finite(out)
    total = sum(t["nats_per_point"] for t in out["terms"].values())
    assert out["nll_nats_per_point"] == pytest.approx(total, rel=1e-9, abs=1e-9)
    # digits: 17 levels, dequantized, Gaussian decoder, held-out test split, offset log2(8.5)
    dig = _evaluate(capsys, "--run", str(runs / "digits"), "--metric", "elbo", "--num", "6")
    assert dig["levels"] == 17 and dig["dequantized"] and dig["decoder"] == "gaussian" and dig["heldout"]
    assert dig["num_available"] == 297 and "log2(17/2)" in dig["convention"]
    _finite(dig)
    assert dig["bits_per_dim"] == pytest.approx(dig["nll_nats_per_point"] / (64 * math.log(2.0)) + math.log2(8.5))
    assert dig["baselines"]["uniform"]["bits_per_dim"] == pytest.approx(math.log2(17))
    assert 0 < dig["baselines"]["histogram"]["bits_per_dim"] < math.log2(17)


@pytest.mark.parametrize("run,metric,hint", [("chain", "nll", "use --metric elbo"), ("sde", "elbo", "use --metric nll")])
def test_metric_process_mismatch_is_one_line_exit_2(runs, capsys, run, metric, hint):
    capsys.readouterr()
    assert main(["evaluate", "--run", str(runs / run), "--metric", metric, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffusionlab: error:") and hint in err


@pytest.mark.parametrize("extra,fragment", [
    (["--metric", "nll", "--probes", "3"], "needs --divergence hutchinson"),
    (["--metric", "nll", "--variance", "beta"], "applies to --metric elbo"),
    (["--metric", "nll", "--num", "0"], "--num must be an integer >= 1"),
    (["--metric", "nll", "--rtol", "0"], "--rtol must be a number in (0, 1)"),
    (["--metric", "nll", "--sampler", "ddim"], "apply to --metric digits"),
    (["--metric", "digits", "--divergence", "hutchinson"], "applies to --metric nll or elbo"),
])
def test_bad_options_are_one_line_exit_2(runs, capsys, extra, fragment):
    capsys.readouterr()
    assert main(["evaluate", "--run", str(runs / "sde"), *extra, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


def test_levels_of_datasets(runs):
    from diffusionlab.training.sampling import load_run

    assert data_levels(load_run(runs / "digits", device="cpu")[1]) == 17
    assert data_levels(load_run(runs / "sde", device="cpu")[1]) is None
