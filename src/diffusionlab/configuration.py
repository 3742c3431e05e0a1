"""Configuration: safe YAML, and one catalogue per kind of thing, mapping names to constructors.

YAML is read with PyYAML's safe loader with YAML 1.2 floats (``1e-3`` is a number; YAML 1.1 reads it as a string).
Nothing here constructs Python objects from the text, so a config can never execute code.

A :class:`Catalogue` maps names to constructors (processes, covariances, datasets, networks, objectives; samplers
have their own richer catalogue in :mod:`diffusionlab.samplers`). A config section ``{"name": N, **options}`` is
built by calling constructor ``N`` with the options; the options are exactly its keyword parameters and their
defaults are its defaults (diffusers' idea: the config is the constructors' arguments), so defaults live in one
place. :meth:`Catalogue.resolve` returns the full section (every option, defaults filled in), which is what a run
saves: the saved config is read back from the constructors, and training, sampling and the oracles cannot
disagree. Unknown options are refused with the allowed list; basic types come from the annotations.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from diffusionlab.checks import brief
from diffusionlab.errors import DiffusionLabError


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2 floats: ``1e-3`` is a number (YAML 1.1 reads it as a string)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


#: bounds on what a config may hold: its size in bytes, and the number of values once YAML aliases are expanded
#: (a "billion laughs" document of a few lines names 10^9 values through nested aliases) and its nesting depth
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 64


def check_size(data, where: str = "the config") -> None:
    """Refuse ``data`` (parsed YAML) holding more than :data:`MAX_CONFIG_VALUES` values once aliases are expanded,
    or nested deeper than :data:`MAX_CONFIG_DEPTH`; the walk stops at the first excess, so it is bounded too."""
    stack, count = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise DiffusionLabError(f"{where} holds more than {MAX_CONFIG_VALUES} values once its YAML aliases are "
                                    "expanded (an alias bomb?); refused")
        if depth > MAX_CONFIG_DEPTH:
            raise DiffusionLabError(f"{where} is nested more than {MAX_CONFIG_DEPTH} levels deep; refused")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node.keys())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def safe_load(text: str, where: str = "the config"):
    """Parse YAML text safely (no Python objects), reading ``1e-3`` as a float; bounded (:func:`check_size`)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise DiffusionLabError(f"{where} is {len(text)} characters long, more than the {MAX_CONFIG_BYTES} a config "
                                "may have; refused")
    try:
        data = yaml.load(text, Loader=_SafeLoader)
    except RecursionError:
        raise DiffusionLabError(f"{where} is nested too deeply to parse; refused") from None
    check_size(data, where)
    return data


def parse_scalar(raw: str):
    """A command-line value parsed as YAML (``1e-3``, ``true``, ``[1, 2]``); the raw string when it is not YAML."""
    try:
        return safe_load(raw, f"the command-line value {raw[:40]!r}")
    except yaml.YAMLError:
        return raw


def yaml_error(e: yaml.YAMLError, where: str) -> DiffusionLabError:
    """A one-line error for malformed YAML in ``where``, with the line and column when known."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return DiffusionLabError(f"malformed YAML in {where}{at}: {getattr(e, 'problem', e)}")


# ---- one catalogue per kind of thing ------------------------------------------------------------------------------
_EMPTY = inspect.Parameter.empty


def _check_type(where: str, value, annotation):
    """Basic type checks from a constructor's annotation (``int``, ``float``, ``bool``, ``str``, ``list``):
    a bool is never a number, a number is finite, and nothing is converted silently (``1.7`` is not an int)."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    ann = ann.replace(" ", "")
    if value is None and ("None" in ann or ann in ("", "Any")):
        return value
    allowed = set(ann.split("|"))
    if allowed & {"int", "float", "bool", "str", "list", "tuple", "dict"} == set():
        return value  # an annotation this check does not know: the constructor validates
    if isinstance(value, bool):
        if "bool" in allowed:
            return value
    elif isinstance(value, int):
        if allowed & {"int", "float"}:
            return value
    elif isinstance(value, float):
        if "float" in allowed:
            if not math.isfinite(value):
                raise _error(f"{where} must be a finite number, got {brief(value)}")
            return value
    elif isinstance(value, str):
        if "str" in allowed:
            return value
    elif isinstance(value, (list, tuple)):
        if allowed & {"list", "tuple"}:
            return value
    elif isinstance(value, dict) and "dict" in allowed:
        return value
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "list": "a list", "tuple": "a list", "dict": "a mapping"}
    want = " or ".join(dict.fromkeys(names[a] for a in allowed if a in names))
    if "None" in allowed:
        want += " or null"
    raise _error(f"{where} must be {want}, got {brief(value)}")


def _error(msg: str) -> DiffusionLabError:
    return DiffusionLabError(msg)


