"""Closed-form ground truth: low-dimensional fine-tuning problems whose optimum is known exactly.

Both take ``schedule`` (any, including :class:`sa_theory.schedules.RectifiedFlow`) and the sampler's noise level
``noise`` (eta, theory.md §5; default 1, the reverse SDE); every optimum is that of the eta-process.

* :class:`LinearGaussianProblem` -- Gaussian data, quadratic reward: exact V*, a*, J(theta), grad J,
  the Euler chain's exact expectations, V^theta, the performance difference and the trust-region surrogate.
* :class:`GaussianMixtureProblem` -- Gaussian-mixture data, linear reward: exact score, V*, a*, the tilted
  mixture and the fixed-initial-law optimum.
"""

from .gaussian_mixture import GaussianMixtureProblem
from .linear_gaussian import LinearGaussianProblem, gaussian_kl

__all__ = ["LinearGaussianProblem", "GaussianMixtureProblem", "gaussian_kl"]
