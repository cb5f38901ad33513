r"""Policies: networks for the action mean :math:`\mu_\theta(\tau, y, c)`, started at the pretrained score.

All are ``nn.Module`` s with the :data:`sa_theory.sde.ActionFn` call ``policy(tau, y, cond) -> (B, d)``
(``tau`` a 0-dim tensor). They also implement ``grid_means(taus, states, cond, base)`` which evaluates
:math:`\mu_\theta(\tau_k, Y_k)` for all ``k`` in one batched call (``taus (n,)``, ``states (n, B, d)``,
``base (n, B, d)`` the pretrained actions on those states, which the rollout already recorded); the
trainers use it when present.

* :class:`ResidualMLPPolicy`: :math:`\mu = s_\text{pre}(T-\tau, y, c) + \mathrm{NN}(\tau/T, y, c)`, the
  last layer zero-initialised so that the policy starts exactly at the pretrained score.
* :class:`MLPPolicy`: a plain network on :math:`(\tau, y, c)`, initialised at the pretrained score by
  regression (:meth:`MLPPolicy.distill`).
* :class:`PiecewiseAffinePolicy`: :math:`\mu = s_\text{pre} + K(\tau) y + k(\tau)` with :math:`K, k`
  constant on ``M`` equal pieces of :math:`[0, T]`; parameters packed exactly like
  :class:`toy_problems.LinearGaussianProblem`'s ``theta`` (:meth:`PiecewiseAffinePolicy.theta`), so its
  exact objective and the closed-form optimum of the class are available.
* :class:`GreedyPolicy`: the critic's policy-improvement action :math:`s_\text{pre} + \nabla_y V_\psi/\beta`
  (no parameters of its own; :meth:`sa_theory.algorithms.Trainer.greedy_policy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..estimators import value_grad
from ..sde import check_finite

__all__ = ["ResidualMLPPolicy", "MLPPolicy", "PiecewiseAffinePolicy", "GreedyPolicy", "mlp", "grid_means"]


def mlp(in_dim: int, out_dim: int, hidden: int, depth: int, zero_last: bool = False) -> nn.Sequential:
    """``depth`` hidden SiLU layers of width ``hidden``; optionally a zero-initialised last layer."""
    layers, width = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, out_dim)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def _features(tau: torch.Tensor, y: torch.Tensor, cond: Any, T: float, cond_dim: int) -> torch.Tensor:
    """``[tau/T, y, cond]`` per row; ``tau`` 0-dim or ``(B,)``."""
    tau = torch.as_tensor(tau, dtype=y.dtype, device=y.device)
    col = (tau.expand(y.shape[0]) if tau.dim() == 0 else tau).reshape(-1, 1) / T
    feats = [col, y.reshape(y.shape[0], -1)]
    if cond_dim:
        feats.append(cond.reshape(y.shape[0], -1).to(y.dtype))
    return torch.cat(feats, dim=1)


def _flat_grid(taus: torch.Tensor, states: torch.Tensor, cond: Any):
    n, B = states.shape[:2]
    tau_rows = taus[:, None].expand(n, B).reshape(-1)
    y = states.reshape(n * B, *states.shape[2:])
    c = None if cond is None else cond[None].expand(n, *cond.shape).reshape(n * B, *cond.shape[1:])
    return tau_rows, y, c


class ResidualMLPPolicy(nn.Module):
    r""":math:`\mu_\theta(\tau,y,c) = s_\text{pre}(T-\tau,y,c) + \mathrm{NN}_\theta([\tau/T, y, c])`.

    ``base`` is the pretrained action ``(tau, y, cond) -> (B, d)``; the network's last layer is zero at
    initialisation, so :math:`\mu_\theta = s_\text{pre}` there. Vector states ``(B, dim)`` only.
    """

    base_plus_residual = True  #: forward is base + residual (sa_theory.sampling.step_fns shares the base call)

    def __init__(self, base: Callable, dim: int, hidden: int = 64, depth: int = 2, cond_dim: int = 0,
                 T: float = 1.0):
        super().__init__()
        self.base, self.dim, self.cond_dim, self.T = base, dim, cond_dim, T
        self.net = mlp(1 + dim + cond_dim, dim, hidden, depth, zero_last=True)

    def residual(self, tau, y, cond=None) -> torch.Tensor:
        return self.net(_features(tau, y, cond, self.T, self.cond_dim))

    def forward(self, tau, y, cond=None):
        return self.base(tau, y, cond) + self.residual(tau, y, cond)

    def grid_means(self, taus, states, cond=None, base=None):
        n, B = states.shape[:2]
        if base is None:
            base = torch.stack([self.base(taus[k], states[k], cond) for k in range(n)])
        tr, y, c = _flat_grid(taus, states, cond)
        return base.detach() + self.residual(tr, y, c).reshape(states.shape)


class MLPPolicy(nn.Module):
    """Plain network :math:`\\mu_\\theta = \\mathrm{NN}_\\theta([\\tau/T, y, c])`; call :meth:`distill` to start
    it at the pretrained score (it is then only approximately the pretrained sampler)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, cond_dim: int = 0, T: float = 1.0):
        super().__init__()
        self.dim, self.cond_dim, self.T = dim, cond_dim, T
        self.net = mlp(1 + dim + cond_dim, dim, hidden, depth)

    def forward(self, tau, y, cond=None):
        return self.net(_features(tau, y, cond, self.T, self.cond_dim))

    def grid_means(self, taus, states, cond=None, base=None):
        tr, y, c = _flat_grid(taus, states, cond)
        return self.forward(tr, y, c).reshape(states.shape)

    def distill(self, target: Callable, sample_states: Callable[[int, torch.Generator], tuple], steps: int = 500,
                batch: int = 512, lr: float = 3e-3, seed: int = 0) -> float:
        """Regress onto ``target(tau, y, cond)`` on states from
        ``sample_states(n, gen) -> (tau (0-dim), y (n, d), cond)``
        (e.g. the pretrained sampler's marginals); returns the final mean-squared error."""
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        loss = torch.zeros(())
        for _ in range(steps):
            tau, y, c = sample_states(batch, gen)
            with torch.no_grad():
                tgt = target(tau, y, c)
            loss = ((self.forward(tau, y, c) - tgt) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())


