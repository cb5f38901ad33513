"""Typed configuration: the single source of truth for every knob, named presets, CLI overrides, validation.

``sa-t2i train --config sd15_sa_ac --train.beta 0.02 --sample.num_steps 20`` overrides any field
``--section.field value`` (converted to the field's type; lists as JSON or ``a|b|c``; ``none`` for None).
An unknown section or field raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from importlib import resources

from sa_theory.algorithms.config import _f, convert_value, describe
from sa_theory.algorithms.method_base import MethodConfig

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
    "RESUME_MUTABLE",
    "describe_config",
    "ANIMALS",
    "method_config",
]

METHODS = ("sa_ac", "ddpo_sf", "ddpo_is", "dpok", "flow_grpo")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD35M = "stabilityai/stable-diffusion-3.5-medium"
#: DDPO's 45 animal prompts, shipped as ``t2i/data/animal_prompts.txt`` (one per line)
ANIMALS = [ln.strip() for ln in resources.files("t2i").joinpath("data/animal_prompts.txt").read_text().splitlines()
           if ln.strip()]


@dataclass
class ModelConfig:
    """Model and LoRA."""

    pretrained: str = _f(SD15, 'local folder or Hub id; "tiny" = in-process tiny pipeline; "tiny_pixel" = same with '
                               'an identity pixel-space VAE; "tiny_sd3" / "tiny_sd3_pixel" = tiny SD3 (flow); '
                               "a folder from t2i.models.save_pixel_pipeline")
    family: str = _f("sd", '"sd" (UNet pipelines: SD1.5/2.x) or "sd3" (rectified-flow transformers: SD3/3.5); '
                           '"tiny_sd3*" imply "sd3"')
    revision: str | None = _f(None, "Hub revision (None = default branch)")
    tiny_seed: int = _f(0, 'seed of the random weights of the tiny pipeline (pretrained="tiny")')
    lora_rank: int = _f(4, "LoRA rank r on to_q/to_k/to_v/to_out.0 of the UNet attention layers")
    lora_alpha: float = _f(4.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_uncond: bool = _f(True, "LoRA on CFG's unconditional branch too (false: that branch stays the pretrained "
                                 "model's, shared with the reference: 3 forwards per guided step with the reference "
                                 "instead of 4, and the update pass back-propagates the conditional half only)")
    mixed_precision: str = _f("no", '"no" | "fp16" | "bf16": frozen weights in this dtype, LoRA params fp32')
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in the backward pass (saves memory)")
    allow_tf32: bool = _f(True, "TF32 matmuls on Ampere+ GPUs")


@dataclass
class SampleConfig:
    """Sampling (training rollouts and evaluation)."""

    sampler: str = _f("ddim", 'training sampler with log-probs: "ddim" (uses eta) or "ddpm" (UNets); "flow" (the '
                              "noise-level family on the flow scheduler's sigmas, SD3-class)")
    num_steps: int = _f(50, "K sampling steps per image (also the number of per-step actor terms)")
    eta: float = _f(1.0, "DDIM eta (> 0 for training: the step must be stochastic to have a log-prob)")
    flow_noise: str = _f("eta", 'flow sampler noise: "eta" (family member eta = flow_noise_value; 1 = reverse '
                                'SDE), "flow_grpo" (Flow-GRPO a = flow_noise_value, eta = a^2/2), "constant_sigma"')
    flow_noise_value: float = _f(1.0, "value of flow_noise (eta, Flow-GRPO's a, or the constant sigma)")
    flow_at_one: str = _f("ode", 'flow step from t = 1: "ode" (deterministic, masked) or "clamp" (Flow-GRPO)')
    group_size: int = _f(1, "images per prompt in each sampling batch (flow_grpo: its group G, >= 2)")
    guidance_scale: float = _f(5.0, "classifier-free guidance w; the action is the guided score")
    resolution: int | None = _f(None, "image height = width in pixels (None: the model's native size, e.g. 1024 for "
                                      "SD3.5, 512 for SD1.5); a multiple of the VAE scale x patch size")
    negative_prompt: str = _f("", "unconditional prompt of CFG")
    batch_size: int = _f(8, "images sampled per process per sampling batch")
    num_batches_per_epoch: int = _f(4, "sampling batches per process per epoch")
    eval_sampler: str = _f("ddim", "sampler for `evaluate`/`sample`: ddim, ddpm, dpmsolver++, unipc, deis")
    eval_num_steps: int = _f(50, "steps for `evaluate`/`sample`")
    eval_num_images: int = _f(64, "images per process in `evaluate`")


@dataclass
class TrainConfig:
    """Optimisation."""

    method: str = _f("sa_ac", '"sa_ac" (continuous-time AC), "ddpo_sf" (REINFORCE), "ddpo_is" (PPO-clip), "dpok"')
    num_epochs: int = _f(100, "epochs (>= 1); one epoch = sample, reward, then num_inner_epochs passes of updates")
    batch_size: int = _f(4, "paths per process per backward pass (minibatch)")
    gradient_accumulation_steps: int = _f(2, "minibatches per optimizer update")
    num_inner_epochs: int = _f(1, "passes over each epoch's samples")
    learning_rate: float = _f(3e-4, "actor (LoRA) learning rate, AdamW")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    lr_warmup_steps: int = _f(0, "linear LR warm-up, in optimizer updates (then constant)")
    max_grad_norm: float = _f(1.0, "gradient clipping of actor + critic parameters (0: none)")
    timestep_fraction: float = _f(1.0, "fraction of the K steps trained on per path (random subset per epoch)")
    steps_per_backward: int = _f(1, "trained steps per denoiser forward and backward in the update: 1 (one step's "
                                    "batch per pass, the least memory), n (n steps' batches stacked in one pass), "
                                    "0 (all of a minibatch's trained steps in one pass: fastest for small models); "
                                    "the same loss and gradient up to float rounding")
    beta: float = _f(0.01, "KL weight: objective E[r] - beta * KL(P_theta || P_pre) (nats per path)")
    kl_weighting: str = _f("chain", 'which per-step KL regularises: "chain" (exact KL of the K-step sampler; bounds '
                                    'the terminal KL) or "continuous" (Girsanov rate over each step; stable across K)')
    kl_penalty: float = _f(1.0, "sa_ac: penalty on the path KL to the old (sampling) policy (trust region)")
    logprob_units: str = _f("sum", 'flow_grpo: "sum" (log-probs summed over dims, exact KL; ours) or "mean" '
                                   "(Flow-GRPO's per-dimension means and KL without 1/dt)")
    early_stop_path_kl: float = _f(0.0, "sa_ac: stop the epoch's updates once the mean path KL to the old policy "
                                        "exceeds this (0 = off; the toys' early_stop_path_kl; their max_path_kl is "
                                        "a per-path gradient mask)")
    clip_range: float = _f(1e-4, "ddpo_is: PPO clip range on per-step ratios of SUMMED log-probs")
    ratio_clamp: float = _f(1e-4, "dpok: per-step ratio clamped to [1 - c, 1 + c] (DPOK's 1e-4)")
    adv_clip_max: float = _f(5.0, "clamp advantages to [-c, c]")
    advantage: str = _f("value", 'sa_ac: "value" (reward-to-go minus V baseline) or "td" (one-step TD errors)')
    estimator: str = _f("likelihood_ratio", 'sa_ac: "likelihood_ratio" (R5, value baseline) or "value_gradient" '
                                            "(R4/R8: costates grad V of the critic, the toy-verified surrogate)")
    per_prompt_norm: bool = _f(False, "standardise rewards per prompt (running tracker, DDPO); ddpo_is and ddpo_sf "
                                      "always do")
    stat_buffer_size: int = _f(32, "per-prompt tracker: rewards kept per prompt")
    stat_min_count: int = _f(8, "per-prompt tracker: below this count use batch statistics")
    seed: int = _f(0, "global seed; per-epoch/per-rank RNG streams derive from it (exact resume)")


@dataclass
class ValueConfig:
    """Value model (critic / baseline)."""

    kind: str = _f("critic", '"critic" (conv net), "tweedie" (r(VAE(x0_hat))), "residual", "none"')
    learning_rate: float = _f(1e-4, "critic learning rate")
    width: int = _f(64, "critic channel width")
    loss: str = _f("mc", '"mc" (regress on R - beta * KL-to-go) or "td" (TD(0) targets from the pre-update critic)')
    coef: float = _f(1.0, 'fit="joint": weight of the critic loss in the summed loss (separate parameters)')
    fit: str = _f("joint", 'how the critic is fitted: "joint" (its loss, times coef, added to every actor backward; '
                           'one optimizer) or "separate" (a phase of value.epochs passes over the epoch\'s samples '
                           "with its own optimizer before the advantages are computed, as the toys' default)")
    epochs: int = _f(1, 'fit="separate": passes of critic updates over each epoch\'s samples (minibatches of '
                        "train.batch_size x gradient_accumulation_steps, every stochastic step)")


@dataclass
class RewardConfig:
    """Reward."""

    name: str = _f("jpeg_compress", 'reward name: built-in, entry point (group sa_t2i.rewards) or "module:Factory"')
    clip_path: str | None = _f(None, "local CLIPModel folder (aesthetic, clip_score, pickscore)")
    weights_path: str | None = _f(None, "reward head weights (aesthetic: .safetensors/.pt state dict)")


@dataclass
class LogConfig:
    """Logging and checkpoints."""

    output_dir: str = _f("runs/sa_t2i", "run folder: metrics.jsonl, tensorboard/, images/, checkpoints/")
    overwrite: bool = _f(False, "let a fresh run replace an existing run in output_dir (removes its metrics.jsonl, "
                                "checkpoints/, images/, tensorboard/); default: refuse, naming the folder")
    save_every: int = _f(10, "checkpoint every N epochs (and at the end, and on SIGINT/SIGTERM); 0 = only at the end")
    keep_last: int = _f(3, "checkpoints kept (a damaged latest falls back to the newest intact one)")
    image_every: int = _f(5, "save an image grid every N epochs (0 = never)")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    wandb: bool = _f(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = _f("scores-as-actions", "wandb project")
    progress: bool = _f(True, "tqdm progress bars and the batch arithmetic at start, on the main process")
    reference_kl: bool = _f(True, "record the pretrained model's actions at every sampling step for every method, "
                                  "to log the path KL to it; false: only where the method uses them (sa_ac, dpok, "
                                  "and ddpo_*/flow_grpo with train.beta > 0), saving ddpo's extra denoiser pass")


def _section(cls):
    return field(default_factory=cls, metadata={"help": cls.__doc__})


@dataclass
class Config:
    """Every knob of an image fine-tuning run."""

    model: ModelConfig = _section(ModelConfig)
    sample: SampleConfig = _section(SampleConfig)
    train: TrainConfig = _section(TrainConfig)
    value: ValueConfig = _section(ValueConfig)
    reward: RewardConfig = _section(RewardConfig)
    log: LogConfig = _section(LogConfig)
    prompts: list[str] = field(default_factory=lambda: list(ANIMALS),
                               metadata={"help": "training prompts (sampled uniformly); CLI: JSON list or a|b|c"})
    resume_from: str | None = _f(None, 'checkpoint dir, or a run dir (uses its `latest`), or "auto" (resume if the '
                                       "run dir has a checkpoint, else start fresh)")


#: fields a resumed run may change (applied and reported); any other difference refuses to resume
RESUME_MUTABLE = frozenset({"train.num_epochs", "resume_from", "log.output_dir", "log.overwrite", "log.save_every",
                            "log.keep_last", "log.image_every", "log.tensorboard", "log.wandb", "log.wandb_project",
                            "log.progress", "sample.eval_sampler", "sample.eval_num_steps", "sample.eval_num_images"})


def describe_config(cfg: Config | None = None) -> str:
    """Every field as ``section.field (type) = value  # meaning`` (``cfg``'s values, else the defaults)."""
    cfg = cfg or Config()
    out = []
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            out.append(describe(sub, prefix=f"{f.name}."))
    top = [f for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))]
    hints = typing.get_type_hints(Config)
    out.append("top level:")
    for f in top:
        val = getattr(cfg, f.name)
        shown = val if not isinstance(val, list) or len(val) <= 4 else [*val[:4], f"... {len(val)} in all"]
        tname = str(hints[f.name]).replace("typing.", "")
        out.append(f"  {f.name} ({tname}) = {shown!r}  # {f.metadata.get('help', '')}")
    return "\n".join(out)


