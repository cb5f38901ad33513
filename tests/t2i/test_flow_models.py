"""SD3-class flow models on a tiny pipeline built from config (no download): encoders, guided velocity, LoRA."""

import pytest
import torch

from t2i.flow_models import (
    add_transformer_lora,
    build_tiny_sd3_pipeline,
    decode_sd3_latents,
    encode_sd3_prompts,
    guided_velocity,
)
from t2i.models import lora_parameters, pretrained


@pytest.fixture(scope="module")
def sd3():
    pipe = build_tiny_sd3_pipeline(0)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    add_transformer_lora(pipe.transformer, rank=4, init_seed=0)
    with torch.no_grad():  # a non-zero LoRA so that policy and pretrained differ
        for p in lora_parameters(pipe.transformer):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return pipe, base


def test_tiny_pipeline_is_reproducible_and_samples_end_to_end():
    a, b = build_tiny_sd3_pipeline(3), build_tiny_sd3_pipeline(3)
    for (ka, va), (kb, vb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    out = a(["a cat"], num_inference_steps=2, guidance_scale=2.0, output_type="pt", max_sequence_length=16,
            height=16, width=16).images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_guided_velocity_is_the_cfg_combination_of_two_calls(sd3):
    pipe, _ = sd3
    text = encode_sd3_prompts(pipe, ["a red cat", "two dogs"])
    assert text["embeds"].shape[0] == 2 and text["neg_embeds"].shape == text["embeds"].shape
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w = 4.5
        v = guided_velocity(pipe.transformer, x, 0.6, text, w)
        cond = guided_velocity(pipe.transformer, x, 0.6, text, 1.0)
        unc = guided_velocity(pipe.transformer, x, 0.6, {"embeds": text["neg_embeds"], "pooled": text["neg_pooled"]},
                              1.0)
    torch.testing.assert_close(v, unc + w * (cond - unc), rtol=1e-5, atol=1e-5)
    assert (v - cond).abs().max() > 1e-3  # guidance changes the field (negative control for the check above)
    no_cfg = encode_sd3_prompts(pipe, ["a red cat", "two dogs"], guidance=False)
    assert no_cfg["neg_embeds"] is None
    with torch.no_grad():
        torch.testing.assert_close(guided_velocity(pipe.transformer, x, 0.6, no_cfg, w), cond)


def test_disabled_adapters_give_the_pretrained_transformer(sd3):
    from diffusers import SD3Transformer2DModel

    pipe, base = sd3
    ref = SD3Transformer2DModel.from_config(pipe.transformer.config)
    ref.load_state_dict(base)
    text = encode_sd3_prompts(pipe, ["a cat"], guidance=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v_ref = guided_velocity(ref, x, 0.3, text, 1.0)
        v_pol = guided_velocity(pipe.transformer, x, 0.3, text, 1.0)
        with pretrained(pipe.transformer):
            v_pre = guided_velocity(pipe.transformer, x, 0.3, text, 1.0)
    torch.testing.assert_close(v_pre, v_ref, rtol=0, atol=1e-6)
    assert (v_pol - v_ref).abs().max() > 1e-4
    trainable = {n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("add_q_proj" in n for n in trainable)  # the context stream is adapted too


def test_pretrained_context_matches_diffusers_toggle_nests_and_restores(sd3):
    """The cached-layer toggle gives bitwise the output of diffusers' disable_adapters(); a nested context leaves
    the adapters disabled until the outer one exits; on exit the policy is back, bitwise."""
    pipe, _ = sd3
    tr = pipe.transformer
    text = encode_sd3_prompts(pipe, ["a cat"], guidance=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v_pol = guided_velocity(tr, x, 0.4, text, 1.0)
        tr.disable_adapters()
        v_diffusers = guided_velocity(tr, x, 0.4, text, 1.0)
        tr.enable_adapters()
        with pretrained(tr):
            with pretrained(tr):
                pass
            v_nested = guided_velocity(tr, x, 0.4, text, 1.0)  # still the pretrained model
        assert torch.equal(v_nested, v_diffusers)
        assert torch.equal(guided_velocity(tr, x, 0.4, text, 1.0), v_pol)
    assert (v_pol - v_diffusers).abs().max() > 1e-4
    from diffusers import SD3Transformer2DModel

    with pytest.raises(ValueError, match="no adapter layers"):
        with pretrained(SD3Transformer2DModel.from_config(tr.config)):
            pass


def test_decode_maps_latents_to_unit_interval_images(sd3):
    pipe, _ = sd3
    with torch.no_grad():
        im = decode_sd3_latents(pipe, torch.randn(2, 4, 8, 8))
    assert im.shape == (2, 3, 16, 16) and im.min() >= 0 and im.max() <= 1


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_ode_chain_of_the_flow_environment_reproduces_the_sd3_pipeline(w):
    """eta = 0 through the one sampling loop == StableDiffusion3Pipeline's own sampler, bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sa_theory.flow_kernel import FlowMatchKernel
    from sa_theory.sampling import sample_chain
    from t2i.environments import FlowEnvironment

    pipe = build_tiny_sd3_pipeline(0)
    sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(6)
    kern = FlowMatchKernel(sch.sigmas.double().numpy(), ("eta", 0.0))
    env = FlowEnvironment(pipe, kern, guidance_scale=w)
    prompts = ["a cat", "a dog"]
    text = env.encode(prompts)
    x0 = env.initial_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        chain = sample_chain(kern, lambda k, x: env.action(k, x, text), x0)
        ref = pipe(prompts, num_inference_steps=6, guidance_scale=w, latents=x0.clone(), output_type="latent",
                   max_sequence_length=16, height=16, width=16).images
    assert torch.equal(chain.final, ref)
    # negative control: a stochastic member (eta = 1) leaves the ODE path
    with torch.no_grad():
        sde = sample_chain(FlowMatchKernel(sch.sigmas.double().numpy(), ("eta", 1.0)),
                           lambda k, x: env.action(k, x, text), x0)
    assert (sde.final - ref).abs().max() > 1e-2


def test_resolution_sets_the_latent_size_and_bad_values_name_the_field(sd3):
    """``sample.resolution`` (pixels) sets the latents to resolution / VAE scale (tiny SD3: scale 2, native 8
    latents = 16 px); sampling at 32 px gives 32 x 32 images; a resolution off the VAE-scale x patch grid raises
    naming ``sample.resolution``. The sd35m presets train at 512 px (Flow-GRPO's size), not the native 1024."""
    from t2i.config import Config, get_preset
    from t2i.environments import latent_size, make_environment
    from t2i.rollout import sample_rollout

    sd3, _ = sd3
    s = Config().sample
    s.sampler, s.num_steps, s.guidance_scale = "flow", 2, 1.0
    assert latent_size(sd3) == sd3.transformer.config.sample_size == 8
    s.resolution = 32
    env = make_environment(sd3, s)
    assert env.latent_shape() == (4, 16, 16)
    b = sample_rollout(env, ["a", "b"], torch.Generator().manual_seed(0), record_reference=False)
    assert b.latents.shape == (3, 2, 4, 16, 16) and b.images.shape[-2:] == (32, 32)
    for bad in (15, 0, 1):
        s.resolution = bad
        with pytest.raises(ValueError, match="sample.resolution"):
            make_environment(sd3, s)
    assert get_preset("sd35m_sa_ac").sample.resolution == get_preset("sd35m_flow_grpo").sample.resolution == 512
