"""Benchmark (not a test): reward queries each method needs to close 95% of the gap between the
pretrained and the optimal objective on the Gaussian-mixture problem (``gmm2d``, residual MLP policy),
for several sampler step counts N. Objectives are Monte Carlo (evaluation with the training N, fixed
seed); J* is the exact fixed-init optimum E V*(0, Y_0).

    python benchmarks/bench_queries.py                 # N in 25 50 100, 200 iterations x 128 paths
    python benchmarks/bench_queries.py --quick

Prints a table: method, N, queries to 95% of the gap (or '>budget'), best objective, gap closed.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from figures._common import METHOD_OVERRIDES
from toy_problems.train import build


def queries_to_close(algo: str, N: int, its: int, B: int, evals: int, n_eval: int, seed: int = 0) -> dict:
    s = build(algo, "gmm2d", {"progress": False, **METHOD_OVERRIDES[algo], "iterations": its, "batch_size": B,
                               "sampler_steps": N, "seed": seed,
                               **({"critic": "residual"} if algo in ("sa_ac", "dpok") else {})})
    J_pre, J_opt = s.pretrained_objective(), s.optimum()
    hit, best, curve = None, -np.inf, []
    for i in range(evals):
        s.trainer.train(until=int(round(its * (i + 1) / evals)))
        J = s.trainer.evaluate(n_eval, beta=s.prob.beta)["objective"]
        curve.append((s.trainer.queries, J))
        best = max(best, J)
        if hit is None and (J - J_pre) >= 0.95 * (J_opt - J_pre):
            hit = s.trainer.queries
    return {"algo": algo, "N": N, "queries_95": hit, "best": best, "closed": (best - J_pre) / (J_opt - J_pre),
            "J_opt": J_opt, "curve": curve}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--N", type=int, nargs="*", default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    Ns = a.N or ([25] if a.quick else [25, 50, 100])
    its = a.iterations or (10 if a.quick else 200)
    B, evals, n_eval = (32, 2, 1024) if a.quick else (128, 20, 4096)
    rows = [queries_to_close(algo, N, its, B, evals, n_eval) for N in Ns
            for algo in ("sa_ac", "ddpo_sf", "ddpo_is", "dpok")]
    print(f"{'method':<10}{'N':>5}{'queries to 95%':>16}{'best J':>9}{'gap closed':>12}")
    for r in rows:
        q = r["queries_95"] if r["queries_95"] is not None else f">{its * B}"
        print(f"{r['algo']:<10}{r['N']:>5}{q!s:>16}{r['best']:>9.4f}{r['closed']:>12.1%}")
    print(f"J* = {rows[0]['J_opt']:.4f} (exact, fixed init); budget {its * B} queries per run")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
