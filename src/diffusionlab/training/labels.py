"""Class labels in training: which labels a class-conditional run trains on, and label dropout.

A class-conditional network (``model.num_classes = K``) is trained on the dataset's labels (``ArrayDataset.labels``:
digits, MNIST, CIFAR-10, moving digits, ``array`` with ``labels``). Label dropout (``train.p_uncond``) replaces each
training label by the no-label index ``K`` with probability ``p_uncond``, so that one network is both the
conditional and the unconditional model classifier-free guidance combines (Ho & Salimans 2022, Algorithm 1;
``p_uncond`` 0.1 to 0.2 there). The dropout draws come from the trainer's noise generator, which every checkpoint
saves, so a resumed run continues bit for bit; with ``p_uncond = 0`` nothing is drawn and an unconditional run's
random streams are those it always had.
"""

from __future__ import annotations

import torch

from diffusionlab.errors import DiffusionLabError


def training_labels(ds, model, tcfg: dict, device, streaming: bool = False) -> torch.Tensor | None:
    """The labels a run trains on, on ``device`` (None for an unconditional network), after checking that they fit
    the network: a class-conditional net needs a labelled dataset held in memory (the streaming loader carries
    images only) with labels in ``0..num_classes - 1``, and ``train.p_uncond > 0`` needs a class-conditional net."""
    k = model.num_classes
    p_uncond = float(tcfg.get("p_uncond", 0.0))
    if k is None:
        if p_uncond > 0:
            raise DiffusionLabError(f"train.p_uncond = {p_uncond} (label dropout) needs a class-conditional network: "
                                    "set model.num_classes")
        return None
    if streaming:
        raise DiffusionLabError(f"model.num_classes = {k}: class-conditional training reads the labels of a set held "
                                "in memory, and this one is streamed: set data.stream=false")
    if getattr(ds, "labels", None) is None:
        raise DiffusionLabError(f"model.num_classes = {k} needs class labels, but dataset {ds.name!r} has none "
                                "(labelled: digits, mnist, cifar10, moving_digits, array with labels)")
    lo, hi = int(ds.labels.min()), int(ds.labels.max())
    if lo < 0 or hi >= k:
        raise DiffusionLabError(f"dataset {ds.name!r} has labels {lo}..{hi}, outside 0..{k - 1} for model.num_classes "
                                f"= {k}" + (f" (it has {ds.num_classes} classes)" if ds.num_classes else ""))
    return ds.labels.to(device)


def batch_labels(labels: torch.Tensor | None, batches, step: int, p_uncond: float, null: int | None,
                 generator: torch.Generator, batch: int, mine: slice) -> torch.Tensor | None:
    """The labels of the rank's slice of the batch of ``step`` (``batches.indices(step)``, on ``labels``' device),
    each replaced by the no-label index ``null`` with probability ``p_uncond``: one uniform draw per label of the
    global batch of ``batch`` from ``generator`` (only when ``p_uncond > 0``), of which the rank keeps its slice
    ``mine``, so that the processes of a ``torchrun`` follow the one-process run."""
    if labels is None:
        return None
    lab = labels[batches.indices(step).to(labels.device, non_blocking=True)]
    if p_uncond > 0:
        u = torch.rand(batch, generator=generator, device=generator.device)[mine]
        lab = torch.where(u.to(lab.device) < p_uncond, torch.full_like(lab, null), lab)
    return lab


__all__ = ["training_labels", "batch_labels"]
