r"""Continuous-time actor-critic (``sa_ac``): the score is the action (theory.md R4, R7-R10).

Per iteration, read top to bottom:

1. **rollout** ``B`` paths of the current policy :math:`\mu_{\theta_\text{old}}` (any solver, any ``N``);
   record the states :math:`Y_k`, the policy means, the pretrained actions :math:`s_k` and the per-step
   Girsanov KLs :math:`\ell_k = \frac{g_k^2 d\tau}{2}|\mu_k - s_k|^2`; one reward query per path.
2. **critic** (policy evaluation, R9): fit :math:`V_\psi(\tau, y)` to the Monte-Carlo returns
   :math:`R - \beta\sum_{j\ge k}\ell_j` (``value_loss="mc"``, plus :math:`V(T, Y_N) = R`), or onto
   :math:`R - \beta\sum_{j\ge k}\lambda_j` with the sampled Euler log-ratios
   :math:`\lambda_j = \log\frac{\pi_\theta}{\pi_\text{pre}}(Y_{j+1}|Y_j)
   = \ell_j + (\mu_j - s_j)\cdot g_j\sqrt{d\tau}\,\xi_j`
   (``"mc_cv"``: the added martingale increments do not change the conditional mean, and at the optimum,
   :math:`\mu - s = \nabla V^*/\beta`, they cancel the martingale part of :math:`V^*(Y)`, so the target is
   nearly deterministic given :math:`Y_k`), or by semi-gradient TD(0) (``"td"``); any value design (plain MLP,
   Tweedie, residual, R10). ``value_lr_schedule`` decays the critic's step size.
3. **costate**: :math:`p_k = \nabla_y V_\psi(\tau_k, Y_k)` by autograd through the critic, on the OLD
   states (detached from here on).
4. **actor** (``epochs`` steps, R8): maximise the trust-region surrogate
   :math:`\sum_k d\tau\,[H(\tau_k, Y_k, \mu_\theta, p_k) - H(\tau_k, Y_k, \mu_{\theta_\text{old}}, p_k)]
   - c\,KL(P^\theta\|P^{\theta_\text{old}})` with
   :math:`H(a) = g^2 a\cdot p - \frac{\beta g^2}{2}|a - s|^2 + \ldots`
   (:func:`sa_theory.estimators.trust_region_surrogate`); ``kl_penalty`` = :math:`c`, or ``max_path_kl``
   clipping. At :math:`\theta = \theta_\text{old}` its gradient is the value-gradient policy gradient (R4).
   ``tau_subset`` > 0 uses a random subset of grid times per epoch (rescaled, unbiased).
   ``lr_coef`` > 0 adds an importance-weighted likelihood-ratio term with TD advantages
   :math:`\delta_k = V_{k+1} - V_k - \beta\ell_k` (Euler only), for critics of non-differentiable rewards.
5. **distillation** (``final_distill_steps`` > 0, once after the last iteration; :meth:`SAActorCritic.distill`):
   regress the actor onto the final critic's greedy policy :math:`s + \nabla_y V_\psi/\beta` on fresh paths of
   the actor (no reward queries) -- step 4 taken to its fixed point for the final critic, without the trust
   region.

With a differentiable reward and Euler paths, the sampled discrete-adjoint costates :math:`P_k`
(:func:`sa_theory.estimators.pathwise_costates`, :math:`E[P_k|Y_k] = \nabla_y V^\theta`) can replace the
critic's gradient in step 3 (``costate="pathwise"``, step k uses :math:`P_{k+1}`: the surrogate's gradient is
then exactly the pathwise gradient of the N-step chain and the actor's fixed point is that chain's optimum,
not the critic's approximation of it) or train the critic's gradient (``value_grad_coef`` > 0: Sobolev
regression :math:`|\nabla_y V_\psi - P_k|^2` added to the value loss).

Measured on the 2-d Gaussian mixture (issue #4 notes; small-mode weight, exact 0.068; 16 384 paths, SE 0.003):
the learned critic is more accurate than the actor that follows it. After 300 iterations (figure-6 settings,
N = 20) the critic's greedy policy :math:`s + \nabla_y V_\psi/\beta` (:meth:`SAActorCritic.greedy_policy`) gives
0.070 / 0.071 (seeds 0 / 1), the actor network 0.075 / 0.079: its weight oscillates by :math:`\pm`0.02 during
training and settles only as the learning rates anneal (a 4x batch, policy-weight EMA, 16 actor epochs,
``kl_penalty`` 1 or 40 critic epochs did not remove the oscillation or the lag reliably). Step 5 with 4000 steps
(45 s on one CPU thread) brings the actor to 0.0705 / 0.0711 (held-out path KL to the greedy policy 0.021 ->
0.0009 nats per path; seeds 2 / 3: 0.0714 / 0.0685, greedy 0.0712 / 0.0681); both are tested within 4 SE of
the tilted mixture.
``costate="pathwise"`` gives 0.092-0.098 (N = 20 and 100), the chain-consistent critic costate
:math:`\nabla V_\psi(\tau_{k+1}, Y_{k+1})` 0.099 / 0.102 (N = 20; both target the N-step chain rather than
the continuous optimum, which does not explain the N = 100 value), the Sobolev term 0.077.

Because the surrogate only needs the time marginals of the state (R4), the rollout solver and step
count can be chosen freely; the path-KL trust region does not depend on ``N`` (R8).
"""

