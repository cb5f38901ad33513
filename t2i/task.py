"""Image pipelines as a task of the one :class:`sa_theory.algorithms.Trainer`, with accelerate data parallelism and
exact resume (build it with :func:`t2i.trainer.make_trainer`).

Per epoch (the trainer's iteration), on every process: sample ``sample.num_batches_per_epoch`` rollouts (policy =
LoRA UNet, recording latents, log-probs and the pretrained model's actions), decode, reward (a NaN/Inf reward raises
``FloatingPointError`` naming the reward), per-prompt normalisation over all processes' rewards (optional),
``method.prepare`` (value baseline, advantages), then the trainer's update (:class:`~sa_theory.algorithms.UpdatePlan`):
``num_inner_epochs`` passes of shuffled minibatch updates, one backward pass per (minibatch, step) -- one UNet
forward per backward, which is what DDP requires -- with gradient synchronisation only on the last backward of each
optimizer update (``accelerator.no_sync``).

Randomness is a pure function of ``(train.seed, epoch, process index)`` (one ``torch.Generator`` per epoch),
so a resumed run repeats exactly what the uninterrupted run would have done.

Checkpoints (``log.output_dir/checkpoints/checkpoint-EEEEEE``) are written by **every** rank through
``accelerator.save_state`` (rank-0-only saving deadlocks) into a temporary folder that rank 0 then checksums
(``checksums.sha256``) and renames; ``checkpoints/latest`` is a pointer file replaced atomically. A checkpoint
holds the diffusers-loadable LoRA (``pytorch_lora_weights.safetensors``), the peft LoRA and value model
(safetensors), optimizer, LR scheduler, RNG states, trainer state (epoch, step, per-prompt statistics) and
``config.json``. Run folders and resume (:mod:`t2i.checkpointing`): a fresh run refuses a folder that holds a run
unless ``log.overwrite``; a resume is refused, before any model is built, when the checkpoint's config differs in
a field outside :data:`~t2i.config.RESUME_MUTABLE` (allowed changes are applied and reported); a damaged latest
checkpoint falls back to the newest intact one. SIGINT/SIGTERM: the current epoch finishes, every rank agrees
(one all-reduce per epoch), a checkpoint is written and :class:`~sa_theory.algorithms.TrainingInterrupted` says
how to resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time

import torch
import torch.nn.functional as F

from sa_theory.algorithms.checkpoint import atomic_write_json
from sa_theory.algorithms.loop_utils import lr_lambda, rollout_metrics
from sa_theory.algorithms.method_base import ValueFitting
from sa_theory.algorithms.methods import make_method
from sa_theory.algorithms.trainer import Trainer, UpdatePlan
from sa_theory.sde import check_reward

from .checkpointing import (  # noqa: F401  (lora_hash, resolve_checkpoint, ...: re-exported)
    CheckpointMixin,
    build_pipeline,
    guard_run_dir,
    has_checkpoint,
    load_policy_from_checkpoint,
    lora_hash,
    resolve_checkpoint,
    resolve_intact_checkpoint,
)
from .config import Config, config_to_dict, format_arithmetic, method_config, validate
from .environments import make_environment
from .logging_utils import RunLogger
from .models import add_lora, denoiser, lora_parameters, lora_targets, pretrained
from .reward_stats import PerPromptStatTracker, diversity, group_normalize
from .rewards import make_reward
from .rollout import RolloutBatch, sample_rollout
from .values import make_value_model, tweedie_rewards

__all__ = ["ImageTask", "TrainerState", "resolve_checkpoint", "lora_hash", "load_policy_from_checkpoint"]


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


class ImageTask(CheckpointMixin):
    """An image pipeline bound to the one trainer (module docstring); ``accelerator`` may be passed in (tests)."""

    def __init__(self, cfg: Config, accelerator=None):
        from .distributed import make_accelerator, pipeline_device, place_pipeline

        self.cfg = cfg
        # cpu=True without CUDA (under `accelerate launch --multi_gpu` on a CPU machine: MULTI_CPU/gloo); FSDP2 when
        # launched with an FSDP config (configs/accelerate_fsdp.yaml), on GPUs and on CPU (t2i.distributed)
        self.acc = accelerator or make_accelerator(cfg)
        validate(cfg, self.acc.num_processes)
        acc = self.acc
        self.resume_hint: str | None = None  # printed after an interrupt (the CLI sets its command line)
        self._resume_ckpt, resume_notes = self._check_resume_target(cfg)  # before any model is built
        guard_run_dir(cfg, self._resume_ckpt is not None, acc.is_main_process)
        acc.wait_for_everyone()
        if cfg.model.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            cfg.model.mixed_precision
        ]
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.pipe = build_pipeline(cfg, pipeline_device(acc), self.weight_dtype)  # FSDP: on CPU, then
        place_pipeline(self.pipe, acc)  # all but the denoiser to acc.device (prepare moves the denoiser's shards)
        unet = denoiser(self.pipe)  # the UNet, or the SD3 transformer
        add_lora(unet, cfg.model.lora_rank, cfg.model.lora_alpha, targets=lora_targets(self.pipe),
                 init_seed=cfg.train.seed)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.reward = make_reward(cfg.reward.name, cfg.reward.clip_path, cfg.reward.weights_path).to(
            acc.device
        )
        self.env = make_environment(self.pipe, cfg.sample, lora_uncond=cfg.model.lora_uncond)
        self.kernel = self.env.kernel
        text_dim = self.env.text_dim
        torch.manual_seed(cfg.train.seed + 1)
        value = make_value_model(cfg.value.kind, unet.config.in_channels, text_dim, cfg.value.width)
        learned = value is not None and any(True for _ in value.parameters())
        groups = [{"params": lora_parameters(unet), "lr": cfg.train.learning_rate}]
        separate = learned and cfg.value.fit == "separate"  # the critic's own optimizer and phase (_fit_value)
        if learned:
            value.to(acc.device)
            if not separate:
                groups.append({"params": list(value.parameters()), "lr": cfg.value.learning_rate})
        t = cfg.train
        adamw = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
        opt = torch.optim.AdamW(groups, **adamw)
        # the toy trainers' LR multiplier: linear warm-up over lr_warmup_steps updates, then constant
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", 1, t.lr_warmup_steps))
        self.value_opt = None
        if separate:
            vopt = torch.optim.AdamW(value.parameters(), lr=cfg.value.learning_rate, **adamw)
            self.unet_ddp, self.value_ddp, self.opt, self.lr_sched, self.value_opt = acc.prepare(
                unet, value, opt, sched, vopt)
        elif learned:
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
        self.method = make_method(method_config(cfg), self.env, self.unet_ddp, self.value_ddp)
        if cfg.train.estimator == "value_gradient" and cfg.value.kind in ("tweedie", "residual") and getattr(
                self.reward, "differentiable", False):
            self.method.tweedie_fn = self._tweedie_reward
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
        if self._resume_ckpt is not None:
            for note in resume_notes:
                acc.print(note)
            self.resume(self._resume_ckpt)

    # ------------------------------------------------------------------ one epoch
    def _tweedie_reward(self, k: int, x: torch.Tensor, batch) -> torch.Tensor:
        r""":math:`r(\mathrm{decode}(\hat x_0))` at step ``k``'s state ``x`` with the pretrained prediction (``k = K``:
        :math:`r(\mathrm{decode}(x))`), differentiable in ``x`` (autograd through the frozen network)."""
        env = self.env
        if k < env.kernel.num_steps:
            with pretrained(env.model):
                x = env.x0_hat(k, x, env.action(k, x, batch.text))
        return self.reward(env.decode(x), batch.prompts).float()

    def sample_epoch(self, gen: torch.Generator) -> RolloutBatch:
        cfg, acc = self.cfg, self.acc
        denoiser(self.pipe).eval()
        batches = []
        for _ in range(cfg.sample.num_batches_per_epoch):
            G = cfg.sample.group_size  # images per prompt (1: independent prompts)
            idx = torch.randint(len(cfg.prompts), (cfg.sample.batch_size // G,), generator=gen).repeat_interleave(G)
            prompts = [cfg.prompts[i] for i in idx.tolist()]
            with acc.autocast():
                b = sample_rollout(self.env, prompts, gen,
                                   record_reference=self.method.needs_reference or cfg.log.reference_kl)
            with torch.no_grad():
                b.rewards = check_reward(self.reward(b.images, b.prompts), len(b.prompts),
                                         f"reward {cfg.reward.name!r}", "image").float()
            batches.append(b)
        return RolloutBatch.concat(batches)

    def _gather(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else self.acc.gather(x.detach().float().contiguous())

    def rollouts(self):
        """The trainer's step 1: the epoch's rollouts from the generator of ``(train.seed, epoch, process)`` and
        their statistics over all processes (reward, path KLs, pixel diversity)."""
        acc, t = self.acc, self.cfg.train
        self._t0 = time.time()
        gen = torch.Generator().manual_seed(_epoch_seed(t.seed, self.state.epoch, acc.process_index))
        batch = self.sample_epoch(gen)
        samples = len(batch.prompts) * acc.num_processes
        metrics: dict = {"epoch": self.state.epoch, "queries": (self.state.epoch + 1) * samples,
                         "time_sample_s": time.time() - self._t0}
        # every process's paths; no KL entries when not recorded (log.reference_kl false, a method without need)
        metrics.update(rollout_metrics(self._gather(batch.rewards), self._gather(batch.path_kl), t.beta,
                                       self._gather(batch.path_kl_ct)))
        metrics["beta"] = t.beta
        feats = F.interpolate(batch.images, size=(32, 32), mode="area").flatten(1)
        div, _ = diversity(feats, batch.prompts)
        metrics["diversity_pixels"] = float(acc.gather(torch.tensor([div], device=acc.device)).nanmean())
        return batch, gen, metrics

    def prepare(self, batch: RolloutBatch, gen: torch.Generator):
        """The trainer's step 2: the returns (``ddpo_*``: R - beta * sampled log-ratio), normalised per prompt or per
        group over all processes (optional; always for DDPO and Flow-GRPO), the Tweedie value inputs, the method's
        ``prepare`` and the :class:`UpdatePlan` (shuffled minibatches of ``train.batch_size``, one step per
        backward pass, ``timestep_fraction`` of the stochastic steps per minibatch)."""
        cfg, acc, t = self.cfg, self.acc, self.cfg.train
        rewards = self.method.path_return(batch, batch.rewards)
        if t.per_prompt_norm or t.method in ("ddpo_is", "ddpo_sf", "flow_grpo"):
            all_r = acc.gather(rewards.contiguous())
            from accelerate.utils import gather_object

            all_p = gather_object(batch.prompts) if acc.num_processes > 1 else batch.prompts
            if t.method == "flow_grpo":  # advantages within each prompt's group of this epoch
                norm = group_normalize(all_p, all_r)
            else:
                norm = self.state.tracker.normalize(all_p, all_r)
            B = rewards.shape[0]
            rewards = norm[acc.process_index * B : (acc.process_index + 1) * B].to(rewards.device)
        if cfg.value.kind in ("tweedie", "residual"):
            with acc.autocast():
                ref = batch.ref_actions if batch.ref_actions is not None else batch.actions
                batch.step_data["tweedie"] = tweedie_rewards(
                    self.env, batch.latents, ref, self.reward, batch.prompts
                )
        # trainable steps: the stochastic ones (a deterministic step, e.g. a flow model's ODE step from t = 1,
        # has no log-prob and no KL); the sum over them is kept unbiased by steps_scale
        live = tuple(k for k in range(batch.num_steps) if self.kernel.stochastic[k])
        if self.value_opt is not None:  # value.fit = "separate": the method calls the phase once it has targets
            self.method.value_fitter = lambda method, b: self._fit_value(method, b, gen, live)
        metrics = self.method.prepare(batch, rewards)
        denoiser(self.pipe).train()
        plan = UpdatePlan(num_inner_epochs=t.num_inner_epochs, minibatch_size=t.batch_size,
                          gradient_accumulation_steps=t.gradient_accumulation_steps, live_steps=live,
                          steps_per_minibatch=max(1, int(round(len(live) * t.timestep_fraction))),
                          steps_per_backward=t.steps_per_backward, shuffle=True,
                          early_stop_path_kl=t.early_stop_path_kl if t.method == "sa_ac" else 0.0)
        return self.method, batch, plan, metrics

    def _fit_value(self, method, batch: RolloutBatch, gen: torch.Generator, live: tuple[int, ...]) -> dict:
        """``value.fit = "separate"``: ``value.epochs`` passes of critic updates over the epoch's samples before the
        advantages, through the one trainer's update (:class:`~sa_theory.algorithms.method_base.ValueFitting`:
        shuffled minibatches of ``train.batch_size``, ``gradient_accumulation_steps`` per update, every stochastic
        step, one value-model forward per backward) with the critic's own optimizer."""
        t = self.cfg.train
        plan = UpdatePlan(num_inner_epochs=self.cfg.value.epochs, minibatch_size=t.batch_size,
                          gradient_accumulation_steps=t.gradient_accumulation_steps, live_steps=live,
                          steps_per_minibatch=len(live), steps_per_backward=1, shuffle=True)
        out = Trainer(_ValueRuntime(self)).update(ValueFitting(method), batch, plan, gen)
        return {"value_loss": out["value_loss"], "value_updates": out["updates"]}

    # ------------------------------------------------------------------ the runtime of the update (accelerate)
    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def no_sync(self):
        """No gradient synchronisation of the denoiser (and the learned value model) in this backward."""
        stack = contextlib.ExitStack()
        for m in [self.unet_ddp] + ([self.value_ddp] if self.learned_value else []):
            stack.enter_context(self.acc.no_sync(m))
        return stack

    def autocast(self):
        return self.acc.autocast()

    def optimizer_step(self) -> dict:
        """Clip (``train.max_grad_norm`` > 0; the pre-clip norm is returned), step, LR schedule, zero grads."""
        out = {}
        if self.cfg.train.max_grad_norm > 0:
            params = [p for g in self.opt.param_groups for p in g["params"]]
            out["grad_norm"] = float(self.acc.clip_grad_norm_(params, self.cfg.train.max_grad_norm))
        self.opt.step()
        self.lr_sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.global_step += 1
        return out

    def reduce(self, value: float, op: str) -> float:
        return float(self.acc.reduce(torch.tensor([float(value)], device=self.acc.device), op))

    def any_process(self, flag: bool) -> bool:
        """``flag`` on any process (every rank must take the same branch: ``save_state`` is collective)."""
        if self.acc.num_processes == 1:
            return bool(flag)
        return self.reduce(float(flag), "sum") > 0

    # ------------------------------------------------------------------ records, the loop's hooks
    def record(self, batch: RolloutBatch, metrics: dict, updated: dict) -> dict:
        """The epoch's record: the rollout statistics, the method's ``prepare`` metrics, the update's means under
        ``train/``, counters and times."""
        cfg = self.cfg
        metrics.update(updated)
        metrics.update({"global_step": self.state.global_step, "lr": self.lr_sched.get_last_lr()[0],
                        "time_epoch_s": time.time() - self._t0})
        if cfg.log.image_every and self.state.epoch % cfg.log.image_every == 0:
            self.logger.images(batch.images[:16], f"epoch_{self.state.epoch:06d}")
        return metrics

    @property
    def iteration(self) -> int:
        """Epochs done (the trainer's iterations)."""
        return self.state.epoch

    @property
    def total_iterations(self) -> int:
        return self.cfg.train.num_epochs

    def begin_train(self, until: int | None) -> int:
        cfg = self.cfg
        if cfg.log.progress:  # quiet runs (experiments, benchmarks) skip the batch arithmetic too
            self.acc.print(format_arithmetic(cfg, self.acc.num_processes))
        return cfg.train.num_epochs if until is None else min(until, cfg.train.num_epochs)

    def progress_bar(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="epochs",
                    disable=not (self.acc.is_main_process and self.cfg.log.progress))

    def postfix(self, rec: dict) -> dict:
        return {"reward": f"{rec['reward_mean']:.3g}", "kl": f"{rec.get('path_kl_mean', float('nan')):.3g}"}

    def end_iteration(self, rec: dict, stop_at: int, stop: bool) -> str | None:
        """Advance the epoch, log ``rec``; every rank writes a checkpoint at the end, on a stop and every
        ``log.save_every`` epochs. Returns the checkpoint folder (or None)."""
        self.state.epoch += 1
        self.history.append(rec)
        self.logger.log(rec, self.state.global_step)
        every = self.cfg.log.save_every
        if self.state.epoch == self.cfg.train.num_epochs or stop or (every and self.state.epoch % every == 0):
            return self.save_checkpoint()
        return None

    def end_train(self, interrupted: bool = False) -> list[dict]:
        """Close the logger; after a complete run, write ``summary.json`` (main process)."""
        self.logger.close()
        if not interrupted and self.acc.is_main_process:
            atomic_write_json(os.path.join(self.cfg.log.output_dir, "summary.json"), self.summary())
        return self.history

    def interrupt_message(self, signame: str | None, where: str | None) -> str:
        cfg = self.cfg
        hint = self.resume_hint or f"resume_from='auto' with log.output_dir={cfg.log.output_dir!r}"
        return (f"{signame or 'signal on another rank'}: stopped after epoch {self.state.epoch}/"
                f"{cfg.train.num_epochs}; checkpoint written to {where!r}. To continue: {hint}")


class _ValueRuntime:
    """The runtime of the separate critic phase: the task's, with the value model's own optimizer (clipped to
    ``train.max_grad_norm``) and gradient sync."""

    def __init__(self, task: ImageTask):
        self.task = task

    def backward(self, loss: torch.Tensor) -> None:
        self.task.acc.backward(loss)

    def no_sync(self):
        return self.task.acc.no_sync(self.task.value_ddp)

    def autocast(self):
        return self.task.acc.autocast()

    def optimizer_step(self) -> dict:
        task, out = self.task, {}
        if task.cfg.train.max_grad_norm > 0:
            out["value_grad_norm"] = float(task.acc.clip_grad_norm_(task.value.parameters(),
                                                                    task.cfg.train.max_grad_norm))
        task.value_opt.step()
        task.value_opt.zero_grad(set_to_none=True)
        return out

    def reduce(self, value: float, op: str) -> float:
        return self.task.reduce(value, op)
