"""``python -m diffusionlab`` (and ``torchrun -m diffusionlab``) runs the CLI."""

import sys

from diffusionlab.cli import main

sys.exit(main())
