"""The one progress display of the package: tqdm on a terminal, plain lines in a log.

On a terminal :func:`progress` is a tqdm bar (rate and ETA included). When the stream is not a terminal (stderr
redirected to a file, a CI log) carriage-return updates would write thousands of partial lines, so a line is
printed instead whenever another ``every_percent`` of the total is done or ``every_seconds`` have passed, and at
the end: ``train: 40% 1200/3000 [00:31<00:46, 38.5 it/s] loss=0.0310``. Both show the same postfix.
"""

from __future__ import annotations

import sys
import time

EVERY_PERCENT = 10
EVERY_SECONDS = 30.0


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Silent:
    """What a disabled display is: iterates and ignores updates."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LineProgress(_Silent):
    """Progress as occasional full lines (module docstring)."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", initial: int = 0, stream=None,
                 every_percent: float = EVERY_PERCENT, every_seconds: float = EVERY_SECONDS):
        super().__init__(iterable)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial
        self.total, self.desc, self.n, self.start_n = total, desc, initial, initial
        self.stream = stream if stream is not None else sys.stderr
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.t0 = self.t_last = time.monotonic()
        self.pct_last = self._percent()
        self.postfix = ""
        self.closed = False

    def __iter__(self):
        for item in super().__iter__():
            yield item
            self.update(1)
        self.close()

    def _percent(self) -> float:
        return 100.0 * self.n / self.total if self.total else 0.0

    def line(self) -> str:
        """The current state as one line."""
        elapsed = time.monotonic() - self.t0
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            eta_s = _clock(eta) if eta == eta else "?"
            text = f"{head}{self._percent():.0f}% {self.n}/{self.total} [{_clock(elapsed)}<{eta_s}, {rate:.3g} it/s]"
        else:
            text = f"{head}{self.n} [{_clock(elapsed)}, {rate:.3g} it/s]"
        return f"{text} {self.postfix}".rstrip()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        pct = self._percent()
        if (self.total and pct - self.pct_last >= self.every_percent) or now - self.t_last >= self.every_seconds:
            self._emit()

    def _emit(self) -> None:
        self.t_last, self.pct_last = time.monotonic(), self._percent()
        print(self.line(), file=self.stream, flush=True)

    def set_postfix(self, **kw) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.start_n:
                self._emit()


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0,
             stream=None, leave: bool = False):
    """A progress display over ``iterable`` (or updated by hand with ``update(n)``): tqdm on a terminal, lines
    otherwise (module docstring), nothing when not ``enabled``. Supports ``update``, ``set_postfix``, ``close`` and
    iteration."""
    if not enabled:
        return _Silent(iterable)
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, dynamic_ncols=True, file=stream)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, stream=stream)
