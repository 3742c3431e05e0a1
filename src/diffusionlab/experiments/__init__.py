"""Experiments run from the CLI as ``diffusionlab experiment NAME``.

- ``noise-prior`` (:mod:`diffusionlab.experiments.noise_prior`) -- the same video model trained at equal compute
  with i.i.d., mixed, progressive and fitted frame-noise covariances C; bits/dim and temporal statistics.
- ``class-guidance``, ``video-prediction`` (:mod:`diffusionlab.experiments.conditioning`) -- per-class accuracy and
  FD of a class-conditional digits run against the guidance weight; video prediction from the first frames of
  held-out videos, the digit's identity measured.

:func:`register` adds the ``experiment`` command and its subcommands to the CLI's subparsers.
"""

from __future__ import annotations


def register(sub) -> None:
    """Add ``experiment`` (with one subcommand per experiment) to the CLI's subparsers ``sub``."""
    from diffusionlab.experiments import conditioning, noise_prior

    p = sub.add_parser("experiment", help="run a packaged experiment (noise-prior, class-guidance, video-prediction)")
    inner = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    noise_prior.register(inner)
    conditioning.register(inner)
    p.set_defaults(func=lambda args: p.print_help() or 2)


__all__ = ["register"]
