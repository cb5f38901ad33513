r"""The one sampling loop: K steps of any Gaussian step kernel with a policy's actions, recording what RL needs.

>>> chain = sample_chain(kernel, action_fn, x0, reference_fn=pretrained_fn, generator=gen)
>>> chain.final, chain.log_probs, chain.path_kl, chain.path_kl_ct

Step ``k`` (:class:`~sa_theory.kernels.GaussianKernel`, any sampler: Euler-Maruyama of the controlled SDE,
DDIM, DDPM, the rectified-flow kernel):

.. math:: a_k = \mathrm{action\_fn}(k, x_k),\qquad x_{k+1} = m_k(x_k, a_k) + \mathrm{std}_k\,\xi_k,\qquad
          \xi_k \sim N(0, I)\ \text{from}\ \texttt{generator},

one standard-normal draw of ``x``'s shape per step, stochastic or not (so the random stream does not depend
on the noise level). ``generator`` lives on the device where ``xi`` is drawn (``generator.device``); the
draw is moved to ``x``'s device, which keeps rollouts bitwise identical between a CPU generator and any
accelerator. ``action_fn`` and ``reference_fn`` are called with the step index ``k`` and the batched state;
they close over the context (prompts) and map ``k`` to their own time variable (the kernel's ``taus``, a
scheduler's timesteps or sigmas).

Recorded (:class:`Chain`): ``states`` ``(K+1, B, *event)``, ``actions`` and ``noise`` ``(K, B, *event)``,
``log_probs`` ``(K, B)`` (:math:`\log N(x_{k+1}; m_k, \mathrm{std}_k^2 I)` **summed over dimensions**, nats per
step; 0 on deterministic steps), and with ``reference_fn``: ``ref_actions`` and two per-step KLs to it
(nats per step, summed over dimensions): ``kl_steps`` the exact KL of the chain's step
:math:`\frac{w_k}{2}|a_k - s_k|^2` and ``kl_steps_ct`` the continuous-time (Girsanov) estimate
:math:`\frac{\bar w_k}{2}|a_k - s_k|^2` (``kernel.step_kl``), and ``ref_log_probs`` (the sampled
:math:`x_{k+1}` under the reference's step, same units), so ``log_probs - ref_log_probs`` is the sampled per-step
log-ratio :math:`\lambda_k` (mean ``kl_steps``) that DDPO puts in its return (``sampled_log_ratio``).
A recorded run keeps only states and actions inside the loop and computes these per-step terms after it, on the
whole path at once (``kernel.grid_log_probs`` / ``grid_step_kls``: one batched call for the Euler kernel; tested bit for
bit against the per-step formulas on every kernel), which takes five small calls out of every step of the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels import GaussianKernel
from .sde import check_finite

__all__ = ["Chain", "PathKLs", "sample_chain", "step_fns", "check_action", "StepActionFn"]

StepActionFn = Callable[[int, torch.Tensor], torch.Tensor]


class PathKLs:
    """Per-path KLs of a record with ``actions`` ``(K, B, ...)``, ``kl_steps`` and ``kl_steps_ct`` ``(K, B)``."""

    @property
    def num_steps(self) -> int:
        return self.actions.shape[0]

    @property
    def path_kl(self) -> torch.Tensor | None:
        """Exact KL of the discrete chain to the reference, per path (nats)."""
        return None if self.kl_steps is None else self.kl_steps.sum(0)

    @property
    def path_kl_ct(self) -> torch.Tensor | None:
        """Continuous-time (Girsanov) path KL estimate to the reference, per path (nats), stable across K."""
        return None if self.kl_steps_ct is None else self.kl_steps_ct.sum(0)

    @property
    def sampled_log_ratio(self) -> torch.Tensor | None:
        r"""Per path :math:`\sum_k [\log\pi_\theta - \log\pi_\text{ref}](x_{k+1}|x_k)` on the sampled path (nats):
        a one-sample unbiased estimate of the chain's path KL (``None`` without the reference)."""
        ref = getattr(self, "ref_log_probs", None)
        return None if ref is None else (self.log_probs - ref).sum(0)

    def kl_steps_of(self, form: str) -> torch.Tensor | None:
        """Per-step KLs of ``form``: ``"chain"`` (``kl_steps``) or ``"continuous"`` (``kl_steps_ct``)."""
        return {"chain": self.kl_steps, "continuous": self.kl_steps_ct}[form]


