"""Reading configuration safely: YAML without Python objects, scalars from the command line.

PyYAML's safe loader with YAML 1.2 floats (``1e-3`` is a number; YAML 1.1 reads it as a string). Nothing here
constructs Python objects from the text, so a config can never execute code.
"""

from __future__ import annotations

import re

import yaml

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


def safe_load(text: str):
    """Parse YAML text safely (no Python objects), reading ``1e-3`` as a float."""
    return yaml.load(text, Loader=_SafeLoader)


def parse_scalar(raw: str):
    """A command-line value parsed as YAML (``1e-3``, ``true``, ``[1, 2]``); the raw string when it is not YAML."""
    try:
        return safe_load(raw)
    except yaml.YAMLError:
        return raw


def yaml_error(e: yaml.YAMLError, where: str) -> DiffusionLabError:
    """A one-line error for malformed YAML in ``where``, with the line and column when known."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return DiffusionLabError(f"malformed YAML in {where}{at}: {getattr(e, 'problem', e)}")
