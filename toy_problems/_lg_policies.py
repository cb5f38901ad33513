r"""Piecewise-affine policies of :class:`toy_problems.LinearGaussianProblem`: exact J, KL, V^theta, grad J,
the Euler chain's exact expectations, the performance difference (R7) and the surrogate (R8).

For the sampler of noise level :math:`\eta` the action enters the drift with :math:`c = \frac{1+\eta}{2}g^2`,
the noise variance rate is :math:`e = \eta g^2` and the KL weight rate is :math:`w = \frac{(1+\eta)^2}{4\eta}
g^2 = r c` with :math:`r = \frac{1+\eta}{2\eta}` (all equal :math:`g^2` / 1 at :math:`\eta = 1`). For
:math:`a = s + K y + k` the state is linear, :math:`A = -fI + c(L_s + K)`, :math:`c_{vec} = c(l_s + k)`, and

.. math:: U' = -(A^\top U + U A) - \beta w K^\top K, \quad u' = -A^\top u + U c_{vec} + \beta w K^\top k,
          \quad u_0' = -c_{vec}^\top u + \tfrac{e}{2}\mathrm{tr}\,U + \tfrac{\beta w}{2}|k|^2

(Feynman-Kac for :math:`V^\theta = -\frac12 y^\top U y + u^\top y + u_0`, terminal ``(Q, w, r0)``);
:math:`\nabla J = E\int(\partial_\theta\mu)^\top[c\nabla V^\theta - \beta w(\mu - s)]d\tau` (R4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ._lg_closed_form import _ATOL, _RTOL

__all__ = ["Affine", "LinearGaussianPolicies"]


@dataclass
class Affine:
    """A policy correction a - s = K(tau) y + k(tau), with breakpoints where K, k may jump."""

    K: Callable[[float], np.ndarray]
    k: Callable[[float], np.ndarray]
    breaks: np.ndarray


class LinearGaussianPolicies:
    """Mixin on top of :class:`~toy_problems._lg_closed_form.LinearGaussianClosedForm` (attributes, closed forms)."""

    @property
    def n_params_per_piece(self) -> int:
        return self.d * self.d + self.d

    def n_params(self, pieces: int) -> int:
        return self._check_pieces(pieces) * self.n_params_per_piece

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

    def _piece_policy(self, theta, pieces) -> Affine:
        Ks, ks = self._unpack(theta, pieces)
        M = Ks.shape[0]

        def idx(tau):
            return min(int(np.floor(tau * M / self.T + 1e-9)), M - 1)

        return Affine(K=lambda tau: Ks[idx(tau)], k=lambda tau: ks[idx(tau)], breaks=np.linspace(0.0, self.T, M + 1))

    def _optimal_policy(self) -> Affine:
        return Affine(K=lambda tau: self.optimal_correction(tau)[0], k=lambda tau: self.optimal_correction(tau)[1],
                      breaks=np.array([0.0, self.T]))

    def _coeffs(self, tau: float, pol: Affine):
        """``(A, c_vec, e, K, k, c, r)`` of the controlled linear SDE at ``tau``: ``e = eta g^2`` the noise variance,
        ``c`` the action's drift coefficient and ``r = w/c`` the KL weight ratio (:meth:`_weights`), from one
        evaluation of the schedule (the moment and value ODEs call this at every right-hand side)."""
        t = self._t_of(tau)
        f = float(self.schedule.f(t))
        c, e, r = self._weights(tau)
        Ls, ls = self._score_affine(t)
        K, k = pol.K(tau), pol.k(tau)
        return -f * self._eye + c * (Ls + K), c * (ls + k), e, K, k, c, r

    def _kl_rate(self, c: float, r: float, K, k) -> float:
        """KL weight rate :math:`w = rc` of a policy piece (0 for the pretrained piece K = 0, k = 0, any eta)."""
        return self._finite_ratio(r) * c if (np.any(K) or np.any(k)) else 0.0

    # ------------------------------------------------------------------ exact continuous ----------
    def _forward(self, pol: Affine, init=None, extra: Callable | None = None, n_extra: int = 0):
        """Integrate mean, covariance, KL (and optional extra integrals) forward over [0, T]."""
        d = self.d
        mi, Pi = self.initial_law() if init is None else init

        def rhs(tau, z):
            m, P = z[:d], z[d : d + d * d].reshape(d, d)
            co = self._coeffs(tau, pol)
            A, cvec, e, K, k, c, r = co
            dm = A @ m + cvec
            dP = A @ P + P @ A.T + e * self._eye
            Km = K @ m + k
            w = self._kl_rate(c, r, K, k)
            dkl = 0.5 * w * (np.trace(K @ P @ K.T) + Km @ Km)
            parts = [dm, dP.ravel(), [dkl]]
            if extra is not None:
                parts.append(extra(tau, m, P, co))
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

    def _terms(self, pol: Affine, init=None) -> dict:
        return self._terms_of_moments(*self._forward(pol, init)[:3])

    def _terms_of_moments(self, m, P, kl: float) -> dict:
        """Reward, path KL and objective J = E r - beta KL from the terminal moments and the path KL."""
        er = self._expected_reward(m, P)
        return {"reward": er, "path_kl": kl, "objective": er - self.beta * kl, "mean": m, "cov": P}

    def exact_terms(self, theta, pieces: int = 1) -> dict:
        """``reward`` :math:`E r(Y_T)`, ``path_kl``, ``objective`` J, terminal ``mean``/``cov`` (exact)."""
        return self._terms(self._piece_policy(theta, pieces))

    def exact_objective(self, theta, pieces: int = 1) -> float:
        """:math:`J(\\theta) = E r(Y_T) - \\beta\\, KL(P^\\theta \\| P^{pre})` for the piecewise-affine policy."""
        return self.exact_terms(theta, pieces)["objective"]

    def path_kl(self, theta, pieces: int = 1) -> float:
        """:math:`KL(P^\\theta\\|P^{pre}) = E\\int_0^T \\frac{w}{2}|K Y + k|^2 d\\tau`, :math:`w =
        \\frac{(1+\\eta)^2}{4\\eta}g^2` (nats per path, exact)."""
        return self.exact_terms(theta, pieces)["path_kl"]

    def optimal_terms(self, init=None) -> dict:
        """Exact terms of the (time-varying) optimal policy :math:`a^*`, by the moment ODE."""
        return self._terms(self._optimal_policy(), init)

    def _backward(self, pol: Affine):
        """Dense solution of the Feynman-Kac ODEs for ``(U, u, u0)`` of :math:`V^\\theta` (piece by piece)."""
        d, beta = self.d, self.beta

        def rhs(tau, z):
            U = z[: d * d].reshape(d, d)
            u = z[d * d : d * d + d]
            A, cvec, e, K, k, c, r = self._coeffs(tau, pol)
            w = self._kl_rate(c, r, K, k)
            dU = -(A.T @ U + U @ A) - beta * w * K.T @ K
            du = -A.T @ u + U @ cvec + beta * w * K.T @ k
            du0 = -cvec @ u + 0.5 * e * np.trace(U) + 0.5 * beta * w * k @ k
            return np.concatenate([dU.ravel(), du, [du0]])

        z = np.concatenate([self.Q.ravel(), self.w, [self.r0]])
        sols = []
        for a, b in zip(pol.breaks[:-1][::-1], pol.breaks[1:][::-1]):
            eps = 1e-12 * self.T
            sol = solve_ivp(lambda s, zz, a=a, b=b, eps=eps: rhs(min(max(s, a + eps), b - eps), zz), (b, a), z,
                            method="DOP853", rtol=_RTOL, atol=_ATOL, dense_output=True)
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
        r"""Exact :math:`\nabla_\theta J` from the value-gradient identity (theory.md R4, §5).

        :math:`\nabla J = E\int_0^T (\partial_\theta \mu)^\top[c\nabla_y V^\theta - \beta w(\mu - s)]d\tau`;
        with :math:`\nabla V^\theta = -Uy + u`, :math:`\mu - s = Ky + k`, :math:`w = rc` this is
        :math:`\int c[(-U-\beta r K)(P + mm^\top) + (u - \beta r k)m^\top]d\tau` for :math:`K_j` and
        :math:`\int c[(-U-\beta r K)m + u - \beta r k]d\tau` for :math:`k_j` over piece ``j``.
        """
        return self.exact_objective_and_gradient(theta, pieces)[1]

    def exact_objective_and_gradient(self, theta, pieces: int = 1) -> tuple[float, np.ndarray]:
        """``(J, grad J)`` from one integration of the moment ODE (:meth:`exact_gradient`): the objective rides along
        with the gradient's integrals, so an optimiser pays for one forward pass, not two. J agrees with
        :meth:`exact_objective` to the ODE tolerance (rtol 1e-11; the extra components change the step control)."""
        M = self._check_pieces(pieces)
        pol = self._piece_policy(theta, M)
        vcoef = self._backward(pol)
        d, beta, npp = self.d, self.beta, self.n_params_per_piece

        def extra(tau, m, P, co):
            U, u, _ = vcoef(tau)
            *_, K, k, c, r = co
            br = beta * self._finite_ratio(r)
            G = -U - br * K
            gK = c * (G @ (P + np.outer(m, m)) + np.outer(u - br * k, m))
            gk = c * (G @ m + u - br * k)
            out = np.zeros(M * npp)
            j = min(int(np.floor(tau * M / self.T + 1e-9)), M - 1)
            out[j * npp : j * npp + d * d] = gK.ravel()
            out[j * npp + d * d : (j + 1) * npp] = gk
            return out

        m, P, kl, grad = self._forward(pol, extra=extra, n_extra=M * npp)
        return self._terms_of_moments(m, P, kl)["objective"], grad

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
            f = float(self.schedule.f(t))
            c, e, r = self._weights(tau)
            Ls, ls = (torch.as_tensor(x, dtype=torch.float64) for x in self._score_affine(t))
            j = (n * M) // N
            K, k = Ks[j], ks[j]
            Km = K @ m + k
            if theta_t.requires_grad or bool(K.any()) or bool(k.any()):
                kl = kl + 0.5 * (self._finite_ratio(r) * c) * dt * (torch.trace(K @ P @ K.T) + Km @ Km)
            F = I + dt * (-f * I + c * (Ls + K))
            m = F @ m + dt * c * (ls + k)
            P = F @ P @ F.T + e * dt * I
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
        """Exact expected discrete KL :math:`E\\sum_k \\frac{w_k d\\tau}{2}|a_k - s_k|^2` (nats per path)."""
        return self.discrete_terms(theta, pieces, steps)["path_kl"]

    def discrete_gradient(self, theta, pieces: int = 1, steps: int = 100) -> np.ndarray:
        """Exact :math:`\\nabla_\\theta J_N` of the Euler chain (autograd through the moment recursion)."""
        self._unpack(theta, pieces)
        th = torch.tensor(np.asarray(theta, dtype=float), requires_grad=True)
        out = self._discrete_torch(th, pieces, steps)
        (g,) = torch.autograd.grad(out["objective"], th)
        return g.numpy()

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

    # ------------------------------------------------------------------ R7 / R8 (exact) -------------
    def _hamiltonian_gap_integral(self, theta, theta2, pieces: int, under: str = "new",
                                  with_kl: bool = True) -> float:
        """:math:`E\\int_0^T[c(a'-a)\\cdot\\nabla V^\\theta - \\beta w((a'-a)\\cdot(a-s) + \\frac12|a'-a|^2)]d\\tau`.

        ``under="new"``: states from :math:`\\theta'` (the performance-difference identity, R7);
        ``under="old"``: states from :math:`\\theta` (the surrogate of R8). ``with_kl=False`` drops the KL
        terms of H (a wrong variant kept for negative-control tests).
        """
        old = self._piece_policy(theta, pieces)
        new = self._piece_policy(theta2, pieces)
        vcoef = self._backward(old)

        def extra(tau, m, P, co):
            U, u, _ = vcoef(tau)
            *_, c, r = co
            b = self.beta * self._finite_ratio(r) if with_kl else 0.0
            K_old, k_old = old.K(tau), old.k(tau)
            D, dl = new.K(tau) - K_old, new.k(tau) - k_old
            G, ev = -U - b * K_old, u - b * k_old
            S2 = P + np.outer(m, m)
            lin = np.trace(D.T @ G @ S2) + ev @ D @ m + dl @ G @ m + dl @ ev
            quad = np.trace(D.T @ D @ S2) + 2 * dl @ D @ m + dl @ dl
            return np.array([c * (lin - 0.5 * b * quad)])

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
