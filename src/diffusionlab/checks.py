"""Validation of user options (network and dataset configs), each failure a :class:`DiffusionLabError`.

Used by every package (networks, datasets, processes, samplers, the config): every message names the option, the bad
value and what is allowed.
"""

from __future__ import annotations

import os
import reprlib
from typing import Iterable, Mapping

from diffusionlab.errors import DiffusionLabError

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 3, 6, 6, 6
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def brief(value, limit: int = 80) -> str:
    """A bounded ``repr`` of a user value for messages: nested containers cut after a few items and levels
    (``reprlib``), the whole at most ``limit`` characters. A YAML alias bomb (a few lines that expand to
    billions of items) is never expanded to print it."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def limit(name: str, default: int) -> int:
    """A size limit with its override: the environment variable ``DIFFUSIONLAB_MAX_<NAME>`` (an integer) if set,
    else ``default``. Messages that refuse a size name the variable, for users who truly want more."""
    var = f"DIFFUSIONLAB_MAX_{name.upper()}"
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(float(raw)) if raw.strip().lower() not in ("inf", "none") else 2**62
    except ValueError:
        raise DiffusionLabError(f"{var} must be an integer, got {raw!r}") from None
    if value < 1:
        raise DiffusionLabError(f"{var} must be >= 1, got {raw!r}")
    return value


def at_most(what: str, value: int, name: str, default: int, unit: str = "") -> int:
    """``value`` if it is at most :func:`limit` ``(name, default)``; else an error naming the override."""
    top = limit(name, default)
    if value > top:
        raise DiffusionLabError(f"{what} = {value}{unit} exceeds the limit of {top}{unit}; set "
                                f"DIFFUSIONLAB_MAX_{name.upper()}={value} to allow it")
    return value


def check_keys(cfg: Mapping, allowed: Iterable[str], what: str) -> None:
    """Raise if ``cfg`` has a key outside ``allowed``; the message lists the allowed keys."""
    allowed = list(allowed)
    unknown = [k for k in cfg if k not in allowed]
    if unknown:
        raise DiffusionLabError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {what}; allowed: "
            f"{', '.join(allowed) if allowed else '(none)'}"
        )


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DiffusionLabError(f"{name} must be an integer >= {minimum}, got {brief(value)}")
    return value


def real(name: str, value, low: float | None = None, high: float | None = None, *, open_low: bool = False,
         open_high: bool = False) -> float:
    """``value`` as a finite float inside ``[low, high]`` (ends open when asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise DiffusionLabError(f"{name} must be a finite number, got {brief(value)}")
    v = float(value)
    lo_bad = low is not None and (v <= low if open_low else v < low)
    hi_bad = high is not None and (v >= high if open_high else v > high)
    if lo_bad or hi_bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise DiffusionLabError(
            f"{name} must lie in {'(' if open_low else '['}{lo}, {hi}{')' if open_high else ']'}, got {brief(value)}"
        )
    return v


def int_tuple(name: str, value, *, allow_empty: bool = False) -> tuple[int, ...]:
    """A list/tuple of positive ints as a tuple (YAML gives lists)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise DiffusionLabError(f"{name} must be a list of positive integers, got {brief(value)}")
    if not value and not allow_empty:
        raise DiffusionLabError(f"{name} must be a non-empty list of positive integers, got {brief(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DiffusionLabError(f"{name} must be a list of positive integers, got {brief(value)}")
    return tuple(value)


def choice(name: str, value, allowed: Iterable[str]):
    """``value`` if it is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise DiffusionLabError(f"{name} must be one of {', '.join(map(str, allowed))}; got {brief(value)}")
    return value
