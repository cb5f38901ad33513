"""Figure 2: robustness to discretisation. Left: final exact objective against the training step count
N for each method (same budget, mean +- SE over 3 seeds), with the floor of any method that optimises the
N-step Euler chain (the chain's class optimum, evaluated exactly in continuous time). Right: the
continuous-time method (seed 0) trained with N and evaluated (Monte Carlo, Euler) with N'. ``gauss2d``,
affine policy (4 pieces)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from figures._common import COLORS, FIGSIZE, LABELS, METHODS, figure_main, save, setup_torch, train_curve
from toy_problems.train import affine_class_optimum, euler_chain_class_optimum

NAME = "fig2_discretisation.png"


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    Ns = [10, 50] if quick else [10, 25, 50, 100, 200]
    its, B = (3, 32) if quick else (60, 128)
    methods = ["sa_ac", "ddpo_is"] if quick else list(METHODS)
    seeds = [0] if quick else [0, 1, 2]
    final, final_se, setups = {m: [] for m in methods}, {m: [] for m in methods}, {}
    for m in methods:
        for N in Ns:
            js = []
            for seed in seeds:
                s, c = train_curve(m, "gauss2d", {"policy": "affine", "pieces": 4, "num_epochs": its,
                                                  "batch_size": B, "num_steps": N, "seed": seed}, evals=1)
                js.append(c["objective"][-1])
                if m == "sa_ac" and seed == 0:
                    setups[N] = s
            final[m].append(float(np.mean(js)))
            final_se[m].append(float(np.std(js, ddof=1) / np.sqrt(len(js))) if len(js) > 1 else 0.0)
    cross = np.array([[setups[N].evaluate(steps=Ne, n_paths=2048 if quick else 8192)["objective"] for Ne in Ns]
                      for N in Ns])
    prob = setups[Ns[0]].prob
    J_class = affine_class_optimum(prob, 4, polish=not quick)[0]
    floor = [euler_chain_class_optimum(prob, 4, N)[0] for N in Ns]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=FIGSIZE)
    for m in methods:
        a1.errorbar(Ns, final[m], yerr=final_se[m], fmt="o-", capsize=3, color=COLORS[m], label=LABELS[m])
    a1.axhline(J_class, color="k", ls="--", label="optimum of the policy class")
    a1.plot(Ns, floor, "k:", marker="x", label="best J reachable by training on the N-step Euler chain")
    a1.set_xscale("log")
    a1.set_xticks(Ns, [str(n) for n in Ns])
    a1.set_xlabel("training sampler steps N")
    a1.set_ylabel("final objective J (exact, continuous time)")
    a1.set_title(f"final J after {its * B} queries vs training N ({len(seeds)} seed(s), ± SE)")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    im = a2.imshow(cross, cmap="viridis", origin="lower")
    a2.set_xticks(range(len(Ns)), [str(n) for n in Ns])
    a2.set_yticks(range(len(Ns)), [str(n) for n in Ns])
    a2.set_xlabel("evaluation steps N' (Euler, Monte Carlo)")
    a2.set_ylabel("training steps N")
    a2.set_title("continuous-time AC:\nJ of the N'-step Euler sampler")
    for i in range(len(Ns)):
        for j in range(len(Ns)):
            a2.text(j, i, f"{cross[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=a2)
    fig.tight_layout()
    path = save(fig, out_dir, NAME)
    return {"path": path, "Ns": Ns, "final": {m: [float(x) for x in v] for m, v in final.items()},
            "final_se": final_se, "class_optimum": J_class, "chain_floor": floor,
            "spread_pct": {m: float(100 * (max(v) - min(v)) / abs(J_class)) for m, v in final.items()}}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
