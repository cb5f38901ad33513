r"""Pretraining of a prompt-conditioned pixel-space **rectified-flow** model on the digits (SD3-class), cached.

Model: a tiny diffusers ``SD3Transformer2DModel`` on ``(1, 8, 8)`` pixels (``patch_size`` 1, one latent channel,
``sample_size`` 8; the identity :class:`t2i.models.PixelSpaceVAE`, so latents *are* the pixels in [-1, 1]),
conditioned on the three tiny text encoders of :func:`t2i.flow_models.build_tiny_sd3_pipeline` (two
character-level CLIPs, one T5; seeded), which are **trained jointly** with the transformer on the prompts
``"a handwritten digit k"`` (with probability ``cond_drop`` the prompt is ``""``, so classifier-free guidance
is available). Loss: rectified flow, :math:`x_t = (1 - t) x_0 + t\,\epsilon`, target :math:`v = \epsilon - x_0`,
MSE averaged over pixels; :math:`t` **uniform** on (0, 1) (``t_sampling="uniform"``; ``"logit_normal"`` is SD3's
choice, logit of t ~ N(0, 1)). The transformer's timestep is ``1000 t``; the scheduler is
``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` (shift 1: a uniform sigma grid, as suits 64 pixels).
An exponential moving average of the weights is what gets saved.

Saved with :func:`t2i.flow_models.save_pixel_sd3_pipeline` into ``<cache>/digits_flow/<hash>`` (``<hash>``: 16 hex
digits of the SHA-256 of the JSON of :class:`FlowPretrainConfig` and a format version); ``model.family="sd3"``,
``model.pretrained=<folder>`` loads it in :func:`t2i.trainer.make_trainer`. Shipped weights: the default and
``QUICK_FLOW`` models are in ``digits/weights/pretrain_flow/<hash>`` under the ``"pretrain_flow"`` section of
``digits/weights/manifest.json`` (same mechanism as :mod:`digits.pretrain`: copied on a cache miss after
every file's SHA-256 checks). Retrain them with ``python -m digits.pretrain_flow --retrain-shipped``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import ALL_PROMPTS, load_split
from .pretrain import (
    MANIFEST,
    WEIGHTS_DIR,
    _folder_digests,
    files_verified,
    fill_cache,
    read_manifest,
    train_step,
)
from .pretrain import cache_root as _digits_cache_root

__all__ = ["FlowPretrainConfig", "QUICK_FLOW", "flow_config_hash", "build_untrained_flow_pipeline",
           "pretrain_flow", "flow_pretrain_info", "shipped_flow_pretrained", "sample_ode", "prompted_accuracy",
           "retrain_shipped_flow"]

FORMAT_VERSION = 1
SECTION = "pretrain_flow"


@dataclass
class FlowPretrainConfig:
    num_layers: int = 2  # joint transformer blocks
    num_heads: int = 4  # attention heads
    head_dim: int = 16  # per head (inner width num_heads * head_dim)
    flow_shift: float = 1.0  # FlowMatchEulerDiscreteScheduler shift (1 = uniform sigmas)
    t_sampling: str = "uniform"  # "uniform" or "logit_normal" (SD3)
    num_train_steps: int = 1600  # optimizer steps
    batch_size: int = 64  # images per step
    learning_rate: float = 2e-3  # AdamW, linear warm-up then cosine decay
    warmup_steps: int = 50
    ema_decay: float = 0.99  # EMA of the weights (the saved model)
    cond_drop: float = 0.1  # probability of the empty prompt (classifier-free guidance)
    text_seed: int = 0  # seed of the tiny text encoders (build_tiny_sd3_pipeline)
    text_max_length: int = 24  # CLIP and T5 token length (prompts are 21 characters + specials)
    seed: int = 0
    extra: dict = field(default_factory=dict)  # free-form, part of the hash

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def QUICK_FLOW() -> FlowPretrainConfig:  # noqa: N802
    """Test-size pretraining (a few seconds; not a good model)."""
    return FlowPretrainConfig(num_layers=1, num_train_steps=60, batch_size=32, warmup_steps=10)


def flow_config_hash(cfg: FlowPretrainConfig) -> str:
    text = json.dumps({"format": FORMAT_VERSION, "kind": "flow", **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_root(cache_dir: str | None) -> str:
    return os.path.join(os.path.dirname(_digits_cache_root(cache_dir)), "digits_flow")


def build_untrained_flow_pipeline(cfg: FlowPretrainConfig):
    """A ``StableDiffusion3Pipeline`` on 8x8 pixels with random weights (transformer seeded by ``cfg.seed``, text
    encoders by ``cfg.text_seed``) and the identity ``PixelSpaceVAE``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from t2i.flow_models import build_tiny_sd3_pipeline
    from t2i.models import PixelSpaceVAE

    if cfg.t_sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {cfg.t_sampling!r}")
    pipe = build_tiny_sd3_pipeline(cfg.text_seed, sample_size=8, max_sequence_length=cfg.text_max_length)
    for tok in (pipe.tokenizer, pipe.tokenizer_2):  # shorter CLIP context: 2 x 24 tokens instead of 77 + 16
        tok.model_max_length = cfg.text_max_length
    pipe.tokenizer_max_length = cfg.text_max_length
    width = pipe.text_encoder.config.hidden_size
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        pipe.transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=1, out_channels=1, num_layers=cfg.num_layers,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=2 * width,
            caption_projection_dim=cfg.num_heads * cfg.head_dim, pooled_projection_dim=2 * width,
            pos_embed_max_size=8,
        )
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift)
    pipe.vae = PixelSpaceVAE(1, 3)
    return pipe


