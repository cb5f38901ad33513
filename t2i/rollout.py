r"""Sampling rollouts on a Stable Diffusion UNet that record what the RL methods need.

:func:`sample_rollout` runs K steps of a Gaussian step kernel (:class:`sa_theory.kernels.DDIMKernel` with
``eta > 0`` or :class:`~sa_theory.kernels.DDPMKernel`, built by :func:`t2i.scheduling.make_kernel`) with the
LoRA policy and records, for every step ``k``:

* the latents :math:`x_k` (``latents``, ``(K+1, B, C, h, w)``; ``latents[0]`` is the initial noise);
* the policy's guided noise prediction ``eps`` (the action is :math:`a_k =
  -\epsilon_k/\sqrt{1-\bar\alpha_k}`, :func:`~t2i.scheduling.score_from_eps`);
* ``log_probs`` ``(K, B)``: :math:`\log N(x_{k+1}; m_k, \mathrm{std}_k^2 I)` **summed over latent dims**,
  nats per step (``kernel.log_prob``); 0 on deterministic steps;
* with ``record_reference``: the pretrained model's guided ``ref_eps`` (same UNet, adapters disabled) and two
  per-step KLs to it, ``(K, B)``, nats per step, summed over dims (``kernel.step_kl``):
  ``kl_steps`` the exact KL of the chain's step :math:`\frac{w_k}{2}|a_k - s_k|^2 = |m_k^\theta -
  m_k^{pre}|^2/(2\mathrm{std}_k^2)`, and ``kl_steps_ct`` the continuous-time (Girsanov) estimate
  :math:`\frac{\bar w_k}{2}|a_k - s_k|^2` with the KL rate integrated over the step. ``path_kl`` and
  ``path_kl_ct`` (per image, nats per path) are their sums over steps; the first depends on K at coarse
  steps, the second is stable across K (:mod:`sa_theory.kernels`).

Classifier-free guidance: both the policy and the pretrained action are the *guided* score with the same
scale ``w`` (:func:`guided_eps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .models import decode_latents, encode_prompts, pretrained
from .scheduling import StepKernel, eps_from_model_output, score_from_eps

__all__ = ["RolloutBatch", "guided_eps", "sample_rollout", "sample_images"]


def guided_eps(
    unet,
    x: torch.Tensor,
    timestep: int,
    embeds: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    alphabar: float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Guided noise prediction :math:`\\epsilon_u + w(\\epsilon_c - \\epsilon_u)` (float32), one UNet call
    on the doubled batch. ``uncond=None`` or ``w=1`` gives the conditional prediction."""
    dtype = next(p for p in unet.parameters()).dtype if not hasattr(unet, "dtype") else unet.dtype
    if uncond is None or guidance_scale == 1.0:
        out = unet(x.to(dtype), timestep, encoder_hidden_states=embeds.to(dtype)).sample.float()
    else:
        out = unet(
            torch.cat([x, x]).to(dtype), timestep, encoder_hidden_states=torch.cat([uncond, embeds]).to(dtype)
        ).sample.float()
        u, c = out.chunk(2)
        out = u + guidance_scale * (c - u)
    return eps_from_model_output(out, x, alphabar, prediction_type)


@dataclass
class RolloutBatch:
    """One batch of recorded sampler paths (see module docstring). Tensors on the rollout device."""

    prompts: list[str]
    embeds: torch.Tensor
    uncond: torch.Tensor | None
    pooled: torch.Tensor
    latents: torch.Tensor
    eps: torch.Tensor
    log_probs: torch.Tensor
    ref_eps: torch.Tensor | None = None
    kl_steps: torch.Tensor | None = None
    kl_steps_ct: torch.Tensor | None = None
    images: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    step_data: dict[str, torch.Tensor] = field(default_factory=dict)  # per-step extras, (K, B, ...)
    path_data: dict[str, Any] = field(default_factory=dict)  # per-path extras, (B, ...)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[1]

    @property
    def num_steps(self) -> int:
        return self.eps.shape[0]

    @property
    def path_kl(self) -> torch.Tensor | None:
        """Exact KL of the discrete chain to the pretrained sampler per image (nats per path)."""
        return None if self.kl_steps is None else self.kl_steps.sum(0)

    @property
    def path_kl_ct(self) -> torch.Tensor | None:
        """Continuous-time (Girsanov) path KL estimate per image (nats per path), stable across K."""
        return None if self.kl_steps_ct is None else self.kl_steps_ct.sum(0)

    def kl_steps_of(self, form: str) -> torch.Tensor | None:
        """Per-step KLs of ``form``: ``"chain"`` (``kl_steps``) or ``"continuous"`` (``kl_steps_ct``)."""
        return {"chain": self.kl_steps, "continuous": self.kl_steps_ct}[form]

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """Sub-batch of paths ``idx`` (step-major tensors indexed on dim 1)."""

        def sel(t, dim):
            return None if t is None else t.index_select(dim, idx.to(t.device))

        step_major = ("latents", "eps", "log_probs", "ref_eps", "kl_steps", "kl_steps_ct")
        return RolloutBatch(
            prompts=[self.prompts[i] for i in idx.tolist()],
            **{n: sel(getattr(self, n), 0) for n in ("embeds", "uncond", "pooled", "images", "rewards")},
            **{n: sel(getattr(self, n), 1) for n in step_major},
            step_data={k: sel(v, 1) for k, v in self.step_data.items()},
            path_data={k: sel(v, 0) for k, v in self.path_data.items()},
        )

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        def cat(name, dim):
            ts = [getattr(b, name) for b in batches]
            return None if ts[0] is None else torch.cat(ts, dim)

        step_major = ("latents", "eps", "log_probs", "ref_eps", "kl_steps", "kl_steps_ct")
        return RolloutBatch(
            prompts=sum((b.prompts for b in batches), []),
            **{n: cat(n, 0) for n in ("embeds", "uncond", "pooled", "images", "rewards")},
            **{n: cat(n, 1) for n in step_major},
        )


