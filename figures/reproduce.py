"""``make reproduce``: every figure of the README (toy figures, the digits experiment, the flow-model digits
comparison) under one progress bar with an ETA, then one summary table.

    python -m figures.reproduce                 # everything (2 worker processes per phase)
    python -m figures.reproduce --skip-digits    # the toy figures only
    python -m figures.reproduce --workers 1

The bar's total is the expected work in seconds: each job (a toy figure, a digits fine-tuning run with its
evaluation, ...) counts with its time in the last full run on this machine class (``ESTIMATES``, rewritten by
every full run into ``benchmarks/results/reproduce_times.json``; a job without a record counts
:func:`default_estimate`), so the ETA is work-weighted rather than job-counted. Phases run one after the other, each
in ``--workers`` spawned processes with one torch thread each. At the end: wall time per phase, the summed job
time (CPU seconds of one thread), where the outputs are, and the machine's speed on two fixed workloads
(:func:`calibrate`), so that wall times from different machines can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from tqdm.auto import tqdm

from sa_theory.algorithms.checkpoint import atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ESTIMATES = os.path.join(ROOT, "benchmarks", "results", "reproduce_times.json")
PHASES = ("toy", "digits", "flow")


def default_estimate(key: str) -> float:
    """Seconds of a job without a recorded time: 150 per toy figure, ~3 s per sampler step for a digits run."""
    if key.startswith("toy/"):
        return 150.0
    K = int(key.rsplit("_K", 1)[1]) if "_K" in key else 10
    return 20.0 + 3.0 * K


def expected_jobs(skip_digits: bool) -> list[str]:
    """The job keys of a full run (as the phases report them through ``on_done``)."""
    from figures.make_all import FIGURES

    keys = [f"toy/fig{n}" for n in FIGURES]
    if skip_digits:
        return keys
    from digits.experiment import ExperimentConfig
    from digits.flow_experiment import FlowExperimentConfig

    ec, fc = ExperimentConfig(), FlowExperimentConfig()
    keys += ["digits/pretrained_eval"] + [f"digits/{m}_s{s}_K{ec.num_steps}" for s in ec.seeds for m in ec.methods]
    keys += [f"digits/{m}_s{ec.seeds[0]}_K{K}" for K in ec.step_counts if K != ec.num_steps for m in ec.methods]
    b = fc.base
    Ks = sorted({b.num_steps, *b.step_counts})
    keys += ["flow/pretrained_eval"]
    for model, methods in (("flow", fc.methods), ("vp", ("sa_ac",) if fc.vp else ())):
        keys += [f"flow/{model}_{m}_s{s}_K{b.num_steps}" for s in b.seeds for m in methods]
        keys += [f"flow/{model}_{m}_s{s}_K{K}" for K in Ks if K != b.num_steps for s in fc.sweep_seeds for m in methods]
    return keys


def calibrate(repeats: int = 3) -> dict[str, float]:
    """Seconds of two fixed workloads on one thread (best of ``repeats``), recorded with the job times so that runs
    on different machines can be compared: ``python_s`` (a pure-Python loop of 10^7 additions: the toy figures'
    overhead) and ``torch_s`` (200 float32 256x256 matmuls: the digits models' compute)."""
    import torch

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def py():
        s = 0
        for i in range(10**7):
            s += i

    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def mm():
        for _ in range(200):
            a @ a

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"python_s": round(best(py), 3), "torch_s": round(best(mm), 4)}
    finally:
        torch.set_num_threads(threads)


def load_estimates(path: str = ESTIMATES) -> dict[str, float]:
    try:
        with open(path) as fh:
            return {k: float(v) for k, v in json.load(fh).get("seconds", {}).items()}
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m figures.reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="processes per phase (default 2)")
    ap.add_argument("--skip-digits", action="store_true", help="only the toy figures")
    ap.add_argument("--cache", default=None, help="digits model cache (default $SA_CACHE or ~/.cache/...)")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error("--workers must be >= 1")
    for lib in ("DIFFUSERS", "TRANSFORMERS"):  # library chatter would interleave with the bar (workers inherit it)
        os.environ.setdefault(f"{lib}_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar, once per run
    speed = calibrate()  # before the workers start: an idle machine
    keys = expected_jobs(a.skip_digits)
    est = load_estimates()
    weight = {k: est.get(k, default_estimate(k)) for k in keys}
    bar = tqdm(total=round(sum(weight.values())), desc="make reproduce (work-seconds)", unit="s", dynamic_ncols=True)
    times: dict[str, float] = {}

    def on_done(key: str, seconds: float) -> None:
        times[key] = seconds
        bar.update(round(weight.get(key, seconds)))
        bar.set_postfix_str(key)

    t0, phases = time.time(), {}

    def phase(name: str, fn) -> None:
        t = time.time()
        out = fn()
        phases[name] = {"wall_s": time.time() - t, "job_s": sum(v for k, v in times.items() if k.startswith(name)),
                        "outputs": out}

    from figures.make_all import make_all

    toy_results: dict = {}

    def toy():
        for row in make_all(workers=a.workers, on_done=on_done, progress=False):
            toy_results[f"fig{row['figure']}"] = row["result"]
        return "figures/fig*.png"

    phase("toy", toy)
    if not a.skip_digits:
        from digits.experiment import ExperimentConfig, run_experiment
        from digits.figures import make_all as digits_figures
        from digits.flow_experiment import FlowExperimentConfig, run_flow_experiment

        digits_runs: list = []

        def digits():
            out = os.path.join("runs", "digits")
            res = run_experiment(ExperimentConfig(), out, a.cache, "all", a.workers, on_done=on_done)
            digits_runs.extend(res["runs"])
            digits_figures(out, HERE)
            keep = os.path.join(ROOT, "benchmarks", "results", "digits")  # the README's numbers come from here
            os.makedirs(keep, exist_ok=True)
            for name in ("benchmark.json", "results_all.json"):
                shutil.copy2(os.path.join(out, name), os.path.join(keep, name))
            return "figures/digits_fig*.png, benchmarks/results/digits (runs in runs/digits)"

        def flow():
            out = os.path.join("benchmarks", "results", "digits_flow")
            # the VP sa_ac runs that the digits experiment already made (same settings) are reused, not repeated
            run_flow_experiment(FlowExperimentConfig(), out, a.cache, a.workers, HERE, on_done=on_done,
                                reuse_runs=digits_runs)
            return "figures/digits_flow_fig*.png, benchmarks/results/digits_flow"

        phase("digits", digits)
        phase("flow", flow)
    bar.close()
    wall = time.time() - t0
    print(f"\n{'phase':8s} {'wall s':>8s} {'job s':>8s}  outputs")
    for name, p in phases.items():
        print(f"{name:8s} {p['wall_s']:8.0f} {p['job_s']:8.0f}  {p['outputs']}")
    print(f"{'total':8s} {wall:8.0f} {sum(times.values()):8.0f}  ({a.workers} worker(s); job s = one thread each)")
    print(f"machine: {os.cpu_count()} cores; calibration {speed} (figures.reproduce.calibrate; compare machines by it)")
    res = {"wall_s": wall, "phases": phases, "seconds": times, "workers": a.workers,
           "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "calibration": speed,
           "toy_results": toy_results}
    if not a.skip_digits:  # a full run: its job times are the next run's ETA weights
        atomic_write_json(ESTIMATES, res, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
    return res


if __name__ == "__main__":
    main()
