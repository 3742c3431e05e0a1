"""The ``diffusionlab`` command line.

Every subcommand is a function ``cmd_NAME(args) -> int`` registered in :func:`build_parser`. User errors
(:class:`~diffusionlab.errors.DiffusionLabError`, missing files, malformed YAML/JSON) are printed as one line
``diffusionlab: error: ...`` on stderr with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from diffusionlab import __version__
from diffusionlab.errors import DiffusionLabError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other user error
        raise DiffusionLabError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="diffusionlab",
        description="Diffusion generative models with noise correlated across frames: train, sample, evaluate.",
    )
    p.add_argument("--version", action="version", version=f"diffusionlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _register(sub)
    return p


def _register(sub) -> None:
    """Add the subcommands (each module adds its own arguments)."""
    from diffusionlab import commands

    commands.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0 if not argv else 2
        return int(args.func(args) or 0)
    except DiffusionLabError as e:
        print(f"diffusionlab: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"diffusionlab: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusionlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
