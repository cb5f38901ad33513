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


def calibrate(repeats: int = 3, digits: bool = True) -> dict[str, float]:
    """Seconds of fixed workloads on one thread (best of ``repeats``), recorded with the job times so that runs on
    different machines and days can be compared: ``python_s`` (a pure-Python loop of 10^7 additions), ``torch_s``
    (200 float32 256x256 matmuls), and two slices of the real work, which register the slow days those two missed
    (the same code's toy figures ran up to 2.7x slower on some days with unchanged ``python_s`` / ``torch_s``):
    ``toy_s`` (8 DDPO-IS iterations on ``gauss2d``, 128 paths, N = 50, affine policy: the toy figures' small-op
    float64 loop) and, with ``digits``, ``unet_s`` (10 no-grad forwards of the digits UNet, random weights, batch 16:
    the digits runs' conv and attention work). The global torch generator and the thread count are left as found."""
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
        with torch.random.fork_rng():
            out = {"python_s": round(best(py), 3), "torch_s": round(best(mm), 4), "toy_s": round(best(_toy_slice()), 4)}
            if digits:
                out["unet_s"] = round(best(_unet_slice()), 4)
        return out
    finally:
        torch.set_num_threads(threads)


def _toy_slice():
    """:func:`calibrate`'s ``toy_s`` workload (a fresh run each call, so every repeat does the same work)."""
    from figures._common import METHOD_OVERRIDES
    from toy_problems.train import build

    ov = {"progress": False, **METHOD_OVERRIDES["ddpo_is"], "policy": "affine", "pieces": 4, "num_epochs": 8,
          "batch_size": 128, "num_steps": 50, "seed": 0}
    build("ddpo_is", "gauss2d", ov).trainer.train()  # warm-up: first-call costs are not the machine's speed
    return lambda: build("ddpo_is", "gauss2d", ov).trainer.train()


def _unet_slice():
    """:func:`calibrate`'s ``unet_s`` workload: the digits experiment's UNet (random weights) at batch 16."""
    import torch

    from digits.pretrain import PretrainConfig, build_untrained_unet

    cfg = PretrainConfig()
    unet = build_untrained_unet(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, cfg.resolution, cfg.resolution, generator=g)
    text = torch.randn(16, cfg.max_length, cfg.text_hidden, generator=g)  # the text encoder's output shape
    t = torch.full((16,), 500)

    @torch.no_grad()
    def run():
        for _ in range(10):
            unet(x, t, encoder_hidden_states=text)

    run()  # warm-up
    return run


def machine_info() -> dict[str, str]:
    """What the calibration cannot show: the CPU model and the vector instructions torch dispatches to."""
    import platform

    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cores": str(os.cpu_count()), "cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


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
    speed = calibrate(digits=not a.skip_digits)  # before the workers start: an idle machine
    info = machine_info()
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
    print(f"machine: {info['cores']} cores, {info['cpu']} ({info['torch_cpu_capability']}); calibration {speed} "
          "(figures.reproduce.calibrate: compare runs by toy_s and unet_s)")
    res = {"wall_s": wall, "phases": phases, "seconds": times, "workers": a.workers,
           "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "machine_info": info,
           "calibration": speed, "toy_results": toy_results}
    if not a.skip_digits:  # a full run: its job times are the next run's ETA weights
        atomic_write_json(ESTIMATES, res, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
    return res


if __name__ == "__main__":
    main()
