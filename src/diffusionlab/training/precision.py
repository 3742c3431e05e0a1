"""Mixed precision of the training step: ``fp32``, ``bf16`` autocast, or ``fp16`` autocast with a gradient scaler.

fp16 has 5 exponent bits: gradients below about 6e-8 flush to zero and above 65504 overflow. Loss scaling
(Micikevicius et al. 2018, "Mixed precision training", Sec. 3.2) multiplies the loss by a scale ``S`` before the
backward pass and divides the gradients by ``S`` before the update; :class:`torch.amp.GradScaler` picks ``S``
dynamically: it halves ``S`` after a step whose gradients overflowed (that step is skipped) and doubles it after
``growth_interval`` clean steps. The trainer skips an overflowing step through its own non-finite-step path (the
AdamW and EMA updates are not applied on the device, the step is counted and reported like any skipped step),
and the scaler's state is saved in every checkpoint, so a resumed fp16 run continues with the same scale.
bf16 has float32's exponent range and needs no scaler.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
#: the gradient scaler's first scale (torch's default, 2^16)
FP16_INIT_SCALE = 2.0 ** 16


def autocast(precision: str, device: torch.device):
    """The forward pass's autocast context: bfloat16 or float16 (GPU; on the CPU allowed but rarely faster), or a
    no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (module docstring), None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE)


def scaler_state(scaler) -> dict | None:
    """The scaler's state as JSON-able numbers (saved in a checkpoint's metadata)."""
    if scaler is None:
        return None
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in scaler.state_dict().items()}


def restore_scaler(scaler, state) -> None:
    """Load :func:`scaler_state`'s dict; a checkpoint of an fp32/bf16 run (no state) leaves the fresh scaler."""
    if scaler is not None and isinstance(state, dict) and state:
        scaler.load_state_dict(dict(state))
