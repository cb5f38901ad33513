r"""Gaussian step kernels: one contract for every training sampler (Euler-Maruyama, DDIM, DDPM).

**Contract.** A kernel has ``K`` steps on a sampler-time grid ``taus`` (``K+1`` values, strictly increasing,
:math:`\tau = T - t`). Step ``k`` maps the state :math:`x_k` and the action :math:`a_k` (the score) to

.. math:: x_{k+1} \sim N(m_k(x_k, a_k),\ \mathrm{std}_k^2 I), \qquad m_k(x, a) = c_k x + \lambda_k a\ (+\text{const}),

``mean(k, x, a)`` affine in the action with slope :math:`\lambda_k` (``slope(k)``), ``std(k)`` >= 0. For two
actions on the same state the exact KL of the step is

.. math:: KL_k = \frac{|m_k(x,a) - m_k(x,a')|^2}{2\,\mathrm{std}_k^2} = \frac{w_k}{2}|a - a'|^2,\qquad
          w_k = \lambda_k^2/\mathrm{std}_k^2 \quad(\texttt{kl\_weight(k)}),

summed over dimensions, nats per step; :math:`\sum_k KL_k` is the exact KL of the discrete chain (``"chain"``).
Each kernel also gives a **continuous-time weight** :math:`\bar w_k` (``ct_kl_weight(k)``): the Girsanov KL
weight rate integrated over the step's time interval (``"continuous"``), so :math:`\sum_k \frac{\bar
w_k}{2}|a_k - a'_k|^2` is a left-point quadrature of the Girsanov path KL, stable across step counts
(the chain KL exceeds it at coarse steps, see below). :data:`KL_FORMS` names the two.

**Deterministic steps.** A step with :math:`\mathrm{std}_k <` :data:`DETERMINISTIC_STD` :math:`\times`
``state_scale`` is deterministic: ``std(k) = 0``, no density, masked out of ``log_prob`` (0) and of both KL
weights (0). ``state_scale`` is the marginal scale :math:`\sqrt{\alpha_t^2 + \sigma_t^2}` of the step's target
state for unit-variance data (1 for VP schedules). The threshold 1e-6 sits ~8 float32 ulps above the
resolution of the state: noise below it is round-off, and its KL weight (>= 1e12 per unit slope^2) an
artifact. Example: diffusers' DDPM with ``steps_offset=1`` ends with a step to "timestep -1" whose variance
0 it clamps to 1e-20 (std 1e-10); the smallest genuinely random step of SD1.5's schedule (DDPM or DDIM
:math:`\eta = 1`, any K) has std 0.021.

**Kernels.** :class:`EulerKernel` -- the Euler-Maruyama step of a controlled SDE of the noise-level family
(``sde.drift``, ``sde.diffusion`` :math:`\sqrt{\eta}g`, ``sde.action_coef`` :math:`\frac{1+\eta}{2}g^2`):
:math:`\lambda_k = \frac{1+\eta}{2}g^2 d\tau`, std :math:`\sqrt{\eta}\,g\sqrt{d\tau}`, so
:math:`w_k = \frac{(1+\eta)^2}{4\eta}g^2 d\tau` (rate frozen at :math:`\tau_k`) and :math:`\bar w_k =
\int_{\tau_k}^{\tau_{k+1}}\frac{(1+\eta)^2}{4\eta}g^2 d\tau` (Gauss-Legendre). :class:`DDIMKernel` (any
:math:`\eta_{DDIM}\in[0,1]`) and :class:`DDPMKernel` (``fixed_small``) on a discrete VP schedule
(:class:`DiscreteVPSchedule`), from ``alphas_cumprod``, the timesteps, the previous timesteps and the final
:math:`\bar\alpha`: with :math:`\bar\alpha = \bar\alpha_{t_k}`, :math:`\bar\alpha_p = \bar\alpha_{t_{k+1}}`,
:math:`\delta_k = \log(\bar\alpha_p/\bar\alpha) = B(t_k) - B(t_{k+1})` and
:math:`\sigma_k^2 = \frac{1-\bar\alpha_p}{1-\bar\alpha}(1 - \bar\alpha/\bar\alpha_p)` (the DDPM posterior
variance), :math:`\bar w_k = \frac{(1+e)^2}{4e}\delta_k` with the family parameter :math:`e` below.

**DDIM's eta is the family member** :math:`e = \eta_{DDIM}^2`. Exact: the DDIM step variance is
:math:`\eta_{DDIM}^2\sigma_k^2`, :math:`\eta_{DDIM}^2` times that of DDPM, and DDIM(1) is the DDPM step
(same mean and std; tested). Writing :math:`x_0 = (x + (1-\bar\alpha)a)/\sqrt{\bar\alpha}` (Tweedie) in DDIM's
mean gives :math:`\lambda_k = (1-\bar\alpha)\sqrt{\bar\alpha_p/\bar\alpha} -
\sqrt{(1-\bar\alpha)(1-\bar\alpha_p-\eta_{DDIM}^2\sigma_k^2)}`. Expanding in :math:`\delta = \delta_k` at fixed
:math:`s = 1-\bar\alpha` (noise variance at the step's start), with :math:`e = \eta_{DDIM}^2`:

.. math:: \frac{\mathrm{std}_k^2}{e\,\delta} = 1 - \frac{2-s}{2s}\delta + O(\delta^2),\qquad
          \frac{\lambda_k}{\frac{1+e}{2}\delta} = 1 + \frac{(1-e)^2}{4(1+e)s}\delta + O(\delta^2),

.. math:: \frac{w_k}{\frac{(1+e)^2}{4e}\delta} = 1 + \frac{3 + e^2 - (1+e)s}{2(1+e)s}\,\delta + O(\delta^2).

A step of the family member :math:`e` over the same interval has, to first order, variance
:math:`e\int g^2 = e\delta` and slope :math:`\frac{1+e}{2}\delta` (VP: :math:`\int g^2 dt = \delta`). So the
DDIM step equals the family's step for :math:`e = \eta_{DDIM}^2` up to a relative :math:`O(\delta_k/s_k)` (step
size over noise level), and no other :math:`e` matches its variance (tested, with :math:`e = \eta_{DDIM}` as
the failing control). The KL-weight excess is positive for every :math:`e` (as
:math:`s \le 1`): the chain KL exceeds the continuous one at coarse steps, most at small noise. Note
:math:`\frac{(1+e)^2}{4e}` is symmetric in :math:`e \leftrightarrow 1/e`: the KL weight alone cannot tell
:math:`e` from :math:`1/e`; the variance can.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .kl import gaussian_log_prob, girsanov_kl_rate
from .schedules import Schedule

__all__ = ["DETERMINISTIC_STD", "KL_FORMS", "GaussianKernel", "EulerKernel", "DiscreteVPSchedule",
           "DiscreteVPKernel", "DDIMKernel", "DDPMKernel", "family_kl_factor"]

DETERMINISTIC_STD = 1e-6  # a step whose std < DETERMINISTIC_STD * state_scale is deterministic
KL_FORMS = ("chain", "continuous")  # exact KL of the discrete chain | Girsanov rate integrated per step


def family_kl_factor(e):
    r""":math:`\frac{(1+e)^2}{4e}`: the KL weight rate of the noise-level family over :math:`g^2` (1 at e = 1)."""
    e = np.asarray(e, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return (1.0 + e) ** 2 / (4.0 * e)


def _vec(kernel: str, name: str, x, n: int) -> np.ndarray:
    a = np.broadcast_to(np.asarray(x, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{kernel}: {name!r} is not finite at steps {np.flatnonzero(~np.isfinite(a)).tolist()}")
    return a


class GaussianKernel:
    """The contract (module docstring). Subclasses give the arrays and implement :meth:`mean`."""

    def __init__(self, *, taus, std, slope, ct_kl_weight, state_scale=1.0, name: str = "kernel") -> None:
        self.name = name
        self.taus = np.asarray(taus, dtype=np.float64)
        K = self.taus.size - 1
        if self.taus.ndim != 1 or K < 1 or not np.all(np.isfinite(self.taus)) or np.any(np.diff(self.taus) <= 0):
            raise ValueError(f"{name}: 'taus' must be a finite, strictly increasing grid of >= 2 times")
        std, slope = _vec(name, "std", std, K), _vec(name, "slope", slope, K)
        if np.any(std < 0):
            raise ValueError(f"{name}: 'std' must be >= 0")
        self.state_scale = _vec(name, "state_scale", state_scale, K)
        self.stochastic = std >= DETERMINISTIC_STD * self.state_scale
        self.stds = np.where(self.stochastic, std, 0.0)
        self.slopes = slope
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(self.stochastic, slope**2 / std**2, 0.0)
        self.kl_weights = _vec(name, "kl_weight", w, K)
        with np.errstate(invalid="ignore"):
            ct = np.where(self.stochastic, np.asarray(ct_kl_weight, dtype=np.float64), 0.0)
        self.ct_kl_weights = _vec(name, "ct_kl_weight", ct, K)

    @property
    def num_steps(self) -> int:
        return self.taus.size - 1

    def std(self, k: int) -> float:
        """Standard deviation of step ``k`` (0: deterministic)."""
        return float(self.stds[k])

    def slope(self, k: int) -> float:
        """:math:`\\lambda_k = \\partial m_k/\\partial a`."""
        return float(self.slopes[k])

    def kl_weight(self, k: int) -> float:
        """:math:`w_k = \\lambda_k^2/\\mathrm{std}_k^2` (exact chain KL weight; 0 if deterministic)."""
        return float(self.kl_weights[k])

    def ct_kl_weight(self, k: int) -> float:
        """:math:`\\bar w_k`: the Girsanov KL weight rate integrated over the step (0 if deterministic)."""
        return float(self.ct_kl_weights[k])

    def weights(self, form: str = "chain") -> np.ndarray:
        """All ``K`` KL weights of ``form`` (``"chain"`` or ``"continuous"``)."""
        if form not in KL_FORMS:
            raise ValueError(f"KL form {form!r} is unknown; choose one of {KL_FORMS}")
        return self.kl_weights if form == "chain" else self.ct_kl_weights

    def mean(self, k: int, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, k: int, x_next: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """:math:`\\log N(x_{k+1}; m_k, \\mathrm{std}_k^2 I)` summed over dims, ``(B,)`` nats; 0 if deterministic."""
        if not self.stochastic[k]:
            return torch.zeros(x_next.shape[0], dtype=mean.dtype, device=mean.device)
        return gaussian_log_prob(x_next, mean, self.std(k))

    def step_kl(self, k: int, action: torch.Tensor, ref_action: torch.Tensor, form: str = "chain") -> torch.Tensor:
        """:math:`\\frac{w_k}{2}|a - a'|^2` (``form="chain"``: the exact KL of the step) or with
        :math:`\\bar w_k` (``"continuous"``); summed over dims, ``(B,)`` nats per step."""
        return girsanov_kl_rate(float(self.weights(form)[k]), action, ref_action)

    def grid_log_probs(self, ks, states: torch.Tensor, next_states: torch.Tensor,
                       actions: torch.Tensor) -> torch.Tensor:
        """:meth:`log_prob` of :meth:`mean` at the steps ``ks`` (states, next states and actions ``(n, B, *event)``
        for those steps), ``(n, B)``; one call per step here, batched where a kernel can."""
        return torch.stack([self.log_prob(k, next_states[i], self.mean(k, states[i], actions[i]))
                            for i, k in enumerate(ks)])

    def grid_step_kls(self, ks, actions: torch.Tensor, ref_actions: torch.Tensor, form: str = "chain") -> torch.Tensor:
        """:meth:`step_kl` at the steps ``ks`` (actions ``(n, B, *event)``), ``(n, B)``."""
        return torch.stack([self.step_kl(k, actions[i], ref_actions[i], form) for i, k in enumerate(ks)])


class EulerKernel(GaussianKernel):
    """Euler-Maruyama step of a controlled SDE of the noise-level family on the grid ``taus``:
    :math:`m_k = y + b(\\tau_k, y, a)\\,d\\tau_k`, std :math:`= \\sigma(\\tau_k)\\sqrt{d\\tau_k}` with
    ``sde.drift`` / ``sde.diffusion``; slope ``sde.action_coef`` :math:`\\times d\\tau_k`. ``quad_nodes``:
    Gauss-Legendre nodes per step for :math:`\\bar w_k = \\int \\mathrm{action\\_coef}^2/\\mathrm{diffusion}^2`."""

    def __init__(self, sde, taus, quad_nodes: int = 32) -> None:
        self.sde = sde
        self._drift_cache: dict = {}  # step k, dtype, device -> the drift's coefficients at tau_k (mean())
        taus = np.asarray(taus, dtype=np.float64)
        # a grid from a float32 tensor may end a rounding above T (0.99 -> 0.9900000095): accepted and clamped to T
        inside = taus.ndim == 1 and taus.size >= 2 and taus[0] >= 0 and taus[-1] <= sde.T * (1 + 1e-6)
        if not inside or np.any(np.diff(taus) <= 0):
            raise ValueError(f"EulerKernel: 'taus' must be a strictly increasing 1-d grid inside [0, T = {sde.T}]")
        taus = np.minimum(taus, sde.T)
        self.dtaus = np.diff(taus)

        def ev(fn, tau):
            return fn(torch.as_tensor(tau, dtype=torch.float64)).detach().numpy() + 0.0 * tau

        left = taus[:-1]
        coef, diff = ev(self.sde.action_coef, left), ev(self.sde.diffusion, left)
        nodes, qw = np.polynomial.legendre.leggauss(quad_nodes)
        tq = left[:, None] + 0.5 * (nodes[None] + 1.0) * self.dtaus[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = ev(self.sde.action_coef, tq) ** 2 / ev(self.sde.diffusion, tq) ** 2
        ct = 0.5 * self.dtaus * (rate * qw[None]).sum(1)
        sch = sde.schedule
        t_next = sch.T - taus[1:]
        scale = np.sqrt(np.asarray(sch.alpha(t_next)) ** 2 + np.asarray(sch.marginal_var(t_next)))
        name = f"euler({type(sch).__name__})"
        super().__init__(taus=taus, std=diff * np.sqrt(self.dtaus), slope=coef * self.dtaus,
                         ct_kl_weight=ct, state_scale=scale, name=name)

    def mean(self, k, x, action):
        """:math:`x + b(\\tau_k, x, a)\\,\\Delta\\tau_k`, the drift's coefficients at :math:`\\tau_k` computed once per
        (step, dtype, device) (``ControlledSDE.drift_coefs``; bitwise the drift's own product)."""
        key = (k, x.dtype, x.device)
        coefs = self._drift_cache.get(key)
        if coefs is None:
            coefs = self._drift_cache[key] = self.sde.drift_coefs(
                torch.as_tensor(self.taus[k], dtype=x.dtype, device=x.device))
        lin, act = coefs
        return x + (lin * x + act * action) * float(self.dtaus[k])

    def _rows(self, ks, like: torch.Tensor, arr: np.ndarray) -> torch.Tensor:
        """``arr[ks]`` as a tensor of shape ``(n, 1, ..., 1)`` broadcasting against ``like`` ``(n, B, *event)``."""
        return torch.as_tensor(arr[list(ks)], dtype=like.dtype, device=like.device).reshape(
            len(ks), *[1] * (like.dim() - 1))

    def grid_log_probs(self, ks, states, next_states, actions):
        """One batched drift call over the steps (the Euler step's mean is elementwise in the time)."""
        ks = list(ks)
        if len(ks) == 1 or not self.stochastic[ks].all():
            return super().grid_log_probs(ks, states, next_states, actions)
        n, B = states.shape[:2]
        mean = states + self.sde.drift(self._rows(ks, states, self.taus), states, actions) * \
            self._rows(ks, states, self.dtaus)
        std = self._rows(ks, states, self.stds).expand(n, B, *[1] * (states.dim() - 2))

        def rows(x):
            return x.reshape(n * B, *x.shape[2:])

        return gaussian_log_prob(rows(next_states), rows(mean), rows(std)).reshape(n, B)

    def grid_step_kls(self, ks, actions, ref_actions, form="chain"):
        ks = list(ks)
        n, B = actions.shape[:2]
        w = torch.as_tensor(self.weights(form)[ks], dtype=actions.dtype, device=actions.device).repeat_interleave(B)
        return girsanov_kl_rate(w, actions.reshape(n * B, *actions.shape[2:]),
                                ref_actions.reshape(n * B, *actions.shape[2:])).reshape(n, B)


def _interp_torch(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (like ``np.interp``, clamped at the ends), differentiable in ``x``."""
    xp, fp = xp.to(x.device, x.dtype), fp.to(x.device, x.dtype)
    xc = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, xc.detach().contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (xc - x0) / (x1 - x0)


@dataclass(frozen=True, kw_only=True)
class DiscreteVPSchedule(Schedule):
    r"""VP schedule through a discrete ``alphas_cumprod`` :math:`\bar\alpha_i` (``i = 0..M-1``).

    Timestep ``i`` sits at diffusion time :math:`t_i = (i+1)T/M`; :math:`B(t) = -\log\bar\alpha(t)` is piecewise
    linear through :math:`(0, 0), (t_i, -\log\bar\alpha_i)`, so :math:`\alpha_t = e^{-B/2}`,
    :math:`\sigma_t^2 = 1 - e^{-B}` and :math:`g^2 = B'` piecewise constant (left-continuous). It reproduces
    ``alphas_cumprod`` at the knots.
    """

    alphas_cumprod: tuple = ()
    T: float = 1.0
    kind: str = "vp"
    _knots_t: np.ndarray = field(init=False, repr=False, compare=False)
    _knots_B: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        ac = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2 or not np.all(np.isfinite(ac)) or np.any(ac <= 0) or np.any(ac > 1):
            raise ValueError("'alphas_cumprod' must be a 1-d sequence of at least 2 values in (0, 1]")
        if np.any(np.diff(ac) > 0):
            raise ValueError("'alphas_cumprod' must be non-increasing")
        M = ac.size
        object.__setattr__(self, "_knots_t", np.concatenate([[0.0], np.arange(1, M + 1) / M * self.T]))
        object.__setattr__(self, "_knots_B", np.concatenate([[0.0], -np.log(ac)]))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def t_of_timestep(self, timestep):
        """Diffusion time of a training timestep index ``i``: :math:`(i+1)T/M` (``-1`` -> 0)."""
        return (np.asarray(timestep, dtype=np.float64) + 1.0) / self.num_train_timesteps * self.T

    def t_of_alphabar(self, alphabar):
        """Inverse map: the diffusion time at which :math:`\\bar\\alpha(t)` equals ``alphabar``."""
        return np.interp(-np.log(np.asarray(alphabar, dtype=np.float64)), self._knots_B, self._knots_t)

    def B(self, t):
        if isinstance(t, torch.Tensor):
            return _interp_torch(t, torch.from_numpy(self._knots_t), torch.from_numpy(self._knots_B))
        return np.interp(np.asarray(t, dtype=float), self._knots_t, self._knots_B)

    def log_alpha(self, t):
        return -0.5 * self.B(t)

    def alphabar(self, t):
        return (torch if isinstance(t, torch.Tensor) else np).exp(-self.B(t))

    def g2(self, t):
        rates = np.diff(self._knots_B) / np.diff(self._knots_t)  # rate on (t_{i-1}, t_i]
        if isinstance(t, torch.Tensor):
            kt = torch.from_numpy(self._knots_t).to(t.device, t.dtype)
            idx = (torch.searchsorted(kt, t.detach().contiguous(), right=False) - 1).clamp(0, rates.size - 1)
            return torch.from_numpy(rates).to(t.device, t.dtype)[idx]
        idx = np.clip(np.searchsorted(self._knots_t, np.asarray(t, dtype=float), side="left") - 1, 0, rates.size - 1)
        return rates[idx]

    def f(self, t):
        return -0.5 * self.g2(t)

    def marginal_var(self, t):
        return -(torch if isinstance(t, torch.Tensor) else np).expm1(-self.B(t))


class DiscreteVPKernel(GaussianKernel):
    r"""Base of the DDIM/DDPM kernels: :math:`m_k = c_k x + \lambda_k a` with the action the score
    :math:`a = -\epsilon/\sqrt{1-\bar\alpha_k}`. Arrays (length K): ``timesteps``, ``alphabar``,
    ``alphabar_prev``, ``t``/``t_prev`` (diffusion times), ``c_x``; ``family_eta`` is :math:`e`.

    ``timesteps`` (strictly decreasing integers in ``[0, M)``) and ``prev_timesteps`` (the step's target;
    negative means ``final_alphabar``) must chain: ``prev_timesteps[k] == timesteps[k+1]``.
    """

    family_eta = 1.0

    def __init__(self, alphas_cumprod, timesteps, prev_timesteps, final_alphabar, *, name, schedule=None):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if schedule is not None and not np.array_equal(np.asarray(schedule.alphas_cumprod), ac):
            raise ValueError(f"{name}: 'schedule' was built from other 'alphas_cumprod'")
        self.schedule = schedule or DiscreteVPSchedule(alphas_cumprod=tuple(ac.tolist()))
        M = ac.size
        ts, prev = np.asarray(timesteps), np.asarray(prev_timesteps)
        if ts.ndim != 1 or ts.size < 1 or not np.issubdtype(ts.dtype, np.integer) or ts.shape != prev.shape:
            raise ValueError(f"{name}: 'timesteps' and 'prev_timesteps' must be 1-d integer arrays of equal length")
        if ts.min() < 0 or ts.max() >= M:
            raise ValueError(f"{name}: 'timesteps' must lie in [0, {M}) (num_train_timesteps), got {ts.min()}.."
                             f"{ts.max()}")
        if np.any(np.diff(ts) >= 0) or np.any(prev >= ts) or np.any(prev[:-1] != ts[1:]):
            raise ValueError(f"{name}: 'timesteps' must strictly decrease and each step's 'prev_timesteps' must be "
                             f"the next timestep (got {ts.tolist()} -> {prev.tolist()})")
        fa = float(final_alphabar)
        if not (0 < fa <= 1) or (prev[-1] < 0 and fa < ac[ts[-1]]):
            raise ValueError(f"{name}: 'final_alphabar' must be in [alphabar of the last timestep, 1], got {fa}")
        self.timesteps = ts.astype(np.int64)
        self.alphabar = a = ac[ts]
        self.alphabar_prev = ap = np.where(prev >= 0, ac[np.clip(prev, 0, None)], fa)
        self.t = self.schedule.t_of_timestep(ts)
        self.t_prev = np.where(prev >= 0, self.schedule.t_of_timestep(prev), self.schedule.t_of_alphabar(fa))
        self.posterior_var = (1 - ap) / (1 - a) * (-np.expm1(np.log(a) - np.log(ap)))  # sigma_k^2
        self.delta_B = np.log(ap) - np.log(a)
        std, c_x, slope = self._coefficients(a, ap)
        self.c_x = c_x
        e = self.family_eta
        ct = family_kl_factor(e) * self.delta_B if e > 0 else np.zeros_like(a)
        taus = self.schedule.T - np.concatenate([self.t, self.t_prev[-1:]])
        super().__init__(taus=taus, std=std, slope=slope, ct_kl_weight=ct, name=name)

    def _coefficients(self, a, ap):  # pragma: no cover - abstract
        raise NotImplementedError

    def mean(self, k, x, action):
        return float(self.c_x[k]) * x + float(self.slopes[k]) * action


class DDIMKernel(DiscreteVPKernel):
    r"""DDIM (Song et al. eq. 12), matching ``DDIMScheduler.step(eta=eta)``: :math:`\hat x_0 = (x - \sqrt{1-\bar\alpha}
    \epsilon)/\sqrt{\bar\alpha}`, :math:`m = \sqrt{\bar\alpha_p}\hat x_0 + \sqrt{1-\bar\alpha_p-\eta^2\sigma_k^2}\,
    \epsilon`, std :math:`\eta\sigma_k`. Family member :math:`e = \eta^2` (module docstring)."""

    def __init__(self, alphas_cumprod, timesteps, prev_timesteps, final_alphabar, eta: float, *, schedule=None):
        eta = float(eta)
        if not (0.0 <= eta <= 1.0):
            raise ValueError(f"DDIM 'eta' must be in [0, 1] (sqrt(1 - alphabar_prev - eta^2 sigma^2) >= 0), got {eta}")
        self.eta, self.family_eta = eta, eta**2
        super().__init__(alphas_cumprod, timesteps, prev_timesteps, final_alphabar, name=f"ddim(eta={eta})",
                         schedule=schedule)

    def _coefficients(self, a, ap):
        std = self.eta * np.sqrt(self.posterior_var)
        slope = (1 - a) * np.sqrt(ap / a) - np.sqrt((1 - a) * np.clip(1 - ap - std**2, 0, None))
        return std, np.sqrt(ap / a), slope


class DDPMKernel(DiscreteVPKernel):
    r"""DDPM ancestral step (Ho et al. eq. 6-7), matching ``DDPMScheduler.step`` with ``fixed_small``:
    :math:`\beta' = 1 - \bar\alpha/\bar\alpha_p`, :math:`m = \frac{\sqrt{\bar\alpha_p}\beta'}{1-\bar\alpha}\hat x_0
    + \frac{\sqrt{1-\beta'}(1-\bar\alpha_p)}{1-\bar\alpha}x`, std :math:`\sigma_k` (0 at timestep 0, as diffusers).
    Family member :math:`e = 1`; the default ``final_alphabar = 1`` is diffusers' "timestep -1"."""

    def __init__(self, alphas_cumprod, timesteps, prev_timesteps, final_alphabar: float = 1.0, *, schedule=None):
        super().__init__(alphas_cumprod, timesteps, prev_timesteps, final_alphabar, name="ddpm", schedule=schedule)

    def _coefficients(self, a, ap):
        beta = -np.expm1(np.log(a) - np.log(ap))
        c0, cs = np.sqrt(ap) * beta / (1 - a), np.sqrt(1 - beta) * (1 - ap) / (1 - a)
        std = np.where(self.timesteps > 0, np.sqrt(np.clip(self.posterior_var, 0, None)), 0.0)
        return std, c0 / np.sqrt(a) + cs, c0 * (1 - a) / np.sqrt(a)
