r"""Image environments: what the RL layer sees of a text-to-image model, one contract for UNets and flow models.

An environment owns the model-specific pieces and nothing of the algorithm:

* ``kernel`` -- the Gaussian step kernel of the training sampler (:mod:`sa_theory.kernels`,
  :mod:`sa_theory.flow_kernel`); its ``mean(k, x, a)`` is affine in the action ``a``;
* :meth:`encode` -- the text conditioning of a list of prompts (a dict of tensors batched on dim 0, with the
  negative prompt's when classifier-free guidance is on), detached;
* :meth:`initial_latents` -- :math:`x_0` from a generator (drawn on the generator's device, then moved);
* :meth:`action` -- the policy's action at step ``k`` (differentiable in the adapter weights): the guided score
  :math:`-(\epsilon_u + w(\epsilon_c - \epsilon_u))/\sqrt{1-\bar\alpha}` for UNets (:class:`UNetEnvironment`), the
  guided velocity :math:`v_u + w(v_c - v_u)` for rectified-flow transformers (:class:`FlowEnvironment`; the
  flow kernel's action, an affine image of the score, :mod:`sa_theory.flow_kernel`);
* :meth:`reference_action` -- the pretrained action: the same network with its adapters disabled, no grad;
* :meth:`x0_hat` -- the Tweedie / flow prediction of the clean latent (value inputs);
* :meth:`value_cond` -- the value model's conditioning at step ``k`` (pooled text, Tweedie reward);
* :meth:`decode` -- latents to images in ``[0, 1]``; :meth:`time` -- sampler time :math:`\tau_k` of step ``k``.

Classifier-free guidance: policy and reference use the same scale ``w`` (the regularised process is the guided
pretrained sampler); ``w = 1`` (or ``negative_prompt=None``) is the CFG-free option: one forward per action.
``lora_uncond=False`` (config ``model.lora_uncond``) freezes the unconditional branch at the pretrained model: the
policy's guided output is :math:`o^{pre}_u + w(o^\theta_c - o^{pre}_u)`, so policy and reference differ only in
their conditional branch, :math:`a - a^{pre} = w(a^\theta_c - a^{pre}_c)`. The pretrained unconditional output at a
state is computed once (no grad) and shared by the policy's and the reference's action at that state, so a guided
step with the reference costs 3 denoiser forwards per image instead of 4, and an update pass back-propagates
through the conditional half only. A LoRA trained this way is this policy only with this package's samplers
(:func:`t2i.rollout.sample_images`); diffusers' pipelines apply the LoRA to both branches.
"""

from __future__ import annotations

import torch

from sa_theory.kernels import GaussianKernel
from sa_theory.parametrization import x0_from_score

from .models import decode_latents, encode_prompts, frozen_pretrained, pretrained

__all__ = ["ImageEnvironment", "UNetEnvironment", "FlowEnvironment", "make_environment"]


