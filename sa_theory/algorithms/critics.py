r"""How the critic is fitted on the toys, a phase of :class:`~.toy_task.ToyTask`'s preparation before the actor step:
:class:`ValueCritic` for ``sa_ac`` (the costates and TD advantages of the shared method), :class:`RewardBaseline`
for ``dpok`` (its value baseline); ``ddpo_sf`` / ``ddpo_is`` have none.

``sa_ac``, per iteration (theory.md R4, R7-R10):
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
4. **actor** (``num_inner_epochs`` steps, R8): maximise the trust-region surrogate
   :math:`\sum_k d\tau\,[H(\tau_k, Y_k, \mu_\theta, p_k) - H(\tau_k, Y_k, \mu_{\theta_\text{old}}, p_k)]
   - c\,KL(P^\theta\|P^{\theta_\text{old}})` with
   :math:`H(a) = g^2 a\cdot p - \frac{\beta g^2}{2}|a - s|^2 + \ldots`
   (:func:`sa_theory.estimators.trust_region_surrogate`); ``kl_penalty`` = :math:`c`, or ``max_path_kl``
   clipping. At :math:`\theta = \theta_\text{old}` its gradient is the value-gradient policy gradient (R4).
   ``tau_subset`` > 0 uses a random subset of grid times per epoch (rescaled, unbiased).
   ``lr_coef`` > 0 adds an importance-weighted likelihood-ratio term with TD advantages
   :math:`\delta_k = V_{k+1} - V_k - \beta\ell_k` (Euler only), for critics of non-differentiable rewards.
5. **distillation** (``final_distill_steps`` > 0, once after the last iteration; :meth:`~.toy_task.ToyTask.distill`):
   regress the actor onto the final critic's greedy policy :math:`s + \nabla_y V_\psi/\beta` on fresh paths of
   the actor (no reward queries) -- step 4 taken to its fixed point for the final critic, without the trust
   region.

With a differentiable reward and Euler paths, the sampled discrete-adjoint costates :math:`P_k`
(:func:`sa_theory.estimators.pathwise_costates`, :math:`E[P_k|Y_k] = \nabla_y V^\theta`) can replace the
critic's gradient in step 3 (``costate="pathwise"``, step k uses :math:`P_{k+1}`: the surrogate's gradient is
then exactly the pathwise gradient of the N-step chain and the actor's fixed point is that chain's optimum,
not the critic's approximation of it) or train the critic's gradient (``value_grad_coef`` > 0: Sobolev
regression :math:`|\nabla_y V_\psi - P_k|^2` added to the value loss).

Because the surrogate only needs the time marginals of the state (R4), the rollout solver and step
count can be chosen freely; the path-KL trust region does not depend on ``N`` (R8).
"""

from __future__ import annotations

import torch

from ..estimators import pathwise_costates, td_advantages
from ..sde import check_finite
from ..value import mc_value_targets
from .distill import check_distill_args
from .environment import Batch
from .loop_utils import lr_lambda
from .step_env import values_on_grid

__all__ = ["ValueCritic", "RewardBaseline", "make_critic_phase"]


