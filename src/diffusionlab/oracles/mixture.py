"""Exact answers for Gaussian-mixture data: the ground truth of the samplers' benchmark.

Data ``x_0 ~ sum_k w_k N(m_k, S_k)`` on the flattened sample (``D`` entries; with ``frames=F`` a sample is an
``(F, d)`` array, ``D = F d``, and C acts over the F frames). Under any process with marginal
``q(x_t | x_0) = N(s x_0, sigma^2 K)``, ``K = C (x) I`` dense over the flattened sample
(:func:`~diffusionlab.oracles.gaussian.dense_noise_covariance`), the noisy marginal is again a mixture::

    p_t(x) = sum_k w_k N(x; s m_k, M_k),      M_k = s^2 S_k + sigma^2 K

Conditioning on the component is Gaussian conditioning (as in :mod:`~diffusionlab.oracles.gaussian`); with the
responsibilities ``gamma_k(x) = w_k N(x; s m_k, M_k) / p_t(x)`` (log-sum-exp) and ``z_k = M_k^{-1} (x - s m_k)``
(Cholesky solves)::

    grad log p_t(x) = -sum_k gamma_k z_k
    E[eps | x_t]    = sigma K sum_k gamma_k z_k          (= -sigma C grad log p_t, Tweedie)
    E[x_0 | x_t]    = sum_k gamma_k (m_k + s S_k z_k)     (stable as s -> 0)

:class:`GaussianMixtureOracle` is a :class:`~diffusionlab.parametrization.DiffusionModel` returning these exactly
(float64, batched over samples and over distinct times) at every time a sampler asks for: integer ``t`` of a
chain, float ``t`` of an SDE, or explicit ``(s, sigma)`` (:meth:`~GaussianMixtureOracle.posterior_at`, which
peers' schedulers use). With ``K = 1`` it is :class:`~diffusionlab.oracles.gaussian.GaussianOracle`.

JSON spec (:meth:`GaussianMixtureOracle.from_spec`, :func:`load_spec`)::

    {"weights": [K], "means": [K][D], "covs": [K][D][D], "frames": F (optional), "classes": [K] (optional)}

(``classes``, one class per component, is read by the class-conditional oracle of
:mod:`~diffusionlab.oracles.conditional`; this oracle is the whole mixture.)

weights positive (normalised), covariances symmetric PSD (positive definite wherever the data density or
``sigma = 0`` is needed). Process names for specs and the CLI (:func:`make_process`):

=============  =====================================================================================
``vp``         DDPM chain, T = 1000, linear betas 1e-4 .. 0.02 (Ho et al. 2020)
``ve``         NCSN chain, L = 232 geometric levels 0.01 .. 50 (NCSNv2's CIFAR-10 levels, Song & Ermon
               2020); the VE-SDE's ``discretize(232)``
(the defaults of :data:`diffusionlab.processes.PROCESSES`, which a training run gets too)
``vp-sde``     VP-SDE, beta 0.1 .. 20 (Song et al. 2021)
``subvp-sde``  sub-VP SDE, beta 0.1 .. 20
``ve-sde``     VE-SDE, sigma 0.01 .. 50
=============  =====================================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import LOG_2PI
from diffusionlab.noise.covariance import Covariance, check_psd, make_covariance
from diffusionlab.oracles.gaussian import dense_noise_covariance
from diffusionlab.parametrization import DiffusionModel, Prediction, batch_t, coeffs_like

_F64 = torch.float64
SPEC_KEYS = ("weights", "means", "covs", "frames", "classes", "name", "description")


def make_process(name: str, cov: Covariance | None = None):
    """The process called ``name`` with the catalogue's default options (:mod:`diffusionlab.processes.catalogue`,
    the same defaults a training run gets) and noise covariance ``cov`` (identity if None)."""
    from diffusionlab.processes.catalogue import make_process as build

    return build(name, cov)


def _as_f64(value, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=_F64).detach().clone()
    except (TypeError, ValueError, RuntimeError) as e:
        raise DiffusionLabError(f"{what} must be an array of numbers: {e}") from None
    if not torch.isfinite(t).all():
        raise DiffusionLabError(f"{what} has a non-finite entry")
    return t


def _check_weights(weights) -> torch.Tensor:
    w = _as_f64(weights, "mixture weights")
    if w.ndim != 1 or w.numel() < 1:
        raise DiffusionLabError(f"mixture weights must be a non-empty 1-D list, got shape {tuple(w.shape)}")
    if (w <= 0).any():
        i = int(torch.nonzero(w <= 0)[0])
        raise DiffusionLabError(f"mixture weights must be positive; weights[{i}] = {w[i].item():.6g}")
    return w / w.sum()


def _frames_shape(frames, d: int) -> tuple[int, ...]:
    if frames is None:
        return (d,)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise DiffusionLabError(f"frames must be an integer >= 1, got {frames!r}")
    if d % frames:
        raise DiffusionLabError(f"frames = {frames} must divide the dimension D = {d} of the means")
    return (frames, d // frames)


class GaussianMixtureOracle(DiffusionModel):
    """The exact posterior-mean "network" for Gaussian-mixture data under ``process`` (module docstring).

    Args:
        weights: ``(K,)`` positive (normalised here).
        means: ``(K, D)``.
        covs: ``(K, D, D)`` symmetric positive semi-definite.
        process: any :class:`~diffusionlab.processes.GaussianProcess`; its ``cov`` acts on axis 1 of a sample
            batch: over the ``D`` coordinates, or over the frames with ``frames``.
        prediction: the parametrization :meth:`forward` encodes its output in (``predict``, ``eps``, ``x0``,
            ``score``, ``c_score`` are exact whatever it is).
        frames: ``F`` to make a sample an ``(F, D / F)`` array (noise covariance C over the frames, identity
            over the rest).

    Every evaluation (:meth:`predict`, :meth:`forward`, :meth:`score`, :meth:`c_score`, :meth:`posterior_at`,
    :meth:`edm_denoiser`) counts one in ``nfe``. Buffers follow ``.to(device)``; inputs are evaluated on their
    own device in float64 and returned in their dtype.
    """

    def __init__(self, weights, means, covs, process, prediction: str = "eps", frames: int | None = None):
        super().__init__(None, process, prediction=prediction, learn_variance=False, scale_input=False)
        w = _check_weights(weights)
        m = _as_f64(means, "mixture means")
        k = w.numel()
        if m.ndim != 2 or m.shape[0] != k or m.shape[1] < 1:
            raise DiffusionLabError(f"mixture means must have shape ({k}, D) for {k} weights, got {tuple(m.shape)}")
        d = m.shape[1]
        c = _as_f64(covs, "mixture covariances")
        if c.shape != (k, d, d):
            raise DiffusionLabError(f"mixture covariances must have shape ({k}, {d}, {d}), got {tuple(c.shape)}")
        c = torch.stack([check_psd(c[i], what=f"covariance of component {i}") for i in range(k)])
        self.sample_shape = _frames_shape(frames, d)
        self.frames = frames
        self.dim, self.num_components = d, k
        self.register_buffer("weights", w)
        self.register_buffer("log_weights", torch.log(w))
        self.register_buffer("means", m)
        self.register_buffer("covs", c)
        self.register_buffer("K", dense_noise_covariance(process.cov, self.sample_shape))
        self.register_buffer("_data_root", self._roots(c))

    @staticmethod
    def _roots(c: torch.Tensor) -> torch.Tensor:
        """``R_k`` with ``R_k R_k^T = S_k``: Cholesky where definite, ``V sqrt(Lambda)`` where singular."""
        L, info = torch.linalg.cholesky_ex(c)
        if bool((info == 0).all()):
            return L
        lam, v = torch.linalg.eigh(c)
        return torch.where((info == 0)[:, None, None], L, v * lam.clamp(min=0).sqrt()[:, None, :])

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict, process="vp-sde", noise: str | None = None, prediction: str = "eps",
                  device=None) -> "GaussianMixtureOracle":
        """Build from a JSON-style dict ``{"weights", "means", "covs", "frames"?}`` (module docstring).

        ``process`` is a name of :data:`~diffusionlab.processes.PROCESSES` (then ``noise``, a :func:`make_covariance` spec over
        axis 1, sets C: over the frames with ``frames``, else over the D coordinates) or a process object
        (whose own C is used; ``noise`` must then be None)."""
        if not isinstance(spec, dict):
            raise DiffusionLabError(f"a mixture spec must be a JSON object, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise DiffusionLabError(f"unknown key(s) {unknown} in the mixture spec; allowed: {', '.join(SPEC_KEYS)}")
        missing = [key for key in ("weights", "means", "covs") if key not in spec]
        if missing:
            raise DiffusionLabError(f"the mixture spec is missing {missing}; it needs weights, means and covs")
        frames = spec.get("frames")
        means = _as_f64(spec["means"], "mixture means")
        if means.ndim != 2:
            raise DiffusionLabError(f"mixture means must be a [K][D] list, got shape {tuple(means.shape)}")
        shape = _frames_shape(frames, means.shape[1])
        if isinstance(process, str):
            cov = make_covariance(noise, shape[0], axis=1)
            process = make_process(process, cov)
        elif noise not in (None, "iid"):
            raise DiffusionLabError("give the noise covariance through the process object, not as noise=")
        oracle = cls(spec["weights"], means, spec["covs"], process, prediction=prediction, frames=frames)
        return oracle if device is None else oracle.to(device)

    def to_spec(self) -> dict:
        """The JSON-style spec of this mixture (inverse of :meth:`from_spec`)."""
        spec = {"weights": self.weights.tolist(), "means": self.means.tolist(), "covs": self.covs.tolist()}
        if self.frames is not None:
            spec["frames"] = self.frames
        return spec

    # -- the mixture at (s, sigma) --------------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise DiffusionLabError(f"oracle samples have shape (B, {', '.join(map(str, self.sample_shape))}), "
                                    f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(_F64)

    def _cholesky(self, s: float, sigma: float) -> torch.Tensor:
        """Cholesky factors ``(K, D, D)`` of ``M_k = s^2 S_k + sigma^2 K``."""
        M = s * s * self.covs + sigma * sigma * self.K
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info != 0).any()):
            raise DiffusionLabError(
                f"the noisy mixture covariance s^2 S_k + sigma^2 K is singular at s = {s:.6g}, sigma = {sigma:.6g} "
                f"(component {int(torch.nonzero(info)[0])}): singular data covariances need sigma > 0 and a "
                "definite noise covariance"
            )
        return L

    def _at(self, xf: torch.Tensor, s: float, sigma: float, need: str = "all") -> dict:
        """Everything at one ``(s, sigma)`` for flattened float64 ``xf`` ``(B, D)``: ``log_comp`` ``(B, K)``
        (``log w_k + log N(x; s m_k, M_k)``), ``log_prob`` ``(B,)``, and unless ``need="density"``: ``zbar``
        ``(B, D)`` (``sum_k gamma_k z_k = -grad log p``), ``eps`` and ``x0`` ``(B, D)``."""
        dev = xf.device
        means, covs, Kn = self.means.to(dev), self.covs.to(dev), self.K.to(dev)
        L = self._cholesky(s, sigma).to(dev)
        r = xf[None] - s * means[:, None, :]  # (K, B, D), one row per sample
        # rows: y = r L^{-T} (so |y|^2 = r^T M_k^{-1} r) and z = y L^{-1} = M_k^{-1} r, with the triangular inverse
        # formed once per (s, sigma) (D x D, backward-stable triangular solve) and applied as batched matmuls
        Linv = torch.linalg.solve_triangular(L, torch.eye(self.dim, dtype=_F64, device=dev).expand_as(L), upper=False)
        y = r @ Linv.transpose(1, 2)
        logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        log_n = -0.5 * (y.square().sum(-1) + logdet[:, None] + self.dim * LOG_2PI)  # (K, B)
        log_comp = (self.log_weights.to(dev)[:, None] + log_n).T  # (B, K)
        log_prob = torch.logsumexp(log_comp, dim=1)
        out = {"log_comp": log_comp, "log_prob": log_prob}
        if need == "density":
            return out
        gamma = torch.exp(log_comp - log_prob[:, None])  # (B, K)
        z = y @ Linv  # (K, B, D): rows M_k^{-1} (x - s m_k)
        gk = gamma.T[:, :, None]  # (K, B, 1)
        zbar = (gk * z).sum(0)
        out["zbar"] = zbar
        out["eps"] = sigma * (zbar @ Kn)  # K symmetric
        out["x0"] = gamma @ means + s * (gk * (z @ covs)).sum(0)  # S_k symmetric
        return out

    def _by_time(self, x: torch.Tensor, t, need: str = "all") -> dict:
        """:meth:`_at` for a batch whose rows may have different times ``t`` (one factorisation per distinct t)."""
        xf = self._flat(x)
        tt = torch.as_tensor(self._time(t), device=xf.device)
        if tt.ndim == 0:
            s, sigma = self._coeffs(tt.reshape(1), xf)
            return self._at(xf, s[0], sigma[0], need)
        tb = batch_t(t, xf)
        uniq, inv = torch.unique(tb, return_inverse=True)
        s, sigma = self._coeffs(uniq, xf)
        if uniq.numel() == 1:
            return self._at(xf, s[0], sigma[0], need)
        parts = {}
        for u in range(uniq.numel()):
            rows = torch.nonzero(inv == u).reshape(-1)
            res = self._at(xf[rows], s[u], sigma[u], need)
            for key, val in res.items():
                if key not in parts:
                    parts[key] = torch.empty((xf.shape[0], *val.shape[1:]), dtype=val.dtype, device=val.device)
                parts[key][rows] = val
        return parts

    def _coeffs(self, times: torch.Tensor, like: torch.Tensor) -> tuple[list[float], list[float]]:
        """``(s, sigma)`` as float64 host lists at ``times`` (``(U,)``)."""
        dummy = torch.zeros(times.shape[0], 1, dtype=_F64, device=like.device)
        s, sigma = coeffs_like(self.process, times, dummy)
        return s.reshape(-1).tolist(), sigma.reshape(-1).tolist()

    def _shape(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(like.shape).to(like.dtype)

    # -- the model interface ------------------------------------------------------------------------------------
    @staticmethod
    def _time(t):
        """A Python float time as a float64 tensor (``torch.as_tensor`` would round it to float32)."""
        return torch.tensor(t, dtype=_F64) if isinstance(t, float) else t

    def predict(self, x_t: torch.Tensor, t) -> Prediction:
        t = self._time(t)
        res = self._by_time(x_t, t)
        self.nfe += 1
        eps, x0 = self._shape(res["eps"], x_t), self._shape(res["x0"], x_t)
        _, s_b, sig_b = self.coeffs(t, x_t)
        out = self.parametrization.target(eps, x0, s_b, sig_b)
        return Prediction(eps=eps, x0=x0, out=out, s=s_b, sigma=sig_b, v_var=None)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return super().forward(x_t, self._time(t))

    def _raw(self, x_t, tb, s, sigma):
        res = self._by_time(x_t, tb)
        return self.parametrization.target(self._shape(res["eps"], x_t), self._shape(res["x0"], x_t), s, sigma)

    def score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Exact ``grad log p_t(x_t) = -sum_k gamma_k M_k^{-1} (x_t - s m_k)``."""
        res = self._by_time(x_t, t)
        self.nfe += 1
        return self._shape(-res["zbar"], x_t)

    def c_score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Exact ``C grad log p_t(x_t) = -K sum_k gamma_k z_k``."""
        res = self._by_time(x_t, t)
        self.nfe += 1
        return self._shape(-(res["zbar"] @ self.K.to(res["zbar"].device)), x_t)

    def posterior_at(self, x: torch.Tensor, s: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``(E[eps | x], E[x_0 | x])`` for ``x = s x_0 + sigma eps``, ``eps ~ N(0, C)``, at explicit
        coefficients (Python floats or 0-d tensors): what a scheduler that keeps its own ``alpha-bar`` needs.
        One evaluation."""
        res = self._at(self._flat(x), float(s), float(sigma))
        self.nfe += 1
        return self._shape(res["eps"], x), self._shape(res["x0"], x)

    def edm_denoiser(self, y: torch.Tensor, sigma) -> torch.Tensor:
        """Karras et al.'s denoiser ``D(y; sigma) = E[x_0 | y = x_0 + sigma eps]`` (the scaled variable ``x / s``,
        EDM's noise level ``sigma / s``; k-diffusion's interface). ``sigma``: a float, 0-d or ``(B,)`` tensor
        (rows may differ). One evaluation."""
        sig = torch.as_tensor(sigma, dtype=_F64).detach().cpu().reshape(-1)
        yf = self._flat(y)
        if sig.numel() == 1 or bool((sig == sig[0]).all()):
            x0 = self._at(yf, 1.0, float(sig[0]))["x0"]
        else:
            x0 = torch.empty_like(yf)
            for v in torch.unique(sig).tolist():
                rows = torch.nonzero(sig == v).reshape(-1).to(yf.device)
                x0[rows] = self._at(yf[rows], 1.0, v)["x0"]
        self.nfe += 1
        return self._shape(x0, y)

    # -- densities and draws --------------------------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Data log-density ``log sum_k w_k N(x; m_k, S_k)`` per sample (float64); needs definite ``S_k``."""
        return self._at(self._flat(x), 1.0, 0.0, need="density")["log_prob"]

    def marginal_log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """``log p_t(x)`` per sample (float64); rows may have different times."""
        return self._by_time(x, t, need="density")["log_prob"]

    def marginal_log_prob_at(self, x: torch.Tensor, s: float, sigma: float) -> torch.Tensor:
        """``log p(x)`` of ``x = s x_0 + sigma eps`` at explicit coefficients (float64)."""
        return self._at(self._flat(x), float(s), float(sigma), need="density")["log_prob"]

    def component_of(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """The most likely component of each sample (``argmax_k w_k N(x; s m_k, M_k)``; int64 ``(B,)``) under the
        data distribution (``t=None``) or under ``p_t``."""
        if t is None:
            return self.component_at(x, 1.0, 0.0)
        return self._by_time(x, t, need="density")["log_comp"].argmax(1)

    def component_at(self, x: torch.Tensor, s: float, sigma: float) -> torch.Tensor:
        """:meth:`component_of` at explicit coefficients ``x = s x_0 + sigma eps``."""
        return self._at(self._flat(x), float(s), float(sigma), need="density")["log_comp"].argmax(1)

    def sample_data(self, n: int, generator: torch.Generator | None = None, device=None, dtype=_F64,
                    return_components: bool = False):
        """``n`` draws of ``x_0`` (shape ``(n, *sample_shape)``; with ``return_components`` also the component
        of each draw). Drawn on the generator's device (CPU if none), then moved to ``device``."""
        return self.sample_at(n, 1.0, 0.0, generator, device, dtype, return_components)

    def sample_at(self, n: int, s: float, sigma: float, generator: torch.Generator | None = None, device=None,
                  dtype=_F64, return_components: bool = False):
        """``n`` exact draws of ``s x_0 + sigma eps``, ``eps ~ N(0, C (x) I)`` (see :meth:`sample_data`)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DiffusionLabError(f"number of samples must be an integer >= 1, got {n!r}")
        gdev = generator.device if generator is not None else torch.device("cpu")
        comp = torch.multinomial(self.weights.to(gdev), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64, device=gdev)
        roots, means = self._data_root.to(gdev), self.means.to(gdev)
        x = torch.empty_like(z)
        for k in range(self.num_components):  # m_k + R_k z for the draws of component k (memory O(n D))
            rows = comp == k
            x[rows] = means[k] + z[rows] @ roots[k].T
        x = float(s) * x
        if float(sigma) != 0.0:
            e = torch.randn(n, *self.sample_shape, generator=generator, dtype=_F64, device=gdev)
            x = x + float(sigma) * self.process.cov.unwhiten(e).reshape(n, self.dim)
        out = x.reshape(n, *self.sample_shape).to(device=device if device is not None else gdev, dtype=dtype)
        return (out, comp.to(out.device)) if return_components else out

    def sample_marginal(self, n: int, t, generator: torch.Generator | None = None, device=None, dtype=_F64):
        """``n`` exact draws of ``x_t ~ p_t`` at one time ``t`` (an int for chains, a float for SDEs)."""
        s, sigma = self._coeffs(torch.as_tensor(t).reshape(1), self.means)
        return self.sample_at(n, s[0], sigma[0], generator, device, dtype)

    def mean(self) -> torch.Tensor:
        """Data mean ``sum_k w_k m_k`` (flattened, float64)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Data covariance ``sum_k w_k (S_k + m_k m_k^T) - mu mu^T`` (flattened, float64)."""
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - mu[:, None] * mu[None, :]

    def extra_repr(self) -> str:
        return (f"components={self.num_components}, sample_shape={self.sample_shape}, prediction={self.prediction!r}, "
                f"process={self.process!r}")


def load_spec(path) -> dict:
    """Read a mixture spec from a JSON file; malformed JSON is a :class:`DiffusionLabError`."""
    p = Path(path)
    if not p.is_file():
        raise DiffusionLabError(f"mixture spec file not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffusionLabError(f"mixture spec {p} is not valid JSON: {e}") from None


__all__ = ["GaussianMixtureOracle", "make_process", "load_spec"]
