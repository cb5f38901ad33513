"""Denoiser cost per reward query of every image method (``sa_ac``, ``ddpo_sf``, ``ddpo_is``, ``dpok``, variants).

Each method trains through the public trainer, ``t2i.trainer.make_trainer(cfg).train()``, on the tiny in-process
Stable Diffusion pipeline (preset ``tiny_cpu``; random weights, no download), all methods in one process and
one run, the same config except the method (``ddpo_is`` without a value model, as in its SD preset).
Measured per method, sampling and training together (checkpoint writing excluded):

* ``forwards_per_query``: denoiser (UNet) forward passes in units of one batch-1 forward, counted by a
  forward hook on the UNet that adds the number of batch rows of every call (a classifier-free-guidance call
  on the doubled batch counts 2 per image; a reference pass with the adapters disabled counts like any
  other), divided by the number of reward queries (images scored). Split into ``forwards_sampling``
  (inside ``ImageTask.sample_epoch``) and ``forwards_training`` (the rest: the update passes).
* ``seconds_per_query``: wall time of ``train()`` divided by the reward queries (median over ``--repeats``,
  the methods interleaved in a rotating order; one untimed warm-up epoch first); ``cpu_seconds_per_query``
  the same with the process's CPU time (``time.process_time``), steadier than wall time on a shared CPU.
* ``peak_mem_mb``: on CUDA ``torch.cuda.max_memory_allocated`` during ``train()`` (reset before each method).
  On CPU the process's peak resident set size during ``train()``: the peak (``VmHWM``) is reset through
  ``/proc/self/clear_refs`` before each method and read from ``/proc/self/status`` (Linux); where that is not
  possible, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which is the peak of the whole process so far
  (then only the first method's number is its own). CPU numbers include the interpreter, torch and the
  model (~hundreds of MB); ``peak_mem_delta_mb`` is the peak minus the resident size at the method's start.
  ``mem_method`` in the JSON says which was used.

``python benchmarks/bench_t2i_cost.py [--quick] [--out FILE] [--methods sa_ac ddpo_is] [--repeats 3]
[--no-warmup] [--threads 1]``.
``--quick``: 4 steps, 2 images, one repeat (a smoke test, ~10 s on CPU). Default: 20 steps, 8 images, 3
repeats (~7 min on a 2-core machine). Timings on the shared CPU machines swing by 1.5x between runs of
the same work; compare methods only within one run, and trust the forward counts over the seconds there.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

#: ``ddpo_is_noref``: DDPO-IS as published (beta = 0) without the pretrained reference pass (``log.reference_kl
#: false``: no KL-to-pretrained monitoring); the other methods record the reference (sa_ac and dpok need it).
#: ``*_frozen_uncond``: the same with ``model.lora_uncond false`` (CFG's unconditional branch is the pretrained
#: model's, shared by policy and reference: t2i.environments)
FROZEN = "_frozen_uncond"
METHODS = ("sa_ac", "ddpo_sf", "ddpo_is", "dpok", "ddpo_is_noref", "sa_ac" + FROZEN, "ddpo_is_noref" + FROZEN)
#: (numerator, denominator) of the reported ratios
RATIOS = (("sa_ac", "ddpo_is"), ("sa_ac", "ddpo_is_noref"), ("sa_ac" + FROZEN, "ddpo_is_noref"),
          ("sa_ac" + FROZEN, "ddpo_is_noref" + FROZEN))


def make_config(method: str, out_dir: str, quick: bool, epochs: int | None = None):
    """The ``tiny_cpu`` preset (CFG scale 3, DDIM eta 1, LoRA rank 4) with the benchmark's sizes: quick 4 steps,
    2 images, 1 epoch; default 20 steps, 8 images (minibatches of 4), 1 epoch."""
    from t2i.config import get_preset

    cfg = get_preset("tiny_cpu")
    cfg.model.lora_uncond = not method.endswith(FROZEN)
    name, method = method, method.removesuffix(FROZEN)
    cfg.train.method = "ddpo_is" if method == "ddpo_is_noref" else method
    cfg.log.reference_kl = method != "ddpo_is_noref"
    if quick:
        cfg.sample.num_steps, cfg.sample.batch_size, cfg.sample.num_batches_per_epoch = 4, 2, 1
        cfg.train.batch_size, cfg.train.gradient_accumulation_steps = 2, 1
    else:
        cfg.sample.num_steps, cfg.sample.batch_size, cfg.sample.num_batches_per_epoch = 20, 8, 1
        cfg.train.batch_size, cfg.train.gradient_accumulation_steps = 4, 1
    cfg.train.num_epochs = 1 if epochs is None else epochs
    if cfg.train.method == "ddpo_is":
        cfg.value.kind, cfg.train.beta = "none", 0.0
    cfg.log.output_dir = os.path.join(out_dir, name)
    cfg.log.overwrite = True  # scratch folders, replaced on every benchmark run
    cfg.log.tensorboard, cfg.log.image_every, cfg.log.save_every, cfg.log.progress = False, 0, 0, False
    return cfg


# --------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(resettable: bool) -> float:
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return kb / (2**20 if sys.platform == "darwin" else 1024)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the next baseline is clean


# --------------------------------------------------------------------------- one measured run
class _Counter:
    def __init__(self):
        self.phase, self.rows, self.calls = "training", {"sampling": 0, "training": 0}, 0
        self.queries, self.other_reward_evals = 0, 0  # images sampled and scored / other reward calls

    def hook(self, module, args, kwargs, output):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet / SD3 transformer
        self.rows[self.phase] += int(x.shape[0])
        self.calls += 1


def _instrument(tr, counter: _Counter) -> list:
    """Forward hook on the denoiser, phase flag around ``sample_epoch``, reward-query count, no checkpoints."""
    import t2i.models

    get = getattr(t2i.models, "denoiser", None)  # the UNet, or an SD3-class transformer
    net = get(tr.pipe) if get is not None else tr.pipe.unet
    handles = [net.register_forward_hook(counter.hook, with_kwargs=True)]
    sample_epoch = tr.sample_epoch

    def sampling(*a, **k):
        counter.phase = "sampling"
        try:
            return sample_epoch(*a, **k)
        finally:
            counter.phase = "training"

    tr.sample_epoch = sampling
    reward = tr.reward

    def counted_reward(images, prompts, *a, **k):
        if counter.phase == "sampling":
            counter.queries += int(images.shape[0])
        else:  # e.g. Tweedie value inputs: the reward of predicted clean images, not a query of a sample
            counter.other_reward_evals += int(images.shape[0])
        return reward(images, prompts, *a, **k)

    tr.reward = counted_reward
    tr.save_checkpoint = lambda: None  # I/O, not sampling or training
    return handles


def run_method(method: str, out_dir: str, quick: bool, epochs: int | None = None) -> dict:
    from t2i.trainer import make_trainer

    _release_memory()
    cfg = make_config(method, out_dir, quick, epochs)
    t0 = time.perf_counter()
    tr = make_trainer(cfg)
    setup_s = time.perf_counter() - t0
    counter = _Counter()
    handles = _instrument(tr, counter)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0, resettable = _rss_mb(), _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    tr.train()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb(resettable)
    for h in handles:
        h.remove()
    s = cfg.sample
    expected_queries = s.batch_size * s.num_batches_per_epoch * cfg.train.num_epochs
    if counter.queries != expected_queries:
        raise RuntimeError(f"{method}: {counter.queries} reward queries counted, config says {expected_queries}")
    fwd = counter.rows["sampling"] + counter.rows["training"]
    del tr
    return {
        "queries": counter.queries,
        "forwards": fwd,
        "forwards_sampling": counter.rows["sampling"],
        "forwards_training": counter.rows["training"],
        "unet_calls": counter.calls,
        "other_reward_evals": counter.other_reward_evals,
        "forwards_per_query": fwd / counter.queries,
        "seconds": seconds,
        "seconds_per_query": seconds / counter.queries,
        "cpu_seconds_per_query": cpu_seconds / counter.queries,
        "setup_s": setup_s,
        "peak_mem_mb": peak,
        "peak_mem_delta_mb": peak - (0.0 if cuda else rss0),
        "mem_method": "cuda_max_memory_allocated"
        if cuda
        else ("proc_vmhwm_reset" if resettable else "ru_maxrss_cumulative"),
    }


def arithmetic(cfg) -> dict:
    """Forward counts that the config implies (units of batch-1 forwards)."""
    s, t = cfg.sample, cfg.train
    rows = 2 if s.guidance_scale != 1.0 else 1  # CFG doubles the batch
    n = s.batch_size * s.num_batches_per_epoch * t.num_epochs
    n_train = max(1, int(round(s.num_steps * t.timestep_fraction)))
    return {
        "queries": n,
        "num_steps": s.num_steps,
        "cfg_rows": rows,
        "policy_sampling_forwards": s.num_steps * rows * n,
        "policy_training_forwards": n_train * rows * n * t.num_inner_epochs,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny_cpu preset as is, 1 epoch, 1 repeat")
    ap.add_argument("--out", default=None, help="JSON output file")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up epoch (smoke tests)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory(prefix="bench_t2i_cost_") as tmp:
        if not args.no_warmup:
            run_method(args.methods[0], os.path.join(tmp, "warmup"), args.quick, epochs=1)  # untimed
        for r in range(repeats):
            order = args.methods[r % len(args.methods) :] + args.methods[: r % len(args.methods)]
            for m in order:
                runs[m].append(run_method(m, os.path.join(tmp, f"r{r}"), args.quick))
    methods = {}
    for m, rs in runs.items():
        if len({(x["forwards_sampling"], x["forwards_training"]) for x in rs}) != 1:
            raise RuntimeError(f"{m}: forward counts differ between repeats: {rs}")
        med = dict(rs[0])
        for key in ("seconds", "seconds_per_query", "cpu_seconds_per_query", "setup_s", "peak_mem_mb"):
            med[key] = statistics.median(x[key] for x in rs)
        med["peak_mem_delta_mb"] = statistics.median(x["peak_mem_delta_mb"] for x in rs)
        med["seconds_all_repeats"] = [x["seconds"] for x in rs]
        methods[m] = med
    res = {
        "methods": methods,
        "config": arithmetic(make_config(args.methods[0], "", args.quick)),
        "quick": args.quick,
        "repeats": repeats,
        "warmup": not args.no_warmup,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }
    for num, base in RATIOS:
        if num in methods and base in methods:
            a, b = methods[num], methods[base]
            res[f"ratio_{num}_over_{base}"] = {
                "forwards": a["forwards_per_query"] / b["forwards_per_query"],
                "time": a["seconds_per_query"] / b["seconds_per_query"],
                "cpu_time": a["cpu_seconds_per_query"] / b["cpu_seconds_per_query"],
            }
    head = ("fwd/query", "sampling", "training", "ms/query", "cpu ms/q", "peak MB")
    print(f"{'method':27s} " + " ".join(f"{h:>9s}" for h in head))
    for m, r in methods.items():
        print(
            f"{m:27s} {r['forwards_per_query']:9.1f} {r['forwards_sampling']:9d} {r['forwards_training']:9d} "
            f"{1e3 * r['seconds_per_query']:9.1f} {1e3 * r['cpu_seconds_per_query']:9.1f} {r['peak_mem_mb']:9.0f}"
        )
    for num, base in RATIOS:
        if f"ratio_{num}_over_{base}" in res:
            q = res[f"ratio_{num}_over_{base}"]
            print(f"{num} / {base}: forwards {q['forwards']:.2f}x, time {q['time']:.2f}x, "
                  f"CPU time {q['cpu_time']:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
