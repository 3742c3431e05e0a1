"""The conditioning flags of ``diffusionlab sample`` and ``diffusionlab oracle sample``, and the config keys.

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

import json
import time
from pathlib import Path

from diffusionlab.errors import DiffusionLabError

#: keys of a ``sample:`` section that configure conditioning (not sampler options)
CONDITIONING_KEYS = ("classes", "guidance", "guidance_interval", "known", "mask", "method")


def add_arguments(p, oracle: bool = False) -> None:
    """The conditioning flags (module docstring); ``oracle``: the ``.npy`` forms of ``oracle sample``."""
    from diffusionlab.conditioning.methods import method_names

    names = ", ".join(method_names())
    p.add_argument("--class", dest="classes", default=None, metavar="K[,K2,...]",
                   help="class label(s) of a class-conditional model, spread over the samples in blocks")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight (1: conditional model, 0: unconditional; default 1)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only where the noise level sigma/s lies in (LO, HI] (Kynkaanniemi et al. 2024)")
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
        g = out["guidance"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g != g or g in (float("inf"), float("-inf")):
            raise DiffusionLabError(f"guidance must be a finite number, got {g!r}")
        if out["classes"] is None and float(g) != 0.0:
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


def check_section(section: dict) -> None:
    """Validate the conditioning keys of a ``sample:`` section (at config time; the files are read when sampling)."""
    from types import SimpleNamespace

    resolve(SimpleNamespace(classes=None, guidance=None, guidance_interval=None, known=None, mask=None, method=None),
            section)


def run_sample(args, cfg: dict, ds, model, scfg: dict, cond: dict, out: Path) -> int:
    """``diffusionlab sample`` with conditioning (module docstring): writes ``out`` and prints one JSON line."""
    from diffusionlab.commands import _write_samples
    from diffusionlab.conditioning.generate import generate_conditional, load_known
    from diffusionlab.samplers import get_sampler
    from diffusionlab.training.sampling import sampler_options

    device = next(model.parameters()).device
    kw = dict(classes=cond.get("classes"), guidance=cond.get("guidance"), interval=cond.get("interval"))
    num = args.num
    if cond.get("known") is not None:
        if getattr(args, "sampler", None) is not None:
            raise DiffusionLabError("--sampler does not apply with --known: the conditional --method samples "
                                    "(its --steps, --grid and --set options)")
        known, mask = load_known(cond["known"], cond["mask"], ds.sample_shape,
                                 None if ds.kind == "points" else _to_model)
        if num is None:
            num = known.shape[0]
        elif known.shape[0] == 1:
            known, mask = known.expand(num, *known.shape[1:]), mask.expand(num, *mask.shape[1:])
        elif known.shape[0] != num:
            raise DiffusionLabError(f"--num {num} disagrees with the {known.shape[0]} rows of --known (one known row "
                                    "per sample, or one row for all)")
        opts = dict(cond["method_options"])
        opts.update(_set_options(args.set))
        if args.eta is not None:
            raise DiffusionLabError("--eta is a ddim option; with --method use --set KEY=VALUE for the method's options")
        kw.update(known=known, mask=mask, method=cond["method"], method_options=opts, grid=args.steps, kind=args.grid)
    else:
        num = 64 if num is None else num
        spec = get_sampler(scfg["sampler"])
        kw.update(sampler=spec, sampler_options=sampler_options(scfg), grid=scfg.get("steps"), kind=scfg.get("grid"))
    t0 = time.time()
    x, info = generate_conditional(model, ds.sample_shape, num, args.seed, device, progress=not args.quiet, **kw)
    disp = ds.to_display(x)
    per_class = num // len(cond["classes"]) if cond.get("classes") and num % len(cond["classes"]) == 0 else None
    if out.suffix == ".png" and ds.kind == "images" and per_class:
        from diffusionlab.io import atomic_path
        from diffusionlab.plotting import save_image_grid

        with atomic_path(out) as tmp:
            save_image_grid(disp.float().clamp(0, 1), tmp, nrow=per_class)
    else:
        _write_samples(disp, ds.kind, out)
    name = info.get("method") or scfg["sampler"]
    print(json.dumps({"out": str(out), "num": num, "sampler": name, **info, "seconds": round(time.time() - t0, 2)}))
    return 0


def _to_model(x):
    from diffusionlab.data.scaling import to_model

    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise DiffusionLabError(f"--known values of images/videos are in display space [0, 1], got {lo:.4g}..{hi:.4g}")
    return to_model(x.clamp(0, 1))


def _set_options(items) -> dict:
    from diffusionlab.configuration import parse_scalar

    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DiffusionLabError(f"--set expects KEY=VALUE (a method option, e.g. particles=32), got {item!r}")
        out[key.removeprefix("sample.")] = parse_scalar(raw)
    return out


def _oracle_mask(path, oracle, n: int):
    """A mask file (``.npy``, or ``.npz`` key ``mask``) for ``n`` rows of the oracle's samples: broadcastable to
    ``(n, *sample_shape)``, or flattened over the ``D`` coordinates."""
    import torch

    from diffusionlab.conditioning.generate import _read_array
    from diffusionlab.utils import as_mask

    m = torch.as_tensor(_read_array(path, "mask", "--mask"))
    shape = tuple(oracle.sample_shape)
    if len(shape) > 1 and m.ndim >= 1 and m.shape[-1] == oracle.dim and tuple(m.shape[-len(shape):]) != shape:
        m = m.reshape(*m.shape[:-1], *shape)
    mask = as_mask(m, (n, *shape))
    if not bool(mask.any()):
        raise DiffusionLabError(f"--mask {path} marks nothing as known (1 = known)")
    return mask


def run_oracle_sample(args, cond: dict) -> int:
    """``diffusionlab oracle sample`` with conditioning: ``--class``/``--guidance`` on a mixture spec with
    ``"classes"`` (the class-conditional oracle), ``--known``/``--mask`` (``.npy``, ``(N, D)`` or ``(N, F, d)``; one
    known row per output row) with ``--method`` within ``--nfe`` evaluations per sample (steps by the method's
    budget rule). Writes ``--out`` and prints one JSON object."""
    import torch

    from diffusionlab.conditioning.generate import generate_conditional
    from diffusionlab.oracles.bench import plan, resolve_spec
    from diffusionlab.oracles.cli import _check_out, _device, _load_points, _oracle, _save_npy

    out = _check_out(args.out)
    if cond.get("classes") is not None:
        from diffusionlab.oracles.conditional import ClassConditionalMixtureOracle

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        oracle = ClassConditionalMixtureOracle.from_spec(resolve_spec(args.gmm), args.process, args.noise,
                                                         device=_device(args.device))
    else:
        oracle = _oracle(args)
    dev = oracle.means.device
    process = oracle.process
    f64 = torch.float64
    kw = dict(classes=cond.get("classes"), guidance=cond.get("guidance"), interval=cond.get("interval"))
    if cond.get("known") is not None:
        if args.sampler is not None:
            raise DiffusionLabError("--sampler does not apply with --known: --method samples (within --nfe)")
        if args.init is not None:
            raise DiffusionLabError("--init does not apply with --known: the method draws its own start")
        known = _load_points(cond["known"], oracle, "--known")
        mask = _oracle_mask(cond["mask"], oracle, known.shape[0])
        num = known.shape[0] if args.num is None else args.num
        if num != known.shape[0]:
            raise DiffusionLabError(f"--num {num} disagrees with the {known.shape[0]} rows of --known (one per sample)")
        spec, opts = cond["method"], dict(cond["method_options"])
        if args.nfe is None:
            raise DiffusionLabError(f"--method {spec.name} needs --nfe (its evaluation budget per sample)")
        steps = spec.steps_for_budget(args.nfe, process, spec.resolve(opts))
        if process.discrete:
            steps = min(steps, process.T)
        kw.update(known=known.to(f64), mask=mask, method=spec, method_options=opts, grid=steps,
                  kind=None if args.grid == "auto" else args.grid)
        name = spec.name
    else:
        if args.sampler is None:
            raise DiffusionLabError("oracle sample needs --sampler (or --known, --mask and --method)")
        if args.init is not None:
            raise DiffusionLabError("--init does not combine with --class (the start is drawn per class batch)")
        num = 1000 if args.num is None else args.num
        p = plan(args.sampler, process, args.nfe, args.grid, args.eps)
        kw.update(sampler=p.spec, sampler_options=p.options, grid=p.grid)
        name = args.sampler
    if isinstance(num, bool) or num < 1:
        raise DiffusionLabError(f"--num must be an integer >= 1, got {num}")
    t0 = time.time()
    x, info = generate_conditional(oracle, oracle.sample_shape, num, args.seed + 1, dev, **kw)
    if not torch.isfinite(x).all():
        raise DiffusionLabError(f"{name} produced non-finite samples; try a larger --nfe")
    _save_npy(out, x.to(f64).numpy())
    print(json.dumps({"sampler": name, "nfe_budget": args.nfe, **info, "process": args.process, "noise": args.noise,
                      "num": int(x.shape[0]), "shape": list(x.shape), "seed": args.seed, "out": str(out),
                      "seconds": round(time.time() - t0, 3)}))
    return 0


__all__ = ["CONDITIONING_KEYS", "add_arguments", "resolve", "check_section", "run_sample", "run_oracle_sample"]
