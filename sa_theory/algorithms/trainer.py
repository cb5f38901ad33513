r"""The one trainer: the loop and the policy update that every model trains through, toy problems and images alike.

A :class:`Trainer` drives a *task*, the binding of one environment to the loop, which owns the models, the
optimiser, the counters, the checkpoints and the log. Two tasks exist: :class:`~.toy_task.ToyTask` (the toy
problems, one process) and ``t2i.task.ImageTask`` (diffusers pipelines with LoRA, under accelerate). The methods
(:mod:`.methods`) and the sampling loop (:func:`sa_theory.sampling.sample_chain`) are shared as well, so the
algorithm that runs on Stable Diffusion is, line for line, the one the toy convergence tests verify.

One iteration (:meth:`Trainer.train_iteration`):

1. ``task.rollouts() -> (batch, generator, metrics)``: a rollout batch of the current policy sampled by the one
   sampling loop, from a generator that depends on ``(seed, iteration[, process])`` alone (exact resume), with
   its rewards checked (shape ``(B,)``, no NaN/Inf; errors name the reward). Every path is one reward query;
2. ``task.prepare(batch, generator) -> (method, rollout_batch, plan, metrics)``: the method on this batch with its
   advantages (the critic phase, a baseline, per-prompt or group normalisation) and the :class:`UpdatePlan`;
3. :meth:`Trainer.update`: the policy update the plan describes;
4. ``task.record(batch, metrics, updated) -> dict``: the iteration's log record, in one namespace for every task:
   ``epoch`` (0-based), ``queries``, the rollout statistics of :func:`~.loop_utils.rollout_metrics`
   (``reward_mean``, ``path_kl_mean``, ``objective_mean`` and their ``_se``), ``beta``, ``lr``, the
   preparation's metrics (``value_loss`` of a critic phase, ...), the update's diagnostics under ``train/``
   (``train/grad_norm``, ``train/actor_loss``, ``train/kl_to_old``, ...) and its counters (``updates``,
   ``early_stopped``, ``logprob_parity_max``).

:meth:`Trainer.train` repeats it up to ``task.total_iterations`` with ``task.end_iteration`` (counters, log,
checkpoint) after each. On SIGINT/SIGTERM (on any process) the current iteration finishes, a checkpoint is written
and :class:`~.checkpoint.TrainingInterrupted` says how to resume; a resumed run repeats exactly what the
uninterrupted run would have done.

The task also provides the runtime of the update: ``backward(loss)``, ``no_sync()`` (a context without gradient
synchronisation between processes), ``autocast()``, ``optimizer_step() -> dict`` (clip, step, LR schedule, zero
grads), ``reduce(value, op)`` (``'mean'`` / ``'max'`` over processes) and ``any_process(flag)``. Attributes the
trainer lacks are the task's (``trainer.policy``, ``trainer.evaluate``, ``trainer.pipe``, ...); setting one sets the
task's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .checkpoint import GracefulInterrupt, TrainingInterrupted
from .loop_utils import COUNTS

__all__ = ["Trainer", "UpdatePlan"]


@dataclass(frozen=True)
class UpdatePlan:
    """How :meth:`Trainer.update` passes over one rollout batch.

    num_inner_epochs: passes over the batch.
    minibatch_size: paths per minibatch; the batch is split in order, or in a fresh random order per pass with
        ``shuffle``.
    gradient_accumulation_steps: minibatches per optimizer update (each minibatch's loss is divided by the group's
        size, so an update's gradient is the mean over its minibatches).
    live_steps: the trainable steps (the stochastic ones: a deterministic step has no log-prob and no KL).
    steps_per_minibatch: how many of them each minibatch trains on, a random subset drawn per minibatch (the draw
        is made even when all are used, so the random stream does not depend on the fraction); the loss is the
        method's sum over the subset times ``steps_scale = len(live_steps) / steps_per_minibatch`` (unbiased).
    steps_per_backward: steps per backward pass (1: one step's batch per denoiser forward, the least memory; 0: all
        of a minibatch's steps in one batched evaluation, the toys' choice and, through an image environment's
        ``grid_actions``, one denoiser forward on the stacked steps: the image config's ``train.steps_per_backward``).
    early_stop_path_kl: > 0: stop the iteration's updates once an update's mean ``kl_to_old`` diagnostic (over
        processes) exceeds it (``sa_ac``'s trust region as an early stop).
    """

    num_inner_epochs: int
    minibatch_size: int
    gradient_accumulation_steps: int
    live_steps: tuple[int, ...]
    steps_per_minibatch: int
    steps_per_backward: int = 0
    shuffle: bool = False
    early_stop_path_kl: float = 0.0

    def __post_init__(self):
        for name in ("num_inner_epochs", "minibatch_size", "gradient_accumulation_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UpdatePlan.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.live_steps:
            raise ValueError("UpdatePlan.live_steps is empty: no step is stochastic, so nothing can be trained")
        if self.steps_per_backward < 0:
            raise ValueError(f"UpdatePlan.steps_per_backward must be >= 0 (0: all at once), got "
                             f"{self.steps_per_backward!r}")


class Trainer:
    """The one training loop (module docstring). ``Trainer(task).train()``; tasks are built by
    :func:`sa_theory.algorithms.make_trainer` (toys) and ``t2i.trainer.make_trainer`` (images)."""

    def __init__(self, task):
        object.__setattr__(self, "task", task)

    def __getattr__(self, name):  # only called when the trainer itself lacks ``name``
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)

    def __setattr__(self, name, value):
        setattr(self.task, name, value)

    def __repr__(self) -> str:
        return f"Trainer({type(self.task).__name__}, iteration {self.task.iteration}/{self.task.total_iterations})"

    # ------------------------------------------------------------------ one iteration
    def train_iteration(self) -> dict:
        """Collect, prepare, update (module docstring, steps 1-4); returns the record (counters are advanced by
        :meth:`train`'s ``task.end_iteration``)."""
        task = self.task
        batch, generator, metrics = task.rollouts()
        method, rb, plan, prepared = task.prepare(batch, generator)
        updated = self.update(method, rb, plan, generator)
        updated = {k if k in COUNTS else f"train/{k}": v for k, v in updated.items()}
        return task.record(batch, {**metrics, **prepared}, updated)

    def update(self, method, batch, plan: UpdatePlan, generator: torch.Generator) -> dict:
        """The policy update of ``plan`` on the :class:`~.rl_batch.RolloutBatch` ``batch`` with ``method``'s losses.

        Returns the means over optimizer updates of the method's diagnostics and of ``task.optimizer_step``'s
        (e.g. ``grad_norm``), ``updates``, ``early_stopped`` and ``logprob_parity_max`` (the largest
        ``|log pi_theta - log pi_old|`` while theta is still the sampling policy; float noise if sampling and
        training agree)."""
        task = self.task
        live, n = list(plan.live_steps), plan.steps_per_minibatch
        if not 1 <= n <= len(live):
            raise ValueError(f"steps_per_minibatch ({n}) must be in 1..{len(live)} (the trainable steps)")
        method.steps_scale = len(live) / n
        B = batch.batch_size
        sums: dict[str, float] = {}
        n_updates, stopped, parity = 0, False, 0.0
        for epoch in range(plan.num_inner_epochs):
            order = torch.randperm(B, generator=generator) if plan.shuffle else torch.arange(B)
            minibatches = list(order.split(plan.minibatch_size))
            for u in range(0, len(minibatches), plan.gradient_accumulation_steps):
                group = minibatches[u:u + plan.gradient_accumulation_steps]
                steps = [sorted(live[j] for j in torch.randperm(len(live), generator=generator)[:n].tolist())
                         for _ in group]
                per = plan.steps_per_backward or n
                n_back = sum(-(-len(ks) // per) for ks in steps)
                i_back, upd = 0, {}
                for idx, ks in zip(group, steps):
                    sub = batch.select(idx)
                    for i in range(0, len(ks), per):
                        i_back += 1
                        with contextlib.nullcontext() if i_back == n_back else task.no_sync():
                            with task.autocast():
                                out = method.losses(sub, ks[i:i + per])
                            if n_updates == 0 and epoch == 0:  # still the sampling policy
                                parity = max(parity, method.logprob_delta())
                            task.backward(out["loss"] / len(group))
                        for name, v in out.items():
                            upd[name] = upd.get(name, 0.0) + float(v.detach()) / len(group)
                upd.update(task.optimizer_step())
                n_updates += 1
                for name, v in upd.items():
                    sums[name] = sums.get(name, 0.0) + v
                if plan.early_stop_path_kl > 0 and task.reduce(upd.get("kl_to_old", 0.0), "mean") \
                        > plan.early_stop_path_kl:
                    stopped = True
                    break
            if stopped:
                break
        out = {name: v / max(1, n_updates) for name, v in sums.items()}
        return {**out, "updates": n_updates, "early_stopped": stopped,
                "logprob_parity_max": task.reduce(parity, "max")}

    # ------------------------------------------------------------------ the loop
    def train(self, until: int | None = None) -> list[dict]:
        """Run iterations ``task.iteration .. until`` (default: all); returns the task's metric history. On
        SIGINT/SIGTERM the current iteration finishes, every process writes the checkpoint and
        :class:`~.checkpoint.TrainingInterrupted` says how to resume."""
        task = self.task
        stop_at = task.begin_train(until)
        bar = task.progress_bar(stop_at, initial=task.iteration)
        with GracefulInterrupt() as interrupt:
            while task.iteration < stop_at:
                rec = self.train_iteration()
                stop = task.any_process(interrupt.requested)
                where = task.end_iteration(rec, stop_at, stop)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(task.postfix(rec))
                if stop and task.iteration < stop_at:
                    if bar is not None:
                        bar.close()
                    task.end_train(interrupted=True)
                    raise TrainingInterrupted(task.interrupt_message(interrupt.signame, where))
        if bar is not None:
            bar.close()
        return task.end_train()
