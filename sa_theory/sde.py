r"""The sampler as a controlled SDE whose action is the score: the noise-level family (theory.md §1, §5).

In sampler time :math:`\tau \in [0, T]` (``tau = 0`` noise, ``tau = T`` data), with
:math:`f := f(T-\tau)` and :math:`g := g(T-\tau)` read off the forward schedule and a noise level
:math:`\eta(\tau) \ge 0`,

.. math::  dY_\tau = \Big[-f\,Y_\tau + \tfrac{1+\eta}{2}\, g^2\,a_\tau\Big]\,d\tau + \sqrt{\eta}\,g\,dB_\tau .

``eta = 1`` is the reverse SDE of §1, ``eta = 0`` the probability-flow ODE; every member with the exact
score as its action has the data's marginals :math:`p_{T-\tau}`. Two samplers of the family with the same
:math:`\eta` and actions :math:`a, a'` differ in drift by :math:`\tfrac{1+\eta}{2}g^2(a - a')`, so by
Girsanov their path KL rate is

.. math::  \frac{(1+\eta)^2}{8\eta}\, g^2\, |a - a'|^2 \quad\text{nats per unit } \tau \text{ (summed over dims)},

i.e. :math:`\tfrac12 w |a-a'|^2` with the **KL weight rate** :math:`w = \frac{(1+\eta)^2}{4\eta} g^2`
(:meth:`ControlledSDE.kl_weight_rate`; :math:`w = g^2` at :math:`\eta = 1`, infinite at :math:`\eta = 0`).

The pretrained sampler uses :math:`a = s_\text{pre}(T-\tau, Y)`. A *policy* is any callable
``mean(tau, y, cond) -> action`` with ``action.shape == y.shape``; ``tau`` is a 0-dim tensor of ``y``'s
dtype and device, ``y`` is batched ``(batch, *event_shape)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .schedules import Schedule

__all__ = ["ControlledSDE", "ActionFn", "NoiseFn", "check_finite"]

ActionFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Raise ``FloatingPointError`` naming ``name`` if ``x`` has a NaN or Inf entry. A finite sum proves every entry
    finite (a NaN or an Inf entry makes the sum NaN or infinite), which costs one reduction in the hot loops; only a
    non-finite sum, which an overflow of finite entries can also give, is checked entry by entry."""
    if x.numel() and math.isfinite(x.detach().sum().item()):
        return x
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise FloatingPointError(f"{name} has {bad} non-finite (NaN/Inf) entries")
    return x


