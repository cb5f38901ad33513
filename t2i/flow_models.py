r"""Flow-matching text-to-image models (SD3-class rectified-flow transformers): building, loading, LoRA, velocity.

* :func:`build_tiny_sd3_pipeline` -- a tiny ``StableDiffusion3Pipeline`` from config, random weights seeded
  (no download): ``SD3Transformer2DModel`` (1 joint block), two tiny ``CLIPTextModelWithProjection``, a tiny
  ``T5EncoderModel`` with a character-level fast tokenizer written to a temporary folder, a small
  ``AutoencoderKL`` and ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3.5's scheduler config).
* :func:`load_sd3_pipeline` -- ``StableDiffusion3Pipeline.from_pretrained`` on a local folder or a Hub id
  (default ``stabilityai/stable-diffusion-3.5-medium``; the user's weights, never downloaded by tests).
* :func:`add_transformer_lora` -- peft LoRA on the transformer's attention projections (image and context
  streams); the pretrained velocity is the same transformer with adapters disabled (``t2i.models.pretrained``).
* :func:`encode_sd3_prompts` -- prompt embeddings and pooled projections, for the prompt and for the
  negative prompt (classifier-free guidance).
* :func:`guided_velocity` -- :math:`v_u + w (v_c - v_u)` in one transformer call on the doubled batch
  (``w = 1`` or no negative embeddings: the conditional velocity, i.e. the CFG-free option).
* :func:`decode_sd3_latents` -- VAE decode with SD3's ``shift_factor`` / ``scaling_factor`` to ``[0, 1]``.

Time: the scheduler's ``sigmas`` are the rectified-flow times :math:`t` (``x_t = (1 - t) x_0 + t\,\epsilon``)
and the transformer's ``timestep`` argument is :math:`1000\,t`. The velocity is :math:`v = \epsilon - x_0`;
the action (score) is :math:`s = -(x + (1 - t) v)/t` through the one map in :mod:`sa_theory`.
"""

from __future__ import annotations

import json
import os
import string
import tempfile

import torch

__all__ = [
    "SD35_SCHEDULER_CONFIG",
    "SD3_LORA_TARGETS",
    "DEFAULT_SD3_MODEL",
    "build_tiny_sd3_pipeline",
    "load_sd3_pipeline",
    "add_transformer_lora",
    "encode_sd3_prompts",
    "velocity_output",
    "guided_velocity",
    "decode_sd3_latents",
    "save_pixel_sd3_pipeline",
    "load_pixel_sd3_pipeline",
    "is_pixel_sd3_pipeline",
    "PIXEL_SD3_MARKER",
]

#: marker file of a pixel-space SD3 pipeline folder (identity VAE; :func:`save_pixel_sd3_pipeline`)
PIXEL_SD3_MARKER = "pixel_sd3_pipeline.json"
_SD3_PARTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
              "tokenizer_3", "scheduler")

DEFAULT_SD3_MODEL = "stabilityai/stable-diffusion-3.5-medium"

#: SD3.5-Medium's scheduler: FlowMatchEulerDiscreteScheduler, 1000 training steps, static shift 3.
SD35_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)

#: attention projections of the joint blocks: image stream and context (text) stream
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _char_vocab() -> list[str]:
    return list(string.ascii_lowercase + string.digits + ".,!?'-")


def _write_clip_tokenizer(folder: str) -> None:
    """Character-level CLIP BPE files (``vocab.json`` + empty ``merges.txt``): every ascii prompt tokenizes."""
    chars = _char_vocab()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


