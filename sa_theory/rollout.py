r"""Rolling out the controlled sampler: a lean native loop and a torchsde backend, one interface.

>>> traj = rollout(ControlledSDE(schedule), policy, y0, steps=100, reference=pretrained, seed=0)
>>> traj.final            # Y_T, shape (B, *event)
>>> traj.path_kl          # Girsanov KL per path (nats), shape (B,)

Grid: uniform :math:`\tau_k = kT/N`, :math:`k = 0..N`, :math:`d\tau = T/N`. The Euler-Maruyama step of the
sampler of noise level :math:`\eta` (``sde.noise``, constant or a function of tau) freezes the coefficients
at the left end:

.. math:: Y_{k+1} = Y_k + \big[-f_k Y_k + \tfrac{1+\eta_k}{2} g_k^2\,a_k\big] d\tau
          + \sqrt{\eta_k}\, g_k\sqrt{d\tau}\,\xi_k,
          \qquad a_k = \mu_\theta(\tau_k, Y_k, c) \;(+\ \sigma_a \varepsilon_k),\ \xi_k,\varepsilon_k \sim N(0, I).

Backends:

* ``backend="native"``: methods ``"euler"`` (Euler-Maruyama: for a stochastic sampler without exploration
  noise, the one sampling loop :func:`~sa_theory.sampling.sample_chain` on the SDE's
  :class:`~sa_theory.kernels.EulerKernel`, as for every image sampler) and ``"heun"`` (stochastic Heun, second
  order for the ODE and for additive noise; with the ODE and exploration noise, a plain torch loop here).
  Differentiable: leave autograd on to backpropagate through the solver (pathwise gradients). Seeded by
  ``seed`` or ``generator``.
* ``backend="torchsde"``: :func:`torchsde.sdeint` with any of its Ito methods (``euler``, ``milstein``,
  ``srk``) and fixed step ``dtau``; the Brownian path is a ``torchsde.BrownianInterval`` seeded by
  ``entropy`` (``torch.manual_seed`` does not reach it). The KL integral is carried as an extra state.

What the returned :class:`Trajectory` holds (``save_every=1``, the default):

* ``states`` ``(N+1, B, *event)``; ``noise`` ``(N, B, *event)``: the standardised Brownian increments
  :math:`\xi_k = (B_{\tau_{k+1}} - B_{\tau_k})/\sqrt{d\tau}`;
* ``actions`` ``(N, B, *event)``: the actions :math:`a_k` used by the step; ``means`` the policy means
  :math:`\mu_\theta(\tau_k,Y_k)`; ``ref_actions`` the pretrained actions :math:`s_k` (when ``reference``);
* ``log_probs`` ``(N, B)``: :math:`\log N(Y_{k+1}; Y_k + b_k d\tau, \eta_k g_k^2 d\tau I)`, the Euler
  transition density **summed over dimensions** (nats per step; Euler only, :math:`\eta > 0`);
* ``kl_steps`` ``(N, B)``: :math:`\frac{w_k d\tau}{2}|a_k - s_k|^2` with the KL weight rate
  :math:`w_k = \frac{(1+\eta_k)^2}{4\eta_k} g_k^2` (``sde.kl_weight_rate``; :math:`g_k^2` at
  :math:`\eta = 1`): the exact KL of the two Euler steps, nats per step, summed over dims; ``path_kl``
  ``(B,)`` their sum, the Girsanov path KL estimate per path. For the ODE (:math:`\eta \equiv 0`) the path
  KL is infinite; there the rollout records the :math:`\eta = 1` integrand :math:`\frac{g_k^2 d\tau}{2}
  |a_k - s_k|^2` as a diagnostic (not a KL of the ODE).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .kernels import EulerKernel
from .kl import euler_log_prob, girsanov_kl_rate, girsanov_kl_step
from .sampling import check_action, sample_chain, step_fns
from .sde import ActionFn, ControlledSDE, check_finite

__all__ = ["Trajectory", "rollout", "uniform_grid", "kl_weights", "NATIVE_METHODS", "TORCHSDE_METHODS"]

NATIVE_METHODS = ("euler", "heun")
TORCHSDE_METHODS = ("euler", "milstein", "srk")


@dataclass
class Trajectory:
    """States and per-step records of a batch of sampler paths (see module docstring for shapes)."""

    taus: torch.Tensor
    final: torch.Tensor
    states: torch.Tensor | None = None
    saved_taus: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    actions: torch.Tensor | None = None
    means: torch.Tensor | None = None
    ref_actions: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    kl_steps: torch.Tensor | None = None
    path_kl: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.taus.numel() - 1

    @property
    def dtau(self) -> float:
        return float(self.taus[1] - self.taus[0])

    @property
    def batch_size(self) -> int:
        return self.final.shape[0]


def uniform_grid(T: float, steps: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """:math:`\\tau_k = kT/N`, ``k = 0..N`` (shape ``(N+1,)``)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"'steps' must be a positive integer, got {steps!r}")
    return torch.linspace(0.0, T, steps + 1, dtype=dtype, device=device)