def _encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and pooled projections, differentiable in the text encoders."""
    e, _, p, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                    do_classifier_free_guidance=False, max_sequence_length=pipe.max_sequence_length)
    return e, p


def _train(cfg: FlowPretrainConfig, log_every: int = 0) -> tuple[object, dict]:
    with torch.random.fork_rng():  # T5's dropout draws from the global generator: seed it, leave the caller's alone
        torch.manual_seed(cfg.seed + 7)
        return _train_seeded(cfg, log_every)


def _train_seeded(cfg: FlowPretrainConfig, log_every: int) -> tuple[object, dict]:
    pipe = build_untrained_flow_pipeline(cfg)
    x_all, y_all = load_split("train", 8)
    nets = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = [p for n in nets for p in n.parameters()]
    for n in nets:
        n.train()
        n.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)

    def lr_at(s):
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (s - cfg.warmup_steps) / max(1, cfg.num_train_steps - cfg.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    emas = [copy.deepcopy(n).eval().requires_grad_(False) for n in nets]
    ema_p = [p for n in emas for p in n.parameters()]
    g = torch.Generator().manual_seed(cfg.seed)
    t0, losses = time.time(), []
    for step in range(cfg.num_train_steps):
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(cfg.batch_size, generator=g) < cfg.cond_drop] = 10
        if cfg.t_sampling == "uniform":
            t = torch.rand(cfg.batch_size, generator=g)
        else:
            t = torch.sigmoid(torch.randn(cfg.batch_size, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        emb, pooled = _encode(pipe, ALL_PROMPTS + [""])  # 11 distinct prompts: encode once, index
        v = pipe.transformer(hidden_states=xt, timestep=1000 * t, encoder_hidden_states=emb[y],
                             pooled_projections=pooled[y], return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        losses.append(train_step(loss, opt, sched, params, ema_p, step, cfg.ema_decay))
        if log_every and (step + 1) % log_every == 0:
            print(f"flow pretrain step {step + 1}/{cfg.num_train_steps} loss "
                  f"{sum(losses[-log_every:]) / log_every:.4f} ({time.time() - t0:.0f} s)", flush=True)
    pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3 = emas
    n = max(1, min(100, len(losses)))
    return pipe, {"train_time_s": time.time() - t0, "final_loss": sum(losses[-n:]) / n, "steps": cfg.num_train_steps,
                  "threads": torch.get_num_threads()}


@torch.no_grad()
def sample_ode(pipe, prompts: list[str], num_steps: int = 10, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``(B, 3, 8, 8)`` in [0, 1] from the probability-flow ODE: Euler steps on the scheduler's sigmas,
    :math:`x \\leftarrow x + (t_{k+1} - t_k)\\,v` from :math:`x_{t=1} \\sim N(0, I)`."""
    from t2i.flow_models import decode_sd3_latents, encode_sd3_prompts, guided_velocity

    sch = copy.deepcopy(pipe.scheduler)
    sch.set_timesteps(num_steps)
    sig = sch.sigmas.tolist()
    text = encode_sd3_prompts(pipe, prompts, guidance=guidance_scale != 1.0)
    x = torch.randn((len(prompts), 1, 8, 8), generator=generator)
    for k in range(num_steps):
        x = x + (sig[k + 1] - sig[k]) * guided_velocity(pipe.transformer, x, sig[k], text, guidance_scale)
    return decode_sd3_latents(pipe, x)


