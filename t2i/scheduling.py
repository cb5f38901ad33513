r"""Continuous time on real (discrete) diffusers schedulers, and the per-step Gaussian kernels we own.

**Discrete timesteps -> VP diffusion time.** A diffusers scheduler with ``num_train_timesteps = M`` holds
:math:`\bar\alpha_i = \prod_{j\le i}(1-\beta_j)`, ``i = 0..M-1``. We place timestep ``i`` at diffusion time
:math:`t_i = (i+1)/M` (``T = 1``) and define :math:`B(t) = -\log\bar\alpha(t)` piecewise linear through
the knots :math:`(0, 0), (t_i, -\log\bar\alpha_i)`. Then :class:`DiscreteVPSchedule` is a VP
:class:`sa_theory.schedules.Schedule` with :math:`\alpha_t = \sqrt{\bar\alpha(t)} = e^{-B(t)/2}`,
:math:`\sigma_t^2 = 1-\bar\alpha(t)` and piecewise constant rate :math:`g^2(t) = b(t) = B'(t)`; it reproduces
``alphas_cumprod`` at the knots (tested), so ``g2 dtau`` etc. are defined for any number of sampling steps.
Sampler time is :math:`\tau = T - t`.

**Score = action.** An epsilon-prediction network gives the score :math:`s = -\epsilon/\sqrt{1-\bar\alpha_t}`
(:func:`score_from_eps`). With classifier-free guidance the **action is the guided score**
:math:`-(\epsilon_u + w(\epsilon_c-\epsilon_u))/\sqrt{1-\bar\alpha_t}`, for the policy and for the pretrained
model alike (both guided with the same ``w``).

**Per-step Gaussian kernels.** diffusers has no log-prob API, so :class:`DDIMKernel` (any ``eta``; ``eta=1``
is the DDPM-like stochastic sampler) and :class:`DDPMKernel` (``variance_type="fixed_small"``) give the mean
and std of :math:`p(x_{k+1}\mid x_k)` in closed form; both are pinned by tests against ``scheduler.step``.
The mean is affine in the noise prediction: :math:`m = c_x x + c_\epsilon \epsilon`, hence affine in the
action with slope :math:`-c_\epsilon\sqrt{1-\bar\alpha_t}`. The exact per-step KL between two policies on the
same state is therefore

.. math:: KL_k = \frac{|m_1 - m_2|^2}{2\,\mathrm{std}_k^2} = \frac{w_k}{2}|a_1 - a_2|^2,\qquad
          w_k = \frac{c_\epsilon^2 (1-\bar\alpha_{t_k})}{\mathrm{std}_k^2},

summed over latent dimensions (nats per step). ``w_k`` is the *effective* :math:`g^2\,d\tau` of step ``k``: as
the number of steps grows it tends to :math:`\int_{t_{k+1}}^{t_k} g^2\,dt = B(t_k) - B(t_{k+1})` (tested), so
path KLs are step-count independent. Steps with ``std = 0`` (deterministic, e.g. DDIM ``eta=0``) have no
density: they are masked out of log-probs and KLs (``kernel.stochastic``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sa_theory.schedules import Schedule

__all__ = [
    "DiscreteVPSchedule",
    "score_from_eps",
    "eps_from_score",
    "eps_from_model_output",
    "StepKernel",
    "DDIMKernel",
    "DDPMKernel",
    "make_kernel",
    "make_sampling_scheduler",
    "SAMPLERS",
    "TRAIN_SAMPLERS",
]

TRAIN_SAMPLERS = ("ddim", "ddpm")  # samplers with log-probabilities (training)
SAMPLERS = ("ddim", "ddpm", "dpmsolver++", "unipc", "deis")  # samplers for sampling / evaluation


def _interp_torch(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (like ``np.interp``, clamped at the ends), differentiable in ``x``."""
    xp, fp = xp.to(x.device, x.dtype), fp.to(x.device, x.dtype)
    xc = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, xc.detach().contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (xc - x0) / (x1 - x0)