def _validate(y0: torch.Tensor, backend: str, method: str) -> None:
    if not isinstance(y0, torch.Tensor) or y0.dim() < 2:
        raise ValueError("'y0' must be a tensor of shape (batch, *event_shape) with at least 2 dimensions")
    if not y0.is_floating_point():
        raise TypeError(f"'y0' must be floating point, got {y0.dtype}")
    check_finite("y0", y0)
    if backend == "native":
        if method not in NATIVE_METHODS:
            raise ValueError(f"'method' {method!r} is not a native method; choose from {NATIVE_METHODS}")
    elif backend == "torchsde":
        if method not in TORCHSDE_METHODS:
            raise ValueError(f"'method' {method!r} is not a torchsde Ito method here; choose from {TORCHSDE_METHODS}")
    else:
        raise ValueError(f"'backend' must be 'native' or 'torchsde', got {backend!r}")


def rollout(
    sde: ControlledSDE,
    policy: ActionFn,
    y0: torch.Tensor,
    *,
    steps: int,
    cond: Any = None,
    reference: ActionFn | None = None,
    backend: str = "native",
    method: str = "euler",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    exploration_std: float = 0.0,
    save_every: int | None = 1,
    check: bool = True,
) -> Trajectory:
    """Simulate the controlled sampler from ``y0`` over ``[0, T]`` with ``steps`` uniform steps.

    Parameters
    ----------
    sde: the controlled sampler of noise level ``sde.noise`` (``sde.ode``: the probability-flow ODE, no
        noise drawn).
    policy: action mean ``mu(tau, y, cond)``; must return a finite tensor of ``y``'s shape.
    reference: pretrained action ``s(tau, y, cond)``; when given, the Girsanov KL is recorded.
    backend, method: see the module docstring.
    seed / generator: randomness of the native backend (``seed`` is the torchsde ``entropy``).
    noise: optional fixed standardised Brownian increments ``(N, B, *event)`` (native backend), e.g. to
        hold the Brownian path fixed for finite differences.
    exploration_std: extra Gaussian action noise :math:`a = \\mu + \\sigma_a \\varepsilon` (native Euler);
        its draws are kept in ``traj.extras["action_noise"]``.
    save_every: record states/actions every this many steps (``1`` keeps everything that the estimators
        need); ``None`` keeps only ``final`` and the accumulated ``path_kl`` (low memory).
    check: raise ``FloatingPointError`` if the final state or KL is NaN/Inf, and (native backend) check every
        action of ``policy``/``reference`` for shape and finiteness.
    """
    _validate(y0, backend, method)
    if exploration_std < 0 or not math.isfinite(exploration_std):
        raise ValueError(f"'exploration_std' must be finite and >= 0, got {exploration_std}")
    taus = uniform_grid(sde.T, steps, y0.dtype, y0.device)
    if backend == "torchsde":
        if noise is not None or exploration_std:
            raise ValueError("'noise' and 'exploration_std' are supported by the native backend only")
        traj = _rollout_torchsde(sde, policy, y0, taus, cond, reference, method, seed, save_every)
    else:
        if generator is None and noise is None and not sde.ode:
            generator = torch.Generator(device=y0.device)
            generator.manual_seed(0 if seed is None else int(seed))
        traj = _rollout_native(sde, policy, y0, taus, cond, reference, method, generator, noise,
                               exploration_std, save_every, check)
    if check:
        check_finite("rollout final state", traj.final)
        if traj.path_kl is not None:
            check_finite("rollout path KL", traj.path_kl)
    return traj


