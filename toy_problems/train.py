"""Glue: toy problems as :class:`sa_theory.algorithms.Environment` s, their policies, critics and evaluators.

>>> setup = build("sa_ac", problem="gauss2d", overrides={"num_epochs": 100})
>>> setup.trainer.train()
>>> setup.evaluate()            # exact J for the affine policy on a linear-Gaussian problem, else Monte Carlo

Problems (``PROBLEMS``), all 2-d:

* ``gauss2d`` -- :class:`LinearGaussianProblem`, VP-linear schedule (0.1 to 20, nearly memoryless),
  quadratic reward; exact objective, optimum and optimum of the piecewise-affine policy class.
* ``ou2d`` -- the same data and reward on the constant-rate OU schedule (b = 1, T = 1): the sampler
  remembers its start, so the fixed-init optimum differs from the tilt (theory.md R2).
* ``gmm2d`` -- :class:`GaussianMixtureProblem`, 3 components, linear reward ``w.x``: exact tilted mixture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from sa_theory.algorithms import (
    CONFIGS,
    Environment,
    MLPPolicy,
    PiecewiseAffinePolicy,
    ResidualMLPPolicy,
    TrainConfig,
    Trainer,
    make_trainer,
    override,
    seed_everything,
    validate,
)
from sa_theory.algorithms.config import RENAMED, _f, qualified_names
from sa_theory.schedules import ConstantOU, VPLinear
from sa_theory.sde import ControlledSDE
from sa_theory.value import MLPValue, ResidualValue, TweedieValue

from .gaussian_mixture import GaussianMixtureProblem
from .linear_gaussian import LinearGaussianProblem

__all__ = ["ToyConfig", "PROBLEMS", "make_problem", "make_env", "make_policy", "make_critic", "build", "Setup",
           "affine_class_optimum", "euler_chain_class_optimum", "split_overrides", "mixture_statistics", "validate_toy"]


# ---------------------------------------------------------------------------------------------- problems
def _lg(schedule, beta):
    return LinearGaussianProblem(m0=[0.5, -0.5], S0=[[1.0, 0.3], [0.3, 0.5]], schedule=schedule,
                                 Q=[[1.0, 0.0], [0.0, 0.5]], w=[1.0, 1.0], beta=beta, init="p_T")


def _gmm(beta):
    return GaussianMixtureProblem(weights=[0.4, 0.4, 0.2], means=[[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]],
                                  covs=[np.eye(2) * 0.25, np.eye(2) * 0.25, [[0.3, 0.1], [0.1, 0.2]]],
                                  schedule=VPLinear(), w=[0.5, 0.5], beta=beta, init="p_T")


PROBLEMS = {
    "gauss2d": lambda beta: _lg(VPLinear(), beta),
    "ou2d": lambda beta: _lg(ConstantOU(b=1.0), beta),
    "gmm2d": _gmm,
}


def make_problem(name: str, beta: float):
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}")
    return PROBLEMS[name](beta)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ToyConfig:
    """Toy-problem glue: which problem, policy class and critic design (the environment / model part of a run; the
    qualified names are ``env.problem``, ``model.*``, ``value.kind`` / ``value.width`` / ... as on images)."""

    _section = "model"
    _qualified = {"problem": "env.problem", "critic": "value.kind", "critic_x0_input": "value.x0_input",
                  "critic_hidden": "value.width", "critic_depth": "value.depth", "eval_paths": "sample.eval_num_paths"}

    problem: str = _f("gauss2d", "toy problem: 'gauss2d' | 'ou2d' | 'gmm2d'")
    policy: str = _f("residual", "policy class: 'residual' (s_pre + MLP, zero last layer) | 'affine' "
                                 "(s_pre + K(tau) y + k(tau) on `pieces` pieces) | 'mlp' (plain, distilled to s_pre)")
    pieces: int = _f(4, "number M of constant pieces of the affine policy class")
    hidden: int = _f(64, "hidden width of the policy network")
    depth: int = _f(2, "hidden layers of the policy network")
    critic: str = _f("mlp", "critic / value baseline: 'mlp' (plain) | 'tweedie' (r(x0_hat), no parameters) | "
                            "'residual' (c1 r(x0_hat) + c2 NN)")
    critic_x0_input: bool = _f(False, "residual critic: its network also sees Tweedie's x0_hat(y) (more accurate "
                                      "value gradients where the posterior switches modes)")
    critic_hidden: int = _f(64, "hidden width of the critic")
    critic_depth: int = _f(2, "hidden layers of the critic")
    eval_paths: int = _f(4096, "paths of a Monte-Carlo evaluation")


def validate_toy(toy: ToyConfig) -> ToyConfig:
    """Names are checked where they are used; sizes here: ``ValueError`` naming the field."""
    for name, low in (("pieces", 1), ("hidden", 1), ("depth", 1), ("critic_hidden", 1), ("critic_depth", 1),
                      ("eval_paths", 2)):
        if getattr(toy, name) < low:
            raise ValueError(f"config field {name!r} must be >= {low}, got {getattr(toy, name)!r}")
    if toy.problem not in PROBLEMS:
        raise ValueError(f"config field 'problem': unknown problem {toy.problem!r}; choose from {sorted(PROBLEMS)}")
    return toy


def split_overrides(algo: str, overrides: dict[str, Any]) -> tuple[TrainConfig, ToyConfig]:
    """Split ``key=value`` overrides between the algorithm's config and :class:`ToyConfig`; unknown keys
    raise ``KeyError`` naming them."""
    if algo not in CONFIGS:
        raise ValueError(f"unknown algorithm {algo!r}; choose from {sorted(CONFIGS)}")
    cfg, toy = CONFIGS[algo](), ToyConfig()
    cfg_q, toy_q = qualified_names(cfg), qualified_names(toy)
    cfg_names = set(cfg_q) | set(cfg_q.values()) | set(RENAMED)  # a renamed field: override() names its new name
    toy_names = set(toy_q) | set(toy_q.values())
    a, t = {}, {}
    for k, v in overrides.items():
        kk = k.replace("-", "_")
        if kk in cfg_names:
            a[kk] = v
        elif kk in toy_names:
            t[kk] = v
        else:
            raise KeyError(f"unknown config field {k!r} (not in {type(cfg).__name__} nor ToyConfig); valid fields: "
                           f"{sorted(set(cfg_q.values()) | set(toy_q.values()))}")
    return override(cfg, a), override(toy, t)


# ---------------------------------------------------------------------------------------------- pieces
def _reward_fn(prob):
    if isinstance(prob, LinearGaussianProblem):
        return lambda x, cond=None: prob.reward_torch(x)
    w = {}

    def reward(x, cond=None):
        key = (x.dtype, str(x.device))
        if key not in w:
            w[key] = torch.as_tensor(prob.w, dtype=x.dtype, device=x.device)
        return x @ w[key] + prob.r0

    return reward


def _pretrained(prob):
    if isinstance(prob, LinearGaussianProblem):
        return prob.pretrained_action()
    return prob.action_fns()[0]


def _score(prob):
    return lambda t, y, cond=None: prob.score_torch(t, y)


def make_env(prob, name: str = "toy") -> Environment:
    """The trainers' view of a toy problem."""
    return Environment(sde=ControlledSDE(prob.schedule, noise=prob.noise), pretrained_action=_pretrained(prob),
                       reward=_reward_fn(prob),
                       initial_sample=lambda n, gen, dtype: prob.initial_sample(n, generator=gen, dtype=dtype),
                       reward_differentiable=True, name=name)


