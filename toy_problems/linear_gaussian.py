r"""Linear-quadratic-Gaussian fine-tuning problem with everything in closed form (theory.md R1-R3, §5).

Data :math:`p_\text{data} = N(m_0, S_0)` in :math:`\mathbb R^d`, a forward schedule (any, including
:class:`~sa_theory.schedules.RectifiedFlow`), a quadratic reward :math:`r(x) = -\tfrac12 x^\top Q x + w^\top x
+ r_0`, a KL weight :math:`\beta` and the sampler's noise level :math:`\eta` (``noise``, theory.md §5; default
1, the reverse SDE). The pretrained score is exact and affine, :math:`s(t, y) = -S_t^{-1}(y - \alpha_t m_0)`,
:math:`S_t = \alpha_t^2 S_0 + \sigma_t^2 I`.

**Policy class.** Affine corrections of the score, :math:`a = s(T-\tau, y) + K(\tau) y + k(\tau)`, with
:math:`K, k` constant on ``M`` equal pieces of :math:`[0, T]` (piece ``j`` is
:math:`[jT/M, (j+1)T/M)`), packed as ``theta = [vec(K_1) row-major, k_1, ..., vec(K_M), k_M]``
(length :math:`M(d^2 + d)`). ``theta = 0`` is the pretrained sampler. The controlled state is linear,

.. math:: dY = (A(\tau) Y + c(\tau)) d\tau + \sqrt\eta\, g\, dB, \quad A = -f I + \tfrac{1+\eta}{2}g^2(-S_t^{-1} + K),
          \quad c = \tfrac{1+\eta}{2}g^2(\alpha_t S_t^{-1} m_0 + k),

so its moments and the value :math:`V^\theta = -\tfrac12 y^\top U y + u^\top y + u_0` solve linear ODEs
(:mod:`toy_problems._lg_policies`); the optimum (:math:`V^*` from the eta-process's own transition,
:math:`a^* = s + \frac{2\eta}{1+\eta}\nabla V^*/\beta`) is in :mod:`toy_problems._lg_closed_form`. "Exact"
means these ODEs solved with DOP853 at ``rtol=1e-11`` (no Monte Carlo), or closed forms.

**Discrete chain.** ``discrete_*`` give the exact expectations for the ``N``-step Euler-Maruyama chain
(uniform grid, coefficients frozen at the left end :math:`\tau_k`, reward :math:`r(Y_N)`, KL
:math:`\sum_k \tfrac{w_k d\tau}{2}|a_k - s_k|^2`, :math:`w = \frac{(1+\eta)^2}{4\eta}g^2`) by exact moment
recursions; the gradient is taken by autograd through the recursion (float64). :meth:`estimate_gradient`
gives the Monte-Carlo estimators of ``sa_theory.estimators`` on rollouts of the same chain.
"""

from __future__ import annotations

import numpy as np
import torch

from ._lg_closed_form import LinearGaussianClosedForm, gaussian_kl
from ._lg_policies import LinearGaussianPolicies

__all__ = ["LinearGaussianProblem", "gaussian_kl"]


class LinearGaussianProblem(LinearGaussianPolicies, LinearGaussianClosedForm):
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
    noise: the sampler's noise level :math:`\\eta` (float >= 0 or a torch function of tau), as in
        :class:`sa_theory.sde.ControlledSDE`; ``self.sde`` is that sampler. Default 1.
    """

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

        if estimator not in self.ESTIMATORS:
            raise ValueError(f"'estimator' must be one of {self.ESTIMATORS}, got {estimator!r}")
        self._unpack(theta, pieces)
        th = torch.tensor(np.asarray(theta, dtype=float), dtype=dtype, requires_grad=True)
        policy, ref = self.policy_action(th, pieces), self.pretrained_action()
        sde = self.sde
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
        g2, dt = sde.action_coef(taus), traj.dtau  # = g^2 at eta = 1
        kw = {} if self._reverse_sde else {"kl_weight": sde.kl_weight_rate(taus)}
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
                return est.value_gradient_surrogate(means, vgrads_all[:, sl], refs, g2, dt, beta, **kw)
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
