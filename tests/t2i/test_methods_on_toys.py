"""The methods (:mod:`sa_theory.algorithms.methods`: the per-step losses that run on Stable Diffusion and, since
issue #14, on the toys) on linear-Gaussian toys (VP at eta = 1, rectified flow at eta = 0.245), against the closed
form, driven as the image trainer drives them (one step environment, per-prompt-free returns).

A toy environment implements the image environment's contract (a Gaussian step kernel, ``action(k, x, text,
model)``, the pretrained action) with the Euler-Maruyama kernel of the toy's SDE and an affine policy whose
parameters are the closed form's ``theta``. Rollouts go through the one sampling loop
(:func:`sa_theory.sampling.sample_chain`) into a :class:`~sa_theory.algorithms.rl_batch.RolloutBatch`; the
method's ``prepare`` and ``losses`` are the ones the image trainer calls. At the sampling policy the gradient of
minus the loss must be an unbiased estimate of the exact gradient of the K-step chain's objective
(:meth:`toy_problems.LinearGaussianProblem.discrete_gradient`): within 4.5 standard errors (batch means over 40
groups, fixed seeds), and a wrong target (the KL forgotten) must be rejected by the same test. (Checked once by
hand: a 30% error in the kernel's slope or KL weight inside the methods gives z = 11-28.) DPOK and Flow-GRPO are
not unbiased for this objective by design (DPOK drops the future KL's dependence on the action, Flow-GRPO clips
and normalises per group), so they are not in this list. The image critic's separate phase (``value.fit separate``)
is checked here too: it converges to the per-step least-squares fit of the chain's Monte-Carlo value targets.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from sa_theory import schedules
from sa_theory.algorithms.methods import make_method
from sa_theory.algorithms.rl_batch import RolloutBatch
from sa_theory.estimators import pathwise_costates
from sa_theory.kernels import EulerKernel
from sa_theory.sampling import sample_chain
from t2i.config import Config, method_config
from toy_problems import LinearGaussianProblem
from toy_problems.train import make_problem

Z = 4.5
PIECES, STEPS, PATHS, GROUPS = 2, 10, 4000, 40


class AffinePolicy(torch.nn.Module):
    """The closed form's piecewise-affine policy ``s + K_j y + k_j`` with ``theta`` as its parameters."""

    def __init__(self, prob: LinearGaussianProblem, theta: np.ndarray):
        super().__init__()
        self.prob = prob
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, tau, y):
        return self.prob.policy_action(self.theta, PIECES)(tau, y)


class ExactValue(torch.nn.Module):
    """:math:`V^\\theta(\\tau, y)` of the continuous-time problem (a state-dependent baseline for the image value
    interface ``value(tau, x, cond)``)."""

    def __init__(self, prob, theta):
        super().__init__()
        self.coeffs = prob.policy_value_coeffs(theta, PIECES)

    def forward(self, tau, y, cond=None):
        U, u, u0 = (torch.as_tensor(c, dtype=y.dtype) for c in self.coeffs(float(tau)))
        return -0.5 * ((y @ U) * y).sum(-1) + y @ u + u0


class ToyEnvironment:
    """The image environment's contract (:mod:`t2i.environments`) for a linear-Gaussian toy problem."""

    def __init__(self, prob, policy, steps):
        self.prob, self.model = prob, policy
        self.kernel = EulerKernel(prob.sde, np.linspace(0.0, prob.T, steps + 1))

    def tau(self, k):
        return torch.tensor(float(self.kernel.taus[k]), dtype=torch.float64)

    def action(self, k, x, text, model=None):
        return (model or self.model)(self.tau(k), x)

    def reference_action(self, k, x, text=None):
        return self.prob.score_torch(self.prob.T - self.tau(k), x)

    def value_cond(self, batch, k, tweedie=None):
        return None


