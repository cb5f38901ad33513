"""Figure 7: value-network ablation for the continuous-time actor-critic on ``gauss2d`` (affine policy):
plain MLP critic, parameter-free Tweedie value r(x0_hat), residual (Tweedie + MLP). Left: exact
objective against reward queries; right: relative error of the critic's value gradient grad_y V against
the exact grad_y V^theta of the current policy (Feynman-Kac ODE), on the policy's own states."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from figures._common import FIGSIZE, figure_main, save, setup_torch
from toy_problems.train import affine_class_optimum, build

NAME = "fig7_value_ablation.png"
CRITICS = {"mlp": "plain MLP", "tweedie": "Tweedie r(x0_hat)", "residual": "residual (Tweedie + MLP)"}


def critic_gradient_error(s, n: int = 512, seed: int = 5) -> float:
    """Relative RMS error of grad_y V_psi against the exact grad_y V^theta on states of the current policy."""
    tr = s.trainer
    gen = torch.Generator().manual_seed(seed)
    traj, _ = tr.sample_paths(n, tr.cfg.num_steps, "euler", gen, seed)
    theta, M = s.policy.theta_numpy(), s.toy.pieces
    coeffs = s.prob.policy_value_coeffs(theta, M)
    num = den = 0.0
    for k in range(0, traj.steps, max(1, traj.steps // 10)):
        tau = traj.taus[k]
        y = traj.states[k].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(tr.value(tau, y).sum(), y)
        U, u, _ = coeffs(float(tau))
        ex = -y.detach().double().numpy() @ U + u
        num += float(((g.double().numpy() - ex) ** 2).sum())
        den += float((ex**2).sum())
    return float(np.sqrt(num / den))


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    its, B, evals = (3, 32, 1) if quick else (100, 128, 8)
    res = {}
    for critic in CRITICS:
        s = build("sa_ac", "gauss2d", {"progress": False, "policy": "affine", "pieces": 4, "num_epochs": its,
                                       "batch_size": B, "learning_rate": 0.01, "lr_schedule": "cosine",
                                       "critic": critic})
        q, J, err = [], [], []
        for i in range(evals):
            s.trainer.train(until=int(round(its * (i + 1) / evals)))
            q.append(s.trainer.queries)
            J.append(s.evaluate()["objective"])
            err.append(critic_gradient_error(s, n=128 if quick else 512))
        res[critic] = (np.array(q), np.array(J), np.array(err))
    J_class = affine_class_optimum(s.prob, 4, polish=not quick)[0]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=FIGSIZE)
    for critic, (q, J, err) in res.items():
        a1.plot(q, J, "o-", label=CRITICS[critic])
        a2.plot(q, err, "o-", label=CRITICS[critic])
    a1.axhline(J_class, color="k", ls="--", label="optimum of the policy class")
    a1.set_xlabel("reward queries")
    a1.set_ylabel("objective J (exact)")
    a1.set_title("objective")
    a2.set_xlabel("reward queries")
    a2.set_ylabel("relative RMS error of grad_y V")
    a2.set_yscale("log")
    a2.set_title("critic error vs exact grad V^theta")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("Value-network ablation, continuous-time actor-critic, 2-d Gaussian")
    fig.tight_layout()
    path = save(fig, out_dir, NAME)
    return {"path": path, "final_objective": {c: float(v[1][-1]) for c, v in res.items()},
            "final_grad_error": {c: float(v[2][-1]) for c, v in res.items()}}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
