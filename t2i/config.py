"""Typed configuration: the single source of truth for every knob, named presets, CLI overrides, validation.

``sa-t2i train --config sd15_sa_ac --train.beta 0.02 --sample.num_steps 20`` overrides any field
``--section.field value`` (converted to the field's type; lists as JSON or ``a|b|c``; ``none`` for None).
An unknown section or field raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

__all__ = [
    "ModelConfig",
    "SampleConfig",
    "TrainConfig",
    "ValueConfig",
    "RewardConfig",
    "LogConfig",
    "Config",
    "PRESETS",
    "get_preset",
    "apply_overrides",
    "validate",
    "batch_arithmetic",
    "config_to_dict",
    "config_from_dict",
    "METHODS",
]

METHODS = ("sa_ac", "ddpo_sf", "ddpo_is", "dpok")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ANIMALS = [
    "cat",
    "dog",
    "horse",
    "monkey",
    "rabbit",
    "zebra",
    "spider",
    "bird",
    "sheep",
    "deer",
    "cow",
    "goat",
    "lion",
    "tiger",
    "bear",
    "raccoon",
    "fox",
    "wolf",
    "lizard",
    "beetle",
    "ant",
    "butterfly",
    "fish",
    "shark",
    "whale",
    "dolphin",
    "squirrel",
    "mouse",
    "rat",
    "snake",
    "turtle",
    "frog",
    "chicken",
    "duck",
    "goose",
    "bee",
    "pig",
    "turkey",
    "fly",
    "llama",
    "camel",
    "bat",
    "gorilla",
    "hedgehog",
    "kangaroo",
]


@dataclass
class ModelConfig:
    pretrained: str = SD15  # local folder or Hub id; "tiny" = in-process tiny pipeline; "tiny_pixel" = same,
    # identity pixel-space VAE (t2i.models.PixelSpaceVAE); a folder from t2i.models.save_pixel_pipeline
    revision: str | None = None  # Hub revision (None = default branch)
    tiny_seed: int = 0  # seed of the random weights of the tiny pipeline (pretrained="tiny")
    lora_rank: int = 4  # LoRA rank r on to_q/to_k/to_v/to_out.0 of the UNet attention layers
    lora_alpha: float = 4.0  # LoRA scaling numerator (scale = alpha / r)
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16": frozen weights in this dtype, LoRA params fp32
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward pass (saves memory)
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # training sampler with log-probs: "ddim" (uses eta) or "ddpm"
    num_steps: int = 50  # K sampling steps per image (also the number of per-step actor terms)
    eta: float = 1.0  # DDIM eta (> 0 for training: the step must be stochastic to have a log-prob)
    guidance_scale: float = 5.0  # classifier-free guidance w; the action is the guided score
    negative_prompt: str = ""  # unconditional prompt of CFG
    batch_size: int = 8  # images sampled per process per sampling batch
    num_batches_per_epoch: int = 4  # sampling batches per process per epoch
    eval_sampler: str = "ddim"  # sampler for `evaluate`/`sample`: ddim, ddpm, dpmsolver++, unipc, deis
    eval_num_steps: int = 50  # steps for `evaluate`/`sample`
    eval_num_images: int = 64  # images per process in `evaluate`


@dataclass
class TrainConfig:
    method: str = "sa_ac"  # "sa_ac" (continuous-time AC), "ddpo_sf" (REINFORCE), "ddpo_is" (PPO-clip), "dpok"
    num_epochs: int = 100  # epochs; one epoch = sample, reward, then num_inner_epochs passes of updates
    batch_size: int = 4  # paths per process per backward pass (minibatch)
    gradient_accumulation_steps: int = 2  # minibatches per optimizer update
    num_inner_epochs: int = 1  # passes over each epoch's samples
    learning_rate: float = 3e-4  # actor (LoRA) learning rate, AdamW
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_weight_decay: float = 1e-4  # AdamW weight decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    lr_warmup_steps: int = 0  # linear LR warm-up, in optimizer updates (then constant)
    max_grad_norm: float = 1.0  # gradient clipping of actor + critic parameters
    timestep_fraction: float = 1.0  # fraction of the K steps trained on per path (random subset per epoch)
    beta: float = 0.01  # KL weight: objective E[r] - beta * KL(P_theta || P_pre) (nats per path)
    kl_penalty: float = 1.0  # sa_ac: penalty on the path KL to the old (sampling) policy (trust region)
    max_path_kl: float = (
        0.0  # sa_ac: stop the epoch's updates once mean path KL to the old policy exceeds this (0 = off)
    )
    clip_range: float = 1e-4  # ddpo_is: PPO clip range on per-step ratios of SUMMED log-probs
    ratio_clamp: float = 1e-4  # dpok: per-step ratio clamped to [1 - c, 1 + c] (DPOK's 1e-4)
    adv_clip_max: float = 5.0  # clamp advantages to [-c, c]
    advantage: str = "value"  # sa_ac: "value" (reward-to-go minus V baseline) or "td" (one-step TD errors)
    per_prompt_norm: bool = (
        False  # standardise rewards per prompt (running tracker, DDPO); ddpo_is and ddpo_sf always do
    )
    stat_buffer_size: int = 32  # per-prompt tracker: rewards kept per prompt
    stat_min_count: int = 8  # per-prompt tracker: below this count use batch statistics
    seed: int = 0  # global seed; per-epoch/per-rank RNG streams derive from it (exact resume)


@dataclass
class ValueConfig:
    kind: str = "critic"  # "critic" (conv net), "tweedie" (r(VAE(x0_hat))), "residual", "none"
    learning_rate: float = 1e-4  # critic learning rate
    width: int = 64  # critic channel width
    loss: str = (
        "mc"  # "mc" (regress on R - beta * KL-to-go) or "td" (TD(0) targets from the pre-update critic)
    )
    coef: float = 1.0  # weight of the critic loss in the summed loss (separate parameters)


@dataclass
class RewardConfig:
    name: str = "jpeg_compress"  # reward name: built-in, entry point (group sa_t2i.rewards) or "module:Factory"
    clip_path: str | None = None  # local CLIPModel folder (aesthetic, clip_score, pickscore)
    weights_path: str | None = None  # reward head weights (aesthetic: .safetensors/.pt state dict)


@dataclass
class LogConfig:
    output_dir: str = "runs/sa_t2i"  # run folder: metrics.jsonl, tensorboard/, images/, checkpoints/
    save_every: int = 10  # checkpoint every N epochs (and at the end); 0 = only at the end
    keep_last: int = 3  # checkpoints kept
    image_every: int = 5  # save an image grid every N epochs (0 = never)
    tensorboard: bool = True  # write TensorBoard event files
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "scores-as-actions"  # wandb project
    progress: bool = True  # tqdm progress bars on the main process


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # model and LoRA
    sample: SampleConfig = field(default_factory=SampleConfig)  # sampling
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation
    value: ValueConfig = field(default_factory=ValueConfig)  # value model
    reward: RewardConfig = field(default_factory=RewardConfig)  # reward
    log: LogConfig = field(default_factory=LogConfig)  # logging and checkpoints
    prompts: list[str] = field(default_factory=lambda: list(ANIMALS))  # training prompts (sampled uniformly)
    resume_from: str | None = None  # checkpoint dir, or a run dir (uses its `latest`), or "auto"


# --------------------------------------------------------------------------- presets
def _sd15(method: str) -> Config:
    c = Config()
    c.train.method = method
    c.sample.batch_size, c.sample.num_batches_per_epoch = 8, 4
    c.train.batch_size, c.train.gradient_accumulation_steps = 4, 2
    c.train.learning_rate = 3e-4
    c.log.output_dir = f"runs/sd15_{method}"
    if method == "sa_ac":
        c.train.beta, c.train.kl_penalty, c.train.max_path_kl = 0.01, 1.0, 5.0
        c.value.kind = "critic"
    elif method == "ddpo_is":
        c.train.beta, c.train.clip_range, c.train.per_prompt_norm = 0.0, 1e-4, True
        c.value.kind = "none"
    elif method == "dpok":
        c.train.beta, c.train.ratio_clamp, c.train.learning_rate = 0.01, 1e-4, 1e-5
        c.value.kind, c.value.learning_rate = "critic", 1e-4
    return c


def _tiny_cpu() -> Config:
    c = Config()
    c.model.pretrained = "tiny"
    c.sample.num_steps, c.sample.batch_size, c.sample.num_batches_per_epoch = 6, 4, 1
    c.sample.guidance_scale, c.sample.eval_num_steps, c.sample.eval_num_images = 3.0, 6, 8
    c.train.num_epochs, c.train.batch_size, c.train.gradient_accumulation_steps = 2, 2, 1
    c.train.learning_rate, c.train.beta, c.train.kl_penalty = 1e-3, 1e-3, 0.1
    c.value.width = 16
    c.reward.name = "brightness"
    c.prompts = ["a cat", "a dog"]
    c.log.output_dir, c.log.save_every, c.log.image_every = "runs/tiny_cpu", 1, 1
    c.log.progress = False
    return c


PRESETS = {
    "sd15_sa_ac": lambda: _sd15("sa_ac"),
    "sd15_ddpo_is": lambda: _sd15("ddpo_is"),
    "sd15_dpok": lambda: _sd15("dpok"),
    "tiny_cpu": _tiny_cpu,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- overrides
def _convert(value: str, tp, name: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _convert(value, args[0], name)
    if origin is list:
        if value.strip().startswith("["):
            return [str(v) for v in json.loads(value)]
        return [v.strip() for v in value.split("|") if v.strip()]
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean (true/false), got {value!r}")
    try:
        return tp(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: cannot convert {value!r} to {tp.__name__}") from err


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    """Set ``section.field`` (or a top-level field) from strings, type-converted. Unknown names raise."""
    hints_top = typing.get_type_hints(Config)
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] not in hints_top or dataclasses.is_dataclass(getattr(cfg, parts[0], None)):
                raise ValueError(
                    f"unknown config field {key!r}; top-level fields: "
                    f"{sorted(k for k in hints_top if not dataclasses.is_dataclass(getattr(cfg, k)))}"
                )
            setattr(cfg, key, _convert(value, hints_top[key], key))
            continue
        if (
            len(parts) != 2
            or parts[0] not in hints_top
            or not dataclasses.is_dataclass(getattr(cfg, parts[0]))
        ):
            raise ValueError(
                f"unknown config field {key!r}; sections: "
                f"{sorted(k for k in hints_top if dataclasses.is_dataclass(getattr(cfg, k)))}"
            )
        sec = getattr(cfg, parts[0])
        hints = typing.get_type_hints(type(sec))
        if parts[1] not in hints:
            raise ValueError(f"unknown config field {key!r}; fields of {parts[0]!r}: {sorted(hints)}")
        setattr(sec, parts[1], _convert(value, hints[parts[1]], key))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    c = Config()
    for k, v in d.items():
        cur = getattr(c, k)
        if dataclasses.is_dataclass(cur):
            setattr(c, k, type(cur)(**v))
        else:
            setattr(c, k, v)
    return c


# --------------------------------------------------------------------------- validation and arithmetic
def validate(cfg: Config, num_processes: int = 1) -> None:
    """Fail fast with a message naming the offending field."""
    from .rewards import available_rewards
    from .scheduling import SAMPLERS, TRAIN_SAMPLERS
    from .values import VALUE_KINDS

    s, t, v, r, m = cfg.sample, cfg.train, cfg.value, cfg.reward, cfg.model

    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(t.method in METHODS, f"train.method: unknown method {t.method!r}; choose one of {METHODS}")
    need(
        r.name in available_rewards() or ":" in r.name,
        f"reward.name: unknown reward {r.name!r}; known rewards: {', '.join(available_rewards())} "
        "(or 'package.module:Factory')",
    )
    for fld in ("weights_path", "clip_path"):
        p = getattr(r, fld)
        if p is not None and not os.path.exists(p):
            raise ValueError(f"reward.{fld}: path {p!r} does not exist")
    if r.name == "aesthetic":
        need(
            r.weights_path is not None,
            "reward.weights_path: reward 'aesthetic' needs the head's weights file",
        )
    if r.name in ("aesthetic", "clip_score", "pickscore"):
        need(r.clip_path is not None, f"reward.clip_path: reward {r.name!r} needs a local CLIP model folder")
    need(
        s.sampler in TRAIN_SAMPLERS,
        f"sample.sampler: {s.sampler!r} has no log-probs; choose one of {TRAIN_SAMPLERS}",
    )
    need(
        s.eval_sampler in SAMPLERS,
        f"sample.eval_sampler: unknown sampler {s.eval_sampler!r}; choose one of {SAMPLERS}",
    )
    need(s.sampler != "ddim" or s.eta > 0, f"sample.eta: must be > 0 for training with DDIM (got {s.eta})")
    need(s.num_steps >= 1, f"sample.num_steps: must be >= 1 (got {s.num_steps})")
    need(
        s.batch_size >= 1 and s.num_batches_per_epoch >= 1,
        "sample.batch_size and sample.num_batches_per_epoch: must be >= 1",
    )
    need(t.batch_size >= 1, f"train.batch_size: must be >= 1 (got {t.batch_size})")
    need(
        s.batch_size % t.batch_size == 0,
        f"train.batch_size: sample.batch_size ({s.batch_size}) must be divisible by train.batch_size ({t.batch_size})",  # noqa: E501
    )
    n_mb = s.batch_size * s.num_batches_per_epoch // t.batch_size
    need(
        n_mb % t.gradient_accumulation_steps == 0,
        f"train.gradient_accumulation_steps: minibatches per epoch per process ({n_mb}) must be divisible by "
        f"train.gradient_accumulation_steps ({t.gradient_accumulation_steps})",
    )
    for name in ("beta", "kl_penalty", "max_path_kl", "learning_rate", "max_grad_norm", "adv_clip_max"):
        val = getattr(t, name)
        need(math.isfinite(val) and val >= 0, f"train.{name}: must be finite and >= 0 (got {val})")
    need(t.clip_range > 0, f"train.clip_range: must be > 0 (got {t.clip_range})")
    need(0 < t.ratio_clamp, f"train.ratio_clamp: must be > 0 (got {t.ratio_clamp})")
    need(
        0 < t.timestep_fraction <= 1,
        f"train.timestep_fraction: must be in (0, 1] (got {t.timestep_fraction})",
    )
    need(t.advantage in ("value", "td"), f"train.advantage: {t.advantage!r} must be 'value' or 'td'")
    need(
        t.num_epochs >= 0 and t.num_inner_epochs >= 1,
        "train.num_epochs/num_inner_epochs: must be >= 0 / >= 1",
    )
    need(v.kind in VALUE_KINDS, f"value.kind: unknown value design {v.kind!r}; choose one of {VALUE_KINDS}")
    need(v.loss in ("mc", "td"), f"value.loss: {v.loss!r} must be 'mc' or 'td'")
    need(
        t.method != "dpok" or v.kind in ("critic", "residual"),
        f"value.kind: dpok needs a learned value baseline ('critic' or 'residual'), got {v.kind!r}",
    )
    need(
        t.advantage != "td" or v.kind != "none",
        "train.advantage: 'td' needs a value model (value.kind != 'none')",
    )
    need(
        m.mixed_precision in ("no", "fp16", "bf16"),
        f"model.mixed_precision: {m.mixed_precision!r} not in no/fp16/bf16",
    )
    need(m.lora_rank >= 1, f"model.lora_rank: must be >= 1 (got {m.lora_rank})")
    need(len(cfg.prompts) >= 1, "prompts: need at least one prompt")


def batch_arithmetic(cfg: Config, num_processes: int = 1) -> dict[str, int]:
    s, t = cfg.sample, cfg.train
    per_proc = s.batch_size * s.num_batches_per_epoch
    n_mb = per_proc // t.batch_size
    steps_trained = max(1, int(round(s.num_steps * t.timestep_fraction)))
    return {
        "num_processes": num_processes,
        "samples_per_epoch": per_proc * num_processes,
        "samples_per_epoch_per_process": per_proc,
        "minibatches_per_epoch_per_process": n_mb,
        "optimizer_updates_per_epoch": n_mb // t.gradient_accumulation_steps * t.num_inner_epochs,
        "paths_per_update": t.batch_size * t.gradient_accumulation_steps * num_processes,
        "steps_trained_per_path": steps_trained,
        "unet_calls_per_sample_rollout": s.num_steps * (2 if s.guidance_scale != 1.0 else 1),
        "total_samples": per_proc * num_processes * t.num_epochs,
    }


def format_arithmetic(cfg: Config, num_processes: int = 1) -> str:
    a = batch_arithmetic(cfg, num_processes)
    s, t = cfg.sample, cfg.train
    return "\n".join(
        [
            f"samples per epoch = sample.batch_size {s.batch_size} x processes {num_processes} x "
            f"num_batches_per_epoch {s.num_batches_per_epoch} = {a['samples_per_epoch']}",
            f"optimizer updates per epoch = (samples/process {a['samples_per_epoch_per_process']} / train.batch_size "  # noqa: E501
            f"{t.batch_size} / grad_accum {t.gradient_accumulation_steps}) x inner epochs {t.num_inner_epochs} = "  # noqa: E501
            f"{a['optimizer_updates_per_epoch']}",
            f"paths per update = {t.batch_size} x {t.gradient_accumulation_steps} x {num_processes} = {a['paths_per_update']};"  # noqa: E501
            f" steps trained per path = {a['steps_trained_per_path']} of {s.num_steps}",
            f"total samples = {a['total_samples']} over {t.num_epochs} epochs",
        ]
    )
