"""Model loading: Stable Diffusion from a local folder or the Hub, a tiny in-process pipeline, LoRA.

* :func:`load_pipeline` -- ``StableDiffusionPipeline.from_pretrained`` (a local dir or a Hub id such as
  ``stable-diffusion-v1-5/stable-diffusion-v1-5``). Real code path; never run in tests (no downloads).
* :func:`build_tiny_pipeline` -- a tiny SD pipeline built from configs with random weights (UNet 2 levels,
  32/64 channels, 16x16 latents -> 32x32 images; CLIP text encoder hidden 32, 2 layers; a character-level
  CLIP tokenizer written to a temp folder). Seeded and deterministic. For tests and CPU demos.
* :func:`add_lora` -- the policy is the UNet with a peft LoRA adapter; :func:`pretrained` is a context
  manager that disables the adapters, giving the pretrained model without a second copy.
* :class:`PixelSpaceVAE` / :class:`PixelPipeline` -- pixel-space models (identity "VAE", scale 1): a folder
  written by :func:`save_pixel_pipeline` (marker ``pixel_pipeline.json``) is loaded by :func:`load_pipeline`,
  so ``model.pretrained=<folder>`` trains a pixel-space model on the same code path (used by ``digits``).
"""

from __future__ import annotations

import contextlib
import json
import os
import string
import tempfile

import torch

__all__ = [
    "weights_dtype",
    "build_tiny_pipeline",
    "load_pipeline",
    "add_lora",
    "pretrained",
    "frozen_pretrained",
    "lora_state_dict",
    "lora_parameters",
    "encode_prompts",
    "decode_latents",
    "LORA_TARGETS",
    "save_lora",
    "PixelSpaceVAE",
    "PixelPipeline",
    "save_pixel_pipeline",
    "load_pixel_pipeline",
    "is_pixel_pipeline",
    "denoiser",
    "is_flow_pipeline",
    "lora_targets",
]

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _write_char_tokenizer(folder: str) -> None:
    """A character-level CLIP BPE vocabulary (no merges): every prompt of ascii text tokenizes."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


#: Stable Diffusion v1.5's training noise schedule (DDIM form; ``steps_offset=1`` avoids diffusers' warning).
SD15_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny Stable Diffusion pipeline from config, random weights seeded by ``seed`` (no download).

    DDIM scheduler with SD v1.5's training schedule (scaled_linear 0.00085..0.012, 1000 steps,
    ``set_alpha_to_one=False``, ``steps_offset=1``, ``clip_sample=False``).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32,
            sample_size=32,
        )
        torch.manual_seed(seed + 2)
        folder = tempfile.mkdtemp(prefix="sa_t2i_tok_")
        _write_char_tokenizer(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77)
        text_cfg = CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
        text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_pipeline(model: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained(model)`` (local folder or Hub id), safety checker off.
    A local folder with a ``pixel_pipeline.json`` marker is loaded by :func:`load_pixel_pipeline` instead.

    The scheduler is replaced by a DDIMScheduler from the same config (``clip_sample=False``).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if os.path.isdir(model) and is_pixel_pipeline(model):
        return load_pixel_pipeline(model, dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        model, revision=revision, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora(
    unet,
    rank: int = 4,
    alpha: float | None = None,
    targets: list[str] | None = None,
    init_seed: int | None = None,
) -> None:
    """Add a peft LoRA adapter (``unet.add_adapter``) and freeze everything else (LoRA params kept fp32)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(targets or LORA_TARGETS),
    )
    ctx = torch.random.fork_rng() if init_seed is not None else contextlib.nullcontext()
    with ctx:
        if init_seed is not None:
            torch.manual_seed(init_seed)
        unet.add_adapter(cfg)
    for p in lora_parameters(unet):
        p.data = p.data.float()


