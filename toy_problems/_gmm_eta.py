r"""The optimum of a 1-d Gaussian-mixture problem at noise level :math:`\eta \ne 1`, by backward PDEs on a grid.

At :math:`\eta \ne 1` the pretrained sampler's transition :math:`Y_T \mid Y_\tau` is not the data posterior
and has no closed form for a mixture, so :math:`V^* = \beta\psi` comes from the HJB equation of the
eta-process (theory.md §5), with :math:`b_0 = -f y + \frac{1+\eta}{2}g^2 s(t, y)`, :math:`e = \eta g^2`,
:math:`t = T - \tau`:

.. math:: \partial_\tau\psi + b_0\,\partial_y\psi + \tfrac{e}{2}\big(\partial_y^2\psi + (\partial_y\psi)^2\big) = 0,
          \qquad \psi(T, y) = (w y + r_0)/\beta,

and :math:`a^* = s + \frac{2\eta}{1+\eta}\partial_y\psi`. The optimal sampler's conditional moments
:math:`u_h(\tau, y) = E^*[h(Y_T) \mid Y_\tau = y]` (``h = y, y^2``) solve the linear backward Kolmogorov
equation of the controlled drift :math:`b^* = b_0 + e\,\partial_y\psi`:
:math:`\partial_\tau u + b^*\partial_y u + \frac e2\partial_y^2 u = 0`, :math:`u(T, y) = h(y)`; the terminal
moments are then :math:`\int \mu_0(dy_0)\,u_h(0, y_0)` (fixed initial law) or the same integral under
:math:`\mu_0^* \propto \mu_0 e^{\psi(0,\cdot)}` (initial law optimised).

Numerics: method of lines on a uniform grid of ``n`` points over :math:`\pm(\max|m_k| + 10\,\mathrm{sd})`
(second-order central differences; at the two end points the second derivative of the neighbour), stiff BDF
in :math:`\tau` at ``rtol=1e-9``. The tests compare it with the closed forms at :math:`\eta = 1` and with the
one-component (Gaussian) problem at :math:`\eta \ne 1`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.interpolate import CubicSpline
from scipy.sparse import diags
from scipy.special import logsumexp

__all__ = ["EtaOptimum1D"]


class EtaOptimum1D:
    """:math:`V^*`, :math:`a^*` and the optimal terminal moments of a d = 1 ``GaussianMixtureProblem`` at any eta."""

    def __init__(self, prob, n: int = 1201):
        if prob.d != 1:
            raise NotImplementedError("the grid solver of the eta-process optimum is for d = 1 mixtures")
        self.prob = prob
        s = prob.schedule
        sd = max(math.sqrt(float(s.alpha(prob.T)) ** 2 * prob.covs.max() + float(s.marginal_var(prob.T))),
                 math.sqrt(prob.covs.max()), 1e-3)
        L = float(np.abs(prob.means).max()) * max(1.0, float(s.alpha(0.0))) + 10.0 * sd
        self.y = np.linspace(-L, L, n)
        self.h = self.y[1] - self.y[0]
        self.n = n
        self._solve()

    def _derivs(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = self.h
        d1 = np.gradient(u, h, edge_order=2)
        d2 = np.empty_like(u)
        d2[1:-1] = (u[2:] - 2 * u[1:-1] + u[:-2]) / h**2
        d2[0], d2[-1] = d2[1], d2[-2]
        return d1, d2

    def _coeffs(self, tau: float) -> tuple[np.ndarray, float]:
        p = self.prob
        t = min(max(p.T - float(tau), 0.0), p.T)
        eta = float(p.sde.eta(float(tau)))
        g2 = float(p.schedule.g2(t))
        b0 = -float(p.schedule.f(t)) * self.y + 0.5 * (1.0 + eta) * g2 * p.score(t, self.y[:, None])[:, 0]
        return b0, eta * g2

    def _solve(self) -> None:
        p, n = self.prob, self.n

        def rhs(tau, z):
            psi, u1, u2 = z[:n], z[n : 2 * n], z[2 * n :]
            b0, e = self._coeffs(tau)
            p1, p2 = self._derivs(psi)
            bstar = b0 + e * p1
            out = [-(b0 * p1 + 0.5 * e * (p2 + p1**2))]
            for u in (u1, u2):
                d1, d2 = self._derivs(u)
                out.append(-(bstar * d1 + 0.5 * e * d2))
            return np.concatenate(out)

        band = diags([np.ones(n - abs(k)) for k in range(-3, 4)], list(range(-3, 4)), shape=(n, n)).tolil()
        one = (band != 0).astype(float)
        from scipy.sparse import bmat

        sparsity = bmat([[one, None, None], [one, one, None], [one, None, one]])
        z_T = np.concatenate([(p.w[0] * self.y + p.r0) / p.beta, self.y, self.y**2])
        sol = solve_ivp(rhs, (p.T, 0.0), z_T, method="BDF", rtol=1e-9, atol=1e-11, jac_sparsity=sparsity,
                        dense_output=True)
        if not sol.success:
            raise RuntimeError(f"eta-process HJB solve failed: {sol.message}")
        self._sol = sol.sol

    def _splines(self, tau: float):
        z = self._sol(float(tau))
        n = self.n
        return [CubicSpline(self.y, z[i * n : (i + 1) * n]) for i in range(3)]

    def optimal_value(self, tau: float, y: np.ndarray) -> np.ndarray:
        """:math:`V^*(\\tau, y) = \\beta\\psi`, ``y`` ``(B, 1)`` -> ``(B,)``."""
        return self.prob.beta * self._splines(tau)[0](y[:, 0])

    def optimal_action(self, tau: float, y: np.ndarray) -> np.ndarray:
        """:math:`a^* = s + \\frac{2\\eta}{1+\\eta}\\partial_y\\psi`, ``(B, 1)``."""
        p = self.prob
        eta = float(p.sde.eta(float(tau)))
        psi = self._splines(tau)[0]
        return p.score(p.T - float(tau), y) + (2 * eta / (1 + eta)) * psi(y[:, 0], 1)[:, None]

    def optimal_action_torch(self, tau, y: torch.Tensor) -> torch.Tensor:
        a = self.optimal_action(float(tau), y.detach().cpu().numpy().astype(np.float64).reshape(-1, 1))
        return torch.as_tensor(a, dtype=y.dtype, device=y.device).reshape(y.shape)

    def optimal_terminal_moments(self, init_optimised: bool, quad_points: int = 100):
        """Mean ``(1,)`` and covariance ``(1, 1)`` of the optimal sampler's terminal law (module docstring)."""
        log_pi, m0, roots = self.prob._init_components()
        x1, w1 = np.polynomial.hermite.hermgauss(quad_points)
        y0 = (m0[:, None, 0] + roots[:, 0, 0][:, None] * math.sqrt(2.0) * x1[None, :]).ravel()
        log_mass = (log_pi[:, None] + np.log(w1)[None, :]).ravel()
        psi, u1, u2 = self._splines(0.0)
        inside = np.clip(y0, self.y[0], self.y[-1])
        if init_optimised:
            log_mass = log_mass + psi(inside)
        mass = np.exp(log_mass - logsumexp(log_mass))
        mean = float(mass @ u1(inside))
        second = float(mass @ u2(inside))
        return np.array([mean]), np.array([[second - mean**2]])
