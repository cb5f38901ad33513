"""Pretraining of a prompt-conditioned pixel-space diffusion model on the digits, cached by config hash.

Model: diffusers ``UNet2DConditionModel`` on ``(1, R, R)`` pixels (R = 8 by default), epsilon prediction,
cross-attention to a tiny ``CLIPTextModel`` (character-level CLIP tokenizer, hidden 32, 2 layers) that is
trained **jointly** on the prompts ``"a handwritten digit k"`` (with probability ``cond_drop`` the prompt is
replaced by ``""``, so classifier-free guidance is available). DDPM "linear" beta schedule 1e-4..0.02 over
1000 timesteps (a pixel-space schedule; alpha-bar at T ~ 4e-5, nearly memoryless). Exponential moving
average of the weights is what gets saved.

The result is written with ``save_pretrained`` (see :func:`t2i.models.save_pixel_pipeline`) into
``<cache>/digits/<hash>`` where ``<cache>`` is ``$SA_CACHE`` or ``~/.cache/scores-as-actions`` and
``<hash>`` is the first 16 hex digits of the SHA-256 of the JSON of :class:`PretrainConfig` (plus a format
version): a second call with the same config reuses the folder. ``model.pretrained=<folder>`` then loads it
in :class:`t2i.trainer.Trainer` (``t2i.models.load_pipeline`` recognises the folder).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import ALL_PROMPTS, load_split

__all__ = ["PretrainConfig", "config_hash", "cache_root", "pretrain", "build_untrained_pipeline"]

FORMAT_VERSION = 1


@dataclass
class PretrainConfig:
    resolution: int = 8  # image side (8 = native digits; 16 = nearest-upsampled)
    block_out_channels: tuple = (32, 32)  # UNet widths (2 levels)
    layers_per_block: int = 1  # UNet resnet layers per block
    norm_num_groups: int = 8  # GroupNorm groups
    text_hidden: int = 32  # CLIP text encoder hidden size (= UNet cross_attention_dim)
    text_layers: int = 2  # CLIP text encoder layers
    max_length: int = 32  # tokenizer / text encoder positions (prompts are ~23 characters)
    num_train_steps: int = 2400  # optimizer steps (measured: 800 -> prompted-digit accuracy ~chance, 2400 -> 98%)
    batch_size: int = 32  # images per step
    learning_rate: float = 3e-3  # AdamW, linear warm-up then cosine decay
    warmup_steps: int = 50  # warm-up steps
    ema_decay: float = 0.99  # EMA of the weights (the saved model)
    cond_drop: float = 0.1  # probability of the empty prompt (classifier-free guidance)
    beta_start: float = 1e-4  # DDPM linear schedule
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    seed: int = 0
    extra: dict = field(default_factory=dict)  # free-form, part of the hash

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


def config_hash(cfg: PretrainConfig) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | None = None) -> str:
    base = (
        cache_dir
        or os.environ.get("SA_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "scores-as-actions")
    )
    return os.path.join(base, "digits")


def build_untrained_pipeline(cfg: PretrainConfig):
    """A :class:`t2i.models.PixelPipeline` with random weights seeded by ``cfg.seed``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from t2i.models import PixelPipeline, _write_char_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        unet = UNet2DConditionModel(
            sample_size=cfg.resolution,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cfg.text_hidden,
            attention_head_dim=8,
            norm_num_groups=cfg.norm_num_groups,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        folder = tempfile.mkdtemp(prefix="sa_digits_tok_")
        _write_char_tokenizer(folder)
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=cfg.max_length)
        shutil.rmtree(folder, ignore_errors=True)
        torch.manual_seed(cfg.seed + 1)
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=cfg.text_hidden,
                intermediate_size=2 * cfg.text_hidden,
                num_attention_heads=4,
                num_hidden_layers=cfg.text_layers,
                vocab_size=len(tok),
                max_position_embeddings=cfg.max_length,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                projection_dim=cfg.text_hidden,
            )
        )
    sch = DDIMScheduler(
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        num_train_timesteps=cfg.num_train_timesteps,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return PixelPipeline(unet, text, tok, sch)


def _train(cfg: PretrainConfig, log_every: int = 0) -> tuple[object, dict]:
    pipe = build_untrained_pipeline(cfg)
    x_all, y_all = load_split("train", cfg.resolution)
    tok = pipe.tokenizer(
        ALL_PROMPTS + [""],
        padding="max_length",
        max_length=cfg.max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # rows 0..9 digits, row 10 the empty prompt
    unet, text = pipe.unet, pipe.text_encoder
    unet.train()
    text.train()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)

    def lr_at(s):
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        p = (s - cfg.warmup_steps) / max(1, cfg.num_train_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_u, ema_t = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema_p = list(ema_u.parameters()) + list(ema_t.parameters())
    for p in ema_p:
        p.requires_grad_(False)
    acp = pipe.scheduler.alphas_cumprod.float()
    g = torch.Generator().manual_seed(cfg.seed)
    t0, losses = time.time(), []
    for step in range(cfg.num_train_steps):
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(cfg.batch_size, generator=g) < cfg.cond_drop] = 10
        t = torch.randint(cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        emb = text(tok).last_hidden_state[y]  # 11 distinct prompts: encode once, index
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=emb).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_p, params):
                pe.lerp_(p.detach(), 1 - d)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(
                f"pretrain step {step + 1}/{cfg.num_train_steps} "
                f"loss {sum(losses[-log_every:]) / log_every:.4f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    pipe.unet, pipe.text_encoder = ema_u, ema_t
    n = max(1, min(100, len(losses)))
    info = {
        "train_time_s": time.time() - t0,
        "final_loss": sum(losses[-n:]) / n,
        "steps": cfg.num_train_steps,
    }
    return pipe, info


def pretrain(
    cfg: PretrainConfig | None = None, cache_dir: str | None = None, force: bool = False, log_every: int = 0
) -> str:
    """Folder of the pretrained model for ``cfg`` (trained and saved if not cached). Loadable with
    ``t2i.models.load_pipeline(folder)``. ``pixel_pipeline.json`` in it holds the config, hash, train time."""
    from t2i.models import is_pixel_pipeline, save_pixel_pipeline

    cfg = cfg or PretrainConfig()
    h = config_hash(cfg)
    folder = os.path.join(cache_root(cache_dir), h)
    if is_pixel_pipeline(folder) and not force:
        return folder
    pipe, info = _train(cfg, log_every)
    tmp = folder + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pixel_pipeline(pipe, tmp, extra={"hash": h, "config": cfg.to_dict(), **info})
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def pretrain_info(folder: str) -> dict:
    with open(os.path.join(folder, "pixel_pipeline.json")) as f:
        return json.load(f)
