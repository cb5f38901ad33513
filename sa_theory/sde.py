r"""The sampler as a controlled SDE whose action is the score (theory.md §1).

In sampler time :math:`\tau \in [0, T]` (``tau = 0`` noise, ``tau = T`` data), with
:math:`f(\tau) := f(T-\tau)` and :math:`g(\tau) := g(T-\tau)` read off the forward schedule,

.. math::  dY_\tau = \big[-f\,Y_\tau + g^2\,a_\tau\big]\,d\tau + g\,dB_\tau            \qquad\text{(SDE)}

.. math::  dY_\tau = \big[-f\,Y_\tau + \tfrac12 g^2\,a_\tau\big]\,d\tau  \qquad\text{(probability-flow ODE)}

The pretrained sampler uses :math:`a = s_\text{pre}(T-\tau, Y)`. A *policy* is any callable
``mean(tau, y, cond) -> action`` with ``action.shape == y.shape``; ``tau`` is a 0-dim tensor of ``y``'s
dtype and device, ``y`` is batched ``(batch, *event_shape)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .schedules import Schedule

__all__ = ["ControlledSDE", "ActionFn", "score_as_action", "check_finite"]

ActionFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Raise ``FloatingPointError`` naming ``name`` if ``x`` has a NaN or Inf entry."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise FloatingPointError(f"{name} has {bad} non-finite (NaN/Inf) entries")
    return x


def score_as_action(score: Callable[[Any, torch.Tensor, Any], torch.Tensor], schedule: Schedule) -> ActionFn:
    """Turn a score model ``score(t, x, cond)`` in diffusion time into an action ``a(tau, y, cond)``.

    :math:`a(\\tau, y, c) = s(T - \\tau, y, c)`.
    """

    def action(tau: torch.Tensor, y: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return score(schedule.T - tau, y, cond)

    return action


@dataclass(frozen=True)
class ControlledSDE:
    """Drift and diffusion of the controlled sampler for a given schedule.

    ``ode=True`` gives the probability-flow ODE (drift :math:`-fY + \\frac12 g^2 a`, no noise).
    """

    schedule: Schedule
    ode: bool = False

    @property
    def T(self) -> float:
        return self.schedule.T

    @property
    def action_gain(self) -> float:
        """Coefficient of :math:`g^2 a` in the drift: 1 for the SDE, 1/2 for the ODE."""
        return 0.5 if self.ode else 1.0

    def drift(self, tau: torch.Tensor, y: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """:math:`-f(T-\\tau)\\,y + c\\,g^2(T-\\tau)\\,a` with :math:`c` = ``action_gain``."""
        return -self.schedule.f_tau(tau) * y + self.action_gain * self.schedule.g2_tau(tau) * action

    def diffusion(self, tau: torch.Tensor) -> torch.Tensor:
        """:math:`g(T-\\tau)` (0 for the ODE)."""
        g = self.schedule.g2_tau(tau).sqrt()
        return g * 0.0 if self.ode else g

    def g2(self, tau: torch.Tensor) -> torch.Tensor:
        """:math:`g^2(T-\\tau)`, the weight of the Girsanov KL integrand (independent of ``ode``)."""
        return self.schedule.g2_tau(tau)