from __future__ import annotations

import torch

from ..estimators import pathwise_costates, td_advantages
from ..kl import girsanov_kl_step
from ..sde import check_finite
from ..value import mc_value_targets
from .config import SAACConfig
from .method_base import MethodConfig
from .methods import make_method
from .policies import GreedyPolicy, grid_means
from .step_env import rollout_batch, values_on_grid
from .trainer import Batch, Trainer, iteration_generator, lr_lambda

__all__ = ["SAActorCritic"]


class SAActorCritic(Trainer):
    """The continuous-time actor-critic (see the module docstring). ``value`` is the critic (required)."""

    cfg: SAACConfig

    def _init_extra(self) -> None:
        if self.value is None:
            raise ValueError("SAActorCritic needs a critic: pass value=... (e.g. sa_theory.value.MLPValue)")
        if self.cfg.value_loss not in ("mc", "mc_cv", "td"):
            raise ValueError(f"'value_loss' must be 'mc', 'mc_cv' or 'td', got {self.cfg.value_loss!r}")
        if self.cfg.value_loss == "mc_cv" and self.cfg.solver != "euler":
            raise ValueError("value_loss='mc_cv' uses Euler transition log-ratios: use solver='euler'")
        if self.cfg.lr_coef and self.cfg.solver != "euler":
            raise ValueError("'lr_coef' > 0 needs Euler transition densities: use solver='euler'")
        if self.cfg.costate not in ("critic_next", "critic", "pathwise"):
            raise ValueError(f"'costate' must be 'critic_next', 'critic' or 'pathwise', got {self.cfg.costate!r}")
        if self.cfg.estimator not in ("value_gradient", "likelihood_ratio"):
            raise ValueError(f"'estimator' must be 'value_gradient' or 'likelihood_ratio', got {self.cfg.estimator!r}")
        if self.cfg.estimator == "likelihood_ratio" and self.cfg.solver != "euler":
            raise ValueError("estimator='likelihood_ratio' needs Euler transition densities: use solver='euler'")
        if self.cfg.final_distill_steps < 0:
            raise ValueError(f"'final_distill_steps' must be >= 0, got {self.cfg.final_distill_steps}")
        if self.cfg.final_distill_steps > 0:  # fail now, not after the whole run
            self._check_distill_args(self.cfg.final_distill_steps, self.cfg.final_distill_paths,
                                     self.cfg.final_distill_lr)
        if self.cfg.value_grad_coef < 0:
            raise ValueError(f"'value_grad_coef' must be >= 0, got {self.cfg.value_grad_coef}")
        if self.needs_pathwise_costates:
            if self.cfg.solver != "euler":
                raise ValueError("costate='pathwise' / 'value_grad_coef' > 0 use the Euler adjoint: solver='euler'")
            if not self.env.reward_differentiable:
                raise ValueError("costate='pathwise' / 'value_grad_coef' > 0 need a differentiable reward")
        vparams = [p for p in self.value.parameters() if p.requires_grad]
        self.value_optimizer = torch.optim.Adam(vparams, lr=self.cfg.value_lr) if vparams else None
        value_lr = lr_lambda(self.cfg.value_lr_schedule, self.cfg.iterations, name="value_lr_schedule")
        self.value_scheduler = None if self.value_optimizer is None else \
            torch.optim.lr_scheduler.LambdaLR(self.value_optimizer, value_lr)

    @property
    def needs_pathwise_costates(self) -> bool:
        return self.cfg.costate == "pathwise" or self.cfg.value_grad_coef > 0

    def pathwise_costates(self, batch: Batch, beta: float) -> torch.Tensor:
        """Sampled costates :math:`P_k`, ``k = 0..N`` (:func:`sa_theory.estimators.pathwise_costates`)."""
        return pathwise_costates(self.env.sde, self.policy, self.env.pretrained_action, batch.taus, batch.states,
                                 self.env.reward, beta, batch.cond)

    def extra_state(self) -> dict:
        if self.value_optimizer is None:
            return {"value_optimizer": None, "value_scheduler": None}
        return {"value_optimizer": self.value_optimizer.state_dict(),
                "value_scheduler": self.value_scheduler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.value_optimizer is not None:
            self.value_optimizer.load_state_dict(state["value_optimizer"])
            if state.get("value_scheduler") is not None:
                self.value_scheduler.load_state_dict(state["value_scheduler"])

    # ------------------------------------------------------------------ 2. critic
    def value_targets(self, batch: Batch, beta: float) -> torch.Tensor:
        r"""Monte-Carlo critic targets for :math:`V(\tau_k, Y_k)`, ``k = 0..N``, ``(N+1, B)`` (reward units; the
        last row is :math:`R`): :math:`R - \beta\sum_{j\ge k}\ell_j` (``value_loss='mc'``) or, for
        'mc_cv', :math:`R - \beta\sum_{j\ge k}\lambda_j` with the sampled per-step log-ratios
        :math:`\lambda_j = \log\pi_\theta(Y_{j+1}|Y_j) - \log\pi_\text{pre}(Y_{j+1}|Y_j)` (nats, per step):
        :math:`\lambda_j - \ell_j` is a martingale increment, so both have the conditional mean
        :math:`V^\theta_N(\tau_k, Y_k)`; at the optimum the 'mc_cv' target is nearly deterministic given
        :math:`Y_k`."""
        if self.cfg.value_loss == "mc_cv":
            step_costs = batch.log_probs - batch.ref_log_probs
        else:
            step_costs = batch.kl_steps
        return torch.cat([mc_value_targets(batch.reward, step_costs, beta), batch.reward[None]], 0)

    def fit_critic(self, batch: Batch, beta: float, costates: torch.Tensor | None = None) -> float:
        """``value_epochs`` Adam steps on the MC-regression or TD(0) loss (plus ``value_grad_coef`` times the
        Sobolev term on ``costates``), each on the full paths at a random subset of ``max(1, value_batch // B)``
        grid times (``k = 0..N``); returns the last loss."""
        if self.value_optimizer is None:
            return float("nan")
        taus, states, R, kl = batch.taus, batch.states, batch.reward, batch.kl_steps
        N, B = taus.numel() - 1, batch.batch_size
        targets = self.value_targets(batch, beta)
        n_t = min(N + 1, max(1, self.cfg.value_batch // B))
        loss = torch.zeros(())
        sobolev = self.cfg.value_grad_coef > 0 and costates is not None
        for _ in range(self.cfg.value_epochs):
            idx = torch.randperm(N + 1, generator=batch.generator)[:n_t]
            y = states[idx].detach().requires_grad_(sobolev)
            v = values_on_grid(self.value, taus[idx], y, batch.cond)
            if self.cfg.value_loss in ("mc", "mc_cv"):
                loss = ((v - targets[idx]) ** 2).mean()
            else:  # semi-gradient TD(0): target V(tau_{k+1}, Y_{k+1}) - beta l_k, and R at k = N
                nxt = (idx + 1).clamp(max=N)
                with torch.no_grad():
                    v_next = values_on_grid(self.value, taus[nxt], states[nxt], batch.cond)
                klk = torch.cat([kl, torch.zeros_like(kl[:1])], 0)[idx]
                tgt = torch.where((idx == N)[:, None], R[None].expand_as(v), v_next - beta * klk)
                loss = ((v - tgt) ** 2).mean()
            if sobolev:
                (gv,) = torch.autograd.grad(v.sum(), y, create_graph=True)
                err = (gv - costates[idx]) ** 2
                loss = loss + self.cfg.value_grad_coef * err.reshape(err.shape[0], err.shape[1], -1).sum(-1).mean()
            self.value_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.value_optimizer.step()
        self.value_scheduler.step()
        return loss.item()

    # ------------------------------------------------------------------ 3. costate
    def costates(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The critic's values :math:`V_\psi(\tau_k, Y_k)` and step ``k``'s costate for ``k < N``, detached:
        :math:`\nabla_y V_\psi(\tau_{k+1}, Y_{k+1})` (``costate='critic_next'``: the action of step ``k`` moves
        :math:`Y_{k+1}`, so with :math:`V_\psi = V^\theta_N` the surrogate's gradient at :math:`\theta_\text{old}` is
        the N-step chain's value gradient, as :func:`~sa_theory.estimators.pathwise_costates`'s :math:`P_{k+1}`)
        or :math:`\nabla_y V_\psi(\tau_k, Y_k)` (``'critic'``: the continuous-time costate at the left point, off
        by O(dtau) on the chain; on the 10-step LQ chain it costs 18% of J, ``benchmarks/ablation_lq.py``)."""
        N = batch.taus.numel() - 1
        rows = slice(1, N + 1) if self.cfg.costate == "critic_next" else slice(0, N)
        with torch.enable_grad():
            y = batch.states[rows].detach().requires_grad_(True)
            v = values_on_grid(self.value, batch.taus[rows], y, batch.cond)
            (grad,) = torch.autograd.grad(v.sum(), y)
        if self.cfg.costate == "critic_next":
            with torch.no_grad():
                v = values_on_grid(self.value, batch.taus[:N], batch.states[:N], batch.cond)
        return v.detach(), check_finite("critic value gradient", grad)

    def greedy_policy(self, beta: float | None = None) -> GreedyPolicy:
        r"""The critic's greedy policy :math:`s_\text{pre} + \nabla_y V_\psi/\beta` (:class:`GreedyPolicy`; ``beta``
        defaults to the current KL weight): where the actor still lags its critic, one exact policy-improvement
        step. Sample or evaluate it with ``evaluate(policy=trainer.greedy_policy())``."""
        return GreedyPolicy(self.value, self.env.pretrained_action, self.beta_at(self.iteration) if beta is None
                            else beta, gain=self.env.sde.value_gain)

    # ------------------------------------------------------------------ 4. actor
    def actor_method(self, batch: Batch, beta: float):
        """The actor's loss: the shared ``sa_ac`` method (:class:`~.methods.SAACMethod`, the one that runs on images) on
        the Euler kernel of this batch's grid, with this trainer's ``estimator``, ``kl_penalty``, ``max_path_kl`` and
        ``lr_coef``; its critic is fitted here (``value_coef = 0``) and its advantages are TD errors."""
        cfg = MethodConfig.take(self.cfg, method="sa_ac", beta=beta, kl_weighting="chain", advantage="td",
                                adv_clip_max=0.0, value_coef=0.0)
        return make_method(cfg, self.step_environment(batch), self.policy, self.value)

    def update(self, batch: Batch) -> dict:
        cfg, beta = self.cfg, self.beta_at(self.iteration)
        N, B = batch.taus.numel() - 1, batch.batch_size
        P = self.pathwise_costates(batch, beta) if self.needs_pathwise_costates else None
        value_loss = self.fit_critic(batch, beta, P)
        if cfg.costate == "pathwise":
            # step k's action moves Y_{k+1}: its costate is P_{k+1} (then the surrogate's gradient at theta_old
            # is exactly the pathwise gradient R6 of the N-step chain; P_k itself would add an O(dtau) bias)
            p = P[1:]
            with torch.no_grad():  # the critic's values only (lr_coef's TD advantages), not its gradient
                values = values_on_grid(self.value, batch.taus[:N], batch.states[:N], batch.cond)
        else:
            values, p = self.costates(batch)
        method, rb = self.actor_method(batch, beta), rollout_batch(batch)
        rb.step_data["costate"] = p
        if cfg.estimator == "likelihood_ratio" or cfg.lr_coef:
            rb.step_data["adv"] = td_advantages(values, batch.reward, batch.kl_steps, beta)
        grad_norm, pkl = 0.0, 0.0
        for _ in range(cfg.epochs):
            if cfg.tau_subset and cfg.tau_subset < N:
                idx = torch.randperm(N, generator=batch.generator)[: cfg.tau_subset].sort().values
            else:
                idx = torch.arange(N)
            method.steps_scale = N / idx.numel()  # a random subset of grid times, rescaled (unbiased)
            pkl = 0.0
            for paths in self.chunks(B):
                out = method.losses(rb.select(paths), idx.tolist())
                (out["loss"] * (paths.numel() / B)).backward()
                pkl += float(out["kl_to_old"]) * paths.numel() / B
            grad_norm = self.policy_step()
        return {"grad_norm": grad_norm, "value_loss": value_loss, "policy_kl_to_old": pkl}

    # ------------------------------------------------------------------ 5. final distillation
    def distill_loss(self, taus: torch.Tensor, dtau: float, states: torch.Tensor, target: torch.Tensor, cond=None,
                     base: torch.Tensor | None = None) -> torch.Tensor:
        r"""Per-path Girsanov path-KL integrand between the actor and ``target`` actions on given states (step
        ``dtau``), :math:`\sum_k \frac{g_k^2 d\tau}{2}|\mu_\theta(\tau_k, Y_k) - a_k|^2` (nats per path, summed over
        dims; :func:`sa_theory.kl.girsanov_kl_step`), ``(B,)``; differentiable in the actor. ``taus`` are the ``N`` left
        grid times, ``states``/``target`` ``(N, B, *event)``, ``base`` the pretrained actions there (optional)."""
        mu = grid_means(self.policy, taus, states, cond, base)
        g2 = self.env.sde.kl_weight_rate(taus)  # g^2 at noise eta = 1
        return sum(girsanov_kl_step(g2[k], dtau, mu[k], target[k]) for k in range(taus.numel()))

    def _distill_paths(self, n: int, generator: torch.Generator, target) -> tuple:
        """``n`` fresh paths of the actor (in rollouts of ``batch_size``) with ``target``'s actions on their states:
        ``(taus (N,), dtau, states (N, n, *event), target (N, n, *event), cond, pretrained actions or None)``."""
        states, goals, conds, bases = [], [], [], []
        for start in range(0, n, self.cfg.batch_size):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            traj, cond = self.sample_paths(min(self.cfg.batch_size, n - start), self.cfg.sampler_steps,
                                           self.cfg.solver, generator, seed)
            taus, y = traj.taus[:-1], traj.states[:-1]
            states.append(y)
            goals.append(grid_means(target, taus, y, cond).detach())
            conds.append(cond)
            bases.append(traj.ref_actions)

        def cat(xs, dim):
            return None if xs[0] is None else torch.cat(xs, dim)
        return taus, traj.dtau, cat(states, 1), cat(goals, 1), cat(conds, 0), cat(bases, 1)

    @staticmethod
    def _check_distill_args(steps: int, paths: int, lr: float) -> None:
        for name, v in (("final_distill_steps", steps), ("final_distill_paths", paths)):
            if v < 1:
                raise ValueError(f"{name!r} must be >= 1 to distil, got {v}")
        if not lr > 0:
            raise ValueError(f"'final_distill_lr' must be > 0, got {lr}")

    def distill(self, target=None, steps: int | None = None, paths: int | None = None, lr: float | None = None
                ) -> dict:
        r"""Regress the actor onto ``target`` (default: the critic's greedy policy
        :math:`s_\text{pre} + \nabla_y V_\psi/\beta`, :meth:`greedy_policy`) on the states of ``paths``
        (default ``final_distill_paths``) fresh paths of the current actor (``sampler_steps`` of ``solver``; no reward
        queries): ``steps`` (default ``final_distill_steps``) Adam steps, learning rate ``lr`` (default
        ``final_distill_lr``) cosine-decayed to 0, each on ``batch_size`` of those paths drawn at random, minimising
        the mean of :meth:`distill_loss` (nats per path). With the greedy target this is the actor step of step 4
        taken to its fixed point for the final critic: with no trust region (``kl_penalty`` = 0) the surrogate is
        :math:`-\frac{\beta}{2}\sum_k g_k^2 d\tau|\mu - s - p_k/\beta|^2` + const. Where the actor lags its
        critic (the mixture, module docstring) it closes the gap. Seeded by ``(seed, iterations)``. Returns
        ``distill_kl_before`` / ``distill_kl_after``: the loss on ``batch_size`` held-out paths of the
        pre-distillation actor, before and after (nats per path)."""
        cfg = self.cfg
        steps = cfg.final_distill_steps if steps is None else steps
        paths = cfg.final_distill_paths if paths is None else paths
        lr = cfg.final_distill_lr if lr is None else lr
        self._check_distill_args(steps, paths, lr)
        target = self.greedy_policy() if target is None else target
        gen = iteration_generator(cfg.seed, cfg.iterations, 1)
        self.policy.eval()
        taus, dtau, states, goal, cond, base = self._distill_paths(paths, gen, target)
        held_out = self._distill_paths(cfg.batch_size, iteration_generator(cfg.seed, cfg.iterations, 2), target)
        with torch.no_grad():
            before = float(self.distill_loss(*held_out).mean())
        self.policy.train()
        opt = torch.optim.Adam([p for p in self.policy.parameters() if p.requires_grad], lr=lr, eps=cfg.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", steps))
        bar = self.progress_bar(steps, "distil actor -> greedy")
        for _ in range(steps):
            j = torch.randint(0, paths, (min(cfg.batch_size, paths),), generator=gen)
            loss = self.distill_loss(taus, dtau, states[:, j], goal[:, j], None if cond is None else cond[j],
                                     None if base is None else base[:, j]).mean()
            check_finite("distillation loss", loss.reshape(1))
            loss.backward()
            self.policy_step(opt)
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{float(loss):.4f}")
        if bar is not None:
            bar.close()
        with torch.no_grad():
            after = float(self.distill_loss(*held_out).mean())
        return {"distill_kl_before": before, "distill_kl_after": after}

    def on_train_end(self) -> dict:
        return self.distill() if self.cfg.final_distill_steps > 0 else {}
