"""Shared helpers of the figure scripts: sizes, training runs with exact evaluation, plotting style."""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from toy_problems import LinearGaussianProblem  # noqa: E402
from toy_problems.train import build  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIGSIZE = (10, 6)  # inches at dpi 100 -> 1000 x 600 px
DPI = 100
METHODS = ("sa_ac", "ddpo_sf", "ddpo_is", "dpok")
LABELS = {"sa_ac": "continuous-time AC (ours)", "ddpo_sf": "DDPO-SF", "ddpo_is": "DDPO-IS", "dpok": "DPOK"}
COLORS = {"sa_ac": "C0", "ddpo_sf": "C1", "ddpo_is": "C2", "dpok": "C3"}

#: per-method hyper-parameters shared by all figures (same rollouts / budgets; learning rates picked once). The
#: actor-critic's critic and the baselines' settings come from one tuning grid of equal size per method on the LQ
#: toy (benchmarks/ablation_lq.py): sa_ac's residual critic seeing x0_hat; DDPO-IS's defaults were best of its grid
METHOD_OVERRIDES = {
    "sa_ac": {"learning_rate": 0.01, "lr_schedule": "cosine", "critic": "residual", "critic_x0_input": True},
    "ddpo_sf": {"learning_rate": 0.01, "lr_schedule": "cosine"},
    "ddpo_is": {"learning_rate": 0.01, "lr_schedule": "cosine", "clip_range": 0.1},
    "dpok": {"learning_rate": 0.01, "lr_schedule": "cosine"},
}

#: the continuous-time AC on the Gaussian mixture (figure 6, bench_queries): residual MLP policy, 8 actor
#: epochs with a light KL-to-old penalty, residual critic that also sees Tweedie's x0_hat, decaying critic lr,
#: and at the end 4000 steps distilling the actor onto the final critic's greedy policy (no reward queries).
#: Costate at the left point ('critic'): on the mixture it measured closer to the tilted law than the chain-consistent
#: 'critic_next' (small-mode weight 0.075 against 0.099, exact 0.068; benchmarks/README.md, "The actor and its
#: critic on the mixture")
GMM_SA_AC = {"learning_rate": 0.01, "lr_schedule": "cosine", "num_inner_epochs": 8, "kl_penalty": 0.1,
             "critic": "residual",
             "critic_x0_input": True, "value_lr_schedule": "cosine", "final_distill_steps": 4000,
             "costate": "critic"}
#: GMM_SA_AC at the reduced size of the figure tests (``quick``): a token distillation
GMM_SA_AC_QUICK = {**GMM_SA_AC, "final_distill_steps": 10, "final_distill_paths": 64}


def setup_torch() -> None:
    torch.set_num_threads(1)  # tiny 2-d problems: one thread is fastest and avoids oversubscription


def out_path(out_dir: str | None, name: str) -> str:
    d = out_dir or HERE
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)


def save(fig, out_dir: str | None, name: str) -> str:
    path = out_path(out_dir, name)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


#: exact terms of the untrained affine policy (the pretrained sampler) per (problem, beta, pieces): every run of a
#: figure starts there, so its ODE evaluation (0.3 s) is done once per process instead of once per run
_START_TERMS: dict = {}


def _start_terms(s) -> dict:
    """``s.evaluate()`` before training; memoised when it is the exact evaluation of the zero affine policy (a
    function of the problem, its beta and the piece count only, so the memo returns the same floats)."""
    if not (isinstance(s.prob, LinearGaussianProblem) and s.toy.policy == "affine") or s.policy.theta.detach().any():
        return s.evaluate()
    key = (s.toy.problem, float(s.prob.beta), int(s.toy.pieces))
    if key not in _START_TERMS:
        _START_TERMS[key] = s.evaluate()
    return dict(_START_TERMS[key])


def train_curve(algo: str, problem: str, overrides: dict, evals: int = 8, exact: bool = True):
    """Train ``algo`` and evaluate ``evals`` times along the way (exact J for the affine policy on a
    linear-Gaussian problem). Returns ``(setup, curve)`` with ``curve`` a dict of arrays over
    evaluation points: ``queries``, ``objective``, ``reward``, ``path_kl``."""
    ov = {"progress": False, **METHOD_OVERRIDES.get(algo, {}), **overrides}
    s = build(algo, problem, ov)
    its = s.cfg.num_epochs
    marks = sorted({int(round(its * (i + 1) / evals)) for i in range(evals)})
    curve = {"queries": [0], "objective": [], "reward": [], "path_kl": []}
    e = _start_terms(s) if exact else s.evaluate(steps=s.cfg.num_steps)
    for k in ("objective", "reward", "path_kl"):
        curve[k].append(e[k])
    for m in marks:
        s.trainer.train(until=m)
        e = s.evaluate() if exact else s.evaluate(steps=s.cfg.num_steps)
        curve["queries"].append(s.trainer.queries)
        for k in ("objective", "reward", "path_kl"):
            curve[k].append(e[k])
    return s, {k: np.asarray(v, dtype=float) for k, v in curve.items()}


class Timer:
    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t0


def figure_main(run, doc: str, argv=None) -> None:
    """Command line of one figure script: ``python -m figures.figN_... [--quick] [--out DIR]``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced size (seconds)")
    p.add_argument("--out", default=None, help="output directory (default: figures/; with --quick a scratch folder)")
    a = p.parse_args(argv)
    if a.quick and a.out is None:  # reduced-size PNGs never replace the committed ones
        from figures.make_all import QUICK_OUT

        a.out = QUICK_OUT
    print(run(a.out, a.quick))
