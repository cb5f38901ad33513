"""Where the continuous-time actor-critic's step-count sensitivity and plateau come from (issue #18): one row per
cause on the linear-quadratic toy (``gauss2d``, 4-piece affine policy, beta = 1), each measured by the **exact**
continuous-time objective J of the trained policy, at the budget of figure 2 (60 iterations x 128 queries), for
N = 10 and 50 Euler training steps, 3 seeds (mean +- SE over seeds), against the optimum of the policy class
(-0.2447) and the floor of any method that optimises the N-step Euler chain (the chain's class optimum, evaluated
in continuous time; exact, by L-BFGS on the chain's moment recursion).

    python benchmarks/ablation_lq.py                    # ~8 min on 2 cores; JSON + markdown + PNG
    python benchmarks/ablation_lq.py --quick            # seconds (the test-suite size)

Rows: 'critic' (left-point costate, the old default), 'critic_next' (the new default), the critic's design
(residual) and steps, exact costates (the affine policy's exact value gradient, left point and next state),
sampled chain adjoints ('pathwise'), the likelihood-ratio estimator, random grid-time subsets, the trust-region /
learning-rate scale, 4x the budget, and DDPO-IS at its tuned settings. The chain-KL vs continuous-KL cause does
not act here: for Euler steps on the SDE's own grid the two per-step KLs are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = {"policy": "affine", "pieces": 4, "num_epochs": 60, "batch_size": 128, "progress": False}
#: (row name, algorithm, overrides, exact costates: None | 'left' | 'next')
ROWS = [
    ("critic (left point; old default)", "sa_ac", {"costate": "critic"}, None),
    ("critic_next (new default)", "sa_ac", {}, None),
    ("critic_next, residual critic", "sa_ac", {"critic": "residual"}, None),
    ("critic_next, residual, 4x critic steps", "sa_ac", {"critic": "residual", "value_epochs": 80}, None),
    ("critic_next, residual critic seeing x0_hat (figure default)", "sa_ac",
     {"critic": "residual", "critic_x0_input": True}, None),
    ("critic_next, residual seeing x0_hat + Sobolev term", "sa_ac",
     {"critic": "residual", "critic_x0_input": True, "value_grad_coef": 1.0}, None),
    ("exact costates, left point", "sa_ac", {"critic": "residual"}, "left"),
    ("exact costates, next state", "sa_ac", {"critic": "residual"}, "next"),
    ("pathwise (sampled chain adjoint)", "sa_ac", {"costate": "pathwise"}, None),
    ("likelihood-ratio estimator (residual critic)", "sa_ac", {"critic": "residual", "estimator": "likelihood_ratio"},
     None),
    ("random grid times (tau_subset N/5)", "sa_ac", {"critic": "residual", "tau_subset": -5}, None),
    ("trust region 10x looser (kl_penalty 0.1)", "sa_ac", {"critic": "residual", "kl_penalty": 0.1}, None),
    ("learning rate 3x (0.03)", "sa_ac", {"critic": "residual", "learning_rate": 0.03}, None),
    ("4x budget (240 iterations)", "sa_ac", {"critic": "residual", "num_epochs": 240}, None),
    ("DDPO-IS (tuned: lr 0.01, clip 0.1)", "ddpo_is", {}, None),
    # the baseline's tuning, same effort as the sa_ac rows above (5 settings around its defaults)
    ("DDPO-IS lr 0.003", "ddpo_is", {"learning_rate": 0.003}, None),
    ("DDPO-IS lr 0.03", "ddpo_is", {"learning_rate": 0.03}, None),
    ("DDPO-IS clip 0.05", "ddpo_is", {"clip_range": 0.05}, None),
    ("DDPO-IS clip 0.2", "ddpo_is", {"clip_range": 0.2}, None),
    ("DDPO-IS 8 PPO epochs", "ddpo_is", {"num_inner_epochs": 8}, None),
]


def _exact_costates(trainer, prob, where: str, pieces: int):
    """Replace the critic's gradient by the exact value gradient of the current affine policy (Feynman-Kac ODE),
    at step k's left point or next state; the critic still gives the values."""
    import torch

    from sa_theory.algorithms import values_on_grid

    def costates(batch):
        coeffs = prob.policy_value_coeffs(trainer.policy.theta_numpy(), pieces)
        n = batch.taus.numel() - 1
        rows = range(1, n + 1) if where == "next" else range(n)
        grads = []
        for k in rows:
            U, u, _ = coeffs(float(batch.taus[k]))
            grads.append(torch.as_tensor(-batch.states[k].double().numpy() @ U + u, dtype=batch.states.dtype))
        with torch.no_grad():
            v = values_on_grid(trainer.value, batch.taus[:n], batch.states[:n], batch.cond)
        return v, torch.stack(grads)

    return costates


