"""Rollout throughput: the native Euler-Maruyama loop vs torchsde's ``sdeint`` (method ``euler``).

Problem: 2-d Gaussian data N(m0, S0) (full covariance) under the VP-linear schedule (b from 0.1 to 20,
T = 1), pretrained sampler with the exact, linear score, float32, uniform grid with ``--steps`` steps,
``save_every=None`` (only the final state is kept: low memory) and ``torch.set_num_threads(2)``.

Three contenders, interleaved within each repeat so that machine-load drift hits them alike:

* ``native``           -- ``sa_theory.rollout.rollout(..., backend="native", method="euler")``;
* ``torchsde``         -- ``rollout(..., backend="torchsde", method="euler")``: the project's torchsde
  backend as users get it (``sdeint`` with a ``BrownianInterval``, state carries the KL coordinate);
* ``torchsde_raw``     -- a bare ``torchsde.sdeint`` call on the same SDE with a minimal module (no KL
  coordinate): torchsde's best case, to separate its own overhead from the wrapper's.

Reported: median wall time over ``--repeats`` and throughput in path-steps per second
(batch x steps / seconds), plus the ratios native / torchsde. **Goal: native >= 5x torchsde** (the
environment notes measured ~10x per-step overhead for torchsde on small batches; at large batches the
arithmetic dominates and the ratio shrinks).

If a torchsde run at some batch size is predicted (from a short pilot of ``steps // 20`` steps) to take
longer than ``--max-torchsde-seconds`` it is skipped for that batch and reported as ``null``.

Usage::

    .venv/bin/python benchmarks/bench_rollout.py                       # batch 10000,100000; 1000 steps
    .venv/bin/python benchmarks/bench_rollout.py --batch 10000 --steps 500 --repeats 5

Timings on shared machines swing by several x between runs: compare within one run only. On a loaded
machine, two OpenMP threads that spin-wait make every op 10x slower or worse: run with
``OMP_WAIT_POLICY=PASSIVE`` (recorded in the JSON) or ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchsde

from sa_theory.rollout import rollout
from sa_theory.schedules import VPLinear
from sa_theory.sde import ControlledSDE

M0 = (1.5, -0.5)
S0 = ((1.0, 0.6), (0.6, 0.5))
SCHEDULE = VPLinear(b_min=0.1, b_max=20.0, T=1.0)


def make_score(dtype: torch.dtype):
    """Exact linear score of N(m0, S0) under SCHEDULE, as an action ``a(tau, y)`` in sampler time."""
    m0 = torch.tensor(M0, dtype=dtype)
    S0_ = torch.tensor(S0, dtype=dtype)
    eye = torch.eye(2, dtype=dtype)

    def action(tau, y, cond=None):
        t = SCHEDULE.T - tau
        a = SCHEDULE.alpha(t)
        S_t = a * a * S0_ + SCHEDULE.marginal_var(t) * eye
        W = -torch.linalg.inv(S_t)  # symmetric
        return torch.addmm(-(a * m0) @ W, y, W)

    return action


def initial_state(batch: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Samples of p_T = N(alpha_T m0, alpha_T^2 S0 + var_T I)."""
    T = torch.tensor(SCHEDULE.T, dtype=torch.float64)
    a, v = SCHEDULE.alpha(T), SCHEDULE.marginal_var(T)
    cov = a * a * torch.tensor(S0, dtype=torch.float64) + v * torch.eye(2, dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 2, generator=gen, dtype=torch.float64)
    return (a * torch.tensor(M0, dtype=torch.float64) + z @ L.T).to(dtype)


