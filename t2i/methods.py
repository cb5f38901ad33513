r"""RL methods on a recorded :class:`~t2i.rollout.RolloutBatch`: ``prepare`` (advantages, value targets) and
``losses(batch, steps) -> dict`` (``"loss"`` to minimise plus diagnostics). All share the rollout, reward,
log-prob and KL code; every formula comes from :mod:`sa_theory`.

Units: per-step log-probs and KLs are **summed over latent dimensions** (nats per step); a path KL is their
sum over steps (nats per image). **Which KL regularises** (``train.kl_weighting``): ``"chain"`` (default) weights
the step's :math:`\frac12|a_k - s_k|^2` by :math:`w_k = \lambda_k^2/\mathrm{std}_k^2`, the exact KL of the K-step
sampler actually run (by data processing it bounds the KL between fine-tuned and pretrained *images*);
``"continuous"`` by the Girsanov rate integrated over the step, :math:`\bar w_k`, stable across K but without
that bound (measurements in README / ``benchmarks/bench_digits_estimators.py``). Rollouts record both; the same
weight is used for the trust region to the old policy. Each loss is a **sum over steps, mean over paths** of a
per-path surrogate (``train.timestep_fraction < 1`` rescales by K / #steps trained so the sum stays unbiased).

* :class:`SAActorCritic` (``sa_ac``) -- continuous-time KL-regularised actor-critic. Advantage
  :math:`A_k = G_k - V(\tau_k, x_k)` with :math:`G_k = R - \beta\sum_{j>k}\ell_j` (:func:`reward_to_go`) or the
  TD error :math:`V_{k+1} - V_k - \beta\ell_k` (:func:`td_advantages`). Actor: the likelihood-ratio surrogate
  :math:`\sum_k A_k\rho_k - \beta\sum_k\ell_k(\theta)` (:func:`likelihood_ratio_surrogate` with the per-step
  importance weight :math:`\rho_k = \pi_\theta/\pi_{old}(x_{k+1}|x_k)` in place of :math:`\log\pi_\theta`:
  same gradient at :math:`\theta = \theta_{old}`, importance-corrected after it) with the per-step KL
  :math:`\ell_k(\theta) = \frac{w_k}{2}|a^\theta_k - s_k|^2` to the pretrained model (:math:`w_k` of
  ``train.kl_weighting``), minus ``kl_penalty`` times the path KL to the old policy
  :math:`\sum_k\frac{w_k}{2}|a^\theta_k - a^{old}_k|^2` (:func:`policy_path_kl`): a trust region
  independent of the number of steps, not a per-step ratio clip. Critic: Monte-Carlo regression
  onto :math:`R - \beta\sum_{j\ge k}\ell_j` (:func:`mc_value_targets`) or TD(0).
* :class:`DDPOScoreFunction` (``ddpo_sf``) -- REINFORCE on the K-step chain:
  :math:`\sum_k A\log\pi_\theta(x_{k+1}|x_k)` with the per-prompt normalised reward as the advantage
  (DDPO-SF; :func:`likelihood_ratio_surrogate` with :math:`\beta = 0`), no importance weight (exact
  gradient on the first update of an epoch only). With ``train.beta`` > 0 the return is
  :math:`R - \beta\sum_k\lambda_k` (sampled log-ratios, :func:`sampled_kl_return`) before normalisation, as on the
  toys (:mod:`sa_theory.algorithms.baselines`); the presets use ``beta = 0``, DDPO as published.
* :class:`DDPOImportanceSampling` (``ddpo_is``) -- per-step PPO-clip (:func:`ppo_clip_surrogate`) with a fixed
  clip range on ratios of summed log-probs, per-prompt normalised returns (as DDPO-SF) as advantages.
* :class:`DPOK` (``dpok``) -- :func:`dpok_surrogate`: :math:`\sum_k (R - V_k)\rho_k - \beta\sum_k\ell_k(\theta)`
  with the ratio clamped to :math:`1\pm c` and a learned value baseline regressed on R.
* :class:`FlowGRPO` (``flow_grpo``) -- Flow-GRPO: group-normalised advantages, per-step PPO-clip and a per-step
  KL penalty; our units (summed log-probs, exact KL) by default, its own (per-dimension means, KL without
  :math:`1/d\tau`) with ``train.logprob_units="mean"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sa_theory.estimators import (
    dpok_surrogate,
    likelihood_ratio_surrogate,
    policy_path_kl,
    ppo_clip_surrogate,
    reward_to_go,
    sampled_kl_return,
    td_advantages,
    trust_region_surrogate,
)
from sa_theory.value import mc_value_targets, value_regression_loss

from .rollout import RolloutBatch

__all__ = [
    "Method",
    "SAActorCritic",
    "DDPOScoreFunction",
    "DDPOImportanceSampling",
    "DPOK",
    "FlowGRPO",
    "METHOD_CLASSES",
    "make_method",
]


class Method:
    """Base: holds the image environment (its kernel and action), the (possibly DDP-wrapped) policy network,
    the value model and the config."""

    name = "method"

    @property
    def needs_reference(self) -> bool:
        """Whether the method's loss uses the pretrained model's actions (then rollouts record them)."""
        return True

    def path_return(self, batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
        """The per-path quantity the trainer normalises (per prompt / group) before :meth:`prepare`: the reward."""
        return rewards

    def __init__(self, cfg, env, model, value_model=None):
        self.cfg, self.env, self.kernel, self.model, self.value_model = cfg, env, env.kernel, model, value_model
        self.kl_form = cfg.train.kl_weighting  # "continuous" | "chain": the regulariser's per-step KL weight
        self.steps_scale = 1.0
        self._logprob_delta = 0.0
        self.tweedie_fn = None  # (k, x, batch) -> r(decode(x0_hat_k(x))), differentiable in x (value_gradient)

    # -- shared pieces
    def policy_action(self, batch: RolloutBatch, k: int) -> torch.Tensor:
        """The current policy's action at the recorded state ``x_k`` (with autograd through the adapters)."""
        return self.env.action(k, batch.latents[k].detach(), batch.text, self.model)

    def step_terms(self, batch: RolloutBatch, k: int) -> dict[str, torch.Tensor]:
        """log-prob, old log-prob, action, old action and KL to the pretrained model at step ``k``."""
        kern = self.kernel
        x, x1 = batch.latents[k].detach(), batch.latents[k + 1].detach()
        action = self.policy_action(batch, k)
        out = {
            "log_prob": kern.log_prob(k, x1, kern.mean(k, x, action)),
            "old_log_prob": batch.log_probs[k],
            "action": action,
            "old_action": batch.actions[k],
        }
        # on-policy parity: recomputed vs rollout log-prob (0 up to float noise before the first update)
        delta = (out["log_prob"].detach() - out["old_log_prob"]).abs().max()
        self._logprob_delta = max(self._logprob_delta, float(delta))
        if batch.ref_actions is not None:
            out["kl"] = kern.step_kl(k, action, batch.ref_actions[k], self.kl_form)
        else:
            out["kl"] = torch.zeros_like(out["log_prob"])
        return out

    def kl_steps(self, batch: RolloutBatch) -> torch.Tensor:
        """The regulariser's recorded per-step KLs to the pretrained model, ``(K, B)`` (0 if not recorded)."""
        kl = batch.kl_steps_of(self.kl_form)
        return kl if kl is not None else torch.zeros_like(batch.log_probs)

    def value_cond(self, batch: RolloutBatch, k: int) -> dict:
        cond = {"text": batch.text["pooled"]}
        if "tweedie" in batch.step_data:
            cond["tweedie"] = batch.step_data["tweedie"][k]
        return cond

    def values(self, batch: RolloutBatch, k: int) -> torch.Tensor:
        return self.value_model(
            float(self.kernel.taus[k]), batch.latents[k].detach(), self.value_cond(batch, k)
        )

    @torch.no_grad()
    def all_values(self, batch: RolloutBatch) -> torch.Tensor:
        return torch.stack([self.values(batch, k).float() for k in range(batch.num_steps)])

    def critic_loss(self, batch: RolloutBatch, k: int) -> torch.Tensor:
        if self.value_model is None or not any(p.requires_grad for p in self.value_model.parameters()):
            return torch.zeros((), device=batch.latents.device)
        v = self.values(batch, k)
        return value_regression_loss(v[None], batch.step_data["v_target"][k][None]) * self.cfg.value.coef

    def _clip_adv(self, adv: torch.Tensor) -> torch.Tensor:
        c = self.cfg.train.adv_clip_max
        return adv.clamp(-c, c) if c > 0 else adv

    # -- interface
    def _actor_critic_terms(self, actor: torch.Tensor, batch: RolloutBatch, k: int, terms: dict) -> dict:
        """``loss`` = actor + the step's share of the critic loss, and their logged parts."""
        s = self.steps_scale
        critic = s * self.critic_loss(batch, k) / batch.num_steps
        return {
            "loss": actor + critic,
            "actor_loss": actor.detach(),
            "critic_loss": critic.detach(),
            "kl_to_pretrained": s * terms["kl"].detach().mean(),
        }

    def prepare(self, batch: RolloutBatch, rewards: torch.Tensor) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def step_loss(self, batch: RolloutBatch, k: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def losses(self, batch: RolloutBatch, steps: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Sum over ``steps`` (default all) of the per-step losses; ``"loss"`` is what to minimise.

        Under DDP, call with one step per backward pass (one UNet forward per backward)."""
        steps = range(batch.num_steps) if steps is None else steps
        out: dict[str, torch.Tensor] = {}
        self._logprob_delta = 0.0
        for k in steps:
            for name, val in self.step_loss(batch, k).items():
                out[name] = out[name] + val if name in out else val
        return out

    def logprob_delta(self) -> float:
        """max |recomputed - rollout log-prob| (nats, summed over dims) over the steps of the last :meth:`losses`
        call: the log-prob parity check, 0 up to float noise while the policy equals the sampling policy."""
        return self._logprob_delta


class SAActorCritic(Method):
    """``sa_ac``: continuous-time KL-regularised actor-critic (module docstring)."""

    name = "sa_ac"

    def prepare(self, batch, rewards):
        t, beta = self.cfg.train, self.cfg.train.beta
        kl = self.kl_steps(batch)
        V = self.all_values(batch) if self.value_model is not None else None
        if t.advantage == "td":
            adv = td_advantages(V, rewards, kl, beta)
        else:
            adv = reward_to_go(rewards, kl, beta)
            if V is not None:
                adv = adv - V
        batch.step_data["adv"] = self._clip_adv(adv)
        if self.value_model is not None:
            if self.cfg.value.loss == "td":
                v_next = torch.cat([V[1:], rewards[None]], 0)
                batch.step_data["v_target"] = v_next - beta * kl
            else:
                batch.step_data["v_target"] = mc_value_targets(rewards, kl, beta)
        if t.estimator == "value_gradient":
            batch.step_data["costate"] = self.costates(batch, rewards)
        return {"adv_abs_mean": float(adv.abs().mean())}

    def costates(self, batch, rewards) -> torch.Tensor:
        r""":math:`p_k = \nabla_x V_\psi(\tau_{k+1}, x_{k+1})` on the recorded next states, ``(K, B, ...)``, detached:
        the one-step value gradient of the kernel step is :math:`\lambda_k E[p_k]`. With ``tweedie_fn`` (set by the
        trainer for a differentiable reward) the Tweedie input :math:`r(\hat x_0(x))` is differentiated too
        (through the pretrained network and the decoder); otherwise it is held fixed."""
        out, K = [], batch.num_steps
        for k in range(K):
            x = batch.latents[k + 1].detach().float().requires_grad_(True)
            cond = {"text": batch.text["pooled"]}
            with torch.enable_grad():
                if self.tweedie_fn is not None:  # differentiable r(x0_hat(x)): the Tweedie part of grad V
                    cond["tweedie"] = self.tweedie_fn(k + 1, x, batch)
                elif "tweedie" in batch.step_data:
                    tw = batch.step_data["tweedie"]
                    cond["tweedie"] = tw[k + 1] if k + 1 < tw.shape[0] else rewards.float()
                v = self.value_model(float(self.kernel.taus[k + 1]), x, cond)
                (g,) = torch.autograd.grad(v.sum(), x)
            out.append(g.detach())
        return torch.stack(out)

    def step_loss(self, batch, k):
        tr, s = self.cfg.train, self.steps_scale
        if tr.estimator == "value_gradient":
            return self._value_gradient_step(batch, k)
        terms = self.step_terms(batch, k)
        ratio = torch.exp(terms["log_prob"] - terms["old_log_prob"])
        w = torch.tensor([self.kernel.weights(self.kl_form)[k]], dtype=ratio.dtype, device=ratio.device)
        sur = likelihood_ratio_surrogate(
            ratio[None], batch.step_data["adv"][k][None], terms["kl"][None], tr.beta
        )
        pkl = policy_path_kl(terms["action"][None], terms["old_action"][None], w, 1.0)
        actor = s * (-sur.mean() + tr.kl_penalty * pkl.mean())
        return {
            **self._actor_critic_terms(actor, batch, k, terms),
            "kl_to_old": s * pkl.detach().mean(),
            "ratio_dev": (ratio.detach() - 1).abs().mean() / batch.num_steps,
        }

    def _value_gradient_step(self, batch, k):
        r"""R4/R8 on the kernel: :func:`trust_region_surrogate` with :math:`c = \lambda_k` (the kernel's slope, so
        :math:`c(a'-a)\cdot p_k` is the first-order change of :math:`E V_{k+1}`), :math:`w` the regulariser's
        weight and :math:`d\tau = 1` (both weights are per step); the same function the toy tests verify."""
        tr, s = self.cfg.train, self.steps_scale
        terms = self.step_terms(batch, k)
        a = terms["action"]
        c, w = (torch.tensor([v], dtype=a.dtype, device=a.device) for v in
                (self.kernel.slope(k), self.kernel.weights(self.kl_form)[k]))
        ref = batch.ref_actions[k] if batch.ref_actions is not None else terms["old_action"]
        sur = trust_region_surrogate(a[None], terms["old_action"][None], ref[None],
                                     batch.step_data["costate"][k][None].to(a.dtype), c, 1.0, tr.beta, tr.kl_penalty,
                                     kl_weight=w)
        pkl = policy_path_kl(a[None], terms["old_action"][None], w, 1.0)
        return {**self._actor_critic_terms(-s * sur.mean(), batch, k, terms), "kl_to_old": s * pkl.detach().mean()}


class DDPOScoreFunction(Method):
    r"""``ddpo_sf``: REINFORCE, :math:`\sum_k A\log\pi_\theta(x_{k+1}|x_k)`, per-prompt normalised returns
    (:meth:`path_return`) as advantages, no clipping."""

    name = "ddpo_sf"

    @property
    def needs_reference(self) -> bool:
        return self.cfg.train.beta > 0

    def path_return(self, batch, rewards):
        r"""DDPO's return, as on the toys: :math:`R - \beta\sum_k\lambda_k` with the sampled log-ratios
        (:func:`sa_theory.estimators.sampled_kl_return`); ``train.beta = 0`` is original DDPO (the reward)."""
        beta = self.cfg.train.beta
        return rewards if beta == 0 else sampled_kl_return(rewards, batch.sampled_log_ratio.to(rewards), beta)

    def prepare(self, batch, rewards):
        batch.path_data["adv"] = self._clip_adv(rewards)  # rewards are already per-prompt normalised
        return {}

    def step_loss(self, batch, k):
        terms = self.step_terms(batch, k)
        lp, old = terms["log_prob"], terms["old_log_prob"]
        sur = likelihood_ratio_surrogate(lp[None], batch.path_data["adv"], torch.zeros_like(lp[None]), 0.0)
        return self._policy_terms(-self.steps_scale * sur.mean(), batch, terms, lp, old)

    def _policy_terms(self, loss, batch, terms, lp, old, clip: float | None = None) -> dict:
        """``loss`` and the logged diagnostics of a ratio method: its actor loss, the KL to the pretrained model,
        the mean |ratio - 1| and (``clip``) the fraction of clipped ratios, per step of the path."""
        ratio = torch.exp(lp.detach() - old)
        out = {"loss": loss, "actor_loss": loss.detach(), "ratio_dev": (ratio - 1).abs().mean() / batch.num_steps,
               "kl_to_pretrained": self.steps_scale * terms["kl"].detach().mean()}
        if clip is not None:
            out["clipfrac"] = ((ratio - 1).abs() > clip).float().mean() / batch.num_steps
        return out


class DDPOImportanceSampling(DDPOScoreFunction):
    """``ddpo_is``: per-step PPO-clip on summed log-probs, per-prompt normalised advantages, no KL
    (``prepare`` as DDPO-SF: the normalised rewards are the advantages)."""

    name = "ddpo_is"

    def step_loss(self, batch, k):
        terms, clip = self.step_terms(batch, k), self.cfg.train.clip_range
        lp, old = terms["log_prob"], terms["old_log_prob"]
        sur = ppo_clip_surrogate(lp[None], old[None], batch.path_data["adv"], clip)
        return self._policy_terms(-self.steps_scale * sur.mean(), batch, terms, lp, old, clip)


class DPOK(Method):
    """``dpok``: per-step KL regulariser + learned value baseline of the state, clamped ratio."""

    name = "dpok"

    def prepare(self, batch, rewards):
        batch.path_data["R"] = rewards
        batch.step_data["V"] = self.all_values(batch)
        batch.step_data["v_target"] = mc_value_targets(rewards, torch.zeros_like(batch.log_probs), 0.0)
        return {}

    def step_loss(self, batch, k):
        tr, s = self.cfg.train, self.steps_scale
        terms = self.step_terms(batch, k)
        ratio = torch.exp(terms["log_prob"] - terms["old_log_prob"]).clamp(
            1 - tr.ratio_clamp, 1 + tr.ratio_clamp
        )
        R, V = batch.path_data["R"], batch.step_data["V"][k]
        if tr.adv_clip_max > 0:  # clip the advantage R - V, as the other methods do
            V = R - self._clip_adv(R - V)
        sur = dpok_surrogate(ratio[None], R, V[None], terms["kl"][None], tr.beta)
        return self._actor_critic_terms(-s * sur.mean(), batch, k, terms)


class FlowGRPO(DDPOScoreFunction):
    r"""``flow_grpo``: Flow-GRPO (Liu et al. 2025) in this harness: group-normalised rewards as advantages (the
    trainer samples ``sample.group_size`` images per prompt and standardises within each prompt's group),
    per-step PPO-clip (:func:`ppo_clip_surrogate`) and a per-step KL penalty :math:`\beta\,KL_k` to the
    pretrained model.

    Units (``train.logprob_units``): ``"sum"`` (default, ours) -- log-probs summed over latent dimensions and the
    kernel's exact per-step KL (``train.kl_weighting``); ``"mean"`` -- Flow-GRPO's own: log-probs averaged over
    dimensions (so the clip range acts on a per-dimension ratio) and their KL
    :math:`|m_\theta - m_{ref}|^2/(2 D\,\sigma_t^2)` with :math:`\sigma_t = \mathrm{std}_k/\sqrt{d\tau_k}`, i.e.
    the chain KL times :math:`d\tau_k / D` (no :math:`1/d\tau`, averaged over dimensions), to reproduce its
    published behaviour."""

    name = "flow_grpo"

    def path_return(self, batch, rewards):
        """Flow-GRPO keeps its KL as a per-step penalty in the loss, not in the return."""
        return rewards

    def step_loss(self, batch, k):
        tr, s, kern = self.cfg.train, self.steps_scale, self.kernel
        terms = self.step_terms(batch, k)
        lp, old, kl = terms["log_prob"], terms["old_log_prob"], terms["kl"]
        if tr.logprob_units == "mean":
            D = batch.latents[k][0].numel()
            lp, old = lp / D, old / D
            if batch.ref_actions is not None:
                dtau = float(kern.taus[k + 1] - kern.taus[k])
                kl = kern.step_kl(k, terms["action"], batch.ref_actions[k], "chain") * dtau / D
        sur = ppo_clip_surrogate(lp[None], old[None], batch.path_data["adv"], tr.clip_range)
        return self._policy_terms(s * (-sur.mean() + tr.beta * kl.mean()), batch, terms, lp, old, tr.clip_range)


METHOD_CLASSES: dict[str, Callable[..., Method]] = {
    "sa_ac": SAActorCritic,
    "ddpo_sf": DDPOScoreFunction,
    "ddpo_is": DDPOImportanceSampling,
    "dpok": DPOK,
    "flow_grpo": FlowGRPO,
}


def make_method(cfg, env, model, value_model=None) -> Method:
    """The method of ``cfg.train.method`` on the image environment ``env`` with policy network ``model``."""
    name = cfg.train.method
    if name not in METHOD_CLASSES:
        raise ValueError(f"train.method: unknown method {name!r}; choose one of {sorted(METHOD_CLASSES)}")
    return METHOD_CLASSES[name](cfg, env, model, value_model)
