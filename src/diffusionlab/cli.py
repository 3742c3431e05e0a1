"""The ``diffusionlab`` command line.

Every subcommand is a function ``cmd_NAME(args) -> int`` registered in :func:`build_parser`. User errors
(:class:`~diffusionlab.errors.DiffusionLabError`, missing files, malformed YAML/JSON) are printed as one line
``diffusionlab: error: ...`` on stderr with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
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


MAX_MESSAGE = 2000


def one_line(message) -> str:
    """An error message as one bounded line: line breaks (a library's multi-line error) become spaces, and the
    whole is at most :data:`MAX_MESSAGE` characters."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _error(message, quiet: bool = False) -> int:
    if not quiet:
        print(f"diffusionlab: error: {one_line(message)}", file=sys.stderr, flush=True)
    return 2


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training run's own handling (start-up, sampling): stop with one line."""


def _on_sigterm(signum, frame):
    raise Terminated("terminated (SIGTERM)")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors and operating-system errors are one line on stderr and exit status 2 (printed once,
    by rank 0, under ``torchrun``); Ctrl-C or SIGTERM outside training is one line too (exit 130 / 143)."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The process's entry point (the ``diffusionlab`` script and ``python -m diffusionlab``): :func:`main`, then
    the exit. After Ctrl-C or SIGTERM (exit 130 / 143) the process leaves at once (:func:`exit_now`): an interrupt
    that landed inside ``import torch`` leaves a half-initialised extension whose finalisation can hang or end the
    process by the signal itself; every file was already written atomically or not at all."""
    code = main()
    if code in (130, 143):
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> None:
    """Flush stdout and stderr and end the process with ``code`` without interpreter finalisation, ignoring further
    SIGINT / SIGTERM."""
    import os
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _exit_at_start_up(signum, frame):
    """SIGINT / SIGTERM before the command runs: nothing is written yet, so say so in one line and leave at once.
    Never raises: a ``KeyboardInterrupt`` raised into Python code that ``import torch`` runs from C++ (pybind11)
    cannot be caught and aborts the process (``terminate called after ... error_already_set``)."""
    import os
    import signal

    os.write(2, f"diffusionlab: {'interrupted' if signum == signal.SIGINT else 'terminated (SIGTERM)'}\n".encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def _start_up():
    """While the parser is built (the catalogues import torch): Ctrl-C and SIGTERM end the process at once
    (:func:`_exit_at_start_up`), where they would have raised; an ignored signal stays ignored. In the main
    thread only; the handlers before are restored after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in saved.items():
        if handler not in (signal.SIG_IGN, None):
            signal.signal(sig, _exit_at_start_up)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _main(argv):
    try:
        with _start_up():
            parser = build_parser()
            args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0 if not argv else 2
        return int(args.func(args) or 0)
    except DiffusionLabError as e:
        from diffusionlab.training.distributed import quiet_rank

        return _error(e, quiet=quiet_rank())
    except FileNotFoundError as e:
        return _error(f"file not found: {e.filename or e}")
    except BrokenPipeError:  # the reader went away (``diffusionlab oracle example | head``): nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return _error(f"{e.strerror or e}{where}")
    except MemoryError:
        return _error("out of memory (the input asks for more than this machine has)")
    except KeyboardInterrupt as e:
        text = str(e) or "interrupted"
        print(f"diffusionlab: {one_line(text)}", file=sys.stderr, flush=True)
        if isinstance(e, Terminated):
            return 143
        return 128 + getattr(e, "signum", 2)


if __name__ == "__main__":
    run()
