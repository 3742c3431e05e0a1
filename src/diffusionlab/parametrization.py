"""The one model interface every sampler and objective sees: :class:`DiffusionModel`.

A raw network ``net(x, c_noise)`` (``c_noise`` a ``(B,)`` float, output channels on dim 1) is wrapped, as
k-diffusion's ``Denoiser`` / EDM's ``Precond`` wrap theirs, together with the forward process whose marginal is
``q(x_t | x_0) = N(s_t x_0, sigma_t^2 C)``, i.e. ``x_t = s_t x_0 + sigma_t eps`` with ``eps ~ N(0, C)``
(``C (x) I`` per sample; ``C = process.cov``).

Network conditioning (owned by the parametrization: :meth:`Parametrization.input_scale`,
:meth:`Parametrization.noise_conditioning`)
    ``c_noise(t) = 1000 t / T`` as a float (chains' integer ``t`` in ``1..T`` and SDEs' float ``t`` in
    ``[0, 1]`` both map to ``[0, 1000]``); with ``scale_input`` the net sees ``c_in x_t``,
    ``c_in = 1 / sqrt(s_t^2 + sigma_t^2)`` (``x_t``'s scale without C's correlations; this matters for VE,
    where ``sigma_t`` reaches 50). The EDM parametrization (:class:`EDMPrediction`) conditions on the noise level
    instead, so one network serves every process with the same levels.

Class labels
    A net built with ``num_classes = K`` is called ``net(x, c_noise, labels)`` with ``labels`` a ``(B,)`` integer
    tensor in ``0..K``, ``K`` being the "no label" index that label dropout trains (Ho & Salimans 2022); every
    method below takes ``labels=None`` (the net's own default: the no-label index) and passes them on. A net without
    ``num_classes`` refuses labels. Guidance and conditioning on known values are model wrappers
    (:mod:`diffusionlab.conditioning`), so the samplers never see labels.

What the network output means (``prediction``), all rank-agnostic (via :func:`~diffusionlab.utils.bcast`)
    - ``"eps"`` -- ``eps_theta``, the noise (Ho et al. 2020): ``x0 = (x_t - sigma eps) / s``;
    - ``"x0"`` -- ``x_theta``, the clean data: ``eps = (x_t - s x0) / sigma``;
    - ``"v"`` -- ``v = (s eps - sigma x0) / r``, ``r = sqrt(s^2 + sigma^2)`` (Salimans & Ho 2022 for VP, where
      ``r = 1``): ``x0 = (s x_t - sigma r v) / r^2``, ``eps = (sigma x_t + s r v) / r^2``;
    - ``"score"`` -- NCSN's "divide by sigma" parametrization (Song & Ermon 2020, technique 3): the net outputs
      ``sigma_t C grad log p_t(x_t)``, an O(1) quantity, so the C-score is ``out / sigma`` and
      ``eps = -out``. Its training target is ``-eps`` (:meth:`DiffusionModel.target`).
    - ``"edm"`` -- Karras et al. 2022's preconditioning (Table 1, "EDM" column; sec. 5 and appendix B.6) in the
      EDM level ``sig = sigma_t / s_t`` of the scaled state ``y = x_t / s_t = x_0 + sig eps``, with the data's
      standard deviation ``sigma_data``::

          D(y; sig) = c_skip y + c_out F(c_in y, c_noise),   c_skip = sd^2 / (sig^2 + sd^2),
          c_out = sig sd / sqrt(sig^2 + sd^2),   c_in = 1 / sqrt(sig^2 + sd^2),   c_noise = ln(sig) / 4

      (``sd = sigma_data``; the net is fed ``c_in y = x_t / sqrt(sigma_t^2 + s_t^2 sd^2)`` and
      ``noise_scale * ln(sig) / 4``, :class:`EDMPrediction`). Any process (VP, VE, sub-VP; chains and SDEs)
      gives its ``sig`` and ``s``; with a covariance C the formulas are those of C's scale (``c_in`` ignores the
      correlations, as ``scale_input`` does), and the objective whitens (:class:`~diffusionlab.objectives.EDMLoss`).

    From ``eps`` (the posterior mean ``E[eps | x_t]`` for an optimal net), Tweedie's formula gives the score
    ``grad log p_t(x_t) = -C^{-1} eps / sigma`` (:meth:`DiffusionModel.score`, one ``cov.solve``) and the
    "C-score" ``C grad log p_t(x_t) = -eps / sigma`` (:meth:`DiffusionModel.c_score`, no solve) -- what the
    reverse SDE, the probability-flow ODE and Langevin dynamics with noise ``L z`` need (with correlated noise the
    score enters the drifts as ``C grad log p``, not ``grad log p``).

Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", sec. 3 and Fig. 3)
    With ``self_condition`` the net is also fed an estimate of ``x_0``: ``net(cat[c_in x_t, x0_hat], c_noise)``
    (its input takes the sample's channels twice, :func:`~diffusionlab.models.build_network`). Training
    (:meth:`DiffusionModel.self_condition_estimate`): the first half of every *global* batch is fed the model's
    own ``x_theta`` at the same ``(x_t, t)`` from a pass fed zeros, without gradient; the second half is fed zeros
    (the paper draws the half at random; the batch is already in random order, so a fixed half needs no extra
    randomness and keeps a resumed run exact). The trainer picks the rows for the global batch
    (:func:`self_condition_rows`) and every rank and micro-batch takes its slice, so torchrun and
    ``train.accumulate`` follow the one-process trajectory. Sampling (:func:`carries_x0`, around every registered
    sampler and conditional method): each evaluation is fed the ``x_theta`` of the evaluation before it in the
    same trajectory, the first zeros; a wrapper that changes the batch between evaluations (guidance switched on
    and off by its interval, SMC resampling) keeps the carried estimate row for row (:func:`resize_carried_x0`,
    :func:`reorder_carried_x0`). An adaptive ODE solver's rejected stages also feed the next one, so its
    right-hand side then depends on the history. Outside a sampler call (likelihoods, objectives, one-off
    predictions) the net is fed zeros: bits/dim are those of the zero-fed model.

Learned variance (Nichol & Dhariwal 2021)
    With ``learn_variance`` the net outputs twice the channels (``out_mult = 2``); the second half is
    ``v_var``, nominally in ``[-1, 1]`` (not clamped, as in improved-diffusion: the log-space interpolation
    still gives a positive variance when it extrapolates), and
    ``log var = frac log beta_t + (1 - frac) log beta-tilde_t``, ``frac = (v_var + 1) / 2``
    (:func:`learned_log_variance`). With a correlated C the learned variance is diagonal in the *whitened*
    coordinates: ``Sigma_theta = L diag(var) L^T`` (for ``C = I`` exactly Nichol & Dhariwal's), so that KLs
    and log-densities stay elementwise after ``cov.whiten``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from diffusionlab.errors import DiffusionLabError
from diffusionlab.utils import as_labels, per_batch

def batch_t(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` (an int/float, a 0-d tensor or a ``(B,)`` tensor) as a ``(B,)`` tensor on ``x``'s device."""
    return per_batch(torch.as_tensor(t, device=x.device), x, "time t")