@dataclass
class Chain(PathKLs):
    """A batch of sampled paths of a kernel (module docstring for shapes and units)."""

    states: torch.Tensor
    actions: torch.Tensor
    noise: torch.Tensor
    log_probs: torch.Tensor
    ref_actions: torch.Tensor | None = None
    kl_steps: torch.Tensor | None = None
    kl_steps_ct: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


def check_action(name: str, a, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The action ``a`` that ``name`` returned at the state ``x`` (at step ``k``, if given), checked: a tensor (else
    ``TypeError``) of the state's shape (else ``ValueError``) without NaN/Inf (else ``FloatingPointError``), each error
    naming ``name`` and the step. The one action check of the sampling loop and of the rollouts' other loops."""
    at = "" if k is None else f" at step {k}"
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name!r} must return a torch.Tensor (an action of the state's shape){at}, got "
                        f"{type(a).__name__}")
    if a.shape != x.shape:
        raise ValueError(f"{name!r} must return an action of the state's shape {tuple(x.shape)}{at}, got "
                         f"{tuple(a.shape)}")
    return check_finite(f"action returned by {name!r}{at}", a)


def sample_chain(kernel: GaussianKernel, action_fn: StepActionFn, x0: torch.Tensor, *,
                 reference_fn: StepActionFn | None = None, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, check: bool = True, record: bool = True,
                 names: tuple[str, str] = ("action_fn", "reference_fn")) -> Chain:
    """Run the kernel's ``K`` steps from ``x0`` (module docstring). ``noise`` ``(K, *x0.shape)`` replaces the
    draws (e.g. to hold the Brownian path fixed); else ``generator`` (default: a CPU generator seeded 0).
    Every action is checked (a tensor: else ``TypeError``; of the state's shape: else ``ValueError``; finite: else
    ``FloatingPointError``), each error naming the function by ``names`` and the step; ``check`` also raises
    ``FloatingPointError`` on a non-finite state. Autograd is left as the caller set it.
    ``record=False`` (low memory, e.g. evaluation on many paths): ``states`` holds only ``x0`` and the final state,
    ``actions``/``noise``/``ref_actions`` are ``None`` and the per-step records are summed over the steps into one
    row (``log_probs``, ``kl_steps``, ``kl_steps_ct``, ``ref_log_probs`` of shape ``(1, B)``), so the per-path sums
    (``path_kl``, ``sampled_log_ratio``) are unchanged."""
    if not isinstance(kernel, GaussianKernel):
        raise TypeError(f"'kernel' must be a sa_theory.kernels.GaussianKernel, got {type(kernel).__name__}")
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError("'x0' must be a floating-point tensor of shape (batch, *event_shape)")
    K = kernel.num_steps
    if noise is not None and tuple(noise.shape) != (K, *x0.shape):
        raise ValueError(f"'noise' must have shape {(K, *x0.shape)}, got {tuple(noise.shape)}")
    if noise is None and generator is None:
        generator = torch.Generator().manual_seed(0)
    check_finite("x0", x0)
    x = x0
    states, actions, xis, logps, refs, kls, kls_ct, ref_logps = [x0], [], [], [], [], [], [], []
    for k in range(K):
        a = check_action(names[0], action_fn(k, x), x, k)
        mean = kernel.mean(k, x, a)
        if noise is not None:
            xi = noise[k].to(x.dtype)
        else:
            xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
        x_next = mean + kernel.std(k) * xi
        s = None if reference_fn is None else check_action(names[1], reference_fn(k, x), x, k)
        if record:  # the per-step records are computed after the loop, on the whole grid at once
            states.append(x_next)
            actions.append(a)
            xis.append(xi)
            if s is not None:
                refs.append(s)
        else:
            logps.append(kernel.log_prob(k, x_next, mean))
            if s is not None:
                kls.append(kernel.step_kl(k, a, s, "chain"))
                kls_ct.append(kernel.step_kl(k, a, s, "continuous"))
                ref_logps.append(kernel.log_prob(k, x_next, kernel.mean(k, x, s)))
        if check:
            check_finite(f"state after step {k}", x_next)
        x = x_next

    if not record:
        def total(xs):
            return torch.stack(xs).sum(0, keepdim=True) if xs else None
        return Chain(states=torch.stack([x0, x]), actions=None, noise=None, log_probs=total(logps),
                     kl_steps=total(kls), kl_steps_ct=total(kls_ct), ref_log_probs=total(ref_logps))
    S, A, ks = torch.stack(states), torch.stack(actions), range(K)
    chain = Chain(states=S, actions=A, noise=torch.stack(xis), log_probs=kernel.grid_log_probs(ks, S[:-1], S[1:], A))
    if refs:
        ref = chain.ref_actions = torch.stack(refs)
        chain.kl_steps = kernel.grid_step_kls(ks, A, ref, "chain")
        chain.kl_steps_ct = kernel.grid_step_kls(ks, A, ref, "continuous")
        chain.ref_log_probs = kernel.grid_log_probs(ks, S[:-1], S[1:], ref)
    return chain


