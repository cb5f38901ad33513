r"""The actor-critic's final phase: distil the actor onto a target policy, by default the final critic's greedy
policy :math:`s + \nabla_y V_\psi/\beta` (``final_distill_steps`` > 0; :meth:`~.toy_task.ToyTask.distill`)."""

from __future__ import annotations

import torch

from ..kl import girsanov_kl_step
from ..sde import check_finite
from .loop_utils import iteration_generator, lr_lambda
from .policies import grid_means

__all__ = ["distill", "distill_loss", "check_distill_args"]



def distill_loss(trainer, taus: torch.Tensor, dtau: float, states: torch.Tensor, target: torch.Tensor, cond=None,
                 base: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-path Girsanov path-KL integrand between the actor and ``target`` actions on given states (step
    ``dtau``), :math:`\sum_k \frac{g_k^2 d\tau}{2}|\mu_\theta(\tau_k, Y_k) - a_k|^2` (nats per path, summed over
    dims; :func:`sa_theory.kl.girsanov_kl_step`), ``(B,)``; differentiable in the actor. ``taus`` are the ``N`` left
    grid times, ``states``/``target`` ``(N, B, *event)``, ``base`` the pretrained actions there (optional)."""
    mu = grid_means(trainer.policy, taus, states, cond, base)
    g2 = trainer.env.sde.kl_weight_rate(taus)  # g^2 at noise eta = 1
    N, B = mu.shape[:2]  # every step in one call (one weight per row), then the sum over the steps
    rows = girsanov_kl_step(g2.repeat_interleave(B), dtau, mu.reshape(N * B, *mu.shape[2:]),
                            target.reshape(N * B, *target.shape[2:]))
    return rows.reshape(N, B).sum(0)


def _distill_paths(trainer, n: int, generator: torch.Generator, target) -> tuple:
    """``n`` fresh paths of the actor (in rollouts of ``batch_size``) with ``target``'s actions on their states:
    ``(taus (N,), dtau, states (N, n, *event), target (N, n, *event), cond, pretrained actions or None)``."""
    states, goals, conds, bases = [], [], [], []
    for start in range(0, n, trainer.cfg.batch_size):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        traj, cond = trainer.sample_paths(min(trainer.cfg.batch_size, n - start), trainer.cfg.num_steps,
                                          trainer.cfg.solver, generator, seed)
        taus, y = traj.taus[:-1], traj.states[:-1]
        states.append(y)
        goals.append(grid_means(target, taus, y, cond).detach())
        conds.append(cond)
        bases.append(traj.ref_actions)

    def cat(xs, dim):
        return None if xs[0] is None else torch.cat(xs, dim)
    return taus, traj.dtau, cat(states, 1), cat(goals, 1), cat(conds, 0), cat(bases, 1)


def check_distill_args(steps: int, paths: int, lr: float) -> None:
    for name, v in (("final_distill_steps", steps), ("final_distill_paths", paths)):
        if v < 1:
            raise ValueError(f"{name!r} must be >= 1 to distil, got {v}")
    if not lr > 0:
        raise ValueError(f"'final_distill_lr' must be > 0, got {lr}")


def distill(trainer, target=None, steps: int | None = None, paths: int | None = None, lr: float | None = None
            ) -> dict:
    r"""Regress the actor onto ``target`` (default: the critic's greedy policy
    :math:`s_\text{pre} + \nabla_y V_\psi/\beta`, :meth:`greedy_policy`) on the states of ``paths``
    (default ``final_distill_paths``) fresh paths of the current actor (``num_steps`` of ``solver``; no reward
    queries): ``steps`` (default ``final_distill_steps``) Adam steps, learning rate ``lr`` (default
    ``final_distill_lr``) cosine-decayed to 0, each on ``batch_size`` of those paths drawn at random, minimising
    the mean of :meth:`distill_loss` (nats per path). With the greedy target this is the actor step of step 4
    taken to its fixed point for the final critic: with no trust region (``kl_penalty`` = 0) the surrogate is
    :math:`-\frac{\beta}{2}\sum_k g_k^2 d\tau|\mu - s - p_k/\beta|^2` + const. Where the actor lags its
    critic (the mixture, module docstring) it closes the gap. Seeded by ``(seed, iterations)``. Returns
    ``distill_kl_before`` / ``distill_kl_after``: the loss on ``batch_size`` held-out paths of the
    pre-distillation actor, before and after (nats per path)."""
    cfg = trainer.cfg
    steps = cfg.final_distill_steps if steps is None else steps
    paths = cfg.final_distill_paths if paths is None else paths
    lr = cfg.final_distill_lr if lr is None else lr
    check_distill_args(steps, paths, lr)
    target = trainer.greedy_policy() if target is None else target
    gen = iteration_generator(cfg.seed, cfg.num_epochs, 1)
    trainer.policy.eval()
    taus, dtau, states, goal, cond, base = _distill_paths(trainer, paths, gen, target)
    held_out = _distill_paths(trainer, cfg.batch_size, iteration_generator(cfg.seed, cfg.num_epochs, 2), target)
    with torch.no_grad():
        before = float(distill_loss(trainer, *held_out).mean())
    trainer.policy.train()
    opt = torch.optim.Adam([p for p in trainer.policy.parameters() if p.requires_grad], lr=lr, eps=cfg.adam_epsilon)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", steps))
    bar = trainer.progress_bar(steps, "distil actor -> greedy")
    for _ in range(steps):
        j = torch.randint(0, paths, (min(cfg.batch_size, paths),), generator=gen)
        loss = distill_loss(trainer, taus, dtau, states[:, j], goal[:, j], None if cond is None else cond[j],
                                 None if base is None else base[:, j]).mean()
        check_finite("distillation loss", loss.reshape(1))
        loss.backward()
        trainer.policy_step(opt)
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{float(loss):.4f}")
    if bar is not None:
        bar.close()
    with torch.no_grad():
        after = float(distill_loss(trainer, *held_out).mean())
    return {"distill_kl_before": before, "distill_kl_after": after}