def rollout(env, paths, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = env.prob.initial_sample(paths, gen, torch.float64)
    with torch.no_grad():
        ch = sample_chain(env.kernel, lambda k, x: env.action(k, x, None), x0,
                          reference_fn=lambda k, x: env.reference_action(k, x), generator=gen)
    batch = RolloutBatch([""] * paths, {"pooled": torch.zeros(paths, 1, dtype=torch.float64)}, ch.states, ch.actions,
                         ch.log_probs, ch.ref_actions, ch.kl_steps, ch.kl_steps_ct, ref_log_probs=ch.ref_log_probs)
    return batch, env.prob.reward_torch(ch.final)


def method_gradient(prob, theta, name, estimator="likelihood_ratio", seed=0):
    """Mean and standard error (batch means) of ``-grad loss`` of the image method ``name`` at ``theta``."""
    cfg = Config()
    t = cfg.train
    t.method, t.beta, t.estimator, t.advantage, t.adv_clip_max, t.kl_weighting = name, prob.beta, estimator, \
        "reward_to_go", 0.0, "chain"
    policy = AffinePolicy(prob, theta)
    env = ToyEnvironment(prob, policy, STEPS)
    value = ExactValue(prob, theta) if name in ("sa_ac", "dpok") else None
    method = make_method(method_config(cfg), env, policy, value)
    batch, R = rollout(env, PATHS, seed)
    method.prepare(batch, method.path_return(batch, R))
    if estimator == "value_gradient":  # chain-exact costates P_{k+1} (their conditional mean is grad V of the chain)
        P = pathwise_costates(prob.sde, lambda tau, y, c=None: policy(tau, y), lambda tau, y, c=None:
                              prob.score_torch(prob.T - tau, y), torch.as_tensor(env.kernel.taus), batch.latents,
                              lambda y, c=None: prob.reward_torch(y), prob.beta)
        batch.step_data["costate"] = P[1:]
    size, grads = PATHS // GROUPS, []
    for g in range(GROUPS):
        sub = batch.select(torch.arange(g * size, (g + 1) * size))
        (grad,) = torch.autograd.grad(-method.losses(sub)["loss"], [policy.theta])
        grads.append(grad)
    G = torch.stack(grads).double()
    return G.mean(0).numpy(), (G.std(0) / math.sqrt(GROUPS)).numpy()


def problem(kind: str) -> LinearGaussianProblem:
    """``vp``: the figures' ``gauss2d`` (VP schedule, the reverse SDE); ``rf``: a rectified-flow problem at noise
    level eta = 0.245 (theory.md section 5), the Euler kernel of the flow SDE."""
    if kind == "vp":
        return make_problem("gauss2d", 1.0)
    rng = np.random.default_rng(5)
    A, B = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
    return LinearGaussianProblem(rng.normal(size=2), A @ A.T / 2 + 0.4 * np.eye(2),
                                 schedule=schedules.RectifiedFlow(t_max=0.9), Q=0.5 * B @ B.T / 2 + 0.2 * np.eye(2),
                                 w=rng.normal(size=2), r0=0.1, noise=0.245)


@pytest.mark.parametrize("kind", ["vp", "rf"])
@pytest.mark.parametrize("name,estimator", [("sa_ac", "likelihood_ratio"), ("sa_ac", "value_gradient"),
                                            ("ddpo_sf", None), ("ddpo_is", None)])
def test_image_method_gradient_is_unbiased_for_the_chain_on_the_lq_toy(name, estimator, kind):
    prob = problem(kind)
    theta = 0.3 * np.random.default_rng(1).normal(size=prob.n_params(PIECES))
    mean, se = method_gradient(prob, theta, name, estimator or "likelihood_ratio")
    exact = prob.discrete_gradient(theta, PIECES, STEPS)
    z = np.abs(mean - exact) / se
    assert z.max() < Z, (name, estimator, z.max(), mean, exact)
    # negative control: the gradient of the reward alone (the KL term forgotten) is rejected by the same test
    no_kl = LinearGaussianProblem(prob.m0, prob.S0, prob.schedule, prob.Q, prob.w, prob.r0, beta=1e-9,
                                  noise=prob.noise)
    assert (np.abs(mean - no_kl.discrete_gradient(theta, PIECES, STEPS)) / se).max() > Z


def test_image_costates_are_the_value_models_gradient_at_the_next_state():
    """``SAACMethod.costates`` (value-gradient estimator): :math:`\\nabla_x V(\\tau_{k+1}, x_{k+1})`, here of the
    exact quadratic :math:`V^\\theta`: :math:`-U x + u`."""
    prob = make_problem("gauss2d", 1.0)
    theta = 0.3 * np.random.default_rng(2).normal(size=prob.n_params(PIECES))
    cfg = Config()
    cfg.train.method, cfg.train.estimator, cfg.train.beta = "sa_ac", "value_gradient", prob.beta
    policy = AffinePolicy(prob, theta)
    env = ToyEnvironment(prob, policy, STEPS)
    value = ExactValue(prob, theta)
    method = make_method(method_config(cfg), env, policy, value)
    batch, R = rollout(env, 64, 3)
    p = method.costates(batch, R)
    for k in range(STEPS):
        U, u, _ = value.coeffs(float(env.kernel.taus[k + 1]))
        x = batch.latents[k + 1]
        want = -x @ torch.as_tensor(U) + torch.as_tensor(u)
        torch.testing.assert_close(p[k].double(), want, rtol=1e-5, atol=1e-5)


class StepQuadraticValue(torch.nn.Module):
    """:math:`V(\\tau_k, x) = x^\\top A_k x + b_k^\\top x + c_k` with free coefficients per grid step: a class that
    holds the least-squares fit of any targets per step (the image value-model interface ``value(tau, x, cond)``)."""

    def __init__(self, taus, d):
        super().__init__()
        self.taus = torch.as_tensor(np.asarray(taus, dtype=np.float64))
        n = len(taus)
        self.A = torch.nn.Parameter(torch.zeros(n, d, d, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(n, d, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, tau, y, cond=None):
        k = int(torch.argmin((self.taus - float(tau)).abs()))
        return ((y @ self.A[k]) * y).sum(-1) + y @ self.b[k] + self.c[k]


class _OneProcess:
    """The update runtime of one process with its own optimizer (as the image task's critic phase has)."""

    def __init__(self, optimizer, scheduler=None):
        self.optimizer, self.scheduler = optimizer, scheduler

    def backward(self, loss):
        loss.backward()

    def no_sync(self):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def optimizer_step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return {}

    def reduce(self, value, op):
        return float(value)


@pytest.mark.parametrize("kind", ["vp", "rf"])
def test_separate_critic_phase_converges_to_the_least_squares_fit_of_the_chain_value_targets(kind):
    """``value.fit='separate'`` as the image task runs it (:class:`ValueFitting` through the one trainer's update,
    the critic's own optimizer), on the LQ toy: the critic converges to the per-step least-squares fit of the
    Monte-Carlo targets :math:`R - \\beta\\sum_{j \\ge k} KL_j` (chain KLs, computed here independently), to 1e-4 of
    the targets' spread; the advantages are then computed with the fitted critic. Negative control: the fit of the
    reward alone (the KL-to-go forgotten) is far from it (measured 7.5 and 3.3 spreads)."""
    from sa_theory.algorithms.method_base import ValueFitting
    from sa_theory.algorithms.trainer import Trainer, UpdatePlan

    prob = problem(kind)
    theta = 0.3 * np.random.default_rng(4).normal(size=prob.n_params(PIECES))
    cfg = Config()
    cfg.train.method, cfg.train.beta, cfg.value.fit = "sa_ac", prob.beta, "separate"
    policy = AffinePolicy(prob, theta)
    env = ToyEnvironment(prob, policy, STEPS)
    value = StepQuadraticValue(env.kernel.taus[:STEPS], 2)
    method = make_method(method_config(cfg), env, policy, value)
    assert method.cfg.value_coef == 0  # the actor's loss carries no critic term
    opt = torch.optim.Adam(value.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    plan = UpdatePlan(num_inner_epochs=3000, minibatch_size=1000, gradient_accumulation_steps=1,
                      live_steps=tuple(range(STEPS)), steps_per_minibatch=STEPS)
    method.value_fitter = lambda m, b: Trainer(_OneProcess(opt, sched)).update(ValueFitting(m), b, plan,
                                                                        torch.Generator().manual_seed(0))
    batch, R = rollout(env, 1000, 5)
    method.prepare(batch, R)
    kl = batch.kl_steps_of("chain")
    targets = R[None] - prob.beta * kl.flip(0).cumsum(0).flip(0)  # (K, B)
    x = batch.latents[:STEPS]
    feats = torch.stack([x[..., 0] ** 2, x[..., 0] * x[..., 1], x[..., 1] ** 2, x[..., 0], x[..., 1],
                         torch.ones_like(x[..., 0])], -1)  # (K, B, 6)

    def lsq(y):
        return torch.stack([feats[k] @ torch.linalg.lstsq(feats[k], y[k][:, None]).solution[:, 0]
                            for k in range(STEPS)])

    with torch.no_grad():
        fitted = torch.stack([value(env.kernel.taus[k], x[k]) for k in range(STEPS)])
    spread = targets.std()
    assert (fitted - lsq(targets)).abs().max() < 1e-4 * spread  # measured 9e-15 (vp), 2.6e-5 (rf) of it
    assert (fitted - lsq(R[None].expand_as(targets))).abs().max() > 0.5 * spread  # negative control: 7.5, 3.3
    from sa_theory.estimators import reward_to_go

    want = method._clip_adv(reward_to_go(R, kl, prob.beta) - fitted)  # G_k - V(tau_k, x_k), the fitted critic
    torch.testing.assert_close(batch.step_data["adv"].double(), want, rtol=0, atol=1e-5)  # values in float32
