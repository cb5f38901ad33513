"""Figure 3: robustness to the solver. Each method trained with Euler (N = 50); the continuous-time
method also trained with Heun, torchsde Milstein and SRK. Every trained policy is evaluated (Monte
Carlo, N = 50) with Euler, Heun, Milstein, SRK and the probability-flow ODE. ``gauss2d``, affine policy.
The ODE's path KL is infinite (singular path laws, theory.md R11); its natural regulariser is the terminal
KL, so the ODE column reports E r(Y_T) - beta KL(law(Y_T) || pretrained terminal law). With an affine
policy on this Gaussian problem the ODE's terminal law is Gaussian, so the KL is the Gaussian KL of the
sample moments. Error bars: +-1 Monte-Carlo standard error (native solvers share one seed, torchsde
solvers share one Brownian entropy, so differences between backends are Monte-Carlo noise; Milstein
equals Euler for this additive noise)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from figures._common import FIGSIZE, LABELS, METHODS, figure_main, save, setup_torch, train_curve
from toy_problems import gaussian_kl

NAME = "fig3_solvers.png"
EVAL = ["euler", "heun", "milstein", "srk", "ode"]


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    its, B, n = (3, 32, 512) if quick else (80, 128, 8192)
    runs = [("sa_ac", "euler"), ("sa_ac", "heun"), ("sa_ac", "milstein"), ("sa_ac", "srk")]
    runs += [(m, "euler") for m in METHODS if m != "sa_ac"]
    if quick:
        runs = [("sa_ac", "euler"), ("sa_ac", "heun"), ("ddpo_is", "euler")]
    rows, table, errs = [], [], []
    for algo, solver in runs:
        s, _ = train_curve(algo, "gauss2d", {"policy": "affine", "pieces": 4, "num_epochs": its, "batch_size": B,
                                             "solver": solver, "num_steps": 50, "seed": 0}, evals=1)
        row, err = [], []
        for ev in EVAL:
            if ev == "ode":
                e = s.trainer.evaluate(n, steps=50, solver=ev, return_samples=True, beta=s.prob.beta)
                x = e["final"].double().numpy()
                kl = gaussian_kl(x.mean(0), np.cov(x.T), *s.prob.pretrained_terminal_law())
                row.append(e["reward"] - s.prob.beta * kl)
                err.append(e["reward_se"])
            else:
                e = s.evaluate(steps=50, solver=ev, n_paths=n)
                row.append(e["objective"])
                err.append(e["objective_se"])
        rows.append(f"{LABELS[algo]}\ntrained: {solver}")
        table.append(row)
        errs.append(err)
    table = np.array(table)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    x = np.arange(len(EVAL))
    w = 0.8 / len(rows)
    for i, (lab, row) in enumerate(zip(rows, table)):
        ax.errorbar(x + (i - len(rows) / 2 + 0.5) * w, row, yerr=errs[i], fmt="o", ms=8, capsize=3,
                    label=lab.replace("\n", ", "))
    J_star = s.prob.optimal_objective()
    ax.axhline(J_star, color="k", ls=":", label="unrestricted optimum J*")
    ax.set_xticks(x, ["Euler", "Heun", "Milstein (torchsde)", "SRK (torchsde)", "prob.-flow ODE*"])
    ax.set_ylabel("objective J (Monte Carlo, N = 50, +-1 SE)")
    ax.set_ylim(min(table.min(), J_star) - 0.1, max(table.max(), J_star) + 0.05)
    ax.set_title(f"Evaluation solver vs training solver ({its * B} queries each, {n} evaluation paths)\n"
                 "*ODE: E r - beta KL(terminal law || pretrained terminal law) (R11)")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = save(fig, out_dir, NAME)
    return {"path": path, "rows": rows, "table": table.tolist()}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