def check_reward(r, n: int, name: str, unit: str = "path", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reward call's result checked, for toys and images alike: a tensor of shape ``(n,)`` (one value per ``unit``;
    else ``ValueError``) without NaN/Inf (else ``FloatingPointError``), both naming ``name``; returned detached, a
    floating-point result as it is, an integer or boolean one (e.g. success = 1) as ``dtype``."""
    if not isinstance(r, torch.Tensor) or tuple(r.shape) != (n,):
        got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"{name} must return a tensor of shape ({n},) (one value per {unit}), got {got}")
    r = r.detach()
    return check_finite(name, r if torch.is_floating_point(r) else r.to(dtype))


@dataclass(frozen=True)
class ControlledSDE:
    r"""Drift, diffusion and KL weight of the controlled sampler of noise level ``noise`` (:math:`\eta`).

    ``noise``: a float :math:`\eta \ge 0` or a callable ``tau -> eta(tau)`` (torch tensor in, tensor of the
    same shape out, values :math:`\ge 0`). Default 1: the reverse SDE. ``ode=True`` is the same as
    ``noise=0`` (the probability-flow ODE); after construction ``ode`` is ``True`` exactly when the noise is
    the constant 0. Flow-GRPO's SDE with parameter :math:`a` is ``noise = a**2 / 2``.
    """

    schedule: Schedule
    noise: float | NoiseFn = 1.0
    ode: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"'schedule' must be a sa_theory.schedules.Schedule, got {type(self.schedule).__name__}")
        noise = self.noise
        if callable(noise):
            if self.ode:
                raise ValueError("give either ode=True or a 'noise' function, not both")
            return
        try:
            eta = float(noise)
        except (TypeError, ValueError) as err:
            raise TypeError(f"'noise' must be a float >= 0 or a callable tau -> eta(tau), got {noise!r}") from err
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"'noise' (eta) must be finite and >= 0, got {eta}")
        if self.ode and eta not in (0.0, 1.0):
            raise ValueError(f"ode=True means noise = 0; got noise={eta}")
        eta = 0.0 if self.ode else eta
        object.__setattr__(self, "noise", eta)
        object.__setattr__(self, "ode", eta == 0.0)

    @property
    def T(self) -> float:
        return self.schedule.T

    @property
    def constant_noise(self) -> float | None:
        """:math:`\\eta` if it is a constant, else ``None``."""
        return None if callable(self.noise) else self.noise

    @property
    def action_gain(self) -> float:
        """Constant coefficient :math:`(1+\\eta)/2` of :math:`g^2 a` in the drift (1 for the SDE, 1/2 for the ODE)."""
        if callable(self.noise):
            raise ValueError("'action_gain' is a constant only for a constant 'noise'; use action_coef(tau)")
        return 0.5 * (1.0 + self.noise)

    def eta(self, tau):
        """Noise level :math:`\\eta(\\tau) \\ge 0` (same kind and shape as ``tau``; a float for a float)."""
        if not callable(self.noise):
            return self.noise + 0.0 * tau if isinstance(tau, torch.Tensor | np.ndarray) else self.noise
        if isinstance(tau, torch.Tensor):
            out = torch.as_tensor(self.noise(tau), dtype=tau.dtype, device=tau.device)
        else:
            out = self.noise(torch.as_tensor(np.asarray(tau, dtype=float)))
            out = np.asarray(out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out, dtype=float)
            out = float(out) if np.ndim(tau) == 0 else out
        arr = out.detach() if isinstance(out, torch.Tensor) else torch.as_tensor(out)
        if not bool(torch.isfinite(arr).all()) or bool((arr < 0).any()):
            raise ValueError(f"'noise' function returned a value that is negative or not finite at tau={tau}")
        return out

    def action_coef(self, tau):
        """:math:`\\frac{1+\\eta}{2}\\,g^2(T-\\tau)`, the coefficient of the action in the drift."""
        return (0.5 * (1.0 + self.eta(tau))) * self.schedule.g2_tau(tau)

    def drift_coefs(self, tau):
        """The drift's two coefficients at ``tau``: :math:`(-f(T-\\tau),\\ \\frac{1+\\eta}{2}g^2(T-\\tau))`, so that
        ``drift(tau, y, a) == lin * y + act * a`` bitwise (a kernel on a fixed grid caches them per step)."""
        return -self.schedule.f_tau(tau), self.action_coef(tau)

    def drift(self, tau: torch.Tensor, y: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """:math:`-f(T-\\tau)\\,y + \\frac{1+\\eta}{2}g^2(T-\\tau)\\,a`."""
        lin, act = self.drift_coefs(tau)
        return lin * y + act * action

    def diffusion(self, tau):
        """:math:`\\sqrt{\\eta(\\tau)}\\,g(T-\\tau)` (0 for the ODE)."""
        sqrt = torch.sqrt if isinstance(tau, torch.Tensor) else np.sqrt
        g = sqrt(self.schedule.g2_tau(tau))
        if self.ode:
            return g * 0.0
        eta = self.eta(tau)
        return sqrt(eta) * g

    def g2(self, tau):
        """:math:`g^2(T-\\tau)` of the forward schedule (independent of :math:`\\eta`)."""
        return self.schedule.g2_tau(tau)

    def kl_weight_rate(self, tau):
        r"""KL weight rate :math:`w = \frac{(1+\eta)^2}{4\eta}\,g^2(T-\tau)`: the path KL between two actions
        is :math:`\int \frac{w}{2}|a - a'|^2 d\tau` nats (summed over dims). Raises ``ValueError`` where
        :math:`\eta = 0` (the ODE: the KL is infinite, theory.md R11)."""
        eta = self.eta(tau)
        zero = (eta == 0).any() if isinstance(eta, torch.Tensor) else np.any(np.asarray(eta) == 0)
        if zero:
            raise ValueError("the path KL of the probability-flow ODE (noise eta = 0) is infinite: "
                             "'kl_weight_rate' needs eta > 0")
        return ((1.0 + eta) ** 2 / (4.0 * eta)) * self.schedule.g2_tau(tau)

    def value_gain(self, tau):
        r""":math:`\frac{2\eta}{1+\eta}`: the optimal action is :math:`a^* = s + \frac{2\eta}{1+\eta}
        \nabla_y V^*/\beta` (the h-transform adds :math:`\eta g^2 \nabla V^*/\beta` to the drift); 1 at
        :math:`\eta = 1`."""
        eta = self.eta(tau)
        return 2.0 * eta / (1.0 + eta)