def kl_weights(sde: ControlledSDE, taus: torch.Tensor) -> torch.Tensor:
    r"""KL weight rate on the grid: ``sde.kl_weight_rate`` (:math:`\eta > 0`), or :math:`g^2` for the ODE (the
    :math:`\eta = 1` Girsanov integrand, recorded as a diagnostic: the ODE's own path KL is infinite)."""
    return sde.g2(taus) if sde.ode else sde.kl_weight_rate(taus)


def _rollout_native(sde, policy, y0, taus, cond, reference, method, generator, noise, exploration_std,
                    save_every, check=True) -> Trajectory:
    N = taus.numel() - 1
    dt = float(taus[1] - taus[0])
    sqrt_dt = math.sqrt(dt)
    if noise is not None and noise.shape != (N, *y0.shape):
        raise ValueError(f"'noise' must have shape {(N, *y0.shape)}, got {tuple(noise.shape)}")
    keep = save_every is not None
    if keep and (not isinstance(save_every, int) or save_every < 1):
        raise ValueError(f"'save_every' must be a positive int or None, got {save_every!r}")
    full = keep and save_every == 1
    if method == "euler" and not sde.ode and not exploration_std:
        return _euler_via_chain(sde, policy, y0, taus, cond, reference, generator, noise, save_every, check)
    # Heun, the ODE and exploration noise: this loop. Coefficients on the grid, computed once
    f = sde.schedule.f_tau(taus)
    coef = sde.action_coef(taus)
    gdiff = sde.diffusion(taus)
    klw = kl_weights(sde, taus) if reference is not None else None
    if check:
        policy_fn, reference_fn = (lambda t, x, c: check_action("policy", policy(t, x, c), x)), (
            None if reference is None else (lambda t, x, c: check_action("reference", reference(t, x, c), x)))
    else:
        policy_fn, reference_fn = policy, reference

    y = y0
    states, saved_taus, noises, actions, means, refs, logps, kls, act_noise = [], [], [], [], [], [], [], [], []
    if keep:
        states.append(y0)
        saved_taus.append(taus[0])
    kl = torch.zeros(y0.shape[0], dtype=y0.dtype, device=y0.device)
    for k in range(N):
        tk = taus[k]
        mu = policy_fn(tk, y, cond)
        a = mu
        if exploration_std:
            eps = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
            a = mu + exploration_std * eps
            if full:
                act_noise.append(eps)
        drift = -f[k] * y + coef[k] * a
        if sde.ode:
            xi = None
            incr = 0.0
        else:
            xi = noise[k] if noise is not None else torch.randn(y.shape, generator=generator, dtype=y.dtype,
                                                                 device=y.device)
            incr = gdiff[k] * sqrt_dt * xi
        if method == "euler":
            y_next = y + drift * dt + incr
        else:  # heun: predictor-corrector, trapezoidal in drift and in the (time-dependent) noise scale
            y_pred = y + drift * dt + incr
            a_pred = policy_fn(taus[k + 1], y_pred, cond)
            drift_pred = -f[k + 1] * y_pred + coef[k + 1] * a_pred
            incr2 = 0.0 if sde.ode else 0.5 * (gdiff[k] + gdiff[k + 1]) * sqrt_dt * xi
            y_next = y + 0.5 * (drift + drift_pred) * dt + incr2
        if reference is not None:
            s = reference_fn(tk, y, cond)
            step_kl = girsanov_kl_step(klw[k], dt, a if not exploration_std else mu, s)
            kl = kl + step_kl
            if full:
                refs.append(s)
                kls.append(step_kl)
        if full:
            means.append(mu)
            actions.append(a)
            if xi is not None:
                noises.append(xi)
            if method == "euler" and not sde.ode:
                logps.append(euler_log_prob(y_next, y, drift, gdiff[k], dt))
        y = y_next
        if keep and ((k + 1) % save_every == 0 or k + 1 == N):
            states.append(y)
            saved_taus.append(taus[k + 1])

    def stack(xs):
        return torch.stack(xs) if xs else None

    traj = Trajectory(
        taus=taus,
        final=y,
        states=stack(states),
        saved_taus=stack(saved_taus),
        noise=stack(noises),
        actions=stack(actions),
        means=stack(means),
        ref_actions=stack(refs),
        log_probs=stack(logps),
        kl_steps=stack(kls),
        path_kl=kl if reference is not None else None,
    )
    if act_noise:
        traj.extras["action_noise"] = torch.stack(act_noise)
        traj.extras["exploration_std"] = exploration_std
    return traj


