r"""Image rollouts through the one sampling loop (:func:`sa_theory.sampling.sample_chain`) on an image environment.

:func:`sample_rollout` runs the K steps of the environment's Gaussian step kernel (DDIM ``eta > 0`` / DDPM for
UNets, :class:`sa_theory.flow_kernel.FlowMatchKernel` for rectified-flow transformers; :mod:`t2i.environments`)
with the LoRA policy and records, for every step ``k``:

* the latents :math:`x_k` (``latents``, ``(K+1, B, C, h, w)``; ``latents[0]`` is the initial noise);
* the policy's actions ``actions`` ``(K, B, C, h, w)`` in the kernel's units (UNets: the guided score
  :math:`-\epsilon/\sqrt{1-\bar\alpha_k}`; flow models: the guided velocity);
* ``log_probs`` ``(K, B)``: :math:`\log N(x_{k+1}; m_k, \mathrm{std}_k^2 I)` **summed over latent dims**,
  nats per step (``kernel.log_prob``); 0 on deterministic steps;
* with ``record_reference``: the pretrained model's actions ``ref_actions`` (same network, adapters disabled)
  and two per-step KLs to it, ``(K, B)``, nats per step, summed over dims (``kernel.step_kl``):
  ``kl_steps`` the exact KL of the chain's step :math:`\frac{w_k}{2}|a_k - s_k|^2 = |m_k^\theta -
  m_k^{pre}|^2/(2\mathrm{std}_k^2)`, and ``kl_steps_ct`` the continuous-time (Girsanov) estimate
  :math:`\frac{\bar w_k}{2}|a_k - s_k|^2` with the KL rate integrated over the step. ``path_kl`` and
  ``path_kl_ct`` (per image, nats per path) are their sums over steps; the first depends on K at coarse
  steps, the second is stable across K (:mod:`sa_theory.kernels`).

Classifier-free guidance: both the policy and the pretrained action are the *guided* prediction with the same
scale ``w`` (:func:`guided_eps`, :func:`t2i.flow_models.guided_velocity`).
"""

from __future__ import annotations

import torch

from sa_theory.algorithms.rl_batch import RolloutBatch
from sa_theory.sampling import sample_chain

from .models import decode_latents, encode_prompts, frozen_pretrained, weights_dtype
from .scheduling import eps_from_model_output

__all__ = ["RolloutBatch", "unet_output", "guided_eps", "sample_rollout", "sample_images"]