def prompted_accuracy(pipe, num_steps: int = 10, n: int = 200, seed: int = 0, cache_dir: str | None = None) -> float:
    """Fraction of ``n`` ODE samples (``num_steps`` steps, ``n/10`` per digit) that the evaluation classifier of
    the digits experiment (seed 1, 1500 steps) labels as the prompted digit."""
    from .rewards import accuracy, load_classifier

    ev, _ = load_classifier(_digits_cache_root(cache_dir), 1, {"steps": 1500})
    labels = torch.arange(n) % 10
    imgs = sample_ode(pipe, [ALL_PROMPTS[int(k)] for k in labels], num_steps,
                      generator=torch.Generator().manual_seed(seed))
    return accuracy(ev, imgs, labels)


def shipped_flow_pretrained(cfg: FlowPretrainConfig, weights_dir: str | None = None) -> str | None:
    """Folder of the shipped flow model with ``flow_config_hash(cfg)``, or ``None`` (absent or failing SHA-256)."""
    wd = weights_dir or WEIGHTS_DIR
    h = flow_config_hash(cfg)
    entry = read_manifest(wd).get(SECTION, {}).get(h)
    if entry is None:
        return None
    folder = os.path.join(wd, SECTION, h)
    if not files_verified(folder, entry["files"]):
        warnings.warn(f"shipped digits flow model {folder} fails its SHA-256 check; training instead", stacklevel=2)
        return None
    return folder


def pretrain_flow(cfg: FlowPretrainConfig | None = None, cache_dir: str | None = None, force: bool = False,
                  log_every: int = 0) -> str:
    """Folder of the pretrained flow model for ``cfg`` (copied from the shipped weights when the config hash
    matches, else trained; cached). Loadable with :func:`t2i.flow_models.load_pixel_sd3_pipeline`."""
    from t2i.flow_models import is_pixel_sd3_pipeline, save_pixel_sd3_pipeline

    cfg = cfg or FlowPretrainConfig()
    h = flow_config_hash(cfg)
    folder = os.path.join(_cache_root(cache_dir), h)
    if is_pixel_sd3_pipeline(folder) and not force:
        return folder

    def train_into(tmp: str) -> None:
        pipe, info = _train(cfg, log_every)
        save_pixel_sd3_pipeline(pipe, tmp, extra={"hash": h, "config": cfg.to_dict(), **info})

    return fill_cache(folder, None if force else shipped_flow_pretrained(cfg), train_into)


def flow_pretrain_info(folder: str) -> dict:
    from t2i.flow_models import PIXEL_SD3_MARKER

    with open(os.path.join(folder, PIXEL_SD3_MARKER)) as f:
        return json.load(f)


def retrain_shipped_flow(weights_dir: str | None = None, log_every: int = 200) -> dict:
    """Retrain the shipped flow models (default and ``QUICK_FLOW``) into ``weights_dir/pretrain_flow`` and replace
    the ``"pretrain_flow"`` section of its manifest (the other sections are left as they are)."""
    from t2i.flow_models import load_pixel_sd3_pipeline, save_pixel_sd3_pipeline

    wd = weights_dir or WEIGHTS_DIR
    section = {}
    for name, cfg in (("default", FlowPretrainConfig()), ("quick", QUICK_FLOW())):
        h = flow_config_hash(cfg)
        print(f"flow pretraining {name} config {h}", flush=True)
        pipe, info = _train(cfg, log_every)
        folder = os.path.join(wd, SECTION, h)
        shutil.rmtree(folder, ignore_errors=True)
        save_pixel_sd3_pipeline(pipe, folder, extra={"hash": h, "config": cfg.to_dict(), **info})
        info["accuracy_10_steps"] = prompted_accuracy(load_pixel_sd3_pipeline(folder), 10)
        print(f"  {info}", flush=True)
        section[h] = {"name": name, "config": cfg.to_dict(), **info, "files": _folder_digests(folder)}
    manifest = read_manifest(wd)
    manifest[SECTION] = section
    with open(os.path.join(wd, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m digits.pretrain_flow", description=__doc__.split("\n")[0])
    ap.add_argument("--retrain-shipped", action="store_true", help="retrain the flow models in digits/weights/")
    ap.add_argument("--cache", default=None, help="model cache (default $SA_CACHE or ~/.cache/scores-as-actions)")
    ap.add_argument("--force", action="store_true", help="train even if cached or shipped")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.retrain_shipped:
        m = retrain_shipped_flow()
        print(f"wrote {WEIGHTS_DIR} ({len(m[SECTION])} flow models)")
    else:
        from t2i.flow_models import load_pixel_sd3_pipeline

        folder = pretrain_flow(FlowPretrainConfig(), args.cache, force=args.force, log_every=200)
        print(folder, "accuracy at 10 ODE steps:", prompted_accuracy(load_pixel_sd3_pipeline(folder), 10))
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