def make_policy(prob, toy: ToyConfig, dtype=torch.float32, base=None):
    """The policy of ``toy.policy`` started at the pretrained action ``base`` (default: the problem's); :func:`build`
    passes the environment's own, so rollouts compute it once per step for the policy and the reference."""
    d, T, base = prob.d, float(prob.schedule.T), _pretrained(prob) if base is None else base
    if toy.policy == "residual":
        return ResidualMLPPolicy(base, d, toy.hidden, toy.depth, T=T)
    if toy.policy == "affine":
        return PiecewiseAffinePolicy(base, d, toy.pieces, T=T)
    if toy.policy == "mlp":
        pol = MLPPolicy(d, toy.hidden, toy.depth, T=T).to(dtype)

        def states(n, gen):  # pretrained marginals: forward-noised data at a random time
            tau = torch.rand((), generator=gen, dtype=dtype) * T
            x0 = torch.as_tensor(prob.sample_data(n, rng=int(torch.randint(0, 2**31, (1,), generator=gen)))
                                 if hasattr(prob, "sample_data") else _lg_data(prob, n, gen), dtype=dtype)
            t = T - tau
            a, v = prob.schedule.alpha(t), prob.schedule.marginal_var(t)
            return tau, a * x0 + v.sqrt() * torch.randn(x0.shape, generator=gen, dtype=dtype), None

        pol.distill(base, states, steps=800)
        return pol
    raise ValueError(f"unknown policy {toy.policy!r}; choose 'residual', 'affine' or 'mlp'")


