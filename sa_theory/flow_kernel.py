r"""The Gaussian step kernel of rectified-flow samplers (SD3, FLUX): the noise-level family on a sigma grid.

A flow-matching scheduler (diffusers' ``FlowMatchEulerDiscreteScheduler``, shift included) gives times
:math:`1 \ge \sigma_0 > \sigma_1 > \dots > \sigma_K \ge 0`; :math:`\sigma` is the rectified-flow time
:math:`t` (``x_t = (1-t) x_0 + t\,\varepsilon``, :class:`~sa_theory.schedules.RectifiedFlow`) and the sampler
time is :math:`\tau = 1 - \sigma`, so step ``k`` has :math:`t = \sigma_k`, :math:`d\tau_k = \sigma_k - \sigma_{k+1}`.

**Action = velocity.** The network's velocity :math:`v = \varepsilon - x_0` is the action of this kernel. It
is an affine image of the score at every :math:`t < 1` (:math:`s = -(x + (1-t)v)/t`,
:func:`sa_theory.parametrization.score_from_velocity`), so the kernel is affine in either; the velocity is
kept because the first step of SD3 starts at :math:`t = 1`, where the score map degenerates (:math:`s = -x`).

**Step.** The Euler step of the family member :math:`\eta_k` (theory.md §5, :class:`~sa_theory.sde.ControlledSDE`
on ``RectifiedFlow``: :math:`f = -1/(1-t)`, :math:`g^2 = 2t/(1-t)`), written in the velocity:

.. math:: m_k = x - d\tau_k\Big[(1+\eta_k)\,v + \frac{\eta_k}{1-t}\,x\Big], \qquad
          \mathrm{std}_k = \sqrt{\eta_k\,g^2(t)\,d\tau_k} = \sqrt{\frac{2\eta_k t}{1-t}\,d\tau_k},

slope :math:`\lambda_k = -(1+\eta_k)d\tau_k`, so :math:`w_k = \lambda_k^2/\mathrm{std}_k^2 = \frac{(1+\eta)^2}{4\eta}
g^2 d\tau\,\big(\tfrac{1-t}{t}\big)^2`: the family's KL weight in score units times :math:`(ds/dv)^2`.
At :math:`\eta = 0` the mean is :math:`x + (\sigma_{k+1} - \sigma_k)v`, the scheduler's own ``step``.

**Noise levels** (``noise``): ``("eta", e)`` a constant member :math:`\eta = e` (default ``e = 1``, the reverse
SDE); ``("flow_grpo", a)`` Flow-GRPO's :math:`\sigma_t = a\sqrt{t/(1-t)}`, i.e. :math:`\eta = a^2/2` (their
default ``a = 0.7`` is :math:`\eta = 0.245`); ``("constant_sigma", c)`` DanceGRPO's :math:`\sigma_t = c`, i.e.
:math:`\eta(t) = c^2/g^2(t) = c^2(1-t)/(2t)` (finite everywhere on :math:`(0, 1]`, std :math:`c\sqrt{d\tau}`).
In general, with :math:`q_k = \eta_k/(1-t)` (:math:`c^2/(2t)` for constant sigma): :math:`m_k = (1 - q_k d\tau)x
- (1 + q_k(1-t))d\tau\,v`, :math:`\mathrm{std}_k^2 = 2 t q_k d\tau`.

**The step from t = 1** (SD3's first step) has :math:`q = \infty` for a constant :math:`\eta > 0`.
``at_one="ode"`` (default) makes it the deterministic ODE step (:math:`\eta = 0` there: masked out of log-probs
and KL, as :class:`~sa_theory.kernels.GaussianKernel` masks every deterministic step). ``at_one="clamp"`` is
Flow-GRPO's convention: :math:`1/(1-t)` is replaced by :math:`1/(1-\sigma_1)`, so :math:`q_0 = \eta/(1-\sigma_1)`
and the velocity coefficient is 1; it reproduces their ``sde_step_with_logprob`` (tested against a transcription
of its formulas) and is offered to reproduce their runs.

**Continuous-time weight** :math:`\bar w_k` (``ct_kl_weight``): the Girsanov KL weight rate in velocity units,
:math:`\frac{(1+\eta)^2}{4\eta} g^2 (\tfrac{1-t}{t})^2 = \frac{(1+\eta)^2}{4\eta}\frac{2(1-t)}{t}`, integrated over
the step with the velocity difference held fixed (as the Euler step holds the network output). A step to
:math:`t = 0` would diverge (a fixed velocity difference is an unbounded score difference there): it gets the
score-held weight :math:`\frac{(1+\eta)^2}{4\eta}\int_0^{\sigma_k} g^2 dt\,((1-\sigma_k)/\sigma_k)^2`; a clamped
step from :math:`t = 1` gets its chain weight.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .kernels import GaussianKernel, family_kl_factor

__all__ = ["FlowMatchKernel", "flow_noise_levels", "NOISE_KINDS"]

NOISE_KINDS = ("eta", "flow_grpo", "constant_sigma")


def flow_noise_levels(t, kind: str = "eta", value: float = 1.0) -> np.ndarray:
    r""":math:`\eta(t)` of a noise specification at rectified-flow times ``t`` (``constant_sigma``:
    :math:`c^2(1-t)/(2t)`, 0 at :math:`t = 1`, infinite at 0)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind {kind!r} is unknown; choose one of {NOISE_KINDS}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"noise value for {kind!r} must be finite and >= 0, got {value!r}")
    t = np.asarray(t, dtype=np.float64)
    if kind == "eta":
        return np.full_like(t, v)
    if kind == "flow_grpo":
        return np.full_like(t, 0.5 * v * v)
    with np.errstate(divide="ignore"):
        return v * v * (1.0 - t) / (2.0 * t)