class ImageEnvironment:
    """Base class of the contract (module docstring)."""

    def __init__(self, pipe, kernel: GaussianKernel, guidance_scale: float = 1.0, negative_prompt: str | None = "",
                 resolution: int | None = None, lora_uncond: bool = True):
        if not isinstance(kernel, GaussianKernel):
            raise TypeError(f"'kernel' must be a sa_theory GaussianKernel, got {type(kernel).__name__}")
        if not guidance_scale >= 0:
            raise ValueError(f"'guidance_scale' must be >= 0, got {guidance_scale}")
        if not isinstance(lora_uncond, bool):
            raise TypeError(f"'lora_uncond' must be a bool, got {lora_uncond!r}")
        self.pipe, self.kernel = pipe, kernel
        self.guidance_scale, self.negative_prompt, self.lora_uncond = guidance_scale, negative_prompt, lora_uncond
        self.latent_size = latent_size(pipe, resolution)
        self._uncond_cache = None

    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, h)`` of the denoiser's latents at the environment's resolution."""
        return (self.model.config.in_channels, self.latent_size, self.latent_size)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0 and self.negative_prompt is not None

    @property
    def _w(self) -> float:
        """The guidance scale the actions use (1 when unguided)."""
        return self.guidance_scale if self.guided else 1.0

    @property
    def model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def text_dim(self) -> int:  # pragma: no cover - abstract
        """Width of ``text["pooled"]`` (the value networks' text input)."""
        raise NotImplementedError

    def time(self, k: int) -> float:
        """Sampler time :math:`\\tau_k` (``kernel.taus[k]``)."""
        return float(self.kernel.taus[k])

    def value_cond(self, batch, k: int, tweedie: torch.Tensor | None = None) -> dict:
        r"""The value networks' conditioning at step ``k`` (:mod:`t2i.values`): the pooled text and, for the Tweedie
        and residual values, :math:`r(\hat x_0)` (``tweedie``)."""
        cond = {"text": batch.text["pooled"]}
        if tweedie is not None:
            cond["tweedie"] = tweedie
        return cond

    def initial_latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        device = self.model.device
        return torch.randn((n, *self.latent_shape()), generator=generator, device=generator.device).to(device)

    def action(self, k: int, x: torch.Tensor, text: dict, model=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def grid_actions(self, ks, states: torch.Tensor, text: dict, model=None, ref_actions=None) -> torch.Tensor:
        """The policy's actions at the steps ``ks`` for ``states`` ``(n, B, *latent)``, ``(n, B, *latent)``, in one
        denoiser call on the ``n B`` stacked states (row ``i B + b``: step ``ks[i]``, path ``b``; per-row timesteps,
        the text repeated ``n`` times): an update that trains several steps of a minibatch per pass
        (``train.steps_per_backward`` 0 or > 1) takes one forward and one backward on ``n`` times the batch instead
        of ``n`` small ones. Equal to stacking :meth:`action` over ``ks`` up to float rounding; one step is
        :meth:`action` itself. ``ref_actions`` is not used (the step environment contract's argument)."""
        ks = [int(k) for k in ks]
        if len(ks) == 1:
            return self.action(ks[0], states[0], text, model)[None]
        n, B = len(ks), states.shape[1]
        rows = {key: v.repeat(n, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v for key, v in text.items()}
        x = states.reshape(n * B, *states.shape[2:])
        return self._rows_action(ks, B, x, rows, model).reshape(states.shape)

    def _rows_action(self, ks: list[int], B: int, x: torch.Tensor, text: dict, model):  # pragma: no cover
        """:meth:`grid_actions` on the stacked rows ``x`` ``(len(ks) B, *latent)`` with the text of every row."""
        raise NotImplementedError

    def _step_time(self, k: int):  # pragma: no cover - abstract
        """The denoiser's time argument at step ``k`` (a UNet's integer timestep, a flow model's time)."""
        raise NotImplementedError

    def _row_times(self, ks: list[int], B: int, device) -> torch.Tensor:
        """:meth:`_step_time` of every stacked row (row ``i B + b``: step ``ks[i]``), ``(len(ks) B,)``: int64
        timesteps or float64 times."""
        t = [self._step_time(k) for k in ks]
        dtype = torch.int64 if isinstance(t[0], int) else torch.float64
        return torch.tensor(t, dtype=dtype, device=device).repeat_interleave(B)

    @torch.no_grad()
    def reference_action(self, k: int, x: torch.Tensor, text: dict) -> torch.Tensor:
        with pretrained(self.model):
            return self.action(k, x, text)

    def frozen_uncond(self, k: int, x: torch.Tensor, text: dict) -> torch.Tensor | None:
        """The pretrained unconditional output at ``(k, x)`` when the branch is frozen (``lora_uncond=False`` and
        guided), else ``None``. No grad; the last one is cached, keyed on the identity of ``x`` (and its in-place
        version counter) and ``text``, so the reference action at the state the policy just acted on reuses it."""
        if self.lora_uncond or not self.guided:
            return None
        c = self._uncond_cache
        if c is not None and c[0] is x and c[1] == x._version and c[2] == k and c[3] is text:
            return c[4]
        out = self._frozen_uncond_output(self._step_time(k), x, text)
        self._uncond_cache = (x, x._version, k, text, out)
        return out

    def _frozen_uncond_output(self, t, x: torch.Tensor, text: dict) -> torch.Tensor | None:
        """The pretrained unconditional output at the time argument ``t`` (one step's, or :meth:`_row_times`) when the
        branch is frozen, else ``None``; no grad, not cached."""
        if self.lora_uncond or not self.guided:
            return None
        with frozen_pretrained(self.model):
            return self._uncond_output(t, x, text)

    def _uncond_output(self, t, x: torch.Tensor, text: dict) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def x0_hat(self, k: int, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class UNetEnvironment(ImageEnvironment):
    """SD-class UNet pipelines (``epsilon`` or ``v_prediction``) on a DDIM / DDPM kernel
    (:class:`sa_theory.kernels.DiscreteVPKernel`); the action is the guided score."""

    def __init__(self, pipe, kernel, guidance_scale: float = 1.0, negative_prompt: str | None = "",
                 resolution: int | None = None, lora_uncond: bool = True, prediction_type: str | None = None):
        super().__init__(pipe, kernel, guidance_scale, negative_prompt, resolution, lora_uncond)
        self.prediction_type = prediction_type or pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def model(self):
        return self.pipe.unet

    @property
    def text_dim(self):
        return self.pipe.text_encoder.config.hidden_size

    def encode(self, prompts):
        device = self.model.device
        embeds, pooled = encode_prompts(self.pipe, list(prompts), device)
        uncond = encode_prompts(self.pipe, [self.negative_prompt] * len(prompts), device)[0] if self.guided else None
        return {"embeds": embeds.float(), "pooled": pooled.float(), "neg_embeds": None if uncond is None else
                uncond.float()}

    def eps(self, k: int, x: torch.Tensor, text: dict, model=None) -> torch.Tensor:
        """Guided noise prediction at step ``k`` (float32)."""
        from .rollout import guided_eps

        return guided_eps(model or self.model, x, self._step_time(k), text["embeds"], text["neg_embeds"], self._w,
                          float(self.kernel.alphabar[k]), self.prediction_type, self.frozen_uncond(k, x, text))

    def _step_time(self, k):
        return int(self.kernel.timesteps[k])

    def _uncond_output(self, t, x, text):
        from .rollout import unet_output

        return unet_output(self.model, x, t, text["neg_embeds"])

    def _rows_action(self, ks, B, x, text, model):
        from .rollout import guided_eps
        from .scheduling import score_from_eps

        ts = self._row_times(ks, B, x.device)
        ab = torch.tensor([float(self.kernel.alphabar[k]) for k in ks], dtype=torch.float64, device=x.device)
        ab = ab.repeat_interleave(B).reshape(-1, *([1] * (x.dim() - 1)))
        eps = guided_eps(model or self.model, x, ts, text["embeds"], text["neg_embeds"], self._w, ab,
                         self.prediction_type, self._frozen_uncond_output(ts, x, text))
        return score_from_eps(eps, ab)

    def action(self, k, x, text, model=None):
        from .scheduling import score_from_eps

        return score_from_eps(self.eps(k, x, text, model), float(self.kernel.alphabar[k]))

    def x0_hat(self, k, x, action):
        t = torch.tensor(float(self.kernel.t[k]), dtype=torch.float64)
        return x0_from_score(self.kernel.schedule, t, x.double(), action.double()).to(x.dtype)

    def decode(self, x):
        return decode_latents(self.pipe, x)


class FlowEnvironment(ImageEnvironment):
    """SD3-class rectified-flow transformers on a :class:`sa_theory.flow_kernel.FlowMatchKernel`; the action is
    the guided velocity (the transformer's timestep is ``1000 t`` with :math:`t = \\sigma_k`)."""

    @property
    def model(self):
        return self.pipe.transformer

    @property
    def text_dim(self):
        return self.model.config.pooled_projection_dim

    def encode(self, prompts):
        from .flow_models import encode_sd3_prompts

        txt = encode_sd3_prompts(self.pipe, list(prompts), self.negative_prompt or "", guidance=self.guided)
        return {k: None if v is None else v.float() for k, v in txt.items()}

    def action(self, k, x, text, model=None):
        from .flow_models import guided_velocity

        return guided_velocity(model or self.model, x, self._step_time(k), text, self._w,
                               self.frozen_uncond(k, x, text))

    def _step_time(self, k):
        return self.kernel.time(k)

    def _uncond_output(self, t, x, text):
        from .flow_models import velocity_output

        return velocity_output(self.model, x, t, text["neg_embeds"], text["neg_pooled"])

    def _rows_action(self, ks, B, x, text, model):
        from .flow_models import guided_velocity

        t = self._row_times(ks, B, x.device)
        return guided_velocity(model or self.model, x, t, text, self._w, self._frozen_uncond_output(t, x, text))

    def x0_hat(self, k, x, action):
        return x - self.kernel.time(k) * action

    def decode(self, x):
        from .flow_models import decode_sd3_latents

        return decode_sd3_latents(self.pipe, x)


def make_environment(pipe, sample, num_steps: int | None = None, lora_uncond: bool = True) -> ImageEnvironment:
    """The environment of ``pipe`` for a :class:`t2i.config.SampleConfig` ``sample`` (training kernel with
    ``num_steps``, default ``sample.num_steps``): :class:`FlowEnvironment` on the rectified-flow kernel for SD3-class
    pipelines (``sample.sampler == "flow"``), :class:`UNetEnvironment` on DDIM / DDPM otherwise. ``lora_uncond``:
    ``model.lora_uncond`` (module docstring)."""
    from .models import is_flow_pipeline
    from .scheduling import make_flow_kernel, make_kernel

    K = num_steps or sample.num_steps
    flow = is_flow_pipeline(pipe)
    if flow != (sample.sampler == "flow"):
        raise ValueError(f"sample.sampler: {sample.sampler!r} does not fit a {type(pipe).__name__} "
                         f"(use 'flow' for SD3-class pipelines, 'ddim' or 'ddpm' for UNet pipelines)")
    if flow:
        _, kernel = make_flow_kernel(pipe.scheduler.config, K, sample.flow_noise, sample.flow_noise_value,
                                     sample.flow_at_one)
        return FlowEnvironment(pipe, kernel, sample.guidance_scale, sample.negative_prompt, sample.resolution,
                               lora_uncond)
    _, kernel = make_kernel(pipe.scheduler.config, sample.sampler, K, sample.eta)
    return UNetEnvironment(pipe, kernel, sample.guidance_scale, sample.negative_prompt, sample.resolution,
                           lora_uncond)


def latent_size(pipe, resolution: int | None = None) -> int:
    """Latent height = width for images of ``resolution`` pixels (``None``: the denoiser's native
    ``config.sample_size``, e.g. 128 latents = 1024 px for SD3.5). ``resolution`` must be a multiple of the VAE's
    downscale factor times the transformer's patch size; otherwise ``ValueError`` naming ``sample.resolution``."""
    net = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    if resolution is None:
        return int(net.config.sample_size)
    vae = getattr(pipe, "vae", None)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    step = scale * int(getattr(net.config, "patch_size", 1) or 1)
    if not isinstance(resolution, int) or resolution < step or resolution % step:
        raise ValueError(f"sample.resolution must be a positive multiple of {step} (VAE scale {scale} x patch size) "
                         f"for this pipeline, got {resolution!r}")
    return resolution // scale
