"""Conditioning: class labels, classifier-free guidance, and sampling given known values.

Everything here is a wrapper of the model interface or a function of it, so the samplers never see a label or a
mask:

- :mod:`~diffusionlab.conditioning.guidance` -- :class:`LabelledModel` (a class-conditional model with its labels
  bound) and :class:`GuidedModel` (classifier-free guidance, Ho & Salimans 2022, one doubled batch per evaluation,
  optional guidance interval of Kynkaanniemi et al. 2024);
- :mod:`~diffusionlab.conditioning.known` -- known values under frame-correlated noise (Gaussian conditioning of the
  noise by Matheron's rule, the known part's forward path);
- :mod:`~diffusionlab.conditioning.methods` -- the catalogue :data:`CONDITIONAL_METHODS` of conditional samplers from
  an unconditional model: ``replace``, ``repaint``, ``dps``, ``smc``;
- :mod:`~diffusionlab.conditioning.generate` -- drawing many conditional samples in chunks (the CLI's path).

The exact answers these are tested against live in :mod:`diffusionlab.oracles.conditional`.
"""

from diffusionlab.conditioning.guidance import (
    GuidedModel,
    LabelledModel,
    ModelWrapper,
    class_labels,
    condition_on_class,
)
from diffusionlab.conditioning.known import Known, NoiseConditioner
from diffusionlab.conditioning.methods import (
    CONDITIONAL_METHODS,
    ConditionalSpec,
    get_method,
    method_names,
    parse_method,
    register_method,
)

__all__ = [
    "GuidedModel", "LabelledModel", "ModelWrapper", "class_labels", "condition_on_class", "Known", "NoiseConditioner",
    "CONDITIONAL_METHODS", "ConditionalSpec", "get_method", "method_names", "parse_method", "register_method",
]