def coeffs_like(process, t: torch.Tensor, x: torch.Tensor):
    """``(s_t, sigma_t)`` of ``process`` at ``t`` (``(B,)``), shaped to broadcast against ``x``, in ``x``'s
    dtype and device (chains gather their float64 arrays, SDEs evaluate theirs): ``process.coeffs_like``."""
    return process.coeffs_like(t, x)


def learned_log_variance(v_var: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 15: ``frac log beta + (1 - frac) log beta-tilde``, ``frac = (v_var + 1) / 2``."""
    frac = (v_var + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


@dataclass
class Prediction:
    """One network evaluation, decoded: ``eps`` (``E[eps | x_t]``), ``x0`` (``E[x_0 | x_t]``), ``out`` (the raw
    output in the model's parametrization, first ``out_mult`` chunk), ``v_var`` (learned-variance output or
    None), and the marginal coefficients ``s``, ``sigma`` broadcast against ``x_t``."""

    eps: torch.Tensor
    x0: torch.Tensor
    out: torch.Tensor
    s: torch.Tensor
    sigma: torch.Tensor
    v_var: torch.Tensor | None = None

    @property
    def c_score(self) -> torch.Tensor:
        """``C grad log p_t(x_t) = -eps / sigma``."""
        return -self.eps / self.sigma


class Parametrization:
    """What a network output means: a small object owning the decoding, the training target and the weights that
    depend on it (module docstring), so nothing else compares prediction names. Subclasses: :class:`EpsPrediction`,
    :class:`X0Prediction`, :class:`VPrediction`, :class:`ScorePrediction`."""

    name: str = ""
    #: whether :meth:`noise_conditioning` depends on the noise level ``sigma / s`` only (not on the time): then a
    #: network means the same at equal levels of any process (EDM); the time-conditioned ones say False
    conditions_on_level: bool = False
    #: whether ``x0`` and ``eps`` decode at ``s = 0`` (a zero terminal SNR, Lin et al. 2024): x0 and v do; eps,
    #: score and EDM (whose level sigma / s is infinite there) do not
    decodes_at_zero_snr: bool = False

    # -- what the network is fed ----------------------------------------------------------------------------
    def input_scale(self, s, sigma):
        """``c`` with the net fed ``c x_t`` (when the model's ``scale_input`` is on): ``1 / sqrt(s^2 + sigma^2)``,
        the scale of ``x_t`` for unit-variance data."""
        return 1.0 / (s * s + sigma * sigma).sqrt()

    def noise_conditioning(self, t: torch.Tensor, s, sigma, process, dtype=torch.float32) -> torch.Tensor:
        """The ``(B,)`` float ``c_noise`` the net is conditioned on at times ``t`` (``(B,)``; ``s``, ``sigma``
        broadcast against the batch): DDPM's ``1000 t / T``."""
        return t.to(dtype) * (1000.0 / float(process.T))

    def decode(self, out: torch.Tensor, x_t: torch.Tensor, s, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps, x0)`` from a raw output ``out`` at ``x_t = s x0 + sigma eps``."""
        raise NotImplementedError

    def target(self, eps: torch.Tensor, x0: torch.Tensor, s, sigma) -> torch.Tensor:
        """The raw output (training target) for given ``eps`` and ``x0``."""
        raise NotImplementedError

    def error_scale2(self, s, sigma):
        """``c^2`` with ``x_theta - x_0 = -c (d_theta - d)`` for an error ``d_theta - d`` in the output."""
        raise NotImplementedError

    def x0_error(self, pred: "Prediction", x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_theta - x_0`` computed in the output's own terms, so no cancellation is introduced:
        ``-c (d_theta - d)`` (:meth:`error_scale2`)."""
        c = self.error_scale2(pred.s, pred.sigma).sqrt()
        return -c * (pred.out - self.target(eps, x0, pred.s, pred.sigma))

    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023, eq. 12): the loss ``min(SNR, gamma) ||x_theta - x_0||^2`` written for this
        output's error, a weight ``min(SNR, gamma) c^2`` (:meth:`error_scale2`): ``min(SNR, gamma) / SNR`` for eps
        and score, ``min(SNR, gamma)`` for x0, ``min(SNR, gamma) / (SNR + 1)`` for v."""
        raise NotImplementedError

    def posterior_mean(self, x_t: torch.Tensor, pred: "Prediction", A: float, B: float) -> torch.Tensor:
        """``A x_t + B x_theta``, through ``eps``: ``(A + B / s) x_t - (B sigma / s) eps_theta``, which stays well
        conditioned where ``s`` is small (:class:`X0Prediction` uses ``x_theta`` directly)."""
        return (A + B / pred.s) * x_t - (B * pred.sigma / pred.s) * pred.eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsPrediction(Parametrization):
    """The net predicts the noise ``eps`` (Ho et al. 2020): ``x0 = (x_t - sigma eps) / s``."""

    name = "eps"

    def decode(self, out, x_t, s, sigma):
        return out, (x_t - sigma * out) / s

    def target(self, eps, x0, s, sigma):
        return eps

    def error_scale2(self, s, sigma):
        return (sigma / s) ** 2

    def x0_error(self, pred, x0, eps):
        return -(pred.sigma / pred.s) * (pred.eps - eps)

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / snr


class ScorePrediction(EpsPrediction):
    """NCSN's "divide by sigma" parametrization (Song & Ermon 2020, technique 3): the net outputs
    ``sigma_t C grad log p_t(x_t) = -eps``; its training target is ``-eps``."""

    name = "score"

    def decode(self, out, x_t, s, sigma):
        eps = -out
        return eps, (x_t - sigma * eps) / s

    def target(self, eps, x0, s, sigma):
        return -eps


class X0Prediction(Parametrization):
    """The net predicts the data ``x0``: ``eps = (x_t - s x0) / sigma``."""

    name = "x0"
    decodes_at_zero_snr = True

    def decode(self, out, x_t, s, sigma):
        return (x_t - s * out) / sigma, out

    def target(self, eps, x0, s, sigma):
        return x0

    def error_scale2(self, s, sigma):
        return torch.ones_like(s)

    def x0_error(self, pred, x0, eps):
        return pred.x0 - x0

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma)

    def posterior_mean(self, x_t, pred, A, B):
        return A * x_t + B * pred.x0


class VPrediction(Parametrization):
    """The net predicts ``v = (s eps - sigma x0) / r``, ``r = sqrt(s^2 + sigma^2)`` (Salimans & Ho 2022 for VP,
    where ``r = 1``): ``x0 = (s x_t - sigma r v) / r^2``, ``eps = (sigma x_t + s r v) / r^2``."""

    name = "v"
    decodes_at_zero_snr = True

    def decode(self, out, x_t, s, sigma):
        r2 = s * s + sigma * sigma
        r = r2.sqrt()
        return (sigma * x_t + s * r * out) / r2, (s * x_t - sigma * r * out) / r2

    def target(self, eps, x0, s, sigma):
        return (s * eps - sigma * x0) / (s * s + sigma * sigma).sqrt()

    def error_scale2(self, s, sigma):
        return sigma**2 / (s**2 + sigma**2)

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / (snr + 1.0)

    def posterior_mean(self, x_t, pred, A, B):
        return A * x_t + B * pred.x0  # x0 decodes without dividing by s: stable at every s, 0 included


def edm_weight(sig, sigma_data: float):
    """EDM's loss weight ``lambda(sig) = (sig^2 + sd^2) / (sig sd)^2 = 1 / c_out^2`` (Karras et al. 2022, Table 1)."""
    return (sig * sig + sigma_data**2) / (sig * sigma_data) ** 2


class EDMPrediction(Parametrization):
    """Karras et al. 2022's preconditioning (Table 1, the "EDM" column; module docstring): the net ``F`` is fed
    ``c_in y`` and ``c_noise`` and the denoiser is ``D = c_skip y + c_out F``, in the EDM level ``sig = sigma / s``
    of ``y = x_t / s``. ``sigma_data``: the data's standard deviation (EDM: 0.5 for images in [-1, 1]).

    ``noise_scale`` multiplies EDM's ``c_noise = ln(sig) / 4``: the networks here embed ``c_noise`` with DDPM's
    sinusoids, laid out for values in ``[0, 1000]``, so the default 1000 puts ``ln(sig) / 4`` (about ``-1.3 ..
    2.5`` on the usual levels) on that scale (EDM's own networks use an embedding laid out for its range).

    In closed form (``sd = sigma_data``, ``r = sqrt(sig^2 + sd^2)``), without cancellation at any level::

        x0 = c_skip y + c_out F,   eps = sig y / r^2 - (sd / r) F,   target F* = (sig x0 - sd^2 eps) / (sd r)

    and ``x_theta - x_0 = c_out (F - F*)``: EDM's loss weight ``lambda = 1 / c_out^2`` makes the loss
    ``||F - F*||^2``, an effective weight of 1 (Karras et al. 2022, eq. 8 and sec. 5).
    """

    name = "edm"
    conditions_on_level = True

    def __init__(self, sigma_data: float = 0.5, noise_scale: float = 1000.0):
        from diffusionlab.checks import real

        self.sigma_data = real("parametrization.sigma_data", sigma_data, 0.0, open_low=True)
        self.noise_scale = real("EDM noise_scale", noise_scale, 0.0, open_low=True)

    # -- Table 1 in the EDM level -----------------------------------------------------------------------------
    def c_skip(self, sig):
        sd2 = self.sigma_data**2
        return sd2 / (sig * sig + sd2)

    def c_out(self, sig):
        return sig * self.sigma_data / (sig * sig + self.sigma_data**2).sqrt()

    def c_in(self, sig):
        return 1.0 / (sig * sig + self.sigma_data**2).sqrt()

    def c_noise(self, sig):
        """EDM's ``ln(sig) / 4`` times ``noise_scale``."""
        return (0.25 * self.noise_scale) * torch.log(sig)

    def loss_weight(self, sig):
        """EDM's ``lambda(sig) = 1 / c_out^2`` (:func:`edm_weight`)."""
        return edm_weight(sig, self.sigma_data)

    # -- the model's hooks ------------------------------------------------------------------------------------
    def input_scale(self, s, sigma):
        """``c_in(sig) / s = 1 / sqrt(sigma^2 + s^2 sd^2)``: the net sees ``c_in y``."""
        return 1.0 / (sigma * sigma + (s * self.sigma_data) ** 2).sqrt()

    def noise_conditioning(self, t, s, sigma, process, dtype=torch.float32):
        return self.c_noise((sigma / s).reshape(-1)).to(dtype)

    def decode(self, out, x_t, s, sigma):
        sig = sigma / s
        y = x_t / s
        r2 = sig * sig + self.sigma_data**2
        r = r2.sqrt()
        x0 = (self.sigma_data**2 / r2) * y + (sig * self.sigma_data / r) * out
        eps = (sig / r2) * y - (self.sigma_data / r) * out
        return eps, x0

    def target(self, eps, x0, s, sigma):
        sig = sigma / s
        r = (sig * sig + self.sigma_data**2).sqrt()
        return (sig * x0 - self.sigma_data**2 * eps) / (self.sigma_data * r)

    def error_scale2(self, s, sigma):
        sig = sigma / s
        return self.c_out(sig) ** 2

    def x0_error(self, pred, x0, eps):
        return self.c_out(pred.sigma / pred.s) * (pred.out - self.target(eps, x0, pred.s, pred.sigma))

    def min_snr_weight(self, snr, gamma):
        sd2 = self.sigma_data**2
        return snr.clamp(max=gamma) * sd2 / (1.0 + snr * sd2)  # c_out^2 = sd^2 / (1 + SNR sd^2)

    def posterior_mean(self, x_t, pred, A, B):
        return A * x_t + B * pred.x0

    def __repr__(self) -> str:
        return f"EDMPrediction(sigma_data={self.sigma_data!r}, noise_scale={self.noise_scale!r})"


PARAMETRIZATIONS: dict[str, Parametrization] = {
    p.name: p for p in (EpsPrediction(), X0Prediction(), VPrediction(), ScorePrediction(), EDMPrediction())
}
PREDICTIONS = tuple(PARAMETRIZATIONS)
#: the parametrizations that take options (``sigma_data``), built per model
_WITH_OPTIONS = {"edm": EDMPrediction}


def get_parametrization(name, sigma_data: float | None = None) -> Parametrization:
    """The parametrization called ``name`` (or ``name`` itself if it already is one); ``sigma_data`` for
    ``edm`` (default 0.5), refused for the others."""
    if isinstance(name, Parametrization):
        if sigma_data is not None and getattr(name, "sigma_data", None) != sigma_data:
            raise DiffusionLabError(f"sigma_data = {sigma_data!r} given with the parametrization object {name!r}")
        return name
    if not isinstance(name, str) or name not in PARAMETRIZATIONS:
        raise DiffusionLabError(f"unknown prediction {name!r}; allowed: {', '.join(PARAMETRIZATIONS)}")
    if sigma_data is None:
        return PARAMETRIZATIONS[name]
    if name not in _WITH_OPTIONS:
        raise DiffusionLabError(f"parametrization.sigma_data applies to prediction 'edm' only, not {name!r} "
                                f"(got sigma_data = {sigma_data!r})")
    return _WITH_OPTIONS[name](sigma_data=sigma_data)


def _extra(labels, x0_cond) -> dict:
    """The optional arguments of :meth:`DiffusionModel._raw` that are set (subclasses such as the oracles take
    neither)."""
    return {k: v for k, v in (("labels", labels), ("x0_cond", x0_cond)) if v is not None}


class DiffusionModel(nn.Module):
    """A raw network plus its process and parametrization: the interface samplers and objectives use.

    Args:
        net: ``net(x, c_noise) -> out`` with ``out`` shaped like ``x`` except dim 1 times ``out_mult``.
        process: a :class:`~diffusionlab.processes.GaussianProcess` (chain or SDE).
        prediction: ``"eps" | "x0" | "v" | "score" | "edm"`` or a :class:`Parametrization` (module docstring).
        learn_variance: the net also outputs ``v_var`` (Nichol & Dhariwal 2021).
        scale_input: feed the net ``c_in x_t`` (the parametrization's :meth:`~Parametrization.input_scale`:
            ``1 / sqrt(s_t^2 + sigma_t^2)``; EDM's ``c_in``).
        sigma_data: the data's standard deviation of the ``edm`` parametrization (default 0.5; only for ``edm``).
        self_condition: the net is also fed an ``x_0`` estimate (self-conditioning, Chen et al. 2022, sec. 3: its
            own on half of each training batch, the previous step's when sampling); the network (unet on images,
            video_unet) is built with the sample's channels twice.

    ``nfe`` counts network evaluations (every :meth:`forward`); samplers never count themselves.
    ``t`` may be an int/float, a 0-d tensor or a ``(B,)`` tensor; ``labels`` (class-conditional nets only, module
    docstring) None, an int or a ``(B,)`` integer tensor.
    """

    def __init__(self, net: nn.Module | None, process, prediction: str = "eps", learn_variance: bool = False,
                 scale_input: bool = True, sigma_data: float | None = None, self_condition: bool = False):
        super().__init__()
        self.parametrization = get_parametrization(prediction, sigma_data)
        if getattr(process, "zero_terminal_snr", False) and not self.parametrization.decodes_at_zero_snr:
            raise DiffusionLabError(
                f"prediction {self.parametrization.name!r} cannot decode x_0 at t = T of a zero-terminal-SNR chain "
                "(s_T = 0, x_T is pure noise): use prediction v or x0 (Lin et al. 2024, sec. 3.2)")
        self.net = net
        self.process = process
        self.learn_variance = bool(learn_variance)
        self.scale_input = bool(scale_input)
        self.self_condition = bool(self_condition)
        self._carry: list | None = None  # [x0 of the last evaluation] inside carrying_x0(), else None
        self.nfe = 0

    @property
    def prediction(self) -> str:
        """The parametrization's name (``eps``, ``x0``, ``v``, ``score``)."""
        return self.parametrization.name

    @property
    def out_mult(self) -> int:
        """Output channels per input channel the net must produce: 2 with a learned variance, else 1."""
        return 2 if self.learn_variance else 1

    @property
    def cov(self):
        return self.process.cov

    @property
    def num_classes(self) -> int | None:
        """The net's number of classes ``K`` (labels ``0..K-1``, ``K`` = no label), None for an unconditional net."""
        return getattr(self.net, "num_classes", None)

    def labels_for(self, labels, x: torch.Tensor) -> torch.Tensor | None:
        """``labels`` as a ``(B,)`` int64 tensor on ``x``'s device (an int is one label for the batch); None stays
        None. Refused for an unconditional net; values outside ``0..num_classes`` refused on the CPU
        (:func:`~diffusionlab.utils.as_labels`: an accelerator never waits for the host)."""
        if labels is None:
            return None
        if self.num_classes is None:
            raise DiffusionLabError("this model's network has no class labels (it was built without num_classes); "
                                    "train a class-conditional model (model.num_classes) to condition on a class")
        return as_labels(labels, x, self.num_classes)

    # -- conditioning ---------------------------------------------------------------------------------------
    def c_noise(self, t: torch.Tensor, dtype=torch.float32, s=None, sigma=None) -> torch.Tensor:
        """The net's conditioning at times ``t`` as a float ``(B,)`` tensor: the parametrization's
        (:meth:`Parametrization.noise_conditioning`; ``1000 t / T`` unless it conditions on the level)."""
        if s is None or sigma is None:
            s, sigma = self.process.coeffs(t.detach().cpu() if self.process.discrete else t.to(torch.float64))
            s, sigma = s.to(t.device), sigma.to(t.device)
        return self.parametrization.noise_conditioning(t, s, sigma, self.process, dtype)

    def coeffs(self, t, x: torch.Tensor):
        """``(t_batch, s_t, sigma_t)``: ``t`` as ``(B,)`` and the coefficients broadcast against ``x``."""
        tb = batch_t(t, x)
        s, sigma = coeffs_like(self.process, tb, x)
        return tb, s, sigma

    def _raw(self, x_t: torch.Tensor, tb: torch.Tensor, s, sigma, labels=None, x0_cond=None) -> torch.Tensor:
        """The network evaluation proper (what subclasses such as the Gaussian oracle replace); ``x0_cond`` is the
        self-conditioning input (zeros when None)."""
        x_in = x_t * self.parametrization.input_scale(s, sigma) if self.scale_input else x_t
        if self.self_condition:
            x_in = torch.cat([x_in, torch.zeros_like(x_t) if x0_cond is None else x0_cond.to(x_t.dtype)], dim=1)
        elif x0_cond is not None:
            raise DiffusionLabError("an x_0 estimate was passed to a model without self-conditioning "
                                    "(parametrization.self_condition is off)")
        lab = self.labels_for(labels, x_t)
        if lab is None:
            return self.net(x_in, self.c_noise(tb, x_t.dtype, s, sigma))
        return self.net(x_in, self.c_noise(tb, x_t.dtype, s, sigma), lab)

    def forward(self, x_t: torch.Tensor, t, labels=None, x0_cond=None) -> torch.Tensor:
        """The raw network output (both halves when ``learn_variance``); counts one evaluation. ``x0_cond``: the
        self-conditioning input of a ``self_condition`` model (zeros when None)."""
        tb, s, sigma = self.coeffs(t, x_t)
        out = self._raw(x_t, tb, s, sigma, **_extra(labels, x0_cond))
        self.nfe += 1
        return out

    # -- self-conditioning (Chen et al. 2022; module docstring) -----------------------------------------------
    def self_condition_estimate(self, x_t: torch.Tensor, t, labels=None, rows=None) -> torch.Tensor | None:
        """The self-conditioning input of a training batch (Chen et al. 2022, Fig. 3, ``train_loss``): on the
        ``rows`` (a ``(B,)`` bool mask; default :func:`self_condition_rows` of this batch, its first ``B // 2``)
        ``x_theta(x_t, t)`` from a pass fed zeros, without gradient; zeros on the others. None for a model without
        self-conditioning."""
        if not self.self_condition:
            return None
        b = x_t.shape[0]
        rows = self_condition_rows(b, x_t.device) if rows is None else rows.to(device=x_t.device, dtype=torch.bool)
        if rows.shape != (b,):
            raise DiffusionLabError(f"self-conditioning rows must be a ({b},) mask, got shape {tuple(rows.shape)}")
        cond = torch.zeros_like(x_t)
        if bool(rows.any()):
            tb = batch_t(t, x_t)
            lab = None if labels is None else self.labels_for(labels, x_t)[rows]
            xs = x_t[rows]
            with torch.no_grad():
                cond[rows] = self.predict(xs, tb[rows], labels=lab, x0_cond=torch.zeros_like(xs)).x0
        return cond

    @contextlib.contextmanager
    def carry_x0(self):
        """Inside this block every :meth:`predict` of a ``self_condition`` model is fed the ``x_theta`` of the one
        before it (the first, and any whose batch shape differs, zeros): one sampling trajectory (Chen et al. 2022,
        Fig. 3, ``generate``). :func:`carrying_x0` opens it for every sampler call."""
        outer, self._carry = self._carry, [None]
        try:
            yield self
        finally:
            self._carry = outer

    def split(self, out: torch.Tensor):
        """``(mean_part, v_var)``: the output's two halves along dim 1 (``v_var`` None without a learned variance)."""
        if not self.learn_variance:
            return out, None
        if out.shape[1] % 2:
            raise DiffusionLabError(
                f"a learned-variance net must output an even number of channels on dim 1, got shape {tuple(out.shape)}"
            )
        mean, v_var = out.chunk(2, dim=1)
        return mean, v_var

    # -- decoded predictions --------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t, labels=None, x0_cond=None) -> Prediction:
        """One network evaluation decoded into ``eps``, ``x0`` (and ``v_var``). A ``self_condition`` model is fed
        ``x0_cond``, else inside :meth:`carry_x0` the previous evaluation's ``x0``, else zeros."""
        tb, s, sigma = self.coeffs(t, x_t)
        carry = self._carry if self.self_condition and x0_cond is None else None
        if carry is not None and carry[0] is not None and carry[0].shape == x_t.shape:
            x0_cond = carry[0]
        out = self._raw(x_t, tb, s, sigma, **_extra(labels, x0_cond))
        self.nfe += 1
        mean, v_var = self.split(out)
        eps, x0 = self.parametrization.decode(mean, x_t, s, sigma)
        if carry is not None:
            carry[0] = x0.detach()
        return Prediction(eps=eps, x0=x0, out=mean, s=s, sigma=sigma, v_var=v_var)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """What the raw (mean) output should be for ``x_t = s_t x0 + sigma_t eps``: eps, x0, v or ``-eps``."""
        _, s, sigma = self.coeffs(t, x0)
        return self.parametrization.target(eps, x0, s, sigma)

    def _predict(self, x_t: torch.Tensor, t, labels) -> Prediction:
        return self.predict(x_t, t) if labels is None else self.predict(x_t, t, labels=labels)

    def eps(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """``E[eps | x_t]`` as predicted."""
        return self._predict(x_t, t, labels).eps

    def x0(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """``E[x_0 | x_t]`` as predicted."""
        return self._predict(x_t, t, labels).x0

    def c_score(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """``C grad log p_t(x_t) = -eps / sigma_t`` (no solve)."""
        return self._predict(x_t, t, labels).c_score

    def score(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """``grad log p_t(x_t) = -C^{-1} eps / sigma_t`` (one ``cov.solve``)."""
        p = self._predict(x_t, t, labels)
        return -self.process.cov.solve(p.eps) / p.sigma

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, learn_variance={self.learn_variance}, process={self.process!r}"


def self_condition_rows(batch: int, device=None) -> torch.Tensor:
    """The rows of a (global) training batch of ``batch`` that are fed the model's own ``x_0`` estimate: the first
    ``batch // 2`` (a ``(batch,)`` bool mask; module docstring)."""
    return torch.arange(batch, device=device) < batch // 2


def _self_conditioned(model) -> DiffusionModel | None:
    """The self-conditioned :class:`DiffusionModel` under ``model`` (through wrappers' ``inner``), or None."""
    m = model
    while m is not None and not isinstance(m, DiffusionModel):
        m = getattr(m, "inner", None)
    return m if m is not None and m.self_condition else None


def carrying_x0(model):
    """The :meth:`DiffusionModel.carry_x0` block of the model under ``model`` (through wrappers' ``inner``), or a
    block that does nothing: what a sampler call runs in, so a self-conditioned model carries its ``x_0`` estimate
    along one trajectory."""
    m = _self_conditioned(model)
    return contextlib.nullcontext(model) if m is None else m.carry_x0()


def carries_x0(fn):
    """``fn(model, ...)`` run inside :func:`carrying_x0` of its model: how every registered sampler and
    conditional method is one trajectory of a self-conditioned model, called through its catalogue or directly."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        with carrying_x0(model):
            return fn(model, *args, **kwargs)
    return run


def _carried(model) -> list | None:
    m = _self_conditioned(model)
    carry = None if m is None else m._carry
    return carry if carry is not None and carry[0] is not None else None


def resize_carried_x0(model, rows: int) -> None:
    """Before an evaluation on ``rows`` rows by a wrapper that doubles its batch (classifier-free guidance, the
    conditional then the unconditional half) or stops doubling it: the carried estimate of ``B`` rows is repeated
    for ``2B``, that of ``2B`` rows cut to its first (conditional) ``B``; any other change of size is refused (it
    would silently feed zeros). Nothing outside a trajectory."""
    carry = _carried(model)
    if carry is None or carry[0].shape[0] == rows:
        return
    n = carry[0].shape[0]
    if rows == 2 * n:
        carry[0] = torch.cat([carry[0], carry[0]])
    elif 2 * rows == n:
        carry[0] = carry[0][:rows]
    else:
        raise DiffusionLabError(f"a self-conditioned trajectory carries an estimate of {n} rows; an evaluation on "
                                f"{rows} rows is neither its doubled nor its halved batch")


def reorder_carried_x0(model, index: torch.Tensor) -> None:
    """After a resampling step that reorders the particles by ``index`` (SMC): the carried estimate follows, so
    each particle keeps being fed its own trajectory's (both halves of a guided model's doubled batch). Nothing
    outside a trajectory."""
    carry = _carried(model)
    if carry is None:
        return
    index = index.to(carry[0].device)
    n = index.numel()
    if carry[0].shape[0] == 2 * n:
        index = torch.cat([index, index + n])
    carry[0] = carry[0][index]


def reverse_variances(b2: torch.Tensor, post_var: torch.Tensor):
    """The two fixed reverse-process variances of a chain, index ``t = 0..T`` (float64): ``upper = b_t^2``
    (``beta_t`` for VP, ``g^2(t)`` for VE -- Ho et al.'s ``sigma_t^2 = beta_t``) and ``lower`` =
    ``beta-tilde_t`` (``post_var``) with ``beta-tilde_1 = 0`` replaced by ``beta-tilde_2`` (improved-diffusion's
    ``posterior_log_variance_clipped``; for ``T = 1``, by ``b_1^2``), so that its log is finite. Learned
    variances interpolate between their logs."""
    lower = post_var.clone()
    if lower.numel() > 2:
        lower[1] = post_var[2]
    elif lower.numel() == 2:
        lower[1] = b2[1]
    lower[0] = lower[1]
    return b2.clone(), lower


def fixed_large_variance(b2: torch.Tensor, post_var: torch.Tensor) -> torch.Tensor:
    """improved-diffusion's ``FIXED_LARGE`` (and Ho et al.'s released code): ``b_t^2`` (``beta_t``) at every step but
    ``t = 1``, where it takes ``beta-tilde_2`` (``np.append(posterior_variance[1], betas[1:])``); index ``t = 0..T``,
    float64. It differs from ``"beta"`` only in the decoder ``L_0`` of the bound."""
    large = b2.clone()
    if large.numel() > 2:
        large[1] = post_var[2]
    large[0] = large[1]
    return large
