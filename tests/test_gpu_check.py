"""benches/gpu_check.py --dry-run: the GPU check's code paths on the CPU at tiny sizes, so the script cannot rot.
The real GPU run needs a CUDA device (none in CI): it is not run here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--dry-run", "--json", str(out),
                           "--markdown", str(tmp_path / "check.md")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    status = {r["name"]: r["status"] for r in rep["results"]}
    # every path ran (the trainer accepts every precision of the check: none is "not supported")
    assert all(s == "ok" for s in status.values()), status
    for name in ("train digits fp32", "train digits bf16 compiled", "train video bf16", "sample digits (ddim)",
                 "ddp step, 1-process group", "ode nll (exact divergence)", "train digits fp16",
                 "train digits fp32 accumulate 4", "train cifar10 recipe fp16 (scaler)",
                 "train cifar10 recipe bf16 streamed (2 workers)", "train image folder streamed (2 workers)"):
        assert name in status, name
    rows = {r["name"]: r for r in rep["results"]}
    assert rows["train digits fp16"]["grad_scale"] > 0 and rows["train digits fp32 accumulate 4"]["micro_batches"] == 4
    assert rows["train cifar10 recipe bf16 streamed (2 workers)"]["data"].startswith("streamed, 2 workers")
    assert rep["environment"]["dry_run"] and all(r.get("step_ms") is None for r in rep["results"])
    assert "DRY RUN" in (tmp_path / "check.md").read_text()


def test_gpu_check_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
