"""Regenerate every figure (``sa-figures``; ``--quick`` for the reduced sizes used by the tests).

    sa-figures                 # full size, PNGs next to the scripts in figures/
    sa-figures --quick         # reduced sizes, into a scratch folder (QUICK_OUT), never over figures/
    sa-figures --quick --out /tmp/figs
    sa-figures --only 1 4 6
    sa-figures --workers 1     # one process (default: one per CPU core, at most 2; each uses one thread)

Prints a progress bar over the figures and a summary table (figure, seconds, file, headline numbers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm.auto import tqdm

FIGURES = {
    1: "figures.fig1_learning_curves",
    2: "figures.fig2_discretisation",
    3: "figures.fig3_solvers",
    4: "figures.fig4_reward_kl_frontier",
    5: "figures.fig5_estimator_variance",
    6: "figures.fig6_mixture_densities",
    7: "figures.fig7_value_ablation",
    8: "figures.fig8_noise_family",
}
#: submission order for parallel runs (longest full-size figures first, so two workers finish together)
SLOW_FIRST = [2, 1, 4, 3, 6, 8, 7, 5]


def _headline(res: dict) -> str:
    keys = [k for k in res if k != "path"][:2]
    fmt = lambda x: round(x, 4) if isinstance(x, float) else str(x)
    return json.dumps({k: res[k] for k in keys}, default=fmt)[:110]


def _run_one(n: int, out_dir: str | None, quick: bool) -> dict:
    mod = importlib.import_module(FIGURES[n])
    t0 = time.time()
    res = mod.run(out_dir, quick=quick)
    return {"figure": n, "seconds": time.time() - t0, "path": res["path"], "result": res}


def default_workers() -> int:
    """One process per available core, at most 2 (the figures are single-threaded tiny-tensor work)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


#: where ``--quick`` writes by default: a scratch folder, so reduced-size PNGs never replace the committed ones
QUICK_OUT = os.path.join(tempfile.gettempdir(), "sa-figures-quick")
FIGURES_DIR = os.path.dirname(os.path.abspath(__file__))


def make_all(out_dir: str | None = None, quick: bool = False, only: list[int] | None = None,
             workers: int | None = None, on_done=None, progress: bool = True) -> list[dict]:
    """Run the figure scripts (``workers`` > 1: in that many spawned processes, longest first) and print the
    summary table in figure order. Each figure's numbers do not depend on ``workers`` (every run is seeded).
    ``quick`` writes to ``out_dir`` or :data:`QUICK_OUT`, and refuses the committed figures' folder."""
    if quick:
        out_dir = out_dir or QUICK_OUT
        if os.path.realpath(out_dir) == os.path.realpath(FIGURES_DIR):
            raise ValueError(f"'out_dir' {out_dir!r}: quick (reduced-size) figures must not replace the committed "
                             f"ones; choose a scratch folder (default {QUICK_OUT!r})")
    nums = only or list(FIGURES)
    unknown = sorted(set(nums) - set(FIGURES))
    if unknown:
        raise ValueError(f"'only' names unknown figures {unknown}; valid: {sorted(FIGURES)}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"'workers' must be >= 1, got {workers}")
    t_start = time.time()
    rows = []
    bar = tqdm(total=len(nums), desc="figures", dynamic_ncols=True, disable=not progress)

    def done(row):
        rows.append(row)
        bar.update()
        if on_done is not None:  # e.g. the overall bar of figures.reproduce
            on_done(f"toy/fig{row['figure']}", row["seconds"])

    if workers == 1 or len(nums) == 1:
        for n in nums:
            done(_run_one(n, out_dir, quick))
    else:
        order = sorted(nums, key=lambda n: SLOW_FIRST.index(n) if n in SLOW_FIRST else len(SLOW_FIRST))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = [ex.submit(_run_one, n, out_dir, quick) for n in order]
            for f in as_completed(futs):
                done(f.result())
    bar.close()
    rows.sort(key=lambda r: nums.index(r["figure"]))
    print(f"\n{'fig':>3}  {'seconds':>8}  {'file':<34} headline")
    for r in rows:
        print(f"{r['figure']:>3}  {r['seconds']:8.1f}  {r['path'].split('/')[-1]:<34} {_headline(r['result'])}")
    print(f"total {sum(r['seconds'] for r in rows):.1f} s of figure time, {time.time() - t_start:.1f} s wall with "
          f"{workers} worker(s) ({'quick' if quick else 'full'} mode); PNGs in {out_dir or FIGURES_DIR}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sa-figures", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes (seconds per figure)")
    p.add_argument("--out", default=None, help="output directory (default: next to the scripts; with --quick: "
                                               f"{QUICK_OUT})")
    p.add_argument("--only", type=int, nargs="*", default=None, help="figure numbers to make")
    p.add_argument("--workers", type=int, default=None, help="processes (default: cores, at most 2)")
    a = p.parse_args(argv)
    make_all(a.out, a.quick, a.only, a.workers)


if __name__ == "__main__":
    main()