def run_one(row: int, N: int, seed: int, quick: bool) -> dict:
    import torch

    from figures._common import METHOD_OVERRIDES
    from toy_problems.train import build

    torch.set_num_threads(1)
    name, algo, ov, exact = ROWS[row]
    ov = dict(ov)
    if ov.get("tau_subset", 0) < 0:
        ov["tau_subset"] = max(1, N // -ov["tau_subset"])
    cfg = {**METHOD_OVERRIDES[algo], **BASE, **ov, "num_steps": N, "seed": seed}
    if quick:
        cfg.update(num_epochs=3, batch_size=32)
    t0 = time.time()
    s = build(algo, "gauss2d", cfg)
    if exact:
        s.trainer.critic.costates = _exact_costates(s.trainer, s.prob, exact, s.toy.pieces)
    s.trainer.train()
    return {"row": row, "N": N, "seed": seed, "J": float(s.evaluate()["objective"]), "seconds": time.time() - t0}


def chain_floor(N: int) -> float:
    """The continuous-time J of the optimum of the 4-piece affine class on the N-step Euler chain."""
    from toy_problems.train import build, euler_chain_class_optimum

    return euler_chain_class_optimum(build("sa_ac", "gauss2d", {**BASE}).prob, 4, N)[0]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 iterations x 32 paths, 1 seed (smoke test)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ablation_lq"))
    ap.add_argument("--only", default=None, help="run the rows whose name contains this text (e.g. 'DDPO-IS')")
    ap.add_argument("--tag", default="", help="suffix of the output files (ablation<tag>.json/.md/.png)")
    a = ap.parse_args(argv)
    from tqdm.auto import tqdm

    from toy_problems.train import affine_class_optimum, build

    Ns, seeds = ([10], [0]) if a.quick else ([10, 50], [0, 1, 2])
    rows = [r for r in range(len(ROWS)) if a.only is None or a.only in ROWS[r][0]]
    jobs = [(r, N, s) for r in rows for N in Ns for s in seeds]
    jobs.sort(key=lambda j: -(j[1] * (4 if ROWS[j[0]][2].get("num_epochs") else 1)))  # longest first
    t0 = time.time()
    if a.workers == 1:
        out = [run_one(r, N, s, a.quick) for r, N, s in tqdm(jobs, desc="ablation runs", dynamic_ncols=True)]
    else:
        with ProcessPoolExecutor(a.workers) as pool:
            futs = [pool.submit(run_one, r, N, s, a.quick) for r, N, s in jobs]
            out = [f.result() for f in tqdm(futs, desc="ablation runs", dynamic_ncols=True)]
    J_class = affine_class_optimum(build("sa_ac", "gauss2d", {**BASE}).prob, 4)[0]
    floors = {N: chain_floor(N) for N in Ns}
    table = []
    for r in rows:
        name, cells = ROWS[r][0], {}
        for N in Ns:
            js = np.array([o["J"] for o in out if o["row"] == r and o["N"] == N])
            gap = 100 * (js - J_class) / abs(J_class)  # percent of |J*_class|; negative = below
            se = float(gap.std(ddof=1) / np.sqrt(gap.size)) if gap.size > 1 else float("nan")
            cells[str(N)] = {"J": float(js.mean()), "gap_pct": float(gap.mean()), "gap_pct_se": se}
        table.append({"row": name, **cells})
    res = {"class_optimum": J_class, "chain_floor": {str(N): v for N, v in floors.items()}, "Ns": Ns,
           "seeds": seeds, "budget_queries": BASE["num_epochs"] * BASE["batch_size"], "table": table,
           "wall_s": time.time() - t0, "runs": out}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"ablation{a.tag}.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    lines = ["| cause (row) | " + " | ".join(f"N = {N}: J gap to class optimum (%)" for N in Ns) + " |",
             "|---|" + "---|" * len(Ns)]
    lines.append("| floor: chain optimum of the class (exact) | " + " | ".join(
        f"{100 * (floors[N] - J_class) / abs(J_class):+.2f}" for N in Ns) + " |")
    for t in table:
        lines.append(f"| {t['row']} | " + " | ".join(
            f"{t[str(N)]['gap_pct']:+.2f} ± {t[str(N)]['gap_pct_se']:.2f}" for N in Ns) + " |")
    md = "\n".join(lines)
    with open(os.path.join(a.out, f"ablation{a.tag}.md"), "w") as fh:
        fh.write(md + "\n")
    print(md)
    print(f"class optimum {J_class:.4f}; wall {res['wall_s']:.0f} s")
    _plot(res, os.path.join(a.out, f"ablation{a.tag}.png"))
    return res


def _plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ns, rows = res["Ns"], res["table"]
    fig, ax = plt.subplots(figsize=(10, 6))
    y = np.arange(len(rows))
    h = 0.8 / len(Ns)
    for i, N in enumerate(Ns):
        g = [t[str(N)]["gap_pct"] for t in rows]
        e = [t[str(N)]["gap_pct_se"] for t in rows]
        ax.barh(y + i * h, g, h, xerr=e, label=f"N = {N}", color=f"C{i}")
        floor = 100 * (res["chain_floor"][str(N)] - res["class_optimum"]) / abs(res["class_optimum"])
        ax.axvline(floor, color=f"C{i}", ls="--", lw=1, label=f"N = {N}: Euler-chain floor")
    ax.set_yticks(y + h * (len(Ns) - 1) / 2, [t["row"] for t in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("exact J minus the class optimum, % of |J*| (mean ± SE over seeds)")
    ax.set_title("LQ toy: one cause per row (figure-2 budget)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