class PiecewiseAffinePolicy(nn.Module):
    r""":math:`\mu = s_\text{pre}(T-\tau, y) + K_j y + k_j` on piece :math:`j = \lfloor \tau M/T \rfloor`.

    ``theta`` (an ``nn.Parameter``, zero at start = the pretrained sampler) is packed as
    ``[vec(K_1) row-major, k_1, ..., vec(K_M), k_M]`` (length :math:`M(d^2+d)`), the layout of
    ``LinearGaussianProblem``, so ``prob.exact_objective(policy.theta_numpy(), pieces=M)`` is exact.
    """

    base_plus_residual = True  #: forward is base + residual (sa_theory.sampling.step_fns shares the base call)

    def __init__(self, base: Callable, dim: int, pieces: int = 1, T: float = 1.0):
        super().__init__()
        self.base, self.dim, self.pieces, self.T = base, dim, pieces, T
        self.theta = nn.Parameter(torch.zeros(pieces * (dim * dim + dim)))
        self._frozen_blocks = None  # (theta alias, its version, dtype, (Ks, ks)): the blocks under no_grad

    def _blocks(self, dtype):
        """``(K (M, d, d), k (M, d))`` in ``dtype``. Without autograd (sampling) they are kept until ``theta`` changes
        (its in-place version counter or its storage), so a rollout does not re-slice ``theta`` at every step."""
        frozen = not torch.is_grad_enabled()
        c = self._frozen_blocks
        th = self.theta
        if frozen and c is not None and c[0].data_ptr() == th.data_ptr() and c[1] == th._version and c[2] == dtype:
            return c[3]
        d = self.dim
        b = th.to(dtype).reshape(self.pieces, d * d + d)
        blocks = b[:, : d * d].reshape(self.pieces, d, d), b[:, d * d :]
        if frozen:  # the alias keeps theta's storage alive, so its address cannot be reused while cached
            self._frozen_blocks = (th.detach(), th._version, dtype, tuple(x.detach() for x in blocks))
        return blocks

    def piece(self, tau) -> torch.Tensor | int:
        r"""Piece index :math:`\lfloor \tau M/T + 10^{-9}\rfloor` clamped to ``[0, M-1]``: an ``int`` for a number or
        a 0-dim tensor (the same float64 arithmetic in Python), a long tensor for a tensor of times."""
        if isinstance(tau, (int, float)) or (isinstance(tau, torch.Tensor) and tau.dim() == 0):
            return min(max(int(math.floor(float(tau) * self.pieces / self.T + 1e-9)), 0), self.pieces - 1)
        tau = torch.as_tensor(tau, dtype=torch.float64)
        return torch.clamp(torch.floor(tau * self.pieces / self.T + 1e-9).long(), 0, self.pieces - 1)

    def residual(self, tau, y, cond=None):
        """:math:`K_j y + k_j`, the policy's action minus its base (the pretrained action)."""
        Ks, ks = self._blocks(y.dtype)
        j = self.piece(tau)
        if isinstance(j, int):
            return y @ Ks[j].T + ks[j]
        return torch.einsum("bij,bj->bi", Ks[j], y) + ks[j]

    def forward(self, tau, y, cond=None):
        return self.base(tau, y, cond) + self.residual(tau, y, cond)

    def grid_means(self, taus, states, cond=None, base=None):
        n, B = states.shape[:2]
        if base is None:
            base = torch.stack([self.base(taus[k], states[k], cond) for k in range(n)])
        Ks, ks = self._blocks(states.dtype)
        j = self.piece(taus)
        corr = torch.einsum("nij,nbj->nbi", Ks[j], states) + ks[j][:, None]
        return base.detach() + corr

    def theta_numpy(self) -> np.ndarray:
        return self.theta.detach().to(torch.float64).cpu().numpy().copy()


