"""scores-as-actions core: the sampler of a diffusion model as a controlled SDE whose action is the score.

Modules: :mod:`~sa_theory.schedules` (forward noise schedules, incl. rectified flow),
:mod:`~sa_theory.parametrization` (velocity / eps / x0 <-> score maps), :mod:`~sa_theory.sde` (the
controlled sampler of noise level eta: reverse SDE at eta = 1, probability-flow ODE at eta = 0),
:mod:`~sa_theory.rollout` (native and torchsde rollouts), :mod:`~sa_theory.estimators` (policy-gradient
estimators, surrogates, baselines), :mod:`~sa_theory.value` (value designs and losses),
:mod:`~sa_theory.kl` (log-probabilities and the Girsanov path KL, with units), :mod:`~sa_theory.kernels` and
:mod:`~sa_theory.flow_kernel` (Gaussian step kernels: Euler, DDIM, DDPM, rectified flow), :mod:`~sa_theory.sampling`
(the one sampling loop over any kernel).
"""

from . import estimators, flow_kernel, kernels, kl, parametrization, rollout, sampling, schedules, sde, value
from .kl import euler_log_prob, gaussian_log_prob, girsanov_kl_rate, girsanov_kl_step, mean_and_se, path_kl
from .rollout import Trajectory
from .rollout import rollout as simulate
from .schedules import ConstantOU, RectifiedFlow, VEGeometric, VPCosine, VPLinear, get_schedule
from .sde import ControlledSDE

__all__ = [
    "estimators", "flow_kernel", "kernels", "kl", "parametrization", "rollout", "sampling", "schedules", "sde",
    "value",
    "euler_log_prob", "gaussian_log_prob", "girsanov_kl_rate", "girsanov_kl_step", "mean_and_se", "path_kl",
    "Trajectory", "simulate", "ConstantOU", "RectifiedFlow", "VEGeometric", "VPCosine", "VPLinear",
    "get_schedule", "ControlledSDE",
]
__version__ = "0.1.0"
