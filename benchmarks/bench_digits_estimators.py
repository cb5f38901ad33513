"""The image sa_ac with its two estimators on the digits model, same budget (issue #14): likelihood-ratio (R5 with
the residual critic as baseline) vs value-gradient (R4/R8 with the critic's costates), the regulariser as the
exact KL of the K-step chain (default) vs the continuous-time estimate, and the critic fitted jointly with the actor
(``value.fit joint``, default) vs in its own phase before the advantages (``separate``, 4 passes); K = 10, seeds 0-2,
the digits experiment's settings otherwise (``digits.experiment.ExperimentConfig``).

    python benchmarks/bench_digits_estimators.py [--seeds 0 1 2] [--out benchmarks/results/digits_estimators.json]

Prints final reward and path KL (evaluation: 60 images, fixed prompts and noise; mean +- SE) per estimator and
seed, and the means over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

#: (train.estimator, train.kl_weighting, value.fit) of sa_ac; the first is the default
VARIANTS = [("likelihood_ratio", "chain", "joint"), ("likelihood_ratio", "continuous", "joint"),
            ("value_gradient", "chain", "joint"), ("likelihood_ratio", "chain", "separate"),
            ("value_gradient", "chain", "separate")]
SEPARATE_EPOCHS = 4  # value.epochs of the separate critic phase
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> dict:
    import torch

    from digits.experiment import ExperimentConfig, prepare_assets, run_finetune

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=None, help="subset, e.g. value_gradient/chain/joint")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_estimators.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ec = ExperimentConfig()
    assets = prepare_assets(ec)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for est, klw, fit in [v for v in VARIANTS if a.variants is None or "/".join(v) in a.variants]:
            for s in a.seeds:
                t0 = time.time()
                vary = dict(sa_ac_estimator=est, kl_weighting=klw, value_fit=fit,
                            value_epochs=SEPARATE_EPOCHS if fit == "separate" else 1)
                res = run_finetune(dataclasses.replace(ec, **vary), assets, "sa_ac", s, ec.num_steps,
                                   os.path.join(tmp, f"{est}_{klw}_{fit}_{s}"))
                est_name = f"{est}/{klw}/{fit}"
                f = res["final"]
                rows.append({"estimator": est_name, "seed": s, "reward": f["reward_mean"], "reward_se": f["reward_se"],
                             "path_kl": f["path_kl_mean"], "path_kl_se": f["path_kl_se"],
                             "path_kl_ct": f["path_kl_ct_mean"], "path_kl_ct_se": f["path_kl_ct_se"],
                             "queries": res["queries"][-1], "seconds": time.time() - t0})
                r = rows[-1]
                print(f"{est_name:>28} seed {s}: reward {r['reward']:.4f} +- {r['reward_se']:.4f}  path KL chain "
                      f"{r['path_kl']:.3f} +- {r['path_kl_se']:.3f}, continuous {r['path_kl_ct']:.3f} +- "
                      f"{r['path_kl_ct_se']:.3f}  ({r['queries']} queries, {r['seconds']:.0f} s)", flush=True)
    summary = {}
    for est in dict.fromkeys(r["estimator"] for r in rows):
        rs = [r for r in rows if r["estimator"] == est]
        n = len(rs)
        mr = sum(r["reward"] for r in rs) / n
        mk = sum(r["path_kl"] for r in rs) / n
        mc = sum(r["path_kl_ct"] for r in rs) / n
        sr = (sum((r["reward"] - mr) ** 2 for r in rs) / max(1, n - 1)) ** 0.5 / n**0.5
        J = mr - ec.beta * mk  # the regularised objective E r - beta KL (chain KL: the sampler actually run)
        summary[est] = {"reward_mean_over_seeds": mr, "reward_se_over_seeds": sr, "path_kl_mean_over_seeds": mk,
                        "path_kl_ct_mean_over_seeds": mc, "objective_chain_kl": J}
        print(f"{est:>28}: reward {mr:.4f} +- {sr:.4f} (SE over {n} seeds), path KL chain {mk:.3f}, "
              f"continuous {mc:.3f}; E r - beta KL = {J:.3f} (beta {ec.beta})")
    out = {"rows": rows, "summary": summary, "config": dataclasses.asdict(ec)}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