@dataclass(frozen=True, kw_only=True)
class DiscreteVPSchedule(Schedule):
    """VP schedule whose :math:`\\bar\\alpha(t)` interpolates a scheduler's ``alphas_cumprod`` (module
    docstring).

    ``alphas_cumprod``: tuple of the M training :math:`\\bar\\alpha_i`. ``t_of_timestep(i) = (i+1)/M``;
    ``log_alpha`` is linear between knots, ``g2`` piecewise constant (the left-continuous slope of B).
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

    @classmethod
    def from_scheduler(cls, scheduler) -> DiscreteVPSchedule:
        return cls(alphas_cumprod=tuple(float(a) for a in scheduler.alphas_cumprod.double()))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    # -- timestep <-> time
    def t_of_timestep(self, timestep):
        """Diffusion time of a training timestep index ``i``: :math:`(i+1)T/M` (``-1`` -> 0)."""
        return (np.asarray(timestep, dtype=np.float64) + 1.0) / self.num_train_timesteps * self.T

    def t_of_alphabar(self, alphabar):
        """Inverse map: the diffusion time at which :math:`\\bar\\alpha(t)` equals ``alphabar``."""
        return np.interp(-np.log(np.asarray(alphabar, dtype=np.float64)), self._knots_B, self._knots_t)

    # -- Schedule interface
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
        idx = np.clip(
            np.searchsorted(self._knots_t, np.asarray(t, dtype=float), side="left") - 1, 0, rates.size - 1
        )
        return rates[idx]

    def f(self, t):
        return -0.5 * self.g2(t)

    def marginal_var(self, t):
        return -(torch if isinstance(t, torch.Tensor) else np).expm1(-self.B(t))


# --------------------------------------------------------------------------- score <-> eps
def score_from_eps(eps: torch.Tensor, alphabar_t: torch.Tensor | float) -> torch.Tensor:
    """:math:`s = -\\epsilon/\\sqrt{1-\\bar\\alpha_t}` (the action)."""
    return -eps / torch.as_tensor(1.0 - alphabar_t, dtype=eps.dtype, device=eps.device).sqrt()


def eps_from_score(score: torch.Tensor, alphabar_t: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`score_from_eps`."""
    return -score * torch.as_tensor(1.0 - alphabar_t, dtype=score.dtype, device=score.device).sqrt()


