"""Several steps in one denoiser pass (``ImageEnvironment.grid_actions``, ``train.steps_per_backward``).

The image environments stack the states of several steps into one batch (per-row timesteps and alphabars, the
text repeated per step) so that an update trains a minibatch's steps with one forward and one backward. Checked on
the tiny UNet (epsilon and v-prediction, DDIM) and the tiny SD3 transformer (flow), with and without classifier-free
guidance and with the frozen unconditional branch: the actions and their LoRA gradients equal the per-step ones up
to float32 rounding, one step is the per-step action bit for bit, and a training update with ``steps_per_backward``
0 computes the same gradient as with 1 in one denoiser call per minibatch instead of one per step.
"""

import pytest
import torch

from t2i.models import add_lora, denoiser, lora_parameters, lora_targets

from .conftest import tiny_config

KS = [0, 2, 3]


def _env(kind: str, w: float, lora_uncond: bool):
    from t2i.config import Config
    from t2i.environments import make_environment

    if kind == "flow":
        from t2i.flow_models import build_tiny_sd3_pipeline

        pipe, sampler = build_tiny_sd3_pipeline(0), "flow"
    else:
        from t2i.models import build_tiny_pipeline

        pipe, sampler = build_tiny_pipeline(0), "ddim"
        if kind == "unet_v":
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    net = denoiser(pipe)
    add_lora(net, 4, targets=lora_targets(pipe), init_seed=0)
    with torch.no_grad():  # the policy differs from the pretrained model in every branch
        for p in lora_parameters(net):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    s = Config().sample
    s.sampler, s.num_steps, s.guidance_scale = sampler, 4, w
    env = make_environment(pipe, s, lora_uncond=lora_uncond)
    g = torch.Generator().manual_seed(1)
    states = torch.stack([env.initial_latents(3, g) for _ in KS])  # a different state at every step
    return env, net, states, env.encode(["a cat", "a dog", "a fox"])


@pytest.mark.parametrize("kind", ["unet_eps", "unet_v", "flow"])
@pytest.mark.parametrize("w,lora_uncond", [(1.0, True), (3.0, True), (3.0, False)])
def test_grid_actions_equal_the_per_step_actions_and_their_gradients(kind, w, lora_uncond):
    env, net, states, text = _env(kind, w, lora_uncond)
    params = lora_parameters(net)
    per = torch.stack([env.action(k, states[i], text, net) for i, k in enumerate(KS)])
    grid = env.grid_actions(KS, states, text, net)
    assert grid.shape == per.shape == states.shape
    scale = per.detach().abs().max()
    assert (grid - per).abs().max() <= 1e-5 * scale, "grid_actions differs from the per-step actions"
    g_per = torch.autograd.grad(per.square().sum(), params)
    g_grid = torch.autograd.grad(grid.square().sum(), params)
    for a, b in zip(g_per, g_grid):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-12
    with torch.no_grad():  # one step is the per-step action itself
        one = env.grid_actions([KS[1]], states[1:2], text, net)[0]
        assert torch.equal(one, env.action(KS[1], states[1], text, net))


def _first_update(tmp_path, steps_per_backward: int):
    """One epoch of the tiny sa_ac run: the LoRA gradient of its first optimizer update and the number of UNet calls
    in the update pass."""
    from t2i.trainer import make_trainer

    # kl_penalty 0: at the first update the KL-to-old term's gradient, (mu_new - mu_old) / sigma^2 * dmu/dtheta, is
    # pure float noise (zero with one step per pass, the rounding of the batched pass otherwise) amplified by
    # 1/sigma^2, and the untrained pipeline's actor gradient is small enough for it to show (3% on an AVX-512 CPU)
    over = {"sample.num_steps": 3, "sample.batch_size": 2, "train.batch_size": 2, "train.num_epochs": 1,
            "sample.guidance_scale": 3.0, "value.kind": "residual", "train.steps_per_backward": steps_per_backward,
            "train.kl_penalty": 0.0}
    tr = make_trainer(tiny_config(tmp_path / str(steps_per_backward), "sa_ac", **over))
    task, unet = tr.task, tr.pipe.unet
    grads, calls, seen = [], [], []
    step, backward = task.optimizer_step, task.backward

    def record_step():
        grads.append([p.grad.clone() for p in lora_parameters(unet)])
        return step()

    def record_backward(loss):
        calls.append(len(seen))  # UNet forwards with grad so far
        backward(loss)

    task.optimizer_step, task.backward = record_step, record_backward
    hook = unet.register_forward_hook(lambda *a: seen.append(1) if torch.is_grad_enabled() else None)
    try:
        m = tr.train_iteration()
    finally:
        hook.remove()
    return grads[0], calls, m


def test_steps_per_backward_0_trains_the_same_gradient_in_one_unet_call_per_minibatch(tmp_path):
    g1, calls1, m1 = _first_update(tmp_path, 1)
    g0, calls0, m0 = _first_update(tmp_path, 0)
    assert calls1 == [1, 2, 3] and calls0 == [1], (calls1, calls0)  # UNet forwards with grad before each backward
    # the batched pass may round the recomputed log-probs differently from the rollout's (ratio_dev: max |ratio - 1|,
    # 0 where it rounds alike, 1.3e-4 on an AVX-512 CPU); the actor gradient moves by about that much relatively
    tol = 1e-4 + 10 * m0["train/ratio_dev"]
    for a, b in zip(g1, g0):
        assert (a - b).abs().max() <= tol * a.abs().max() + 1e-12
    assert m0["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-5, abs=1e-7)
