"""The conditioning flags of ``diffusionlab sample`` and ``diffusionlab oracle sample``, and the config keys (the
commands that run them: :func:`diffusionlab.commands.cmd_sample` and :func:`diffusionlab.oracles.cli.cmd_oracle_sample`).

``sample``::

    diffusionlab sample --run DIR --class 0,1,...,9 --guidance 2 [--guidance-interval 0.3,5] --num 100 --out g.png
    diffusionlab sample --run DIR --known KNOWN.npz --mask MASK.npz --method smc:particles=32 --out filled.npz

``--class`` spreads the classes over ``--num`` samples in contiguous blocks (a PNG grid then has one row per class);
``--guidance W`` is classifier-free guidance (1 the conditional model, 0 the unconditional one); the run's sampler,
steps, grid and ``--set`` options apply. ``--known`` (``.npz`` key ``x`` or ``.npy``, display space as ``sample``
writes it, one known row per output sample) and ``--mask`` (``.npz`` key ``mask`` or ``.npy``, 1 = known,
broadcastable to the known values) select the conditional ``--method`` (default ``smc``) of
:data:`~diffusionlab.conditioning.methods.CONDITIONAL_METHODS`; ``--steps``, ``--grid`` and ``--set`` then apply
to the method. A run's ``sample:`` section may hold the same as keys: ``classes``, ``guidance``,
``guidance_interval``, ``known``, ``mask``, ``method`` (flags override them).
"""

from __future__ import annotations

from diffusionlab.errors import DiffusionLabError

#: keys of a ``sample:`` section that configure conditioning (not sampler options)
CONDITIONING_KEYS = ("classes", "guidance", "guidance_interval", "known", "mask", "method")


def add_class_arguments(p) -> None:
    """``--class``, ``--guidance``, ``--guidance-interval`` (``sample`` and ``evaluate``)."""
    p.add_argument("--class", dest="classes", default=None, metavar="K[,K2,...]",
                   help="class label(s) of a class-conditional model, spread over the samples in blocks (default: the "
                        "run's sample.classes)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight (1: conditional model, 0: unconditional; default: the run's "
                        "sample.guidance, else 1)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only where the noise level sigma/s lies in (LO, HI] (Kynkaanniemi et al. 2024)")


def add_arguments(p, oracle: bool = False) -> None:
    """The conditioning flags (module docstring); ``oracle``: the ``.npy`` forms of ``oracle sample``."""
    from diffusionlab.conditioning.methods import method_names

    names = ", ".join(method_names())
    add_class_arguments(p)
    suffix = ".npy, (N, D) or (N, F, d)" if oracle else ".npz key x (display space) or .npy"
    p.add_argument("--known", default=None, metavar="KNOWN", help=f"known values, one row per sample ({suffix})")
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="1 where known, broadcastable to the samples (" + (".npy)" if oracle else ".npz key mask or .npy)"))
    p.add_argument("--method", default=None, metavar="NAME",
                   help=f"conditional sampling method with --known/--mask: {names} (options inline: smc:particles=32; "
                        "default smc)")


def resolve(args, section: dict | None = None) -> dict:
    """The conditioning of a command: its flags over the ``sample:`` section's keys (``section``); checked for
    consistency. Empty when nothing asks for conditioning."""
    from diffusionlab.conditioning.generate import parse_classes, parse_interval
    from diffusionlab.conditioning.methods import parse_method

    sec = dict(section or {})
    out = {
        "classes": args.classes if args.classes is not None else sec.get("classes"),
        "guidance": args.guidance if args.guidance is not None else sec.get("guidance"),
        "interval": args.guidance_interval if args.guidance_interval is not None else sec.get("guidance_interval"),
        "known": args.known if args.known is not None else sec.get("known"),
        "mask": args.mask if args.mask is not None else sec.get("mask"),
        "method": args.method if args.method is not None else sec.get("method"),
    }
    if out["classes"] is not None:
        out["classes"] = parse_classes(out["classes"])
    out["interval"] = parse_interval(out["interval"])
    if out["interval"] is not None and out["classes"] is None:
        raise DiffusionLabError("a guidance interval (--guidance-interval, sample.guidance_interval) needs classes "
                                "(--class, sample.classes)")
    if out["guidance"] is not None:
        from diffusionlab.conditioning.guidance import check_guidance

        g = out["guidance"] = check_guidance(out["guidance"])
        if out["classes"] is None and g != 0.0:
            raise DiffusionLabError("guidance (--guidance, sample.guidance) needs classes to guide towards (--class "
                                    "K[,K2,...], sample.classes)")
    if out["interval"] is not None:
        from diffusionlab.conditioning.guidance import check_interval

        check_interval(out["interval"])
    if (out["known"] is None) != (out["mask"] is None):
        raise DiffusionLabError("known values and a mask go together (--known and --mask, sample.known and sample.mask)")
    if out["known"] is None and args.method is not None:
        raise DiffusionLabError("--method needs --known and --mask (the values to condition on)")
    if out["method"] is not None:
        parse_method(out["method"])
    if out["known"] is not None:
        out["method"], out["method_options"] = parse_method(out["method"] or "smc")
    else:
        out["method"] = None
    if all(v is None for v in (out["classes"], out["guidance"], out["known"])):
        return {}
    return out


def resolve_classes(args, section: dict | None = None) -> dict:
    """The class conditioning of ``evaluate`` (:func:`add_class_arguments`' flags over the ``sample:`` section's
    ``classes``, ``guidance``, ``guidance_interval``); a section with known values is refused (evaluate scores
    unconditional or class-conditional samples)."""
    from types import SimpleNamespace

    flags = SimpleNamespace(classes=getattr(args, "classes", None), guidance=getattr(args, "guidance", None),
                            guidance_interval=getattr(args, "guidance_interval", None), known=None, mask=None,
                            method=None)
    out = resolve(flags, section)
    if out.get("known") is not None:
        raise DiffusionLabError("evaluate scores samples drawn without known values; this run's sample section has "
                                "known/mask (remove them, or score the filled samples yourself)")
    return out


def check_section(section: dict) -> None:
    """Validate the conditioning keys of a ``sample:`` section (at config time; the files are read when sampling)."""
    from types import SimpleNamespace

    resolve(SimpleNamespace(classes=None, guidance=None, guidance_interval=None, known=None, mask=None, method=None),
            section)


def set_options(items, example: str = "a method option, e.g. particles=32") -> dict:
    """``--set KEY=VALUE`` items of a sampling command as a dict of options (a leading ``sample.`` dropped, the
    values parsed as YAML scalars); ``example`` names what a KEY is, for the error."""
    from diffusionlab.configuration import parse_scalar

    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DiffusionLabError(f"--set expects KEY=VALUE ({example}), got {item!r}")
        out[key.removeprefix("sample.")] = parse_scalar(raw)
    return out


__all__ = ["CONDITIONING_KEYS", "add_arguments", "add_class_arguments", "resolve", "resolve_classes", "check_section",
           "set_options"]