class _RawSDE(torch.nn.Module):
    """Minimal torchsde module for the same sampler SDE (no KL coordinate)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: ControlledSDE, action):
        super().__init__()
        self.sde, self.action = sde, action

    def f(self, t, y):
        return self.sde.drift(t, y, self.action(t, y))

    def g(self, t, y):
        return self.sde.diffusion(t).expand_as(y)


def run_native(sde, action, y0, steps, seed):
    return rollout(sde, action, y0, steps=steps, backend="native", method="euler", seed=seed,
                   save_every=None).final


def run_torchsde(sde, action, y0, steps, seed):
    return rollout(sde, action, y0, steps=steps, backend="torchsde", method="euler", seed=seed,
                   save_every=None).final


def run_torchsde_raw(sde, action, y0, steps, seed):
    dt = sde.T / steps
    bm = torchsde.BrownianInterval(t0=0.0, t1=sde.T, size=y0.shape, dtype=y0.dtype, entropy=seed)
    ts = torch.tensor([0.0, sde.T], dtype=y0.dtype)
    return torchsde.sdeint(_RawSDE(sde, action), y0, ts, bm=bm, method="euler", dt=dt)[-1]


RUNNERS = {"native": run_native, "torchsde": run_torchsde, "torchsde_raw": run_torchsde_raw}


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    out = fn(*args)
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite rollout result")
    return elapsed


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchsde": getattr(torchsde, "__version__", "unknown"),
        "torch_num_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    return info


def _loadavg():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def bench(batches, steps, repeats, max_torchsde_s, threads) -> dict:
    load_start = _loadavg()
    torch.set_num_threads(threads)
    dtype = torch.float32
    sde = ControlledSDE(SCHEDULE)
    action = make_score(dtype)
    # warm-up (imports, allocator, first-call overheads)
    y_w = initial_state(256, dtype)
    for fn in RUNNERS.values():
        fn(sde, action, y_w, 10, 0)

    results = []
    for batch in batches:
        y0 = initial_state(batch, dtype)
        active = list(RUNNERS)
        skipped = {}
        pilot_steps = max(steps // 20, 5)
        for name in ("torchsde", "torchsde_raw"):
            predicted = timed(RUNNERS[name], sde, action, y0, pilot_steps, 0) * steps / pilot_steps
            if predicted > max_torchsde_s:
                active.remove(name)
                skipped[name] = (f"predicted {predicted:.0f} s per run > "
                                 f"--max-torchsde-seconds {max_torchsde_s:g}")
        times = {name: [] for name in active}
        for r in range(repeats):
            order = active if r % 2 == 0 else active[::-1]  # interleave, alternate the order
            for name in order:
                times[name].append(timed(RUNNERS[name], sde, action, y0, steps, r + 1))
        row = {"batch": batch, "steps": steps, "path_steps": batch * steps, "methods": {}}
        for name in RUNNERS:
            if name in times:
                med = statistics.median(times[name])
                row["methods"][name] = {"times_s": [round(t, 4) for t in times[name]],
                                        "median_s": round(med, 4), "path_steps_per_s": batch * steps / med}
            else:
                row["methods"][name] = None
        row["skipped"] = skipped
        nat = row["methods"]["native"]["median_s"]
        for name in ("torchsde", "torchsde_raw"):
            m = row["methods"][name]
            row[f"speedup_native_vs_{name}"] = None if m is None else m["median_s"] / nat
        results.append(row)
        print_row(row)
    machine = machine_info() | {"loadavg_at_start": load_start, "loadavg_at_end": _loadavg()}
    return {
        "benchmark": "rollout throughput, native Euler vs torchsde sdeint(euler)",
        "goal": "native >= 5x torchsde",
        "problem": {"schedule": "VPLinear(b_min=0.1, b_max=20, T=1)", "data": {"m0": M0, "S0": S0},
                    "score": "exact linear", "dtype": "float32", "save_every": None, "method": "euler"},
        "repeats": repeats,
        "machine": machine,
        "results": results,
    }


HEADER = (f"{'batch':>8} {'steps':>6} | {'native s':>9} {'torchsde s':>10} {'raw s':>8} | "
          f"{'native Mps/s':>12} {'torchsde Mps/s':>14} | {'x vs torchsde':>13} {'x vs raw':>9}")


def _fmt(x, spec):
    return format(x, spec) if x is not None and not (isinstance(x, float) and math.isnan(x)) else "skipped"


def print_row(row) -> None:
    m = row["methods"]

    def med(name):
        return None if m[name] is None else m[name]["median_s"]

    def mps(name):
        return None if m[name] is None else m[name]["path_steps_per_s"] / 1e6

    cells = [
        f"{row['batch']:>8} {row['steps']:>6} |",
        f"{_fmt(med('native'), '.3f'):>9} {_fmt(med('torchsde'), '.3f'):>10}",
        f"{_fmt(med('torchsde_raw'), '.3f'):>8} |",
        f"{_fmt(mps('native'), '.2f'):>12} {_fmt(mps('torchsde'), '.2f'):>14} |",
        f"{_fmt(row['speedup_native_vs_torchsde'], '.2f'):>13}",
        f"{_fmt(row['speedup_native_vs_torchsde_raw'], '.2f'):>9}",
    ]
    print(" ".join(cells), flush=True)
    for name, why in row["skipped"].items():
        print(f"{'':>8} {name} skipped: {why}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="10000,100000",
                   help="comma-separated batch sizes (default 10000,100000)")
    p.add_argument("--steps", type=int, default=1000, help="Euler steps per rollout (default 1000)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method; the median is reported")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--max-torchsde-seconds", type=float, default=180.0,
                   help="skip a torchsde run predicted to take longer than this (default 180)")
    p.add_argument("--out", default="benchmarks/results/rollout.json", help="JSON output path")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if not batches or min(batches) < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--batch, --steps and --repeats must be positive")
    print(f"torch {torch.__version__}, torchsde {getattr(torchsde, '__version__', '?')}, "
          f"threads {args.threads}, float32, repeats {args.repeats} (median), "
          "Mps/s = million path-steps per second")
    print(HEADER)
    print("-" * len(HEADER))
    report = bench(batches, args.steps, args.repeats, args.max_torchsde_seconds, args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    default = lambda o: o.item() if isinstance(o, np.generic) else str(o)
    out.write_text(json.dumps(report, indent=2, default=default))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