def unet_output(unet, x: torch.Tensor, timestep: int | torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The UNet's raw output (float32) for latents ``x`` and text ``embeds``, one call; ``timestep``: one for all
    rows, or a ``(B,)`` tensor of one per row."""
    dtype = weights_dtype(unet)
    return unet(x.to(dtype), timestep, encoder_hidden_states=embeds.to(dtype)).sample.float()


def guided_eps(
    unet,
    x: torch.Tensor,
    timestep: int | torch.Tensor,
    embeds: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    alphabar: float | torch.Tensor,
    prediction_type: str = "epsilon",
    uncond_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guided noise prediction :math:`\\epsilon_u + w(\\epsilon_c - \\epsilon_u)` (float32), one UNet call
    on the doubled batch. ``uncond=None`` or ``w=1`` gives the conditional prediction. ``uncond_out``: the
    unconditional raw output computed elsewhere (the frozen pretrained branch, ``model.lora_uncond = false``);
    then ``unet`` runs on the conditional half only. ``timestep`` and ``alphabar`` are one step's, or per row
    (``(B,)`` timesteps and float64 ``(B, 1, 1, 1)`` alphabars: rows of several steps in one call)."""
    if uncond is None or guidance_scale == 1.0:
        out = unet_output(unet, x, timestep, embeds)
    else:
        if uncond_out is None:
            t2 = torch.cat([timestep, timestep]) if torch.is_tensor(timestep) and timestep.dim() else timestep
            u, c = unet_output(unet, torch.cat([x, x]), t2, torch.cat([uncond, embeds])).chunk(2)
        else:
            u, c = uncond_out, unet_output(unet, x, timestep, embeds)
        out = u + guidance_scale * (c - u)
    return eps_from_model_output(out, x, alphabar, prediction_type)


@torch.no_grad()
def sample_rollout(env, prompts: list[str], generator: torch.Generator, record_reference: bool = True,
                   model=None, decode: bool = True) -> RolloutBatch:
    """Sample ``len(prompts)`` images with the policy (LoRA on; ``model`` overrides the environment's network,
    e.g. a DDP-wrapped one), recording the path (module docstring).

    Noise comes from ``generator`` only (initial latents, then one draw per step), so a rollout is a
    deterministic function of the generator state and the weights.
    """
    text = env.encode(list(prompts))
    x0 = env.initial_latents(len(prompts), generator)
    chain = sample_chain(
        env.kernel, lambda k, x: env.action(k, x, text, model), x0, generator=generator,
        reference_fn=(lambda k, x: env.reference_action(k, x, text)) if record_reference else None,
    )
    batch = RolloutBatch(list(prompts), text, chain.states, chain.actions, chain.log_probs, chain.ref_actions,
                         chain.kl_steps, chain.kl_steps_ct, ref_log_probs=chain.ref_log_probs)
    if decode:
        batch.images = env.decode(chain.final)
    return batch


@torch.no_grad()
def sample_images(
    pipe,
    prompts: list[str],
    sampler: str,
    num_steps: int,
    guidance_scale: float,
    generator: torch.Generator,
    eta: float = 1.0,
    negative_prompt: str = "",
    resolution: int | None = None,
    lora_uncond: bool = True,
) -> torch.Tensor:
    """Images in [0, 1] from any sampler in :data:`t2i.scheduling.SAMPLERS` (including multistep
    DPM-Solver++/UniPC/DEIS, which have no log-probabilities) using the diffusers scheduler's ``step``;
    ``sampler="flow"`` (SD3-class pipelines): the probability-flow ODE on the flow scheduler's grid, which is
    the pipeline's own Euler sampler (tested bit for bit). ``lora_uncond=False``: the unconditional branch of
    CFG is the pretrained model's (the policy of a run with ``model.lora_uncond = false``)."""
    if sampler == "flow":
        from .environments import FlowEnvironment
        from .scheduling import make_flow_kernel

        _, kern = make_flow_kernel(pipe.scheduler.config, num_steps, "eta", 0.0)
        env = FlowEnvironment(pipe, kern, guidance_scale, negative_prompt, resolution, lora_uncond=lora_uncond)
        return sample_rollout(env, prompts, generator, record_reference=False).images
    from .scheduling import make_sampling_scheduler

    sch = make_sampling_scheduler(pipe.scheduler.config, sampler)
    sch.set_timesteps(num_steps)
    unet = pipe.unet
    device = unet.device
    B = len(prompts)
    embeds, _ = encode_prompts(pipe, prompts, device)
    uncond = encode_prompts(pipe, [negative_prompt] * B, device)[0] if guidance_scale != 1.0 else None
    from .environments import latent_size

    C, h = unet.config.in_channels, latent_size(pipe, resolution)
    x = torch.randn((B, C, h, h), generator=generator).to(device) * sch.init_noise_sigma
    acp = sch.alphas_cumprod
    for t in sch.timesteps:
        xin = sch.scale_model_input(x, t)
        u = None
        if uncond is not None and not lora_uncond:
            with frozen_pretrained(unet):
                u = unet_output(unet, xin, int(t), uncond)
        eps = guided_eps(unet, xin, int(t), embeds, uncond, guidance_scale, float(acp[int(t)]), "epsilon", u)
        kw = (
            {"eta": eta, "generator": generator}
            if sampler == "ddim"
            else ({"generator": generator} if sampler == "ddpm" else {})
        )
        x = sch.step(eps, t, x, **kw).prev_sample
    return decode_latents(pipe, x)