@functools.lru_cache(maxsize=64)
def _euler_kernel(sde: ControlledSDE, N: int):
    """The SDE's :class:`~sa_theory.kernels.EulerKernel` on the uniform ``N``-step grid (float64), built once per equal
    ``(sde, N)``, so the rollouts of a training loop share its per-step drift coefficients (``_euler_via_chain``)."""
    return EulerKernel(sde, np.linspace(0.0, float(sde.T), N + 1))


def _euler_via_chain(sde, policy, y0, taus, cond, reference, generator, noise, save_every, check) -> Trajectory:
    """Euler-Maruyama through the one sampling loop: :func:`~sa_theory.sampling.sample_chain` on the SDE's
    :class:`~sa_theory.kernels.EulerKernel` over ``taus`` (the step of the module docstring; same random draws as
    the loop below would take). ``save_every=None`` records nothing per step (``record=False``)."""
    N = taus.numel() - 1
    try:  # a noise function may hold state, and a user's schedule may not hash: those get a kernel of their own
        shared = sde.constant_noise is not None and hash(sde) is not None
    except TypeError:
        shared = False
    kern = (_euler_kernel if shared else _euler_kernel.__wrapped__)(sde, N)
    if reference is not None:
        kl_weights(sde, taus)  # a zero noise level has an infinite path KL: raise as the loop below does
    act_fn, ref_fn = step_fns(policy, reference, taus, cond)
    chain = sample_chain(kern, act_fn, y0, reference_fn=ref_fn, generator=generator,
                         noise=noise, check=check, record=save_every is not None, names=("policy", "reference"))
    traj = Trajectory(taus=taus, final=chain.final, path_kl=chain.path_kl)
    if save_every is not None:
        idx = sorted(set(range(0, N + 1, save_every)) | {N})
        traj.states, traj.saved_taus = chain.states[idx], taus[idx]
        if save_every == 1:
            traj.noise, traj.actions, traj.means = chain.noise, chain.actions, chain.actions
            traj.ref_actions, traj.log_probs, traj.kl_steps = chain.ref_actions, chain.log_probs, chain.kl_steps
            if chain.ref_log_probs is not None:
                traj.extras["ref_log_probs"] = chain.ref_log_probs
    return traj


