"""Progressive distillation (Salimans & Ho 2022) on exact oracles: the student reproduces its teacher's steps."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from diffusionlab.cli import main
from diffusionlab.errors import DiffusionLabError
from diffusionlab.oracles.gaussian import GaussianOracle
from diffusionlab.parametrization import DiffusionModel
from diffusionlab.processes import make_process
from diffusionlab.processes.grid import make_grid
from diffusionlab.samplers import get_sampler
from diffusionlab.training.distill import (ddim_target, distill_model, nested_grids, solve_points, teacher_points)

F64 = torch.float64


class LevelAffineNet(nn.Module):
    """``out = A_k x + b_k`` with one affine map per noise level ``k`` (the distinct ``c_noise`` values of the
    grid's points): for Gaussian data the exact distilled student is affine in ``x_t`` at each level, so this net
    can represent it and the test measures the algorithm, not a network's capacity."""

    def __init__(self, levels: list[float], dim: int):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=F64))
        self.A = nn.Parameter(torch.zeros(len(levels), dim, dim, dtype=F64))
        self.b = nn.Parameter(torch.zeros(len(levels), dim, dtype=F64))

    def forward(self, x, c_noise):
        k = (c_noise.to(F64)[:, None] - self.levels[None, :]).abs().argmin(1)
        return torch.einsum("bij,bj->bi", self.A[k], x) + self.b[k]


def _teacher(process):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    return GaussianOracle(0.3 * torch.randn(3, generator=g, dtype=F64), 0.1 * a @ a.T / 3 + 0.02 * torch.eye(3, dtype=F64),
                          process)


@torch.no_grad()
def _ddim(model, x, grid):
    return get_sampler("ddim").run(model, x, grid)


@pytest.mark.parametrize("name,opts,prediction", [("vp", {"schedule": "cosine"}, "v"), ("vp-sde", {}, "x0"),
                                                  ("ve-sde", {"sigma_min": 0.002, "sigma_max": 80.0}, "edm")])
