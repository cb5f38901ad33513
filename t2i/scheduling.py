r"""diffusers schedulers -> the core's Gaussian step kernels (:mod:`sa_theory.kernels`): a thin adapter.

The kernel maths (DDIM, DDPM, the discrete VP schedule, KL weights, the deterministic-step threshold) lives in
:mod:`sa_theory.kernels`; this module builds a diffusers scheduler, sets its timesteps and hands the arrays
(``alphas_cumprod``, the timesteps, each step's previous timestep as diffusers' ``step`` computes it, the
final :math:`\bar\alpha`) to the core kernel. Both kernels are pinned to ``scheduler.step`` by tests.

**Score = action.** An epsilon-prediction network gives the score :math:`s = -\epsilon/\sqrt{1-\bar\alpha_t}`
(:func:`score_from_eps`). With classifier-free guidance the **action is the guided score**
:math:`-(\epsilon_u + w(\epsilon_c-\epsilon_u))/\sqrt{1-\bar\alpha_t}`, for the policy and for the pretrained
model alike (both guided with the same ``w``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sa_theory.kernels import DDIMKernel, DDPMKernel, DiscreteVPKernel, DiscreteVPSchedule

__all__ = [
    "DiscreteVPSchedule",
    "StepKernel",
    "score_from_eps",
    "eps_from_model_output",
    "kernel_from_scheduler",
    "make_kernel",
    "make_flow_kernel",
    "make_sampling_scheduler",
    "SAMPLERS",
    "TRAIN_SAMPLERS",
]

TRAIN_SAMPLERS = ("ddim", "ddpm", "flow")  # samplers with log-probabilities (training); "flow": SD3-class
FLOW_NOISE_KINDS = ("eta", "flow_grpo", "constant_sigma")  # sa_theory.flow_kernel.NOISE_KINDS
SAMPLERS = ("ddim", "ddpm", "dpmsolver++", "unipc", "deis")  # samplers for sampling / evaluation

#: the kernel type of the image samplers (DDIM / DDPM on a discrete VP schedule)
StepKernel = DiscreteVPKernel


def score_from_eps(eps: torch.Tensor, alphabar_t: torch.Tensor | float) -> torch.Tensor:
    """:math:`s = -\\epsilon/\\sqrt{1-\\bar\\alpha_t}` (the action)."""
    return -eps / torch.as_tensor(1.0 - alphabar_t, dtype=eps.dtype, device=eps.device).sqrt()


def eps_from_model_output(
    output: torch.Tensor, sample: torch.Tensor, alphabar_t: float | torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Noise prediction from a model output of the given ``prediction_type`` (``epsilon`` or
    ``v_prediction``). ``alphabar_t``: a number, or a float64 tensor broadcasting against ``output`` (one value per
    row: rows of several steps in one batch); the coefficients are rounded to ``output``'s dtype either way."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        if torch.is_tensor(alphabar_t):
            a = alphabar_t.double()
            return a.sqrt().to(output.dtype) * output + (1.0 - a).sqrt().to(output.dtype) * sample
        return math.sqrt(alphabar_t) * output + math.sqrt(1.0 - alphabar_t) * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")


def _check_no_clipping(scheduler) -> None:
    cfg = scheduler.config
    if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
        raise ValueError(
            "scheduler 'clip_sample'/'thresholding' must be False: clipping x0 makes the step "
            "non-Gaussian in the action (set scheduler.register_to_config(clip_sample=False))"
        )


def kernel_from_scheduler(scheduler, eta: float = 1.0, schedule: DiscreteVPSchedule | None = None) -> StepKernel:
    """The core kernel of a diffusers ``DDIMScheduler`` (with ``eta``) or ``DDPMScheduler`` (``fixed_small``)
    whose ``set_timesteps`` has been called. ``schedule`` (optional) reuses a :class:`DiscreteVPSchedule`."""
    from diffusers import DDIMScheduler, DDPMScheduler

    _check_no_clipping(scheduler)
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler: call set_timesteps(num_steps) before building its kernel")
    ac = scheduler.alphas_cumprod.double().numpy()
    ts = scheduler.timesteps.numpy().astype(np.int64)
    if isinstance(scheduler, DDIMScheduler):  # DDIMScheduler.step: prev = t - M // K, final_alpha_cumprod below 0
        M, n = scheduler.config.num_train_timesteps, scheduler.num_inference_steps
        prev = ts - M // n
        if np.any(prev[:-1] != ts[1:]):
            raise ValueError(
                f"scheduler: DDIMScheduler.step moves each timestep t to t - {M // n}, which is not the next "
                f"timestep with timestep_spacing={scheduler.config.timestep_spacing!r} and {n} steps; use "
                f"'leading', or 'trailing' with a step count dividing {M}"
            )
        return DDIMKernel(ac, ts, prev, float(scheduler.final_alpha_cumprod), eta, schedule=schedule)
    if isinstance(scheduler, DDPMScheduler):  # DDPMScheduler.previous_timestep: next in the list, then -1 -> 1
        if scheduler.config.variance_type not in ("fixed_small", None):
            raise ValueError(
                f"DDPM variance_type {scheduler.config.variance_type!r} not supported; use 'fixed_small'"
            )
        return DDPMKernel(ac, ts, np.concatenate([ts[1:], [-1]]), 1.0, schedule=schedule)
    raise ValueError(f"scheduler {type(scheduler).__name__} has no Gaussian kernel; use DDIM or DDPM")


def make_kernel(scheduler_config, sampler: str, num_steps: int, eta: float = 1.0) -> tuple[object, StepKernel]:
    """Build a fresh diffusers scheduler for ``sampler`` (``ddim``/``ddpm``) with ``num_steps`` set, and
    its kernel."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler == "ddim":
        sch = DDIMScheduler.from_config(scheduler_config, clip_sample=False, thresholding=False)
    elif sampler == "ddpm":
        sch = DDPMScheduler.from_config(
            scheduler_config, clip_sample=False, thresholding=False, variance_type="fixed_small"
        )
    else:
        raise ValueError(
            f"training sampler {sampler!r} has no log-probabilities; choose one of {TRAIN_SAMPLERS}"
        )
    sch.set_timesteps(num_steps)
    return sch, kernel_from_scheduler(sch, eta)


def make_flow_kernel(scheduler_config, num_steps: int, noise: str = "eta", noise_value: float = 1.0,
                     at_one: str = "ode"):
    """A ``FlowMatchEulerDiscreteScheduler`` from ``scheduler_config`` (its shift included) with ``num_steps``
    set, and the rectified-flow kernel on its sigma grid (:class:`sa_theory.flow_kernel.FlowMatchKernel`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sa_theory.flow_kernel import FlowMatchKernel

    sch = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sch.set_timesteps(num_steps)
    return sch, FlowMatchKernel(sch.sigmas.double().numpy(), (noise, noise_value), at_one)


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
