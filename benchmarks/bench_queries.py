"""Benchmark (not a test): reward queries each method needs to close 95% of the gap between the
pretrained and the optimal objective on the Gaussian-mixture problem (``gmm2d``, residual MLP policy),
for several training step counts N. Objectives are Monte Carlo with a fixed evaluation seed (common random
numbers across methods and checkpoints), measured twice: with the training grid (the N-step chain the method
optimised) and with a fine ``--eval-steps`` grid (the learned policy as a continuous-time object; J* is the
exact fixed-init optimum E V*(0, Y_0), which the N-step chain itself cannot reach for small N).

    python benchmarks/bench_queries.py                 # N in 25 50 100, 200 iterations x 128 paths
    python benchmarks/bench_queries.py --quick

Prints a table: method, N, queries to 95% of the gap (or '>budget'), best objective, gap closed (both
evaluations), and for each method the spread of its best fine-grid objective over N (the "within 2% for
every N" goal).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from figures._common import GMM_SA_AC, METHOD_OVERRIDES
from toy_problems.train import build

METHODS = ("sa_ac", "ddpo_sf", "ddpo_is", "dpok")


def queries_to_close(algo: str, N: int, its: int, B: int, evals: int, n_eval: int, eval_steps: int,
                     seed: int = 0) -> dict:
    # the final greedy distillation (no reward queries; it moves only the last point) is off: the table measures
    # the training loop at every 1/evals of the budget
    if algo == "sa_ac":
        ov = {**GMM_SA_AC, "final_distill_steps": 0}
    else:
        ov = {**METHOD_OVERRIDES[algo], **({"critic": "residual"} if algo == "dpok" else {})}
    s = build(algo, "gmm2d", {"progress": False, **ov, "num_epochs": its, "batch_size": B, "num_steps": N,
                               "seed": seed})
    J_pre, J_opt = s.pretrained_objective(), s.optimum()
    grids = {"train": N, "fine": eval_steps}
    curves, queries, t0 = {g: [] for g in grids}, [], time.time()
    for i in range(evals):
        s.trainer.train(until=int(round(its * (i + 1) / evals)))
        queries.append(s.trainer.queries)
        for g, steps in grids.items():
            curves[g].append(s.trainer.evaluate(n_eval, steps=steps, beta=s.prob.beta)["objective"])
    out = {"algo": algo, "N": N, "J_opt": J_opt, "J_pre": J_pre, "eval_steps": eval_steps, "queries": queries,
           "seconds": time.time() - t0}
    for g, curve in curves.items():
        hits = [q for q, J in zip(queries, curve) if J - J_pre >= 0.95 * (J_opt - J_pre)]
        out[g] = {"curve": curve, "queries_95": hits[0] if hits else None, "best": max(curve),
                  "closed": (max(curve) - J_pre) / (J_opt - J_pre), "final": curve[-1]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--N", type=int, nargs="*", default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--eval-steps", type=int, default=200, help="fine evaluation grid")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    Ns = a.N or ([25] if a.quick else [25, 50, 100])
    its = a.iterations or (10 if a.quick else 200)
    B, evals, n_eval = (32, 2, 1024) if a.quick else (128, 20, 4096)
    eval_steps = 20 if a.quick else a.eval_steps
    rows = []
    for N in Ns:
        for algo in a.methods:
            rows.append(queries_to_close(algo, N, its, B, evals, n_eval, eval_steps))
            r = rows[-1]
            print(f"  {algo} N={N}: {r['seconds']:.0f}s", flush=True)
    budget = f">{its * B}"
    print(f"{'method':<10}{'N':>5} | {'train grid: queries to 95%':>27}{'best J':>9}{'closed':>8} | "
          f"{f'N={eval_steps} grid: queries to 95%':>28}{'best J':>9}{'closed':>8}")
    for r in rows:
        cells = []
        for grid in ("train", "fine"):
            g = r[grid]
            q = g["queries_95"] if g["queries_95"] is not None else budget
            cells.append(f"{q!s:>27}{g['best']:>9.4f}{g['closed']:>8.1%}")
        print(f"{r['algo']:<10}{r['N']:>5} | {cells[0]} | {cells[1]}")
    print(f"J* = {rows[0]['J_opt']:.4f} (exact, fixed init), J_pre = {rows[0]['J_pre']:.4f}; "
          f"budget {its * B} queries per run")
    for algo in a.methods:
        best = [r["fine"]["best"] for r in rows if r["algo"] == algo]
        print(f"{algo}: best fine-grid J over N {np.round(best, 4).tolist()}, "
              f"worst / best = {min(best) / max(best):.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