def test_distilled_student_matches_its_teachers_steps(name, opts, prediction):
    """Two rounds from the teacher's 8-step DDIM grid: the 2-step student's DDIM output matches the teacher's 8
    DDIM steps from the same starts within 0.1% of the output's spread (the student is exact at its optimum;
    measured 1e-5 to 6e-5 after 200 AdamW steps per round on this convex quadratic), and the 4-step student of the
    first round matches them too."""
    process = make_process(name, **opts)
    teacher = _teacher(process)
    start = make_grid(process, 8, "edm")
    ts = torch.tensor(start.times[:-1]) if process.discrete else start.t[:-1]
    probe = DiffusionModel(None, process, prediction=prediction)
    levels = probe.c_noise(ts, F64).tolist()
    student = DiffusionModel(LevelAffineNet(levels, 3), process, prediction=prediction)
    data = teacher.sample_data(4000, torch.Generator().manual_seed(1))
    saved = {}
    rounds = distill_model(teacher, student, data, start, rounds=2, iterations=200, batch_size=256, lr=0.02,
                           warmup=10, ema_decay=0.9, seed=0,
                           on_round=lambda r, m, rec: saved.__setitem__(rec.steps, {k: v.clone() for k, v in m.state_dict().items()}))
    assert [r.steps for r in rounds] == [4, 2]
    x = start.sigma[0] * torch.randn(2000, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = _ddim(teacher, x, start)
    spread = float(ref.std())
    final = _ddim(student, x, rounds[-1].grid)
    assert float((final - ref).square().mean().sqrt()) < 1e-3 * spread
    student.load_state_dict(saved[4])
    four = _ddim(student, x, rounds[0].grid)
    assert float((four - ref).square().mean().sqrt()) < 1e-3 * spread


def test_ddim_target_inverts_the_ddim_step():
    """x~ is the data prediction whose DDIM step from (z, p_i) lands on z'': re-applying the step gives z''."""
    process = make_process("vp", schedule="cosine")
    grid = make_grid(process, 4, "edm")
    g = torch.Generator().manual_seed(0)
    z, z2 = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    i = torch.tensor([0, 1, 2, 3, 2, 0])
    xt = ddim_target(z, z2, grid, i)
    s, sig = torch.tensor(grid.s, dtype=F64)[i, None], torch.tensor(grid.sigma, dtype=F64)[i, None]
    s2, sig2 = torch.tensor(grid.s, dtype=F64)[i + 1, None], torch.tensor(grid.sigma, dtype=F64)[i + 1, None]
    eps = (z - s * xt) / sig
    torch.testing.assert_close(s2 * xt + sig2 * eps, z2, rtol=1e-10, atol=1e-10)
    assert torch.equal(xt[i == 3], z2[i == 3])  # the last step to the data: x~ = z''


def test_heun_teacher_points_and_solve_are_the_exact_flow_to_its_order():
    """The first round's teacher solve (Heun on log-uniform sub-steps) converges to the exact Gaussian flow at second
    order: 8 sub-steps are ~16x closer than 2 (a factor 4^2 for order 2; at least 8 asserted)."""
    process = make_process("vp-sde")
    teacher = _teacher(process)
    t_hi, t_lo = 0.6, 0.05
    x, _ = process.sample_marginal(teacher.sample_data(500, torch.Generator().manual_seed(3)), torch.tensor(t_hi, dtype=F64))
    exact = solve_points(teacher, x, teacher_points(process, t_hi, t_lo, 256), "heun")
    err = [float((solve_points(teacher, x, teacher_points(process, t_hi, t_lo, k), "heun") - exact).norm())
           for k in (2, 8)]
    assert err[0] / err[1] > 8, err
    assert teacher_points(make_process("vp", schedule="cosine"), 40, 0, 2) == [40, 1, 0]


def test_refusals():
    process = make_process("vp-sde")
    with pytest.raises(DiffusionLabError, match="must divide by 8"):
        nested_grids(make_grid(process, 6, "edm"), 3)
    teacher = _teacher(process)
    with pytest.raises(DiffusionLabError, match="unknown teacher solver 'rk4'"):
        distill_model(teacher, teacher, teacher.sample_data(10), make_grid(process, 4, "edm"), 1, teacher_solver="rk4")


TINY = {
    "data": {"name": "ring", "num": 500},
    "process": {"name": "vp", "T": 50},
    "model": {"name": "mlp", "hidden": 16, "depth": 1, "emb_dim": 8},
    "parametrization": {"prediction": "v"},
    "train": {"steps": 3, "batch_size": 16, "checkpoint_every": 3, "log_every": 1, "device": "cpu"},
    "sample": {"sampler": "ddim", "steps": 5},
}


def test_cli_distill_writes_a_run_that_samples_in_its_steps(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    teacher = tmp_path / "teacher"
    assert main(["train", str(cfg), "--out", str(teacher), "--quiet"]) == 0
    student = tmp_path / "student"
    capsys.readouterr()
    assert main(["distill", "--run", str(teacher), "--out", str(student), "--steps", "2", "--start-steps", "8",
                 "--iterations", "3", "--batch-size", "8", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and [r["steps"] for r in summary["rounds"]] == [4, 2]
    assert (student / "rounds" / "4-steps" / "model.safetensors").is_file()
    out = tmp_path / "x.npy"
    assert main(["sample", "--run", str(student), "--num", "6", "--out", str(out), "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["nfe_per_sample"] == 2 and line["sampler"] == "ddim" and np.isfinite(np.load(out)).all()
    assert main(["sample", "--run", str(student / "rounds" / "4-steps"), "--num", "6", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe_per_sample"] == 4
    assert main(["distill", "--run", str(teacher), "--out", str(student), "--steps", "2", "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["distill", "--run", str(teacher), "--out", str(tmp_path / "s2"), "--steps", "3",
                 "--start-steps", "9", "--quiet"]) == 2
    assert "times a power of 2" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vp", "vp-sde"])
def test_batched_teacher_interval_equals_the_per_interval_solve(name):
    """The first round's teacher, batched over samples of different intervals (per-sample times), equals
    solve_points run interval by interval (the same operations per sample: a few ulps)."""
    from diffusionlab.training.distill import teacher_interval, teacher_table

    process = make_process(name, **({"schedule": "cosine"} if name == "vp" else {}))
    teacher = _teacher(process)
    grid = make_grid(process, 4, "edm")
    table = teacher_table(grid, 3)
    g = torch.Generator().manual_seed(4)
    i = torch.tensor([0, 3, 1, 2, 3, 0, 2, 1])
    z = torch.randn(8, 3, generator=g, dtype=F64) * torch.tensor(grid.sigma, dtype=F64)[i, None]
    for solver in ("heun", "ddim"):
        batched = teacher_interval(teacher, z, table, i, solver)
        for k in range(4):
            rows = i == k
            one = solve_points(teacher, z[rows], teacher_points(process, grid.times[k], grid.times[k + 1], 3), solver)
            torch.testing.assert_close(batched[rows], one, rtol=1e-12, atol=1e-12)
