"""Contract suite of the step environments (issue #14): every environment the methods train on -- the toy problems
(:class:`~sa_theory.algorithms.step_env.ToyStepEnvironment`, VP and rectified flow), a diffusers UNet with LoRA and an
SD3-class flow transformer with LoRA (:mod:`t2i.environments`) -- goes through the same checks, with every method of
:data:`~sa_theory.algorithms.methods.METHOD_CLASSES`, on rollouts of the one sampling loop
(:func:`sa_theory.sampling.sample_chain`):

* the kernel is a :class:`~sa_theory.kernels.GaussianKernel` on the environment's grid; actions have the state's
  shape; the batched ``grid_actions`` (where an environment has it) equals the per-step ``action``;
* at the sampling policy the recomputed log-probs equal the rollout's (parity), the kernel's batched log-probs and
  KLs equal the per-step ones, and the value model accepts the environment's ``value_cond``;
* every method's loss and diagnostics over all steps are the sums of its one-step calls (the units contract of
  :mod:`sa_theory.algorithms.method_base`: sum over steps, mean over paths), finite, with a non-zero policy gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sa_theory.algorithms import Environment
from sa_theory.algorithms.methods import METHOD_CLASSES, MethodConfig, make_method
from sa_theory.algorithms.policies import ResidualMLPPolicy
from sa_theory.algorithms.rl_batch import RolloutBatch
from sa_theory.algorithms.step_env import ToyStepEnvironment
from sa_theory.kernels import GaussianKernel
from sa_theory.sampling import sample_chain
from sa_theory.value import MLPValue

B = 4


def _perturb(params, scale=0.05):
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def toy(kind):
    from sa_theory.schedules import RectifiedFlow
    from toy_problems import LinearGaussianProblem
    from toy_problems.train import make_env, make_problem

    if kind == "vp":
        prob = make_problem("gauss2d", 1.0)
    else:  # rectified flow at noise level eta = 0.245 (Flow-GRPO's a = 0.7)
        prob = LinearGaussianProblem([0.5, -0.3], [[1.0, 0.2], [0.2, 0.6]], schedule=RectifiedFlow(t_max=0.9),
                                     Q=0.3 * np.eye(2), w=[0.4, 0.1], noise=0.245)
    env: Environment = make_env(prob, kind)
    torch.manual_seed(0)
    policy = ResidualMLPPolicy(env.pretrained_action, 2, hidden=16).double()
    _perturb([p for p in policy.parameters() if p.requires_grad])
    taus = torch.linspace(0, env.sde.T, 7, dtype=torch.float64)
    step_env = ToyStepEnvironment(env, taus)
    gen = torch.Generator().manual_seed(1)
    x0 = env.initial_sample(B, gen, torch.float64)
    text = {"cond": None}
    with torch.no_grad():
        ch = sample_chain(step_env.kernel, lambda k, x: step_env.action(k, x, text, policy), x0, generator=gen,
                          reference_fn=lambda k, x: env.pretrained_action(taus[k], x, None))
    batch = RolloutBatch([""] * B, text, ch.states, ch.actions, ch.log_probs, ch.ref_actions, ch.kl_steps,
                         ch.kl_steps_ct, ref_log_probs=ch.ref_log_probs)
    return step_env, policy, MLPValue(2, hidden=8).double(), batch, env.reward(ch.final, None)


def image(kind):
    from t2i.config import get_preset
    from t2i.environments import make_environment
    from t2i.models import build_tiny_pipeline, denoiser, lora_parameters
    from t2i.rollout import sample_rollout
    from t2i.values import make_value_model

    cfg = get_preset("tiny_cpu")
    if kind == "unet":
        from t2i.models import add_lora

        pipe = build_tiny_pipeline(0)
        add_lora(pipe.unet, 4, init_seed=0)
        cfg.sample.sampler = "ddim"
    else:
        from t2i.flow_models import add_transformer_lora, build_tiny_sd3_pipeline

        pipe = build_tiny_sd3_pipeline(0)
        add_transformer_lora(pipe.transformer, rank=4, init_seed=0)
        cfg.sample.sampler = "flow"
    net = denoiser(pipe)
    _perturb(lora_parameters(net))  # the policy differs from the pretrained model
    env = make_environment(pipe, cfg.sample, num_steps=3)
    batch = sample_rollout(env, ["a cat", "a dog", "a cat", "a fox"], torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    value = make_value_model("critic", net.config.in_channels, env.text_dim, 8)
    return env, net, value, batch, batch.images.mean((1, 2, 3))


ENVIRONMENTS = {"toy_vp": lambda: toy("vp"), "toy_rf": lambda: toy("rf"), "unet_lora": lambda: image("unet"),
                "sd3_lora": lambda: image("sd3")}


@pytest.fixture(params=sorted(ENVIRONMENTS), scope="module")
def setup(request):
    return ENVIRONMENTS[request.param]()


def test_kernel_actions_and_grid_actions(setup):
    env, model, _, batch, _ = setup
    assert isinstance(env.kernel, GaussianKernel) and batch.num_steps == env.kernel.num_steps
    ks = list(range(batch.num_steps))
    per_step = torch.stack([env.action(k, batch.latents[k], batch.text, model) for k in ks])
    assert per_step.shape == batch.latents[:-1].shape
    if hasattr(env, "grid_actions"):
        grid = env.grid_actions(ks, batch.latents[ks], batch.text, model, batch.ref_actions)
        # one batched network call rounds differently from K small ones (float32: ~1e-6 of the actions' scale)
        tol = 100 * torch.finfo(per_step.dtype).eps * float(per_step.detach().abs().max())
        torch.testing.assert_close(grid, per_step, rtol=0, atol=tol)


def test_log_prob_parity_batched_kernel_and_value_conditioning(setup):
    env, model, value, batch, rewards = setup
    kern, ks = env.kernel, list(range(batch.num_steps))
    with torch.no_grad():
        a = torch.stack([env.action(k, batch.latents[k], batch.text, model) for k in ks])
        lp = kern.grid_log_probs(ks, batch.latents[ks], batch.latents[[k + 1 for k in ks]], a)
        kl = kern.grid_step_kls(ks, a, batch.ref_actions, "chain")
    torch.testing.assert_close(lp, batch.log_probs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl, batch.kl_steps, rtol=1e-5, atol=1e-6)
    for k in ks:
        torch.testing.assert_close(lp[k], kern.log_prob(k, batch.latents[k + 1], kern.mean(k, batch.latents[k], a[k])))
        v = value(float(kern.taus[k]), batch.latents[k], env.value_cond(batch, k, None))
        assert v.shape == (batch.batch_size,) and torch.isfinite(v).all()


@pytest.mark.parametrize("name", sorted(METHOD_CLASSES))
def test_every_method_loss_is_the_sum_of_its_one_step_losses(setup, name):
    env, model, value, batch, rewards = setup
    cfg = MethodConfig(method=name, beta=0.1, estimator="value_gradient" if name == "sa_ac" else "likelihood_ratio",
                       value_coef=0.5)
    method = make_method(cfg, env, model, value if name in ("sa_ac", "dpok") else None)
    b = batch.select(torch.arange(batch.batch_size))
    method.prepare(b, method.path_return(b, rewards.to(batch.log_probs)))
    method.losses(b)
    # the sampling policy: recomputed = rollout log-probs, up to float rounding of a sum over the latent dims (all
    # steps in one batched call: ~1e-6 of |log-prob| in float32)
    assert method.logprob_delta() < max(1e-3, 1e-5 * float(b.log_probs.abs().max()))
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    try:
        _perturb(params, 0.02)  # a policy after some updates: ratios, clipping and the trust region are active
        whole = method.losses(b)
        parts = [method.losses(b, [k]) for k in range(b.num_steps)]
        for key, val in whole.items():
            assert torch.isfinite(val).all(), key
            # rtol 1e-3: the whole is one batched call on the image environments (its per-step ratios
            # exp(log-prob - old) carry that call's rounding, 1e-3 nats of a 4096-dim float32 log-prob); a units
            # error (mean for sum over steps or dims) is off by a factor of K or more
            torch.testing.assert_close(val.detach(), sum(p[key].detach() for p in parts), rtol=1e-3, atol=1e-7)
        grads = torch.autograd.grad(whole["loss"], params, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        assert float(whole.get("ratio_dev", torch.ones(()))) > 0 and float(whole.get("kl_to_old", torch.ones(()))) > 0
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
