r"""Network parametrisations <-> the score, for any schedule: one place for every map (theory.md §1, §5).

For the forward SDE :math:`X_t = \alpha_t X_0 + \sigma_t \varepsilon` (``schedule.alpha``,
``schedule.marginal_std``) a denoiser may predict the noise :math:`\varepsilon`, the clean sample
:math:`x_0`, or the velocity :math:`v = dX_t/dt = \dot\alpha_t x_0 + \dot\sigma_t\varepsilon`. Their
conditional means are affine in the score :math:`s = \nabla\log p_t`:

.. math::  \hat\varepsilon = -\sigma_t s, \qquad \hat x_0 = \frac{x + \sigma_t^2 s}{\alpha_t}\ \text{(Tweedie)},
           \qquad v = f(t)\,x - \tfrac12 g^2(t)\, s ,

the last one because :math:`\dot\alpha/\alpha = f` and :math:`\sigma\dot\sigma - f\sigma^2 = g^2/2`: the
velocity is the drift of the probability-flow ODE :math:`dx/dt = f x - \frac12 g^2 s`. For
:class:`~sa_theory.schedules.RectifiedFlow` (:math:`\alpha = 1-t`, :math:`\sigma = t`) this is the
flow-matching velocity :math:`v = \varepsilon - x_0` and

.. math::  s = -\frac{x + (1-t)v}{t}, \qquad \hat x_0 = x - t v, \qquad \hat\varepsilon = x + (1-t) v,
           \qquad v = -\frac{x + t s}{1-t} .

So a velocity network is a score policy up to a fixed affine map and "the action is the score" holds
unchanged. ``t`` is diffusion time (``t = 0`` data); arguments broadcast (torch tensors or numpy arrays,
``t`` a float or a 0-dim tensor). The maps divide by :math:`\sigma_t` (score from eps), :math:`\alpha_t`
(x0) or :math:`g^2` (score from velocity): they are singular at ``t = 0`` and, for rectified flow, at 1.
"""

from __future__ import annotations

from .schedules import Schedule

__all__ = [
    "score_from_eps", "eps_from_score", "x0_from_score", "score_from_x0",
    "velocity_from_score", "score_from_velocity", "x0_from_velocity", "eps_from_velocity",
]


def _check(schedule: Schedule) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"'schedule' must be a sa_theory.schedules.Schedule, got {type(schedule).__name__}")


def score_from_eps(schedule: Schedule, t, eps):
    r""":math:`s = -\hat\varepsilon / \sigma_t`."""
    _check(schedule)
    return -eps / schedule.marginal_std(t)


def eps_from_score(schedule: Schedule, t, score):
    r""":math:`\hat\varepsilon = -\sigma_t\, s`."""
    _check(schedule)
    return -schedule.marginal_std(t) * score


def x0_from_score(schedule: Schedule, t, x, score):
    r"""Tweedie: :math:`\hat x_0 = (x + \sigma_t^2 s)/\alpha_t`."""
    _check(schedule)
    return (x + schedule.marginal_var(t) * score) / schedule.alpha(t)


def score_from_x0(schedule: Schedule, t, x, x0):
    r""":math:`s = -(x - \alpha_t \hat x_0)/\sigma_t^2`."""
    _check(schedule)
    return -(x - schedule.alpha(t) * x0) / schedule.marginal_var(t)


def velocity_from_score(schedule: Schedule, t, x, score):
    r"""Probability-flow velocity :math:`v = f(t)\,x - \frac12 g^2(t)\,s` (:math:`= -(x + t s)/(1-t)` for
    rectified flow)."""
    _check(schedule)
    return schedule.f(t) * x - 0.5 * schedule.g2(t) * score


def score_from_velocity(schedule: Schedule, t, x, v):
    r""":math:`s = 2(f(t)\,x - v)/g^2(t)` (:math:`= -(x + (1-t) v)/t` for rectified flow)."""
    _check(schedule)
    return 2.0 * (schedule.f(t) * x - v) / schedule.g2(t)


def x0_from_velocity(schedule: Schedule, t, x, v):
    r""":math:`\hat x_0` of a velocity prediction (:math:`= x - t v` for rectified flow)."""
    return x0_from_score(schedule, t, x, score_from_velocity(schedule, t, x, v))


def eps_from_velocity(schedule: Schedule, t, x, v):
    r""":math:`\hat\varepsilon` of a velocity prediction (:math:`= x + (1-t) v` for rectified flow)."""
    return eps_from_score(schedule, t, score_from_velocity(schedule, t, x, v))
