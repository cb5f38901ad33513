"""Validation of an image-training :class:`~t2i.config.Config`: every check raises ``ValueError`` naming the
field (``section.field: ...``), before any model is built (paths included: an ``log.output_dir`` that is a file or
not writable fails here)."""

from __future__ import annotations

import math
import os

from .config import METHODS, Config

__all__ = ["validate", "check_output_dir"]


def check_output_dir(cfg: Config) -> None:
    """``log.output_dir`` must be a folder (or creatable below a writable folder)."""
    out = cfg.log.output_dir
    if not out:
        raise ValueError("log.output_dir: must be a folder path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"log.output_dir: {out!r} is a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"log.output_dir: {out!r} cannot be created ({parent!r} is not a writable folder)")


def _validate_flow(cfg: Config, need) -> None:
    """Model family, flow sampler and Flow-GRPO fields."""
    from .scheduling import FLOW_NOISE_KINDS

    s, t, m = cfg.sample, cfg.train, cfg.model
    need(m.family in ("sd", "sd3"), f"model.family: {m.family!r} must be 'sd' or 'sd3'")
    tiny_sd3 = m.pretrained in ("tiny_sd3", "tiny_sd3_pixel")
    flow = m.family == "sd3" or tiny_sd3
    need(m.family == "sd3" or not tiny_sd3, f"model.family: pretrained={m.pretrained!r} is an SD3-class model "
         f"(family 'sd3'), got {m.family!r}")
    need(flow == (s.sampler == "flow"), f"sample.sampler: {s.sampler!r} does not fit model.family={m.family!r} "
         "('flow' for sd3, 'ddim' or 'ddpm' for sd)")
    need(flow == (s.eval_sampler == "flow"), f"sample.eval_sampler: {s.eval_sampler!r} does not fit "
         f"model.family={m.family!r} ('flow' for sd3; a UNet sampler for sd)")
    need(s.flow_noise in FLOW_NOISE_KINDS, f"sample.flow_noise: {s.flow_noise!r} must be one of {FLOW_NOISE_KINDS}")
    need(math.isfinite(s.flow_noise_value) and s.flow_noise_value >= 0,
         f"sample.flow_noise_value: must be finite and >= 0 (got {s.flow_noise_value})")
    need(not flow or s.flow_noise_value > 0,
         "sample.flow_noise_value: must be > 0 for training (a deterministic step has no log-prob)")
    need(s.flow_at_one in ("ode", "clamp"), f"sample.flow_at_one: {s.flow_at_one!r} must be 'ode' or 'clamp'")
    need(s.group_size >= 1 and s.batch_size % s.group_size == 0,
         f"sample.group_size: must be >= 1 and divide sample.batch_size ({s.batch_size}), got {s.group_size}")
    need(t.method != "flow_grpo" or s.group_size >= 2,
         f"sample.group_size: flow_grpo normalises rewards within groups of images of one prompt: need >= 2 "
         f"(got {s.group_size})")
    need(t.logprob_units in ("sum", "mean"), f"train.logprob_units: {t.logprob_units!r} must be 'sum' or 'mean'")


