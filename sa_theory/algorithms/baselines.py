r"""Discrete-time baselines on the same rollouts and budgets (theory.md §4): DDPO-SF, DDPO-IS, DPOK.

All three treat the ``N``-step Euler-Maruyama chain as an MDP whose policy is the Gaussian transition
:math:`\pi_\theta(Y_{k+1}|Y_k) = N(Y_k + b(\tau_k, Y_k, \mu_\theta) d\tau, g_k^2 d\tau I)` and so need
``solver="euler"``. For a fair comparison on the same objective :math:`J`, DDPO-SF and DDPO-IS put the
**sampled log-ratio KL** :math:`\sum_k \log\frac{\pi_\theta}{\pi_\text{pre}}(Y_{k+1}|Y_k)` into the
return (original DDPO has no KL: set ``beta=0``). DPOK keeps its per-step KL regulariser outside the
return, as published.

* :class:`DDPOSF` -- REINFORCE, one gradient step per batch:
  :math:`\sum_k \hat A\,\log\pi_\theta(Y_{k+1}|Y_k)`, :math:`\hat A` the (standardised) path return.
* :class:`DDPOIS` -- PPO-clip on per-step ratios (``epochs`` steps per batch, fixed ``clip_range``).
* :class:`DPOK` -- :math:`\sum_k (R - V_\psi(\tau_k, Y_k))\log\pi_\theta - \beta\sum_k\ell_k(\theta)` with a
  learned value baseline (regressed on :math:`R`).
"""

from __future__ import annotations

import torch

from ..estimators import (
    dpok_surrogate,
    euler_log_probs,
    kl_steps,
    likelihood_ratio_surrogate,
    ppo_clip_surrogate,
    sampled_kl_return,
)
from .actor_critic import values_on_grid
from .policies import grid_means
from .trainer import Batch, Trainer

__all__ = ["DDPOSF", "DDPOIS", "DPOK", "ddpo_advantages"]


def ddpo_advantages(batch: Batch, beta: float, normalize: bool) -> torch.Tensor:
    r"""Per-path return :math:`R - \beta\sum_k[\log\pi_\theta - \log\pi_\text{pre}](Y_{k+1}|Y_k)`, optionally
    standardised over the batch (DDPO's advantage normalisation). ``(B,)``, detached."""
    ret = sampled_kl_return(batch.reward, (batch.log_probs - batch.ref_log_probs).sum(0), beta)
    if normalize:
        ret = (ret - ret.mean()) / (ret.std() + 1e-8)
    return ret.detach()


class _DiscreteBaseline(Trainer):
    def _init_extra(self) -> None:
        if self.cfg.solver != "euler":
            raise ValueError(f"{type(self).__name__} is a discrete-time (Euler-chain) method: use solver='euler', "
                             f"got {self.cfg.solver!r}")

    def log_probs(self, batch: Batch, paths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable :math:`\\log\\pi_\\theta(Y_{k+1}|Y_k)` ``(N, b)`` and the means ``(N, b, d)``."""
        N = batch.taus.numel() - 1
        states = batch.states[:, paths]
        cond = None if batch.cond is None else batch.cond[paths]
        means = grid_means(self.policy, batch.taus[:N], states[:N], cond, batch.ref_actions[:, paths])
        return euler_log_probs(self.env.sde, batch.taus, states, means), means


class DDPOSF(_DiscreteBaseline):
    """DDPO-SF (score-function REINFORCE), one gradient step per batch."""

    def update(self, batch: Batch) -> dict:
        beta, B = self.beta_at(self.iteration), batch.batch_size
        adv = ddpo_advantages(batch, beta, self.cfg.normalize_advantages)
        for paths in self.chunks(B):
            logp, _ = self.log_probs(batch, paths)
            sur = likelihood_ratio_surrogate(logp, adv[paths], torch.zeros_like(logp), 0.0)
            (-sur.sum() / B).backward()
        return {"grad_norm": self.policy_step()}


class DDPOIS(_DiscreteBaseline):
    """DDPO-IS: PPO-clip with per-step importance ratios and a fixed clip range."""

    def update(self, batch: Batch) -> dict:
        cfg, beta, B = self.cfg, self.beta_at(self.iteration), batch.batch_size
        adv = ddpo_advantages(batch, beta, cfg.normalize_advantages)
        grad_norm, clipfrac, approx_kl = 0.0, 0.0, 0.0
        for _ in range(cfg.epochs):
            cf, ak = 0.0, 0.0
            for paths in self.chunks(B):
                logp, _ = self.log_probs(batch, paths)
                old = batch.log_probs[:, paths]
                sur = ppo_clip_surrogate(logp, old, adv[paths], cfg.clip_range)
                (-sur.sum() / B).backward()
                with torch.no_grad():
                    ratio = torch.exp(logp - old)
                    cf += float(((ratio - 1).abs() > cfg.clip_range).float().sum()) / ratio.numel() * paths.numel() / B
                    ak += float(((ratio - 1) - torch.log(ratio)).sum(0).sum()) / B
            clipfrac, approx_kl = cf, ak
            grad_norm = self.policy_step()
        return {"grad_norm": grad_norm, "clip_frac": clipfrac, "approx_kl": approx_kl}


class DPOK(_DiscreteBaseline):
    """DPOK: policy gradient with a learned value baseline and a per-step KL regulariser."""

    def _init_extra(self) -> None:
        super()._init_extra()
        if self.value is None:
            raise ValueError("DPOK needs a value baseline: pass value=... (e.g. sa_theory.value.MLPValue)")
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=self.cfg.value_lr)

    def extra_state(self) -> dict:
        return {"value_optimizer": self.value_optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.value_optimizer.load_state_dict(state["value_optimizer"])

    def update(self, batch: Batch) -> dict:
        beta, B, N = self.beta_at(self.iteration), batch.batch_size, batch.taus.numel() - 1
        # value baseline: regress V(tau_k, Y_k) on the terminal reward R (DPOK's value is of the reward)
        vloss = torch.zeros(())
        n_t = min(N, max(1, self.cfg.value_batch // B))
        for _ in range(self.cfg.value_epochs):
            idx = torch.randperm(N, generator=batch.generator)[:n_t]
            v = values_on_grid(self.value, batch.taus[idx], batch.states[idx], batch.cond)
            vloss = ((v - batch.reward[None]) ** 2).mean()
            self.value_optimizer.zero_grad(set_to_none=True)
            vloss.backward()
            self.value_optimizer.step()
        with torch.no_grad():
            baseline = values_on_grid(self.value, batch.taus[:N], batch.states[:N], batch.cond)
        for paths in self.chunks(B):
            logp, means = self.log_probs(batch, paths)
            kl_theta = kl_steps(self.env.sde, batch.taus, means, batch.ref_actions[:, paths])
            sur = dpok_surrogate(logp, batch.reward[paths], baseline[:, paths], kl_theta, beta)
            (-sur.sum() / B).backward()
        return {"grad_norm": self.policy_step(), "value_loss": vloss.item()}
