"""Shared test settings: deterministic seeds and a headless plotting backend."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

# One intra-op thread: the tests' tensors are small, and on 2 shared cores torch's thread pool made small
# batched ops 30-65x slower (measured by the engineers who wrote the sampler and likelihood tests).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
