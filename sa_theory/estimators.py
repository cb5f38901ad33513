r"""Continuous-time policy-gradient estimators, trust-region surrogates and discrete-time baselines.

Every estimator here is a **per-path surrogate**: a tensor of shape ``(B,)`` whose gradient with
respect to the policy parameters, averaged over paths, is the estimator (its value is not the objective
unless stated). Maximise ``surrogate.mean()`` (or minimise its negative). States are always detached:
the surrogate is re-evaluated on recorded states with the current policy (:func:`policy_means`).

Notation (theory.md §1-2, §5): grid :math:`\tau_k`, step :math:`d\tau`, :math:`g_k^2 = g^2(T-\tau_k)`, policy mean
:math:`\mu_k = \mu_\theta(\tau_k, Y_k)`, pretrained action :math:`s_k`, standardised noise :math:`\xi_k`,
terminal reward :math:`R = r(Y_N)`, per-step KL :math:`\ell_k = \frac{w_k d\tau}{2}|\mu_k - s_k|^2` (nats
per step, summed over dimensions; :func:`sa_theory.kl.girsanov_kl_step`).

**Noise level.** For the sampler of noise level :math:`\eta` (``ControlledSDE(schedule, noise=eta)``) the
action enters the drift with the coefficient :math:`c_k = \frac{1+\eta_k}{2}g_k^2` (``sde.action_coef``) and
the KL with the weight rate :math:`w_k = \frac{(1+\eta_k)^2}{4\eta_k} g_k^2` (``sde.kl_weight_rate``); both
equal :math:`g_k^2` at :math:`\eta = 1`, which is what the formulas below show. Functions that take ``sde``
use both automatically; functions that take a weight ``g2`` read it as :math:`c` and take :math:`w` as
``kl_weight`` (default ``g2``, i.e. :math:`\eta = 1`). The Hamiltonian is
:math:`H = (-f y + c\,a)\cdot p - \frac{\beta w}{2}|a - s|^2`, maximised by
:math:`a = s + \frac{c}{\beta w} p = s + \frac{2\eta}{1+\eta} p/\beta`.

=========================  ====================================================================
estimator                   per-path surrogate (gradient = estimator)
=========================  ====================================================================
value gradient (R4)         :math:`\sum_k g_k^2 d\tau\,\langle \mu_\theta(\tau_k,Y_k),\,
                            \mathrm{sg}[\nabla_y V(\tau_k,Y_k) - \beta(\mu_k - s_k)]\rangle`
likelihood ratio (R5)       :math:`\sum_k A_k \log\pi_\theta(Y_{k+1}|Y_k) - \beta\sum_k \ell_k(\theta)` with
                            :math:`A_k` = full return :math:`R-\beta\sum_j\ell_j`, reward-to-go
                            :math:`G_k = R - \beta\sum_{j>k}\ell_j`, or :math:`G_k - b(\tau_k, Y_k)`
TD / advantage rate (R5)    same with :math:`A_k = V(\tau_{k+1},Y_{k+1}) - V(\tau_k,Y_k) - \beta\ell_k`
pathwise (R6)               :math:`R - \beta\sum_k \ell_k` on a rollout built with autograd on
DDPO-SF (baseline)          :math:`(R - \beta\sum_j \log\tfrac{\pi_\theta}{\pi_{pre}}(Y_{j+1}|Y_j))
                            \sum_k\log\pi_\theta(Y_{k+1}|Y_k)`, sampled log-ratio KL, no structure
DPOK (baseline)             :math:`\sum_k (R - b_k)\log\pi_\theta - \beta\sum_k \ell_k(\theta)` (KL not in
                            the return: a biased gradient of J)
=========================  ====================================================================

:math:`\nabla_\theta \log\pi_\theta(Y_{k+1}|Y_k) = g_k\sqrt{d\tau}\,(\partial_\theta\mu_k)^\top\xi_k`: the
Euler transition density's score is the Girsanov stochastic integral :math:`\int g\,(\partial_\theta\mu)^\top
dB`, which is why the likelihood-ratio estimator has a finite continuous-time limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .kl import euler_log_prob, girsanov_kl_step, sum_event
from .sde import ActionFn, ControlledSDE, check_finite

__all__ = [
    "policy_means",
    "euler_log_probs",
    "kl_steps",
    "reward_to_go",
    "td_advantages",
    "value_gradient_surrogate",
    "likelihood_ratio_surrogate",
    "ode_value_gradient_surrogate",
    "pathwise_objective",
    "reinforce_kl_surrogate", "sampled_kl_return",
    "dpok_surrogate",
    "ppo_clip_surrogate",
    "hamiltonian_gap",
    "trust_region_surrogate",
    "policy_path_kl",
    "advantage_rate",
    "value_grad",
    "pathwise_costates",
    "grouped_gradient",
]


# --------------------------------------------------------------------------- per-step re-evaluation
def policy_means(policy: ActionFn, taus: torch.Tensor, states: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """:math:`\\mu_\\theta(\\tau_k, Y_k)` for ``k = 0..N-1`` on detached recorded states: ``(N, B, *event)``."""
    N = taus.numel() - 1
    if states.shape[0] != N + 1:
        raise ValueError(f"'states' must hold all N+1={N + 1} grid states (rollout with save_every=1), "
                         f"got {states.shape[0]}")
    return torch.stack([policy(taus[k], states[k].detach(), cond) for k in range(N)])


def euler_log_probs(sde: ControlledSDE, taus: torch.Tensor, states: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """:math:`\\log N(Y_{k+1}; Y_k + b(\\tau_k, Y_k, \\mu_k) d\\tau, g_k^2 d\\tau I)`, ``(N, B)``, nats per step
    (summed over dimensions). Differentiable in ``means``; states are detached."""
    N, B = means.shape[:2]
    dt = float(taus[1] - taus[0])
    tau = taus[:N].reshape(N, *[1] * (states.dim() - 1))  # one batched call over the grid: (N, 1, ..., 1)
    y, y1 = states[:N].detach(), states[1 : N + 1].detach()
    drift, g = sde.drift(tau, y, means), sde.diffusion(tau).expand(N, B, *[1] * (states.dim() - 2))

    def rows(x):
        return x.reshape(N * B, *x.shape[2:])

    return euler_log_prob(rows(y1), rows(y), rows(drift), rows(g), dt).reshape(N, B)


def kl_steps(sde: ControlledSDE, taus: torch.Tensor, means: torch.Tensor, ref_actions: torch.Tensor) -> torch.Tensor:
    """:math:`\\ell_k = \\frac{w_k d\\tau}{2}|\\mu_k - s_k|^2`, ``(N, B)`` (nats per step), :math:`w` =
    ``sde.kl_weight_rate``."""
    dt = float(taus[1] - taus[0])
    g2 = sde.kl_weight_rate(taus)
    return torch.stack([girsanov_kl_step(g2[k], dt, means[k], ref_actions[k].detach()) for k in range(means.shape[0])])


# --------------------------------------------------------------------------- returns and advantages
def reward_to_go(terminal_reward: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """:math:`G_k = R - \\beta \\sum_{j>k} \\ell_j` (the return that step ``k``'s noise can influence), ``(N, B)``.

    ``kl`` is ``(N, B)`` per-step KL (detached inside).
    """
    kl = kl.detach()
    future = torch.flip(torch.cumsum(torch.flip(kl, [0]), 0), [0]) - kl  # sum_{j>k}
    return terminal_reward.detach()[None] - beta * future


def td_advantages(values: torch.Tensor, terminal_reward: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """One-step TD errors :math:`\\delta_k = V(\\tau_{k+1},Y_{k+1}) - V(\\tau_k,Y_k) - \\beta\\ell_k`,
    with :math:`V(\\tau_N, Y_N) := R`. ``values`` is ``(N, B)`` = :math:`V(\\tau_k, Y_k)`, ``k < N``.

    :math:`\\delta_k \\approx q\\,d\\tau` + noise: the advantage-rate (q-function) form of R5.
    """
    v = values.detach()
    v_next = torch.cat([v[1:], terminal_reward.detach()[None]], 0)
    return v_next - v - beta * kl.detach()


def value_grad(value: Callable, tau: torch.Tensor, y: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """:math:`\\nabla_y V(\\tau, y)` by autograd for a value model ``value(tau, y, cond) -> (B,)``."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(value(tau, y, cond).sum(), y)
    return g


def pathwise_costates(sde: ControlledSDE, policy: ActionFn, reference: ActionFn, taus: torch.Tensor,
                      states: torch.Tensor, reward: Callable, beta: float, cond: Any = None) -> torch.Tensor:
    r"""Sampled costates of Euler paths by the discrete adjoint, with the Brownian increments held fixed.

    For the chain :math:`Y_{k+1} = Y_k + b(\tau_k, Y_k, \mu_\theta(\tau_k, Y_k))\,d\tau + g_k\sqrt{d\tau}\,\xi_k`
    and the per-path return :math:`G_k = r(Y_N) - \beta\sum_{j\ge k}\ell_j`,
    :math:`\ell_j = \frac{w_j d\tau}{2}|\mu_\theta(\tau_j, Y_j) - s(\tau_j, Y_j)|^2` (nats per step, summed
    over dimensions), returns :math:`P_k = \partial G_k / \partial Y_k` for ``k = 0..N`` by the recursion

    .. math:: P_N = \nabla r(Y_N),\qquad
              P_k = P_{k+1} + d\tau\,(\partial_y b_k)^\top P_{k+1} - \beta\,\nabla_y \ell_k,

    where :math:`b_k(y) = b(\tau_k, y, \mu_\theta(\tau_k, y))` (the policy is differentiated in ``y``, not in
    its parameters). Because the noise does not depend on the state, :math:`E[P_k \mid Y_k = y] =
    \nabla_y V^\theta_N(\tau_k, y)`, the value gradient of the **N-step chain** (unbiased at any N; the
    continuous-time costate of R4 as ``N -> oo``). Needs a differentiable reward and Euler paths.

    Shapes: ``taus (N+1,)``, ``states (N+1, B, *event)`` (recorded, detached); returns ``(N+1, B, *event)``
    (detached), in reward units per unit of ``y``.
    """
    N = taus.numel() - 1
    dtau = float(taus[1] - taus[0])
    g2 = sde.kl_weight_rate(taus)
    out = torch.empty_like(states)
    with torch.enable_grad():
        y = states[N].detach().requires_grad_(True)
        (p,) = torch.autograd.grad(reward(y, cond).sum(), y)
        out[N] = p
        for k in range(N - 1, -1, -1):
            y = states[k].detach().requires_grad_(True)
            mu = policy(taus[k], y, cond)
            ell = girsanov_kl_step(g2[k], dtau, mu, reference(taus[k], y, cond))
            f = (sde.drift(taus[k], y, mu) * p).sum() * dtau - beta * ell.sum()
            (gk,) = torch.autograd.grad(f, y)
            p = p + gk
            out[k] = p
    return check_finite("pathwise costates", out.detach())


# --------------------------------------------------------------------------- estimators
def value_gradient_surrogate(means: torch.Tensor, value_grads: torch.Tensor, ref_actions: torch.Tensor,
                             g2: torch.Tensor, dtau: float, beta: float, *,
                             kl_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Value-gradient (deterministic) policy gradient, theory.md R4.

    :math:`\\nabla J = E\\int g^2(\\partial_\\theta\\mu)^\\top[\\nabla_y V^\\theta - \\beta(\\mu - s)]d\\tau`;
    per-path surrogate
    :math:`\\sum_k g_k^2 d\\tau\\langle\\mu_k, \\mathrm{sg}[\\nabla V_k - \\beta(\\mu_k-s_k)]\\rangle`.
    ``means``/``value_grads``/``ref_actions``: ``(N, B, *event)``; ``g2``: ``(N,)`` or ``(N+1,)``. O(dtau)-biased
    for the discrete chain when ``V`` is the continuous value. Noise level :math:`\\eta`: pass
    ``g2 = sde.action_coef(taus)`` and ``kl_weight = sde.kl_weight_rate(taus)``; the surrogate is then
    :math:`\\sum_k d\\tau\\langle\\mu_k, \\mathrm{sg}[c_k\\nabla V_k - \\beta w_k(\\mu_k - s_k)]\\rangle`.
    """
    N = means.shape[0]
    shape = (N, *([1] * (means.dim() - 1)))
    w = (g2[:N] * dtau).reshape(shape)
    if kl_weight is None:
        dual = (value_grads - beta * (means - ref_actions)).detach()
        return torch.stack([sum_event(means[k] * dual[k] * w[k]) for k in range(N)]).sum(0)
    wkl = (kl_weight[:N] * dtau).reshape(shape)
    dual = (w * value_grads - beta * wkl * (means - ref_actions)).detach()
    return torch.stack([sum_event(means[k] * dual[k]) for k in range(N)]).sum(0)


def ode_value_gradient_surrogate(means: torch.Tensor, value_grads: torch.Tensor, g2: torch.Tensor,
                                 dtau: float) -> torch.Tensor:
    r"""Probability-flow ODE policy gradient, theory.md R11: :math:`\nabla J = E\int(\partial_\theta b)^\top
    \nabla_y V\,d\tau` with :math:`\partial_\theta b = \frac{g^2}{2}\partial_\theta\mu` (half the SDE's
    action gain) and :math:`V` the ODE's value (:math:`V(\tau, y) = r(\text{flow}_{\tau\to T}(y))`, no path
    KL: the ODE's path law is singular, its natural regulariser is the terminal KL). Per path
    :math:`\sum_k \frac{g_k^2}{2}d\tau\langle\mu_k, \mathrm{sg}[\nabla V_k]\rangle`.
    """
    return value_gradient_surrogate(means, value_grads, means.detach(), 0.5 * g2, dtau, beta=0.0)


def likelihood_ratio_surrogate(log_probs: torch.Tensor, advantages: torch.Tensor, kl_theta: torch.Tensor,
                               beta: float) -> torch.Tensor:
    """Likelihood-ratio (Girsanov) policy gradient, theory.md R5.

    Per path :math:`\\sum_k A_k\\log\\pi_\\theta(Y_{k+1}|Y_k) - \\beta\\sum_k\\ell_k(\\theta)`. ``log_probs``
    and ``kl_theta`` ``(N, B)`` must be differentiable in the parameters (from :func:`euler_log_probs` /
    :func:`kl_steps`); ``advantages`` ``(N, B)`` or ``(B,)`` (broadcast over steps) is detached: pass the
    full return :math:`R - \\beta\\sum_j\\ell_j`, :func:`reward_to_go`, reward-to-go minus a baseline
    :math:`b(\\tau_k, Y_k)`, or :func:`td_advantages`.
    """
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[None].expand_as(log_probs)
    return (adv * log_probs).sum(0) - beta * kl_theta.sum(0)


def pathwise_objective(terminal_reward: torch.Tensor, path_kl: torch.Tensor, beta: float) -> torch.Tensor:
    """Pathwise (reparameterised) objective, theory.md R6: :math:`R - \\beta\\,KL_{path}` per path, where the
    rollout was built with autograd on and the Brownian path held fixed; its gradient is the estimator."""
    return terminal_reward - beta * path_kl


def reinforce_kl_surrogate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, terminal_reward: torch.Tensor,
                           beta: float) -> torch.Tensor:
    """DDPO-SF baseline: REINFORCE on the N-step chain with the sampled log-ratio KL in the return.

    Per path
    :math:`(R - \\beta\\sum_j[\\log\\pi_\\theta - \\log\\pi_{pre}](Y_{j+1}|Y_j))\\sum_k\\log\\pi_\\theta(Y_{k+1}|Y_k)`
    (the return is detached; the direct derivative of the sampled KL has mean zero and is dropped, as in
    REINFORCE). Unbiased for the discrete objective; no reward-to-go, no baseline, no structure.
    """
    ret = terminal_reward.detach() - beta * (log_probs - ref_log_probs).detach().sum(0)
    return ret * log_probs.sum(0)


def sampled_kl_return(terminal_reward: torch.Tensor, sampled_log_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    r"""DDPO-SF/IS's per-path return with the KL in it: :math:`R - \beta\sum_k\lambda_k`, with
    :math:`\lambda_k = [\log\pi_\theta - \log\pi_\text{pre}](Y_{k+1}|Y_k)` the sampled per-step log-ratio (nats
    per path, summed over dimensions; its mean is the chain's path KL). ``(B,)``, detached; ``beta = 0`` gives
    original DDPO (reward only). Toy and image DDPO both call this."""
    return (terminal_reward - beta * sampled_log_ratio).detach()


def dpok_surrogate(log_probs: torch.Tensor, terminal_reward: torch.Tensor, baseline: torch.Tensor,
                   kl_theta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPOK baseline (Fan et al. 2023): :math:`\\sum_k (R - b_k)\\log\\pi_\\theta - \\beta\\sum_k\\ell_k(\\theta)`.

    ``baseline`` ``(N, B)`` is a learned value of the state; the KL enters only as a per-step regulariser,
    not in the return (so this is a biased gradient of the KL-regularised objective).
    """
    adv = terminal_reward.detach()[None] - baseline.detach()
    return (adv * log_probs).sum(0) - beta * kl_theta.sum(0)


def ppo_clip_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                       clip_range: float) -> torch.Tensor:
    """DDPO-IS: per-step PPO-clip :math:`\\sum_k \\min(\\rho_k A, \\mathrm{clip}(\\rho_k, 1\\pm\\epsilon) A)`.

    :math:`\\rho_k = \\pi_\\theta/\\pi_{old}(Y_{k+1}|Y_k)` from log-probs **summed over dimensions**. With N
    Euler steps :math:`\\log\\rho_k = O(\\sqrt{d\\tau})`, so a fixed ``clip_range`` is an N-dependent trust
    region (theory.md R8); the path-KL penalty of :func:`trust_region_surrogate` is not.
    """
    if not clip_range > 0:
        raise ValueError(f"'clip_range' must be > 0, got {clip_range}")
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[None].expand_as(log_probs)
    ratio = torch.exp(log_probs - old_log_probs.detach())
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv).sum(0)


def hamiltonian_gap(new_means: torch.Tensor, old_means: torch.Tensor, ref_actions: torch.Tensor,
                    value_grads: torch.Tensor, g2: torch.Tensor | float, beta: float, *,
                    kl_weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """Rate :math:`H(a') - H(a)` with :math:`p = \\nabla V^\\theta` (theory.md R7), ``(B,)`` per unit time:

    :math:`g^2[(a'-a)\\cdot(\\nabla V - \\beta(a - s)) - \\tfrac\\beta2|a'-a|^2]`. Includes the KL term of H.
    Noise level :math:`\\eta`: ``g2`` = :math:`c` (``sde.action_coef``), ``kl_weight`` = :math:`w`
    (``sde.kl_weight_rate``): :math:`c(a'-a)\\cdot\\nabla V - \\beta w[(a'-a)\\cdot(a-s) + \\frac12|a'-a|^2]`.
    """
    diff = new_means - old_means.detach()
    if kl_weight is None:
        dual = (value_grads - beta * (old_means - ref_actions)).detach()
        return g2 * (sum_event(diff * dual) - 0.5 * beta * sum_event(diff**2))
    return (g2 * sum_event(diff * value_grads.detach())
            - beta * kl_weight * (sum_event(diff * (old_means - ref_actions).detach()) + 0.5 * sum_event(diff**2)))


def trust_region_surrogate(new_means: torch.Tensor, old_means: torch.Tensor, ref_actions: torch.Tensor,
                           value_grads: torch.Tensor, g2: torch.Tensor, dtau: float, beta: float,
                           kl_penalty: float = 0.0, max_path_kl: float | None = None, *,
                           kl_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous-time TRPO/PPO surrogate :math:`L_\\theta(\\theta') - J(\\theta)` per path (theory.md R8).

    :math:`\\sum_k d\\tau\\,[H(\\mu'_k) - H(\\mu_k)]` on the OLD policy's states, minus ``kl_penalty`` times the
    path KL :math:`KL(P^{\\theta'}\\|P^\\theta) \\approx \\sum_k \\frac{g_k^2 d\\tau}{2}|\\mu'_k-\\mu_k|^2`. With
    ``max_path_kl``, paths whose KL to the old policy exceeds it contribute no gradient (clipping by a
    step-count-independent trust region). At :math:`\\theta'=\\theta` value 0 and gradient = value gradient.
    Noise level :math:`\\eta`: ``g2 = sde.action_coef(taus)``, ``kl_weight = sde.kl_weight_rate(taus)`` (used by
    both H and the path KL; default ``g2``, i.e. :math:`\\eta = 1`).
    """
    N = new_means.shape[0]
    if kl_weight is not None and torch.equal(kl_weight, g2):
        kl_weight = None  # equal weights (eta = 1): the section-1 form, bit for bit
    kw = g2 if kl_weight is None else kl_weight
    B = new_means.shape[1]
    gap = hamiltonian_gap(_steps_as_rows(new_means), _steps_as_rows(old_means), _steps_as_rows(ref_actions),
                          _steps_as_rows(value_grads), _step_weights_as_rows(g2, N, B), beta,
                          kl_weight=None if kl_weight is None else _step_weights_as_rows(kw, N, B))
    gap = gap.reshape(N, B).sum(0) * dtau
    pkl = policy_path_kl(new_means, old_means, kw, dtau)
    out = gap - kl_penalty * pkl
    if max_path_kl is not None:
        keep = (pkl.detach() <= max_path_kl).to(out.dtype)
        out = out * keep + (out * (1 - keep)).detach()
    return out


def policy_path_kl(new_means: torch.Tensor, old_means: torch.Tensor, g2: torch.Tensor, dtau: float) -> torch.Tensor:
    """Girsanov KL between two policies on the same states, :math:`\\sum_k\\frac{w_k d\\tau}{2}|\\mu'_k - \\mu_k|^2`,
    ``(B,)`` nats per path (old means detached); ``g2`` is the KL weight rate :math:`w` (``sde.kl_weight_rate``)."""
    N, B = new_means.shape[:2]
    kl = girsanov_kl_step(_step_weights_as_rows(g2, N, B), dtau, _steps_as_rows(new_means),
                          _steps_as_rows(old_means.detach()))
    return kl.reshape(N, B).sum(0)


def _steps_as_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, B, *event) -> (N*B, *event)``: every (step, path) pair one row of the per-step formulas."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _step_weights_as_rows(w, N: int, B: int):
    """Per-step weights ``(N,)`` repeated for the ``B`` paths of each step (rows of :func:`_steps_as_rows`); a
    scalar stays a scalar."""
    if not torch.is_tensor(w) or w.dim() == 0:
        return w
    return w.reshape(N).repeat_interleave(B)


def advantage_rate(action: torch.Tensor, mean: torch.Tensor, ref_action: torch.Tensor, value_grad_: torch.Tensor,
                   g2: torch.Tensor | float, beta: float, action_var_trace: torch.Tensor | float = 0.0, *,
                   kl_weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """q-function (advantage rate) in closed form, theory.md R5, ``(B,)``:

    :math:`q(\\tau,y,a) = g^2(a-\\mu)\\cdot\\nabla V - \\frac{\\beta g^2}{2}(|a-s|^2 - E_\\pi|a'-s|^2)` with
    :math:`E_\\pi|a'-s|^2 = |\\mu - s|^2 + \\mathrm{tr}\\,\\Sigma` (``action_var_trace``). Zero mean under
    :math:`a\\sim\\pi = N(\\mu,\\Sigma)`. Noise level :math:`\\eta`: ``g2`` = :math:`c` (``sde.action_coef``) multiplies
    the first term, ``kl_weight`` = :math:`w` (``sde.kl_weight_rate``, default ``g2``) the second.
    """
    e_sq = sum_event((mean - ref_action) ** 2) + action_var_trace
    if kl_weight is None:
        return g2 * (sum_event((action - mean) * value_grad_)
                     - 0.5 * beta * (sum_event((action - ref_action) ** 2) - e_sq))
    return g2 * sum_event((action - mean) * value_grad_) - 0.5 * beta * kl_weight * (
        sum_event((action - ref_action) ** 2) - e_sq)


# --------------------------------------------------------------------------- Monte-Carlo helpers
def grouped_gradient(group_surrogate: Callable[[slice], torch.Tensor], params: Sequence[torch.Tensor],
                     batch: int, groups: int = 50, retain_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the mean surrogate and its standard error by batch means, one autograd graph per group.

    ``group_surrogate(sl)`` returns the per-path surrogate ``(|sl|,)`` of the paths in slice ``sl``; the
    cost is one forward and one backward pass over the whole batch (instead of ``groups`` backward passes
    through a shared graph). Returns flat ``(mean, se)``, ``se = std(group gradients)/sqrt(groups)``.
    """
    if groups < 2 or batch < groups:
        raise ValueError(f"'groups' must be in [2, batch={batch}], got {groups}")
    size = batch // groups
    grads = []
    for gi in range(groups):
        per_path = group_surrogate(slice(gi * size, (gi + 1) * size))
        check_finite("per-path surrogate", per_path.detach())
        gs = torch.autograd.grad(per_path.mean(), params, retain_graph=retain_graph, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    G = torch.stack(grads)
    return G.mean(0), G.std(0, unbiased=True) / math.sqrt(groups)