def _lg_data(prob, n, gen):
    L = np.linalg.cholesky(prob.S0)
    z = torch.randn(n, prob.d, generator=gen, dtype=torch.float64).numpy()
    return prob.m0 + z @ L.T


def make_critic(prob, toy: ToyConfig):
    d, T = prob.d, float(prob.schedule.T)
    if toy.critic == "mlp":
        return MLPValue(d, toy.critic_hidden, toy.critic_depth, T=T)
    tw = TweedieValue(prob.schedule, _score(prob), _reward_fn(prob), row_times=True)  # scores take (B, 1) times
    if toy.critic == "tweedie":
        return tw
    if toy.critic == "residual":
        width = 2 * d if toy.critic_x0_input else d
        return ResidualValue(tw, MLPValue(width, toy.critic_hidden, toy.critic_depth, T=T), T=T,
                             x0_input=toy.critic_x0_input)
    raise ValueError(f"unknown critic {toy.critic!r}; choose 'mlp', 'tweedie' or 'residual'")


# ---------------------------------------------------------------------------------------------- optimum
_OPT_CACHE: dict = {}


def _problem_key(prob) -> tuple:
    """Hashable identity of a toy problem by its defining parameters (for caching optima)."""
    arrays = [getattr(prob, n) for n in ("m0", "S0", "Q", "w", "weights", "means", "covs") if hasattr(prob, n)]
    return (type(prob).__name__, repr(prob.schedule), float(prob.beta), prob.init, repr(prob.noise),
            tuple(np.asarray(a, dtype=float).tobytes() for a in arrays))


def affine_class_optimum(prob: LinearGaussianProblem, pieces: int, polish: bool = True) -> tuple[float, np.ndarray]:
    """``(J_M*, theta*)``: the best exact objective of the piecewise-affine class with ``pieces`` pieces
    (L-BFGS on ``prob.exact_objective_and_gradient``; cached per problem). ``polish=False``
    stops at the optimum of the 200-step Euler chain (its exact continuous J is returned; ~1e-3 below)."""
    key = (_problem_key(prob), pieces, polish)
    if key not in _OPT_CACHE:
        # warm start at the optimum of the 200-step Euler chain (cheap: moment recursion + autograd), which
        # is within ~1e-3 of the continuous one, then polish on the exact continuous objective
        n = prob.n_params(pieces)
        warm = minimize(lambda th: -prob.discrete_objective(th, pieces, 200), np.zeros(n),
                        jac=lambda th: -prob.discrete_gradient(th, pieces, 200), method="L-BFGS-B",
                        options={"gtol": 1e-8, "maxiter": 300})
        if not polish:
            _OPT_CACHE[key] = (float(prob.exact_objective(warm.x, pieces)), warm.x)
            return _OPT_CACHE[key]
        def neg(th):
            J, g = prob.exact_objective_and_gradient(th, pieces)
            return -J, -g

        res = minimize(neg, warm.x, jac=True, method="L-BFGS-B", options={"gtol": 1e-7, "ftol": 1e-12, "maxiter": 100})
        _OPT_CACHE[key] = (float(-res.fun), res.x)
    return _OPT_CACHE[key]