def eps_from_model_output(
    output: torch.Tensor, sample: torch.Tensor, alphabar_t: float, prediction_type: str
) -> torch.Tensor:
    """Noise prediction from a model output of the given ``prediction_type`` (``epsilon`` or
    ``v_prediction``)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(alphabar_t) * output + math.sqrt(1.0 - alphabar_t) * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")


# --------------------------------------------------------------------------- per-step kernels
@dataclass
class StepKernel:
    """Gaussian kernel :math:`N(m_k, \\mathrm{std}_k^2 I)` of each sampling step ``k = 0..K-1``.

    Attributes (all length K, float64 numpy): ``timesteps`` (scheduler integers), ``alphabar`` at the step's
    timestep, ``alphabar_prev`` at the target, ``c_x``/``c_eps`` (``m = c_x x + c_eps eps``), ``std``,
    ``kl_weight`` (:math:`w_k`, the effective :math:`g^2 d\\tau`), ``t``/``t_prev`` (diffusion time),
    ``taus`` (K+1 sampler times), ``stochastic`` (std > 0).
    """

    timesteps: np.ndarray
    alphabar: np.ndarray
    alphabar_prev: np.ndarray
    c_x: np.ndarray
    c_eps: np.ndarray
    std: np.ndarray
    schedule: DiscreteVPSchedule
    name: str = "kernel"

    def __post_init__(self) -> None:
        self.t = self.schedule.t_of_timestep(self.timesteps)
        self.t_prev = self.schedule.t_of_alphabar(self.alphabar_prev)
        self.taus = self.schedule.T - np.concatenate([self.t, self.t_prev[-1:]])
        self.stochastic = self.std > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            w = self.c_eps**2 * (1.0 - self.alphabar) / self.std**2
        self.kl_weight = np.where(self.stochastic, w, 0.0)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def mean(self, x: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
        """:math:`m_k(x, \\epsilon)` in the scheduler's own arithmetic (x0-prediction route)."""
        raise NotImplementedError

    def std_t(self, k: int, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.std[k], dtype=like.dtype, device=like.device)

    def step(self, x: torch.Tensor, eps: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
        """:math:`x_{k+1} = m_k + \\mathrm{std}_k\\,\\xi`."""
        return self.mean(x, eps, k) + self.std_t(k, x) * noise

    def action(self, eps: torch.Tensor, k: int) -> torch.Tensor:
        """The action (score) of a noise prediction at step ``k``."""
        return score_from_eps(eps, float(self.alphabar[k]))


def _check_no_clipping(scheduler) -> None:
    cfg = scheduler.config
    if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
        raise ValueError(
            "scheduler 'clip_sample'/'thresholding' must be False: clipping x0 makes the step "
            "non-Gaussian in the action (set scheduler.register_to_config(clip_sample=False))"
        )


class DDIMKernel(StepKernel):
    """DDIM with parameter ``eta`` (Song et al. eq. 12/16), matching ``DDIMScheduler.step``:

    :math:`\\hat x_0 = (x - \\sqrt{1-\\bar\\alpha_t}\\epsilon)/\\sqrt{\\bar\\alpha_t}`,
    :math:`\\sigma^2 = \\frac{1-\\bar\\alpha_{p}}{1-\\bar\\alpha_t}(1-\\bar\\alpha_t/\\bar\\alpha_p)`,
    :math:`m = \\sqrt{\\bar\\alpha_p}\\hat x_0 + \\sqrt{1-\\bar\\alpha_p-\\eta^2\\sigma^2}\\,\\epsilon`,
    std :math:`=\\eta\\sigma`.
    """

    @classmethod
    def from_scheduler(cls, scheduler, eta: float) -> DDIMKernel:
        _check_no_clipping(scheduler)
        if eta < 0:
            raise ValueError(f"'eta' must be >= 0, got {eta}")
        ac = scheduler.alphas_cumprod.double().numpy()
        final = float(scheduler.final_alpha_cumprod)
        ts = scheduler.timesteps.numpy().astype(np.int64)
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        prev = ts - ratio
        a = ac[ts]
        ap = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
        var = (1 - ap) / (1 - a) * (1 - a / ap)
        std = eta * np.sqrt(var)
        c_x = np.sqrt(ap / a)
        c_eps = np.sqrt(np.clip(1 - ap - std**2, 0, None)) - np.sqrt(ap) * np.sqrt(1 - a) / np.sqrt(a)
        k = cls(
            ts, a, ap, c_x, c_eps, std, DiscreteVPSchedule.from_scheduler(scheduler), name=f"ddim(eta={eta})"
        )
        k.eta = eta
        return k

    def mean(self, x, eps, k):
        a, ap, s = float(self.alphabar[k]), float(self.alphabar_prev[k]), float(self.std[k])
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return ap**0.5 * x0 + (1 - ap - s**2) ** 0.5 * eps


class DDPMKernel(StepKernel):
    """DDPM ancestral step (Ho et al. eq. 6-7), matching ``DDPMScheduler.step`` with ``fixed_small`` variance:

    :math:`\\beta' = 1-\\bar\\alpha_t/\\bar\\alpha_p`, :math:`m =
    \\frac{\\sqrt{\\bar\\alpha_p}\\beta'}{1-\\bar\\alpha_t}\\hat x_0
    + \\frac{\\sqrt{1-\\beta'}(1-\\bar\\alpha_p)}{1-\\bar\\alpha_t}x`, std
    :math:`=\\sqrt{\\frac{1-\\bar\\alpha_p}{1-\\bar\\alpha_t}\\beta'}`
    (0 at timestep 0).
    """

    @classmethod
    def from_scheduler(cls, scheduler) -> DDPMKernel:
        _check_no_clipping(scheduler)
        if scheduler.config.variance_type not in ("fixed_small", None):
            raise ValueError(
                f"DDPM variance_type {scheduler.config.variance_type!r} not supported; use 'fixed_small'"
            )
        ac = scheduler.alphas_cumprod.double().numpy()
        ts = scheduler.timesteps.numpy().astype(np.int64)
        prev = np.concatenate([ts[1:], [-1]])
        a = ac[ts]
        ap = np.where(prev >= 0, ac[np.clip(prev, 0, None)], 1.0)
        beta = 1 - a / ap
        c0 = np.sqrt(ap) * beta / (1 - a)
        cs = np.sqrt(1 - beta) * (1 - ap) / (1 - a)
        std = np.where(ts > 0, np.sqrt(np.clip((1 - ap) / (1 - a) * beta, 1e-20, None)), 0.0)
        c_x = c0 / np.sqrt(a) + cs
        c_eps = -c0 * np.sqrt(1 - a) / np.sqrt(a)
        k = cls(ts, a, ap, c_x, c_eps, std, DiscreteVPSchedule.from_scheduler(scheduler), name="ddpm")
        k._c0, k._cs = c0, cs
        return k

    def mean(self, x, eps, k):
        a = float(self.alphabar[k])
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return float(self._c0[k]) * x0 + float(self._cs[k]) * x


def make_kernel(
    scheduler_config, sampler: str, num_steps: int, eta: float = 1.0
) -> tuple[object, StepKernel]:
    """Build a fresh diffusers scheduler for ``sampler`` (``ddim``/``ddpm``) with ``num_steps`` set, and
    its kernel."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler == "ddim":
        sch = DDIMScheduler.from_config(scheduler_config, clip_sample=False, thresholding=False)
        sch.set_timesteps(num_steps)
        return sch, DDIMKernel.from_scheduler(sch, eta)
    if sampler == "ddpm":
        sch = DDPMScheduler.from_config(
            scheduler_config, clip_sample=False, thresholding=False, variance_type="fixed_small"
        )
        sch.set_timesteps(num_steps)
        return sch, DDPMKernel.from_scheduler(sch)
    raise ValueError(f"training sampler {sampler!r} has no log-probabilities; choose one of {TRAIN_SAMPLERS}")


def make_sampling_scheduler(scheduler_config, sampler: str):
    """A diffusers scheduler for sampling/evaluation, including higher-order multistep solvers
    (``dpmsolver++``: DPMSolverMultistepScheduler, ``unipc``, ``deis``). No log-probabilities."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    )

    table = {
        "ddim": (DDIMScheduler, {"clip_sample": False}),
        "ddpm": (DDPMScheduler, {"clip_sample": False}),
        "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "unipc": (UniPCMultistepScheduler, {}),
        "deis": (DEISMultistepScheduler, {}),
    }
    if sampler not in table:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(table)}")
    cls, kw = table[sampler]
    return cls.from_config(scheduler_config, **kw)
