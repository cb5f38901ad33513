r"""Gaussian-mixture data with a linear reward: exact scores, optimal values and actions, tilted laws.

Data and reward (dimension :math:`d \ge 1`, :math:`K \ge 1` components):

.. math::  p_\text{data} = \sum_k \pi_k\,\mathcal N(m_k, S_k), \qquad r(x) = w\cdot x + r_0,
           \qquad J = E[r(Y_T)] - \beta\,\mathrm{KL}(P^\theta \,\|\, P^\text{pre}).

**Forward marginals and score** (theory.md §1). With :math:`\alpha = \alpha_t`, :math:`v = \sigma_t^2`
(``schedule.alpha(t)``, ``schedule.marginal_var(t)``) and :math:`C_k = \alpha^2 S_k + v I`,

.. math::  p_t = \sum_k \pi_k\,\mathcal N(\alpha m_k, C_k), \qquad
           s(t,x) = \sum_k \rho_k(x)\,s_k(x), \quad s_k(x) = -C_k^{-1}(x - \alpha m_k),

where :math:`\rho_k(x) \propto \pi_k \mathcal N(x;\alpha m_k, C_k)` are the responsibilities
(computed with log-sum-exp).

**Reverse kernel** (theory.md R1, per component): :math:`X_0 \mid X_t = y \sim \sum_k \rho_k(y)\,
\mathcal N(\Phi_k y + h_k, \Gamma_k)` with :math:`\Phi_k = \alpha S_k C_k^{-1}`,
:math:`h_k = (I - \alpha\Phi_k) m_k = v C_k^{-1} m_k`, :math:`\Gamma_k = S_k - \alpha^2 S_k C_k^{-1} S_k
= v S_k C_k^{-1}`. Because :math:`C_k` commutes with :math:`S_k`, all of these are evaluated in the
eigenbasis :math:`S_k = U_k \mathrm{diag}(\lambda_k) U_k^\top` (no matrix inverses, exact at ``t = 0``).

**Optimal value and action** (R1), :math:`t = T - \tau`, :math:`\mu_k(y) = \Phi_k y + h_k`:

.. math::  V^*(\tau, y) = \beta \log \sum_k \rho_k(y)\,
           \exp\!\Big(\frac{w\cdot\mu_k(y)}{\beta} + \frac{w^\top\Gamma_k w}{2\beta^2}\Big) + r_0,

.. math::  a^*(\tau, y) = s(t, y) + \nabla_y V^*/\beta = \sum_k q_k(y)\,\big(s_k(y) + \Phi_k w/\beta\big),

with :math:`q_k \propto \rho_k \exp(w\cdot\mu_k/\beta + w^\top\Gamma_k w/2\beta^2)` (the gradient of the
log-sum-exp, responsibilities included). This is exactly the score, at time :math:`t`, of the forward
diffusion started from the tilted data :math:`p_\text{data} e^{r/\beta}/Z` (R2), which is the mixture
:math:`\sum_k \tilde\pi_k \mathcal N(m_k + S_k w/\beta, S_k)`,
:math:`\tilde\pi_k \propto \pi_k \exp(w\cdot m_k/\beta + w^\top S_k w/2\beta^2)` (:meth:`tilted_law`).

**Terminal law of the optimal sampler** (R2). With the initial law :math:`\mu_0` fixed (``init="p_T"``:
the exact :math:`p_T`; ``init="standard"``: :math:`N(0, I)`), :math:`Y_T \mid Y_0 = y_0` is the
pretrained reverse kernel from :math:`y_0` tilted by :math:`e^{r/\beta}`,

.. math::  \sum_k q_k(y_0)\,\mathcal N\big(\Phi_k y_0 + h_k + \Gamma_k w/\beta,\ \Gamma_k\big)
           \qquad (\text{all at } t = T),

integrated over :math:`y_0 \sim \mu_0`. Since :math:`q_k(y_0)` is nonlinear in :math:`y_0` the result
is not a finite mixture (unless :math:`K = 1`): :meth:`sample_optimal_terminal` samples it exactly and
:meth:`optimal_terminal_moments` gives its exact mean and covariance by Gauss-Hermite quadrature. With
the initial law optimised as well the terminal law is :math:`p_T^\text{pre} e^{r/\beta}/Z`, i.e. the
tilted mixture when ``init="p_T"``. For VP with :math:`b_\max = 20` the fixed-init optimum equals the
tilt up to a relative :math:`O(\alpha_T^2) \approx 4\cdot 10^{-5}`; for the OU schedule with
:math:`b = 1, T = 1` it does not (the sampler remembers :math:`Y_0`).

Arrays: numpy methods take a batch ``y`` of shape ``(B, d)`` or one point ``(d,)`` and scalar times;
torch versions (:meth:`score_torch`, :meth:`action_fns`, :meth:`initial_sample`) compute in the dtype
and on the device of their input so they can run inside batched rollouts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import logsumexp as _np_logsumexp
from scipy.special import softmax as _np_softmax

from sa_theory.schedules import Schedule
from sa_theory.sde import ControlledSDE

from ._gmm_laws import MixtureLaws, _as_rng
from ._validate import check_beta, check_init, check_spd
from ._validate import positive_int as _positive_int
from ._validate import real_array as _real_array
from ._validate import real_scalar as _real_scalar

__all__ = ["GaussianMixtureProblem", "MixturePosterior"]

_LOG_2PI = math.log(2.0 * math.pi)
_WEIGHT_SUM_TOL = 1e-6


class MixturePosterior(NamedTuple):
    r"""The reverse kernel :math:`X_0 \mid X_t = y = \sum_k` ``resp[k]`` :math:`\mathcal N(` ``means[k]``,
    ``covs[k]`` :math:`)`.

    Shapes: ``resp`` ``(B, K)``, ``means`` ``(B, K, d)``, ``covs`` ``(K, d, d)`` for a batch of ``y``;
    ``(K,)``, ``(K, d)``, ``(K, d, d)`` for a single point.
    """

    resp: np.ndarray
    means: np.ndarray
    covs: np.ndarray


# ----------------------------------------------------------------------------------------------------
# validation helpers (private)
# ----------------------------------------------------------------------------------------------------
def _rowvec_times(v: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``v[k] @ M[k]`` for ``v`` ``(K, B, d)`` and ``M`` ``(K, d, d)`` (broadcasting is faster than a
    batched matmul for the small ``d`` of toy problems)."""
    d = M.shape[-1]
    if d > 8:
        return np.matmul(v, M)
    out = v[..., 0:1] * M[:, None, 0, :]
    for j in range(1, d):
        out = out + v[..., j : j + 1] * M[:, None, j, :]
    return out


