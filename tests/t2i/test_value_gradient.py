"""The image sa_ac with ``train.estimator='value_gradient'`` is the toy-verified trust-region surrogate (R4/R8) on
the step kernel: at theta = theta_old its LoRA gradient equals the value-gradient formula
sum_k [lambda_k p_k - beta w_k (a_k - s_k)] . da_k/dtheta with p_k = grad_x V(tau_{k+1}, x_{k+1}), on a UNet (DDIM)
and on a flow transformer (velocity actions, negative slopes)."""

import pytest
import torch

from t2i.config import apply_overrides, get_preset
from t2i.models import denoiser, lora_parameters, pretrained
from t2i.trainer import make_trainer
from t2i.values import tweedie_rewards


@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_flow_cpu"])
def test_value_gradient_surrogate_gradient_is_the_r4_formula(tmp_path, preset):
    cfg = apply_overrides(get_preset(preset), {
        "train.estimator": "value_gradient", "value.kind": "critic", "sample.num_steps": "3",
        "sample.batch_size": "4", "train.batch_size": "2", "train.num_epochs": "1", "train.beta": "0.01",
        "train.kl_penalty": "2.0", "log.output_dir": str(tmp_path / "run"), "log.tensorboard": "false",
        "log.image_every": "0"})
    tr = make_trainer(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a policy away from the pretrained model and a critic with a non-zero gradient
        for p in lora_parameters(denoiser(tr.pipe)):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for p in tr.value.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    batch = tr.sample_epoch(torch.Generator().manual_seed(0))
    tr.method.prepare(batch, batch.rewards)
    params = lora_parameters(denoiser(tr.pipe))
    kern, beta, w_all = tr.kernel, cfg.train.beta, tr.kernel.weights(cfg.train.kl_weighting)
    live = [k for k in range(kern.num_steps) if kern.stochastic[k]]
    assert batch.step_data["costate"].abs().max() > 0
    # the tiny critic's gradient is small: rescale the recorded costates so both terms of the formula matter
    for k in live:
        p, drift = batch.step_data["costate"][k], beta * w_all[k] * (batch.actions[k] - batch.ref_actions[k])
        batch.step_data["costate"][k] = p * float(drift.norm() / (abs(kern.slope(k)) * p.norm() + 1e-30))
    for k in live:
        got = torch.autograd.grad(tr.method.losses(batch, [k])["loss"], params)  # the critic term has no LoRA grad
        a = tr.env.action(k, batch.latents[k], batch.text)
        p, s, a_old = batch.step_data["costate"][k], batch.ref_actions[k], batch.actions[k]
        coef = kern.slope(k) * p - beta * w_all[k] * (a_old - s)
        manual = -(coef * a).flatten(1).sum(1).mean()
        want = torch.autograd.grad(manual, params, retain_graph=True)
        num = sum(float((x - y).pow(2).sum()) for x, y in zip(got, want))
        den = sum(float(y.pow(2).sum()) for y in want)
        assert num <= 1e-8 * den, (k, num, den)
        # negative controls: the slope left out (c = 1), or the costate of another step
        for wrong_p, c in ((p, 1.0), (batch.step_data["costate"][k - 1 if k else k + 1], kern.slope(k))):
            wrong = -((c * wrong_p - beta * w_all[k] * (a_old - s)) * a).flatten(1).sum(1).mean()
            bad = torch.autograd.grad(wrong, params, retain_graph=True)
            assert sum(float((x - y).pow(2).sum()) for x, y in zip(got, bad)) > 1e-4 * den


def test_tweedie_term_of_the_residual_critic_is_differentiated_for_a_differentiable_reward(tmp_path):
    """With a residual critic whose network part is still zero, the costate is exactly the gradient of the Tweedie
    input r(decode(x0_hat(x))) (pretrained prediction) at the next state; at the last step, of r(decode(x))."""
    cfg = apply_overrides(get_preset("tiny_cpu"), {
        "train.estimator": "value_gradient", "value.kind": "residual", "sample.num_steps": "3",
        "sample.batch_size": "2", "train.batch_size": "2", "train.num_epochs": "1",
        "log.output_dir": str(tmp_path / "run"), "log.tensorboard": "false", "log.image_every": "0"})
    tr = make_trainer(cfg)
    assert tr.method.tweedie_fn is not None  # brightness is differentiable
    batch = tr.sample_epoch(torch.Generator().manual_seed(0))
    # the trainer's Tweedie inputs of the recorded states (ImageTask.prepare does this before the method's prepare)
    batch.step_data["tweedie"] = tweedie_rewards(tr.env, batch.latents, batch.ref_actions, tr.reward, batch.prompts)
    tr.method.prepare(batch, batch.rewards)
    p = batch.step_data["costate"]
    K = batch.num_steps
    for k in range(K):
        x = batch.latents[k + 1].detach().requires_grad_(True)
        if k + 1 < K:
            with pretrained(tr.env.model):
                x0 = tr.env.x0_hat(k + 1, x, tr.env.action(k + 1, x, batch.text))
        else:
            x0 = x
        r = tr.reward(tr.env.decode(x0), batch.prompts).float().sum()
        (want,) = torch.autograd.grad(r, x)
        assert want.abs().max() > 0
        torch.testing.assert_close(p[k], want, rtol=1e-4, atol=1e-7)
    # negative control: without tweedie_fn the Tweedie input is a fixed number and the costate vanishes
    tr.method.tweedie_fn = None
    tr.method.prepare(batch, batch.rewards)
    assert batch.step_data["costate"].abs().max() == 0
