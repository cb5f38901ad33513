r"""What every RL method shares (:class:`Method`) and the method part of a config (:class:`MethodConfig`).

A method trains a policy on a recorded :class:`~.rl_batch.RolloutBatch` of any **step environment**: an object
with ``kernel`` (a :class:`~sa_theory.kernels.GaussianKernel`), ``action(k, x, text, model)`` (the policy's
action at step ``k``, differentiable in ``model``'s parameters) and ``value_cond(batch, k, tweedie=None)`` (the
value model's conditioning); optionally ``grid_actions(ks, states, text, model, ref_actions)`` (the actions of
several steps in one call, ``(n, B, *event)``) and ``grid_values(value_model, batch)`` (``(K, B)``). The image
environments (:mod:`t2i.environments`: one network call per step, or with ``grid_actions`` one call on the steps'
stacked states) and the toy problems (:mod:`.step_env`, one batched call over the grid) both are.

The interface: ``path_return(batch, R)`` (the per-path quantity a trainer may normalise), ``prepare(batch, R)``
(advantages, value targets; returns metrics) and ``losses(batch, steps) -> dict`` with ``"loss"`` to minimise.
Units: per-step log-probs and KLs are **summed over dimensions** (nats per step); a path KL is their sum over
steps (nats per path). Each loss is a **sum over steps, mean over paths** of a per-path surrogate; the
diagnostics are sums over the given steps of per-step means over paths (so summing calls over disjoint step
sets gives the all-steps value). ``steps_scale`` = K / #steps trained rescales a random subset of steps so the
sum stays unbiased.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from ..value import value_regression_loss
from .rl_batch import RolloutBatch

__all__ = ["MethodConfig", "Method", "ValueFitting"]


@dataclass
class MethodConfig:
    """The method part of a run's config: one set of names for toys and images (the image CLI's ``train.*`` /
    ``value.*`` fields of the same names, :meth:`take`)."""

    method: str = "sa_ac"
    beta: float = 0.01  # KL weight of J = E r - beta KL(P_theta || P_pre), nats per path
    kl_weighting: str = "chain"  # the regulariser's per-step KL: "chain" (exact, w_k) | "continuous" (Girsanov)
    kl_penalty: float = 1.0  # sa_ac: weight of the path KL to the old policy (trust region)
    max_path_kl: float | None = None  # sa_ac: paths whose KL to the old policy (over one losses call) exceeds it
    #                                   give no gradient to the KL terms (toys, all steps per call; None on images)
    lr_coef: float = 0.0  # sa_ac value_gradient: weight of an added importance-weighted advantage term
    clip_range: float = 1e-4  # ddpo_is / flow_grpo: PPO clip range of per-step ratios
    ratio_clamp: float = 1e-4  # dpok: per-step ratio clamped to [1 - c, 1 + c]
    adv_clip_max: float = 5.0  # clamp advantages to [-c, c] (0: no clamp)
    advantage: str = "value"  # sa_ac: "value" (reward-to-go minus V) | "td"
    estimator: str = "likelihood_ratio"  # sa_ac: "likelihood_ratio" (R5) | "value_gradient" (R4/R8)
    logprob_units: str = "sum"  # flow_grpo: "sum" (ours) | "mean" (Flow-GRPO's per-dimension units)
    value_loss: str = "mc"  # critic targets: "mc" | "td"
    value_coef: float = 1.0  # weight of the critic loss inside "loss" (0: the critic is fitted elsewhere)

    @classmethod
    def take(cls, *sources, **values) -> MethodConfig:
        """Each field from ``values``, else from the first source with an attribute of that name, else the
        default (e.g. ``MethodConfig.take(cfg.train, value_loss=cfg.value.loss, value_coef=cfg.value.coef)``)."""
        kw = {}
        for f in fields(cls):
            if f.name in values:
                kw[f.name] = values[f.name]
                continue
            for src in sources:
                if hasattr(src, f.name):
                    kw[f.name] = getattr(src, f.name)
                    break
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"MethodConfig has no field(s) {sorted(unknown)}")
        return cls(**kw)


class Method:
    """Base: holds the step environment (its kernel and action), the (possibly DDP-wrapped) policy network, the
    value model and the :class:`MethodConfig`."""

    name = "method"

    def __init__(self, cfg: MethodConfig, env, model, value_model=None):
        if not isinstance(cfg, MethodConfig):
            raise TypeError(f"'cfg' must be a MethodConfig, got {type(cfg).__name__}")
        self.cfg, self.env, self.kernel, self.model, self.value_model = cfg, env, env.kernel, model, value_model
        self.kl_form = cfg.kl_weighting  # "continuous" | "chain": the regulariser's per-step KL weight
        self.steps_scale = 1.0
        self._logprob_delta = 0.0
        self.tweedie_fn = None  # (k, x, batch) -> r(decode(x0_hat_k(x))), differentiable in x (value_gradient)
        #: the critic's separate fitting phase, ``fit(method, batch) -> metrics`` (set by a task whose critic is
        #: fitted "separate"ly; None: "joint", the critic loss inside "loss" with weight ``value_coef``): ``prepare``
        #: calls it once the targets are in ``batch.step_data["v_target"]`` and computes the advantages and
        #: costates from the fitted critic
        self.value_fitter = None

    @property
    def needs_reference(self) -> bool:
        """Whether the method's loss uses the pretrained model's actions (then rollouts record them)."""
        return True

    def path_return(self, batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
        """The per-path quantity a trainer normalises (per prompt / group / batch) before :meth:`prepare`."""
        return rewards

    # -- shared pieces
    def policy_actions(self, batch: RolloutBatch, ks: list[int]) -> torch.Tensor:
        """The current policy's actions at the recorded states ``x_k``, ``k`` in ``ks``: ``(n, B, *event)``."""
        grid = getattr(self.env, "grid_actions", None)
        if grid is not None:
            ref = None if batch.ref_actions is None else batch.ref_actions[ks]
            return grid(ks, batch.latents[ks].detach(), batch.text, self.model, ref)
        return torch.stack([self.env.action(k, batch.latents[k].detach(), batch.text, self.model) for k in ks])

    def step_terms(self, batch: RolloutBatch, ks: list[int]) -> dict[str, torch.Tensor]:
        """At the steps ``ks``: log-prob, old log-prob (``None`` if the batch has no log-probs), KL to the pretrained
        model ``(n, B)``; action, old action ``(n, B, *event)``."""
        kern = self.kernel
        actions = self.policy_actions(batch, ks)
        out = {"log_prob": None, "old_log_prob": None, "action": actions, "old_action": batch.actions[ks]}
        if batch.log_probs is not None:  # None: a rollout without transition densities (toys' Heun / torchsde)
            out["log_prob"] = kern.grid_log_probs(ks, batch.latents[ks].detach(),
                                                  batch.latents[[k + 1 for k in ks]].detach(), actions)
            out["old_log_prob"] = batch.log_probs[ks]
            # on-policy parity: recomputed vs rollout log-prob (0 up to float noise before the first update)
            delta = (out["log_prob"].detach() - out["old_log_prob"]).abs().max()
            self._logprob_delta = max(self._logprob_delta, float(delta))
        if batch.ref_actions is not None:
            out["kl"] = kern.grid_step_kls(ks, actions, batch.ref_actions[ks], self.kl_form)
        else:
            out["kl"] = actions.new_zeros(actions.shape[:2])
        return out

    def weights(self, ks: list[int], like: torch.Tensor, which: str = "kl") -> torch.Tensor:
        """Per-step kernel numbers at ``ks`` as a tensor like ``like``: the regulariser's KL weights ``w_k``
        (``"kl"``) or the slopes ``lambda_k`` (``"slope"``)."""
        arr = self.kernel.weights(self.kl_form) if which == "kl" else self.kernel.slopes
        return torch.tensor([float(arr[k]) for k in ks], dtype=like.dtype, device=like.device)

    def kl_steps(self, batch: RolloutBatch) -> torch.Tensor:
        """The regulariser's recorded per-step KLs to the pretrained model, ``(K, B)`` (0 if not recorded)."""
        kl = batch.kl_steps_of(self.kl_form)
        return kl if kl is not None else torch.zeros_like(batch.log_probs)

    def value_cond(self, batch: RolloutBatch, k: int):
        tw = batch.step_data.get("tweedie")
        return self.env.value_cond(batch, k, None if tw is None else tw[k])

    def values(self, batch: RolloutBatch, k: int) -> torch.Tensor:
        return self.value_model(float(self.kernel.taus[k]), batch.latents[k].detach(), self.value_cond(batch, k))

    @torch.no_grad()
    def all_values(self, batch: RolloutBatch) -> torch.Tensor:
        """:math:`V(\\tau_k, x_k)` for ``k < K``, ``(K, B)``: the environment's ``grid_values`` if it has one (in the
        value model's dtype), else one call per step (float32)."""
        grid = getattr(self.env, "grid_values", None)
        if grid is not None:
            return grid(self.value_model, batch)
        return torch.stack([self.values(batch, k).float() for k in range(batch.num_steps)])

    def critic_loss(self, batch: RolloutBatch, k: int, coef: float | None = None) -> torch.Tensor:
        """``coef`` (default ``value_coef``) times the mean over paths of :math:`(V(\tau_k, x_k) - y_k)^2` with the
        targets ``y = batch.step_data["v_target"]`` (reward units squared; 0 without a trainable value model)."""
        coef = self.cfg.value_coef if coef is None else coef
        if not self._trains_critic(coef):
            return torch.zeros((), device=batch.latents.device)
        v = self.values(batch, k)
        return value_regression_loss(v[None], batch.step_data["v_target"][k][None]) * coef

    def _trains_critic(self, coef: float) -> bool:
        """Whether a critic loss of weight ``coef`` has a trainable value model to train."""
        return coef != 0 and self.value_model is not None and any(
            p.requires_grad for p in self.value_model.parameters())

    def fit_values(self, batch: RolloutBatch) -> dict[str, float]:
        """The separate critic phase, if a task set :attr:`value_fitter` (else nothing)."""
        return {} if self.value_fitter is None else self.value_fitter(self, batch)

    def _clip_adv(self, adv: torch.Tensor) -> torch.Tensor:
        c = self.cfg.adv_clip_max
        return adv.clamp(-c, c) if c > 0 else adv

    def _actor_critic_terms(self, actor: torch.Tensor, batch: RolloutBatch, ks: list[int], terms: dict) -> dict:
        """``loss`` = actor + the steps' share of the critic loss, and their logged parts."""
        s = self.steps_scale
        if self._trains_critic(self.cfg.value_coef):
            critic = sum(s * self.critic_loss(batch, k) / batch.num_steps for k in ks)
        else:  # no per-step zeros to add up
            critic = torch.zeros((), device=batch.latents.device)
        return {"loss": actor + critic, "actor_loss": actor.detach(), "critic_loss": critic.detach(),
                "kl_to_pretrained": s * terms["kl"].detach().mean(1).sum()}

    def _policy_terms(self, loss, batch, terms, lp, old, clip: float | None = None) -> dict:
        """``loss`` and the logged diagnostics of a ratio method: its actor loss, the KL to the pretrained model,
        the mean |ratio - 1| and (``clip``) the fraction of clipped ratios, per step of the path."""
        ratio = torch.exp(lp.detach() - old)
        out = {"loss": loss, "actor_loss": loss.detach(),
               "ratio_dev": (ratio - 1).abs().mean(1).sum() / batch.num_steps,
               "kl_to_pretrained": self.steps_scale * terms["kl"].detach().mean(1).sum()}
        if clip is not None:
            out["clipfrac"] = ((ratio - 1).abs() > clip).float().mean(1).sum() / batch.num_steps
        return out

    # -- interface
    def prepare(self, batch: RolloutBatch, rewards: torch.Tensor) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def step_loss(self, batch: RolloutBatch, ks: list[int], terms: dict) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def losses(self, batch: RolloutBatch, steps: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The per-step losses summed over ``steps`` (default all); ``"loss"`` is what to minimise. The steps are
        evaluated together (one ``grid_actions`` call where the environment has it). Under DDP a backward pass may
        follow one network forward only: one step per call, or several through the environment's ``grid_actions``."""
        ks = list(range(batch.num_steps)) if steps is None else [int(k) for k in steps]
        if not ks:
            raise ValueError("'steps' is empty")
        self._logprob_delta = 0.0
        return self.step_loss(batch, ks, self.step_terms(batch, ks))

    def logprob_delta(self) -> float:
        """max |recomputed - rollout log-prob| (nats, summed over dims) over the steps of the last :meth:`losses`
        call: the log-prob parity check, 0 up to float noise while the policy equals the sampling policy."""
        return self._logprob_delta


class ValueFitting:
    r"""A method's critic regression as the "method" of :meth:`~.trainer.Trainer.update`: the separate critic phase
    (``value.fit = "separate"``) is an update pass of the one trainer whose loss is the critic's alone.

    ``losses(batch, steps)["loss"]`` = ``steps_scale`` x :math:`\sum_{k \in steps}` :meth:`Method.critic_loss`
    (weight 1) / K, so the calls over a minibatch's steps add up to the mean over steps of the per-step mean squared
    error (the joint loss's critic term with ``value_coef = 1``); also logged as ``value_loss``."""

    def __init__(self, method: Method):
        self.method, self.steps_scale = method, 1.0

    def losses(self, batch: RolloutBatch, steps: Sequence[int]) -> dict[str, torch.Tensor]:
        loss = sum(self.steps_scale * self.method.critic_loss(batch, int(k), coef=1.0) / batch.num_steps
                   for k in steps)
        return {"loss": loss, "value_loss": loss.detach()}

    def logprob_delta(self) -> float:
        return 0.0
