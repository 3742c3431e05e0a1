"""Conditioning experiments on trained runs: ``class-guidance`` (digits) and ``video-prediction`` (moving digits).

``diffusionlab experiment class-guidance --run DIR --guidance 0,1,2,3 --per-class 100 --out DIR``
    For each guidance weight ``w``, ``per-class`` samples of every class of a class-conditional digits run
    (:mod:`diffusionlab.conditioning.guidance`, the run's own sampler), scored by the shipped digits classifier
    (:mod:`diffusionlab.metrics.digits`): per class, the fraction of its samples assigned to that class, and the
    digits metric (FD against the 297 held-out test digits, class coverage) of all samples together. Writes
    ``guidance.json``, ``guidance.md`` and one grid per ``w`` (one row per class), plus ``guidance_rows.png``
    (rows = classes, a block of samples per ``w``).

``diffusionlab experiment video-prediction --run DIR --known-frames 2 --num 64 --method smc --out DIR``
    The first ``known-frames`` frames of held-out videos (the dataset's held-out split) are known; a conditional
    method (:mod:`diffusionlab.conditioning.methods`; ``clip_x0`` on unless the method spec says otherwise) fills in
    the rest. Whether the digit's identity is kept is
    measured with the digits classifier on the 8x8 window with most ink of every frame
    (:func:`~diffusionlab.metrics.video.frame_predictions`): the fraction of generated frames assigned to the
    video's label and to the class the classifier sees in the known frames, next to the same for the real
    continuations (the ceiling) and for unconditional samples of the same model (chance: they ignore the known
    frames). Writes ``prediction.json``, ``prediction.md`` and ``prediction.gif`` (top row the real videos, bottom row
    the predictions; the first frames are the known ones). Works on any video run (re-run it when the video recipe
    improves).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError


def _floats(text, what: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DiffusionLabError(f"{what} must be numbers separated by commas, got {text!r}") from None
    if not vals:
        raise DiffusionLabError(f"{what}: give at least one value")
    return vals


def _write(out: Path, name: str, payload: dict, table: str) -> None:
    from diffusionlab.io import atomic_write_bytes

    atomic_write_bytes(out / f"{name}.json", json.dumps(payload, indent=1).encode())
    atomic_write_bytes(out / f"{name}.md", (table + "\n").encode())


# ---- class guidance -----------------------------------------------------------------------------------------------
def class_guidance(run, guidances=(0.0, 1.0, 2.0, 3.0), per_class: int = 100, seed: int = 0, device: str = "auto",
                   out=None, show: int = 8, progress: bool = False, log=print, interval=None, name: str = "guidance") -> dict:
    """The class-guidance table of a class-conditional digits run (module docstring); figures into ``out``, files
    named ``name``; ``interval``: guide only at noise levels ``sigma / s`` in ``(lo, hi]``."""
    from diffusionlab.conditioning.generate import generate_conditional, labels_for
    from diffusionlab.metrics import evaluate_digits
    from diffusionlab.metrics.digits import classifier_accuracy, predict_digits
    from diffusionlab.samplers import get_sampler
    from diffusionlab.training.sampling import load_run, sample_section, sampler_options

    cfg, ds, model = load_run(run, device=device)
    if ds.kind != "images" or tuple(ds.sample_shape) != (1, 8, 8):
        raise DiffusionLabError(f"class-guidance scores 8x8 digits with the digits classifier; {run} has "
                                f"{ds.kind} of shape {tuple(ds.sample_shape)}")
    k = model.num_classes
    if k is None:
        raise DiffusionLabError(f"{run} is not class-conditional (train it with model.num_classes)")
    scfg = sample_section(cfg)
    spec = get_sampler(scfg["sampler"])
    dev = next(model.parameters()).device
    classes = list(range(k))
    num = per_class * k
    labels = labels_for(classes, num, k)
    rows, grids = [], []
    for w in guidances:
        t0 = time.time()
        x, info = generate_conditional(model, ds.sample_shape, num, seed, dev, sampler=spec,
                                       sampler_options=sampler_options(scfg), grid=scfg.get("steps"),
                                       kind=scfg.get("grid"), classes=classes, guidance=w, interval=interval,
                                       progress=progress)
        x01 = ds.to_display(x).float().clamp(0, 1)
        pred, conf = predict_digits(x01)
        per = [float((pred[labels == c] == c).double().mean()) for c in classes]
        metrics = evaluate_digits(x01)
        rows.append({"guidance": w, "class_accuracy": per, "mean_accuracy": sum(per) / k, "fd": metrics["fd"],
                     "class_coverage": metrics["class_coverage"], "confidence": metrics["confidence"],
                     "class_histogram": metrics["class_histogram"], "network_calls": info["network_calls"],
                     "nfe_per_sample": info["nfe_per_sample"], "evaluations_by_kind": info.get("evaluations_by_kind"),
                     "seconds": round(time.time() - t0, 1)})
        log(f"class-guidance: w = {w:g}: mean class accuracy {rows[-1]['mean_accuracy']:.3f}, FD {metrics['fd']:.3f}")
        grids.append(x01.reshape(k, per_class, 1, 8, 8)[:, :show])
    payload = {"run": str(run), "sampler": scfg["sampler"], "steps": rows[0]["nfe_per_sample"], "per_class": per_class,
               "seed": seed, "guidance_interval": None if interval is None else list(interval),
               "classifier_test_accuracy": classifier_accuracy(), "rows": rows}
    table = guidance_table(payload)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _guidance_figures(out, guidances, grids, show, name)
        _write(out, name, payload, table)
    return payload


def guidance_table(payload: dict) -> str:
    """Markdown: one row per class (fraction of its samples the classifier assigns to it), one column per ``w``,
    then the mean, FD and class coverage."""
    rows = payload["rows"]
    head = "| class | " + " | ".join(f"w = {r['guidance']:g}" for r in rows) + " |"
    lines = [head, "| --- |" + " --- |" * len(rows)]
    for c in range(len(rows[0]["class_accuracy"])):
        lines.append(f"| {c} | " + " | ".join(f"{r['class_accuracy'][c]:.2f}" for r in rows) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{r['mean_accuracy']:.3f}**" for r in rows) + " |")
    lines.append("| FD (digits metric) | " + " | ".join(f"{r['fd']:.3f}" for r in rows) + " |")
    lines.append("| class coverage | " + " | ".join(f"{r['class_coverage']:.2f}" for r in rows) + " |")
    return "\n".join(lines)


def _guidance_figures(out: Path, guidances, grids, show: int, name: str = "guidance") -> None:
    from diffusionlab.plotting import save_image_grid

    for w, g in zip(guidances, grids):
        save_image_grid(g.reshape(-1, 1, 8, 8), out / f"{name}_w{w:g}.png", nrow=show, scale=4)
    # rows = classes; per row the blocks of every w side by side, a white column between blocks
    k = grids[0].shape[0]
    blank = torch.ones(k, 1, 1, 8, 8)
    parts = []
    for i, g in enumerate(grids):
        parts.append(g)
        if i < len(grids) - 1:
            parts.append(blank)
    wide = torch.cat(parts, dim=1)
    save_image_grid(wide.reshape(-1, 1, 8, 8), out / f"{name}_rows.png", nrow=wide.shape[1], scale=4)


# ---- video prediction ---------------------------------------------------------------------------------------------
def video_prediction(run, known_frames: int = 2, num: int = 64, method: str = "smc", steps: int | None = None,
                     seed: int = 0, device: str = "auto", out=None, show: int = 8, progress: bool = False,
                     log=print) -> dict:
    """The video-prediction measurement of a video run (module docstring)."""
    from diffusionlab.conditioning.generate import generate_conditional
    from diffusionlab.conditioning.methods import parse_method
    from diffusionlab.data import heldout_dataset
    from diffusionlab.metrics.video import frame_predictions
    from diffusionlab.samplers import get_sampler
    from diffusionlab.training.sampling import load_run, sample_section, sampler_options

    cfg, ds, model = load_run(run, device=device)
    if ds.kind != "videos":
        raise DiffusionLabError(f"video-prediction needs a video run; {run} has {ds.kind}")
    c, f, h, w = ds.sample_shape
    if not 1 <= known_frames < f:
        raise DiffusionLabError(f"--known-frames must be in 1..{f - 1} for {f}-frame videos, got {known_frames}")
    found = heldout_dataset(cfg["data"], seed=cfg["train"]["seed"])
    if found is None:
        raise DiffusionLabError(f"dataset {cfg['data']['name']!r} has no held-out part to predict")
    held, description = found
    if held.labels is None:
        raise DiffusionLabError(f"the held-out videos of {cfg['data']['name']!r} have no labels to check identity")
    num = min(num, len(held))
    real = held.data[:num]
    labels = held.labels[:num]
    mask = torch.zeros(1, 1, f, 1, 1, dtype=torch.bool)
    mask[:, :, :known_frames] = True
    spec, opts = parse_method(method)
    if "clip_x0" in spec.options and "clip_x0" not in opts:
        opts["clip_x0"] = True  # videos live in [-1, 1]; a learned x_theta far outside it derails the known part's pull
    dev = next(model.parameters()).device
    t0 = time.time()
    x, info = generate_conditional(model, ds.sample_shape, num, seed, dev, known=real,
                                   mask=mask.expand(num, c, f, h, w), method=spec, method_options=opts, grid=steps,
                                   progress=progress)
    seconds = time.time() - t0
    scfg = sample_section(cfg)
    free, _ = generate_conditional(model, ds.sample_shape, num, seed + 1, dev, sampler=get_sampler(scfg["sampler"]),
                                   sampler_options=sampler_options(scfg), grid=scfg.get("steps"),
                                   kind=scfg.get("grid"))
    real_d, pred_d, free_d = (ds.to_display(v).float().clamp(0, 1) for v in (real, x, free))
    known_ok = float((pred_d[:, :, :known_frames] - real_d[:, :, :known_frames]).abs().max())

    def scores(videos) -> dict:
        pred, conf = frame_predictions(videos)
        seen = frame_predictions(real_d[:, :, :known_frames])[0]
        seen_class = torch.mode(seen, dim=1).values
        gen = pred[:, known_frames:]
        top = torch.nn.functional.one_hot(gen, 10).sum(1).max(1).values.double()
        return {"label_accuracy": float((gen == labels[:, None]).double().mean()),
                "self_consistency": float((top / gen.shape[1]).mean()),
                "agreement_with_known_frames": float((gen == seen_class[:, None]).double().mean()),
                "last_frame_label_accuracy": float((pred[:, -1] == labels).double().mean()),
                "confidence": float(conf[:, known_frames:].mean())}

    payload = {"run": str(run), "heldout": description, "num": num, "frames": f, "known_frames": known_frames,
               "method": spec.name, "method_options": spec.resolve(opts), "steps": info["steps"],
               "nfe_per_sample": info["nfe_per_sample"], "network_calls": info["network_calls"],
               "seconds": round(seconds, 1), "known_frames_max_abs_error": known_ok,
               "prediction": scores(pred_d), "real": scores(real_d), "unconditional": scores(free_d)}
    log(f"video-prediction: {spec.name}: generated frames assigned to the video's digit "
        f"{payload['prediction']['label_accuracy']:.3f} (real {payload['real']['label_accuracy']:.3f}, "
        f"unconditional {payload['unconditional']['label_accuracy']:.3f})")
    table = prediction_table(payload)
    if out is not None:
        from diffusionlab.video_io import save_gif

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        n = min(show, num)
        save_gif(torch.cat([real_d[:n], pred_d[:n]]), out / "prediction.gif", fps=3.0, ncol=n)
        _write(out, "prediction", payload, table)
    return payload


def prediction_table(payload: dict) -> str:
    """Markdown: the identity measures of the predictions, the real continuations and unconditional samples."""
    lines = ["| videos | generated frames = video's digit | = digit seen in the known frames | last frame = digit | "
             "frames = their video's most frequent digit | classifier confidence |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, name in (("prediction", f"predicted ({payload['method']}, {payload['known_frames']} frames known)"),
                      ("real", "real continuation (ceiling)"), ("unconditional", "unconditional samples (chance)")):
        r = payload[key]
        lines.append(f"| {name} | {r['label_accuracy']:.3f} | {r['agreement_with_known_frames']:.3f} | "
                     f"{r['last_frame_label_accuracy']:.3f} | {r['self_consistency']:.3f} | {r['confidence']:.3f} |")
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------------------------
def register(sub) -> None:
    """Add ``class-guidance`` and ``video-prediction`` to the experiment subparsers ``sub``."""
    p = sub.add_parser("class-guidance", help="per-class accuracy and FD of a class-conditional digits run against w")
    p.add_argument("--run", required=True)
    p.add_argument("--guidance", default="0,1,2,3", help="guidance weights, comma separated (default 0,1,2,3)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class and weight (default 100)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only at noise levels sigma/s in (LO, HI] (Kynkaanniemi et al. 2024)")
    p.add_argument("--name", default="guidance", help="file name stem of the outputs (default guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="directory for guidance.json/.md and the grids")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_guidance)

    p = sub.add_parser("video-prediction", help="predict held-out videos from their first frames; digit identity kept?")
    p.add_argument("--run", required=True)
    p.add_argument("--known-frames", type=int, default=2)
    p.add_argument("--num", type=int, default=64, help="held-out videos (default 64)")
    p.add_argument("--method", default="smc", help="conditional method, options inline (default smc)")
    p.add_argument("--steps", type=int, default=None, help="method steps (default: the method's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="directory for prediction.json/.md/.gif")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_prediction)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise DiffusionLabError(f"{name} must be >= 1, got {value}")
    return value


def _cmd_guidance(args) -> int:
    from diffusionlab.conditioning.generate import parse_interval

    res = class_guidance(args.run, _floats(args.guidance, "--guidance"), _positive("--per-class", args.per_class),
                         args.seed, args.device, args.out, progress=not args.quiet, log=_stderr,
                         interval=parse_interval(args.guidance_interval), name=args.name)
    print(guidance_table(res))
    return 0


def _cmd_prediction(args) -> int:
    res = video_prediction(args.run, args.known_frames, _positive("--num", args.num), args.method, args.steps,
                           args.seed, args.device, args.out, progress=not args.quiet, log=_stderr)
    print(prediction_table(res))
    return 0


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


__all__ = ["class_guidance", "guidance_table", "video_prediction", "prediction_table", "register"]