@dataclass
class Entry:
    """One registered constructor: its options are the factory's keyword parameters (defaults live there, and
    only there); ``context`` names the parameters the caller supplies (the data's sample shape, the process, ...)."""

    name: str
    factory: Callable
    kind: str
    context: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The options: the factory's keyword parameters, or those of ``meta["options_of"]`` (a class whose
        constructor the factory forwards to) less ``meta["inferred"]`` and the context."""
        target = self.meta.get("options_of", self.factory)
        skip = set(self.context) | set(self.meta.get("inferred", ())) | {"self"}
        sig = inspect.signature(target)
        return {k: p for k, p in sig.parameters.items() if k not in skip
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def defaults(self) -> dict[str, Any]:
        return {k: copy.deepcopy(p.default) for k, p in self.parameters().items() if p.default is not _EMPTY}

    def resolve(self, options: dict, section: str | None = None) -> dict:
        """The options checked (unknown keys refused with the allowed list, required ones present, basic types
        from the annotations) and completed with the factory's defaults; ``name`` first."""
        where = section or self.kind
        aliases = self.meta.get("aliases", {})
        options = {aliases.get(k, k): v for k, v in options.items()}
        params = self.parameters()
        unknown = [k for k in options if k not in params]
        if unknown:
            allowed = ", ".join(params) or "none"
            if self.name == self.kind:  # a section of its own (train, sample, parametrization)
                raise DiffusionLabError(f"unknown key {where}.{unknown[0]}; allowed: {allowed}")
            raise DiffusionLabError(f"unknown option(s) {', '.join(map(repr, unknown))} for {self.kind} "
                                    f"{self.name!r}; allowed: {allowed}")
        missing = [k for k, p in params.items() if p.default is _EMPTY and k not in options]
        if missing:
            raise DiffusionLabError(f"{self.kind} {self.name!r} needs option(s) {', '.join(missing)}")
        for k, v in options.items():
            _check_type(f"{where}.{k}", v, params[k].annotation)
        return {**self.defaults(), **copy.deepcopy(dict(options))}

    def build(self, options: dict, **context):
        """``factory(**context, **resolved options)``."""
        return self.factory(**context, **self.resolve(options))

    def doc_lines(self) -> dict[str, str]:
        """``{option: description}`` from the docstrings of ``meta["options_of"]`` and of the factory (``name:
        text`` lines of an ``Args:`` block, or ``- name: text`` items; the factory's win where both describe one)."""
        out: dict[str, str] = {}
        for target in (self.meta.get("options_of", self.factory), self.factory):
            current = None
            for line in (inspect.getdoc(target) or "").splitlines():
                stripped = line.strip().lstrip("-").strip()
                key, sep, text = stripped.partition(":")
                key = key.strip().strip("`")
                if sep and key in self.parameters() and " " not in key:
                    current = key
                    out[key] = text.strip()
                elif current and line.startswith(" " * 8) and stripped:
                    out[current] += " " + stripped
                else:
                    current = None
        return out


class Catalogue:
    """Names to constructors for one kind of thing (processes, covariances, datasets, networks, objectives): the
    one place the CLI, the config, the benchmarks and the docs read. ``register`` is a decorator."""

    def __init__(self, kind: str, section: str | None = None):
        self.kind = kind
        self.section = section
        self.entries: dict[str, Entry] = {}

    def register(self, name: str, context: tuple[str, ...] = (), **meta):
        def deco(factory: Callable) -> Callable:
            self.entries[name] = Entry(name, factory, self.kind, tuple(context), meta)
            return factory
        return deco

    def unregister(self, name: str) -> None:
        self.entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def get(self, name) -> Entry:
        if not isinstance(name, str) or name not in self.entries:
            raise DiffusionLabError(f"unknown {self.kind} {brief(name)}; allowed: {', '.join(self.entries)}")
        return self.entries[name]

    def split(self, cfg) -> tuple[Entry, dict]:
        """``(entry, options)`` of a ``{"name": ..., **options}`` mapping (or a bare name)."""
        if isinstance(cfg, str):
            cfg = {"name": cfg}
        if not isinstance(cfg, dict):
            raise DiffusionLabError(f"a {self.kind} config must be a mapping with a 'name', got {brief(cfg)}")
        opts = dict(cfg)
        if "name" not in opts:
            raise DiffusionLabError(f"a {self.kind} config needs a 'name': one of {', '.join(self.entries)}")
        return self.get(opts.pop("name")), opts

    def resolve(self, cfg) -> dict:
        """The full config of ``cfg`` (``name`` and every option, defaults filled in)."""
        entry, opts = self.split(cfg)
        return {"name": entry.name, **entry.resolve(opts, self.section)}

    def build(self, cfg, **context):
        entry, opts = self.split(cfg)
        return entry.factory(**context, **entry.resolve(opts, self.section))
