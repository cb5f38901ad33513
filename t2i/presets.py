"""Named presets (``sa-t2i train --config NAME``): Stable Diffusion 1.5 and 3.5-Medium settings per method, and tiny
CPU pipelines for tests and smoke runs. Each returns a fresh :class:`~t2i.config.Config`."""

from __future__ import annotations

from .config import SD35M, Config

__all__ = ["PRESETS", "get_preset"]


def _sd15(method: str) -> Config:
    c = Config()
    c.train.method = method
    c.sample.batch_size, c.sample.num_batches_per_epoch = 8, 4
    c.train.batch_size, c.train.gradient_accumulation_steps = 4, 2
    c.train.learning_rate = 3e-4
    c.log.output_dir = f"runs/sd15_{method}"
    if method == "sa_ac":
        c.train.beta, c.train.kl_penalty, c.train.early_stop_path_kl = 0.01, 1.0, 5.0
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


def _sd35m(method: str) -> Config:
    c = Config()
    c.model.pretrained, c.model.family, c.model.mixed_precision = SD35M, "sd3", "bf16"
    c.model.lora_rank, c.model.lora_alpha = 32, 64.0
    c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale = "flow", 10, 4.5
    c.sample.resolution = 512  # Flow-GRPO's training resolution (the model's native size is 1024)
    c.sample.batch_size, c.sample.num_batches_per_epoch, c.sample.group_size = 8, 4, 8
    c.sample.eval_sampler, c.sample.eval_num_steps = "flow", 40
    c.train.method, c.train.batch_size, c.train.gradient_accumulation_steps = method, 4, 2
    c.train.learning_rate = 1e-4
    c.log.output_dir = f"runs/sd35m_{method}"
    if method == "flow_grpo":  # Flow-GRPO's published settings, in its own units
        c.sample.flow_noise, c.sample.flow_noise_value, c.sample.flow_at_one = "flow_grpo", 0.7, "clamp"
        c.train.beta, c.train.clip_range, c.train.logprob_units = 0.04, 1e-4, "mean"
        c.value.kind = "none"
    else:  # sa_ac: the standard reverse SDE (eta = 1), continuous-time KL, path-KL trust region
        c.train.beta, c.train.kl_penalty = 0.01, 1.0
        c.value.kind = "residual"
    return c


def _tiny_flow_cpu() -> Config:
    c = _tiny_cpu()
    c.model.pretrained, c.model.family = "tiny_sd3", "sd3"
    c.sample.sampler, c.sample.eval_sampler, c.sample.num_steps, c.sample.eval_num_steps = "flow", "flow", 6, 6
    c.log.output_dir = "runs/tiny_flow_cpu"
    return c


PRESETS = {
    "sd15_sa_ac": lambda: _sd15("sa_ac"),
    "sd15_ddpo_is": lambda: _sd15("ddpo_is"),
    "sd15_dpok": lambda: _sd15("dpok"),
    "tiny_cpu": _tiny_cpu,
    "sd35m_sa_ac": lambda: _sd35m("sa_ac"),
    "sd35m_flow_grpo": lambda: _sd35m("flow_grpo"),
    "tiny_flow_cpu": _tiny_flow_cpu,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
