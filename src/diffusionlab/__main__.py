"""``python -m diffusionlab`` (and ``torchrun -m diffusionlab``) runs the CLI."""

import sys

try:
    from diffusionlab.cli import run
except KeyboardInterrupt:  # Ctrl-C while the CLI is still being imported: one line, no traceback
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("diffusionlab: interrupted", file=sys.stderr, flush=True)
    os._exit(130)

run()