@torch.no_grad()
def sample_rollout(
    pipe,
    kernel: StepKernel,
    prompts: list[str],
    guidance_scale: float,
    generator: torch.Generator,
    record_reference: bool = True,
    negative_prompt: str = "",
    unet=None,
    decode: bool = True,
) -> RolloutBatch:
    """Sample ``len(prompts)`` images with the policy (LoRA on), recording the path (module docstring).

    Noise comes from ``generator`` only (initial latents, then one draw per step), so a rollout is a
    deterministic function of the generator state and the weights.
    """
    unet = unet if unet is not None else pipe.unet
    device = unet.device
    B = len(prompts)
    embeds, pooled = encode_prompts(pipe, prompts, device)
    uncond = None
    if guidance_scale != 1.0:
        uncond = encode_prompts(pipe, [negative_prompt] * B, device)[0]
    C, h = unet.config.in_channels, unet.config.sample_size
    x = torch.randn((B, C, h, h), generator=generator, device="cpu").to(device)
    pt = pipe.scheduler.config.get("prediction_type", "epsilon")
    lat, eps_l, lps, refs, kls, kls_ct = [x], [], [], [], [], []
    for k in range(kernel.num_steps):
        t, ab = int(kernel.timesteps[k]), float(kernel.alphabar[k])
        eps = guided_eps(unet, x, t, embeds, uncond, guidance_scale, ab, pt)
        action = score_from_eps(eps, ab)
        mean = kernel.mean(k, x, action)
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(device)
        x_next = mean + kernel.std(k) * noise
        lps.append(kernel.log_prob(k, x_next, mean))
        if record_reference:
            with pretrained(unet):
                ref = guided_eps(unet, x, t, embeds, uncond, guidance_scale, ab, pt)
            refs.append(ref)
            ref_action = score_from_eps(ref, ab)
            kls.append(kernel.step_kl(k, action, ref_action, "chain"))
            kls_ct.append(kernel.step_kl(k, action, ref_action, "continuous"))
        eps_l.append(eps)
        lat.append(x_next)
        x = x_next
    batch = RolloutBatch(
        list(prompts),
        embeds.float(),
        None if uncond is None else uncond.float(),
        pooled.float(),
        torch.stack(lat),
        torch.stack(eps_l),
        torch.stack(lps),
        torch.stack(refs) if record_reference else None,
        torch.stack(kls) if record_reference else None,
        torch.stack(kls_ct) if record_reference else None,
    )
    if decode:
        batch.images = decode_latents(pipe, x)
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
) -> torch.Tensor:
    """Images in [0, 1] from any sampler in :data:`t2i.scheduling.SAMPLERS` (including multistep
    DPM-Solver++/UniPC/DEIS, which have no log-probabilities) using the diffusers scheduler's ``step``."""
    from .scheduling import make_sampling_scheduler

    sch = make_sampling_scheduler(pipe.scheduler.config, sampler)
    sch.set_timesteps(num_steps)
    unet = pipe.unet
    device = unet.device
    B = len(prompts)
    embeds, _ = encode_prompts(pipe, prompts, device)
    uncond = encode_prompts(pipe, [negative_prompt] * B, device)[0] if guidance_scale != 1.0 else None
    C, h = unet.config.in_channels, unet.config.sample_size
    x = torch.randn((B, C, h, h), generator=generator).to(device) * sch.init_noise_sigma
    acp = sch.alphas_cumprod
    for t in sch.timesteps:
        xin = sch.scale_model_input(x, t)
        eps = guided_eps(unet, xin, int(t), embeds, uncond, guidance_scale, float(acp[int(t)]), "epsilon")
        kw = (
            {"eta": eta, "generator": generator}
            if sampler == "ddim"
            else ({"generator": generator} if sampler == "ddpm" else {})
        )
        x = sch.step(eps, t, x, **kw).prev_sample
    return decode_latents(pipe, x)
