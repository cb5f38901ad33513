r"""Linear-quadratic-Gaussian fine-tuning problem with everything in closed form (theory.md R1-R3).

Data :math:`p_\text{data} = N(m_0, S_0)` in :math:`\mathbb R^d`, a forward schedule, a quadratic reward
:math:`r(x) = -\tfrac12 x^\top Q x + w^\top x + r_0` and a KL weight :math:`\beta`. The pretrained score
is exact and affine, :math:`s(t, y) = -S_t^{-1}(y - \alpha_t m_0)`, :math:`S_t = \alpha_t^2 S_0 + \sigma_t^2 I`.

**Policy class.** Affine corrections of the score, :math:`a = s(T-\tau, y) + K(\tau) y + k(\tau)`, with
:math:`K, k` constant on ``M`` equal pieces of :math:`[0, T]` (piece ``j`` is
:math:`[jT/M, (j+1)T/M)`), packed as ``theta = [vec(K_1) row-major, k_1, ..., vec(K_M), k_M]``
(length :math:`M(d^2 + d)`). ``theta = 0`` is the pretrained sampler. The controlled state is linear,

.. math:: dY = (A(\tau) Y + c(\tau)) d\tau + g\, dB, \quad A = -f I + g^2(-S_t^{-1} + K), \quad
          c = g^2(\alpha_t S_t^{-1} m_0 + k),

so its moments solve linear ODEs and the value :math:`V^\theta = -\tfrac12 y^\top U y + u^\top y + u_0`
solves the backward Feynman-Kac (Lyapunov) ODEs

.. math:: U' = -(A^\top U + U A) - \beta g^2 K^\top K, \quad u' = -A^\top u + U c + \beta g^2 K^\top k,
          \quad u_0' = -c^\top u + \tfrac{g^2}{2}\mathrm{tr}\,U + \tfrac{\beta g^2}{2}|k|^2,

with :math:`U(T) = Q, u(T) = w, u_0(T) = r_0`. "Exact" below means these ODEs solved with DOP853 at
``rtol=1e-11`` piece by piece (no Monte Carlo), or closed forms.

**Discrete chain.** ``discrete_*`` give the exact expectations for the ``N``-step Euler-Maruyama chain
(uniform grid, coefficients frozen at the left end :math:`\tau_k`, reward :math:`r(Y_N)`, KL
:math:`\sum_k \tfrac{g_k^2 d\tau}{2}|a_k - s_k|^2`) by exact moment recursions; the gradient is taken by
autograd through the recursion (float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from sa_theory.schedules import Schedule

from ._validate import as_matrix, as_vector, check_beta, check_init, check_spd, check_symmetric, real_scalar

__all__ = ["LinearGaussianProblem", "gaussian_kl"]

_RTOL, _ATOL = 1e-11, 1e-13


def gaussian_kl(m1, S1, m2, S2) -> float:
    r""":math:`KL(N(m_1,S_1) \| N(m_2,S_2))` in nats."""
    m1, m2, S1, S2 = map(np.asarray, (m1, m2, S1, S2))
    d = m1.shape[0]
    L2 = np.linalg.cholesky(S2)
    S2inv_S1 = np.linalg.solve(S2, S1)
    dm = m2 - m1
    logdet2 = 2 * np.log(np.diag(L2)).sum()
    logdet1 = np.linalg.slogdet(S1)[1]
    return 0.5 * (np.trace(S2inv_S1) + dm @ np.linalg.solve(S2, dm) - d + logdet2 - logdet1)


@dataclass
class _Affine:
    """A policy correction a - s = K(tau) y + k(tau), with breakpoints where K, k may jump."""

    K: Callable[[float], np.ndarray]
    k: Callable[[float], np.ndarray]
    breaks: np.ndarray


class LinearGaussianProblem:
    """Gaussian data, quadratic reward: exact scores, values, optimum, objective and gradients.

    Parameters
    ----------
    m0, S0: mean ``(d,)`` and SPD covariance ``(d, d)`` of the data.
    schedule: a :class:`sa_theory.schedules.Schedule`.
    Q, w, r0: reward :math:`r(x) = -x^\\top Q x/2 + w^\\top x + r_0` (``Q`` symmetric, default 0; ``w``
        default 0). :math:`S_0^{-1} + Q/\\beta` must be positive definite (the tilted law exists).
    beta: KL weight, > 0.
    init: initial law of the sampler, ``"p_T"`` (the exact marginal :math:`N(\\alpha_T m_0, S_T)`) or
        ``"standard"`` (:math:`N(0, I)`).
    """

    def __init__(self, m0, S0, schedule: Schedule, Q=None, w=None, r0: float = 0.0, beta: float = 1.0,
                 init: str = "p_T"):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"'schedule' must be a sa_theory.schedules.Schedule, got {type(schedule).__name__}")
        self.m0 = as_vector("m0", m0)
        d = self.d = self.m0.shape[0]
        self.S0 = check_spd("S0", as_matrix("S0", S0, d))
        self.Q = np.zeros((d, d)) if Q is None else check_symmetric("Q", as_matrix("Q", Q, d), tol=1e-10)
        self.w = np.zeros(d) if w is None else as_vector("w", w, d)
        self.r0 = real_scalar("r0", r0)
        self.beta = check_beta(beta)
        self.init = check_init(init)
        self.schedule = schedule
        self.T = float(schedule.T)
        check_spd("S0^{-1} + Q/beta (tilted precision)", np.linalg.inv(self.S0) + self.Q / self.beta)
        lam, V = np.linalg.eigh(self.S0)
        self._lam, self._V = lam, V
        self._torch_cache: dict = {}

    # ------------------------------------------------------------------ data, reward, score ---------
    @property
    def n_params_per_piece(self) -> int:
        return self.d * self.d + self.d

    def n_params(self, pieces: int) -> int:
        return self._check_pieces(pieces) * self.n_params_per_piece

    def reward(self, x):
        """:math:`r(x) = -x^\\top Q x/2 + w^\\top x + r_0`, batched over leading dims."""
        x = np.asarray(x, dtype=float)
        return -0.5 * np.einsum("...i,ij,...j->...", x, self.Q, x) + x @ self.w + self.r0

    def _Sinv(self, t: float) -> np.ndarray:
        a2 = float(self.schedule.alpha(t)) ** 2
        v = float(self.schedule.marginal_var(t))
        return (self._V / (a2 * self._lam + v)) @ self._V.T

    def marginal(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of :math:`p_t = N(\\alpha_t m_0, \\alpha_t^2 S_0 + \\sigma_t^2 I)`."""
        a = float(self.schedule.alpha(t))
        return a * self.m0, a * a * self.S0 + float(self.schedule.marginal_var(t)) * np.eye(self.d)

    def score(self, t: float, x):
        """Exact score :math:`s(t,x) = -S_t^{-1}(x - \\alpha_t m_0)` at diffusion time ``t``."""
        x = np.asarray(x, dtype=float)
        a = float(self.schedule.alpha(t))
        return -(x - a * self.m0) @ self._Sinv(t)

    def _score_affine(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """``(Ls, ls)`` with ``s(t, y) = Ls y + ls``."""
        Si = self._Sinv(t)
        return -Si, float(self.schedule.alpha(t)) * Si @ self.m0

    def initial_law(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the sampler's initial law :math:`\\mu_0`."""
        if self.init == "p_T":
            return self.marginal(self.T)
        return np.zeros(self.d), np.eye(self.d)

    # ------------------------------------------------------------------ closed-form optimum -------
    def posterior(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reverse kernel :math:`X_0 | X_t = y \\sim N(\\Phi_t y + h_t, \\Gamma_t)`: returns ``(Phi, h, Gamma)``."""
        a = float(self.schedule.alpha(t))
        Si = self._Sinv(t)
        Phi = a * self.S0 @ Si
        h = (np.eye(self.d) - a * Phi) @ self.m0
        Gam = self.S0 - a * a * self.S0 @ Si @ self.S0
        return Phi, h, 0.5 * (Gam + Gam.T)

    def _tilt(self, mean, cov) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian ``N(mean, cov)`` tilted by :math:`e^{r/\\beta}`: ``(mean', cov')``, stable for cov -> 0."""
        GM = np.linalg.solve(np.eye(self.d) + cov @ self.Q / self.beta, cov)
        GM = 0.5 * (GM + GM.T)
        return mean + GM @ (self.w - self.Q @ mean) / self.beta, GM

    def optimal_value_coeffs(self, tau: float) -> tuple[np.ndarray, np.ndarray, float]:
        """``(U, u, u0)`` with :math:`V^*(\\tau,y) = -y^\\top U y/2 + u^\\top y + u_0` (closed form, R1).

        :math:`V^* = \\beta\\log E[e^{r(X_0)/\\beta} | X_t = y]` with :math:`X_0|X_t=y \\sim N(\\Phi y + h,\\Gamma)`.
        """
        t = self._t_of(tau)
        Phi, h, Gam = self.posterior(t)
        I = np.eye(self.d)
        M = I + Gam @ self.Q / self.beta
        GM = np.linalg.solve(M, Gam)
        GM = 0.5 * (GM + GM.T)
        Qe = self.Q - self.Q @ GM @ self.Q / self.beta
        Qe = 0.5 * (Qe + Qe.T)
        we = self.w - self.Q @ GM @ self.w / self.beta
        const = self.r0 + self.w @ GM @ self.w / (2 * self.beta) - 0.5 * self.beta * np.linalg.slogdet(M)[1]
        U = Phi.T @ Qe @ Phi
        u = Phi.T @ (we - Qe @ h)
        u0 = -0.5 * h @ Qe @ h + we @ h + const
        return 0.5 * (U + U.T), u, float(u0)

    def optimal_value(self, tau: float, y):
        """:math:`V^*(\\tau, y) = \\beta \\log E^{pre}[e^{r(Y_T)/\\beta} | Y_\\tau = y]` (closed form)."""
        U, u, u0 = self.optimal_value_coeffs(tau)
        y = np.asarray(y, dtype=float)
        return -0.5 * np.einsum("...i,ij,...j->...", y, U, y) + y @ u + u0

    def optimal_correction(self, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """``(K*, k*)`` with :math:`a^* - s = \\nabla V^*/\\beta = K^* y + k^*`."""
        U, u, _ = self.optimal_value_coeffs(tau)
        return -U / self.beta, u / self.beta

    def optimal_action(self, tau: float, y):
        """:math:`a^*(\\tau,y) = s(T-\\tau, y) + \\nabla_y V^*(\\tau, y)/\\beta`."""
        K, k = self.optimal_correction(tau)
        y = np.asarray(y, dtype=float)
        return self.score(self._t_of(tau), y) + y @ K.T + k

    def riccati_value_coeffs(self, taus) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """``(U, u, u0)`` of :math:`V^*` at each of ``taus`` from the HJB Riccati ODE (an independent route).

        :math:`U' = -(A_0^\\top U + U A_0) + \\tfrac{g^2}{\\beta}U^2`,
        :math:`u' = -A_0^\\top u + g^2 U l_s + \\tfrac{g^2}{\\beta} U u`,
        :math:`u_0' = -g^2 l_s^\\top u + \\tfrac{g^2}{2}\\mathrm{tr}U - \\tfrac{g^2}{2\\beta}|u|^2`,
        :math:`A_0 = -f I + g^2 L_s`, terminal values ``(Q, w, r0)`` at :math:`\\tau = T`.
        """
        d, beta = self.d, self.beta

        def rhs(tau, z):
            U = z[: d * d].reshape(d, d)
            u = z[d * d : d * d + d]
            t = self._t_of(tau)
            f, g2 = float(self.schedule.f(t)), float(self.schedule.g2(t))
            Ls, ls = self._score_affine(t)
            A0 = -f * np.eye(d) + g2 * Ls
            dU = -(A0.T @ U + U @ A0) + g2 / beta * U @ U
            du = -A0.T @ u + g2 * U @ ls + g2 / beta * U @ u
            du0 = -g2 * ls @ u + 0.5 * g2 * np.trace(U) - 0.5 * g2 / beta * u @ u
            return np.concatenate([dU.ravel(), du, [du0]])

        taus = np.atleast_1d(np.asarray(taus, dtype=float))
        z_T = np.concatenate([self.Q.ravel(), self.w, [self.r0]])
        order = np.argsort(-taus)
        sol = solve_ivp(rhs, (self.T, float(taus.min())), z_T, method="DOP853", rtol=_RTOL, atol=_ATOL,
                        t_eval=taus[order] if taus.min() < self.T else None, dense_output=True)
        out = [None] * len(taus)
        for i in range(len(taus)):
            z = sol.sol(taus[i]) if taus[i] < self.T else z_T
            out[i] = (z[: d * d].reshape(d, d), z[d * d : d * d + d], float(z[-1]))
        return out

    def tilted_law(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of :math:`p_\\text{data} e^{r/\\beta}/Z`."""
        return self._tilt(self.m0, self.S0)

    def pretrained_terminal_law(self) -> tuple[np.ndarray, np.ndarray]:
        """Terminal law of the exact pretrained sampler started from :math:`\\mu_0` (``p_data`` if init p_T)."""
        Phi, h, Gam = self.posterior(self.T)
        mi, Pi = self.initial_law()
        return Phi @ mi + h, Gam + Phi @ Pi @ Phi.T

    def optimal_initial_law(self) -> tuple[np.ndarray, np.ndarray]:
        """Optimised initial law :math:`\\mu_0^* \\propto \\mu_0 e^{V^*(0,\\cdot)/\\beta}` (R2)."""
        U, u, _ = self.optimal_value_coeffs(0.0)
        mi, Pi = self.initial_law()
        prec = np.linalg.inv(Pi) + U / self.beta
        cov = np.linalg.inv(prec)
        cov = 0.5 * (cov + cov.T)
        return cov @ (np.linalg.solve(Pi, mi) + u / self.beta), cov

    def optimal_terminal_law(self, init_optimised: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Terminal law of the sampler under :math:`a^*` (theory.md R2).

        ``init_optimised=False``: the initial law stays :math:`\\mu_0`; :math:`Y_T|Y_0=y_0` is the
        pretrained kernel :math:`N(\\Phi_T y_0 + h_T, \\Gamma_T)` tilted by :math:`e^{r/\\beta}`, integrated
        over :math:`\\mu_0`. ``True``: the initial law is optimised too and the terminal law is
        :math:`p_T^{pre} e^{r/\\beta}/Z` (the tilt when ``init="p_T"``).
        """
        if init_optimised:
            return self._tilt(*self.pretrained_terminal_law())
        Phi, h, Gam = self.posterior(self.T)
        _, GM = self._tilt(np.zeros(self.d), Gam)
        G = (np.eye(self.d) - GM @ self.Q / self.beta) @ Phi
        e = (np.eye(self.d) - GM @ self.Q / self.beta) @ h + GM @ self.w / self.beta
        mi, Pi = self.initial_law()
        cov = GM + G @ Pi @ G.T
        return G @ mi + e, 0.5 * (cov + cov.T)

    def optimal_objective(self, init_optimised: bool = False) -> float:
        """:math:`J^* = E_{\\mu_0} V^*(0, Y_0)` (fixed init), or :math:`\\beta \\log E_{\\mu_0} e^{V^*(0)/\\beta}`."""
        U, u, u0 = self.optimal_value_coeffs(0.0)
        mi, Pi = self.initial_law()
        if not init_optimised:
            return float(-0.5 * (np.trace(U @ Pi) + mi @ U @ mi) + u @ mi + u0)
        # log E exp(-y'Uy/(2b) + u'y/b) for y ~ N(mi, Pi), times beta
        b = self.beta
        prec0 = np.linalg.inv(Pi)
        prec = prec0 + U / b
        eta = prec0 @ mi + u / b
        logZ = 0.5 * eta @ np.linalg.solve(prec, eta) - 0.5 * mi @ prec0 @ mi \
            - 0.5 * np.linalg.slogdet(Pi @ prec)[1]
        return float(b * logZ + u0)

    # ------------------------------------------------------------------ policies ----------------
    def _check_pieces(self, pieces) -> int:
        if not isinstance(pieces, (int, np.integer)) or pieces < 1:
            raise ValueError(f"'pieces' must be a positive integer, got {pieces!r}")
        return int(pieces)

    def _unpack(self, theta, pieces: int) -> tuple[np.ndarray, np.ndarray]:
        M = self._check_pieces(pieces)
        theta = np.asarray(theta, dtype=float)
        n = M * self.n_params_per_piece
        if theta.shape != (n,):
            raise ValueError(f"'theta' must have shape ({n},) = pieces*(d*d+d) for d={self.d}, pieces={M}; "
                             f"got {theta.shape}")
        if not np.all(np.isfinite(theta)):
            raise ValueError("'theta' contains NaN or Inf")
        blocks = theta.reshape(M, self.n_params_per_piece)
        d = self.d
        return blocks[:, : d * d].reshape(M, d, d), blocks[:, d * d :]

    def _piece_policy(self, theta, pieces) -> _Affine:
        Ks, ks = self._unpack(theta, pieces)
        M = Ks.shape[0]

        def idx(tau):
            return min(int(np.floor(tau * M / self.T + 1e-9)), M - 1)

        return _Affine(K=lambda tau: Ks[idx(tau)], k=lambda tau: ks[idx(tau)],
                       breaks=np.linspace(0.0, self.T, M + 1))

    def _optimal_policy(self) -> _Affine:
        return _Affine(K=lambda tau: self.optimal_correction(tau)[0], k=lambda tau: self.optimal_correction(tau)[1],
                       breaks=np.array([0.0, self.T]))

    def _t_of(self, tau: float) -> float:
        return self.T - float(tau)

    def _coeffs(self, tau: float, pol: _Affine):
        """``(A, c, g2, K, k)`` of the controlled linear SDE at sampler time ``tau``."""
        t = self._t_of(tau)
        f, g2 = float(self.schedule.f(t)), float(self.schedule.g2(t))
        Ls, ls = self._score_affine(t)
        K, k = pol.K(tau), pol.k(tau)
        return -f * np.eye(self.d) + g2 * (Ls + K), g2 * (ls + k), g2, K, k

    # ------------------------------------------------------------------ exact continuous ----------
    def _forward(self, pol: _Affine, init=None, extra: Callable | None = None, n_extra: int = 0):
        """Integrate mean, covariance, KL (and optional extra integrals) forward over [0, T]."""
        d = self.d
        mi, Pi = self.initial_law() if init is None else init

        def rhs(tau, z):
            m, P = z[:d], z[d : d + d * d].reshape(d, d)
            A, c, g2, K, k = self._coeffs(tau, pol)
            dm = A @ m + c
            dP = A @ P + P @ A.T + g2 * np.eye(d)
            Km = K @ m + k
            dkl = 0.5 * g2 * (np.trace(K @ P @ K.T) + Km @ Km)
            parts = [dm, dP.ravel(), [dkl]]
            if extra is not None:
                parts.append(extra(tau, m, P, A, c, g2, K, k))
            return np.concatenate(parts)

        z = np.concatenate([mi, Pi.ravel(), [0.0], np.zeros(n_extra)])
        for a, b in zip(pol.breaks[:-1], pol.breaks[1:]):
            eps = 1e-12 * self.T  # evaluate each piece strictly inside so K/k do not jump mid-step
            sol = solve_ivp(lambda s, zz, a=a, b=b, eps=eps: rhs(min(max(s, a + eps), b - eps), zz), (a, b), z,
                            method="DOP853", rtol=_RTOL, atol=_ATOL)
            if not sol.success:
                raise RuntimeError(f"moment ODE failed on [{a}, {b}]: {sol.message}")
            z = sol.y[:, -1]
        m, P = z[:d], z[d : d + d * d].reshape(d, d)
        return m, 0.5 * (P + P.T), float(z[d + d * d]), z[d + d * d + 1 :]

    def _expected_reward(self, m, P) -> float:
        return float(-0.5 * (np.trace(self.Q @ P) + m @ self.Q @ m) + self.w @ m + self.r0)

    def _terms(self, pol: _Affine, init=None) -> dict:
        m, P, kl, _ = self._forward(pol, init)
        er = self._expected_reward(m, P)
        return {"reward": er, "path_kl": kl, "objective": er - self.beta * kl, "mean": m, "cov": P}

    def exact_terms(self, theta, pieces: int = 1) -> dict:
        """``reward`` :math:`E r(Y_T)`, ``path_kl``, ``objective`` J, terminal ``mean``/``cov`` (exact)."""
        return self._terms(self._piece_policy(theta, pieces))

    def exact_objective(self, theta, pieces: int = 1) -> float:
        """:math:`J(\\theta) = E r(Y_T) - \\beta\\, KL(P^\\theta \\| P^{pre})` for the piecewise-affine policy."""
        return self.exact_terms(theta, pieces)["objective"]

    def path_kl(self, theta, pieces: int = 1) -> float:
        """:math:`KL(P^\\theta\\|P^{pre}) = E\\int_0^T \\frac{g^2}{2}|K Y + k|^2 d\\tau` (nats per path, exact)."""
        return self.exact_terms(theta, pieces)["path_kl"]

    def optimal_terms(self, init=None) -> dict:
        """Exact terms of the (time-varying) optimal policy :math:`a^*`, by the moment ODE."""
        return self._terms(self._optimal_policy(), init)

    def _backward(self, pol: _Affine):
        """Dense solution of the Feynman-Kac ODEs for ``(U, u, u0)`` of :math:`V^\\theta` (piece by piece)."""
        d, beta = self.d, self.beta

        def rhs(tau, z):
            U = z[: d * d].reshape(d, d)
            u = z[d * d : d * d + d]
            A, c, g2, K, k = self._coeffs(tau, pol)
            dU = -(A.T @ U + U @ A) - beta * g2 * K.T @ K
            du = -A.T @ u + U @ c + beta * g2 * K.T @ k
            du0 = -c @ u + 0.5 * g2 * np.trace(U) + 0.5 * beta * g2 * k @ k
            return np.concatenate([dU.ravel(), du, [du0]])

        z = np.concatenate([self.Q.ravel(), self.w, [self.r0]])
        sols = []
        for a, b in zip(pol.breaks[:-1][::-1], pol.breaks[1:][::-1]):
            eps = 1e-12 * self.T
            sol = solve_ivp(lambda s, zz, a=a, b=b, eps=eps: rhs(min(max(s, a + eps), b - eps), zz), (b, a), z,
                            method="DOP853",
                            rtol=_RTOL, atol=_ATOL, dense_output=True)
            if not sol.success:
                raise RuntimeError(f"value ODE failed on [{a}, {b}]: {sol.message}")
            sols.append((a, b, sol.sol))
            z = sol.y[:, -1]

        def coeffs(tau: float):
            tau = float(tau)
            for a, b, s in sols:
                if a - 1e-14 <= tau <= b + 1e-14:
                    zz = s(tau)
                    U = zz[: d * d].reshape(d, d)
                    return 0.5 * (U + U.T), zz[d * d : d * d + d], float(zz[-1])
            raise ValueError(f"'tau' must lie in [0, T={self.T}], got {tau}")

        return coeffs

    def policy_value_coeffs(self, theta, pieces: int = 1) -> Callable[[float], tuple]:
        """``tau -> (U, u, u0)`` with :math:`V^\\theta(\\tau,y) = -y^\\top U y/2 + u^\\top y + u_0` (exact)."""
        return self._backward(self._piece_policy(theta, pieces))

    def policy_value(self, theta, pieces: int = 1) -> Callable:
        """Callable ``(tau, y) -> V^theta(tau, y)`` (Feynman-Kac ODE, exact); ``y`` batched ``(..., d)``."""
        coeffs = self.policy_value_coeffs(theta, pieces)

        def value(tau, y):
            U, u, u0 = coeffs(tau)
            y = np.asarray(y, dtype=float)
            return -0.5 * np.einsum("...i,ij,...j->...", y, U, y) + y @ u + u0

        return value

    def exact_gradient(self, theta, pieces: int = 1) -> np.ndarray:
        r"""Exact :math:`\nabla_\theta J` from the value-gradient identity (theory.md R4).

        :math:`\nabla J = E\int_0^T g^2 (\partial_\theta \mu)^\top[\nabla_y V^\theta - \beta(\mu - s)]d\tau`;
        with :math:`\nabla V^\theta = -Uy + u`, :math:`\mu - s = Ky + k` this is
        :math:`\int g^2[(-U-\beta K)(P + mm^\top) + (u - \beta k)m^\top]d\tau` for :math:`K_j` and
        :math:`\int g^2[(-U-\beta K)m + u - \beta k]d\tau` for :math:`k_j` over piece ``j``.
        """
        M = self._check_pieces(pieces)
        pol = self._piece_policy(theta, M)
        vcoef = self._backward(pol)
        d, beta, npp = self.d, self.beta, self.n_params_per_piece

        def extra(tau, m, P, A, c, g2, K, k):
            U, u, _ = vcoef(tau)
            G = -U - beta * K
            gK = g2 * (G @ (P + np.outer(m, m)) + np.outer(u - beta * k, m))
            gk = g2 * (G @ m + u - beta * k)
            out = np.zeros(M * npp)
            j = min(int(np.floor(tau * M / self.T + 1e-9)), M - 1)
            out[j * npp : j * npp + d * d] = gK.ravel()
            out[j * npp + d * d : (j + 1) * npp] = gk
            return out

        *_, grad = self._forward(pol, extra=extra, n_extra=M * npp)
        return grad

    # ------------------------------------------------------------------ exact discrete chain -------
    def _discrete_torch(self, theta_t: torch.Tensor, pieces: int, steps: int) -> dict:
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"'steps' must be a positive integer, got {steps!r}")
        M, N, d = self._check_pieces(pieces), int(steps), self.d
        dt = self.T / N
        blocks = theta_t.reshape(M, self.n_params_per_piece)
        Ks, ks = blocks[:, : d * d].reshape(M, d, d), blocks[:, d * d :]
        mi, Pi = self.initial_law()
        m = torch.as_tensor(mi, dtype=torch.float64)
        P = torch.as_tensor(Pi, dtype=torch.float64)
        I = torch.eye(d, dtype=torch.float64)
        kl = torch.zeros((), dtype=torch.float64)
        for n in range(N):
            tau = n * dt
            t = self._t_of(tau)
            f, g2 = float(self.schedule.f(t)), float(self.schedule.g2(t))
            Ls, ls = (torch.as_tensor(x, dtype=torch.float64) for x in self._score_affine(t))
            j = (n * M) // N
            K, k = Ks[j], ks[j]
            Km = K @ m + k
            kl = kl + 0.5 * g2 * dt * (torch.trace(K @ P @ K.T) + Km @ Km)
            F = I + dt * (-f * I + g2 * (Ls + K))
            m = F @ m + dt * g2 * (ls + k)
            P = F @ P @ F.T + g2 * dt * I
        Qt = torch.as_tensor(self.Q, dtype=torch.float64)
        wt = torch.as_tensor(self.w, dtype=torch.float64)
        er = -0.5 * (torch.trace(Qt @ P) + m @ Qt @ m) + wt @ m + self.r0
        return {"reward": er, "path_kl": kl, "objective": er - self.beta * kl, "mean": m, "cov": P}

    def discrete_terms(self, theta, pieces: int = 1, steps: int = 100) -> dict:
        """Exact ``reward``, ``path_kl``, ``objective``, ``mean``, ``cov`` of the N-step Euler chain."""
        self._unpack(theta, pieces)
        out = self._discrete_torch(torch.as_tensor(np.asarray(theta, dtype=float)), pieces, steps)
        return {k: (v.numpy() if v.dim() else float(v)) for k, v in out.items()}

    def discrete_objective(self, theta, pieces: int = 1, steps: int = 100) -> float:
        """Exact :math:`J_N(\\theta)` of the ``steps``-step Euler-Maruyama chain (moment recursion)."""
        return self.discrete_terms(theta, pieces, steps)["objective"]

    def discrete_path_kl(self, theta, pieces: int = 1, steps: int = 100) -> float:
        """Exact expected discrete KL :math:`E\\sum_k \\frac{g_k^2 d\\tau}{2}|a_k - s_k|^2` (nats per path)."""
        return self.discrete_terms(theta, pieces, steps)["path_kl"]

    def discrete_gradient(self, theta, pieces: int = 1, steps: int = 100) -> np.ndarray:
        """Exact :math:`\\nabla_\\theta J_N` of the Euler chain (autograd through the moment recursion)."""
        self._unpack(theta, pieces)
        th = torch.tensor(np.asarray(theta, dtype=float), requires_grad=True)
        out = self._discrete_torch(th, pieces, steps)
        (g,) = torch.autograd.grad(out["objective"], th)
        return g.numpy()

    # ------------------------------------------------------------------ torch callables for rollouts
    def _torch_consts(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._torch_cache:
            as_t = lambda x: torch.as_tensor(x, dtype=dtype, device=device)
            self._torch_cache[key] = {"V": as_t(self._V), "lam": as_t(self._lam), "m0": as_t(self.m0),
                                      "Q": as_t(self.Q), "w": as_t(self.w)}
        return self._torch_cache[key]

    def score_torch(self, t, y: torch.Tensor) -> torch.Tensor:
        """Exact score in torch, ``y`` of shape ``(B, d)``; ``t`` a float or 0-dim tensor."""
        c = self._torch_consts(y.dtype, y.device)
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        a = self.schedule.alpha(t)
        inv = 1.0 / (a * a * c["lam"] + self.schedule.marginal_var(t))
        z = (y - a * c["m0"]) @ c["V"]
        return -(z * inv) @ c["V"].T

    def pretrained_action(self) -> Callable:
        """Torch callable ``(tau, y, cond) -> s(T - tau, y)``."""
        return lambda tau, y, cond=None: self.score_torch(self.T - tau, y)

    def policy_action(self, theta, pieces: int = 1) -> Callable:
        """Torch callable ``(tau, y, cond) -> s + K(tau) y + k(tau)``; differentiable in ``theta`` if it is
        a tensor that requires grad."""
        M = self._check_pieces(pieces)
        d = self.d
        th = theta if isinstance(theta, torch.Tensor) else torch.as_tensor(np.asarray(theta, dtype=float))
        if th.shape != (M * self.n_params_per_piece,):
            raise ValueError(f"'theta' must have shape ({M * self.n_params_per_piece},), got {tuple(th.shape)}")
        blocks = th.reshape(M, self.n_params_per_piece)

        def action(tau, y, cond=None):
            j = min(int(np.floor(float(tau) * M / self.T + 1e-9)), M - 1)
            b = blocks[j].to(y.dtype)
            K, k = b[: d * d].reshape(d, d), b[d * d :]
            return self.score_torch(self.T - tau, y) + y @ K.T + k

        return action

    def optimal_action_torch(self) -> Callable:
        """Torch callable ``(tau, y, cond) -> a*(tau, y)`` (closed form)."""

        def action(tau, y, cond=None):
            K, k = (torch.as_tensor(x, dtype=y.dtype, device=y.device) for x in self.optimal_correction(float(tau)))
            return self.score_torch(self.T - tau, y) + y @ K.T + k

        return action

    def reward_torch(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`r(y)` in torch, shape ``(B,)`` (differentiable)."""
        c = self._torch_consts(y.dtype, y.device)
        return -0.5 * ((y @ c["Q"]) * y).sum(-1) + y @ c["w"] + self.r0

    def initial_sample(self, n: int, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``n`` draws from the initial law :math:`\\mu_0`, shape ``(n, d)``."""
        mi, Pi = self.initial_law()
        L = torch.as_tensor(np.linalg.cholesky(Pi), dtype=dtype)
        z = torch.randn(n, self.d, generator=generator, dtype=dtype)
        return torch.as_tensor(mi, dtype=dtype) + z @ L.T

    # ------------------------------------------------------------------ R7 / R8 (exact) -------------
    def _hamiltonian_gap_integral(self, theta, theta2, pieces: int, under: str = "new",
                                  with_kl: bool = True) -> float:
        """:math:`E\\int_0^T g^2[(a'-a)\\cdot(\\nabla V^\\theta - \\beta(a-s)) - \\frac\\beta2|a'-a|^2]d\\tau`.

        ``under="new"``: states from :math:`\\theta'` (the performance-difference identity, R7);
        ``under="old"``: states from :math:`\\theta` (the surrogate of R8). ``with_kl=False`` drops the KL
        terms of H (a wrong variant kept for negative-control tests).
        """
        old = self._piece_policy(theta, pieces)
        new = self._piece_policy(theta2, pieces)
        vcoef = self._backward(old)
        b = self.beta if with_kl else 0.0

        def extra(tau, m, P, A, c, g2, K, k):
            U, u, _ = vcoef(tau)
            K_old, k_old = old.K(tau), old.k(tau)
            D, dl = new.K(tau) - K_old, new.k(tau) - k_old
            G, e = -U - b * K_old, u - b * k_old
            S2 = P + np.outer(m, m)
            lin = np.trace(D.T @ G @ S2) + e @ D @ m + dl @ G @ m + dl @ e
            quad = np.trace(D.T @ D @ S2) + 2 * dl @ D @ m + dl @ dl
            return np.array([g2 * (lin - 0.5 * b * quad)])

        *_, out = self._forward(new if under == "new" else old, extra=extra, n_extra=1)
        return float(out[0])

    def performance_difference(self, theta, theta2, pieces: int = 1) -> float:
        """Exact right side of R7: :math:`E^{\\theta'}\\int [H(a_{\\theta'}) - H(a_\\theta)](\\nabla V^\\theta)d\\tau`,
        which equals :math:`J(\\theta') - J(\\theta)`."""
        return self._hamiltonian_gap_integral(theta, theta2, pieces, under="new")

    def surrogate_objective(self, theta, theta2, pieces: int = 1) -> float:
        """Trust-region surrogate (R8): :math:`L_\\theta(\\theta') = J(\\theta) + E^{\\theta}\\int[H(a')-H(a)]d\\tau`
        (expectation under the OLD policy's state marginals)."""
        return self.exact_objective(theta, pieces) + self._hamiltonian_gap_integral(theta, theta2, pieces, "old")

    # ------------------------------------------------------------------ Monte-Carlo estimators ------
    ESTIMATORS = ("pathwise", "value_gradient", "lr", "lr_reward_to_go", "lr_baseline", "lr_td", "ddpo_sf",
                  "lr_action_noise")

    def estimate_gradient(self, theta, pieces: int = 1, estimator: str = "lr", steps: int = 100,
                          paths: int = 10_000, seed: int = 0, groups: int = 50, exploration_std: float = 1.0,
                          dtype: torch.dtype = torch.float64, backend: str = "native"):
        """Monte-Carlo estimate of :math:`\\nabla_\\theta J` with the ``sa_theory`` estimators on torch rollouts.

        Returns ``(mean, standard_error)`` numpy arrays (standard error by batch means over ``groups``).
        ``estimator`` is one of :attr:`ESTIMATORS`; ``value_gradient``, ``lr_baseline`` and ``lr_td`` use
        the exact :math:`V^\\theta` of this problem (:meth:`policy_value`). ``lr_action_noise`` adds an
        extra action noise ``exploration_std`` and uses only its likelihood ratio (the Brownian noise is
        treated as part of the environment): unbiased, but its variance grows like N (theory.md R5).
        Unbiased for the discrete chain (:meth:`discrete_gradient`): ``pathwise``, ``lr``,
        ``lr_reward_to_go``, ``lr_baseline``, ``ddpo_sf``; O(dtau)-biased: ``value_gradient``, ``lr_td``.
        """
        from sa_theory import estimators as est
        from sa_theory.rollout import rollout
        from sa_theory.sde import ControlledSDE

        if estimator not in self.ESTIMATORS:
            raise ValueError(f"'estimator' must be one of {self.ESTIMATORS}, got {estimator!r}")
        self._unpack(theta, pieces)
        th = torch.tensor(np.asarray(theta, dtype=float), dtype=dtype, requires_grad=True)
        policy, ref = self.policy_action(th, pieces), self.pretrained_action()
        sde = ControlledSDE(self.schedule)
        gen = torch.Generator().manual_seed(int(seed))
        y0 = self.initial_sample(paths, gen, dtype)
        beta = self.beta
        if estimator == "pathwise":
            def pathwise(sl: slice) -> torch.Tensor:
                g = torch.Generator().manual_seed(int(seed) * 100_003 + sl.start)
                traj = rollout(sde, policy, y0[sl], steps=steps, reference=ref, generator=g, save_every=None,
                               backend=backend, seed=int(seed) * 100_003 + sl.start)
                return est.pathwise_objective(self.reward_torch(traj.final), traj.path_kl, beta)

            return tuple(x.numpy() for x in est.grouped_gradient(pathwise, [th], paths, groups))

        noisy = estimator == "lr_action_noise"
        with torch.no_grad():
            traj = rollout(sde, policy, y0, steps=steps, reference=ref, generator=gen, backend=backend, seed=seed,
                           exploration_std=exploration_std if noisy else 0.0)
        taus = traj.taus
        g2, dt = sde.g2(taus), traj.dtau
        R_all = self.reward_torch(traj.final)
        needs_v = estimator in ("lr_baseline", "lr_td")
        values_all = self._values_torch(theta, pieces, taus, traj.states) if needs_v else None
        needs_vg = estimator == "value_gradient"
        vgrads_all = self._value_grads_torch(theta, pieces, taus, traj.states) if needs_vg else None

        def surrogate(sl: slice) -> torch.Tensor:
            states, refs, R = traj.states[:, sl], traj.ref_actions[:, sl], R_all[sl]
            means = est.policy_means(policy, taus, states)
            kl_theta = est.kl_steps(sde, taus, means, refs)
            kl = kl_theta.detach()
            if noisy:
                from sa_theory.kl import gaussian_log_prob

                acts = traj.actions[:, sl]
                logp = torch.stack([gaussian_log_prob(acts[k], means[k], exploration_std) for k in range(steps)])
                return est.likelihood_ratio_surrogate(logp, R - beta * kl.sum(0), kl_theta, beta)
            if estimator == "value_gradient":
                return est.value_gradient_surrogate(means, vgrads_all[:, sl], refs, g2, dt, beta)
            logp = est.euler_log_probs(sde, taus, states, means)
            if estimator == "ddpo_sf":
                ref_logp = est.euler_log_probs(sde, taus, states, refs)
                return est.reinforce_kl_surrogate(logp, ref_logp, R, beta)
            if estimator == "lr":
                adv = R - beta * kl.sum(0)
            elif estimator == "lr_reward_to_go":
                adv = est.reward_to_go(R, kl, beta)
            elif estimator == "lr_baseline":
                adv = est.reward_to_go(R, kl, beta) - (values_all[:, sl] + beta * kl)
            else:  # lr_td
                adv = est.td_advantages(values_all[:, sl], R, kl, beta)
            return est.likelihood_ratio_surrogate(logp, adv, kl_theta, beta)

        return tuple(x.numpy() for x in est.grouped_gradient(surrogate, [th], paths, groups))

    def _value_coeffs_on_grid(self, theta, pieces, taus):
        coeffs = self.policy_value_coeffs(theta, pieces)
        return [coeffs(float(t)) for t in taus[:-1]]

    def _values_torch(self, theta, pieces, taus, states) -> torch.Tensor:
        """Exact :math:`V^\\theta(\\tau_k, Y_k)`, ``(N, B)``."""
        out = []
        for k, (U, u, u0) in enumerate(self._value_coeffs_on_grid(theta, pieces, taus)):
            y = states[k].detach()
            Ut, ut = torch.as_tensor(U, dtype=y.dtype), torch.as_tensor(u, dtype=y.dtype)
            out.append(-0.5 * ((y @ Ut) * y).sum(-1) + y @ ut + u0)
        return torch.stack(out)

    def _value_grads_torch(self, theta, pieces, taus, states) -> torch.Tensor:
        """Exact :math:`\\nabla_y V^\\theta(\\tau_k, Y_k) = -U Y_k + u`, ``(N, B, d)``."""
        out = []
        for k, (U, u, _) in enumerate(self._value_coeffs_on_grid(theta, pieces, taus)):
            y = states[k].detach()
            out.append(-y @ torch.as_tensor(U, dtype=y.dtype) + torch.as_tensor(u, dtype=y.dtype))
        return torch.stack(out)
