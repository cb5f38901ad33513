r"""The RL methods, one implementation each for every environment (toy problems, UNets, flow transformers).

Each is a :class:`~.method_base.Method` on a recorded :class:`~.rl_batch.RolloutBatch`: ``prepare`` (advantages,
value targets) and ``losses(batch, steps)`` (``"loss"`` to minimise plus diagnostics); every formula comes from
:mod:`sa_theory.estimators` / :mod:`sa_theory.value`. **Which KL regularises** (``kl_weighting``): ``"chain"``
(default) weights the step's :math:`\frac12|a_k - s_k|^2` by :math:`w_k = \lambda_k^2/\mathrm{std}_k^2`, the
exact KL of the K-step sampler actually run (by data processing it bounds the KL between fine-tuned and
pretrained samples); ``"continuous"`` by the Girsanov rate integrated over the step, :math:`\bar w_k`, stable
across K. The same weight is used for the trust region to the old policy. Units: :mod:`.method_base`.

* :class:`SAACMethod` (``sa_ac``) -- continuous-time KL-regularised actor-critic. ``estimator="likelihood_ratio"``
  (R5): advantage :math:`A_k = G_k - V(\tau_k, x_k)` with :math:`G_k = R - \beta\sum_{j>k}\ell_j`
  (:func:`reward_to_go`) or the TD error :math:`V_{k+1} - V_k - \beta\ell_k` (:func:`td_advantages`); actor
  :math:`\sum_k A_k\rho_k - \beta\sum_k\ell_k(\theta)` (:func:`likelihood_ratio_surrogate` with the per-step
  importance weight :math:`\rho_k = \pi_\theta/\pi_{old}(x_{k+1}|x_k)`: the gradient of
  :math:`\log\pi_\theta` at :math:`\theta = \theta_{old}`, importance-corrected after it), minus ``kl_penalty``
  times the path KL to the old policy (:func:`policy_path_kl`): a trust region independent of the number of
  steps. ``"value_gradient"`` (R4/R8): :func:`trust_region_surrogate` with the costates
  :math:`p_k = \nabla_x V_\psi(\tau_{k+1}, x_{k+1})` (:meth:`SAACMethod.costates`). Critic: regression onto
  :math:`R - \beta\sum_{j\ge k}\ell_j` (:func:`mc_value_targets`) or TD(0).
* :class:`DDPOSFMethod` (``ddpo_sf``) -- REINFORCE on the K-step chain, :math:`\sum_k A\log\pi_\theta`, with the
  trainer-normalised return :math:`R - \beta\sum_k\lambda_k` (sampled log-ratios, :func:`sampled_kl_return`;
  ``beta = 0`` is DDPO as published) as the advantage.
* :class:`DDPOISMethod` (``ddpo_is``) -- per-step PPO-clip (:func:`ppo_clip_surrogate`) with a fixed clip range
  on ratios of summed log-probs, advantages as DDPO-SF.
* :class:`DPOKMethod` (``dpok``) -- :func:`dpok_surrogate`: :math:`\sum_k (R - V_k)\rho_k - \beta\sum_k\ell_k(\theta)`
  with the ratio clamped to :math:`1\pm c` and a value baseline regressed on R.
* :class:`FlowGRPOMethod` (``flow_grpo``) -- group-normalised advantages, per-step PPO-clip and a per-step KL
  penalty; our units (summed log-probs, exact KL) by default, its own (per-dimension means, KL without
  :math:`1/d\tau`) with ``logprob_units="mean"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..estimators import (
    dpok_surrogate,
    likelihood_ratio_surrogate,
    policy_path_kl,
    ppo_clip_surrogate,
    reward_to_go,
    sampled_kl_return,
    td_advantages,
    trust_region_surrogate,
)
from ..value import mc_value_targets
from .method_base import Method, MethodConfig

__all__ = ["SAACMethod", "DDPOSFMethod", "DDPOISMethod", "DPOKMethod", "FlowGRPOMethod", "METHOD_CLASSES",
           "make_method", "Method", "MethodConfig"]


class SAACMethod(Method):
    """``sa_ac``: continuous-time KL-regularised actor-critic (module docstring)."""

    name = "sa_ac"

    def prepare(self, batch, rewards):
        c, beta = self.cfg, self.cfg.beta
        kl = self.kl_steps(batch)
        V, metrics = None, {}
        if self.value_model is not None:
            V = self.all_values(batch)
            if c.value_loss == "td":  # TD(0) targets from the critic before this batch's fit
                batch.step_data["v_target"] = torch.cat([V[1:], rewards[None]], 0) - beta * kl
            else:
                batch.step_data["v_target"] = mc_value_targets(rewards, kl, beta)
            if self.value_fitter is not None:  # the separate critic phase, then its values
                metrics = self.fit_values(batch)
                V = self.all_values(batch)
        if c.advantage == "td":
            adv = td_advantages(V, rewards, kl, beta)
        else:
            adv = reward_to_go(rewards, kl, beta)
            if V is not None:
                adv = adv - V
        batch.step_data["adv"] = self._clip_adv(adv)
        if c.estimator == "value_gradient":
            batch.step_data["costate"] = self.costates(batch, rewards)
        return {**metrics, "adv_abs_mean": float(adv.abs().mean())}

    def costates(self, batch, rewards) -> torch.Tensor:
        r""":math:`p_k = \nabla_x V_\psi(\tau_{k+1}, x_{k+1})` on the recorded next states, ``(K, B, ...)``, detached:
        the one-step value gradient of the kernel step is :math:`\lambda_k E[p_k]`. With ``tweedie_fn`` (set by the
        image trainer for a differentiable reward) the Tweedie input :math:`r(\hat x_0(x))` is differentiated too
        (through the pretrained network and the decoder); otherwise it is held fixed."""
        out, K = [], batch.num_steps
        tw = batch.step_data.get("tweedie")
        for k in range(K):
            x = batch.latents[k + 1].detach()
            x = x.to(torch.promote_types(x.dtype, torch.float32)).requires_grad_(True)  # float32 or float64
            with torch.enable_grad():
                if self.tweedie_fn is not None:  # differentiable r(x0_hat(x)): the Tweedie part of grad V
                    tweedie = self.tweedie_fn(k + 1, x, batch)
                else:
                    tweedie = None if tw is None else (tw[k + 1] if k + 1 < tw.shape[0] else rewards.float())
                v = self.value_model(float(self.kernel.taus[k + 1]), x, self.env.value_cond(batch, k + 1, tweedie))
                (g,) = torch.autograd.grad(v.sum(), x)
            out.append(g.detach())
        return torch.stack(out)

    def step_loss(self, batch, ks, terms):
        c, s = self.cfg, self.steps_scale
        a, old_a = terms["action"], terms["old_action"]
        w = self.weights(ks, a)
        if c.estimator == "value_gradient":  # R4/R8: c = lambda_k, w = the regulariser's weight, dtau = 1 (per step)
            ref = batch.ref_actions[ks] if batch.ref_actions is not None else old_a
            sur = trust_region_surrogate(a, old_a, ref, batch.step_data["costate"][ks].to(a.dtype),
                                         self.weights(ks, a, "slope"), 1.0, c.beta, c.kl_penalty,
                                         max_path_kl=c.max_path_kl, kl_weight=w)
            if c.lr_coef:  # importance-weighted advantages on top (critics of non-differentiable rewards)
                ratio = torch.exp(terms["log_prob"] - terms["old_log_prob"])
                sur = sur + c.lr_coef * (ratio * batch.step_data["adv"][ks]).sum(0)
            pkl = policy_path_kl(a, old_a, w, 1.0)
            return {**self._actor_critic_terms(-s * sur.mean(), batch, ks, terms), "kl_to_old": s * pkl.detach().mean()}
        ratio = torch.exp(terms["log_prob"] - terms["old_log_prob"])
        pkl = policy_path_kl(a, old_a, w, 1.0)
        if c.max_path_kl is None:
            sur = likelihood_ratio_surrogate(ratio, batch.step_data["adv"][ks], terms["kl"], c.beta)
            actor = s * (-sur.mean() + c.kl_penalty * pkl.mean())
        else:  # the KL terms of paths beyond the trust region give no gradient (as trust_region_surrogate's clip)
            reg = -c.beta * terms["kl"].sum(0) - c.kl_penalty * pkl
            keep = (pkl.detach() <= c.max_path_kl).to(reg.dtype)
            sur = likelihood_ratio_surrogate(ratio, batch.step_data["adv"][ks], torch.zeros_like(ratio), 0.0)
            actor = -s * (sur + reg * keep + (reg * (1 - keep)).detach()).mean()
        return {**self._actor_critic_terms(actor, batch, ks, terms), "kl_to_old": s * pkl.detach().mean(),
                "ratio_dev": (ratio.detach() - 1).abs().mean(1).sum() / batch.num_steps}


class DDPOSFMethod(Method):
    r"""``ddpo_sf``: REINFORCE, :math:`\sum_k A\log\pi_\theta(x_{k+1}|x_k)`, the normalised returns
    (:meth:`path_return`) as advantages, no clipping."""

    name = "ddpo_sf"

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta > 0

    def path_return(self, batch, rewards):
        r"""DDPO's return :math:`R - \beta\sum_k\lambda_k` with the sampled log-ratios
        (:func:`sa_theory.estimators.sampled_kl_return`); ``beta = 0`` is original DDPO (the reward)."""
        beta = self.cfg.beta
        return rewards if beta == 0 else sampled_kl_return(rewards, batch.sampled_log_ratio.to(rewards), beta)

    def prepare(self, batch, rewards):
        batch.path_data["adv"] = self._clip_adv(rewards)  # already normalised by the trainer
        return {}

    def step_loss(self, batch, ks, terms):
        lp, old = terms["log_prob"], terms["old_log_prob"]
        sur = likelihood_ratio_surrogate(lp, batch.path_data["adv"], torch.zeros_like(lp), 0.0)
        return self._policy_terms(-self.steps_scale * sur.mean(), batch, terms, lp, old)


class DDPOISMethod(DDPOSFMethod):
    """``ddpo_is``: per-step PPO-clip on summed log-probs, normalised advantages, the KL only in the return
    (``prepare`` as DDPO-SF)."""

    name = "ddpo_is"

    def step_loss(self, batch, ks, terms):
        lp, old, clip = terms["log_prob"], terms["old_log_prob"], self.cfg.clip_range
        sur = ppo_clip_surrogate(lp, old, batch.path_data["adv"], clip)
        return self._policy_terms(-self.steps_scale * sur.mean(), batch, terms, lp, old, clip)


class DPOKMethod(Method):
    """``dpok``: per-step KL regulariser + learned value baseline of the state, clamped ratio."""

    name = "dpok"

    def prepare(self, batch, rewards):
        batch.path_data["R"] = rewards
        batch.step_data["v_target"] = mc_value_targets(rewards, torch.zeros_like(batch.log_probs), 0.0)
        metrics = self.fit_values(batch)  # the separate phase, if any
        batch.step_data["V"] = self.all_values(batch)
        return metrics

    def step_loss(self, batch, ks, terms):
        c, s = self.cfg, self.steps_scale
        ratio = torch.exp(terms["log_prob"] - terms["old_log_prob"]).clamp(1 - c.ratio_clamp, 1 + c.ratio_clamp)
        R, V = batch.path_data["R"], batch.step_data["V"][ks]
        if c.adv_clip_max > 0:  # clip the advantage R - V, as the other methods do
            V = R - self._clip_adv(R - V)
        sur = dpok_surrogate(ratio, R, V.to(ratio.dtype), terms["kl"], c.beta)
        return self._actor_critic_terms(-s * sur.mean(), batch, ks, terms)


class FlowGRPOMethod(DDPOSFMethod):
    r"""``flow_grpo``: Flow-GRPO (Liu et al. 2025): group-normalised rewards as advantages (the image trainer
    samples ``sample.group_size`` images per prompt and standardises within each group), per-step PPO-clip and a
    per-step KL penalty :math:`\beta\,KL_k` to the pretrained model. ``logprob_units="mean"``: Flow-GRPO's own
    units, log-probs averaged over dimensions and the KL :math:`|m_\theta - m_{ref}|^2/(2 D\sigma_t^2)` with
    :math:`\sigma_t = \mathrm{std}_k/\sqrt{d\tau_k}`, i.e. the chain KL times :math:`d\tau_k / D`."""

    name = "flow_grpo"

    def path_return(self, batch, rewards):
        """Flow-GRPO keeps its KL as a per-step penalty in the loss, not in the return."""
        return rewards

    def step_loss(self, batch, ks, terms):
        c, s, kern = self.cfg, self.steps_scale, self.kernel
        lp, old, kl = terms["log_prob"], terms["old_log_prob"], terms["kl"]
        if c.logprob_units == "mean":
            D = batch.latents[0][0].numel()
            lp, old = lp / D, old / D
            if batch.ref_actions is not None:
                kl = torch.stack([kern.step_kl(k, terms["action"][i], batch.ref_actions[k], "chain")
                                  * float(kern.taus[k + 1] - kern.taus[k]) / D for i, k in enumerate(ks)])
        sur = ppo_clip_surrogate(lp, old, batch.path_data["adv"], c.clip_range)
        return self._policy_terms(s * (-sur.mean() + c.beta * kl.mean(1).sum()), batch, terms, lp, old, c.clip_range)


METHOD_CLASSES: dict[str, Callable[..., Method]] = {
    "sa_ac": SAACMethod,
    "ddpo_sf": DDPOSFMethod,
    "ddpo_is": DDPOISMethod,
    "dpok": DPOKMethod,
    "flow_grpo": FlowGRPOMethod,
}


def make_method(cfg: MethodConfig, env, model, value_model=None) -> Method:
    """The method ``cfg.method`` on the step environment ``env`` with policy network ``model``."""
    if cfg.method not in METHOD_CLASSES:
        raise ValueError(f"method: unknown method {cfg.method!r}; choose one of {sorted(METHOD_CLASSES)}")
    return METHOD_CLASSES[cfg.method](cfg, env, model, value_model)
