"""Model loading: Stable Diffusion from a local folder or the Hub, a tiny in-process pipeline, LoRA.

* :func:`load_pipeline` -- ``StableDiffusionPipeline.from_pretrained`` (a local dir or a Hub id such as
  ``stable-diffusion-v1-5/stable-diffusion-v1-5``). Real code path; never run in tests (no downloads).
* :func:`build_tiny_pipeline` -- a tiny SD pipeline built from configs with random weights (UNet 2 levels,
  32/64 channels, 16x16 latents -> 32x32 images; CLIP text encoder hidden 32, 2 layers; a character-level
  CLIP tokenizer written to a temp folder). Seeded and deterministic. For tests and CPU demos.
* :func:`add_lora` -- the policy is the UNet with a peft LoRA adapter; :func:`pretrained` is a context
  manager that disables the adapters, giving the pretrained model without a second copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
import tempfile

import torch

__all__ = [
    "build_tiny_pipeline",
    "load_pipeline",
    "add_lora",
    "pretrained",
    "lora_state_dict",
    "lora_parameters",
    "encode_prompts",
    "decode_latents",
    "LORA_TARGETS",
    "save_lora",
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
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
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

    The scheduler is replaced by a DDIMScheduler from the same config (``clip_sample=False``).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

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


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def pretrained(unet):
    """Context in which ``unet`` is the pretrained model (LoRA adapters disabled), restored on exit."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """peft's LoRA state dict of the UNet (``get_peft_model_state_dict``), in diffusers' key convention."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(unet, folder: str) -> None:
    """Write ``pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights(folder)``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

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
