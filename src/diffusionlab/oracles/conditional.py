"""Exact conditionals of Gaussian mixtures: the ground truth of class conditioning, guidance and inpainting.

**Class-conditional mixtures.** Data ``x_0 ~ sum_k w_k N(m_k, S_k)`` whose components carry class labels
``c_k``: class ``c`` is the mixture of its own components with the weights ``w_k / sum_{c_j = c} w_j``
(Bayes' rule), so ``p(x_0 | c)`` and every noisy marginal ``p_t(x | c)`` are again mixtures and the exact
``E[eps | x_t, c]`` is the mixture oracle of that class (:mod:`~diffusionlab.oracles.mixture`).
:class:`ClassConditionalMixtureOracle` is the exact "network" ``predict(x_t, t, labels)``: label ``c`` the class
``c`` mixture, the no-label index ``C`` (the number of classes) and ``labels=None`` the whole mixture, so
classifier-free guidance (:mod:`diffusionlab.conditioning`) can be checked exactly: its ``w = 1`` is the class
oracle and its ``w = 0`` the unconditional one.

**Known coordinates.** For a mask of known coordinates ``k`` (the rest ``u``) and known values ``y`` the
conditional of the unknown part is again a mixture (Bishop 2006, sec. 2.3.1, eqs. 2.81-2.82, per component, and
Bayes' rule for the weights)::

    p(x_u | x_k = y) = sum_j pi_j(y) N(x_u; mu_j(y), S_j,u|k)
    pi_j(y)  ~ w_j N(y; m_j,k, S_j,kk)                         (reweighted components)
    mu_j(y)  = m_j,u + S_j,uk S_j,kk^{-1} (y - m_j,k)          (conditioned means)
    S_j,u|k  = S_j,uu - S_j,uk S_j,kk^{-1} S_j,ku              (conditioned covariances)

(:func:`condition_mixture`, :class:`MixtureConditional`: one ``y`` and mask per row, Cholesky solves, float64). The
data conditional does not depend on the forward noise; with a noise covariance ``K = C (x) I`` (frame-correlated
C) the noisy unknown part ``x_t,u = s x_0,u + sigma eps_u`` given ``x_0,k = y`` has the components
``N(s mu_j(y), s^2 S_j,u|k + sigma^2 K_uu)`` (:meth:`MixtureConditional.noisy`), and the full noisy sample
``p(x_t | x_0,k = y)`` draws ``eps`` jointly over all coordinates (:meth:`MixtureConditional.sample_noisy`): the
known coordinates' noise is correlated with the unknown ones' (the point of :mod:`diffusionlab.conditioning`).
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import LOG_2PI
from diffusionlab.oracles.mixture import GaussianMixtureOracle, _as_f64
from diffusionlab.parametrization import Prediction
from diffusionlab.utils import as_labels, as_mask

_F64 = torch.float64


# ---- class-conditional mixtures ---------------------------------------------------------------------------------
def _check_classes(classes, k: int) -> torch.Tensor:
    try:
        c = torch.as_tensor(classes)
    except (TypeError, ValueError, RuntimeError):
        raise DiffusionLabError(f"mixture classes must be a list of {k} integers, got {classes!r}") from None
    if c.ndim != 1 or c.numel() != k or c.dtype.is_floating_point or c.dtype == torch.bool:
        raise DiffusionLabError(f"mixture classes must be a list of {k} integers (one per component), got {classes!r}")
    c = c.to(torch.long)
    if int(c.min()) < 0:
        raise DiffusionLabError(f"mixture classes must be integers >= 0, got {c.tolist()}")
    missing = sorted(set(range(int(c.max()) + 1)) - set(c.tolist()))
    if missing:
        raise DiffusionLabError(f"mixture classes must be 0..C-1 with every class used; classes {missing} have no "
                                f"component (classes: {c.tolist()})")
    return c


class ClassConditionalMixtureOracle(GaussianMixtureOracle):
    """The exact model of a Gaussian mixture whose components are labelled by ``classes`` (module docstring).

    Args:
        weights, means, covs, process, prediction, frames: as for
            :class:`~diffusionlab.oracles.mixture.GaussianMixtureOracle` (the whole, unconditional mixture).
        classes: ``(K,)`` class of each component, ``0..C-1`` with every class used.

    ``predict(x_t, t, labels)``, ``forward``, ``eps``, ``x0``, ``c_score``, ``score`` take ``labels`` (None, an int
    or ``(B,)``): label ``c < C`` the class mixture, ``C`` (:attr:`null_label`) or None the whole mixture; each call
    counts one evaluation, however many classes the batch mixes. :meth:`class_oracle` is the plain mixture oracle of
    one class (for exact class samples).
    """

    def __init__(self, weights, means, covs, classes, process, prediction: str = "eps", frames: int | None = None):
        super().__init__(weights, means, covs, process, prediction=prediction, frames=frames)
        c = _check_classes(classes, self.num_components)
        self.register_buffer("classes", c)
        self._num_classes = int(c.max()) + 1
        self._oracles = [
            GaussianMixtureOracle(self.weights[c == j], self.means[c == j], self.covs[c == j], process,
                                  prediction=prediction, frames=frames)
            for j in range(self._num_classes)
        ]

    @classmethod
    def from_spec(cls, spec: dict, process="vp-sde", noise: str | None = None, prediction: str = "eps",
                  device=None) -> "ClassConditionalMixtureOracle":
        """From a mixture spec with a ``"classes"`` list (one class per component; see
        :meth:`GaussianMixtureOracle.from_spec`)."""
        if not isinstance(spec, dict) or "classes" not in spec:
            raise DiffusionLabError("a class-conditional mixture spec needs \"classes\": one class per component")
        base = GaussianMixtureOracle.from_spec(spec, process, noise, prediction)
        oracle = cls(base.weights, base.means, base.covs, spec["classes"], base.process, prediction, base.frames)
        return oracle if device is None else oracle.to(device)

    def to_spec(self) -> dict:
        return {**super().to_spec(), "classes": self.classes.tolist()}

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the class oracles too
        out = super()._apply(fn, *args, **kwargs)
        for o in getattr(self, "_oracles", []):
            o._apply(fn, *args, **kwargs)
        return out

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def null_label(self) -> int:
        """The no-label index: the whole mixture."""
        return self._num_classes

    def class_oracle(self, label: int) -> GaussianMixtureOracle:
        """The mixture oracle of class ``label`` alone (``p(x_0 | c)``)."""
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self._num_classes:
            raise DiffusionLabError(f"class must be an integer in 0..{self._num_classes - 1}, got {label!r}")
        return self._oracles[label]

    def class_weights(self) -> torch.Tensor:
        """``p(c)``: the total weight of each class's components (float64 ``(C,)``)."""
        return torch.zeros(self._num_classes, dtype=_F64).index_add_(0, self.classes.cpu(), self.weights.cpu())

    # -- the model interface with labels ------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t, labels=None) -> Prediction:
        if labels is None:
            return super().predict(x_t, t)
        lab = as_labels(labels, x_t, self._num_classes).cpu()
        start = self.nfe  # the no-label rows go through the whole mixture's predict, which counts too
        t = self._time(t)
        tt = torch.as_tensor(t)
        per_row = tt.ndim == 1
        parts = {}
        for j in torch.unique(lab).tolist():
            rows = torch.nonzero(lab == j).reshape(-1).to(x_t.device)
            oracle = super() if j == self._num_classes else self._oracles[j]
            tj = tt.to(x_t.device)[rows] if per_row else t
            p = oracle.predict(x_t[rows], tj)
            for key in ("eps", "x0", "out"):
                if key not in parts:
                    parts[key] = torch.empty_like(x_t)
                parts[key][rows] = getattr(p, key)
        self.nfe = start + 1
        _, s_b, sig_b = self.coeffs(t, x_t)
        return Prediction(eps=parts["eps"], x0=parts["x0"], out=parts["out"], s=s_b, sigma=sig_b, v_var=None)

    def forward(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        if labels is None:
            return super().forward(x_t, t)
        return self.predict(x_t, t, labels).out

    def c_score(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        if labels is None:
            return super().c_score(x_t, t)
        return self.predict(x_t, t, labels).c_score

    def score(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        if labels is None:
            return super().score(x_t, t)
        p = self.predict(x_t, t, labels)
        return -self.process.cov.solve(p.eps) / p.sigma

    def sample_class(self, n: int, label: int, generator: torch.Generator | None = None, device=None,
                     dtype=_F64) -> torch.Tensor:
        """``n`` exact draws of ``x_0 | c = label``."""
        return self.class_oracle(label).sample_data(n, generator, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"classes={self.classes.tolist()}, " + super().extra_repr()


# ---- known coordinates --------------------------------------------------------------------------------------------
def _psd_root(c: torch.Tensor) -> torch.Tensor:
    """``R`` with ``R R^T = c`` for symmetric PSD ``(..., n, n)``: Cholesky where definite, ``V sqrt(Lambda)``
    where (numerically) singular."""
    L, info = torch.linalg.cholesky_ex(c)
    if bool((info == 0).all()):
        return L
    lam, v = torch.linalg.eigh(c)
    root = v * lam.clamp(min=0).sqrt()[..., None, :]
    return torch.where((info == 0)[..., None, None], L, root)


class _Group:
    """The rows of one mask pattern: their indices, the known/unknown coordinates, per-row log weights
    ``(R, J)`` and conditioned means ``(R, J, U)``, and the components' conditioned covariances ``(J, U, U)``."""

    def __init__(self, rows, known_idx, unknown_idx, log_w, means, covs):
        self.rows, self.known_idx, self.unknown_idx = rows, known_idx, unknown_idx
        self.log_w, self.means, self.covs = log_w, means, covs
        self.roots = _psd_root(covs) if unknown_idx.numel() else covs


class MixtureConditional:
    """``p(x_u | x_k = y)`` for each row of a batch of known values and masks (module docstring); built by
    :func:`condition_mixture`. ``sample_shape`` is the mixture's; draws are full samples with ``x_k = y`` exactly.

    Attributes: ``known`` ``(B, D)`` float64 (flattened), ``mask`` ``(B, D)`` bool, and per mask pattern a group of
    rows (:meth:`weights` gives ``pi_j(y)`` of every row).
    """

    def __init__(self, known: torch.Tensor, mask: torch.Tensor, groups: list, sample_shape, noise_cov: torch.Tensor):
        self.known, self.mask, self.groups = known, mask, groups
        self.sample_shape = tuple(sample_shape)
        self.K = noise_cov  # dense D x D noise covariance C (x) I over the flattened sample

    @property
    def num(self) -> int:
        return self.known.shape[0]

    def weights(self) -> torch.Tensor:
        """The reweighted component probabilities ``pi_j(y)`` of every row, float64 ``(B, J)``."""
        out = torch.empty(self.num, self.groups[0].log_w.shape[1], dtype=_F64)
        for g in self.groups:
            out[g.rows] = torch.softmax(g.log_w, dim=1)
        return out

    def _draw(self, g: _Group, reps: int, generator, s: float = 1.0, sigma: float = 0.0, joint: bool = True):
        """Draws of group ``g`` (each row ``reps`` times, rows repeated consecutively): ``(R reps, D)`` with the
        known coordinates ``s y + sigma eps_k`` and the unknown ``s x_0,u + sigma eps_u``, ``eps ~ N(0, K)`` over all
        coordinates (``joint``) or with ``eps_u`` and ``eps_k`` drawn independently from their marginals."""
        r = g.rows.numel()
        y = self.known[g.rows].repeat_interleave(reps, 0)
        x = y.clone()
        u = g.unknown_idx
        if u.numel():
            probs = torch.softmax(g.log_w, dim=1).repeat_interleave(reps, 0)
            comp = torch.multinomial(probs, 1, replacement=True, generator=generator).reshape(-1)
            z = torch.randn(r * reps, u.numel(), generator=generator, dtype=_F64)
            means = g.means.repeat_interleave(reps, 0)[torch.arange(r * reps), comp]  # (R reps, U)
            x[:, u] = means + (g.roots[comp] @ z[:, :, None])[:, :, 0]
        if sigma == 0.0:
            return s * x
        if joint:
            eps = torch.randn(r * reps, x.shape[1], generator=generator, dtype=_F64) @ _psd_root(self.K).T
        else:
            eps = torch.zeros_like(x)
            for idx in (g.known_idx, u):
                if idx.numel():
                    kb = self.K[idx][:, idx]
                    eps[:, idx] = torch.randn(r * reps, idx.numel(), generator=generator, dtype=_F64) @ _psd_root(kb).T
        return s * x + sigma * eps

    def _assemble(self, reps: int, draw) -> torch.Tensor:
        out = torch.empty(self.num * reps, self.known.shape[1], dtype=_F64)
        for g in self.groups:
            rows = (g.rows[:, None] * reps + torch.arange(reps)[None, :]).reshape(-1)
            out[rows] = draw(g)
        return out.reshape(self.num * reps, *self.sample_shape)

    def sample(self, generator: torch.Generator | None = None, reps: int = 1) -> torch.Tensor:
        """Exact draws of ``x_0`` given ``x_k = y``: ``reps`` per row (consecutive), shape ``(B reps, *sample_shape)``,
        float64 on the CPU; the known coordinates equal ``y``."""
        return self._assemble(reps, lambda g: self._draw(g, reps, generator))

    def sample_noisy(self, s: float, sigma: float, generator: torch.Generator | None = None, reps: int = 1,
                     joint: bool = True) -> torch.Tensor:
        """Exact draws of ``x_t = s x_0 + sigma eps`` given ``x_0,k = y`` (``x_0,u`` from the conditional,
        ``eps ~ N(0, K)`` jointly over all coordinates; ``joint=False`` draws the known and the unknown coordinates'
        noise independently, which is *not* ``p(x_t | x_0,k = y)`` when C correlates them)."""
        return self._assemble(reps, lambda g: self._draw(g, reps, generator, float(s), float(sigma), joint))

    def noisy(self, s: float, sigma: float) -> "MixtureConditional":
        """The conditional of ``x_t,u = s x_0,u + sigma eps_u`` given ``x_0,k = y``: components
        ``N(s mu_j, s^2 S_j,u|k + sigma^2 K_uu)`` with the same weights (the known entries of its draws are
        ``y``, not noised)."""
        groups = []
        for g in self.groups:
            u = g.unknown_idx
            covs = s * s * g.covs + sigma * sigma * self.K[u][:, u]
            groups.append(_Group(g.rows, g.known_idx, u, g.log_w, s * g.means, covs))
        return MixtureConditional(self.known, self.mask, groups, self.sample_shape, self.K)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x_u | x_k = y)`` of each row's unknown coordinates (``x`` ``(B, ...)``, one per row; float64)."""
        xf = x.reshape(self.num, -1).to(_F64).cpu()
        out = torch.empty(self.num, dtype=_F64)
        for g in self.groups:
            u = g.unknown_idx
            if not u.numel():
                out[g.rows] = 0.0
                continue
            L = torch.linalg.cholesky(g.covs)  # (J, U, U)
            r = xf[g.rows][:, None, u] - g.means  # (R, J, U)
            z = torch.linalg.solve_triangular(L[None].expand(r.shape[0], *L.shape), r[..., None], upper=False)[..., 0]
            logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            log_n = -0.5 * (z.square().sum(-1) + logdet[None] + u.numel() * LOG_2PI)
            out[g.rows] = torch.logsumexp(torch.log_softmax(g.log_w, 1) + log_n, dim=1)
        return out


def _flat_mask(mask, n: int, shape) -> torch.Tensor:
    """``mask`` broadcast to ``(n, *shape)`` (or, for a flattened mask, to ``(n, D)``), flattened to ``(n, D)``."""
    d = math.prod(shape)
    m = as_mask(mask, torch.as_tensor(mask).shape)  # values checked
    for target in ((n, *shape), (n, d)):
        try:
            return torch.broadcast_to(m, target).reshape(n, d).clone()
        except RuntimeError:
            continue
    raise DiffusionLabError(f"a mask of shape {tuple(m.shape)} does not broadcast to the samples' shape "
                            f"({n}, {', '.join(map(str, shape))})")


def condition_mixture(oracle: GaussianMixtureOracle, known, mask) -> MixtureConditional:
    """The exact conditional :class:`MixtureConditional` of ``oracle``'s data given ``known`` values
    (``(B, *sample_shape)`` or ``(B, D)``; only the known entries are read) on ``mask`` (1 = known, broadcastable)."""
    shape = oracle.sample_shape
    y = _as_f64(torch.as_tensor(known).detach().cpu(), "known values")
    if tuple(y.shape[1:]) not in (shape, (oracle.dim,)) or y.ndim < 2:
        raise DiffusionLabError(f"known values must have shape (B, {', '.join(map(str, shape))}), got {tuple(y.shape)}")
    y = y.reshape(y.shape[0], oracle.dim)
    m = _flat_mask(mask, y.shape[0], shape)
    w = oracle.weights.cpu()
    means, covs = oracle.means.cpu(), oracle.covs.cpu()
    codes = {}
    for i, row in enumerate(m.tolist()):
        codes.setdefault(tuple(row), []).append(i)
    groups = []
    for pattern, rows in codes.items():
        rows = torch.tensor(rows, dtype=torch.long)
        pm = torch.tensor(pattern, dtype=torch.bool)
        k_idx, u_idx = torch.nonzero(pm).reshape(-1), torch.nonzero(~pm).reshape(-1)
        yk = y[rows][:, k_idx]  # (R, k)
        if k_idx.numel() == 0:
            log_w = torch.log(w)[None].expand(rows.numel(), -1).clone()
            cm = means[None].expand(rows.numel(), -1, -1)[:, :, u_idx].clone()
            groups.append(_Group(rows, k_idx, u_idx, log_w, cm, covs[:, u_idx][:, :, u_idx]))
            continue
        S_kk = covs[:, k_idx][:, :, k_idx]
        S_uk = covs[:, u_idx][:, :, k_idx]
        S_uu = covs[:, u_idx][:, :, u_idx]
        L, info = torch.linalg.cholesky_ex(S_kk)
        if bool((info != 0).any()):
            raise DiffusionLabError("the known coordinates' covariance of a component is singular: the known values "
                                    "have no density there (give fewer known coordinates or definite covariances)")
        r = yk[None] - means[:, None, k_idx]  # (J, R, k)
        z = torch.linalg.solve_triangular(L, r.transpose(1, 2), upper=False)  # (J, k, R)
        logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        log_n = -0.5 * (z.square().sum(1) + logdet[:, None] + k_idx.numel() * LOG_2PI)  # (J, R)
        log_w = (torch.log(w)[:, None] + log_n).T  # (R, J)
        gain = torch.cholesky_solve(S_uk.transpose(1, 2), L).transpose(1, 2)  # S_uk S_kk^{-1}, (J, U, k)
        cm = means[None, :, u_idx] + torch.einsum("juk,jrk->rju", gain, r)  # (R, J, U)
        cc = S_uu - gain @ S_uk.transpose(1, 2)
        groups.append(_Group(rows, k_idx, u_idx, log_w, cm, 0.5 * (cc + cc.transpose(1, 2))))
    return MixtureConditional(y, m, groups, shape, oracle.K.cpu())


__all__ = ["ClassConditionalMixtureOracle", "MixtureConditional", "condition_mixture"]
