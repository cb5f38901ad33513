r"""Pathwise gradients through the solver by torchsde, with backprop or the stochastic adjoint (theory.md R6).

The Itô adjoint of torchsde is O(dt)-biased at practical step sizes (see environment.md), so this module
uses the **Stratonovich reversible Heun** pair (``method="reversible_heun"``,
``adjoint_method="adjoint_reversible_heun"``), whose adjoint reproduces backprop through the same
discretisation to round-off. The sampler's noise :math:`\sqrt{\eta}\,g` is additive (it depends on time
only, for any noise level :math:`\eta(\tau)`), so its Itô and Stratonovich forms coincide and nothing else
changes.

**Stability.** Reversible Heun has a small stability region: on stiff schedules (VP with ``b_max = 20``,
rectified flow near ``t_max``) it needs many more steps than Euler; at moderate N prefer backprop through
the native Euler rollout (:func:`sa_theory.rollout.rollout` with autograd on).

The returned ``final`` and ``path_kl`` are differentiable; the per-path objective
:math:`r(Y_T) - \beta\,KL` (:func:`sa_theory.estimators.pathwise_objective`) differentiated with the
Brownian path held fixed is the pathwise estimator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .rollout import _TorchsdeSystem, uniform_grid
from .sde import ActionFn, ControlledSDE, check_finite

__all__ = ["pathwise_rollout"]


class _StratonovichSystem(_TorchsdeSystem):
    sde_type = "stratonovich"


def pathwise_rollout(sde: ControlledSDE, policy: ActionFn, y0: torch.Tensor, *, steps: int,
                     params: Sequence[torch.Tensor], reference: ActionFn | None = None, cond: Any = None,
                     seed: int = 0, adjoint: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Roll out with torchsde's reversible Heun on the uniform ``steps`` grid; differentiable output.

    ``params``: the tensors to differentiate with respect to (the adjoint needs them explicitly).
    ``adjoint=True`` uses ``sdeint_adjoint`` (memory O(1) in ``steps``); ``False`` backpropagates through
    ``sdeint``. Both see the same Brownian path (``seed`` is its entropy). Returns ``(Y_T, path_kl)``
    where ``path_kl`` (nats per path) is ``None`` without ``reference``.
    """
    import torchsde

    if y0.dim() < 2:
        raise ValueError("'y0' must have shape (batch, *event_shape)")
    check_finite("y0", y0)
    taus = uniform_grid(sde.T, steps, y0.dtype, y0.device)
    B, event = y0.shape[0], y0.shape[1:]
    system = _StratonovichSystem(sde, policy, reference, cond, event, taus)
    z0 = torch.cat([y0.reshape(B, -1), torch.zeros(B, 1, dtype=y0.dtype, device=y0.device)], dim=1)
    bm = torchsde.BrownianInterval(t0=0.0, t1=float(steps), size=z0.shape, dtype=y0.dtype, device=y0.device,
                                   entropy=int(seed))
    ts = torch.tensor([0.0, float(steps)], dtype=y0.dtype, device=y0.device)
    if adjoint:
        zs = torchsde.sdeint_adjoint(system, z0, ts, bm=bm, method="reversible_heun", dt=1.0,
                                     adjoint_method="adjoint_reversible_heun", adjoint_params=tuple(params))
    else:
        zs = torchsde.sdeint(system, z0, ts, bm=bm, method="reversible_heun", dt=1.0)
    final = zs[-1, :, : system.D].reshape(B, *event)
    return final, (zs[-1, :, -1] if reference is not None else None)
