"""Terminal laws of the optimal sampler and torch versions of :class:`toy_problems.GaussianMixtureProblem`
(a mixin; the formulas are in the :mod:`toy_problems.gaussian_mixture` module docstring)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp as _np_logsumexp
from scipy.special import softmax as _np_softmax

from ._validate import positive_int as _positive_int

__all__ = ["MixtureLaws"]

_LOG_2PI = math.log(2.0 * math.pi)
_DEFAULT_QUAD_POINTS = {1: 100, 2: 60, 3: 24}
_MAX_QUAD_NODES = 5_000_000


def _as_rng(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, numbers.Integral | np.random.SeedSequence):
        return np.random.default_rng(rng)
    raise TypeError(f"'rng' must be a numpy Generator, a seed or None, got {type(rng).__name__}")


def _sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of ``probs`` ``(B, K)`` (rows sum to 1)."""
    u = rng.random(probs.shape[0])
    idx = (np.cumsum(probs, axis=1) < u[:, None]).sum(axis=1)
    return np.minimum(idx, probs.shape[1] - 1)



class MixtureLaws:
    """Mixin of :class:`toy_problems.GaussianMixtureProblem`: the optimal sampler's terminal law, torch versions."""

    # -- terminal law of the optimal sampler ---------------------------------------------------------
    def _init_components(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Initial law mu_0 as a mixture: log weights ``(J,)``, means ``(J, d)``, roots ``(J, d, d)``."""
        if self.init == "standard":
            return np.zeros(1), np.zeros((1, self.d)), np.eye(self.d)[None]
        kern = self._kernel(self.T)
        roots = np.einsum("kij,kj->kij", self._U, np.sqrt(kern.D))  # U sqrt(D): root of C_k(T)
        return self._log_pi, kern.alpha * self.means, roots

    def _tilted_kernel_from(self, y0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        r"""Law of :math:`Y_T \mid Y_0 = y_0` under :math:`a^*`: weights ``q`` ``(B, K)``, means
        ``(B, K, d)``, covariances ``(K, d, d)``, and :math:`\log Z(y_0) = (V^*(0, y_0) - r_0)/\beta`."""
        kern = self._kernel(self.T)
        log_joint, _ = self._components(kern, y0)
        expo = log_joint + self._tilt_exponent(kern, y0)
        log_Z = _np_logsumexp(expo, axis=1) - _np_logsumexp(log_joint, axis=1)
        q = _np_softmax(expo, axis=1)
        shift = kern.h + np.einsum("kij,j->ki", kern.Gamma, self.w) / self.beta
        means = np.einsum("kij,bj->bki", kern.Phi, y0) + shift
        return q, means, kern.Gamma, log_Z

    def sample_initial(self, n, rng=None) -> np.ndarray:
        """``n`` draws from the sampler's initial law :math:`\\mu_0` (numpy), shape ``(n, d)``."""
        n = _positive_int("n", n)
        rng = _as_rng(rng)
        log_pi, m, roots = self._init_components()
        j = rng.choice(len(log_pi), size=n, p=np.exp(log_pi))
        return m[j] + np.einsum("nij,nj->ni", roots[j], rng.standard_normal((n, self.d)))

    def sample_optimal_terminal(self, n, rng=None) -> np.ndarray:
        r"""Exact draws of :math:`Y_T` under :math:`a^*` with the initial law fixed: :math:`y_0 \sim \mu_0`,
        then :math:`Y_T \sim \sum_k q_k(y_0)\mathcal N(\Phi_k y_0 + h_k + \Gamma_k w/\beta, \Gamma_k)`
        (the pretrained kernel from :math:`y_0` tilted by :math:`e^{r/\beta}`, R2). Shape ``(n, d)``."""
        rng = _as_rng(rng)
        twin = self._gaussian_twin("sample_optimal_terminal")
        if twin is not None:
            if not hasattr(twin, "optimal_terminal_law"):
                raise NotImplementedError("sample_optimal_terminal at noise eta != 1 with K > 1: the optimal terminal "
                                          "law is known through its moments only (optimal_terminal_moments)")
            m, C = twin.optimal_terminal_law()
            return m + rng.standard_normal((_positive_int("n", n), self.d)) @ np.linalg.cholesky(C).T
        y0 = self.sample_initial(n, rng)
        q, means, Gamma, _ = self._tilted_kernel_from(y0)
        k = _sample_categorical(q, rng)
        chol = np.linalg.cholesky(Gamma)
        x = means[np.arange(len(k)), k] + rng.standard_normal(y0.shape)
        for j in range(self.K):  # x = mean + chol(Gamma_j) z on the rows drawn from component j
            rows = k == j
            x[rows] = means[rows, j] + (x[rows] - means[rows, j]) @ chol[j].T
        return x

    def optimal_terminal_moments(self, init_optimised: bool = False, quad_points: int | None = None):
        r"""Exact mean ``(d,)`` and covariance ``(d, d)`` of the optimal sampler's terminal law (R2).

        ``init_optimised=False``: initial law :math:`\mu_0` fixed; the terminal law is
        :math:`\int \mu_0(dy_0) \sum_k q_k(y_0) \mathcal N(\Phi_k y_0 + h_k + \Gamma_k w/\beta, \Gamma_k)`.
        ``init_optimised=True``: the initial law is optimised too, :math:`\mu_0^* \propto \mu_0
        e^{V^*(0,\cdot)/\beta}`, and the terminal law is :math:`p_T^\text{pre} e^{r/\beta}/Z` (the same
        kernel integrated over :math:`\mu_0^*`).

        The integral over :math:`y_0` uses tensor Gauss-Hermite quadrature on each Gaussian component of
        :math:`\mu_0` (``quad_points`` nodes per dimension; default 100 for d=1, 60 for d=2, 24 for d=3,
        accurate to ~1e-10 for d <= 2 on problems of moderate scale); the kernel moments are exact.
        """
        if not (init_optimised and self.init == "p_T"):
            twin = self._gaussian_twin("optimal_terminal_moments")
            if twin is not None and hasattr(twin, "optimal_terminal_law"):
                return twin.optimal_terminal_law(init_optimised)
            if twin is not None:
                return twin.optimal_terminal_moments(init_optimised, quad_points or 100)
        if quad_points is None:
            quad_points = _DEFAULT_QUAD_POINTS.get(self.d, 8)
        quad_points = _positive_int("quad_points", quad_points)
        log_pi, m0, roots = self._init_components()
        n_nodes = len(log_pi) * quad_points**self.d
        if n_nodes > _MAX_QUAD_NODES:
            raise ValueError(f"'quad_points'={quad_points} in d={self.d} needs {n_nodes} quadrature nodes "
                             f"(> {_MAX_QUAD_NODES}); lower it or use sample_optimal_terminal")
        x1, w1 = np.polynomial.hermite.hermgauss(quad_points)
        grids = np.meshgrid(*([x1] * self.d), indexing="ij")
        nodes = np.stack([g.ravel() for g in grids], axis=1) * math.sqrt(2.0)  # (Q, d)
        log_w = np.sum(np.log(np.stack(np.meshgrid(*([w1] * self.d), indexing="ij"), -1).reshape(-1, self.d)),
                       axis=1) - 0.5 * self.d * math.log(math.pi)
        y0 = (m0[:, None, :] + np.einsum("jil,ql->jqi", roots, nodes)).reshape(-1, self.d)  # (J*Q, d)
        log_mass = (log_pi[:, None] + log_w[None, :]).ravel()
        q, means, Gamma, log_Z = self._tilted_kernel_from(y0)
        if init_optimised:
            log_mass = log_mass + log_Z
        mass = np.exp(log_mass - _np_logsumexp(log_mass))  # (N,)
        wq = mass[:, None] * q  # (N, K)
        mean = np.einsum("nk,nki->i", wq, means)
        dev = means - mean
        cov = np.einsum("k,kij->ij", wq.sum(axis=0), Gamma) + np.einsum("nk,nki,nkj->ij", wq, dev, dev)
        return mean, 0.5 * (cov + cov.T)

    def optimal_terminal_law(self, init_optimised: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r"""``(weights, means, covs)`` of the optimal sampler's terminal law where it is a finite mixture.

        * ``init_optimised=True`` and ``init="p_T"``: :math:`p_T^\text{pre} = p_\text{data}`, so the answer
          is the tilted mixture :meth:`tilted_law`.
        * ``K = 1``: Gaussian. With :math:`\mu_0 = \mathcal N(c, P)` (``p_T``: :math:`(\alpha_T m, C(T))`;
          ``standard``: :math:`(0, I)`), fixed init gives :math:`\mathcal N(\Phi c + h + \Gamma w/\beta,
          \Phi P \Phi + \Gamma)`; optimised init gives the tilt of :math:`p_T^\text{pre} =
          \mathcal N(\Phi c + h, M)`, :math:`M = \Phi P\Phi + \Gamma`:
          :math:`\mathcal N(\Phi c + h + M w/\beta, M)`.

        Otherwise the responsibilities make the law a continuous mixture over :math:`y_0`, and this raises
        ``NotImplementedError``: use :meth:`optimal_terminal_moments` (exact moments) or
        :meth:`sample_optimal_terminal` (exact samples). For VP with :math:`b_\max = 20` the fixed-init
        optimum is the tilt up to a relative :math:`O(\alpha_T^2) \approx 4\cdot 10^{-5}`.
        """
        if init_optimised and self.init == "p_T":
            return self.tilted_law()
        twin = self._gaussian_twin("optimal_terminal_law") if self.K == 1 else None
        if twin is not None:
            m, C = twin.optimal_terminal_law(init_optimised)
            return np.ones(1), m[None], C[None]
        if self.K == 1:
            kern = self._kernel(self.T)
            _, c, roots = self._init_components()
            P = roots[0] @ roots[0].T
            Phi, Gamma = kern.Phi[0], kern.Gamma[0]
            M = Phi @ P @ Phi.T + Gamma
            M = 0.5 * (M + M.T)
            base = Phi @ c[0] + kern.h[0]
            mean = base + (M if init_optimised else Gamma) @ self.w / self.beta
            return np.ones(1), mean[None], M[None]
        raise NotImplementedError(
            f"the optimal terminal law with init={self.init!r}, init_optimised={init_optimised} is not a "
            "finite Gaussian mixture (the responsibilities q_k(y0) are nonlinear in the initial point y0); "
            "use optimal_terminal_moments() for its exact mean and covariance or sample_optimal_terminal() "
            "for exact samples")

    # -- torch versions for rollouts -----------------------------------------------------------------
    def _torch_params(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        key = (dtype, str(device))
        if key not in self._torch_cache:
            def tt(a):
                return torch.as_tensor(a, dtype=dtype, device=device)

            self._torch_cache[key] = {
                "log_pi": tt(self._log_pi), "means": tt(self.means), "lam": tt(self._lam), "U": tt(self._U),
                "Uw": tt(self._Uw), "Um": tt(self._Um),
            }
        return self._torch_cache[key]

    def _torch_components(self, t, x: torch.Tensor, tilted: bool):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"'y' must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"'y' must have a floating dtype, got {x.dtype}")
        single = x.dim() == 1
        x2 = x[None] if single else x
        if x2.dim() != 2 or x2.shape[1] != self.d:
            raise ValueError(f"'y' must have shape (B, {self.d}) or ({self.d},), got {tuple(x.shape)}")
        p = self._torch_params(x.dtype, x.device)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.numel() == 1:
            t = t.reshape(())
        elif t.numel() == x2.shape[0] and not tilted:  # one time per row: (B, 1, 1) against the (B, K, d) terms
            t = t.reshape(-1, 1, 1)
        else:
            raise ValueError(f"'t' must be one time or one per row of 'y' ({x2.shape[0]}; the score only), "
                             f"got shape {tuple(t.shape)}")
        alpha = self.schedule.alpha(t)
        var = self.schedule.marginal_var(t)
        lam, U = p["lam"], p["U"]
        D = alpha**2 * lam + var  # (K, d), or (B, K, d) with one time per row
        z = torch.einsum("kji,bkj->bki", U, x2[:, None, :] - alpha * p["means"])
        zD = z / D
        log_joint = (p["log_pi"] - 0.5 * (z * zD).sum(-1) - 0.5 * torch.log(D).sum(-1)
                     - 0.5 * self.d * _LOG_2PI)
        comp_scores = -torch.einsum("kij,bkj->bki", U, zD)
        if tilted:
            Phi_w = torch.einsum("kij,kj->ki", U, alpha * lam / D * p["Uw"])
            h_w = (p["Uw"] * var / D * p["Um"]).sum(-1)
            wGw = (p["Uw"] ** 2 * var * lam / D).sum(-1)
            log_joint = log_joint + (x2 @ Phi_w.T + h_w) / self.beta + wGw / (2 * self.beta**2)
            comp_scores = comp_scores + Phi_w / self.beta
        out = torch.einsum("bk,bki->bi", torch.softmax(log_joint, dim=1), comp_scores)
        return out[0] if single else out

    def score_torch(self, t, x: torch.Tensor) -> torch.Tensor:
        """Torch version of :meth:`score` (dtype/device of ``x``; ``t`` a float, a 0-dim tensor or one time per row
        of ``x``, shape ``(B, 1)``)."""
        return self._torch_components(t, x, tilted=False)

    def optimal_action_torch(self, tau, y: torch.Tensor) -> torch.Tensor:
        """Torch version of :meth:`optimal_action` (dtype/device of ``y``; ``tau`` float or 0-dim tensor)."""
        twin = self._gaussian_twin("optimal_action_torch")
        if twin is not None and self.K == 1:
            return twin.optimal_action_torch()(tau, y)
        if twin is not None:
            return twin.optimal_action_torch(tau, y)
        return self._torch_components(self._torch_t_of_tau(tau, y), y, tilted=True)

    def _torch_t_of_tau(self, tau, y) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"'y' must be a torch.Tensor, got {type(y).__name__}")
        return self.T - torch.as_tensor(tau, dtype=y.dtype, device=y.device)

    def action_fns(self):
        r"""``(pretrained_action, optimal_action)``, each ``(tau, y, cond) -> a`` on torch tensors
        (``sa_theory.sde.ActionFn``): :math:`s(T-\tau, y)` and :math:`a^*(\tau, y)`; ``cond`` is ignored."""

        def pretrained_action(tau: torch.Tensor, y: torch.Tensor, cond: Any = None) -> torch.Tensor:
            return self._torch_components(self._torch_t_of_tau(tau, y), y, tilted=False)

        def optimal_action(tau: torch.Tensor, y: torch.Tensor, cond: Any = None) -> torch.Tensor:
            return self.optimal_action_torch(tau, y)

        return pretrained_action, optimal_action

    def initial_sample(self, n, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu") -> torch.Tensor:
        r"""``n`` draws from the initial law :math:`\mu_0` as a torch tensor ``(n, d)`` (``"p_T"``: the
        mixture :math:`\sum_k\pi_k\mathcal N(\alpha_T m_k, C_k(T))`; ``"standard"``: :math:`N(0, I)`).
        Drawn on the generator's device (CPU if none), then moved to ``device``."""
        n = _positive_int("n", n)
        gen_device = generator.device if generator is not None else torch.device(device)
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64, device=gen_device)
        if self.init == "standard":
            return z.to(device=device, dtype=dtype)
        log_pi, m, roots = self._init_components()
        probs = torch.as_tensor(np.exp(log_pi), dtype=torch.float64, device=gen_device)
        j = torch.multinomial(probs, n, replacement=True, generator=generator)
        m_t = torch.as_tensor(m, dtype=torch.float64, device=gen_device)
        roots_t = torch.as_tensor(roots, dtype=torch.float64, device=gen_device)
        x = m_t[j] + torch.einsum("nij,nj->ni", roots_t[j], z)
        return x.to(device=device, dtype=dtype)
