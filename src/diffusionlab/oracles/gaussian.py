"""Exact answers for Gaussian data: the test oracle of every sampler, objective and likelihood.

Data ``x_0 ~ N(m, Sigma)`` on the flattened sample (``D`` entries, ``Sigma`` dense ``D x D``). Under any
process with marginal ``q(x_t | x_0) = N(s x_0, sigma^2 K)``, ``K`` the dense ``C (x) I`` over the flattened
sample (built by ``cov.apply`` on the identity basis reshaped to the sample shape, so any rank works), the
noisy marginal is Gaussian too::

    p_t = N(s m, M_t),   M_t = s^2 Sigma + sigma^2 K

and the posterior means an optimal network would learn are linear in ``x_t`` (Gaussian conditioning)::

    E[eps | x_t] = sigma K M_t^{-1} (x_t - s m)
    E[x_0 | x_t] = m + s Sigma M_t^{-1} (x_t - s m)          (stable as s -> 0)
    grad log p_t(x_t) = -M_t^{-1} (x_t - s m),   C grad log p_t = K grad log p_t = -E[eps | x_t] / sigma

:class:`GaussianOracle` is a :class:`~diffusionlab.parametrization.DiffusionModel` returning these exactly
(float64, Cholesky solves, batched over samples and over distinct times), so samplers run on it unchanged.
:meth:`GaussianOracle.elbo_closed_form` is DDPM's variational bound of this exact-mean model in closed form.
"""

from __future__ import annotations

import math

import torch

from diffusionlab.errors import DiffusionLabError
from diffusionlab.gaussian import LOG_2PI, full_log_prob
from diffusionlab.noise.covariance import check_psd
from diffusionlab.parametrization import (
    DiffusionModel,
    Prediction,
    batch_t,
    coeffs_like,
    fixed_large_variance,
    reverse_variances,
)

_F64 = torch.float64


def dense_noise_covariance(cov, sample_shape) -> torch.Tensor:
    """``K = C (x) I`` as a dense float64 ``D x D`` matrix over the flattened sample of shape ``sample_shape``:
    column ``j`` is ``cov.apply`` of the ``j``-th basis sample (rank-agnostic)."""
    shape = tuple(int(s) for s in sample_shape)
    d = math.prod(shape)
    basis = torch.eye(d, dtype=_F64).reshape(d, *shape)
    cov.check(basis)
    k = cov.apply(basis).reshape(d, d)
    return 0.5 * (k + k.T)