def _t5_tokenizer(max_length: int):
    """A character-level ``PreTrainedTokenizerFast`` with T5's special tokens (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in _char_vocab() + [" "]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def build_tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, sample_size: int = 8,
                            max_sequence_length: int = 16):
    """Tiny SD3 pipeline from config with random weights seeded by ``seed`` (no download).

    Latents are ``(B, 4, sample_size, sample_size)``; the VAE has two blocks, so images are ``2 * sample_size``
    pixels square. ``max_sequence_length`` is the T5 token length used by :func:`encode_sd3_prompts`.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    width = 16  # hidden size of each CLIP encoder; the joint text width is 2 * 16 = 32 = T5's d_model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=2 * width,
            caption_projection_dim=32, pooled_projection_dim=2 * width, pos_embed_max_size=2 * sample_size,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4, sample_size=2 * sample_size, shift_factor=0.0609, scaling_factor=1.5035,
            use_quant_conv=False, use_post_quant_conv=False,
        )
        folder = tempfile.mkdtemp(prefix="sa_t2i_sd3_tok_")
        _write_clip_tokenizer(folder)
        tokenizers, encoders = [], []
        for i in range(2):
            torch.manual_seed(seed + 2 + i)
            tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77)
            cfg = CLIPTextConfig(
                hidden_size=width, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=width,
            )
            tokenizers.append(tok)
            encoders.append(CLIPTextModelWithProjection(cfg))
        torch.manual_seed(seed + 4)
        tok3 = _t5_tokenizer(max_sequence_length)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=2 * width, d_kv=8, d_ff=37, num_layers=1,
                                     num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=t5, tokenizer_3=tok3,
    )
    for m in (transformer, vae, t5, *encoders):  # eval mode, as from_pretrained leaves them (T5 has dropout)
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.max_sequence_length = max_sequence_length
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_sd3_pipeline(model: str = DEFAULT_SD3_MODEL, revision: str | None = None,
                      dtype: torch.dtype = torch.bfloat16, max_sequence_length: int = 256):
    """``StableDiffusion3Pipeline.from_pretrained(model)`` (a local folder or a Hub id: your weights)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model, revision=revision, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.max_sequence_length = max_sequence_length
    return pipe


def add_transformer_lora(transformer, rank: int = 4, alpha: float | None = None, targets: list[str] | None = None,
                         init_seed: int | None = None) -> None:
    """peft LoRA on the transformer (``transformer.add_adapter``), everything else frozen; LoRA kept float32.

    Delegates to :func:`t2i.models.add_lora` with :data:`SD3_LORA_TARGETS` by default."""
    from .models import add_lora

    add_lora(transformer, rank=rank, alpha=alpha, targets=list(targets or SD3_LORA_TARGETS), init_seed=init_seed)


@torch.no_grad()
def encode_sd3_prompts(pipe, prompts: list[str], negative_prompt: str = "", guidance: bool = True,
                       device=None) -> dict[str, torch.Tensor | None]:
    """``{"embeds", "pooled", "neg_embeds", "neg_pooled"}`` from the pipeline's three text encoders
    (``neg_*`` are ``None`` when ``guidance`` is False)."""
    device = device or pipe.transformer.device
    out = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=guidance, negative_prompt=[negative_prompt] * len(prompts) if guidance else None,
        max_sequence_length=getattr(pipe, "max_sequence_length", 256),
    )
    embeds, neg, pooled, neg_pooled = out
    return {"embeds": embeds, "pooled": pooled, "neg_embeds": neg if guidance else None,
            "neg_pooled": neg_pooled if guidance else None}


def velocity_output(transformer, x: torch.Tensor, t: float | torch.Tensor, embeds: torch.Tensor,
                    pooled: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity (float32) at rectified-flow time ``t`` (timestep ``1000 t``), one call; ``t``: one
    time for all rows, or a float64 ``(B,)`` tensor of one per row."""
    from .models import weights_dtype

    dtype = weights_dtype(transformer)
    if torch.is_tensor(t):
        ts = (1000.0 * t.double()).to(dtype=dtype, device=x.device)
    else:
        ts = torch.full((x.shape[0],), 1000.0 * float(t), dtype=dtype, device=x.device)
    return transformer(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=embeds.to(dtype),
                       pooled_projections=pooled.to(dtype), return_dict=False)[0].float()


