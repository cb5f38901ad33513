"""Architectures of the GPU benchmark ``t2i_gpu.py``: configs and builders with random weights (no download).

* SD v1.5 (``--arch sd15``): UNet, VAE and CLIP text-encoder configs, :func:`build_sd15_random`, :func:`unet_flops`.
* SD3.5-Medium (``--arch sd35m``): :data:`SD35M_TRANSFORMER` (diffusers ``SD3Transformer2DModel``, as in the Hub's
  ``stabilityai/stable-diffusion-3.5-medium/transformer/config.json``: 24 joint blocks, 24 heads of 64, dual
  attention in blocks 0-12, RMS q/k norm; 2.24 B parameters) and :data:`SD35M_VAE` (SD3's 16-channel
  ``AutoencoderKL``); :func:`build_sd35m_pipeline` builds a ``StableDiffusion3Pipeline`` from them, or the
  project's tiny SD3 pipeline (``t2i.flow_models.build_tiny_sd3_pipeline``) in ``tiny`` mode.

The three SD3 text encoders (CLIP-L 12 layers, CLIP-G 32 layers, T5-XXL 24 layers, 4.7 B parameters) run once per
sampling batch and are not part of the training loop's cost, so the sd35m pipeline carries small random stand-ins
of the right widths (CLIP 768 / 1280 with 2 layers, T5 d_model 4096 with 1 layer) behind the project's character
tokenizers: ``encode_prompt`` yields what SD3.5's encoders yield in shape -- prompt embeddings (B, 77 + 256, 4096)
and pooled projections (B, 2048) -- through the same pipeline code.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal

import torch

from t2i.models import SD15_SCHEDULER_CONFIG

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=512,
    act_fn="silu",
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHED = SD15_SCHEDULER_CONFIG

#: SD3.5-Medium's transformer (diffusers ``SD3Transformer2DModel``), as in the Hub config
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
#: SD3's VAE (16 latent channels, no quant convs; 8x down-sampling)
SD35M_VAE = {**SD15_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
             "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
#: T5 tokens of SD3's prompt embeddings (the pipeline's max_sequence_length; 77 CLIP tokens come before them)
SD35M_T5_TOKENS = 256
#: small random stand-ins of the three text encoders, with SD3.5's output widths (module docstring)
SD35M_CLIP_STANDINS = (dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu"),
                       dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, hidden_act="gelu"))
SD35M_T5_STANDIN = dict(d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=8)


def build_sd15_random(device, dtype):
    """SD v1.5 pipeline architecture with random weights (character-level tokenizer: text length is what
    matters for cost, all prompts are padded to 77 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i.models import build_tiny_pipeline

    tok = build_tiny_pipeline(0).tokenizer
    cfg = CLIPTextConfig(
        **{**SD15_TEXT, "vocab_size": max(len(tok), 100)},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(cfg),
        tokenizer=tok,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(**SD15_SCHED),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).to(device, dtype=dtype)
    return pipe


def unet_flops(unet, batch, device, dtype) -> float:
    """FLOPs of one UNet forward on ``batch`` latents (torch.utils.flop_counter; counts
    matmul/conv/attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    C, h = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(batch, C, h, h, device=device, dtype=dtype)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, 500, encoder_hidden_states=e)
    return float(fc.get_total_flops())


def sd35m_transformer(device="meta", num_layers: int | None = None):
    """SD3.5-Medium's transformer built on ``device`` (``"meta"``: shapes only, no memory; random init otherwise);
    ``num_layers`` < 24 keeps the first blocks (a debugging aid on small machines)."""
    from diffusers import SD3Transformer2DModel

    cfg = dict(SD35M_TRANSFORMER)
    if num_layers is not None:
        cfg["num_layers"] = num_layers
        cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < num_layers)
    with torch.device(device):
        return SD3Transformer2DModel(**cfg)


def _sd35m_text_standins(tokenizers, t5_tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clips = []
    for tok, spec in zip(tokenizers, SD35M_CLIP_STANDINS):
        cfg = CLIPTextConfig(**spec, num_hidden_layers=2, projection_dim=spec["hidden_size"], vocab_size=len(tok),
                             max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        clips.append(CLIPTextModelWithProjection(cfg))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **SD35M_T5_STANDIN, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    return clips, t5


def build_sd35m_pipeline(device, dtype, tiny: bool = False, resolution: int = 512, num_layers: int | None = None,
                         seed: int = 0):
    """A frozen ``StableDiffusion3Pipeline`` on ``device`` in ``dtype`` (what ``t2i.checkpointing.build_pipeline``
    returns): SD3.5-Medium's transformer and VAE with random weights, text-encoder stand-ins (module docstring),
    the project's character tokenizers and SD3.5's scheduler (``t2i.flow_models.SD35_SCHEDULER_CONFIG``); ``tiny``:
    the project's tiny SD3 pipeline instead (same code path, CPU in seconds).

    ``resolution``: image side in pixels. The environment samples latents of side ``transformer.config.sample_size``
    (``t2i.environments.FlowEnvironment.latent_shape``), so that field is set to ``resolution // 8`` after the
    transformer is built from the Hub config (sample size 128, i.e. 1024 px): the weights, the position-embedding
    table (cropped to the latent grid at run time) and the cost per token are the model's own."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    from t2i.flow_models import build_tiny_sd3_pipeline

    if tiny:
        pipe = build_tiny_sd3_pipeline(seed)
    else:
        if resolution % 16:
            raise ValueError(f"--resolution must be a multiple of 16 (VAE factor 8 x patch 2), got {resolution}")
        base = build_tiny_sd3_pipeline(seed, max_sequence_length=SD35M_T5_TOKENS)  # tokenizers and scheduler
        transformer = sd35m_transformer(device, num_layers)
        transformer.register_to_config(sample_size=resolution // 8)
        with torch.device(device):
            vae = AutoencoderKL(**SD35M_VAE)
            (clip_l, clip_g), t5 = _sd35m_text_standins((base.tokenizer, base.tokenizer_2), base.tokenizer_3)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=base.scheduler, vae=vae, text_encoder=clip_l, tokenizer=base.tokenizer,
            text_encoder_2=clip_g, tokenizer_2=base.tokenizer_2, text_encoder_3=t5, tokenizer_3=base.tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.max_sequence_length = SD35M_T5_TOKENS
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.requires_grad_(False).to(device, dtype=dtype).eval()
    return pipe


class RowCounter:
    """Counts the batch rows of every forward of ``module`` (a forward pre-hook): ``inference`` rows (autograd
    off) and ``grad`` rows (autograd on: a forward that is followed by a backward). CFG's doubled batch counts 2
    rows per image; gradient checkpointing's recomputation happens inside the blocks and is not counted."""

    def __init__(self, module: torch.nn.Module):
        self.inference = self.grad = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) else 0
        if torch.is_grad_enabled():
            self.grad += n
        else:
            self.inference += n

    def reset(self) -> None:
        self.inference = self.grad = 0

    def close(self) -> None:
        self._handle.remove()


def flops_per_row(env, text: dict, counter: RowCounter, generator: torch.Generator, autocast=None) -> float:
    """FLOPs of the environment's denoiser per batch row: one policy action (guided: one call on the doubled
    batch) on fresh latents, counted by ``torch.utils.flop_counter`` (matmuls, convolutions and, on CUDA, fused
    attention) and divided by the rows ``counter`` saw."""
    from torch.utils.flop_counter import FlopCounterMode

    B = next(v for v in text.values() if v is not None).shape[0]
    x = env.initial_latents(B, generator)
    counter.reset()
    with torch.no_grad(), autocast or contextlib.nullcontext(), FlopCounterMode(display=False) as fc:
        env.action(min(1, env.kernel.num_steps - 1), x, text)
    rows = counter.inference
    counter.reset()
    return float(fc.get_total_flops()) / max(1, rows)


@contextlib.contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def wall_clock_alarm(seconds: float | None):
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (None: no guard)."""
    if seconds is None:
        yield
        return

    def stop(signum, frame):
        raise TimeoutError("wall-clock guard: --time-budget reached during this cell")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sd35m_config(method: str, steps: int, batch: int, train_batch: int, workdir: str, tiny: bool = False,
                 grad_ckpt: bool = False):
    """The ``sd35m_<method>`` preset at the benchmark's sizes: one sampling batch of ``batch`` images per epoch,
    minibatches of ``train_batch`` paths accumulated over the batch (one optimizer update), jpeg reward."""
    from t2i.config import apply_overrides, get_preset

    cfg = get_preset(f"sd35m_{method}")
    B = batch
    apply_overrides(cfg, {
        "sample.num_steps": str(steps),
        "sample.batch_size": str(B),
        "sample.num_batches_per_epoch": "1",
        "sample.group_size": str(math.gcd(cfg.sample.group_size, B)),  # must divide the batch
        "train.batch_size": str(train_batch),
        "train.gradient_accumulation_steps": str(max(1, B // train_batch)),
        "log.output_dir": os.path.join(workdir, f"sd35m_{method}_K{steps}"),
        "log.overwrite": "true",  # scratch folders, replaced on every benchmark run
        "log.tensorboard": "false",
        "log.image_every": "0",
        "log.progress": "false",
        "model.mixed_precision": "no" if tiny else "bf16",
        "model.gradient_checkpointing": str(grad_ckpt and not tiny).lower(),
        "reward.name": "jpeg_compress",
        "sample.resolution": "none",  # the builder sets the transformer's native size to --resolution
    })
    return cfg
