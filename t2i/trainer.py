"""The training loop (one class for every method), with accelerate data parallelism and exact resume.

Per epoch, on every process: sample ``sample.num_batches_per_epoch`` rollouts (policy = LoRA UNet, recording
latents, log-probs and the pretrained model's actions), decode, reward (a NaN/Inf reward raises
``FloatingPointError`` naming the reward), per-prompt normalisation over all processes' rewards (optional),
``method.prepare`` (value baseline, advantages), then ``num_inner_epochs`` passes of minibatch updates: one
backward pass per (minibatch, step) -- one UNet forward per backward, which is what DDP requires -- with
gradient synchronisation only on the last backward of each optimizer update (``accelerator.no_sync``).

Randomness is a pure function of ``(train.seed, epoch, process index)`` (one ``torch.Generator`` per epoch),
so a resumed run repeats exactly what the uninterrupted run would have done.

Checkpoints (``log.output_dir/checkpoints/checkpoint-EEEEEE``) are written by **every** rank through
``accelerator.save_state`` (rank-0-only saving deadlocks) into a temporary folder that rank 0 then renames;
``checkpoints/latest`` is a pointer file replaced atomically. A checkpoint holds the diffusers-loadable LoRA
(``pytorch_lora_weights.safetensors``), the peft LoRA and value model (safetensors), optimizer, LR scheduler,
RNG states, trainer state (epoch, step, per-prompt statistics) and ``config.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F

from .config import Config, config_to_dict, format_arithmetic, validate
from .logging_utils import RunLogger
from .methods import make_method
from .models import (
    PixelPipeline,
    add_lora,
    build_tiny_pipeline,
    load_pipeline,
    lora_parameters,
    lora_state_dict,
    save_lora,
)
from .rewards import PerPromptStatTracker, diversity, make_reward
from .rollout import RolloutBatch, sample_rollout
from .scheduling import make_kernel
from .values import make_value_model, tweedie_rewards

__all__ = ["Trainer", "TrainerState", "resolve_checkpoint", "lora_hash", "load_policy_from_checkpoint"]


class TrainerState:
    """Resumable counters: ``epoch`` (next epoch to run), ``global_step`` (optimizer updates), stat
    tracker."""

    def __init__(self, tracker: PerPromptStatTracker):
        self.epoch, self.global_step, self.tracker = 0, 0, tracker

    def state_dict(self):
        return {"epoch": self.epoch, "global_step": self.global_step, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, sd):
        self.epoch, self.global_step = int(sd["epoch"]), int(sd["global_step"])
        self.tracker.load_state_dict(sd["tracker"])


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    h = hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).hexdigest()
    return int(h[:15], 16)


def lora_hash(unet) -> str:
    """SHA-256 of the LoRA weights (sorted keys, float32 bytes): equal on all ranks iff weights are equal."""
    h = hashlib.sha256()
    for k, v in sorted(lora_state_dict(unet).items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run dir / checkpoints dir containing a ``latest`` pointer."""
    for cand in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(cand, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                return os.path.join(cand, f.read().strip())
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    raise FileNotFoundError(f"no checkpoint at {path!r} (expected a checkpoint folder or a 'latest' pointer)")


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_pipeline(cfg: Config, device, weight_dtype=torch.float32):
    if cfg.model.pretrained == "tiny":
        pipe = build_tiny_pipeline(cfg.model.tiny_seed)
    elif cfg.model.pretrained == "tiny_pixel":  # tiny UNet/text encoder, identity VAE (images respond)
        t = build_tiny_pipeline(cfg.model.tiny_seed)
        pipe = PixelPipeline(t.unet, t.text_encoder, t.tokenizer, t.scheduler)
    else:
        pipe = load_pipeline(cfg.model.pretrained, cfg.model.revision)
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.requires_grad_(False)
        m.to(device, dtype=weight_dtype)
    return pipe


class Trainer:
    """``Trainer(cfg).train()``; see the module docstring. ``accelerator`` may be passed in (tests)."""

    def __init__(self, cfg: Config, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        # cpu=True without CUDA: under `accelerate launch --multi_gpu` on a CPU machine this selects
        # MULTI_CPU/gloo
        self.acc = accelerator or Accelerator(
            mixed_precision=cfg.model.mixed_precision,
            cpu=not torch.cuda.is_available(),
            project_config=ProjectConfiguration(project_dir=cfg.log.output_dir),
        )
        validate(cfg, self.acc.num_processes)
        acc = self.acc
        if cfg.model.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            cfg.model.mixed_precision
        ]
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.pipe = build_pipeline(cfg, acc.device, self.weight_dtype)
        unet = self.pipe.unet
        add_lora(unet, cfg.model.lora_rank, cfg.model.lora_alpha, init_seed=cfg.train.seed)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.reward = make_reward(cfg.reward.name, cfg.reward.clip_path, cfg.reward.weights_path).to(
            acc.device
        )
        self.sampler, self.kernel = make_kernel(
            self.pipe.scheduler.config, cfg.sample.sampler, cfg.sample.num_steps, cfg.sample.eta
        )
        text_dim = self.pipe.text_encoder.config.hidden_size
        torch.manual_seed(cfg.train.seed + 1)
        value = make_value_model(cfg.value.kind, unet.config.in_channels, text_dim, cfg.value.width)
        learned = value is not None and any(True for _ in value.parameters())
        groups = [{"params": lora_parameters(unet), "lr": cfg.train.learning_rate}]
        if learned:
            value.to(acc.device)
            groups.append({"params": list(value.parameters()), "lr": cfg.value.learning_rate})
        t = cfg.train
        opt = torch.optim.AdamW(
            groups, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon
        )
        warm = max(1, t.lr_warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        if learned:
            self.unet_ddp, self.value_ddp, self.opt, self.lr_sched = acc.prepare(unet, value, opt, sched)
        else:
            self.unet_ddp, self.opt, self.lr_sched = acc.prepare(unet, opt, sched)
            self.value_ddp = value.to(acc.device) if value is not None else None
        self.value = value
        self.learned_value = learned
        self.state = TrainerState(PerPromptStatTracker(t.stat_buffer_size, t.stat_min_count))
        acc.register_for_checkpointing(self.state)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self.method = make_method(
            cfg,
            self.kernel,
            self.unet_ddp,
            self.value_ddp,
            self.pipe.scheduler.config.get("prediction_type", "epsilon"),
        )
        self.ckpt_root = os.path.join(cfg.log.output_dir, "checkpoints")
        self.logger = RunLogger(
            cfg.log.output_dir,
            acc.is_main_process,
            cfg.log.tensorboard,
            cfg.log.wandb,
            cfg.log.wandb_project,
            config_to_dict(cfg),
        )
        self.history: list[dict] = []
        if cfg.resume_from:
            self.resume(cfg.resume_from)

    # ------------------------------------------------------------------ checkpoint hooks
    def _save_hook(self, models, weights, output_dir):
        if self.acc.is_main_process:
            save_lora(self.pipe.unet, output_dir)
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(self.pipe.unet).items()},
                os.path.join(output_dir, "lora_peft.safetensors"),
            )
            if self.learned_value:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in self.value.state_dict().items()},
                    os.path.join(output_dir, "value_model.safetensors"),
                )
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        sd = load_file(os.path.join(input_dir, "lora_peft.safetensors"))
        res = set_peft_model_state_dict(self.pipe.unet, {k: v.to(self.acc.device) for k, v in sd.items()})
        if getattr(res, "unexpected_keys", None):
            raise RuntimeError(f"unexpected LoRA keys in checkpoint: {res.unexpected_keys[:5]}")
        if self.learned_value:
            self.value.load_state_dict(load_file(os.path.join(input_dir, "value_model.safetensors")))
        while models:
            models.pop()

    def save_checkpoint(self) -> str:
        """All ranks call this. Writes ``checkpoint-EEEEEE`` atomically and updates ``latest``."""
        acc = self.acc
        name = f"checkpoint-{self.state.epoch:06d}"
        final, tmp = os.path.join(self.ckpt_root, name), os.path.join(self.ckpt_root, f".tmp-{name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config_to_dict(self.cfg), f, indent=1)
            _atomic_write(
                os.path.join(tmp, "trainer_state.json"),
                json.dumps({"epoch": self.state.epoch, "global_step": self.state.global_step}),
            )
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _atomic_write(os.path.join(self.ckpt_root, "latest"), name)
            kept = sorted(d for d in os.listdir(self.ckpt_root) if d.startswith("checkpoint-"))
            for old in kept[: max(0, len(kept) - max(1, self.cfg.log.keep_last))]:
                shutil.rmtree(os.path.join(self.ckpt_root, old), ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, path: str) -> None:
        if path == "auto":
            try:
                path = resolve_checkpoint(self.cfg.log.output_dir)
            except FileNotFoundError:
                return
        ckpt = resolve_checkpoint(path)
        self.acc.load_state(ckpt)
        self.logger.truncate(self.state.epoch)
        self.acc.print(f"resumed from {ckpt} at epoch {self.state.epoch}, step {self.state.global_step}")

    # ------------------------------------------------------------------ one epoch
    def _check_reward(self, r: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(r).all():
            raise FloatingPointError(
                f"reward {self.cfg.reward.name!r} returned {(~torch.isfinite(r)).sum().item()} "
                f"non-finite (NaN/Inf) values"
            )
        return r.float()

    def sample_epoch(self, gen: torch.Generator) -> RolloutBatch:
        cfg, acc = self.cfg, self.acc
        self.pipe.unet.eval()
        batches = []
        for _ in range(cfg.sample.num_batches_per_epoch):
            idx = torch.randint(len(cfg.prompts), (cfg.sample.batch_size,), generator=gen)
            prompts = [cfg.prompts[i] for i in idx.tolist()]
            with acc.autocast():
                b = sample_rollout(
                    self.pipe,
                    self.kernel,
                    prompts,
                    cfg.sample.guidance_scale,
                    gen,
                    record_reference=True,
                    negative_prompt=cfg.sample.negative_prompt,
                    unet=self.pipe.unet,
                )
            with torch.no_grad():
                b.rewards = self._check_reward(self.reward(b.images, b.prompts))
            batches.append(b)
        return RolloutBatch.concat(batches)

    def _gather_stats(self, x: torch.Tensor) -> tuple[float, float]:
        g = self.acc.gather(x.detach().float().contiguous())
        return float(g.mean()), float(g.std() / math.sqrt(g.numel())) if g.numel() > 1 else float("nan")

    def train_epoch(self) -> dict:
        cfg, acc, t = self.cfg, self.acc, self.cfg.train
        epoch = self.state.epoch
        gen = torch.Generator().manual_seed(_epoch_seed(t.seed, epoch, acc.process_index))
        t0 = time.time()
        batch = self.sample_epoch(gen)
        t_sample = time.time() - t0
        metrics: dict = {"epoch": epoch}
        metrics["reward_mean"], metrics["reward_se"] = self._gather_stats(batch.rewards)
        metrics["path_kl_mean"], metrics["path_kl_se"] = self._gather_stats(batch.path_kl)
        feats = F.interpolate(batch.images, size=(32, 32), mode="area").flatten(1)
        div, _ = diversity(feats, batch.prompts)
        metrics["diversity_pixels"] = float(acc.gather(torch.tensor([div], device=acc.device)).nanmean())
        rewards = batch.rewards
        if t.per_prompt_norm or t.method in ("ddpo_is", "ddpo_sf"):
            all_r = acc.gather(rewards.contiguous())
            from accelerate.utils import gather_object

            all_p = gather_object(batch.prompts) if acc.num_processes > 1 else batch.prompts
            norm = self.state.tracker.normalize(all_p, all_r)
            B = rewards.shape[0]
            rewards = norm[acc.process_index * B : (acc.process_index + 1) * B].to(rewards.device)
        if cfg.value.kind in ("tweedie", "residual"):
            with acc.autocast():
                ref = batch.ref_eps if batch.ref_eps is not None else batch.eps
                batch.step_data["tweedie"] = tweedie_rewards(
                    self.pipe, self.kernel, batch.latents, ref, self.reward, batch.prompts
                )
        metrics.update(self.method.prepare(batch, rewards))
        # --- updates
        self.pipe.unet.train()
        K = batch.num_steps
        n_train = max(1, int(round(K * t.timestep_fraction)))
        self.method.steps_scale = K / n_train
        B = batch.batch_size
        accum, mb = t.gradient_accumulation_steps, t.batch_size
        sums: dict[str, float] = {}
        n_updates, stopped = 0, False
        models = [self.unet_ddp] + ([self.value_ddp] if self.learned_value else [])
        params = [p for g in self.opt.param_groups for p in g["params"]]
        for _inner in range(t.num_inner_epochs):
            perm = torch.randperm(B, generator=gen)
            minibatches = [perm[i : i + mb] for i in range(0, B, mb)]
            for u in range(0, len(minibatches), accum):
                group = minibatches[u : u + accum]
                steps_per_mb = [sorted(torch.randperm(K, generator=gen)[:n_train].tolist()) for _ in group]
                n_back = sum(len(s) for s in steps_per_mb)
                i_back = 0
                upd: dict[str, float] = {}
                for idx, steps in zip(group, steps_per_mb):
                    sub = batch.select(idx)
                    for k in steps:
                        i_back += 1
                        sync = i_back == n_back
                        with contextlib.ExitStack() as stack:
                            if not sync:
                                for m in models:
                                    stack.enter_context(acc.no_sync(m))
                            with acc.autocast():
                                out = self.method.losses(sub, [k])
                            acc.backward(out["loss"] / len(group))
                        for name, v in out.items():
                            upd[name] = upd.get(name, 0.0) + float(v.detach()) / len(group)
                if t.max_grad_norm > 0:
                    upd["grad_norm"] = float(acc.clip_grad_norm_(params, t.max_grad_norm))
                self.opt.step()
                self.lr_sched.step()
                self.opt.zero_grad(set_to_none=True)
                self.state.global_step += 1
                n_updates += 1
                for name, v in upd.items():
                    sums[name] = sums.get(name, 0.0) + v
                if t.method == "sa_ac" and t.max_path_kl > 0:
                    kl_old = acc.reduce(torch.tensor([upd.get("kl_to_old", 0.0)], device=acc.device), "mean")
                    if float(kl_old) > t.max_path_kl:
                        stopped = True
                        break
            if stopped:
                break
        for name, v in sums.items():
            metrics[f"train/{name}"] = v / max(1, n_updates)
        metrics.update(
            {
                "global_step": self.state.global_step,
                "updates": n_updates,
                "early_stopped": stopped,
                "lr": self.lr_sched.get_last_lr()[0],
                "time_sample_s": t_sample,
                "time_epoch_s": time.time() - t0,
            }
        )
        if cfg.log.image_every and epoch % cfg.log.image_every == 0:
            self.logger.images(batch.images[:16], f"epoch_{epoch:06d}")
        return metrics

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.acc
        acc.print(format_arithmetic(cfg, acc.num_processes))
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.train.num_epochs,
                initial=self.state.epoch,
                disable=not (acc.is_main_process and cfg.log.progress),
                desc="epochs",
            )
        except ImportError:  # pragma: no cover
            bar = None
        while self.state.epoch < cfg.train.num_epochs:
            m = self.train_epoch()
            self.state.epoch += 1
            self.history.append(m)
            self.logger.log(m, self.state.global_step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward_mean']:.3g}", kl=f"{m['path_kl_mean']:.3g}")
            last = self.state.epoch == cfg.train.num_epochs
            if last or (cfg.log.save_every and self.state.epoch % cfg.log.save_every == 0):
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.logger.close()
        return self.history


def load_policy_from_checkpoint(checkpoint: str, device="cpu", overrides: dict | None = None):
    """Rebuild ``(cfg, pipe)`` from a checkpoint folder (or run dir) with its LoRA loaded (fp32)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .config import apply_overrides, config_from_dict

    ckpt = resolve_checkpoint(checkpoint)
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = config_from_dict(json.load(f))
    cfg.resume_from = None
    if overrides:
        apply_overrides(cfg, overrides)
    torch.manual_seed(cfg.train.seed)
    pipe = build_pipeline(cfg, device)
    add_lora(pipe.unet, cfg.model.lora_rank, cfg.model.lora_alpha, init_seed=cfg.train.seed)
    set_peft_model_state_dict(pipe.unet, load_file(os.path.join(ckpt, "lora_peft.safetensors")))
    pipe.unet.eval()
    return cfg, pipe
