"""Figure 6: 2-d Gaussian mixture (linear reward): pretrained law, fine-tuned sampler, exact target.

Left: the data density (contours) and pretrained samples; middle: samples of the sampler fine-tuned by
the continuous-time actor-critic (residual MLP policy, residual critic that also sees x0_hat, trained with
Euler N=20, the actor finally distilled onto its critic's greedy policy, sampled with N=200) over the exact
target's contours;
right: exact draws of the fixed-init optimum (theory.md R2; for VP with b_max=20 it equals the tilted
mixture p_data e^{r/beta}/Z up to ~4e-5) over the tilted mixture's contours. Component weights are
estimated by soft assignment to the tilted mixture and printed in the titles.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from figures._common import GMM_SA_AC, GMM_SA_AC_QUICK, figure_main, save, setup_torch
from toy_problems.train import build, mixture_statistics

NAME = "fig6_mixture_densities.png"


def _mixture_density(weights, means, covs, X, Y):
    pts = np.stack([X.ravel(), Y.ravel()], 1)
    p = np.zeros(len(pts))
    for w, m, C in zip(weights, means, covs):
        d = pts - m
        Ci = np.linalg.inv(C)
        p += w * np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, Ci, d)) / (2 * np.pi * np.sqrt(np.linalg.det(C)))
    return p.reshape(X.shape)


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    its, B, n = (4, 32, 1000) if quick else (300, 256, 4000)
    ov = GMM_SA_AC_QUICK if quick else GMM_SA_AC
    s = build("sa_ac", "gmm2d", {"progress": False, **ov, "num_epochs": its, "batch_size": B, "num_steps": 20,
                                 "seed": 0})
    s.trainer.train()
    prob = s.prob
    W, M, C = prob.tilted_law()
    ev = s.trainer.evaluate(n, steps=200, return_samples=True, beta=prob.beta)
    tuned = ev["final"].double().numpy()
    exact = prob.sample_optimal_terminal(n, rng=1)
    data = prob.sample_data(n, rng=2)
    X, Y = np.meshgrid(np.linspace(-3.5, 3.5, 200), np.linspace(-2.8, 3.8, 200))
    dens_data = _mixture_density(prob.weights, prob.means, prob.covs, X, Y)
    dens_tilt = _mixture_density(W, M, C, X, Y)
    fig, axes = plt.subplots(1, 3, figsize=(12, 5), sharex=True, sharey=True)
    stats = {}
    for ax, (title, pts, dens, col) in zip(axes, [
            ("pretrained (data law)", data, dens_data, "C7"),
            (f"fine-tuned, continuous-time AC ({its * B} queries),\nactor distilled onto its critic's greedy policy",
             tuned, dens_tilt, "C0"),
            ("exact target (fixed-init optimum = tilt)", exact, dens_tilt, "C3")]):
        ax.contour(X, Y, dens, levels=8, colors="k", linewidths=0.7)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.3, color=col)
        w_hat, _ = mixture_statistics(pts, W, M, C)
        stats[title] = w_hat
        ax.set_title(f"{title}\nweights {np.array2string(w_hat, precision=2)}", fontsize=9)
        ax.set_xlabel("x1")
        ax.set_aspect("equal")
    axes[0].set_ylabel("x2")
    fig.suptitle(f"Gaussian mixture, reward r(x) = w.x, w = {prob.w.tolist()}, beta = {prob.beta:g}; "
                 f"tilted weights {np.array2string(W, precision=3)}")
    fig.tight_layout()
    path = save(fig, out_dir, NAME)
    return {"path": path, "tilted_weights": W.tolist(), "learned_weights": stats[list(stats)[1]].tolist(),
            "objective": ev["objective"], "objective_se": ev["objective_se"]}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