class ValueCritic:
    """``sa_ac``'s critic :math:`V_\\psi` (the module docstring, steps 2-3): fitted in its own phase (``value_epochs``
    Adam steps, ``value_lr`` with ``value_lr_schedule``), then the costates and values the actor step uses."""

    def __init__(self, cfg, env, value):
        if value is None:
            raise ValueError("sa_ac needs a critic: pass value=... (e.g. sa_theory.value.MLPValue)")
        self.cfg, self.env, self.value = cfg, env, value
        euler = cfg.solver == "euler"
        checks = [
            (cfg.value_loss in ("mc", "mc_cv", "td"),
             f"'value_loss' must be 'mc', 'mc_cv' or 'td', got {cfg.value_loss!r}"),
            (euler or cfg.value_loss != "mc_cv",
             "value_loss='mc_cv' uses Euler transition log-ratios: use solver='euler'"),
            (euler or not cfg.lr_coef, "'lr_coef' > 0 needs Euler transition densities: use solver='euler'"),
            (cfg.costate in ("critic_next", "critic", "pathwise"),
             f"'costate' must be 'critic_next', 'critic' or 'pathwise', got {cfg.costate!r}"),
            (cfg.estimator in ("value_gradient", "likelihood_ratio"),
             f"'estimator' must be 'value_gradient' or 'likelihood_ratio', got {cfg.estimator!r}"),
            (euler or cfg.estimator != "likelihood_ratio",
             "estimator='likelihood_ratio' needs Euler transition densities: use solver='euler'"),
            (cfg.final_distill_steps >= 0, f"'final_distill_steps' must be >= 0, got {cfg.final_distill_steps}"),
            (cfg.value_grad_coef >= 0, f"'value_grad_coef' must be >= 0, got {cfg.value_grad_coef}"),
            (euler or not self.needs_pathwise_costates,
             "costate='pathwise' / 'value_grad_coef' > 0 use the Euler adjoint: solver='euler'"),
            (env.reward_differentiable or not self.needs_pathwise_costates,
             "costate='pathwise' / 'value_grad_coef' > 0 need a differentiable reward"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if cfg.final_distill_steps > 0:  # fail now, not after the whole run
            check_distill_args(cfg.final_distill_steps, cfg.final_distill_paths, cfg.final_distill_lr)
        vparams = [p for p in value.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(vparams, lr=cfg.value_lr) if vparams else None
        value_lr = lr_lambda(cfg.value_lr_schedule, cfg.num_epochs, name="value_lr_schedule")
        self.scheduler = None if self.optimizer is None else \
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, value_lr)

    @property
    def needs_pathwise_costates(self) -> bool:
        return self.cfg.costate == "pathwise" or self.cfg.value_grad_coef > 0

    def pathwise_costates(self, batch: Batch, policy, beta: float) -> torch.Tensor:
        """Sampled costates :math:`P_k`, ``k = 0..N`` (:func:`sa_theory.estimators.pathwise_costates`)."""
        return pathwise_costates(self.env.sde, policy, self.env.pretrained_action, batch.taus, batch.states,
                                 self.env.reward, beta, batch.cond)

    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {"value_optimizer": None, "value_scheduler": None}
        return {"value_optimizer": self.optimizer.state_dict(), "value_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["value_optimizer"])
            if state.get("value_scheduler") is not None:
                self.scheduler.load_state_dict(state["value_scheduler"])

    def prepare(self, method, rb, batch: Batch, policy, beta: float) -> dict:
        """Steps 2-3: fit the critic, then put the actor's costates (and, for the likelihood-ratio estimator or
        ``lr_coef``, the TD advantages) into ``rb.step_data`` for the shared method."""
        N = batch.taus.numel() - 1
        P = self.pathwise_costates(batch, policy, beta) if self.needs_pathwise_costates else None
        if self.cfg.value_fit == "joint":  # fitted by the method's loss during the actor update
            rb.step_data["v_target"] = self.joint_targets(batch, beta)
            value_loss = None
        else:
            value_loss = self.fit_critic(batch, beta, P)
        if self.cfg.costate == "pathwise":
            # step k's action moves Y_{k+1}: its costate is P_{k+1} (then the surrogate's gradient at theta_old
            # is exactly the pathwise gradient R6 of the N-step chain; P_k itself would add an O(dtau) bias)
            p = P[1:]
            with torch.no_grad():  # the critic's values only (lr_coef's TD advantages), not its gradient
                values = values_on_grid(self.value, batch.taus[:N], batch.states[:N], batch.cond)
        else:
            values, p = self.costates(batch)
        rb.step_data["costate"] = p
        if self.cfg.estimator == "likelihood_ratio" or self.cfg.lr_coef:
            rb.step_data["adv"] = td_advantages(values, batch.reward, batch.kl_steps, beta)
        return {} if value_loss is None else {"value_loss": value_loss}

    def joint_targets(self, batch: Batch, beta: float) -> torch.Tensor:
        r"""``value_fit = "joint"``: the targets of :meth:`~.method_base.Method.critic_loss` at ``k < N``, ``(N, B)``:
        :meth:`value_targets` (``'mc'`` / ``'mc_cv'``) or the TD(0) targets
        :math:`V_\psi(	au_{k+1}, Y_{k+1}) - eta\ell_k` (:math:`V(T, Y_N) = R`) of the critic before the update."""
        N = batch.taus.numel() - 1
        if self.cfg.value_loss != "td":
            return self.value_targets(batch, beta)[:N]
        with torch.no_grad():
            v_next = values_on_grid(self.value, batch.taus[1:N], batch.states[1:N], batch.cond)
        return torch.cat([v_next, batch.reward[None]], 0) - beta * batch.kl_steps

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
        if self.optimizer is None:
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
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
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
        nxt = self.cfg.costate == "critic_next"
        rows = slice(0, N + 1) if nxt else slice(0, N)  # 'critic_next': one pass on the grid gives both
        with torch.enable_grad():
            y = batch.states[rows].detach().requires_grad_(True)
            v = values_on_grid(self.value, batch.taus[rows], y, batch.cond)
            (grad,) = torch.autograd.grad(v.sum(), y)  # row k's value depends on Y_k only
        return v[:N].detach(), check_finite("critic value gradient", grad[1:] if nxt else grad)


class RewardBaseline:
    """DPOK's value baseline: ``value_epochs`` Adam steps (``value_lr``) regressing :math:`V(\\tau_k, Y_k)` on the
    terminal reward at a random subset of ``max(1, value_batch // B)`` grid times, then the method's ``prepare``."""

    def __init__(self, cfg, env, value):
        if value is None:
            raise ValueError("DPOK needs a value baseline: pass value=... (e.g. sa_theory.value.MLPValue)")
        self.cfg, self.value = cfg, value
        self.optimizer = torch.optim.Adam(value.parameters(), lr=cfg.value_lr)

    def state_dict(self) -> dict:
        return {"value_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["value_optimizer"])

    def prepare(self, method, rb, batch: Batch, policy, beta: float) -> dict:
        N, B = batch.taus.numel() - 1, batch.batch_size
        if self.cfg.value_fit == "joint":  # fitted by the method's loss (targets R, set by its prepare)
            return method.prepare(rb, method.path_return(rb, batch.reward))
        vloss = torch.zeros(())
        n_t = min(N, max(1, self.cfg.value_batch // B))
        for _ in range(self.cfg.value_epochs):
            idx = torch.randperm(N, generator=batch.generator)[:n_t]
            v = values_on_grid(self.value, batch.taus[idx], batch.states[idx], batch.cond)
            vloss = ((v - batch.reward[None]) ** 2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            vloss.backward()
            self.optimizer.step()
        return {"value_loss": vloss.item(), **method.prepare(rb, method.path_return(rb, batch.reward))}


def make_critic_phase(cfg, env, value):
    """The critic phase of ``cfg.algo`` (``None`` for DDPO-SF/IS, which train on normalised returns alone)."""
    return {"sa_ac": ValueCritic, "dpok": RewardBaseline}.get(cfg.algo, lambda *a: None)(cfg, env, value)
