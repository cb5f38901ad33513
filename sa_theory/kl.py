r"""Log-probabilities of Euler transitions and the Girsanov path KL: one implementation each.

Units, once and for all:

* :func:`gaussian_log_prob` and :func:`euler_log_prob` return the log-density **summed over every
  non-batch dimension** (nats per sample / per transition), never a per-pixel mean.
* :func:`girsanov_kl_rate` is the KL **per unit sampler time** (nats per unit tau, summed over dimensions);
  :func:`girsanov_kl_step` is the KL of **one Euler step** of length ``dtau`` (nats per step).
  Summing the steps gives :func:`path_kl`, nats per path.

Girsanov (theory.md §1, §5): for two samplers of noise level :math:`\eta` (:class:`sa_theory.sde.ControlledSDE`)
with drifts differing by :math:`\frac{1+\eta}{2}g^2(\mu-s)` and the same diffusion :math:`\sqrt\eta\,g`,

.. math:: KL(P^\mu \| P^s) = E^\mu \int_0^T \frac{w}{2} |\mu - s|^2\, d\tau, \qquad
          w = \frac{(1+\eta)^2}{4\eta}\, g^2 \quad (\texttt{sde.kl\_weight\_rate}),

so :math:`w = g^2` for the reverse SDE (:math:`\eta = 1`) and :math:`w \to \infty` as :math:`\eta \to 0`.
The per-step Gaussian KL of two Euler transitions :math:`N(y + b_1 d\tau, \eta g^2 d\tau I)` and
:math:`N(y + b_2 d\tau, \eta g^2 d\tau I)` is exactly :math:`\frac{w\, d\tau}{2}|\mu - s|^2`, so the discrete
and continuous definitions agree step by step. The functions below take the weight ``w`` (called ``g2``
for backward compatibility: pass ``sde.kl_weight_rate(tau)``, which is :math:`g^2` at :math:`\eta = 1`).
Averaging over dimensions or dropping the :math:`1/d\tau` (as some peers do) is not offered here.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "sum_event",
    "gaussian_log_prob",
    "euler_log_prob",
    "girsanov_kl_rate",
    "girsanov_kl_step",
    "path_kl",
    "mean_and_se",
    "mean_se",
    "gaussian_mean_kl",
]


def sum_event(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first (batch) one: ``(B, *event) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    r""":math:`\log N(x; m, \mathrm{std}^2 I)`, summed over non-batch dims. Shape ``(B,)``, nats.

    ``std`` is a scalar or broadcasts against ``x``.
    """
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    z = (x - mean) / std
    log_norm = torch.log(std) + 0.5 * math.log(2 * math.pi)
    return sum_event(-0.5 * z**2 - log_norm * torch.ones_like(z))


def euler_log_prob(y_next: torch.Tensor, y: torch.Tensor, drift: torch.Tensor, g: torch.Tensor | float,
                   dtau: float) -> torch.Tensor:
    r"""Log-density of one Euler-Maruyama transition, summed over dimensions (nats per step).

    :math:`\log N(y_{k+1};\; y_k + b_k\,d\tau,\; g_k^2\,d\tau\,I)`. Shape ``(B,)``. ``g`` is the
    diffusion coefficient of the step (``sde.diffusion(tau)`` :math:`= \sqrt{\eta} g`).
    """
    std = torch.as_tensor(g, dtype=y.dtype, device=y.device) * math.sqrt(dtau)
    return gaussian_log_prob(y_next, y + drift * dtau, std)


def girsanov_kl_rate(g2: torch.Tensor | float, action: torch.Tensor, ref_action: torch.Tensor) -> torch.Tensor:
    r"""KL rate :math:`\frac{w}{2}|a - s|^2` (nats per unit sampler time, summed over dims), ``(B,)``;
    ``g2`` is the KL weight rate :math:`w` (``sde.kl_weight_rate(tau)``; :math:`g^2` at :math:`\eta = 1`)."""
    return 0.5 * g2 * sum_event((action - ref_action) ** 2)


def girsanov_kl_step(g2: torch.Tensor | float, dtau: float, action: torch.Tensor,
                     ref_action: torch.Tensor) -> torch.Tensor:
    r"""KL of one Euler step, :math:`\frac{w\,d\tau}{2}|a - s|^2` (nats per step, summed over dims); ``g2`` is
    the KL weight rate :math:`w = \frac{(1+\eta)^2}{4\eta}g^2` (``sde.kl_weight_rate``)."""
    return girsanov_kl_rate(g2, action, ref_action) * dtau


def path_kl(kl_steps: torch.Tensor) -> torch.Tensor:
    """Per-path Girsanov KL (nats per path) from per-step KLs of shape ``(N, B)``: sum over steps."""
    return kl_steps.sum(dim=0)


def mean_and_se(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo mean and its standard error ``std / sqrt(n)`` along ``dim``."""
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"need at least 2 samples for a standard error, got {n}")
    return x.mean(dim=dim), x.std(dim=dim, unbiased=True) / math.sqrt(n)


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` (unbiased std) of all values of ``x`` (tensor, array or list), as
    float64 floats; the standard error is NaN for fewer than 2 values (the one mean +- SE of the project's reports)."""
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() < 2:
        return float(t.mean()) if t.numel() else float("nan"), float("nan")
    m, se = mean_and_se(t)
    return float(m), float(se)


def gaussian_mean_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    r""":math:`KL(N(m_p, \mathrm{std}^2 I)\|N(m_q, \mathrm{std}^2 I)) = |m_p - m_q|^2/(2\,\mathrm{std}^2)`, summed over
    non-batch dims (nats per step), ``(B,)``. For an Euler step, ``std^2 = eta g^2 dtau`` and
    ``m_p - m_q = (1+eta)/2 g^2 dtau (a - s)``, which gives :func:`girsanov_kl_step` with the weight
    ``(1+eta)^2/(4 eta) g^2`` exactly."""
    return sum_event((mean_p - mean_q) ** 2) / (2 * torch.as_tensor(std, dtype=mean_p.dtype) ** 2)