class _Kernel(NamedTuple):
    """Per-component quantities of the forward marginal / reverse kernel at one diffusion time ``t``."""

    alpha: float
    var: float
    D: np.ndarray  # (K, d) eigenvalues of C_k = alpha^2 S_k + var I
    Cinv: np.ndarray  # (K, d, d)
    Phi: np.ndarray  # (K, d, d)  alpha S_k C_k^{-1}  (symmetric)
    h: np.ndarray  # (K, d)     var C_k^{-1} m_k
    Gamma: np.ndarray  # (K, d, d) var S_k C_k^{-1}
    Phi_w: np.ndarray  # (K, d)  Phi_k w
    h_w: np.ndarray  # (K,)    w . h_k
    wGw: np.ndarray  # (K,)    w' Gamma_k w


# ----------------------------------------------------------------------------------------------------
class GaussianMixtureProblem(MixtureLaws):
    r"""Gaussian-mixture data, linear reward ``r(x) = w.x + r0``, KL weight ``beta`` (module docstring).

    Parameters
    ----------
    weights : (K,) positive, summing to 1 (within 1e-6; renormalised exactly).
    means : (K, d).
    covs : (K, d, d) symmetric positive definite.
    schedule : :class:`sa_theory.schedules.Schedule` of the forward SDE.
    w : (d,) reward direction; ``r0`` the reward offset.
    beta : KL weight, finite and > 0.
    init : initial law :math:`\mu_0` of the sampler: ``"p_T"`` (exact forward marginal at ``T``) or
        ``"standard"`` (:math:`N(0, I)`).
    noise : the sampler's noise level :math:`\eta` (:class:`sa_theory.sde.ControlledSDE`; default 1). The
        score, marginals, posterior and tilted law do not depend on it. :math:`V^*`, :math:`a^*` and the
        fixed-init terminal law need the eta-process's own transition :math:`Y_T | Y_\tau`: for ``eta = 1`` it
        is the data posterior (formulas above); for ``K = 1`` at any eta they come exactly from the
        equivalent :class:`toy_problems.LinearGaussianProblem`; for ``K > 1``, ``d = 1`` from the eta-process's
        HJB and Kolmogorov equations on a grid (:mod:`toy_problems._gmm_eta`, error ~1e-4); for ``K > 1``,
        ``d > 1`` (no closed form) they raise ``NotImplementedError``.
    """

    def __init__(self, weights, means, covs, schedule, w, beta, r0=0.0, init="p_T", noise=1.0):
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"'schedule' must be a sa_theory.schedules.Schedule, got {type(schedule).__name__}")
        weights = _real_array("weights", weights)
        if weights.ndim != 1 or weights.size < 1:
            raise ValueError(f"'weights' must be a 1-d array with K >= 1 entries, got shape {weights.shape}")
        if np.any(weights <= 0):
            raise ValueError(f"'weights' must be positive, got {weights}")
        if abs(weights.sum() - 1.0) > _WEIGHT_SUM_TOL:
            raise ValueError(
                f"'weights' must sum to 1 (tolerance {_WEIGHT_SUM_TOL}), got sum {weights.sum()!r}")
        K = weights.size
        means = _real_array("means", means)
        if means.ndim != 2 or means.shape[0] != K or means.shape[1] < 1:
            raise ValueError(f"'means' must have shape (K, d) with K = {K} and d >= 1, got {means.shape}")
        d = means.shape[1]
        covs = _real_array("covs", covs)
        if covs.shape != (K, d, d):
            raise ValueError(f"'covs' must have shape (K, d, d) = {(K, d, d)}, got {covs.shape}")
        for k in range(K):
            covs[k] = check_spd("covs", covs[k], index=k)
        covs = 0.5 * (covs + np.swapaxes(covs, 1, 2))
        lam, U = np.linalg.eigh(covs)
        if np.any(lam <= 0):
            raise ValueError(f"'covs'[{int(np.argmin(lam.min(axis=1)))}] is not symmetric positive definite")
        w = _real_array("w", w)
        if w.shape != (d,):
            raise ValueError(f"'w' must have shape (d,) = ({d},), got {w.shape}")
        beta = check_beta(beta)
        r0 = _real_scalar("r0", r0)
        check_init(init)

        self.schedule = schedule
        self.sde = ControlledSDE(schedule, noise=noise)
        self.noise = self.sde.noise
        self._twin = None
        self.weights = weights / weights.sum()
        self.means = means
        self.covs = covs
        self.w = w
        self.beta = beta
        self.r0 = r0
        self.init = init
        self.K, self.d = K, d
        self._log_pi = np.log(self.weights)
        self._lam = lam  # (K, d)
        self._U = U  # (K, d, d), S_k = U_k diag(lam_k) U_k^T
        self._Uw = np.einsum("kji,j->ki", U, w)  # U_k^T w
        self._Um = np.einsum("kji,kj->ki", U, means)  # U_k^T m_k
        self._chol_S = np.linalg.cholesky(covs)
        self._torch_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------------
    @property
    def T(self) -> float:
        return float(self.schedule.T)

    def reward(self, x) -> np.ndarray | float:
        """:math:`r(x) = w\\cdot x + r_0`; ``(B,)`` for a batch ``(B, d)``, a float for ``(d,)``."""
        x2, single = self._points("x", x)
        r = x2 @ self.w + self.r0
        return float(r[0]) if single else r

    def __repr__(self) -> str:
        return (f"GaussianMixtureProblem(K={self.K}, d={self.d}, beta={self.beta}, init={self.init!r}, "
                f"noise={self.noise!r}, schedule={self.schedule!r})")

    def _gaussian_twin(self, what: str):
        """How the eta-process optimum is computed: ``None`` for the reverse SDE (eta = 1: the posterior
        formulas hold); else the equivalent :class:`LinearGaussianProblem` (K = 1, closed form), the grid
        solver :class:`~toy_problems._gmm_eta.EtaOptimum1D` (d = 1), or ``NotImplementedError`` naming
        ``what`` (K > 1 and d > 1)."""
        if self.sde.constant_noise == 1.0:
            return None
        if self._twin is None:
            if self.K == 1:
                from .linear_gaussian import LinearGaussianProblem

                self._twin = LinearGaussianProblem(self.means[0], self.covs[0], self.schedule, w=self.w,
                                                   r0=self.r0, beta=self.beta, init=self.init, noise=self.noise)
            elif self.d == 1:
                from ._gmm_eta import EtaOptimum1D

                self._twin = EtaOptimum1D(self)
            else:
                raise NotImplementedError(
                    f"{what} at noise eta != 1 needs the eta-process's transition Y_T | Y_tau, which has no closed "
                    f"form for a mixture (K = {self.K}; it is the data posterior only at eta = 1); it is computed for "
                    f"d = 1 (grid HJB solver) or K = 1, not for d = {self.d}")
        return self._twin

    # -- private numerics ----------------------------------------------------------------------------
    def _points(self, name: str, x) -> tuple[np.ndarray, bool]:
        arr = _real_array(name, x)
        if arr.ndim == 1 and arr.shape[0] == self.d:
            return arr[None, :], True
        if arr.ndim == 2 and arr.shape[1] == self.d:
            return arr, False
        raise ValueError(f"{name!r} must have shape (B, {self.d}) or ({self.d},), got {arr.shape}")

    def _time(self, name: str, t) -> float:
        t = _real_scalar(name, t)
        T = self.T
        if t < -1e-12 * T or t > T * (1 + 1e-12):
            raise ValueError(f"{name!r} must lie in [0, T] = [0, {T}], got {t}")
        return min(max(t, 0.0), T)

    def _kernel(self, t: float) -> _Kernel:
        alpha = float(self.schedule.alpha(t))
        var = float(self.schedule.marginal_var(t))
        lam, U = self._lam, self._U
        D = alpha**2 * lam + var  # (K, d)

        def mat(diag):  # U diag U^T
            return np.einsum("kij,kj,klj->kil", U, diag, U)

        Cinv = mat(1.0 / D)
        Phi = mat(alpha * lam / D)
        Gamma = mat(var * lam / D)
        h = np.einsum("kij,kj->ki", U, var / D * self._Um)
        Phi_w = np.einsum("kij,kj->ki", U, alpha * lam / D * self._Uw)
        h_w = np.sum(self._Uw * var / D * self._Um, axis=1)
        wGw = np.sum(self._Uw**2 * var * lam / D, axis=1)
        return _Kernel(alpha, var, D, Cinv, Phi, h, Gamma, Phi_w, h_w, wGw)

    def _components(self, kern: _Kernel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log joint ``log pi_k + log N(x; alpha m_k, C_k)`` ``(B, K)`` and component scores ``(B, K, d)``."""
        # coordinates in the eigenbasis of S_k (and C_k): z[b, k] = U_k^T (x_b - alpha m_k)
        diff = x[None, :, :] - kern.alpha * self.means[:, None, :]  # (K, B, d)
        z = _rowvec_times(diff, self._U)
        zD = z / kern.D[:, None, :]
        log_joint = (self._log_pi - 0.5 * np.sum(z * zD, axis=2).T
                     - 0.5 * np.sum(np.log(kern.D), axis=1) - 0.5 * self.d * _LOG_2PI)
        comp_scores = -_rowvec_times(zD, np.swapaxes(self._U, 1, 2))  # (K, B, d)
        return log_joint, comp_scores.transpose(1, 0, 2)

    def _tilt_exponent(self, kern: _Kernel, y: np.ndarray) -> np.ndarray:
        """:math:`w\\cdot\\mu_k(y)/\\beta + w^\\top\\Gamma_k w/2\\beta^2`, shape ``(B, K)``."""
        return (y @ kern.Phi_w.T + kern.h_w) / self.beta + kern.wGw / (2 * self.beta**2)

    # -- forward marginals ---------------------------------------------------------------------------
    def log_density(self, t, x):
        r""":math:`\log p_t(x)`; ``(B,)`` for ``x`` ``(B, d)``, a float for ``(d,)``."""
        t = self._time("t", t)
        x2, single = self._points("x", x)
        log_joint, _ = self._components(self._kernel(t), x2)
        out = _np_logsumexp(log_joint, axis=1)
        return float(out[0]) if single else out

    def score(self, t, x):
        r"""Exact score :math:`\nabla\log p_t(x) = \sum_k \rho_k(x)\,(-C_k^{-1}(x - \alpha_t m_k))`;
        same shape as ``x``."""
        t = self._time("t", t)
        x2, single = self._points("x", x)
        log_joint, comp_scores = self._components(self._kernel(t), x2)
        out = np.einsum("bk,bki->bi", _np_softmax(log_joint, axis=1), comp_scores)
        return out[0] if single else out

    def sample_data(self, n, rng=None) -> np.ndarray:
        """``n`` draws from :math:`p_\\text{data}`, shape ``(n, d)``."""
        n = _positive_int("n", n)
        rng = _as_rng(rng)
        k = rng.choice(self.K, size=n, p=self.weights)
        z = rng.standard_normal((n, self.d))
        return self.means[k] + np.einsum("nij,nj->ni", self._chol_S[k], z)

    def sample_marginal(self, t, n, rng=None) -> np.ndarray:
        r"""``n`` draws from :math:`p_t`: :math:`X_t = \alpha_t X_0 + \sigma_t Z`, shape ``(n, d)``."""
        t = self._time("t", t)
        rng = _as_rng(rng)
        x0 = self.sample_data(n, rng)
        alpha, var = float(self.schedule.alpha(t)), float(self.schedule.marginal_var(t))
        return alpha * x0 + math.sqrt(var) * rng.standard_normal(x0.shape)

    # -- reverse kernel ------------------------------------------------------------------------------
    def posterior_kernel(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r"""``(Phi, h, Gamma)`` of shapes ``(K, d, d)``, ``(K, d)``, ``(K, d, d)``:
        :math:`X_0 \mid X_t = y, \text{component } k \sim \mathcal N(\Phi_k y + h_k, \Gamma_k)`."""
        kern = self._kernel(self._time("t", t))
        return kern.Phi, kern.h, kern.Gamma

    def posterior(self, t, y) -> MixturePosterior:
        r"""Law of :math:`X_0 \mid X_t = y`: responsibilities :math:`\rho_k(y)`, means
        :math:`\Phi_k y + h_k`, covariances :math:`\Gamma_k` (see :class:`MixturePosterior` for shapes)."""
        t = self._time("t", t)
        y2, single = self._points("y", y)
        kern = self._kernel(t)
        log_joint, _ = self._components(kern, y2)
        resp = _np_softmax(log_joint, axis=1)
        means = np.einsum("kij,bj->bki", kern.Phi, y2) + kern.h
        if single:
            return MixturePosterior(resp[0], means[0], kern.Gamma)
        return MixturePosterior(resp, means, kern.Gamma)

    # -- optimal control -----------------------------------------------------------------------------
    def optimal_value(self, tau, y):
        r""":math:`V^*(\tau, y) = \beta\log E^\text{pre}[e^{r(Y_T)/\beta} \mid Y_\tau = y]
        = \beta \log\sum_k \rho_k(y) e^{w\cdot\mu_k(y)/\beta + w^\top\Gamma_k w/2\beta^2} + r_0`
        at :math:`t = T - \tau`; ``(B,)`` or a float. :math:`V^*(T, y) = r(y)`. (For eta = 1; see ``noise``.)"""
        tau = self._time("tau", tau)
        y2, single = self._points("y", y)
        twin = self._gaussian_twin("optimal_value")
        if twin is not None:
            v = twin.optimal_value(tau, y2)
            return float(v[0]) if single else v
        kern = self._kernel(self.T - tau)
        log_joint, _ = self._components(kern, y2)
        v = self.beta * (_np_logsumexp(log_joint + self._tilt_exponent(kern, y2), axis=1)
                         - _np_logsumexp(log_joint, axis=1)) + self.r0
        return float(v[0]) if single else v

    def optimal_action(self, tau, y):
        r""":math:`a^*(\tau, y) = s(T-\tau, y) + \nabla_y V^*/\beta
        = \sum_k q_k(y)\,(s_k(y) + \Phi_k w/\beta)`, :math:`q_k \propto \rho_k e^{w\cdot\mu_k/\beta +
        w^\top\Gamma_k w/2\beta^2}`; shape of ``y``. Equals the tilted problem's score at :math:`T-\tau`
        (eta = 1). At other eta (K = 1): :math:`s + \frac{2\eta}{1+\eta}\nabla V^*/\beta`, see ``noise``."""
        tau = self._time("tau", tau)
        y2, single = self._points("y", y)
        twin = self._gaussian_twin("optimal_action")
        if twin is not None:
            out = twin.optimal_action(tau, y2)
            return out[0] if single else out
        kern = self._kernel(self.T - tau)
        log_joint, comp_scores = self._components(kern, y2)
        q = _np_softmax(log_joint + self._tilt_exponent(kern, y2), axis=1)
        out = np.einsum("bk,bki->bi", q, comp_scores + kern.Phi_w / self.beta)
        return out[0] if single else out

    # -- tilted data ---------------------------------------------------------------------------------
    def _tilted_log_weights(self) -> np.ndarray:
        Sw = np.einsum("kij,j->ki", self.covs, self.w)
        return self._log_pi + self.means @ self.w / self.beta + (Sw @ self.w) / (2 * self.beta**2)

    def tilted_law(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r"""``(weights, means, covs)`` of :math:`p_\text{data} e^{r/\beta}/Z`: component :math:`k` becomes
        :math:`\mathcal N(m_k + S_k w/\beta, S_k)` with weight
        :math:`\propto \pi_k \exp(w\cdot m_k/\beta + w^\top S_k w/2\beta^2)`."""
        weights = _np_softmax(self._tilted_log_weights())
        means = self.means + np.einsum("kij,j->ki", self.covs, self.w) / self.beta
        return weights, means, self.covs.copy()

    def tilt_log_normalizer(self) -> float:
        r""":math:`\log Z = \log E_{p_\text{data}}[e^{r(X)/\beta}]
        = \log\sum_k \pi_k e^{w\cdot m_k/\beta + w^\top S_k w/2\beta^2} + r_0/\beta`."""
        return float(_np_logsumexp(self._tilted_log_weights())) + self.r0 / self.beta

    def tilted_problem(self) -> GaussianMixtureProblem:
        """A :class:`GaussianMixtureProblem` whose data is the tilted mixture (same schedule, reward,
        ``beta``, ``init`` and ``noise``); for eta = 1 its score at ``T - tau`` is :meth:`optimal_action` at
        ``tau`` (not for other eta, theory.md §5)."""
        weights, means, covs = self.tilted_law()
        return GaussianMixtureProblem(weights, means, covs, self.schedule, self.w, self.beta, self.r0,
                                      self.init, noise=self.noise)