# --------------------------------------------------------------------------- overrides
def _convert(value: str, tp, name: str):
    """``value`` as the field's type: lists as JSON or ``a|b|c``, the rest by the toys' converter
    (:func:`sa_theory.algorithms.config.convert_value`: optional fields, booleans, integers, floats)."""
    if typing.get_origin(tp) is list:
        if value.strip().startswith("["):
            return [str(v) for v in json.loads(value)]
        return [v.strip() for v in value.split("|") if v.strip()]
    return convert_value(name, tp, value)


#: renamed fields: old name -> new name (old run folders' config.json load; the CLI names the new one)
RENAMED = {"train.max_path_kl": "train.early_stop_path_kl"}


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    """Set ``section.field`` (or a top-level field) from strings, type-converted. Unknown names raise."""
    hints_top = typing.get_type_hints(Config)
    for key, value in overrides.items():
        if key in RENAMED:
            raise ValueError(f"config field {key!r} was renamed to {RENAMED[key]!r}")
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
            v = {RENAMED.get(f"{k}.{f}", f"{k}.{f}").split(".")[1]: x for f, x in v.items()}
            setattr(c, k, type(cur)(**v))
        else:
            setattr(c, k, v)
    return c


# --------------------------------------------------------------------------- validation and arithmetic
def validate(cfg: Config, num_processes: int = 1) -> None:
    """Fail fast with a ``ValueError`` naming the offending field (:func:`t2i.validation.validate`)."""
    from .validation import validate as _validate

    _validate(cfg, num_processes)


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


from .presets import PRESETS, get_preset  # noqa: E402  (presets build Config objects)


def method_config(cfg: Config) -> MethodConfig:
    """The method part of an image config (``train.*`` fields of the same names, ``value.loss`` / ``value.coef``)."""
    coef = cfg.value.coef if cfg.value.fit == "joint" else 0.0  # "separate": fitted by the task's critic phase
    return MethodConfig.take(cfg.train, value_loss=cfg.value.loss, value_coef=coef)
