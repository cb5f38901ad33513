"""What a trainer sees of a fine-tuning problem (:class:`Environment`), a rollout batch (:class:`Batch`) and
the training / evaluation solvers (:data:`SOLVERS`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sde import ActionFn, ControlledSDE

__all__ = ["Environment", "Batch", "SOLVERS", "solver_kwargs"]

#: training / evaluation solvers: name -> (backend, method, ode)
SOLVERS = {
    "euler": ("native", "euler", False),
    "heun": ("native", "heun", False),
    "tsde_euler": ("torchsde", "euler", False),
    "milstein": ("torchsde", "milstein", False),
    "srk": ("torchsde", "srk", False),
    "ode": ("native", "heun", True),  # probability-flow ODE (Heun = second order); evaluation only
    "ode_euler": ("native", "euler", True),
}


def solver_kwargs(name: str) -> tuple[str, str, bool]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(SOLVERS)}")
    return SOLVERS[name]


@dataclass
class Environment:
    """A fine-tuning problem as the trainers see it (no toy or image specifics).

    sde: the controlled sampler SDE (schedule); the ODE variant is derived for evaluation.
    pretrained_action: :math:`s_\\text{pre}(T-\\tau, y, c)` as an ``ActionFn``.
    reward: ``reward(x, cond) -> (B,)`` terminal reward (one call on B paths = B reward queries).
    initial_sample: ``initial_sample(n, generator, dtype) -> (n, *event)`` draws of :math:`Y_0`.
    cond_sample: ``cond_sample(n, generator) -> cond`` or ``None`` (unconditional).
    reward_differentiable: whether ``reward`` can be differentiated (informational for estimators).
    """

    sde: ControlledSDE
    pretrained_action: ActionFn
    reward: Callable[[torch.Tensor, Any], torch.Tensor]
    initial_sample: Callable[[int, torch.Generator, torch.dtype], torch.Tensor]
    cond_sample: Callable[[int, torch.Generator], Any] | None = None
    reward_differentiable: bool = True
    name: str = "env"


@dataclass
class Batch:
    """One rollout batch (everything detached). Shapes: ``taus (N+1,)``, ``states (N+1, B, *event)``,
    ``means``/``ref_actions`` ``(N, B, *event)``, ``kl_steps``/``log_probs``/``ref_log_probs`` ``(N, B)``,
    ``reward``/``path_kl`` ``(B,)``."""

    taus: torch.Tensor
    states: torch.Tensor
    means: torch.Tensor
    ref_actions: torch.Tensor
    kl_steps: torch.Tensor
    reward: torch.Tensor
    cond: Any = None
    log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    generator: torch.Generator | None = None
    extras: dict = field(default_factory=dict)

    @property
    def path_kl(self) -> torch.Tensor:
        return self.kl_steps.sum(0)

    @property
    def dtau(self) -> float:
        return float(self.taus[1] - self.taus[0])

    @property
    def batch_size(self) -> int:
        return self.reward.shape[0]