class _TorchsdeSystem(torch.nn.Module):
    r"""The controlled SDE (plus the KL integral as an extra coordinate) in torchsde's interface.

    torchsde's fixed-step loop accumulates ``t += dt`` in floating point, so on a grid ``taus`` it takes
    extra tiny steps and queries the Brownian path off the grid (float32, N = 1000: 1001 steps). The system
    is therefore written in step-index time :math:`u = \tau/d\tau` (``du = 1``, exact in floating point):
    drift :math:`d\tau\,b(\tau)`, diffusion :math:`\sqrt{d\tau}\sqrt{\eta}\,g(\tau)`, KL rate times :math:`d\tau`.
    The Brownian increments over ``[k, k+1]`` are then the standardised increments :math:`\xi_k`.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: ControlledSDE, policy, reference, cond, event_shape, taus):
        super().__init__()
        self.sde, self.policy, self.reference, self.cond = sde, policy, reference, cond
        self.event_shape = tuple(event_shape)
        self.D = math.prod(self.event_shape)
        self.taus = taus
        self.dtau = float(taus[1] - taus[0])
        self.sqrt_dtau = math.sqrt(self.dtau)

    def _tau(self, u):
        """Sampler time of step-index time ``u`` (grid values exactly at integer ``u``)."""
        u = torch.as_tensor(u, dtype=self.taus.dtype, device=self.taus.device)
        k = int(u)
        if k == u:
            return self.taus[k]
        return self.taus[0] + u * self.dtau

    def _split(self, z):
        return z[:, : self.D].reshape(z.shape[0], *self.event_shape)

    def f(self, u, z):
        tau = self._tau(u)
        y = self._split(z)
        a = check_action("policy", self.policy(tau, y, self.cond), y)
        b = self.sde.drift(tau, y, a).reshape(z.shape[0], self.D)
        if self.reference is not None:
            s = check_action("reference", self.reference(tau, y, self.cond), y)
            rate = girsanov_kl_rate(kl_weights(self.sde, tau), a, s)
        else:
            rate = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        return torch.cat([b, rate[:, None]], dim=1) * self.dtau

    def g(self, u, z):
        out = torch.zeros_like(z)
        out[:, : self.D] = self.sde.diffusion(self._tau(u)) * self.sqrt_dtau
        return out


def _rollout_torchsde(sde, policy, y0, taus, cond, reference, method, seed, save_every) -> Trajectory:
    import torchsde

    B, event = y0.shape[0], y0.shape[1:]
    N = taus.numel() - 1
    system = _TorchsdeSystem(sde, policy, reference, cond, event, taus)
    z0 = torch.cat([y0.reshape(B, -1), torch.zeros(B, 1, dtype=y0.dtype, device=y0.device)], dim=1)
    us = torch.arange(N + 1, dtype=y0.dtype, device=y0.device)  # step-index time, see _TorchsdeSystem
    bm = torchsde.BrownianInterval(
        t0=0.0, t1=float(N), size=z0.shape, dtype=y0.dtype, device=y0.device,
        entropy=0 if seed is None else int(seed),
        levy_area_approximation="space-time" if method == "srk" else "none",
    )
    ts = us if save_every is not None else us[[0, -1]]
    zs = torchsde.sdeint(system, z0, ts, bm=bm, method=method, dt=1.0)
    states = zs[:, :, : system.D].reshape(zs.shape[0], B, *event)
    kl_cum = zs[:, :, -1]
    traj = Trajectory(taus=taus, final=states[-1], path_kl=kl_cum[-1] if reference is not None else None)
    if save_every is not None:
        incr = torch.stack([bm(us[k], us[k + 1])[:, : system.D] for k in range(N)])
        traj.states, traj.saved_taus = states, taus
        traj.noise = None if sde.ode else incr.reshape(N, B, *event)
        if reference is not None:
            traj.kl_steps = kl_cum[1:] - kl_cum[:-1]
        traj.extras["bm"] = bm
        traj.extras["bm_time"] = "step index u = tau / dtau (increments over [k, k+1] are standardised)"
    return traj
