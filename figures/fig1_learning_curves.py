"""Figure 1: learning curves against reward queries -- continuous-time actor-critic vs DDPO-SF, DDPO-IS, DPOK.

2-d linear-Gaussian problem (``gauss2d``), every method trains the same piecewise-affine residual
policy class (4 pieces) with the same rollouts (Euler, N = 50) and batch size; objective, reward and
path KL are evaluated **exactly** (moment ODEs) at the policy's parameters. Mean and min-max band
over seeds; the closed-form optimum of the policy class (and the unrestricted J*) as lines.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from figures._common import COLORS, FIGSIZE, LABELS, METHODS, figure_main, save, setup_torch, train_curve
from toy_problems.train import affine_class_optimum

NAME = "fig1_learning_curves.png"


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    seeds = [0] if quick else [0, 1, 2]
    its, B, evals = (4, 32, 1) if quick else (100, 128, 10)
    curves, setup = {}, None
    for algo in METHODS:
        curves[algo] = []
        for seed in seeds:
            setup, c = train_curve(algo, "gauss2d", {"policy": "affine", "pieces": 4, "num_epochs": its,
                                                     "batch_size": B, "num_steps": 50, "seed": seed}, evals)
            curves[algo].append(c)
    prob = setup.prob
    J_class = affine_class_optimum(prob, 4, polish=not quick)[0]
    opt_terms = prob.optimal_terms()
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE)
    for ax, key, title in zip(axes, ("objective", "reward", "path_kl"),
                              ("objective J = E r - beta KL", "reward E r(Y_T)", "path KL (nats)")):
        for algo in METHODS:
            q = curves[algo][0]["queries"]
            ys = np.stack([c[key] for c in curves[algo]])
            ax.plot(q, ys.mean(0), color=COLORS[algo], label=LABELS[algo])
            ax.fill_between(q, ys.min(0), ys.max(0), color=COLORS[algo], alpha=0.2)
        if key == "objective":
            ax.axhline(J_class, color="k", ls="--", label="optimum of the policy class")
            ax.axhline(opt_terms["objective"], color="k", ls=":", label="unrestricted optimum J*")
        else:
            ax.axhline(opt_terms[key], color="k", ls=":", label="at the unrestricted optimum a*")
        ax.set_xlabel("reward queries (paths)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].legend(fontsize=8, loc="lower right", handles=axes[1].get_lines()[-1:])
    fig.suptitle(f"2-d Gaussian, quadratic reward, beta=1, Euler N=50, batch {B}, affine policy (4 pieces)\n"
                 f"exact evaluation; mean and min-max band over {len(seeds)} seed(s)")
    fig.tight_layout()
    path = save(fig, out_dir, NAME)
    final = {algo: float(np.mean([c["objective"][-1] for c in curves[algo]])) for algo in METHODS}
    return {"path": path, "final_objective": final, "class_optimum": J_class, "queries": int(its * B)}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
