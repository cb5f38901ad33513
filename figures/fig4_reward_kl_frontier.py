"""Figure 4: reward-KL frontier. The continuous-time actor-critic trained for a sweep of beta, against
the closed-form frontier (reward and path KL of the optimal control a* for each beta) on ``gauss2d``.

Each learned point is evaluated exactly (affine policy, 4 pieces). The closed-form frontier is for the
unrestricted optimum; the optimum of the 4-piece class lies slightly inside it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from figures._common import COLORS, FIGSIZE, LABELS, figure_main, save, setup_torch, train_curve
from toy_problems.train import make_problem

NAME = "fig4_reward_kl_frontier.png"


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    betas = [0.5, 2.0] if quick else [0.25, 0.5, 1.0, 2.0, 4.0]
    its, B = (4, 32) if quick else (120, 128)
    methods = ["sa_ac"] if quick else ["sa_ac", "ddpo_is"]
    learned = {m: [] for m in methods}
    for m in methods:
        for beta in betas:
            _, c = train_curve(m, "gauss2d", {"policy": "affine", "pieces": 4, "num_epochs": its, "batch_size": B,
                                              "beta": beta, "seed": 0}, evals=1)
            learned[m].append((c["path_kl"][-1], c["reward"][-1]))
    dense = np.geomspace(0.15, 8.0, 8 if quick else 25)
    optima = (make_problem("gauss2d", b).optimal_terms() for b in dense)
    frontier = np.array([[t["path_kl"], t["reward"]] for t in optima])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot(frontier[:, 0], frontier[:, 1], "k-", label="closed-form frontier (a* for each beta)")
    for beta in betas:
        t = make_problem("gauss2d", beta).optimal_terms()
        ax.plot(t["path_kl"], t["reward"], "k+", ms=12)
    for m in methods:
        pts = np.array(learned[m])
        ax.plot(pts[:, 0], pts[:, 1], "o--", color=COLORS[m], label=f"{LABELS[m]}, {its * B} queries")
        for (x, y), beta in zip(pts, betas):
            ax.annotate(f"beta={beta:g}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8,
                        color=COLORS[m])
    ax.set_xlabel("path KL(P^theta || P^pre)  (nats)")
    ax.set_ylabel("expected reward E r(Y_T)")
    ax.set_title("Reward-KL frontier on a 2-d Gaussian (exact evaluation; + = closed-form optimum at the same beta)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = save(fig, out_dir, NAME)
    return {"path": path, "betas": betas, "learned": {m: [tuple(map(float, p)) for p in v] for m, v in learned.items()}}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