def _base_plus_residual(policy) -> bool:
    """Whether the class defining ``policy``'s ``forward`` declares it ``base + residual`` (a subclass that overrides
    ``forward`` does not inherit the declaration) and no forward hook is registered on it."""
    if getattr(policy, "_forward_hooks", None) or getattr(policy, "_forward_pre_hooks", None):
        return False  # a module's hooks run only when it is called: call it
    for cls in type(policy).__mro__:
        if "forward" in cls.__dict__:
            return cls.__dict__.get("base_plus_residual", False) is True and callable(getattr(policy, "residual", None))
    return False


def step_fns(policy, reference, taus, cond):
    """The loop's ``(action_fn, reference_fn)`` (``(k, x) -> action``) of the actions ``policy`` and ``reference``
    (``(tau, y, cond) -> action``, :data:`sa_theory.sde.ActionFn`) on the grid ``taus``; ``reference_fn`` is ``None``
    without a reference. A policy that is its reference plus a residual (``policy.base is reference``, and the class
    that defines its ``forward`` declares ``base_plus_residual = True``: its forward is ``base(tau, y, cond) +
    residual(tau, y, cond)``, as the toy policies' are) computes the reference once per step without autograd
    (sampling): the action is ``s + residual`` (the sum its forward takes, so bitwise the same) and the reference
    call at that state returns the same ``s`` (the loop calls ``action_fn`` first). With autograd on, both are called
    as they are (sharing ``s`` would sum its two gradients in another order: the same to float noise, not bitwise)."""
    if reference is None:
        return (lambda k, x: policy(taus[k], x, cond)), None
    if getattr(policy, "base", None) is not reference or not _base_plus_residual(policy):
        return (lambda k, x: policy(taus[k], x, cond)), (lambda k, x: reference(taus[k], x, cond))
    last = [None, None, None]  # step, state, reference action at it

    def ref_fn(k, x):
        if last[0] == k and last[1] is x:
            return last[2]
        return reference(taus[k], x, cond)

    def act_fn(k, x):
        if torch.is_grad_enabled():  # autograd would sum the two uses of s in another order: not bitwise the same
            last[0] = None
            return policy(taus[k], x, cond)
        s = reference(taus[k], x, cond)
        last[:] = k, x, s
        return s + policy.residual(taus[k], x, cond)

    return act_fn, ref_fn
