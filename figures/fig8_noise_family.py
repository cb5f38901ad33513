"""Figure 8: the noise-level family on a rectified-flow toy (theory.md §5). Fine-tuning a 1-d rectified flow
(data N(1, 0.25), t in [0, 0.99], reward r = 1.5 x, sampler started at p_T) with the sampler of noise level eta.

Left: mean of the optimal sampler's terminal law against eta, exact (eta-process moment ODEs), for the KL
weight beta = 1. With the initial law fixed, the optimum is the tilt p e^{r/beta}/Z up to the alpha_T^2 term
for eta >= 1; with less noise the sampler remembers Y_0 and the optimum falls short of the tilt, more so the
smaller eta (Flow-GRPO's default eta = 0.245 is visibly biased). Markers: the continuous-time actor-critic
(sa_theory.algorithms via make_trainer, 8-piece affine policy, 100 Euler steps, evaluated exactly in
continuous time) trained at eta = 1 and at eta = 0.245, and the best policy of the same class for the same
chain. The restricted class keeps both below their eta's exact optimum; the text box compares the shift
between the two noise levels, exact against learned.
Right: reward against path KL of the exact optimum for a sweep of beta, one curve per eta, with the tilt's
reward against its terminal KL (the law-level bound, which no fixed-init sampler exceeds), and the two
learned policies at beta = 1.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from figures._common import FIGSIZE, figure_main, save, setup_torch
from sa_theory.schedules import RectifiedFlow
from toy_problems import LinearGaussianProblem, gaussian_kl

NAME = "fig8_noise_family.png"
SCHEDULE = RectifiedFlow(t_max=0.99)
PIECES = 8


def problem(eta: float, beta: float = 1.0) -> LinearGaussianProblem:
    return LinearGaussianProblem([1.0], [[0.25]], SCHEDULE, w=[1.5], beta=beta, noise=eta)


def train_actor_critic(eta: float, iterations: int, batch: int, seed: int = 0) -> dict:
    """The continuous-time actor-critic through ``make_trainer`` on an Environment whose sde has noise eta."""
    from sa_theory.algorithms import Environment, PiecewiseAffinePolicy, SAACConfig, make_trainer, seed_everything
    from toy_problems.train import ToyConfig, make_critic

    prob = problem(eta)
    env = Environment(sde=prob.sde, pretrained_action=prob.pretrained_action(),
                      reward=lambda x, cond=None: prob.reward_torch(x),
                      initial_sample=lambda n, gen, dtype: prob.initial_sample(n, generator=gen, dtype=dtype),
                      name=f"rf1d-eta{eta:g}")
    cfg = SAACConfig(seed=seed, num_epochs=iterations, batch_size=batch, num_steps=100, beta=1.0,
                     learning_rate=0.02,
                     lr_schedule="cosine", progress=False, value_epochs=8, value_batch=1024)
    seed_everything(seed)
    policy = PiecewiseAffinePolicy(prob.pretrained_action(), 1, PIECES, T=SCHEDULE.T)
    critic = make_critic(prob, ToyConfig(policy="affine", pieces=PIECES, critic="residual", critic_hidden=32))
    make_trainer(cfg, env, policy, value=critic).train()
    return prob.exact_terms(policy.theta_numpy(), PIECES)


def best_in_class(eta: float, steps: int = 100) -> dict:
    """Exact terms of the best policy of the learned class for the training chain (``steps`` Euler steps; L-BFGS on
    the chain's exact objective and gradient)."""
    from scipy.optimize import minimize

    prob = problem(eta)
    res = minimize(lambda th: -prob.discrete_objective(th, PIECES, steps), np.zeros(prob.n_params(PIECES)),
                   jac=lambda th: -prob.discrete_gradient(th, PIECES, steps), method="L-BFGS-B",
                   options={"gtol": 1e-8, "maxiter": 300})
    return prob.exact_terms(res.x, PIECES)


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    etas = np.geomspace(0.03, 4.0, 8 if quick else 30)
    opt_mean = np.array([problem(e).optimal_terminal_law()[0][0] for e in etas])
    tilt_mean = problem(1.0).tilted_law()[0][0]
    marked = [1.0, 0.245]
    exact_marked = {e: problem(e).optimal_terminal_law()[0][0] for e in marked}
    its, B = (3, 32) if quick else (80, 128)
    learned = {e: train_actor_critic(e, its, B) for e in marked}
    best = {} if quick else {e: best_in_class(e) for e in marked}

    betas = np.geomspace(0.3, 6.0, 5 if quick else 14)
    frontier_etas = [1.0, 0.5, 0.245, 0.1]
    frontiers = {e: np.array([[t["path_kl"], t["reward"]] for t in (problem(e, b).optimal_terms() for b in betas)])
                 for e in frontier_etas}
    tilt_front = []
    for b in betas:
        m, C = problem(1.0, b).tilted_law()
        tilt_front.append([gaussian_kl(m, C, np.array([1.0]), np.array([[0.25]])), 1.5 * m[0]])
    tilt_front = np.array(tilt_front)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=FIGSIZE)
    ax.semilogx(etas, opt_mean, "k-", label="exact optimum, initial law fixed (p_T)")
    ax.axhline(tilt_mean, color="0.5", ls="--", label=f"tilt p e^(r/beta)/Z (mean {tilt_mean:.4f})")
    colors = {1.0: "C0", 0.245: "C3"}
    for e in marked:
        ax.axvline(e, color=colors[e], lw=0.6, alpha=0.5)
        ax.plot(e, learned[e]["mean"][0], "o", color=colors[e], ms=8,
                label=f"actor-critic at eta={e:g}: {learned[e]['mean'][0]:.4f} (exact {exact_marked[e]:.4f})")
        if e in best:
            ax.plot(e, best[e]["mean"][0], "x", color=colors[e], ms=10, mew=2,
                    label=f"best {PIECES}-piece affine policy at eta={e:g}")
    shift_exact = exact_marked[0.245] - exact_marked[1.0]
    shift_learned = learned[0.245]["mean"][0] - learned[1.0]["mean"][0]
    ax.text(0.3, 0.55, f"optimum - tilt: {exact_marked[1.0] - tilt_mean:+.1e} (eta=1),\n"
            f"{exact_marked[0.245] - tilt_mean:+.4f} (eta=0.245); mean at 0.245 minus\n"
            f"mean at 1: exact {shift_exact:+.4f}, actor-critic {shift_learned:+.4f}",
            transform=ax.transAxes, va="top", fontsize=8, bbox=dict(fc="white", ec="0.7", alpha=0.9))
    ax.set_xlabel("noise level eta  (Flow-GRPO's a: eta = a^2/2; its default 0.7 -> 0.245)")
    ax.set_ylabel("mean of the terminal law Y_T")
    ax.set_title("Terminal-law bias of the fixed-init optimum (beta = 1)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")

    for e, c in zip(frontier_etas, ["C0", "C2", "C3", "C1"]):
        bx.plot(frontiers[e][:, 0], frontiers[e][:, 1], "-", color=c, label=f"exact optimum, eta={e:g}")
    bx.plot(tilt_front[:, 0], tilt_front[:, 1], "k--", label="tilt: reward vs terminal KL (law-level bound)")
    for e in marked:
        bx.plot(learned[e]["path_kl"], learned[e]["reward"], "o", color=colors[e], ms=8,
                label=f"actor-critic at eta={e:g} (beta = 1)")
    bx.set_xlabel("path KL(P^theta || P^pre) of the eta-sampler (nats)")
    bx.set_ylabel("expected reward E r(Y_T)")
    bx.set_title("Reward-KL trade-off over beta, per noise level", fontsize=10)
    bx.set_xscale("log")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7, loc="lower right")
    fig.suptitle("Rectified flow (t_max = 0.99), data N(1, 0.25), r = 1.5x: with less noise (eta < 1) the fixed-init "
                 "optimum misses the tilt", fontsize=11)
    fig.tight_layout()
    path = save(fig, out_dir, NAME)
    return {"path": path, "optimum_mean": {str(e): float(v) for e, v in exact_marked.items()},
            "tilt_mean": float(tilt_mean),
            "learned_mean": {str(e): float(t["mean"][0]) for e, t in learned.items()},
            "learned_objective": {str(e): float(t["objective"]) for e, t in learned.items()},
            "best_in_class_mean": {str(e): float(t["mean"][0]) for e, t in best.items()},
            "shift_exact": float(shift_exact), "shift_learned": float(shift_learned)}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
