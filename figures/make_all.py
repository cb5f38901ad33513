"""Regenerate every figure (``sa-figures``; ``--quick`` for the reduced sizes used by the tests).

    sa-figures                 # full size, PNGs next to the scripts in figures/
    sa-figures --quick --out /tmp/figs
    sa-figures --only 1 4 6

Prints a progress bar over the figures and a summary table (figure, seconds, file, headline numbers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

from tqdm.auto import tqdm

FIGURES = {
    1: "figures.fig1_learning_curves",
    2: "figures.fig2_discretisation",
    3: "figures.fig3_solvers",
    4: "figures.fig4_reward_kl_frontier",
    5: "figures.fig5_estimator_variance",
    6: "figures.fig6_mixture_densities",
    7: "figures.fig7_value_ablation",
}


def _headline(res: dict) -> str:
    keys = [k for k in res if k != "path"][:2]
    fmt = lambda x: round(x, 4) if isinstance(x, float) else str(x)
    return json.dumps({k: res[k] for k in keys}, default=fmt)[:110]


def make_all(out_dir: str | None = None, quick: bool = False, only: list[int] | None = None) -> list[dict]:
    rows = []
    nums = only or list(FIGURES)
    for n in tqdm(nums, desc="figures", dynamic_ncols=True):
        mod = importlib.import_module(FIGURES[n])
        t0 = time.time()
        res = mod.run(out_dir, quick=quick)
        rows.append({"figure": n, "seconds": time.time() - t0, "path": res["path"], "result": res})
    print(f"\n{'fig':>3}  {'seconds':>8}  {'file':<34} headline")
    for r in rows:
        print(f"{r['figure']:>3}  {r['seconds']:8.1f}  {r['path'].split('/')[-1]:<34} {_headline(r['result'])}")
    print(f"total {sum(r['seconds'] for r in rows):.1f} s ({'quick' if quick else 'full'} mode)")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sa-figures", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes (seconds per figure)")
    p.add_argument("--out", default=None, help="output directory (default: next to the scripts)")
    p.add_argument("--only", type=int, nargs="*", default=None, help="figure numbers to make")
    a = p.parse_args(argv)
    make_all(a.out, a.quick, a.only)


if __name__ == "__main__":
    main()
