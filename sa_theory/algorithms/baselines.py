r"""The discrete-time baselines on the toy problems (theory.md §4): DDPO-SF, DDPO-IS, DPOK, trained by
:class:`MethodTrainer` through the **same method implementations as on images** (:mod:`.methods`).

All three treat the ``N``-step Euler-Maruyama chain as an MDP whose policy is the Gaussian transition
:math:`\pi_\theta(Y_{k+1}|Y_k) = N(Y_k + b(\tau_k, Y_k, \mu_\theta) d\tau, \sigma_k^2 d\tau I)`, the
:class:`~sa_theory.kernels.EulerKernel` of the environment's SDE on the trainer's grid
(:class:`~.step_env.ToyStepEnvironment`),
and so need ``solver="euler"``. For a fair comparison on the same objective :math:`J`, DDPO-SF and DDPO-IS put the
**sampled log-ratio KL** :math:`\sum_k \log\frac{\pi_\theta}{\pi_\text{pre}}(Y_{k+1}|Y_k)` into the return
(original DDPO has no KL: set ``beta=0``), standardised over the batch (``normalize_advantages``; the toys have no
prompts). DPOK keeps its per-step KL regulariser outside the return, as published.

Per iteration: the method's return, its normalisation, (DPOK) ``value_epochs`` Adam steps of the value baseline
regressed on :math:`R` at random grid times, ``prepare``, then ``epochs`` gradient steps (DDPO-IS; one for the
others), each the sum over ``grad_accum`` micro-batches of the method's loss over all steps.
"""

from __future__ import annotations

import torch

from .method_base import MethodConfig
from .methods import make_method
from .step_env import rollout_batch, values_on_grid
from .trainer import Batch, Trainer

__all__ = ["MethodTrainer"]


class MethodTrainer(Trainer):
    """DDPO-SF / DDPO-IS / DPOK on a toy environment (module docstring); ``cfg.algo`` names the method."""

    def _init_extra(self) -> None:
        if self.cfg.solver != "euler":
            raise ValueError(f"{self.cfg.algo} is a discrete-time (Euler-chain) method: use solver='euler', "
                             f"got {self.cfg.solver!r}")
        self.value_optimizer = None
        if self.cfg.algo == "dpok":
            if self.value is None:
                raise ValueError("DPOK needs a value baseline: pass value=... (e.g. sa_theory.value.MLPValue)")
            self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=self.cfg.value_lr)

    def method_for(self, batch: Batch, beta: float):
        """The shared method (:func:`~.methods.make_method`) on this batch's grid, at KL weight ``beta``; the critic is
        fitted here (``value_coef = 0``), advantages are not clamped (``adv_clip_max = 0``)."""
        cfg = MethodConfig.take(self.cfg, method=self.cfg.algo, beta=beta, adv_clip_max=0.0, value_coef=0.0)
        return make_method(cfg, self.step_environment(batch), self.policy, self.value)

    def extra_state(self) -> dict:
        return {} if self.value_optimizer is None else {"value_optimizer": self.value_optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.value_optimizer is not None:
            self.value_optimizer.load_state_dict(state["value_optimizer"])

    def fit_baseline(self, batch: Batch) -> float:
        """DPOK's value baseline: ``value_epochs`` Adam steps regressing :math:`V(\\tau_k, Y_k)` on the terminal
        reward at a random subset of ``max(1, value_batch // B)`` grid times; returns the last loss."""
        N, B = batch.taus.numel() - 1, batch.batch_size
        vloss = torch.zeros(())
        n_t = min(N, max(1, self.cfg.value_batch // B))
        for _ in range(self.cfg.value_epochs):
            idx = torch.randperm(N, generator=batch.generator)[:n_t]
            v = values_on_grid(self.value, batch.taus[idx], batch.states[idx], batch.cond)
            vloss = ((v - batch.reward[None]) ** 2).mean()
            self.value_optimizer.zero_grad(set_to_none=True)
            vloss.backward()
            self.value_optimizer.step()
        return vloss.item()

    def update(self, batch: Batch) -> dict:
        cfg, B = self.cfg, batch.batch_size
        method = self.method_for(batch, self.beta_at(self.iteration))
        rb = rollout_batch(batch)
        ret = method.path_return(rb, batch.reward)
        if getattr(cfg, "normalize_advantages", False):
            ret = (ret - ret.mean()) / (ret.std() + 1e-8)
        metrics = {}
        if self.value_optimizer is not None:
            metrics["value_loss"] = self.fit_baseline(batch)
        metrics.update(method.prepare(rb, ret.detach()))
        sums: dict[str, float] = {}
        for _ in range(getattr(cfg, "epochs", 1)):
            sums = {}
            for paths in self.chunks(B):
                out = method.losses(rb.select(paths))
                (out["loss"] * (paths.numel() / B)).backward()
                for name, v in out.items():
                    sums[name] = sums.get(name, 0.0) + float(v.detach()) * paths.numel() / B
            metrics["grad_norm"] = self.policy_step()
        metrics.update({k: v for k, v in sums.items() if k != "loss"})  # the last epoch's, batch means
        return metrics
