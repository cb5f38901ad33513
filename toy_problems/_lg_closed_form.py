r"""Closed forms of :class:`toy_problems.LinearGaussianProblem`: data, score, V*, a*, tilted and terminal laws.

The sampler has noise level :math:`\eta(\tau)` (theory.md §5): with the exact affine score
:math:`s = L_s y + l_s` the pretrained sampler is the linear SDE

.. math:: dY = (A_0 Y + c_0)\,d\tau + \sqrt{\eta}\,g\,dB, \qquad A_0 = -f I + \tfrac{1+\eta}{2}g^2 L_s,
          \quad c_0 = \tfrac{1+\eta}{2} g^2 l_s,

whose transition :math:`Y_T \mid Y_\tau = y \sim N(\Phi y + h, \Gamma)` (:meth:`transition`) is the data
posterior :math:`X_0 \mid X_t = y` for :math:`\eta = 1` only (closed form, :meth:`posterior`); for any other
:math:`\eta` it solves the backward ODEs :math:`\partial_\tau\Phi = -\Phi A_0`, :math:`\partial_\tau h =
-\Phi c_0`, :math:`\partial_\tau\Gamma = -\eta g^2 \Phi\Phi^\top` from :math:`(I, 0, 0)` at :math:`\tau = T`.
Then :math:`V^* = \beta\log E[e^{r(Y_T)/\beta} \mid Y_\tau = y]` is quadratic (:meth:`optimal_value_coeffs`)
and :math:`a^* = s + \frac{2\eta}{1+\eta}\nabla V^*/\beta`. :meth:`riccati_value_coeffs` is the independent
HJB route: :math:`U' = -(A_0^\top U + UA_0) + \frac{\eta g^2}{\beta}U^2`,
:math:`u' = -A_0^\top u + U c_0 + \frac{\eta g^2}{\beta} U u`,
:math:`u_0' = -c_0^\top u + \frac{\eta g^2}{2}\mathrm{tr}\,U - \frac{\eta g^2}{2\beta}|u|^2`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from sa_theory.schedules import Schedule
from sa_theory.sde import ControlledSDE

from ._validate import as_matrix, as_vector, check_beta, check_init, check_spd, check_symmetric, real_scalar

__all__ = ["gaussian_kl", "LinearGaussianClosedForm"]

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


class LinearGaussianClosedForm:
    """Data, reward, score, optimal value/action and laws (see :class:`toy_problems.LinearGaussianProblem`)."""

    def __init__(self, m0, S0, schedule: Schedule, Q=None, w=None, r0: float = 0.0, beta: float = 1.0,
                 init: str = "p_T", noise=1.0):
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
        self.sde = ControlledSDE(schedule, noise=noise)
        self.noise = self.sde.noise
        check_spd("S0^{-1} + Q/beta (tilted precision)", np.linalg.inv(self.S0) + self.Q / self.beta)
        lam, V = np.linalg.eigh(self.S0)
        self._lam, self._V = lam, V
        self._eye = np.eye(self.d)
        self._torch_cache: dict = {}
        self._score_cache: dict = {}  # (time, dtype, device) -> the score's time coefficients (score_torch)
        self._transition_sol = None

    # ------------------------------------------------------------------ noise level -----------------
    @property
    def _reverse_sde(self) -> bool:
        """True when the sampler is the standard reverse SDE (constant eta = 1): posterior closed forms."""
        return self.sde.constant_noise == 1.0

    def _eta(self, tau: float) -> float:
        return float(self.sde.eta(float(tau)))

    def _weights(self, tau: float) -> tuple[float, float, float]:
        """``(c, e, r)`` at ``tau``: drift coefficient :math:`c = \\frac{1+\\eta}{2}g^2` of the action, noise
        variance rate :math:`e = \\eta g^2`, and :math:`r = w/c = \\frac{1+\\eta}{2\\eta}` (KL weight over c;
        ``inf`` at :math:`\\eta = 0`). All three reduce to ``(g^2, g^2, 1)`` at :math:`\\eta = 1`."""
        eta = self._eta(tau)
        g2 = float(self.schedule.g2(self._t_of(tau)))
        r = np.inf if eta == 0 else (1.0 + eta) / (2.0 * eta)
        return (0.5 * (1.0 + eta)) * g2, eta * g2, r

    @staticmethod
    def _finite_ratio(r: float) -> float:
        """The KL weight ratio ``r`` of :meth:`_weights`, refused at eta = 0 (where the path KL is infinite)."""
        if not np.isfinite(r):
            raise ValueError("the path KL of the probability-flow ODE (noise eta = 0) is infinite")
        return r

    # ------------------------------------------------------------------ data, reward, score ---------
    def _check_time(self, name: str, value) -> float:
        v = real_scalar(name, value)
        if v < -1e-12 * self.T or v > self.T * (1 + 1e-12):
            raise ValueError(f"{name!r} must lie in [0, T] = [0, {self.T}], got {v}")
        return min(max(v, 0.0), self.T)

    def _t_of(self, tau: float) -> float:
        return self.T - float(tau)

    def reward(self, x):
        """:math:`r(x) = -x^\\top Q x/2 + w^\\top x + r_0`, batched over leading dims."""
        x = np.asarray(x, dtype=float)
        return -0.5 * np.einsum("...i,ij,...j->...", x, self.Q, x) + x @ self.w + self.r0

    def _Sinv(self, t: float) -> np.ndarray:
        a2 = float(self.schedule.alpha(t)) ** 2
        v = float(self.schedule.marginal_var(t))
        return (self._V / (a2 * self._lam + v)) @ self._V.T

    def marginal(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of :math:`p_t = N(\\alpha_t m_0, \\alpha_t^2 S_0 + \\sigma_t^2 I)` (any eta)."""
        t = self._check_time("t", t)
        a = float(self.schedule.alpha(t))
        return a * self.m0, a * a * self.S0 + float(self.schedule.marginal_var(t)) * np.eye(self.d)

    def score(self, t: float, x):
        """Exact score :math:`s(t,x) = -S_t^{-1}(x - \\alpha_t m_0)` at diffusion time ``t``."""
        t = self._check_time("t", t)
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

    # ------------------------------------------------------------------ transition of the eta-process
    def posterior(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Data posterior :math:`X_0 | X_t = y \\sim N(\\Phi_t y + h_t, \\Gamma_t)`: ``(Phi, h, Gamma)``. It is
        the sampler's transition :math:`Y_T | Y_{T-t}` for eta = 1 only (use :meth:`transition`)."""
        t = self._check_time("t", t)
        a = float(self.schedule.alpha(t))
        Si = self._Sinv(t)
        Phi = a * self.S0 @ Si
        h = (np.eye(self.d) - a * Phi) @ self.m0
        Gam = self.S0 - a * a * self.S0 @ Si @ self.S0
        return Phi, h, 0.5 * (Gam + Gam.T)

    def _pretrained_coeffs(self, tau: float) -> tuple[np.ndarray, np.ndarray, float]:
        """``(A0, c0, e)``: drift :math:`A_0 y + c_0` and noise variance rate of the pretrained eta-process."""
        t = self._t_of(tau)
        f = float(self.schedule.f(t))
        c, e, _ = self._weights(tau)
        Ls, ls = self._score_affine(t)
        return -f * np.eye(self.d) + c * Ls, c * ls, e

    def transition(self, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pretrained sampler's transition :math:`Y_T | Y_\\tau = y \\sim N(\\Phi y + h, \\Gamma)` under its own
        noise level: the posterior (closed form) for eta = 1, else the backward ODEs of the module docstring."""
        tau = self._check_time("tau", tau)
        if self._reverse_sde:
            return self.posterior(self._t_of(tau))
        d = self.d
        if self._transition_sol is None:
            def rhs(s, z):
                Phi = z[: d * d].reshape(d, d)
                A0, c0, e = self._pretrained_coeffs(s)
                return np.concatenate([-(Phi @ A0).ravel(), -Phi @ c0, -(e * Phi @ Phi.T).ravel()])

            z_T = np.concatenate([np.eye(d).ravel(), np.zeros(d), np.zeros(d * d)])
            sol = solve_ivp(rhs, (self.T, 0.0), z_T, method="DOP853", rtol=_RTOL, atol=_ATOL, dense_output=True)
            if not sol.success:
                raise RuntimeError(f"transition ODE failed: {sol.message}")
            self._transition_sol = sol.sol
        z = self._transition_sol(tau)
        Gam = z[d * d + d :].reshape(d, d)
        return z[: d * d].reshape(d, d), z[d * d : d * d + d], 0.5 * (Gam + Gam.T)

    # ------------------------------------------------------------------ closed-form optimum -------
    def _tilt(self, mean, cov) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian ``N(mean, cov)`` tilted by :math:`e^{r/\\beta}`: ``(mean', cov')``, stable for cov -> 0."""
        GM = np.linalg.solve(np.eye(self.d) + cov @ self.Q / self.beta, cov)
        GM = 0.5 * (GM + GM.T)
        return mean + GM @ (self.w - self.Q @ mean) / self.beta, GM

    def optimal_value_coeffs(self, tau: float) -> tuple[np.ndarray, np.ndarray, float]:
        """``(U, u, u0)`` with :math:`V^*(\\tau,y) = -y^\\top U y/2 + u^\\top y + u_0` (closed form, R1).

        :math:`V^* = \\beta\\log E[e^{r(Y_T)/\\beta} | Y_\\tau = y]` with :math:`Y_T|Y_\\tau=y \\sim
        N(\\Phi y + h,\\Gamma)` the pretrained sampler's own transition (:meth:`transition`).
        """
        Phi, h, Gam = self.transition(tau)
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
        """``(K*, k*)`` with :math:`a^* - s = \\frac{2\\eta}{1+\\eta}\\nabla V^*/\\beta = K^* y + k^*`."""
        U, u, _ = self.optimal_value_coeffs(tau)
        if self._reverse_sde:
            return -U / self.beta, u / self.beta
        eta = self._eta(tau)
        gain = 2.0 * eta / (1.0 + eta)
        return -gain * U / self.beta, gain * u / self.beta

    def optimal_action(self, tau: float, y):
        """:math:`a^*(\\tau,y) = s(T-\\tau, y) + \\frac{2\\eta}{1+\\eta}\\nabla_y V^*(\\tau, y)/\\beta`."""
        K, k = self.optimal_correction(tau)
        y = np.asarray(y, dtype=float)
        return self.score(self._t_of(tau), y) + y @ K.T + k

    def riccati_value_coeffs(self, taus) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """``(U, u, u0)`` of :math:`V^*` at each of ``taus`` from the HJB Riccati ODE (an independent route,
        module docstring), terminal values ``(Q, w, r0)`` at :math:`\\tau = T`."""
        d, beta = self.d, self.beta

        def rhs(tau, z):
            U = z[: d * d].reshape(d, d)
            u = z[d * d : d * d + d]
            t = self._t_of(tau)
            f = float(self.schedule.f(t))
            c, e, _ = self._weights(tau)
            Ls, ls = self._score_affine(t)
            A0 = -f * np.eye(d) + c * Ls
            dU = -(A0.T @ U + U @ A0) + e / beta * U @ U
            du = -A0.T @ u + c * U @ ls + e / beta * U @ u
            du0 = -c * ls @ u + 0.5 * e * np.trace(U) - 0.5 * e / beta * u @ u
            return np.concatenate([dU.ravel(), du, [du0]])

        taus = np.array([self._check_time("taus", x) for x in np.atleast_1d(np.asarray(taus, dtype=float))])
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
        """Terminal law of the exact pretrained sampler started from :math:`\\mu_0` (``p_data`` if init p_T,
        for every eta)."""
        Phi, h, Gam = self.transition(0.0)
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
        """Terminal law of the sampler under :math:`a^*` (theory.md R2, §5).

        ``init_optimised=False``: the initial law stays :math:`\\mu_0`; :math:`Y_T|Y_0=y_0` is the
        pretrained eta-process's kernel :math:`N(\\Phi y_0 + h, \\Gamma)` (:meth:`transition` at 0) tilted by
        :math:`e^{r/\\beta}`, integrated over :math:`\\mu_0`. ``True``: the initial law is optimised too and
        the terminal law is :math:`p_T^{pre} e^{r/\\beta}/Z` (the tilt when ``init="p_T"``).
        """
        if init_optimised:
            return self._tilt(*self.pretrained_terminal_law())
        Phi, h, Gam = self.transition(0.0)
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

    # ------------------------------------------------------------------ torch callables -------------
    def _torch_consts(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._torch_cache:
            def as_t(x):
                return torch.as_tensor(x, dtype=dtype, device=device)

            self._torch_cache[key] = {"V": as_t(self._V), "lam": as_t(self._lam), "m0": as_t(self.m0),
                                      "Q": as_t(self.Q), "w": as_t(self.w)}
        return self._torch_cache[key]

    def score_torch(self, t, y: torch.Tensor) -> torch.Tensor:
        """Exact score in torch, ``y`` of shape ``(B, d)``; ``t`` a float, a 0-dim tensor or one time per row
        (shape ``(B, 1)``)."""
        c = self._torch_consts(y.dtype, y.device)
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        key = (float(t), y.dtype, str(y.device)) if t.dim() == 0 and not t.requires_grad else None
        coeffs = self._score_cache.get(key) if key is not None else None
        if coeffs is None:  # alpha(t) and 1 / (alpha^2 lam + sigma^2(t)), the same every iteration on a fixed grid
            a = self.schedule.alpha(t)
            coeffs = (a, 1.0 / (a * a * c["lam"] + self.schedule.marginal_var(t)))
            if key is not None:
                if len(self._score_cache) >= 8192:
                    self._score_cache.clear()
                self._score_cache[key] = coeffs
        a, inv = coeffs
        z = (y - a * c["m0"]) @ c["V"]
        return -(z * inv) @ c["V"].T

    def pretrained_action(self):
        """Torch callable ``(tau, y, cond) -> s(T - tau, y)``."""
        return lambda tau, y, cond=None: self.score_torch(self.T - tau, y)

    def optimal_action_torch(self):
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