class GaussianOracle(DiffusionModel):
    """The exact posterior-mean "network" for Gaussian data ``N(mean, covariance)`` under ``process``.

    Args:
        mean: tensor of the sample shape (e.g. ``(2,)`` points or ``(F, d)`` frames); defines the shape.
        covariance: ``D x D`` symmetric positive definite, ``D = mean.numel()``, over ``mean.flatten()``.
        process: any :class:`~diffusionlab.processes.GaussianProcess`; its ``cov`` acts on the sample's axis.
        prediction: the parametrization :meth:`forward` encodes its output in (``predict``, ``eps``, ``x0``,
            ``score`` and ``c_score`` are exact whatever it is).

    Each :meth:`predict`/:meth:`forward`/:meth:`score`/:meth:`c_score` call counts one evaluation in ``nfe``.
    Batches may mix times: the work is one Cholesky factorisation per distinct ``t`` (``torch.unique``, which
    synchronises with an accelerator -- fine for a test oracle).
    """

    def __init__(self, mean, covariance, process, prediction: str = "eps"):
        super().__init__(None, process, prediction=prediction, learn_variance=False, scale_input=False)
        mean = torch.as_tensor(mean, dtype=_F64)
        if mean.ndim < 1:
            raise DiffusionLabError(f"oracle mean must have the sample's shape (at least 1-D), got a scalar")
        self.sample_shape = tuple(mean.shape)
        self.dim = mean.numel()
        sigma = check_psd(covariance, what="data covariance")
        if sigma.shape != (self.dim, self.dim):
            raise DiffusionLabError(
                f"data covariance must be {self.dim}x{self.dim} for a mean of shape {self.sample_shape}, "
                f"got {tuple(sigma.shape)}"
            )
        if torch.linalg.cholesky_ex(sigma)[1] != 0:
            raise DiffusionLabError("data covariance must be positive definite")
        self.register_buffer("mean_flat", mean.reshape(-1).clone())
        self.register_buffer("Sigma", sigma)
        self.register_buffer("K", dense_noise_covariance(process.cov, self.sample_shape))

    @classmethod
    def random(cls, sample_shape, process, generator: torch.Generator | None = None, prediction: str = "eps",
               mean_scale: float = 0.5, min_eig: float = 0.1):
        """A random Gaussian on ``sample_shape``: mean ``N(0, mean_scale^2 I)``, covariance
        ``A A^T / D + min_eig I`` with ``A`` standard normal (eigenvalues O(1), at least ``min_eig``)."""
        shape = tuple(int(s) for s in sample_shape)
        d = math.prod(shape)
        mean = mean_scale * torch.randn(shape, generator=generator, dtype=_F64)
        a = torch.randn(d, d, generator=generator, dtype=_F64)
        return cls(mean, a @ a.T / d + min_eig * torch.eye(d, dtype=_F64), process, prediction=prediction)

    # -- data ------------------------------------------------------------------------------------------------
    def sample_data(self, n: int, generator: torch.Generator | None = None, device=None, dtype=_F64) -> torch.Tensor:
        """``n`` draws of ``x_0 ~ N(m, Sigma)``, shape ``(n, *sample_shape)``."""
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64, device=device)
        L = torch.linalg.cholesky(self.Sigma.to(z.device))
        x = self.mean_flat.to(z.device) + z @ L.T
        return x.reshape(n, *self.sample_shape).to(dtype)

    def data_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; m, Sigma)`` per sample (float64)."""
        xf = self._flat(x)
        return full_log_prob(xf, self.mean_flat.to(xf.device), self.Sigma.to(xf.device))

    def marginal_moments(self, t):
        """``(s_t m, M_t)``: mean and covariance of ``p_t`` at one time ``t`` (flattened, float64)."""
        dev = self.mean_flat.device
        s, sigma = self._unique_coeffs(torch.as_tensor(t, device=dev).reshape(1), self.mean_flat[None])
        return s[0] * self.mean_flat, self._M(s, sigma)[0]

    def marginal_log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """``log p_t(x) = log N(x; s_t m, M_t)`` per sample (float64)."""
        xf = self._flat(x)
        tb = batch_t(t, xf)
        uniq, inv = torch.unique(tb, return_inverse=True)
        s, sigma = self._unique_coeffs(uniq, xf)
        M = self._M(s, sigma)
        return full_log_prob(xf, s[inv][:, None] * self.mean_flat.to(xf.device), M[inv])

    # -- exact predictions -----------------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise DiffusionLabError(f"oracle samples have shape (B, {', '.join(map(str, self.sample_shape))}), "
                                    f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(_F64)

    def _unique_coeffs(self, uniq: torch.Tensor, like: torch.Tensor):
        """``(s, sigma)`` as float64 ``(U,)`` tensors at the distinct times ``uniq``."""
        dummy = torch.zeros(uniq.shape[0], 1, dtype=_F64, device=like.device)
        s, sigma = coeffs_like(self.process, uniq, dummy)
        return s.reshape(-1), sigma.reshape(-1)

    def _M(self, s: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dev = s.device
        return s[:, None, None] ** 2 * self.Sigma.to(dev) + sigma[:, None, None] ** 2 * self.K.to(dev)

    def _solve(self, x_t: torch.Tensor, t):
        """``(z, s, sigma)`` with ``z = M_t^{-1} (x_t - s m)`` per sample (flattened float64, ``(B, D)``)."""
        xf = self._flat(x_t)
        tb = batch_t(t, xf)
        uniq, inv = torch.unique(tb, return_inverse=True)
        s_u, sig_u = self._unique_coeffs(uniq, xf)
        L = torch.linalg.cholesky(self._M(s_u, sig_u))
        s, sigma = s_u[inv][:, None], sig_u[inv][:, None]
        r = xf - s * self.mean_flat.to(xf.device)
        if uniq.numel() == 1:
            z = torch.cholesky_solve(r.T, L[0]).T
        else:
            z = torch.cholesky_solve(r.unsqueeze(-1), L[inv]).squeeze(-1)
        return z, s, sigma

    def _exact(self, x_t: torch.Tensor, t):
        """Exact ``(eps, x0, z, s, sigma)``, flattened float64."""
        z, s, sigma = self._solve(x_t, t)
        dev = z.device
        eps = sigma * (z @ self.K.to(dev))  # K symmetric: (K z_b)^T = z_b^T K
        x0 = self.mean_flat.to(dev) + s * (z @ self.Sigma.to(dev))
        return eps, x0, z, s, sigma

    def _shape(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(like.shape).to(like.dtype)

    def predict(self, x_t: torch.Tensor, t) -> Prediction:
        eps, x0, _, s, sigma = self._exact(x_t, t)
        self.nfe += 1
        eps, x0 = self._shape(eps, x_t), self._shape(x0, x_t)
        _, s_b, sig_b = self.coeffs(t, x_t)
        out = self.parametrization.target(eps, x0, s_b, sig_b)
        return Prediction(eps=eps, x0=x0, out=out, s=s_b, sigma=sig_b, v_var=None)

    def _raw(self, x_t, tb, s, sigma):
        eps, x0, _, _, _ = self._exact(x_t, tb)
        return self.parametrization.target(self._shape(eps, x_t), self._shape(x0, x_t), s, sigma)

    def score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Exact ``grad log p_t(x_t) = -M_t^{-1} (x_t - s m)``."""
        z, _, _ = self._solve(x_t, t)
        self.nfe += 1
        return self._shape(-z, x_t)

    def c_score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Exact ``C grad log p_t(x_t) = -K M_t^{-1} (x_t - s m)``."""
        z, _, _ = self._solve(x_t, t)
        self.nfe += 1
        return self._shape(-(z @ self.K.to(z.device)), x_t)

    # -- the DDPM bound in closed form -----------------------------------------------------------------------
    def elbo_closed_form(self, x0: torch.Tensor, variance: str = "beta", return_terms: bool = False):
        """Exact ELBO ``E_q log p_theta(x_{0:T}) / q(x_{1:T} | x_0)`` (nats, per sample) of this exact-mean model.

        The reverse process is ``p_theta(x_{t-1} | x_t) = N(A_t x_t + B_t E[x_0 | x_t], v_t C)`` on the chain
        (``v_t = b_t^2`` for ``"beta"``, ``beta-tilde_t`` for ``"beta_tilde"``; at ``t = 1`` the Gaussian
        decoder ``N(x_0; E[x_0 | x_1], v_1 C)`` with the variances of
        :func:`~diffusionlab.parametrization.reverse_variances`), prior ``N(0, prior_std^2 C)``. With
        ``e_t = E[x_0 | x_t] - x_0 = (s G - I)(x_0 - m) + sigma G eps``, ``G = s Sigma M_t^{-1}``,
        ``eps ~ N(0, K)``, each expectation is a Gaussian quadratic form::

            E e^T K^{-1} e = u^T K^{-1} u + sigma^2 tr(G^T K^{-1} G K),   u = (s G - I)(x_0 - m)
            L_{t-1} = 1/2 [D (r - 1 - log r) + B_t^2 E e^T K^{-1} e / v_t],   r = beta-tilde_t / v_t   (t >= 2)
            L_0 = 1/2 [E e^T K^{-1} e / v_1 + D log(2 pi v_1) + log det K]

        and ``ELBO = -(L_T + sum_t L_{t-1})`` with ``L_T = KL(q(x_T | x_0) || prior)``.
        Returns the ELBO ``(B,)``; with ``return_terms`` also ``terms`` ``(B, T)`` (``terms[:, t-1]`` is the
        expected ``L_{t-1}``, ``L_0`` the decoder NLL) and the prior term ``(B,)``.
        """
        process = self.process
        process.require_discrete("elbo_closed_form")
        if variance not in ("beta", "fixed_large", "beta_tilde"):
            raise DiffusionLabError(f"closed-form ELBO variance must be 'beta', 'fixed_large' or 'beta_tilde', got "
                                    f"{variance!r}")
        xf = self._flat(x0)
        dev = xf.device
        T, D = process.T, self.dim
        t = torch.arange(1, T + 1)
        s, sigma = process.mean_scale[t].to(dev), process.sigma[t].to(dev)
        M = self._M(s, sigma)
        LM = torch.linalg.cholesky(M)
        Sig, K, m = self.Sigma.to(dev), self.K.to(dev), self.mean_flat.to(dev)
        G = s[:, None, None] * torch.cholesky_solve(Sig.expand(T, D, D), LM).transpose(-1, -2)  # s Sigma M^{-1}
        LK = torch.linalg.cholesky(K)
        eye = torch.eye(D, dtype=_F64, device=dev)
        u = torch.einsum("tij,bj->tbi", s[:, None, None] * G - eye, xf - m)  # (T, B, D)
        wu = torch.linalg.solve_triangular(LK, u.reshape(-1, D).T, upper=False)  # L_K^{-1} u
        quad_u = wu.square().sum(0).reshape(T, -1)
        LinvGL = torch.linalg.solve_triangular(LK, G @ LK, upper=False)
        tr = LinvGL.square().sum((-2, -1))  # tr(G^T K^{-1} G K) = ||L_K^{-1} G L_K||_F^2
        e_quad = quad_u + (sigma**2 * tr)[:, None]  # (T, B)

        upper, lower = reverse_variances(process.b**2, process.post_var)
        large = fixed_large_variance(process.b**2, process.post_var)
        v = {"beta": upper, "fixed_large": large, "beta_tilde": lower}[variance][t].to(dev)
        post_var, B = process.post_var[t].to(dev), process.post_B[t].to(dev)
        r = post_var / v
        kl_const = torch.where(t.to(dev) >= 2, D * (r - 1.0 - torch.log(r.clamp(min=1e-300))), torch.zeros_like(r))
        kl = 0.5 * (kl_const[:, None] + (B**2 / v)[:, None] * e_quad)
        logdet_K = 2.0 * torch.log(torch.diagonal(LK)).sum()
        dec = 0.5 * (e_quad[0] / v[0] + D * (LOG_2PI + torch.log(v[0])) + logdet_K)
        terms = torch.cat([dec[None], kl[1:]], 0).T  # (B, T)
        prior = process.prior_kl(x0.to(_F64))
        elbo = -(terms.sum(1) + prior)
        return (elbo, terms, prior) if return_terms else elbo

    def extra_repr(self) -> str:
        return f"sample_shape={self.sample_shape}, prediction={self.prediction!r}, process={self.process!r}"
