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


@pytest.fixture(autouse=True)
def _signals():
    """Every test leaves SIGINT and SIGTERM as it found them (handlers and the blocked set), so that no test's
    handling leaks into the next one or into the processes it starts. Tests run in the main thread, the only one
    where Python sets signal handlers: a runner that moves them elsewhere (pytest-xdist before 3.6 with execnet 2.1)
    fails here with that reason, not by a signal test killing its worker."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.fail("tests must run in the main thread (signal handlers); with pytest -n, install pytest-xdist >= 3.6")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    for s, h in handlers.items():
        if signal.getsignal(s) is not h and h is not None:
            signal.signal(s, h)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
