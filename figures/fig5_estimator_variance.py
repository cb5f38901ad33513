"""Figure 5: estimator variance and cost to a fixed error against the step count N (theory.md §3, R5).

Plots the estimators benchmark (``benchmarks/bench_estimators.py``, shared code in
:mod:`toy_problems.estimator_study`): its saved results ``benchmarks/results/estimators.json`` when present
(full mode), otherwise the study is run here (``--quick``: 3 estimators, N in {10, 40}, 400 paths, and a
loose error target of 40% of |grad J| -- at these N the discretisation bias alone exceeds the full study's 5%,
which would leave the cost panel empty). The headline is the cost ratio at the largest N where both costs are
finite.
"""

from __future__ import annotations

import json
import math
import os

from figures._common import HERE, figure_main, out_path, setup_torch
from toy_problems.estimator_study import plot_study, run_study

NAME = "fig5_estimator_variance.png"
RESULTS = os.path.join(os.path.dirname(HERE), "benchmarks", "results", "estimators.json")


def run(out_dir: str | None = None, quick: bool = False) -> dict:
    setup_torch()
    if not quick and os.path.exists(RESULTS):
        with open(RESULTS) as fh:
            study = json.load(fh)
        source = RESULTS
    elif quick:
        study = run_study(Ns=(10, 40), paths=400, estimators=("value_gradient", "lr", "ddpo_sf"), eps_rel=0.4)
        source = "computed (quick)"
    else:
        study = run_study()
        source = "computed"
    path = out_path(out_dir, NAME)
    plot_study(study, path)
    get = {(r["estimator"], r["N"]): r["work_to_error"] for r in study["records"]}
    finite = [n for (e, n), w in get.items() if e == "ddpo_sf" and math.isfinite(w)
              and math.isfinite(get.get(("value_gradient", n), math.inf))]
    if not finite:
        return {"path": path, "source": source, "ddpo_sf/value_gradient cost ratio": "n/a (bias exceeds target)"}
    Nmax = max(finite)
    ratio = get["ddpo_sf", Nmax] / get["value_gradient", Nmax]
    return {"path": path, "source": source, f"ddpo_sf/value_gradient cost ratio at N={Nmax}": ratio}


def main(argv=None) -> None:
    figure_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
