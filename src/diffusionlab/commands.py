"""Subcommands of the CLI. Each ``register_*`` adds one parser; its handler returns an exit status."""

from __future__ import annotations

from diffusionlab.errors import DiffusionLabError


def cmd_demo(args) -> int:
    raise DiffusionLabError("`diffusionlab demo` arrives with the training issue (#3); it is not implemented yet")


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a U-Net on the bundled digits and sample from it (the main job)")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.set_defaults(func=cmd_demo)
