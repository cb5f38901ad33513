r"""The toy problems as a task of the one :class:`~.trainer.Trainer`: rollouts, the critic phase, schedules, logging,
checkpoints, evaluation.

One task for every method (``cfg.algo``): the losses are the shared methods (:mod:`.methods`, the ones images
train with) on the Euler kernel of the toy's SDE (:class:`~.step_env.ToyStepEnvironment`); what differs per method
is the critic phase (:mod:`.critics`) and the options. An iteration ``i`` of the trainer's loop, top to bottom:

1. **rollout** -- ``batch_size`` paths of the current policy with ``num_steps`` steps of ``solver``
   (no autograd), from a generator seeded by ``(seed, i)`` alone, so iteration ``i``'s randomness does
   not depend on the history (exact resume); every path is one **reward query**;
2. **reward** -- ``env.reward(Y_T, cond)``; a result that is not a ``(batch_size,)`` tensor raises ``ValueError``
   and a NaN/Inf ``FloatingPointError``, both naming the reward;
3. **update** -- :meth:`ToyTask.prepare`: the critic phase (or DDPO's normalised return); then the trainer's
   :meth:`~.trainer.Trainer.update`: ``num_inner_epochs`` actor steps (one optimizer update each, the mean over
   ``gradient_accumulation_steps`` minibatches in order, all grid times in one batched evaluation; ``tau_subset``
   > 0: a random subset per minibatch, rescaled); after the last iteration's update, ``on_train_end()``
   (``sa_ac``'s optional distillation onto its critic's greedy policy);
4. **log** -- a JSONL record with ``iteration``, ``queries``, ``reward``, ``path_kl``, ``objective``
   (``reward - beta * path_kl`` on the batch), ``grad_norm``, ``lr``, ``beta`` and the algorithm's own;
5. **checkpoint** -- atomically with a SHA-256, keeping the previous one, every ``checkpoint_every`` iterations
   (default: every ~10%), at the end, and after the current iteration on SIGINT/SIGTERM (then
   :class:`~.checkpoint.TrainingInterrupted` says how to resume).

Kill a run, build a new trainer with the same config and ``resume()``: the remaining iterations give
bitwise the same parameters and metrics as an uninterrupted run. ``resume`` refuses a checkpoint made with other
settings (naming the fields; only :data:`~.config.RESUME_MUTABLE` ones such as ``iterations`` may change, and
are reported) and falls back to the previous checkpoint if the latest is damaged. A fresh run refuses to write
over an existing log or checkpoint unless ``overwrite`` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..kl import girsanov_kl_step, mean_se
from ..rollout import rollout
from ..sde import ControlledSDE, check_finite, check_reward
from .config import TrainConfig, validate
from .critics import make_critic_phase
from .distill import distill
from .environment import SOLVERS, Batch, Environment, solver_kwargs
from .loop_utils import iteration_generator, jsonable, lr_lambda, rollout_metrics
from .method_base import MethodConfig
from .methods import make_method
from .policies import GreedyPolicy
from .step_env import ToyStepEnvironment, rollout_batch
from .trainer import UpdatePlan
from .trainer_state import CheckpointMixin

__all__ = ["Environment", "Batch", "ToyTask", "SOLVERS", "solver_kwargs", "iteration_generator", "lr_lambda"]


class ToyTask(CheckpointMixin):
    """A toy environment bound to the one trainer: owns the policy optimiser, the critic, logging, checkpoints and
    evaluation (build it with :func:`sa_theory.algorithms.make_trainer`).

    Parameters
    ----------
    cfg: a :class:`~sa_theory.algorithms.config.TrainConfig` subclass.
    env: the :class:`Environment`.
    policy: ``nn.Module`` action mean ``(tau, y, cond) -> a`` (see :mod:`.policies`).
    value: optional critic / baseline ``nn.Module`` ``(tau, y, cond) -> (B,)``.
    evaluator: optional ``evaluator(trainer) -> dict`` called every ``eval_every`` iterations; its
        entries are logged with an ``eval/`` prefix.
    """

    def __init__(self, cfg: TrainConfig, env: Environment, policy: nn.Module, value: nn.Module | None = None,
                 evaluator: Callable[..., dict] | None = None):
        if cfg.solver not in SOLVERS or SOLVERS[cfg.solver][2]:
            raise ValueError(f"training solver must be one of {[k for k, v in SOLVERS.items() if not v[2]]}, "
                             f"got {cfg.solver!r} (the ODE is for evaluation)")
        validate(cfg)
        if cfg.batch_size % cfg.gradient_accumulation_steps:
            raise ValueError(f"'batch_size' ({cfg.batch_size}) must be divisible by 'gradient_accumulation_steps' "
                             f"({cfg.gradient_accumulation_steps})")
        self.cfg, self.env, self.policy, self.value, self.evaluator = cfg, env, policy, value, evaluator
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        self.policy.to(self.dtype)
        if self.value is not None:
            self.value.to(self.dtype)
        params = [p for p in policy.parameters() if p.requires_grad]
        policy_lr = lr_lambda(cfg.lr_schedule, cfg.num_epochs, cfg.lr_warmup_epochs)
        #: value_fit = "joint": the critic is a second parameter group of the policy optimiser (its loss is part of
        #: the method's; the policy's gradient alone is clipped); "separate": the critic phase owns its optimiser
        self.joint_value = getattr(cfg, "value_fit", "separate") == "joint" and value is not None and any(
            p.requires_grad for p in value.parameters())
        if self.joint_value:
            vparams = [p for p in value.parameters() if p.requires_grad]
            self.optimizer = torch.optim.Adam([{"params": params, "lr": cfg.learning_rate},
                                               {"params": vparams, "lr": cfg.value_lr}], eps=cfg.adam_epsilon)
            value_lr = lr_lambda(getattr(cfg, "value_lr_schedule", "constant"), cfg.num_epochs,
                                 name="value_lr_schedule")
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [policy_lr, value_lr])
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, policy_lr)
        self.iteration = 0
        self.queries = 0
        self.history: list[dict] = []
        #: what else defines the run (e.g. the toy problem), saved with checkpoints and checked on resume
        self.context: dict = {}
        #: how to resume, printed after a checkpoint written on SIGINT/SIGTERM (CLIs set their command line)
        self.resume_hint: str | None = None
        self._fresh_checked = False
        if cfg.algo != "sa_ac" and cfg.solver != "euler":
            raise ValueError(f"{cfg.algo} is a discrete-time (Euler-chain) method: use solver='euler', "
                             f"got {cfg.solver!r}")
        #: how the critic is fitted before the actor step (:mod:`.critics`; None for DDPO-SF/IS)
        self.critic = make_critic_phase(cfg, env, self.value)

    # ------------------------------------------------------------------ the algorithm
    def method_for(self, batch: Batch, beta: float):
        """The shared method of ``cfg.algo`` (:func:`~.methods.make_method`, the implementation images run) on the
        Euler kernel of ``batch``'s grid at KL weight ``beta``. The critic is fitted by :attr:`critic`
        (``value_coef = 0``) or, with ``value_fit = "joint"``, by the method's loss (``value_coef = 1``); advantages
        are not clamped; ``sa_ac``'s advantages are TD errors."""
        cfg = MethodConfig.take(self.cfg, method=self.cfg.algo, beta=beta, kl_weighting="chain", advantage="td",
                                adv_clip_max=0.0, value_coef=1.0 if self.joint_value else 0.0)
        return make_method(cfg, self.step_environment(batch), self.policy, self.value)

    def prepare(self, batch: Batch, generator: torch.Generator):
        """Step 3's first half (module docstring): the method on ``batch``, the critic phase or (DDPO) the method's
        return standardised over the batch when ``normalize_advantages``, and the trainer's :class:`UpdatePlan`:
        ``num_inner_epochs`` updates (one for DDPO-SF / DPOK) of ``gradient_accumulation_steps`` minibatches in order,
        all grid times at once
        (``tau_subset`` of them when > 0)."""
        cfg, beta = self.cfg, self.beta_at(self.iteration)
        N, B = batch.taus.numel() - 1, batch.batch_size
        self.policy.train()
        method, rb = self.method_for(batch, beta), rollout_batch(batch)
        if self.critic is not None:
            metrics = self.critic.prepare(method, rb, batch, self.policy, beta)
        else:
            ret = method.path_return(rb, batch.reward)
            if getattr(cfg, "normalize_advantages", False):
                ret = (ret - ret.mean()) / (ret.std() + 1e-8)
            metrics = method.prepare(rb, ret.detach())
        tau_subset = getattr(cfg, "tau_subset", 0)
        plan = UpdatePlan(num_inner_epochs=getattr(cfg, "num_inner_epochs", 1),
                          minibatch_size=B // cfg.gradient_accumulation_steps,
                          gradient_accumulation_steps=cfg.gradient_accumulation_steps, live_steps=tuple(range(N)),
                          steps_per_minibatch=tau_subset if 0 < tau_subset < N else N,
                          early_stop_path_kl=getattr(cfg, "early_stop_path_kl", 0.0))
        return method, rb, plan, metrics

    # ------------------------------------------------------------------ the runtime of the update (one process)
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def optimizer_step(self) -> dict:
        return {"grad_norm": self.policy_step()}

    def reduce(self, value: float, op: str) -> float:
        return float(value)

    def any_process(self, flag: bool) -> bool:
        return bool(flag)

    def on_train_end(self) -> dict:
        """Called once, right after the last iteration's update (before its log record, evaluation and checkpoint);
        returns metrics for that record: ``sa_ac`` with ``final_distill_steps`` > 0 distils the actor onto its
        critic's greedy policy (:meth:`distill`)."""
        if self.cfg.algo == "sa_ac" and self.cfg.final_distill_steps > 0:
            return self.distill()
        return {}

    def greedy_policy(self, beta: float | None = None) -> GreedyPolicy:
        r"""The critic's greedy policy :math:`s_\text{pre} + \nabla_y V_\psi/\beta` (:class:`GreedyPolicy`; ``beta``
        defaults to the current KL weight): where the actor still lags its critic, one exact policy-improvement
        step. Sample or evaluate it with ``evaluate(policy=trainer.greedy_policy())``."""
        if self.value is None:
            raise ValueError("greedy_policy needs a critic (sa_ac's value)")
        return GreedyPolicy(self.value, self.env.pretrained_action, self.beta_at(self.iteration) if beta is None
                            else beta, gain=self.env.sde.value_gain)

    def distill(self, target=None, steps: int | None = None, paths: int | None = None, lr: float | None = None
                ) -> dict:
        """Regress the actor onto ``target`` (default: :meth:`greedy_policy`); :func:`.distill.distill`."""
        return distill(self, target, steps, paths, lr)

    def extra_state(self) -> dict:
        return {} if self.critic is None else self.critic.state_dict()

    def load_extra_state(self, state: dict) -> None:
        if self.critic is not None:
            self.critic.load_state_dict(state)

    # ------------------------------------------------------------------ schedules
    def beta_at(self, it: int) -> float:
        cfg = self.cfg
        if cfg.beta_schedule == "constant" or cfg.beta_warmup <= 0:
            if cfg.beta_schedule not in ("constant", "linear"):
                raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; choose 'constant' or 'linear'")
            return float(cfg.beta)
        if cfg.beta_schedule != "linear":
            raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; choose 'constant' or 'linear'")
        frac = min(1.0, it / cfg.beta_warmup)
        return float(cfg.beta_start + frac * (cfg.beta - cfg.beta_start))

    # ------------------------------------------------------------------ rollouts
    def _sde_for(self, solver: str) -> ControlledSDE:
        _, _, ode = solver_kwargs(solver)
        return ControlledSDE(self.env.sde.schedule, ode=True) if ode else self.env.sde  # keeps the env's noise eta

    def sample_paths(self, n: int, steps: int, solver: str, generator: torch.Generator, seed: int,
                     record: bool = True, policy: Callable | None = None):
        """Roll out ``n`` paths of ``policy`` (default: the trained one; no autograd): ``(trajectory, cond)``."""
        backend, method, _ = solver_kwargs(solver)
        sde = self._sde_for(solver)
        y0 = self.env.initial_sample(n, generator, self.dtype)
        cond = self.env.cond_sample(n, generator) if self.env.cond_sample is not None else None
        policy = self.policy if policy is None else policy
        with torch.no_grad():
            traj = rollout(sde, policy, y0, steps=steps, cond=cond, reference=self.env.pretrained_action,
                           backend=backend, method=method, generator=generator if backend == "native" else None,
                           seed=seed, save_every=1 if record else None)
        return traj, cond

    def reward(self, x: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """``env.reward(x, cond)`` checked: a ``(B,)`` tensor (``ValueError`` otherwise) without NaN/Inf
        (``FloatingPointError``), both naming the reward."""
        return check_reward(self.env.reward(x, cond), x.shape[0], f"reward of environment {self.env.name!r}",
                            dtype=self.dtype)

    def rollouts(self) -> tuple[Batch, torch.Generator, dict]:
        """The trainer's step 1: ``(batch, generator, {})`` for the current iteration (:meth:`collect`)."""
        batch = self.collect(self.iteration)
        return batch, batch.generator, {}

    def collect(self, it: int) -> Batch:
        """Step 1-2 of the loop: the rollout batch of iteration ``it`` with rewards and log-densities."""
        cfg = self.cfg
        gen = iteration_generator(cfg.seed, it, 0)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        traj, cond = self.sample_paths(cfg.batch_size, cfg.num_steps, cfg.solver, gen, seed)
        taus, states = traj.taus, traj.states
        N = traj.steps
        with torch.no_grad():
            means = traj.means
            if means is None:  # torchsde: evaluate on the recorded grid
                means = torch.stack([self.policy(taus[k], states[k], cond) for k in range(N)])
            refs = traj.ref_actions
            if refs is None:
                refs = torch.stack([self.env.pretrained_action(taus[k], states[k], cond) for k in range(N)])
            if cfg.solver == "euler":  # recorded by the Euler chain (sampling.sample_chain)
                kl = traj.kl_steps
            else:  # the Girsanov step KLs at the grid points (left-point rule) for the other solvers
                g2 = self.env.sde.kl_weight_rate(taus)  # KL weight rate, g^2 at noise eta = 1
                kl = torch.stack([girsanov_kl_step(g2[k], traj.dtau, means[k], refs[k]) for k in range(N)])
            reward = self.reward(traj.final, cond)
            logp = ref_logp = None
            if cfg.solver == "euler":
                logp, ref_logp = traj.log_probs, traj.extras["ref_log_probs"]
        return Batch(taus=taus, states=states, means=means, ref_actions=refs, kl_steps=kl, reward=reward,
                     cond=cond, log_probs=logp, ref_log_probs=ref_logp, generator=gen)

    def step_environment(self, batch: Batch) -> ToyStepEnvironment:
        """The environment as the methods' step environment on ``batch``'s grid (cached per grid)."""
        key = batch.taus.detach().cpu().numpy().tobytes()
        envs = self.__dict__.setdefault("_step_envs", {})
        if key not in envs:
            envs[key] = ToyStepEnvironment(self.env, batch.taus)
        return envs[key]

    # ------------------------------------------------------------------ optimisation helpers
    def policy_step(self, optimizer: torch.optim.Optimizer | None = None) -> float:
        """Clip the policy's gradient norm to ``max_grad_norm``, step ``optimizer`` (default: the policy optimiser),
        zero grads; returns the pre-clip norm (a NaN/Inf norm raises ``FloatingPointError``)."""
        optimizer = self.optimizer if optimizer is None else optimizer
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        check_finite("policy gradient norm", norm.reshape(1))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def progress_bar(self, total: int, desc: str = "Trainer", initial: int = 0):
        """A tqdm bar when ``cfg.progress`` is set, else ``None``."""
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ loop
    @property
    def checkpoint_interval(self) -> int:
        """Iterations between periodic checkpoints (``checkpoint_every``; 0: ~10% of the run; -1: none)."""
        every = self.cfg.checkpoint_every
        return max(1, self.cfg.num_epochs // 10) if every == 0 else every

    @property
    def total_iterations(self) -> int:
        return self.cfg.num_epochs

    def begin_train(self, until: int | None) -> int:
        """Before the loop: a fresh run checks its outputs (:meth:`_check_fresh_outputs`); returns the iteration
        to stop at."""
        if self.iteration == 0 and not self._fresh_checked:
            self._check_fresh_outputs()
        return self.cfg.num_epochs if until is None else min(until, self.cfg.num_epochs)

    def postfix(self, rec: dict) -> dict:
        return {"J": f"{rec['objective_mean']:.3f}", "r": f"{rec['reward_mean']:.3f}",
                "kl": f"{rec['path_kl_mean']:.3f}"}

    def record(self, batch: Batch, metrics: dict, updated: dict) -> dict:
        """Step 4: advance the counters, ``on_train_end`` after the last iteration, the JSONL record (the one
        namespace, :mod:`.trainer`), evaluation every ``eval_every`` iterations (under ``eval/``)."""
        cfg, beta = self.cfg, self.beta_at(self.iteration)
        self.scheduler.step()
        self.iteration += 1
        self.queries += batch.batch_size
        metrics = {**metrics, **updated}
        if self.iteration == cfg.num_epochs:
            metrics = {**metrics, **self.on_train_end()}
        rec = {"epoch": self.iteration - 1, "queries": self.queries,
               **rollout_metrics(batch.reward, batch.path_kl, beta),
               "beta": beta, "lr": self.optimizer.param_groups[0]["lr"], **metrics}
        if cfg.eval_every > 0 and self.evaluator is not None and (
                self.iteration % cfg.eval_every == 0 or self.iteration == cfg.num_epochs):
            rec.update({f"eval/{k}": v for k, v in self.evaluator(self).items()})
        return {k: jsonable(v) for k, v in rec.items()}

    def end_iteration(self, rec: dict, stop_at: int, stop: bool) -> str | None:
        """Keep ``rec`` every ``log_every`` iterations and at the end (appended to ``log_path``); checkpoint every
        :attr:`checkpoint_interval` iterations and at the end. Returns the checkpoint path (or None)."""
        cfg = self.cfg
        last = self.iteration == stop_at or stop
        if self.iteration % cfg.log_every == 0 or last:
            self.history.append(rec)
            if cfg.log_path:
                self._append_log(rec)
        every = self.checkpoint_interval
        if cfg.checkpoint_dir and ((every > 0 and self.iteration % every == 0) or last):
            return self.save()
        return None

    def end_train(self, interrupted: bool = False) -> list[dict]:
        return self.history

    def interrupt_message(self, signame: str | None, where: str | None = None) -> str:
        where = (f"checkpoint written to {where!r}" if where
                 else "no checkpoint_dir is set, so nothing was saved")
        hint = self.resume_hint or "build the trainer with the same config and call resume()"
        return f"{signame or 'interrupt'}: stopped after iteration {self.iteration}/{self.cfg.num_epochs}; {where}. " \
               f"To continue: {hint}"

    def _append_log(self, rec: dict) -> None:
        d = os.path.dirname(self.cfg.log_path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(self.cfg.log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, n_paths: int = 4096, steps: int | None = None, solver: str = "euler", seed: int = 12345,
                 beta: float | None = None, return_samples: bool = False, policy: Callable | None = None) -> dict:
        """Monte-Carlo ``reward``, ``path_kl`` (Girsanov, on the grid), ``objective`` and their standard
        errors (``*_se``) for ``n_paths`` fresh paths (fixed ``seed``; no reward queries counted) of ``policy``
        (default: the trained policy; e.g. :meth:`greedy_policy`)."""
        steps = steps or self.cfg.num_steps
        beta = self.beta_at(self.iteration) if beta is None else beta
        gen = torch.Generator().manual_seed(seed)
        self.policy.eval()
        traj, cond = self.sample_paths(n_paths, steps, solver, gen, seed, record=False, policy=policy)
        r = self.reward(traj.final, cond).to(torch.float64)
        kl = traj.path_kl.to(torch.float64)
        j = r - beta * kl
        out = {}
        for name, x in (("reward", r), ("path_kl", kl), ("objective", j)):
            out[name], out[f"{name}_se"] = mean_se(x)
        if return_samples:
            out["final"] = traj.final
        return out