def _ct_velocity_weights(s: np.ndarray, kind: str, value: float, nodes: int = 16) -> np.ndarray:
    r""":math:`\int_{\sigma_{k+1}}^{\sigma_k} \frac{(1+\eta)^2}{4\eta}\,\frac{2(1-t)}{t}\,dt` per step (the KL weight
    rate in velocity units), Gauss-Legendre in :math:`\log t`; a step to :math:`t = 0` (divergent) gets the
    score-held weight :math:`\frac{(1+\eta)^2}{4\eta}\int_0^{\sigma_k} g^2 dt\,((1-\sigma_k)/\sigma_k)^2`."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    out = np.zeros(s.size - 1)
    for k, (hi, lo) in enumerate(zip(s[:-1], s[1:])):
        if lo > 0:
            u = 0.5 * (np.log(hi) - np.log(lo)) * (x + 1.0) + np.log(lo)
            t = np.exp(u)
            r = family_kl_factor(flow_noise_levels(t, kind, value)) * 2.0 * (1.0 - t)  # rate * t (dt = t du)
            out[k] = 0.5 * (np.log(hi) - np.log(lo)) * float((w * r).sum())
        else:
            e = float(flow_noise_levels(hi, kind, value))
            if e > 0 and hi < 1:
                out[k] = family_kl_factor(e) * 2.0 * (-np.log1p(-hi) - hi) * ((1.0 - hi) / hi) ** 2
    return out


class FlowMatchKernel(GaussianKernel):
    """Euler step of the noise-level family on a flow-matching sigma grid (module docstring); action = velocity.

    sigmas: ``K+1`` strictly decreasing times in ``[0, 1]`` (diffusers: ``scheduler.sigmas``).
    noise: ``(kind, value)`` with ``kind`` in :data:`NOISE_KINDS`.
    at_one: ``"ode"`` or ``"clamp"`` -- how a step that starts at ``t = 1`` with a singular noise is made finite.
    """

    def __init__(self, sigmas, noise: tuple[str, float] = ("eta", 1.0), at_one: str = "ode") -> None:
        s = np.asarray(sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size < 2 or not np.all(np.isfinite(s)) or np.any(np.diff(s) >= 0) or s[0] > 1 or s[-1] < 0:
            raise ValueError("'sigmas' must be a strictly decreasing 1-d grid of >= 2 times in [0, 1]")
        if at_one not in ("ode", "clamp"):
            raise ValueError(f"'at_one' must be 'ode' or 'clamp', got {at_one!r}")
        kind, value = noise
        self.sigmas, self.noise, self.at_one = s, (kind, float(value)), at_one
        t, dtau = s[:-1], s[:-1] - s[1:]
        eta = flow_noise_levels(t, kind, value)
        with np.errstate(divide="ignore", invalid="ignore"):  # q = eta / (1 - t): x coefficient, std^2 = 2 t q dtau
            q = value * value / (2.0 * t) if kind == "constant_sigma" else eta / (1.0 - t)
        singular = ~np.isfinite(q)
        if singular.any() and at_one == "clamp" and s.size < 3:
            raise ValueError("at_one='clamp' needs a second sigma below 1")
        if at_one == "ode":
            eta, q = np.where(singular, 0.0, eta), np.where(singular, 0.0, q)
        else:
            q = np.where(singular, eta / (1.0 - s[1]), q)
        self.etas, self.dtaus = eta, dtau
        self.c_x = 1.0 - q * dtau
        slope = -(1.0 + q * (1.0 - t)) * dtau
        std = np.sqrt(2.0 * t * q * dtau)
        with np.errstate(divide="ignore", invalid="ignore"):
            chain = slope**2 / std**2
        ct = np.where(singular, chain, _ct_velocity_weights(s, kind, value))
        ct = np.where(std > 0, ct, 0.0)
        scale = np.sqrt((1.0 - s[1:]) ** 2 + s[1:] ** 2)
        super().__init__(taus=1.0 - s, std=std, slope=slope, ct_kl_weight=ct,
                         state_scale=scale, name=f"flow_euler({kind}={float(value):g}, at_one={at_one})")

    def mean(self, k: int, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        r""":math:`m_k = c_k x + \lambda_k v` (``action`` is the velocity)."""
        return float(self.c_x[k]) * x + float(self.slopes[k]) * action

    def time(self, k: int) -> float:
        """Rectified-flow time :math:`t = \\sigma_k` of step ``k`` (the transformer's timestep is ``1000 t``)."""
        return float(self.sigmas[k])
