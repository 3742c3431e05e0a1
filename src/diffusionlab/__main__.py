"""``python -m diffusionlab`` (and ``torchrun -m diffusionlab``) runs the CLI."""

import sys

try:
    from diffusionlab.cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI is still being imported: one line, no traceback
    print("diffusionlab: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