def validate(cfg: Config, num_processes: int = 1) -> None:
    """Fail fast with a message naming the offending field (no-op and contradictory settings included)."""
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
    _validate_flow(cfg, need)
    need(
        s.eval_sampler in SAMPLERS + ("flow",),
        f"sample.eval_sampler: unknown sampler {s.eval_sampler!r}; choose one of {SAMPLERS + ('flow',)}",
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
    ga = t.gradient_accumulation_steps
    need(ga >= 1, f"train.gradient_accumulation_steps: must be >= 1 (got {ga})")
    need(
        n_mb % t.gradient_accumulation_steps == 0,
        f"train.gradient_accumulation_steps: minibatches per epoch per process ({n_mb}) must be divisible by "
        f"train.gradient_accumulation_steps ({t.gradient_accumulation_steps})",
    )
    for name in ("beta", "kl_penalty", "early_stop_path_kl", "learning_rate", "max_grad_norm", "adv_clip_max"):
        val = getattr(t, name)
        need(math.isfinite(val) and val >= 0, f"train.{name}: must be finite and >= 0 (got {val})")
    need(t.clip_range > 0, f"train.clip_range: must be > 0 (got {t.clip_range})")
    need(0 < t.ratio_clamp, f"train.ratio_clamp: must be > 0 (got {t.ratio_clamp})")
    need(
        0 < t.timestep_fraction <= 1,
        f"train.timestep_fraction: must be in (0, 1] (got {t.timestep_fraction})",
    )
    need(t.advantage in ("value", "td"), f"train.advantage: {t.advantage!r} must be 'value' or 'td'")
    need(t.estimator in ("likelihood_ratio", "value_gradient"),
         f"train.estimator: {t.estimator!r} must be 'likelihood_ratio' or 'value_gradient'")
    need(t.estimator != "value_gradient" or cfg.value.kind in ("critic", "residual"),
         f"value.kind: train.estimator='value_gradient' needs a learned critic ('critic' or 'residual'), "
         f"got {cfg.value.kind!r}")
    need(
        t.kl_weighting in ("continuous", "chain"),
        f"train.kl_weighting: {t.kl_weighting!r} must be 'continuous' or 'chain'",
    )
    for name in ("num_epochs", "num_inner_epochs", "gradient_accumulation_steps", "stat_buffer_size", "stat_min_count"):
        need(getattr(t, name) >= 1, f"train.{name}: must be >= 1 (got {getattr(t, name)}; 0 makes training a no-op)")
    need(t.lr_warmup_steps >= 0, f"train.lr_warmup_steps: must be >= 0 (got {t.lr_warmup_steps})")
    need(isinstance(t.steps_per_backward, int) and not isinstance(t.steps_per_backward, bool)
         and t.steps_per_backward >= 0,
         f"train.steps_per_backward: must be an integer >= 0 (0: all of a minibatch's trained steps in one pass; "
         f"got {t.steps_per_backward!r})")
    need(t.learning_rate > 0, f"train.learning_rate: must be > 0 (got {t.learning_rate})")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(t, name) < 1, f"train.{name}: must be in [0, 1) (got {getattr(t, name)})")
    need(math.isfinite(t.adam_epsilon) and t.adam_epsilon > 0, f"train.adam_epsilon: must be > 0 ({t.adam_epsilon})")
    need(math.isfinite(s.guidance_scale) and s.guidance_scale >= 0,
         f"sample.guidance_scale: must be finite and >= 0 (got {s.guidance_scale})")
    need(math.isfinite(s.eta) and s.eta >= 0, f"sample.eta: must be finite and >= 0 (got {s.eta})")
    for name in ("eval_num_steps", "eval_num_images"):
        need(getattr(s, name) >= 1, f"sample.{name}: must be >= 1 (got {getattr(s, name)})")
    vlr = v.learning_rate
    need(math.isfinite(vlr) and vlr > 0, f"value.learning_rate: must be > 0 (got {vlr})")
    need(v.width >= 1, f"value.width: must be >= 1 (got {v.width})")
    need(math.isfinite(v.coef) and v.coef >= 0, f"value.coef: must be finite and >= 0 (got {v.coef})")
    need(m.lora_alpha > 0, f"model.lora_alpha: must be > 0 (got {m.lora_alpha})")
    lg = cfg.log
    for name in ("save_every", "image_every"):
        need(getattr(lg, name) >= 0, f"log.{name}: must be >= 0 (got {getattr(lg, name)})")
    need(lg.keep_last >= 1, f"log.keep_last: must be >= 1 (got {lg.keep_last})")
    need(all(isinstance(p, str) and p.strip() for p in cfg.prompts), "prompts: every prompt must be a non-empty string")
    check_output_dir(cfg)
    need(v.kind in VALUE_KINDS, f"value.kind: unknown value design {v.kind!r}; choose one of {VALUE_KINDS}")
    need(v.loss in ("mc", "td"), f"value.loss: {v.loss!r} must be 'mc' or 'td'")
    need(v.fit in ("joint", "separate"), f"value.fit: {v.fit!r} must be 'joint' or 'separate'")
    need(v.epochs >= 1, f"value.epochs: must be >= 1 (got {v.epochs})")
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
    local = m.pretrained.startswith(("/", "./", "../", "~")) or os.path.isabs(m.pretrained)
    need(not local or os.path.isdir(os.path.expanduser(m.pretrained)),
         f"model.pretrained: {m.pretrained!r} is not a folder (give a local pipeline folder or a Hub id)")
    need(m.lora_rank >= 1, f"model.lora_rank: must be >= 1 (got {m.lora_rank})")
    need(isinstance(m.lora_uncond, bool), f"model.lora_uncond: must be true or false (got {m.lora_uncond!r})")
    need(len(cfg.prompts) >= 1, "prompts: need at least one prompt")