class GreedyPolicy(nn.Module):
    r"""The greedy action of a critic: :math:`\mu(\tau, y, c) = s_\text{pre}(\tau, y, c) + \nabla_y V_\psi(\tau, y, c)
    / \beta`, the maximiser over :math:`a` of the Hamiltonian :math:`g^2 a\cdot p - \frac{\beta g^2}{2}|a - s|^2`
    at :math:`p = \nabla_y V_\psi` (R4): one step of policy improvement on the critic's value. If the critic
    is :math:`V^*` it is the optimal policy. The gradient is taken per sample by autograd of
    :math:`\sum_b V_\psi(\tau, y_b)` (:func:`sa_theory.estimators.value_grad`; the critic must treat the rows of
    a batch independently). It holds the critic by reference: later critic updates change it. ``beta`` must be > 0."""

    def __init__(self, value: Callable, pretrained_action: Callable, beta: float, gain: Callable | float = 1.0):
        super().__init__()
        self.gain = gain  # 2 eta/(1 + eta) at noise eta (ControlledSDE.value_gain); 1 for the reverse SDE
        if not (isinstance(beta, (int, float)) and np.isfinite(beta) and beta > 0):
            raise ValueError(f"GreedyPolicy needs a finite 'beta' > 0, got {beta!r}")
        self.value, self.pretrained_action, self.beta = value, pretrained_action, float(beta)

    def forward(self, tau, y, cond=None):
        grad = check_finite("critic value gradient", value_grad(self.value, tau, y, cond))
        gain = self.gain(tau) if callable(self.gain) else self.gain
        return self.pretrained_action(tau, y, cond) + (gain * grad) / self.beta


def grid_means(policy: Callable, taus: torch.Tensor, states: torch.Tensor, cond: Any = None,
               base: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`\mu_\theta(\tau_k, Y_k)` for every row ``k`` of ``taus``/``states`` (``(n, B, *event)``); one
    batched call when the policy has ``grid_means``, otherwise a loop (any ``ActionFn``)."""
    states = states.detach()
    if hasattr(policy, "grid_means"):
        return policy.grid_means(taus, states, cond, base)
    return torch.stack([policy(taus[k], states[k], cond) for k in range(taus.shape[0])])
