r"""The toy problems as a **step environment** of the RL methods (:mod:`.method_base`): the Euler-Maruyama kernel of
the environment's SDE on the trainer's grid, the policy as the action (one batched call over the grid), the toy
rollout :class:`~.environment.Batch` as a :class:`~.rl_batch.RolloutBatch`, and critics evaluated on the grid."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..kernels import EulerKernel
from ..value import MLPValue, ResidualValue
from .environment import Batch
from .policies import grid_means
from .rl_batch import RolloutBatch

__all__ = ["values_on_grid", "ToyStepEnvironment", "rollout_batch"]


def values_on_grid(value: nn.Module, taus: torch.Tensor, states: torch.Tensor, cond=None) -> torch.Tensor:
    r""":math:`V(\tau_k, Y_k)` for every row of ``taus (n,)`` / ``states (n, B, *event)``: ``(n, B)``.
    Differentiable in the critic's parameters and in ``states`` (one batched call for :class:`MLPValue`)."""
    n, B = states.shape[:2]
    if isinstance(value, MLPValue) and cond is None:
        tau_rows = taus[:, None].expand(n, B).reshape(-1)
        return value(tau_rows, states.reshape(n * B, *states.shape[2:])).reshape(n, B)
    if isinstance(value, ResidualValue) and isinstance(value.net, MLPValue) and cond is None and states.dim() == 3:
        return value.grid_values(taus, states)
    return torch.stack([value(taus[k], states[k], cond) for k in range(n)])


class ToyStepEnvironment:
    """A toy :class:`~.environment.Environment` as a step environment (:mod:`.method_base`): the Euler kernel of its
    SDE on ``taus``, the policy ``model(tau, y, cond)`` as the action (one batched call over the grid through
    :func:`~.policies.grid_means`), the condition under ``text["cond"]``."""

    def __init__(self, env, taus: torch.Tensor):
        self.sde, self.taus = env.sde, taus
        self.kernel = EulerKernel(env.sde, taus.detach().cpu().numpy().astype(np.float64))

    def action(self, k, x, text, model):
        return model(self.taus[k], x, text.get("cond"))

    def grid_actions(self, ks, states, text, model, ref_actions=None):
        return grid_means(model, self.taus[ks], states, text.get("cond"), ref_actions)

    def value_cond(self, batch, k, tweedie=None):
        return batch.text.get("cond")

    def grid_values(self, value, batch):
        K = batch.num_steps
        return values_on_grid(value, self.taus[:K], batch.latents[:K], batch.text.get("cond"))


def rollout_batch(batch: Batch) -> RolloutBatch:
    """The toy trainer's :class:`~.environment.Batch` as the methods' :class:`~.rl_batch.RolloutBatch` (no copy)."""
    cond = batch.cond if torch.is_tensor(batch.cond) else None
    return RolloutBatch([""] * batch.batch_size, {"cond": cond}, batch.states, batch.means, batch.log_probs,
                        batch.ref_actions, batch.kl_steps, None, ref_log_probs=batch.ref_log_probs,
                        rewards=batch.reward)