def guided_velocity(transformer, x: torch.Tensor, t: float | torch.Tensor, text: dict, guidance_scale: float,
                    uncond_out: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity :math:`v_u + w(v_c - v_u)` (float32) at rectified-flow time ``t`` (transformer timestep ``1000 t``);
    one transformer call on the doubled batch when guided, the conditional velocity when ``w == 1`` or there
    are no negative embeddings. ``uncond_out``: :math:`v_u` computed elsewhere (the frozen pretrained branch,
    ``model.lora_uncond = false``); then ``transformer`` runs on the conditional half only. ``t``: one time, or
    one per row (:func:`velocity_output`)."""
    if guidance_scale == 1.0 or text.get("neg_embeds") is None:
        return velocity_output(transformer, x, t, text["embeds"], text["pooled"])
    if uncond_out is None:
        t2 = torch.cat([t, t]) if torch.is_tensor(t) else t
        u, c = velocity_output(transformer, torch.cat([x, x]), t2, torch.cat([text["neg_embeds"], text["embeds"]]),
                               torch.cat([text["neg_pooled"], text["pooled"]])).chunk(2)
    else:
        u, c = uncond_out, velocity_output(transformer, x, t, text["embeds"], text["pooled"])
    return u + guidance_scale * (c - u)


def decode_sd3_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode (``z / scaling_factor + shift_factor``) to images in ``[0, 1]``, ``(B, 3, H, W)`` float32."""
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


def save_pixel_sd3_pipeline(pipe, folder: str, extra: dict | None = None) -> None:
    """``save_pretrained`` of the transformer, the three text encoders, their tokenizers and the scheduler of a
    pixel-space SD3 pipeline (identity VAE, :class:`t2i.models.PixelSpaceVAE`) plus the marker
    ``pixel_sd3_pipeline.json`` (``extra``, ``max_sequence_length``) read by :func:`load_pixel_sd3_pipeline`."""
    os.makedirs(folder, exist_ok=True)
    for name in _SD3_PARTS:
        getattr(pipe, name).save_pretrained(os.path.join(folder, name))
    meta = {"vae": "PixelSpaceVAE", "max_sequence_length": getattr(pipe, "max_sequence_length", 256), **(extra or {})}
    with open(os.path.join(folder, PIXEL_SD3_MARKER), "w") as f:
        json.dump(meta, f, indent=1)


def is_pixel_sd3_pipeline(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, PIXEL_SD3_MARKER))


def load_pixel_sd3_pipeline(folder: str, dtype: torch.dtype = torch.float32):
    """Inverse of :func:`save_pixel_sd3_pipeline` (local files only): a ``StableDiffusion3Pipeline`` whose VAE is
    the identity :class:`t2i.models.PixelSpaceVAE` (latents are the pixels in [-1, 1])."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast, T5EncoderModel

    from .models import PixelSpaceVAE

    with open(os.path.join(folder, PIXEL_SD3_MARKER)) as f:
        meta = json.load(f)
    j = lambda n: os.path.join(folder, n)  # noqa: E731
    tr = SD3Transformer2DModel.from_pretrained(j("transformer"), torch_dtype=dtype)
    enc = [CLIPTextModelWithProjection.from_pretrained(j(n), local_files_only=True, torch_dtype=dtype)
           for n in ("text_encoder", "text_encoder_2")]
    toks = [CLIPTokenizer.from_pretrained(j(n), local_files_only=True) for n in ("tokenizer", "tokenizer_2")]
    t5 = T5EncoderModel.from_pretrained(j("text_encoder_3"), local_files_only=True, torch_dtype=dtype)
    tok3 = PreTrainedTokenizerFast.from_pretrained(j("tokenizer_3"), local_files_only=True)
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(j("scheduler")), vae=None,
        text_encoder=enc[0], tokenizer=toks[0], text_encoder_2=enc[1], tokenizer_2=toks[1], text_encoder_3=t5,
        tokenizer_3=tok3,
    )
    pipe.vae = PixelSpaceVAE(tr.config.in_channels, 3)
    for m in (tr, t5, *enc):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.max_sequence_length = int(meta.get("max_sequence_length", 256))
    return pipe
