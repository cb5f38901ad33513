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
in :func:`t2i.trainer.make_trainer` (``t2i.models.load_pipeline`` recognises the folder).

**Shipped weights.** ``digits/weights/`` holds the models of the default and the ``QUICK`` configs (and the
digit classifiers of :mod:`digits.rewards`) as safetensors, listed in ``digits/weights/manifest.json`` with
their config, config hash and the SHA-256 of every file. On a cache miss, :func:`pretrain` copies the shipped
folder whose hash equals the requested config's hash (after checking every file's SHA-256) instead of
training; any other config trains as before. Retrain them all (about 7 min on one core) with
``python -m digits.pretrain --retrain-shipped`` (``make retrain-digits``).
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
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sa_theory.algorithms.checkpoint import sha256_file

from .data import ALL_PROMPTS, load_split

__all__ = [
    "PretrainConfig",
    "config_hash",
    "cache_root",
    "pretrain",
    "build_untrained_pipeline",
    "shipped_pretrained",
    "read_manifest",
    "retrain_shipped",
]

FORMAT_VERSION = 1
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MANIFEST = "manifest.json"


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


def train_step(loss, opt, sched, params, ema_params, step: int, ema_decay: float) -> float:
    """One optimiser step (gradient norm clipped to 1) and the EMA update with decay
    ``min(ema_decay, (1 + step)/(10 + step))``; returns the loss as a float. Shared by both digits pretrainings."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema_params, params):
            pe.lerp_(p.detach(), 1 - d)
    return float(loss.detach())


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


def build_untrained_unet(cfg: PretrainConfig):
    """The digits UNet (``diffusers.UNet2DConditionModel``) of ``cfg`` with random weights: seeds the global torch
    generator with ``cfg.seed`` (callers that must not move it wrap the call in ``torch.random.fork_rng()``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed)
    return UNet2DConditionModel(
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


def build_untrained_pipeline(cfg: PretrainConfig):
    """A :class:`t2i.models.PixelPipeline` with random weights seeded by ``cfg.seed``."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from t2i.models import PixelPipeline, _write_char_tokenizer

    with torch.random.fork_rng():
        unet = build_untrained_unet(cfg)
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
        losses.append(train_step(loss, opt, sched, params, ema_p, step, cfg.ema_decay))
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

    def train_into(tmp: str) -> None:
        pipe, info = _train(cfg, log_every)
        save_pixel_pipeline(pipe, tmp, extra={"hash": h, "config": cfg.to_dict(), **info})

    return fill_cache(folder, None if force else shipped_pretrained(cfg), train_into)


def fill_cache(folder: str, shipped: str | None, train_into) -> str:
    """Write a model folder atomically: copy ``shipped`` (same config hash, files verified) when given, else
    ``train_into(tmp)``; then replace ``folder`` by the finished copy. Returns ``folder``."""
    tmp = folder + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if shipped is not None:
        shutil.copytree(shipped, tmp)
    else:
        train_into(tmp)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def pretrain_info(folder: str) -> dict:
    with open(os.path.join(folder, "pixel_pipeline.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- shipped weights (sha256_file: sa_theory)


def read_manifest(weights_dir: str | None = None) -> dict:
    """``manifest.json`` of the shipped weights (``{"pretrain": {hash: entry}, "classifiers": {hash: entry}}``;
    empty sections when there is none)."""
    path = os.path.join(weights_dir or WEIGHTS_DIR, MANIFEST)
    if not os.path.isfile(path):
        return {"pretrain": {}, "classifiers": {}}
    with open(path) as f:
        return json.load(f)


def files_verified(base: str, files: dict) -> bool:
    """True when every ``relative path -> sha256`` of ``files`` exists under ``base`` with that digest."""
    for rel, digest in files.items():
        p = os.path.join(base, rel)
        if not os.path.isfile(p) or sha256_file(p) != digest:
            return False
    return bool(files)


def shipped_pretrained(cfg: PretrainConfig, weights_dir: str | None = None) -> str | None:
    """Folder of the shipped model whose config hash equals ``config_hash(cfg)``, or ``None`` (no such entry,
    or a file missing or failing its SHA-256, then with a warning)."""
    wd = weights_dir or WEIGHTS_DIR
    h = config_hash(cfg)
    entry = read_manifest(wd)["pretrain"].get(h)
    if entry is None:
        return None
    folder = os.path.join(wd, "pretrain", h)
    if not files_verified(folder, entry["files"]):
        warnings.warn(f"shipped digits model {folder} fails its SHA-256 check; training instead", stacklevel=2)
        return None
    return folder


def _folder_digests(folder: str) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder).replace(os.sep, "/")] = sha256_file(p)
    return dict(sorted(out.items()))


def retrain_shipped(weights_dir: str | None = None, log_every: int = 200) -> dict:
    """Retrain every shipped model (the default and ``QUICK`` pretraining configs, and the classifiers of
    :func:`digits.rewards.shipped_classifier_specs`) into a fresh ``weights_dir`` and write its manifest."""
    from t2i.models import save_pixel_pipeline

    from .experiment import QUICK
    from .rewards import save_shipped_classifier, shipped_classifier_specs, train_classifier

    wd = weights_dir or WEIGHTS_DIR
    new = wd.rstrip(os.sep) + ".new"
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    manifest = {"format": 1, "torch": torch.__version__, "threads": torch.get_num_threads(), "pretrain": {}}
    manifest["classifiers"] = {}
    for name, cfg in (("default", PretrainConfig()), ("quick", QUICK().pretrain)):
        h = config_hash(cfg)
        print(f"pretraining {name} config {h}", flush=True)
        pipe, info = _train(cfg, log_every)
        folder = os.path.join(new, "pretrain", h)
        save_pixel_pipeline(pipe, folder, extra={"hash": h, "config": cfg.to_dict(), **info})
        manifest["pretrain"][h] = {"name": name, "config": cfg.to_dict(), **info, "files": _folder_digests(folder)}
    for seed, cfg in shipped_classifier_specs():
        model, info = train_classifier(seed, cfg)
        h, rel = save_shipped_classifier(model, info, new)
        print(f"classifier {h} seed {seed} {cfg}: test accuracy {info['test_accuracy']:.3f}", flush=True)
        manifest["classifiers"][h] = {"file": rel, "sha256": sha256_file(os.path.join(new, rel)), **info}
    with open(os.path.join(new, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    if os.path.isfile(os.path.join(wd, "README.md")):
        shutil.copy2(os.path.join(wd, "README.md"), os.path.join(new, "README.md"))
    if os.path.isdir(os.path.join(wd, "pretrain_flow")):  # the flow models: digits.pretrain_flow retrains them
        shutil.copytree(os.path.join(wd, "pretrain_flow"), os.path.join(new, "pretrain_flow"))
        manifest["pretrain_flow"] = read_manifest(wd).get("pretrain_flow", {})
        with open(os.path.join(new, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
    shutil.rmtree(wd, ignore_errors=True)
    os.replace(new, wd)
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m digits.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--retrain-shipped", action="store_true", help="retrain everything in digits/weights/")
    ap.add_argument("--cache", default=None, help="model cache (default $SA_CACHE or ~/.cache/scores-as-actions)")
    ap.add_argument("--force", action="store_true", help="train even if cached or shipped")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.retrain_shipped:
        m = retrain_shipped()
        print(f"wrote {WEIGHTS_DIR} ({len(m['pretrain'])} models, {len(m['classifiers'])} classifiers)")
    else:
        print(pretrain(PretrainConfig(), args.cache, force=args.force, log_every=200))
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
