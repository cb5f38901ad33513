r"""What every trainer shares: the environment, rollouts, schedules, logging, checkpoints, evaluation.

An algorithm subclasses :class:`Trainer` and implements :meth:`Trainer.update` (one gradient phase on a
rollout batch). The loop, top to bottom, for iteration ``i``:

1. **rollout** -- ``batch_size`` paths of the current policy with ``sampler_steps`` steps of ``solver``
   (no autograd), from a generator seeded by ``(seed, i)`` alone, so iteration ``i``'s randomness does
   not depend on the history (exact resume); every path is one **reward query**;
2. **reward** -- ``env.reward(Y_T, cond)``; a NaN/Inf raises ``FloatingPointError`` naming the reward;
3. **update** -- the algorithm (``update(batch)`` returns its metrics); after the last iteration's update,
   ``on_train_end()`` (a final phase of the algorithm, e.g. the actor-critic's greedy distillation);
4. **log** -- a JSONL record with ``iteration``, ``queries``, ``reward``, ``path_kl``, ``objective``
   (``reward - beta * path_kl`` on the batch), ``grad_norm``, ``lr``, ``beta`` and the algorithm's own;
5. **checkpoint** -- atomically, every ``checkpoint_every`` iterations and at the end.

Kill a run, build a new trainer with the same config and ``resume()``: the remaining iterations give
bitwise the same parameters and metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..kl import euler_log_prob, girsanov_kl_step
from ..rollout import rollout
from ..sde import ActionFn, ControlledSDE, check_finite
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from .config import TrainConfig, to_dict

__all__ = ["Environment", "Batch", "Trainer", "SOLVERS", "solver_kwargs", "iteration_generator"]

#: training / evaluation solvers: name -> (backend, method, ode)
SOLVERS = {
    "euler": ("native", "euler", False),
    "heun": ("native", "heun", False),
    "tsde_euler": ("torchsde", "euler", False),
    "milstein": ("torchsde", "milstein", False),
    "srk": ("torchsde", "srk", False),
    "ode": ("native", "heun", True),  # probability-flow ODE (Heun = second order); evaluation only
    "ode_euler": ("native", "euler", True),
}


def solver_kwargs(name: str) -> tuple[str, str, bool]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(SOLVERS)}")
    return SOLVERS[name]


@dataclass
class Environment:
    """A fine-tuning problem as the trainers see it (no toy or image specifics).

    sde: the controlled sampler SDE (schedule); the ODE variant is derived for evaluation.
    pretrained_action: :math:`s_\\text{pre}(T-\\tau, y, c)` as an ``ActionFn``.
    reward: ``reward(x, cond) -> (B,)`` terminal reward (one call on B paths = B reward queries).
    initial_sample: ``initial_sample(n, generator, dtype) -> (n, *event)`` draws of :math:`Y_0`.
    cond_sample: ``cond_sample(n, generator) -> cond`` or ``None`` (unconditional).
    reward_differentiable: whether ``reward`` can be differentiated (informational for estimators).
    """

    sde: ControlledSDE
    pretrained_action: ActionFn
    reward: Callable[[torch.Tensor, Any], torch.Tensor]
    initial_sample: Callable[[int, torch.Generator, torch.dtype], torch.Tensor]
    cond_sample: Callable[[int, torch.Generator], Any] | None = None
    reward_differentiable: bool = True
    name: str = "env"


@dataclass
class Batch:
    """One rollout batch (everything detached). Shapes: ``taus (N+1,)``, ``states (N+1, B, *event)``,
    ``means``/``ref_actions`` ``(N, B, *event)``, ``kl_steps``/``log_probs``/``ref_log_probs`` ``(N, B)``,
    ``reward``/``path_kl`` ``(B,)``."""

    taus: torch.Tensor
    states: torch.Tensor
    means: torch.Tensor
    ref_actions: torch.Tensor
    kl_steps: torch.Tensor
    reward: torch.Tensor
    cond: Any = None
    log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    generator: torch.Generator | None = None
    extras: dict = field(default_factory=dict)

    @property
    def path_kl(self) -> torch.Tensor:
        return self.kl_steps.sum(0)

    @property
    def dtau(self) -> float:
        return float(self.taus[1] - self.taus[0])

    @property
    def batch_size(self) -> int:
        return self.reward.shape[0]


def iteration_generator(seed: int, iteration: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, iteration, stream)`` only."""
    s = int(np.random.SeedSequence([int(seed) % 2**63, int(iteration), int(stream)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s % 2**63)


def lr_lambda(schedule: str, iterations: int, warmup: int = 0, name: str = "lr_schedule") -> Callable[[int], float]:
    """Learning-rate multiplier per iteration for ``LambdaLR``: linear warm-up over ``warmup`` iterations times
    ``schedule`` ('constant' | 'linear' decay to 0 | 'cosine') over ``iterations``. An unknown schedule raises
    ``ValueError`` naming the config field ``name``."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"{name!r} must be 'constant', 'linear' or 'cosine', got {schedule!r}")

    def fn(it: int) -> float:
        w = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        frac = min(1.0, it / max(1, iterations))
        if schedule == "linear":
            return w * (1.0 - frac)
        if schedule == "cosine":
            return w * 0.5 * (1.0 + math.cos(math.pi * frac))
        return w

    return fn


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return float(v) if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class Trainer:
    """Base trainer: owns the policy optimiser, the loop, logging, checkpoints and evaluation.

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
                 evaluator: Callable[[Trainer], dict] | None = None):
        if cfg.solver not in SOLVERS or SOLVERS[cfg.solver][2]:
            raise ValueError(f"training solver must be one of {[k for k, v in SOLVERS.items() if not v[2]]}, "
                             f"got {cfg.solver!r} (the ODE is for evaluation)")
        for name in ("iterations", "batch_size", "sampler_steps", "grad_accum"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {getattr(cfg, name)}")
        if cfg.batch_size % cfg.grad_accum:
            raise ValueError(f"'batch_size' ({cfg.batch_size}) must be divisible by 'grad_accum' ({cfg.grad_accum})")
        self.cfg, self.env, self.policy, self.value, self.evaluator = cfg, env, policy, value, evaluator
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        self.policy.to(self.dtype)
        if self.value is not None:
            self.value.to(self.dtype)
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_schedule, cfg.iterations, cfg.lr_warmup))
        self.iteration = 0
        self.queries = 0
        self.history: list[dict] = []
        self._init_extra()

    # ------------------------------------------------------------------ hooks
    def _init_extra(self) -> None:
        """Subclasses create critics' optimisers here."""

    def update(self, batch: Batch) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_train_end(self) -> dict:
        """Called once, right after the last iteration's update (before its log record, evaluation and checkpoint);
        returns metrics for that record. Subclasses add a final phase here (e.g. ``SAActorCritic.distill``)."""
        return {}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

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
        return ControlledSDE(self.env.sde.schedule, ode=ode)

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
        r = self.env.reward(x, cond)
        return check_finite("reward", r.detach())

    def collect(self, it: int) -> Batch:
        """Step 1-2 of the loop: the rollout batch of iteration ``it`` with rewards and log-densities."""
        cfg = self.cfg
        gen = iteration_generator(cfg.seed, it, 0)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        traj, cond = self.sample_paths(cfg.batch_size, cfg.sampler_steps, cfg.solver, gen, seed)
        taus, states = traj.taus, traj.states
        N = traj.steps
        with torch.no_grad():
            means = traj.means
            if means is None:  # torchsde: evaluate on the recorded grid
                means = torch.stack([self.policy(taus[k], states[k], cond) for k in range(N)])
            refs = traj.ref_actions
            if refs is None:
                refs = torch.stack([self.env.pretrained_action(taus[k], states[k], cond) for k in range(N)])
            g2 = self.env.sde.g2(taus)
            kl = torch.stack([girsanov_kl_step(g2[k], traj.dtau, means[k], refs[k]) for k in range(N)])
            reward = self.reward(traj.final, cond)
            logp = ref_logp = None
            if cfg.solver == "euler":
                gd = self.env.sde.diffusion(taus)
                sde = self.env.sde
                logp = traj.log_probs
                ref_logp = torch.stack([euler_log_prob(states[k + 1], states[k], sde.drift(taus[k], states[k], refs[k]),
                                                       gd[k], traj.dtau) for k in range(N)])
        return Batch(taus=taus, states=states, means=means, ref_actions=refs, kl_steps=kl, reward=reward,
                     cond=cond, log_probs=logp, ref_log_probs=ref_logp, generator=gen)

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

    def progress_bar(self, total: int, desc: str, initial: int = 0):
        """A tqdm bar when ``cfg.progress`` is set, else ``None``."""
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def chunks(self, B: int) -> list[torch.Tensor]:
        """Path indices of the ``grad_accum`` micro-batches."""
        return list(torch.arange(B).chunk(self.cfg.grad_accum))

    # ------------------------------------------------------------------ loop
    def train(self, until: int | None = None) -> list[dict]:
        """Run iterations ``self.iteration .. until`` (default ``cfg.iterations``); returns the metric history."""
        cfg = self.cfg
        stop = cfg.iterations if until is None else min(until, cfg.iterations)
        bar = self.progress_bar(stop, type(self).__name__, initial=self.iteration)
        while self.iteration < stop:
            it = self.iteration
            beta = self.beta_at(it)
            batch = self.collect(it)
            self.policy.train()
            metrics = self.update(batch)
            self.scheduler.step()
            self.iteration += 1
            self.queries += batch.batch_size
            if self.iteration == cfg.iterations:
                metrics = {**metrics, **self.on_train_end()}
            rec = {"iteration": self.iteration, "queries": self.queries,
                   "reward": float(batch.reward.mean()), "path_kl": float(batch.path_kl.mean()),
                   "objective": float((batch.reward - beta * batch.path_kl).mean()),
                   "beta": beta, "lr": self.optimizer.param_groups[0]["lr"], **metrics}
            if cfg.eval_every > 0 and self.evaluator is not None and (
                    self.iteration % cfg.eval_every == 0 or self.iteration == cfg.iterations):
                rec.update({f"eval/{k}": v for k, v in self.evaluator(self).items()})
            rec = {k: _jsonable(v) for k, v in rec.items()}
            if self.iteration % cfg.log_every == 0 or self.iteration == stop:
                self.history.append(rec)
                if cfg.log_path:
                    self._append_log(rec)
            if cfg.checkpoint_path and ((cfg.checkpoint_every > 0 and self.iteration % cfg.checkpoint_every == 0)
                                        or self.iteration == stop):
                self.save(cfg.checkpoint_path)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(J=f"{rec['objective']:.3f}", r=f"{rec['reward']:.3f}", kl=f"{rec['path_kl']:.3f}")
        if bar is not None:
            bar.close()
        return self.history

    def _append_log(self, rec: dict) -> None:
        d = os.path.dirname(self.cfg.log_path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(self.cfg.log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = {"config": to_dict(self.cfg), "iteration": self.iteration, "queries": self.queries,
                 "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "history": list(self.history), "rng": rng_state(),
                 "extra": self.extra_state()}
        if self.value is not None:
            state["value"] = self.value.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.value is not None:
            self.value.load_state_dict(state["value"])
        self.iteration, self.queries = state["iteration"], state["queries"]
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        self.load_extra_state(state["extra"])

    def save(self, path: str | None = None) -> None:
        save_checkpoint(path or self.cfg.checkpoint_path, self.state_dict())

    def resume(self, path: str | None = None) -> bool:
        """Load the checkpoint at ``path`` (default ``cfg.checkpoint_path``) if it exists; drop JSONL records
        written after it (a run killed between checkpoint and crash). Returns whether it resumed."""
        path = path or self.cfg.checkpoint_path
        if not path or not os.path.exists(path):
            return False
        self.load_state_dict(load_checkpoint(path))
        if self.cfg.log_path and os.path.exists(self.cfg.log_path):
            with open(self.cfg.log_path) as fh:
                recs = [json.loads(line) for line in fh if line.strip()]
            keep = [r for r in recs if r.get("iteration", 0) <= self.iteration]
            tmp = self.cfg.log_path + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, self.cfg.log_path)
        return True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, n_paths: int = 4096, steps: int | None = None, solver: str = "euler", seed: int = 12345,
                 beta: float | None = None, return_samples: bool = False, policy: Callable | None = None) -> dict:
        """Monte-Carlo ``reward``, ``path_kl`` (Girsanov, on the grid), ``objective`` and their standard
        errors (``*_se``) for ``n_paths`` fresh paths (fixed ``seed``; no reward queries counted) of ``policy``
        (default: the trained policy; e.g. :meth:`SAActorCritic.greedy_policy`)."""
        steps = steps or self.cfg.sampler_steps
        beta = self.beta_at(self.iteration) if beta is None else beta
        gen = torch.Generator().manual_seed(seed)
        self.policy.eval()
        traj, cond = self.sample_paths(n_paths, steps, solver, gen, seed, record=False, policy=policy)
        r = self.reward(traj.final, cond).to(torch.float64)
        kl = traj.path_kl.to(torch.float64)
        j = r - beta * kl
        out = {}
        for name, x in (("reward", r), ("path_kl", kl), ("objective", j)):
            out[name] = float(x.mean())
            out[f"{name}_se"] = float(x.std() / math.sqrt(x.numel()))
        if return_samples:
            out["final"] = traj.final
        return out


def seed_module_init(seed: int) -> None:
    """Seed the global generators before building networks (reproducible initialisation)."""
    seed_everything(seed)