def is_flow_pipeline(pipe) -> bool:
    """Whether ``pipe`` is a rectified-flow transformer pipeline (SD3-class: has ``transformer``, no ``unet``)."""
    return getattr(pipe, "transformer", None) is not None and getattr(pipe, "unet", None) is None


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first parameter (its weights' dtype; works through DDP wrappers): O(1), unlike
    diffusers' ``ModelMixin.dtype``, which walks every submodule on each access (about 10% of a CPU rollout of
    the tiny digits UNet, where it ran once per network call)."""
    return next(model.parameters()).dtype


def denoiser(pipe) -> torch.nn.Module:
    """The network the policy adapts: ``pipe.unet`` (SD-class) or ``pipe.transformer`` (SD3-class)."""
    return pipe.transformer if is_flow_pipeline(pipe) else pipe.unet


def lora_targets(pipe) -> list[str]:
    """LoRA target modules of the pipeline's denoiser: the UNet's attention projections, or both attention
    streams of an SD3 transformer (:data:`t2i.flow_models.SD3_LORA_TARGETS`)."""
    if is_flow_pipeline(pipe):
        from .flow_models import SD3_LORA_TARGETS

        return list(SD3_LORA_TARGETS)
    return list(LORA_TARGETS)


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def _tuner_layers(unet) -> list:
    """peft's adapter layers (``BaseTunerLayer``) of ``unet``, found once per set of adapters and cached on the
    module: walking every submodule (what diffusers' ``disable_adapters`` / ``enable_adapters`` do on each call)
    cost 8 ms per toggle on the digits UNet, a sixth of its batch-16 forward, at every reference step."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(getattr(unet, "peft_config", None) or ())
    cached = unet.__dict__.get("_sa_tuner_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
        unet.__dict__["_sa_tuner_layers"] = cached
    return cached[1]


@contextlib.contextmanager
def pretrained(unet):
    """Context in which ``unet`` is the pretrained model (LoRA adapters disabled); each adapter layer's previous
    state is restored on exit (so nested contexts compose). peft's per-layer flag (``BaseTunerLayer._disable_adapters``,
    what its ``disable_adapters`` property reads) is flipped directly: the adapters' ``requires_grad`` is left alone
    (disabled adapters take no part in the forward, so no gradient reaches them)."""
    layers = _tuner_layers(unet)
    if not layers:
        raise ValueError("pretrained(): the model has no adapter layers (add_lora first)")
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield unet
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was


@contextlib.contextmanager
def frozen_pretrained(net):
    """``torch.no_grad()`` with ``net`` as the pretrained model (:func:`pretrained`); a model without adapters already
    is the pretrained one. The frozen unconditional branch of CFG (``model.lora_uncond = false``) runs in it."""
    with torch.no_grad(), (pretrained(net) if _tuner_layers(net) else contextlib.nullcontext(net)):
        yield net


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """peft's LoRA state dict of the UNet (``get_peft_model_state_dict``), in diffusers' key convention."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(unet, folder: str) -> None:
    """Write ``pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights(folder)`` (a UNet's for
    SD-class pipelines, a transformer's for SD3-class ones)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    if type(unet).__name__ == "SD3Transformer2DModel":  # peft keys as diffusers' SD3 LoRA scripts save them
        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(unet),
                                                   safe_serialization=True)
    else:
        sd = convert_state_dict_to_diffusers(lora_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=sd, safe_serialization=True)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder hidden states ``(B, L, D)`` and pooled embeddings ``(B, D)``."""
    tok = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = device or pipe.text_encoder.device
    out = pipe.text_encoder(tok.input_ids.to(device))
    return out.last_hidden_state, out.pooler_output


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to images in [0, 1], ``(B, 3, H, W)`` float32 (differentiable if autograd is on)."""
    vae = pipe.vae
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------- pixel-space pipelines
PIXEL_PIPELINE_MARKER = "pixel_pipeline.json"


class PixelSpaceVAE(torch.nn.Module):
    """Identity "VAE" for pixel-space diffusion: the latents *are* the image in [-1, 1].

    ``scaling_factor = 1``; ``decode(z).sample`` returns ``z`` with its channels repeated to
    ``out_channels`` (a 1-channel model gives grey RGB images), so :func:`decode_latents` yields
    ``(B, 3, H, W)`` images in [0, 1] as the reward interface expects; ``encode`` is the inverse (channel
    mean when ``out_channels != latent_channels``). No parameters (one buffer carries dtype and device)."""

    def __init__(self, latent_channels: int = 1, out_channels: int = 3):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(
            scaling_factor=1.0,
            latent_channels=latent_channels,
            out_channels=out_channels,
            block_out_channels=(latent_channels,),
        )
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        from types import SimpleNamespace

        c_in, c_out = z.shape[1], self.config.out_channels
        x = z if c_in == c_out else z.mean(1, keepdim=True).expand(-1, c_out, -1, -1)
        return SimpleNamespace(sample=x) if return_dict else (x,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        from types import SimpleNamespace

        z = x if x.shape[1] == self.config.latent_channels else x.mean(1, keepdim=True)
        dist = SimpleNamespace(sample=lambda generator=None: z, mode=lambda: z, mean=z)
        return SimpleNamespace(latent_dist=dist) if return_dict else (dist,)


class PixelPipeline:
    """Minimal pipeline container with the attributes the t2i code path uses (``unet``, ``vae``,
    ``text_encoder``, ``tokenizer``, ``scheduler``), for pixel-space models with a :class:`PixelSpaceVAE`.
    Not a diffusers ``DiffusionPipeline`` (diffusers cannot load a custom VAE class from a folder);
    :func:`save_pixel_pipeline` / :func:`load_pixel_pipeline` use each component's ``save_pretrained`` /
    ``from_pretrained``."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None):
        self.unet, self.text_encoder = unet, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.vae = vae if vae is not None else PixelSpaceVAE(unet.config.in_channels)

    def set_progress_bar_config(self, **kw) -> None:  # API parity with diffusers pipelines
        pass

    def to(self, device=None, dtype=None):
        for m in (self.unet, self.text_encoder, self.vae):
            m.to(device=device, dtype=dtype)
        return self


def save_pixel_pipeline(pipe: PixelPipeline, folder: str, extra: dict | None = None) -> None:
    """``save_pretrained`` of unet / text_encoder / tokenizer / scheduler into ``folder`` plus a marker file
    (``pixel_pipeline.json``, with ``extra`` metadata) so :func:`load_pipeline` recognises the folder."""
    os.makedirs(folder, exist_ok=True)
    pipe.unet.save_pretrained(os.path.join(folder, "unet"))
    pipe.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    pipe.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, PIXEL_PIPELINE_MARKER), "w") as f:
        json.dump({"vae": "PixelSpaceVAE", **(extra or {})}, f, indent=1)


def load_pixel_pipeline(folder: str, dtype: torch.dtype = torch.float32) -> PixelPipeline:
    """Inverse of :func:`save_pixel_pipeline` (local files only); DDIM scheduler, ``clip_sample=False``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=dtype)
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True)
    sch = DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    sch = DDIMScheduler.from_config(sch.config, clip_sample=False)
    return PixelPipeline(unet, text.to(dtype), tok, sch)


def is_pixel_pipeline(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, PIXEL_PIPELINE_MARKER))