def euler_chain_class_optimum(prob: LinearGaussianProblem, pieces: int, steps: int) -> tuple[float, np.ndarray]:
    """``(J, theta)``: the piecewise-affine policy that is optimal for the ``steps``-step Euler chain (L-BFGS on the
    chain's exact moment recursion ``prob.discrete_objective``) and its **continuous-time** exact objective J:
    the best a method that optimises the N-step chain can reach, e.g. 6.1% below the class optimum at N = 10 on
    ``gauss2d`` (figure 2). Cached per problem."""
    key = ("chain", _problem_key(prob), pieces, steps)
    if key not in _OPT_CACHE:
        res = minimize(lambda th: -prob.discrete_objective(th, pieces, steps), np.zeros(prob.n_params(pieces)),
                       jac=lambda th: -prob.discrete_gradient(th, pieces, steps), method="L-BFGS-B",
                       options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 3000})
        _OPT_CACHE[key] = (float(prob.exact_objective(res.x, pieces)), res.x)
    return _OPT_CACHE[key]


def mixture_statistics(x: np.ndarray, weights, means, covs) -> tuple[np.ndarray, np.ndarray]:
    """Component weights and means of samples ``x (n, d)`` by soft assignment to a reference mixture
    (responsibilities under ``(weights, means, covs)``): ``(weights_hat (K,), means_hat (K, d))``."""
    x = np.asarray(x, dtype=float)
    K = len(weights)
    logp = np.empty((x.shape[0], K))
    for k in range(K):
        L = np.linalg.cholesky(covs[k])
        z = np.linalg.solve(L, (x - means[k]).T).T
        logp[:, k] = np.log(weights[k]) - 0.5 * (z**2).sum(1) - np.log(np.diag(L)).sum()
    logp -= logp.max(1, keepdims=True)
    resp = np.exp(logp)
    resp /= resp.sum(1, keepdims=True)
    wh = resp.mean(0)
    mh = (resp[:, :, None] * x[:, None, :]).sum(0) / resp.sum(0)[:, None]
    return wh, mh


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """A trainer on a toy problem, plus what is needed to judge it."""

    cfg: TrainConfig
    toy: ToyConfig
    prob: Any
    env: Environment
    trainer: Trainer
    extras: dict = field(default_factory=dict)

    @property
    def policy(self):
        return self.trainer.policy

    def optimum(self) -> float:
        """The closed-form optimal objective to compare with: of the affine class (``policy='affine'`` on a
        linear-Gaussian problem) or :math:`J^*` of the unrestricted (fixed-init) optimum."""
        if isinstance(self.prob, LinearGaussianProblem):
            if self.toy.policy == "affine":
                return affine_class_optimum(self.prob, self.toy.pieces)[0]
            return self.prob.optimal_objective()
        return gmm_optimal_objective(self.prob)

    def pretrained_objective(self) -> float:
        if isinstance(self.prob, LinearGaussianProblem):
            return self.prob.exact_objective(np.zeros(self.prob.n_params(1)), 1)
        return float(self.prob.r0 + self.prob.w @ (self.prob.weights @ self.prob.means))

    def evaluate(self, steps: int | None = None, solver: str = "euler", n_paths: int | None = None,
                 seed: int = 12345, with_gap: bool = False) -> dict:
        """Exact (continuous-time) terms for the affine policy on a linear-Gaussian problem, else Monte Carlo
        with the given solver / step count. ``with_gap``: add ``gap`` = :meth:`optimum` - objective."""
        if isinstance(self.prob, LinearGaussianProblem) and self.toy.policy == "affine" and solver != "ode" \
                and steps is None:
            t = self.prob.exact_terms(self.policy.theta_numpy(), self.toy.pieces)
            out = {"objective": t["objective"], "reward": t["reward"], "path_kl": t["path_kl"]}
        else:
            out = self.trainer.evaluate(n_paths or self.toy.eval_paths, steps=steps, solver=solver, seed=seed,
                                        beta=self.prob.beta)
        if with_gap:
            out["gap"] = self.optimum() - out["objective"]
        return out

    def gap_closed(self, n_paths: int | None = None, seed: int = 12345) -> dict:
        """Fraction of the gap between the pretrained objective and :meth:`optimum` that the policy closes,
        comparing like with like: ``kind='exact'`` (affine policy on a linear-Gaussian problem: exact J of the
        policy, of the pretrained sampler and the optimum) or ``kind='monte_carlo'``: the policy's and the
        pretrained sampler's Monte-Carlo J on the *same* paths (common random numbers, ``num_steps`` Euler
        steps), their paired difference (``gain``, ``gain_se``) over the exact gain ``optimum - pretrained``.
        An untrained policy gives exactly 0. Keys: ``fraction``, ``fraction_se``, ``gain``, ``gain_se``,
        ``objective``, ``pretrained``, ``optimum``, ``kind``."""
        opt, pre = self.optimum(), self.pretrained_objective()
        if isinstance(self.prob, LinearGaussianProblem) and self.toy.policy == "affine":
            j = self.evaluate()["objective"]
            gain, gain_se, kind, j_pre = j - pre, 0.0, "exact", pre
        else:
            n = n_paths or self.toy.eval_paths
            j_pol, j_ref = (self._mc_objective(pol, n, seed) for pol in (None, self.env.pretrained_action))
            d = j_pol - j_ref
            j, j_pre, gain = float(j_pol.mean()), float(j_ref.mean()), float(d.mean())
            gain_se, kind = float(d.std() / np.sqrt(n)), "monte_carlo"
        return {"fraction": gain / (opt - pre), "fraction_se": gain_se / abs(opt - pre), "gain": gain,
                "gain_se": gain_se, "objective": j, "pretrained": j_pre, "optimum": opt, "kind": kind}

    def _mc_objective(self, policy, n: int, seed: int) -> torch.Tensor:
        """Per-path ``r(Y_N) - beta * KL`` (float64) of ``policy`` (None: the trained one) on ``n`` seeded paths."""
        tr = self.trainer
        tr.policy.eval()
        gen = torch.Generator().manual_seed(seed)
        traj, cond = tr.sample_paths(n, tr.cfg.num_steps, "euler", gen, seed, record=False, policy=policy)
        return tr.reward(traj.final, cond).double() - self.prob.beta * traj.path_kl.double()


