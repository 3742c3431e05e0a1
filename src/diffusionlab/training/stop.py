"""Clean stops of a training run: SIGTERM, SIGINT (Ctrl-C) and a wall-clock budget (``train --max-minutes``).

``with StopRequest(max_minutes) as stop:`` installs handlers for SIGTERM and SIGINT (in the main thread; the
previous handlers come back on exit). The first signal only records the request: the trainer finishes the step
it is in, writes a checkpoint, says so and returns normally (exit status 0), so a batch scheduler's SIGTERM or a
Ctrl-C loses nothing. A second signal stops at once (:class:`Interrupted`, a ``KeyboardInterrupt``: every atomic
write removes its temporary, the previous checkpoint stays intact). :meth:`StopRequest.requested` also turns
true once the budget is spent.
"""

from __future__ import annotations

import math
import signal
import threading
import time

from diffusionlab.errors import DiffusionLabError

SIGNALS = ("SIGTERM", "SIGINT")


class Interrupted(KeyboardInterrupt):
    """A second stop signal: stop at once (``signum``: the signal; the CLI exits with 128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def check_minutes(value) -> float | None:
    """``--max-minutes``: a positive finite number of minutes (None: no budget)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DiffusionLabError(f"--max-minutes must be a positive number of minutes, got {value!r}")
    return float(value)


class StopRequest:
    """Signals and a budget turned into a request to stop after the current step (module docstring)."""

    def __init__(self, max_minutes: float | None = None):
        self.max_minutes = check_minutes(max_minutes)
        self.t0 = time.monotonic()
        self.reason: str | None = None
        self.signals = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals > 1:
            raise Interrupted(f"a second {name}: stopped at once", signum)
        self.reason = name  # no printing here: a handler may run in the middle of another write to stderr

    def requested(self) -> str | None:
        """The reason to stop (a signal's name or the budget), or None."""
        if self.reason is None and self.max_minutes is not None \
                and time.monotonic() - self.t0 >= 60.0 * self.max_minutes:
            self.reason = f"the --max-minutes budget of {self.max_minutes:g} min"
        return self.reason

    def describe(self) -> str:
        r = self.reason or ""
        return f"by {r}" if r.startswith("SIG") else f"after {r}"
