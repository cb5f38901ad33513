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
and normalises per group), so they are not in this list.
"""

from __future__ import annotations

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
