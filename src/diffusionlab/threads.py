"""How many CPU threads torch uses: one setting for every command.

torch's default is one intra-op thread per core. On a small model (the 8x8 digits U-Net, a 2-D MLP) and on a
machine shared with other work that oversubscribes the cores: the same ``sample`` command took 157 s with torch's
default two threads on a busy 2-core machine and 7.5 s with one. So every command defaults to
:data:`DEFAULT_THREADS` (1) and takes ``--threads N`` (``0``: torch's default, every core); training reads
``train.threads``. GPU runs are not affected (the work is on the device).
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError

DEFAULT_THREADS = 1
#: the most threads a command may ask for (torch crashes on absurd counts such as 100000)
MAX_THREADS = 1024


def check_threads(n, what: str = "--threads") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_THREADS:
        raise DiffusionLabError(f"{what} must be an integer in [0, {MAX_THREADS}] (0: torch's default), got {n!r}")
    return n


def set_threads(n, what: str = "--threads") -> int:
    """Use ``n`` intra-op threads (``0``: leave torch's default); returns the count in use."""
    if check_threads(n, what):
        torch.set_num_threads(n)
    return torch.get_num_threads()