def gmm_optimal_objective(prob: GaussianMixtureProblem, n: int = 200_000, seed: int = 0) -> float:
    """:math:`J^* = E_{\\mu_0} V^*(0, Y_0)` (fixed init) by Monte Carlo over :math:`Y_0` (exact :math:`V^*`)."""
    key = ("gmm", _problem_key(prob), n, seed)
    if key not in _OPT_CACHE:
        y0 = prob.sample_initial(n, rng=seed)
        _OPT_CACHE[key] = float(np.mean(prob.optimal_value(0.0, y0)))
    return _OPT_CACHE[key]


def build(algo: str = "sa_ac", problem: str | None = None, overrides: dict[str, Any] | None = None,
          evaluator=None, exact_eval_every: bool = False) -> Setup:
    """Build config, problem, environment, policy, critic and trainer from ``key=value`` overrides."""
    overrides = dict(overrides or {})
    if problem is not None:
        overrides["problem"] = problem
    cfg, toy = split_overrides(algo, overrides)
    validate(cfg)  # before anything is built (the trainer validates again)
    validate_toy(toy)
    prob = make_problem(toy.problem, cfg.beta)
    env = make_env(prob, toy.problem)
    seed_everything(cfg.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    policy = make_policy(prob, toy, dtype, base=env.pretrained_action)
    needs_value = algo in ("sa_ac", "dpok")
    value = make_critic(prob, toy) if needs_value else None
    if algo == "dpok" and toy.critic == "tweedie":
        raise ValueError("DPOK's baseline must be learnable: critic='mlp' or 'residual'")
    setup = Setup(cfg, toy, prob, env, None)  # type: ignore[arg-type]
    if evaluator is None and cfg.eval_every > 0:
        def evaluator(trainer):
            out = setup.evaluate(with_gap=True)
            return {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)}
    setup.trainer = make_trainer(cfg, env, policy, value=value, evaluator=evaluator)
    # the problem and model design are part of the run: a resume under other ones is refused (eval_paths may change)
    setup.trainer.context = {"toy": dataclasses.asdict(toy)}
    return setup
