r"""Noise schedules of the forward (noising) SDE.

The forward SDE on diffusion time :math:`t \in [0, T]` is

.. math::  dX_t = f(t) X_t\,dt + g(t)\,dW_t, \qquad X_0 \sim p_\text{data},

so that :math:`X_t \mid X_0 \sim \mathcal N(\alpha_t X_0, \sigma_t^2 I)` with

.. math::  \alpha_t = \exp\Big(\int_0^t f\Big), \qquad
           \sigma_t^2 = \int_0^t \frac{\alpha_t^2}{\alpha_s^2} g(s)^2\,ds .

Every schedule gives ``f(t)``, ``g2(t)`` (:math:`g^2`), ``alpha(t)``, ``marginal_var(t)``
(:math:`\sigma_t^2`, the variance the noise adds), ``marginal_std(t)`` and ``B(t)``
(:math:`-2\log\alpha_t`, the integrated rate :math:`\int_0^t b` of a VP schedule). The sampler runs in
RL time :math:`\tau = T - t` (``tau = 0`` is noise, ``tau = T`` is data): ``t_of_tau`` / ``tau_of_t``
convert, and ``f_tau`` / ``g2_tau`` evaluate the coefficients at ``T - tau``.

All methods accept Python floats, numpy arrays or torch tensors and return the same kind (torch
tensors keep their dtype and device and are differentiable).

Schedules:

* :class:`VPLinear`  -- DDPM / Stable Diffusion: :math:`b(t) = b_\min + (t/T)(b_\max-b_\min)`,
  :math:`f=-b/2`, :math:`g^2=b`, :math:`\sigma_t^2 = 1-\alpha_t^2`.
* :class:`VPCosine`  -- Nichol & Dhariwal's cosine schedule :math:`\bar\alpha(u)=\cos^2(\frac{u+s}{1+s}
  \frac\pi2)/\cos^2(\frac{s}{1+s}\frac\pi2)` on :math:`u = u_\max t/T` (``u_max < 1`` keeps the rate finite).
* :class:`VEGeometric` -- Song et al.'s VE SDE, :math:`\sigma(t)=\sigma_\min(\sigma_\max/\sigma_\min)^{t/T}`,
  :math:`f=0`, :math:`g^2 = d\sigma^2/dt`, :math:`\sigma_t^2 = \sigma(t)^2-\sigma(0)^2`.
* :class:`ConstantOU` -- VP with a constant rate :math:`b` (an Ornstein-Uhlenbeck process); with
  :math:`bT` of order one the sampler keeps a strong memory of its initial point (theory.md R2).
* :class:`RectifiedFlow` -- flow matching (SD3, FLUX): :math:`x_t = (1-t)x_0 + t\varepsilon` on
  :math:`[0, t_\max]`, :math:`\alpha_t = 1-t`, :math:`\sigma_t^2 = t^2`, :math:`f = -1/(1-t)`,
  :math:`g^2 = 2t/(1-t)` (theory.md §5); ``T = t_max < 1`` because :math:`g^2` is singular at 1.
  The velocity / eps / x0 <-> score maps are in :mod:`sa_theory.parametrization`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Schedule", "VPLinear", "VPCosine", "VEGeometric", "ConstantOU", "RectifiedFlow", "SCHEDULES",
           "get_schedule"]


def _xp(x: Any):
    """The array module (torch or numpy) that matches ``x``."""
    return torch if isinstance(x, torch.Tensor) else np


def _asarray(x: Any):
    return x if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


def _check_finite_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"schedule parameter {name!r} must be a real number, got {value!r}") from err
    if not math.isfinite(v):
        raise ValueError(f"schedule parameter {name!r} must be finite, got {v}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"schedule parameter {name!r} must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Base class. Subclasses implement ``f``, ``g2``, ``log_alpha`` and ``marginal_var``."""

    T: float = 1.0

    kind: str = "base"  # "vp" or "ve"; informational

    def __post_init__(self) -> None:
        _check_finite_positive("T", self.T)

    # -- coefficients in diffusion time t ---------------------------------------------------------
    def f(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def g2(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def log_alpha(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def marginal_var(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def g(self, t):
        """Diffusion coefficient :math:`g(t) = \\sqrt{g^2(t)}`."""
        return _xp(t).sqrt(self.g2(_asarray(t)))

    def alpha(self, t):
        """Signal scale :math:`\\alpha_t` (``X_t = alpha_t X_0 + sigma_t Z``)."""
        return _xp(t).exp(self.log_alpha(_asarray(t)))

    def B(self, t):
        """:math:`B(t) = -2 \\log \\alpha_t` (equals :math:`\\int_0^t b` for VP schedules)."""
        return -2.0 * self.log_alpha(_asarray(t))

    def marginal_std(self, t):
        """:math:`\\sigma_t`, the standard deviation of the added noise."""
        return _xp(t).sqrt(self.marginal_var(_asarray(t)))

    # -- sampler (RL) time tau = T - t ------------------------------------------------------------
    def t_of_tau(self, tau):
        """Diffusion time of sampler time: :math:`t = T - \\tau`."""
        return self.T - _asarray(tau)

    def tau_of_t(self, t):
        """Sampler time of diffusion time: :math:`\\tau = T - t`."""
        return self.T - _asarray(t)

    def f_tau(self, tau):
        return self.f(self.t_of_tau(tau))

    def g2_tau(self, tau):
        return self.g2(self.t_of_tau(tau))


@dataclass(frozen=True, kw_only=True)
class VPLinear(Schedule):
    """Variance-preserving schedule with a linear rate ``b(t) = b_min + (t/T)(b_max - b_min)``."""

    b_min: float = 0.1
    b_max: float = 20.0
    T: float = 1.0
    kind: str = "vp"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite_positive("b_min", self.b_min)
        _check_finite_positive("b_max", self.b_max)
        if self.b_max < self.b_min:
            raise ValueError(f"schedule parameter 'b_max' ({self.b_max}) must be >= 'b_min' ({self.b_min})")

    def b(self, t):
        return self.b_min + (_asarray(t) / self.T) * (self.b_max - self.b_min)

    def f(self, t):
        return -0.5 * self.b(t)

    def g2(self, t):
        return self.b(t)

    def log_alpha(self, t):
        t = _asarray(t)
        return -0.5 * (self.b_min * t + 0.5 * (self.b_max - self.b_min) * t**2 / self.T)

    def marginal_var(self, t):
        return -_xp(t).expm1(2.0 * self.log_alpha(_asarray(t)))


@dataclass(frozen=True, kw_only=True)
class ConstantOU(Schedule):
    """Variance-preserving schedule with a constant rate ``b`` (Ornstein-Uhlenbeck)."""

    b: float = 1.0
    T: float = 1.0
    kind: str = "vp"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite_positive("b", self.b)

    def f(self, t):
        return -0.5 * self.b + 0.0 * _asarray(t)

    def g2(self, t):
        return self.b + 0.0 * _asarray(t)

    def log_alpha(self, t):
        return -0.5 * self.b * _asarray(t)

    def marginal_var(self, t):
        return -_xp(t).expm1(-self.b * _asarray(t))


@dataclass(frozen=True, kw_only=True)
class VPCosine(Schedule):
    """Cosine VP schedule (Nichol & Dhariwal 2021).

    :math:`\\bar\\alpha(t) = \\cos^2(\\phi(t))/\\cos^2(\\phi(0))`, :math:`\\phi(t) = \\frac{\\pi}{2}
    \\frac{u_\\max t/T + s}{1+s}`; the rate is :math:`b(t) = 2\\tan(\\phi(t))\\,\\phi'(t)`. ``u_max < 1``
    stops short of the end of the cosine where the rate diverges (``u_max = 0.9946`` is iDDPM's clip).
    """

    s: float = 0.008
    u_max: float = 0.9946
    T: float = 1.0
    kind: str = "vp"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite_positive("s", self.s, allow_zero=True)
        _check_finite_positive("u_max", self.u_max)
        if self.u_max >= 1.0:
            raise ValueError(f"schedule parameter 'u_max' must be < 1 (rate diverges at 1), got {self.u_max}")

    def _phi(self, t):
        return 0.5 * math.pi * (self.u_max * _asarray(t) / self.T + self.s) / (1.0 + self.s)

    def b(self, t):
        dphi = 0.5 * math.pi * self.u_max / (self.T * (1.0 + self.s))
        return 2.0 * _xp(t).tan(self._phi(t)) * dphi

    def f(self, t):
        return -0.5 * self.b(t)

    def g2(self, t):
        return self.b(t)

    def log_alpha(self, t):
        phi0 = 0.5 * math.pi * self.s / (1.0 + self.s)
        return _xp(t).log(_xp(t).cos(self._phi(t))) - math.log(math.cos(phi0))

    def marginal_var(self, t):
        return -_xp(t).expm1(2.0 * self.log_alpha(_asarray(t)))


@dataclass(frozen=True, kw_only=True)
class VEGeometric(Schedule):
    """Variance-exploding schedule: :math:`\\sigma(t) = \\sigma_\\min (\\sigma_\\max/\\sigma_\\min)^{t/T}`.

    :math:`f = 0`, :math:`g^2 = d\\sigma^2/dt = 2\\sigma(t)^2 \\log(\\sigma_\\max/\\sigma_\\min)/T`,
    :math:`\\alpha_t = 1` and :math:`\\sigma_t^2 = \\sigma(t)^2 - \\sigma_\\min^2`.
    """

    sigma_min: float = 0.01
    sigma_max: float = 10.0
    T: float = 1.0
    kind: str = "ve"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite_positive("sigma_min", self.sigma_min)
        _check_finite_positive("sigma_max", self.sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"schedule parameter 'sigma_max' ({self.sigma_max}) must be > 'sigma_min' ({self.sigma_min})"
            )

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (_asarray(t) / self.T)

    def f(self, t):
        return 0.0 * _asarray(t)

    def g2(self, t):
        return 2.0 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min) / self.T

    def log_alpha(self, t):
        return 0.0 * _asarray(t)

    def marginal_var(self, t):
        return self.sigma(t) ** 2 - self.sigma_min**2


@dataclass(frozen=True, kw_only=True)
class RectifiedFlow(Schedule):
    r"""Rectified flow / flow matching: :math:`x_t = (1-t)\,x_0 + t\,\varepsilon`, :math:`t \in [0, t_\max]`.

    :math:`\alpha_t = 1 - t`, :math:`\sigma_t = t`, :math:`f(t) = -1/(1-t)`, :math:`g^2(t) = 2t/(1-t)`
    (so :math:`d\sigma_t^2/dt = 2f\sigma_t^2 + g^2`). ``T`` equals ``t_max`` (give one of them); ``t_max``
    must be < 1. Its probability-flow ODE is :math:`dx/dt = v` with :math:`v = \varepsilon - x_0` the
    flow-matching velocity (:func:`sa_theory.parametrization.velocity_from_score`).
    """

    t_max: float = 0.999
    T: float | None = None  # type: ignore[assignment]
    kind: str = "rf"

    def __post_init__(self) -> None:
        tm = _check_finite_positive("t_max", self.t_max)
        if tm >= 1.0:
            raise ValueError(f"schedule parameter 't_max' must be < 1 (g^2 = 2t/(1-t) is singular at 1), got {tm}")
        if self.T is not None and float(self.T) != tm:
            raise ValueError(f"RectifiedFlow: 'T' ({self.T}) must equal 't_max' ({tm}); give only t_max")
        object.__setattr__(self, "T", tm)
        super().__post_init__()

    def f(self, t):
        return -1.0 / (1.0 - _asarray(t))

    def g2(self, t):
        t = _asarray(t)
        return 2.0 * t / (1.0 - t)

    def log_alpha(self, t):
        return _xp(t).log1p(-_asarray(t))

    def marginal_var(self, t):
        return _asarray(t) ** 2


SCHEDULES = {"vp_linear": VPLinear, "vp_cosine": VPCosine, "ve": VEGeometric, "ou": ConstantOU,
             "rectified_flow": RectifiedFlow}


def get_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name (``vp_linear``, ``vp_cosine``, ``ve``, ``ou``, ``rectified_flow``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
