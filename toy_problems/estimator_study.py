"""Estimator study: error to the exact gradient, per-path variance and cost against the step count N.

Used by ``benchmarks/bench_estimators.py`` (table + JSON + plot) and by figure 5. On a 2-d VP problem
(b from 0.1 to 20) with a quadratic reward and a 2-piece affine policy, each estimator of
:meth:`LinearGaussianProblem.estimate_gradient` is run at each N with a fixed number of paths; we record

* ``per_path_var``: mean over components of the per-path variance (``se^2 * paths``, batch means);
* ``bias``: ``|E[estimator] - grad J|`` -- the exact discrete gradient's distance to the continuous one
  for the unbiased estimators, the measured mean's distance otherwise (includes noise);
* ``sec_per_path``: CPU seconds per path (rollout + estimator), measured in this process;
* ``work_to_error``: CPU seconds to reach RMS error ``eps`` (the target), :math:`c\\,v/(\\epsilon^2 - b^2)`
  (infinite when the bias alone exceeds ``eps``).
"""

from __future__ import annotations

import math
import time

import numpy as np

from sa_theory import schedules

from .linear_gaussian import LinearGaussianProblem

__all__ = ["default_problem", "run_study", "format_table", "plot_study"]

ESTIMATORS = ("value_gradient", "pathwise", "lr_td", "lr_baseline", "lr_reward_to_go", "lr", "ddpo_sf")


def default_problem() -> tuple[LinearGaussianProblem, np.ndarray, int]:
    """The 2-d VP problem of the study and its policy parameters ``theta`` (2 pieces)."""
    prob = LinearGaussianProblem(
        m0=[0.5, -1.0], S0=[[1.0, 0.3], [0.3, 0.6]], schedule=schedules.VPLinear(b_min=0.1, b_max=20.0, T=1.0),
        Q=[[0.6, 0.1], [0.1, 0.4]], w=[1.0, -0.5], r0=0.0, beta=1.0,
    )
    theta = 0.2 * np.random.default_rng(0).normal(size=prob.n_params(2))
    return prob, theta, 2


def run_study(Ns=(25, 100, 400, 1600), paths: int = 2000, estimators=ESTIMATORS, seed: int = 0,
              eps_rel: float = 0.05, progress=None) -> dict:
    """Run every estimator at every N; returns ``{"records": [...], "exact_norm": ..., "eps": ...}``."""
    prob, theta, pieces = default_problem()
    exact = prob.exact_gradient(theta, pieces)
    eps = eps_rel * float(np.linalg.norm(exact))
    records = []
    for N in Ns:
        discrete = prob.discrete_gradient(theta, pieces, int(N))
        for name in estimators:
            t0 = time.process_time()
            mean, se = prob.estimate_gradient(theta, pieces, estimator=name, steps=int(N), paths=paths, seed=seed,
                                              groups=40)
            cpu = time.process_time() - t0
            unbiased = name not in ("value_gradient", "lr_td")
            bias = float(np.linalg.norm((discrete if unbiased else mean) - exact))
            var = float(np.mean(se**2) * paths)
            total_var = float(np.sum(se**2) * paths)
            spp = cpu / paths
            work = spp * total_var / (eps**2 - bias**2) if eps > bias else math.inf
            records.append(dict(estimator=name, N=int(N), paths=paths, per_path_var=var, bias=bias,
                                error=float(np.linalg.norm(mean - exact)), sec_per_path=spp, cpu_s=cpu,
                                work_to_error=work))
            if progress is not None:
                progress(name, N)
    return {"records": records, "exact_norm": float(np.linalg.norm(exact)), "eps": eps, "paths": paths}


def format_table(study: dict) -> str:
    """Markdown table: per-path variance and CPU-seconds-to-error per estimator and N."""
    recs = study["records"]
    Ns = sorted({r["N"] for r in recs})
    names = list(dict.fromkeys(r["estimator"] for r in recs))
    get = {(r["estimator"], r["N"]): r for r in recs}
    head = "| estimator | " + " | ".join(f"var N={n}" for n in Ns) + " | " + \
        " | ".join(f"s to eps N={n}" for n in Ns) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(Ns))]
    for name in names:
        v = " | ".join(f"{get[name, n]['per_path_var']:.3g}" for n in Ns)
        w = " | ".join(f"{get[name, n]['work_to_error']:.3g}" for n in Ns)
        lines.append(f"| {name} | {v} | {w} |")
    lines.append(f"\n|grad J| = {study['exact_norm']:.4g}; eps (RMS error target) = {study['eps']:.4g}; "
                 f"{study['paths']} paths per run.")
    return "\n".join(lines)


def plot_study(study: dict, path: str, title: str | None = None) -> None:
    """Two panels: per-path variance vs N, and CPU seconds to the RMS error target vs N (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = study["records"]
    names = list(dict.fromkeys(r["estimator"] for r in recs))
    fig, axes = plt.subplots(1, 2, figsize=(10, 6), dpi=100)
    for i, name in enumerate(names):
        rs = sorted((r for r in recs if r["estimator"] == name), key=lambda r: r["N"])
        Ns = [r["N"] for r in rs]
        style = "o-" if name in ("value_gradient", "pathwise", "lr_td") else "s--"
        axes[0].loglog(Ns, [r["per_path_var"] for r in rs], style, color=f"C{i}", label=name)
        finite = [(r["N"], r["work_to_error"]) for r in rs if math.isfinite(r["work_to_error"])]
        if finite:
            axes[1].loglog(*zip(*finite), style, color=f"C{i}", label=name)
    axes[0].set(xlabel="sampler steps N", ylabel="per-path variance (mean over gradient components)",
                title="variance vs. discretisation (flat = continuous-time limit)")
    axes[1].set(xlabel="sampler steps N", ylabel=f"CPU seconds to RMS error {study['eps']:.3g}",
                title="cost to a fixed error (missing: bias alone exceeds it)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title or f"Policy-gradient estimators on a 2-d VP problem (|grad J| = {study['exact_norm']:.3g}, "
                 f"{study['paths']} paths per point)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
