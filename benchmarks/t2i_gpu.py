"""GPU benchmark of the t2i training loop on real architectures with random weights: SD v1.5 and SD3.5-Medium.

No download: the configs are hard-coded (``t2i_gpu_arch.py``) and the models are built from them with random
weights (speed and memory do not depend on the weight values). bf16 frozen weights, fp32 LoRA, CFG, 512x512.

``--arch sd15`` (default): SD v1.5 UNet / VAE / CLIP text encoder, ``--steps`` (50) DDIM steps. Measures

* sampling: images/s and peak memory (policy + pretrained reference UNet calls, as in training);
* one full training iteration of ``sa_ac`` (sampling + actor + critic) and of ``ddpo_is``: samples/s,
  peak memory;
* model FLOPs utilisation (MFU): UNet FLOPs counted with ``torch.utils.flop_counter`` on one forward,
  x3 for forward+backward, divided by time and the device's peak bf16 dense FLOP/s (``--peak-tflops``).

``--arch sd35m``: SD3.5-Medium's MMDiT transformer (2.24 B parameters) and 16-channel VAE at latent 64x64, with
small random stand-ins of its three text encoders that give the same output shapes (prompt embeddings
(B, 333, 4096), pooled (B, 2048); the encoders run once per batch, outside the loop's cost). For each of
``--steps`` (10 and 40 flow steps) and each method (``sa_ac`` and ``flow_grpo``, the ``sd35m_*`` presets with the
batch sizes below, one sampling batch per epoch) in one run: sampling images/s, one full training iteration
(``Trainer.train_iteration``: sampling, rewards, the preset's value work, updates) in samples/s, peak
memory, and MFU = counted transformer FLOPs / time / peak, where every transformer forward's batch rows are
counted by a hook (x1 without autograd, x3 with: forward + backward, the usual convention although the frozen
weights need no weight gradients) at the per-row FLOPs that ``torch.utils.flop_counter`` counts on one guided
forward. A wall-clock guard (``--time-budget``) skips cells predicted to overrun and stops a running one; every
finished cell is written to ``--out`` at once.

Prints one table and writes JSON (``--out``). ``--tiny`` runs the same code on the tiny CPU pipelines in
seconds (sd35m: the project's tiny SD3 pipeline; smoke mode, used by the default test suite so this script does
not rot; MFU is then against the same peak and means nothing).

    python benchmarks/t2i_gpu.py --batch 8 --out bench.json
    python benchmarks/t2i_gpu.py --arch sd35m --out sd35m.json       # one H200: about 4-6 minutes
    python benchmarks/t2i_gpu.py --tiny [--arch sd35m]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # t2i_gpu_arch.py lies beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from t2i_gpu_arch import (  # noqa: E402, F401  (SD15_*, build_sd15_random, unet_flops: re-exported)
    SD15_SCHED,
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    RowCounter,
    build_sd15_random,
    build_sd35m_pipeline,
    flops_per_row,
    patched,
    sd35m_config,
    unet_flops,
    wall_clock_alarm,
)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def _reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(args) -> dict:
    from t2i.config import apply_overrides, get_preset
    from t2i.rollout import sample_rollout
    from t2i.trainer import make_trainer

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        torch.set_num_threads(1)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "batch": args.batch,
        "steps": args.steps,
        "guidance": 5.0,
        "steps_per_backward": args.steps_per_backward,
        "rows": [],
    }
    for method in args.methods:
        preset = "tiny_cpu" if args.tiny else f"sd15_{method}"
        cfg = get_preset(preset)
        apply_overrides(
            cfg,
            {
                "train.method": method,
                "sample.num_steps": str(args.steps),
                "sample.batch_size": str(args.batch),
                "sample.num_batches_per_epoch": "1",
                "train.batch_size": str(args.train_batch),
                "train.gradient_accumulation_steps": str(args.batch // args.train_batch),
                "log.output_dir": args.workdir + f"/{method}",
                "log.overwrite": "true",  # scratch folders, replaced on every benchmark run
                "log.tensorboard": "false",
                "log.image_every": "0",
                "log.progress": "false",
                "model.mixed_precision": "no" if args.tiny else "bf16",
                "model.gradient_checkpointing": str(args.grad_ckpt and not args.tiny).lower(),
                "reward.name": "jpeg_compress",
                "value.kind": "none" if method == "ddpo_is" else "critic",
                "model.lora_uncond": str(not args.frozen_uncond).lower(),
                "train.steps_per_backward": str(args.steps_per_backward),
            },
        )
        if not args.tiny:
            import t2i.task as trmod

            trmod.build_pipeline = lambda cfg, dev, wd: build_sd15_random(dev, torch.bfloat16)
        tr = make_trainer(cfg)
        gen = torch.Generator().manual_seed(0)
        # warm-up
        sample_rollout(tr.env, (cfg.prompts[: args.batch] * args.batch)[: args.batch], gen)
        _reset(device)
        _sync(device)
        t0 = time.time()
        with tr.acc.autocast():
            sample_rollout(tr.env, [cfg.prompts[0]] * args.batch, gen)
        _sync(device)
        t_sample = time.time() - t0
        mem_sample = _peak_gb(device)
        _reset(device)
        t0 = time.time()
        m = tr.train_iteration()
        _sync(device)
        t_iter = time.time() - t0
        mem_iter = _peak_gb(device)
        fl = unet_flops(tr.pipe.unet, 2 * args.batch, device, tr.weight_dtype)  # CFG doubles the batch
        # rollout: policy + reference forward per step (frozen unconditional branch: 3 of the 4 halves, shared);
        # training: forward of both halves + backward (~2x forward) of the halves with adapters (one if frozen)
        grad_halves = 1 if args.frozen_uncond else 2
        flops_iter = fl * args.steps * (1.5 if args.frozen_uncond else 2) + fl * args.steps * (1 + grad_halves)
        mfu = flops_iter / t_iter / (args.peak_tflops * 1e12) if device.type == "cuda" else float("nan")
        results["rows"].append(
            {
                "method": method + ("_frozen_uncond" if args.frozen_uncond else ""),
                "sampling_images_per_s": args.batch / t_sample,
                "sampling_peak_gb": mem_sample,
                "train_samples_per_s": args.batch / t_iter,
                "train_iter_s": t_iter,
                "train_peak_gb": mem_iter,
                "unet_fwd_tflops_cfg_batch": fl / 1e12,
                "mfu": mfu,
                "reward_mean": m["reward_mean"],
            }
        )
        if args.out:  # after every method: a later one that fails or is stopped keeps the earlier rows
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        del tr
        gc.collect()
        _reset(device)
    return results


# --------------------------------------------------------------------------- --arch sd35m
def sd35m_cell(args, method: str, steps: int, device) -> tuple[dict, dict]:
    """One (method, K) cell: build the trainer on the random SD3.5-M pipeline, time a rollout and one
    ``train_iteration``; returns (row, facts about the model)."""
    import t2i.task as trmod
    import t2i.trainer as trainer_mod
    from sa_theory.algorithms.rl_batch import select_rows
    from t2i.environments import make_environment
    from t2i.rollout import sample_rollout

    cfg = sd35m_config(method, steps, args.batch, args.train_batch, args.workdir, args.tiny, args.grad_ckpt)
    t0 = time.time()
    build = lambda c, dev, wd: build_sd35m_pipeline(  # noqa: E731
        dev, wd, tiny=args.tiny, resolution=args.resolution, num_layers=args.layers
    )
    with patched(trmod, "build_pipeline", build):  # the Trainer's one model-building call
        tr = trainer_mod.make_trainer(cfg)
    t_build = time.time() - t0
    counter = RowCounter(tr.env.model)
    try:
        B, peak = args.batch, args.peak_tflops * 1e12
        prompts = [cfg.prompts[0]] * B
        gen = torch.Generator().manual_seed(0)
        with tr.acc.autocast():  # warm-up: a 2-step rollout of the same batch (encoders, both model calls, decode)
            sample_rollout(make_environment(tr.pipe, cfg.sample, min(2, steps)), prompts, gen)
            text = tr.env.encode(prompts)
            # and one policy forward + backward on a minibatch (gradients dropped, no optimizer step)
            sub = select_rows(text, torch.arange(args.train_batch))
            a = tr.env.action(min(1, steps - 1), tr.env.initial_latents(args.train_batch, gen), sub, tr.unet_ddp)
        a.float().square().mean().backward()
        tr.opt.zero_grad(set_to_none=True)
        del a
        fpr = flops_per_row(tr.env, text, counter, gen, tr.acc.autocast())
        _reset(device)
        _sync(device)
        t0 = time.time()
        with tr.acc.autocast():
            sample_rollout(tr.env, prompts, gen)
        _sync(device)
        t_sample, mem_sample, rows_sample = time.time() - t0, _peak_gb(device), counter.inference
        _reset(device)
        counter.reset()
        t0 = time.time()
        m = tr.train_iteration()
        _sync(device)
        t_iter, mem_iter = time.time() - t0, _peak_gb(device)
        flops_iter = fpr * (counter.inference + 3 * counter.grad)
        row = {
            "method": method,
            "steps": steps,
            "sampling_images_per_s": B / t_sample,
            "sampling_s": t_sample,
            "sampling_peak_gb": mem_sample,
            "sampling_mfu": fpr * rows_sample / t_sample / peak,
            "train_samples_per_s": B / t_iter,
            "train_iter_s": t_iter,
            "train_sampling_phase_s": m["time_sample_s"],
            "train_peak_gb": mem_iter,
            "mfu": flops_iter / t_iter / peak,
            "transformer_fwd_tflops_per_row": fpr / 1e12,
            "rows_sampling": rows_sample,
            "rows_train_no_grad": counter.inference,
            "rows_train_grad": counter.grad,
            "train_tflops": flops_iter / 1e12,
            "updates": m["updates"],
            "reward_mean": m["reward_mean"],
            "build_s": t_build,
        }
        model = tr.env.model
        facts = {
            "transformer_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
            "latent_shape": list(tr.env.latent_shape()),
            "text_tokens": int(text["embeds"].shape[1]),
            "text_width": int(text["embeds"].shape[2]),
            "guidance": cfg.sample.guidance_scale,
        }
        return row, facts
    finally:
        counter.close()
        del tr


SD35M_COLUMNS = (("steps", 5, "d"), ("method", 9, "s"), ("sampling_images_per_s", 12, ".3f"),
                 ("sampling_peak_gb", 9, ".2f"), ("sampling_mfu", 8, ".3f"), ("train_samples_per_s", 12, ".3f"),
                 ("train_peak_gb", 8, ".2f"), ("mfu", 6, ".3f"))
SD35M_HEADER = ("K", "method", "sample img/s", "sample GB", "samp MFU", "train samp/s", "train GB", "MFU")


def _print_sd35m_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['steps']:>5} | {r['method']:>9} | error: {r['error']}", flush=True)
        return
    print(" | ".join(f"{r[k]:>{w}{f}}" for k, w, f in SD35M_COLUMNS), flush=True)


def _dump(res: dict, out: str | None, t_start: float) -> None:
    res["wall_s"] = time.time() - t_start
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def run_sd35m(args, t_start: float) -> dict:
    """Every (K, method) cell in order (cheapest K first), under the wall-clock guard; JSON after each cell."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)
    res = {"arch": "sd35m", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "tiny": args.tiny, "batch": args.batch, "train_batch": args.train_batch, "steps": list(args.steps),
           "methods": list(args.methods), "resolution": None if args.tiny else args.resolution,
           "layers": args.layers or (None if args.tiny else 24), "peak_tflops": args.peak_tflops,
           "time_budget_s": args.time_budget, "rows": [], "skipped": []}
    print(f"device: {res['device']}  arch sd35m  batch {args.batch}  train batch {args.train_batch}  "
          f"resolution {res['resolution']}  steps {res['steps']}")
    widths = [w for _, w, _ in SD35M_COLUMNS]
    hdr = " | ".join(f"{h:>{w}}" for h, w in zip(SD35M_HEADER, widths))
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    per_step = 0.0  # the slowest cell so far, seconds per sampling step (predicts the next cell)
    try:
        for K in args.steps:
            for method in args.methods:
                left = args.time_budget - (time.time() - t_start)
                if per_step * K > left:
                    res["skipped"].append({"method": method, "steps": K, "reason": f"predicted {per_step * K:.0f} s"
                                           f" > {left:.0f} s left of --time-budget"})
                    print(f"{K:>5} | {method:>9} | skipped: {res['skipped'][-1]['reason']}", flush=True)
                    continue
                t_cell = time.time()
                try:
                    with wall_clock_alarm(None if args.tiny else left):
                        row, facts = sd35m_cell(args, method, K, device)
                    res.update({k: v for k, v in facts.items() if k not in res})
                except Exception as err:  # one shot on a lent GPU: keep the other cells
                    if args.tiny:
                        raise
                    traceback.print_exc()
                    row = {"method": method, "steps": K, "error": f"{type(err).__name__}: {err}"[:400]}
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                per_step = max(per_step, (time.time() - t_cell) / K)
                row["cell_s"] = time.time() - t_cell
                res["rows"].append(row)
                _print_sd35m_row(row)
                _dump(res, args.out, t_start)
    finally:
        torch.set_num_threads(threads)
        _dump(res, args.out, t_start)
    print(f"transformer parameters: {res.get('transformer_params', 0):,}; text tokens "
          f"{res.get('text_tokens')}; latent {res.get('latent_shape')}; wall {time.time() - t_start:.0f} s")
    return res


def main(argv=None):
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("sd15", "sd35m"), default="sd15", help="model architecture")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode on the tiny pipeline")
    ap.add_argument("--batch", type=int, default=8, help="images per sampling batch")
    ap.add_argument("--train-batch", type=int, default=4, help="paths per backward pass")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="sampling steps: sd15 one value (default 50); sd35m a list (default 10 40)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: sa_ac ddpo_is (sd15), sa_ac flow_grpo (sd35m)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--steps-per-backward", type=int, default=1,
                    help="sd15: train.steps_per_backward (1: one step per forward+backward, as trained by default; "
                         "n: n steps of a minibatch in one pass; 0: all of them)")
    ap.add_argument("--frozen-uncond", action="store_true",
                    help="sd15: model.lora_uncond false (CFG's unconditional branch stays the pretrained model's)")
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s (H100 SXM, H200: 989)"
    )
    ap.add_argument("--resolution", type=int, default=512, help="sd35m: image side in pixels (latent side / 8)")
    ap.add_argument("--layers", type=int, default=None,
                    help="sd35m: keep the first N of the 24 joint blocks (debugging on small machines)")
    ap.add_argument("--time-budget", type=float, default=540.0,
                    help="sd35m: wall-clock seconds from start; a cell predicted to end later is skipped, a running "
                         "one is stopped there (finished cells are kept)")
    ap.add_argument("--workdir", default="/tmp/sa_t2i_bench")
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args(argv)
    sd35 = args.arch == "sd35m"
    args.methods = args.methods or (["sa_ac", "flow_grpo"] if sd35 else ["sa_ac", "ddpo_is"])
    args.steps = args.steps or ([10, 40] if sd35 else [50])
    if sd35:
        if args.tiny:  # steps / 10 (at least 2), batches of 2
            args.steps = [max(2, s // 10) for s in args.steps]
            args.batch, args.train_batch = min(args.batch, 2), min(args.train_batch, 2)
        return run_sd35m(args, t_start)
    if len(args.steps) != 1:
        ap.error("--arch sd15 takes one --steps value")
    args.steps = args.steps[0]
    if args.tiny:
        args.steps, args.batch, args.train_batch = (
            min(args.steps, 2),
            min(args.batch, 2),
            min(args.train_batch, 2),
        )
    res = run(args)
    hdr = f"{'method':>8} | {'sample img/s':>12} | {'sample GB':>9} | {'train samp/s':>12} | {'train GB':>8} | {'MFU':>6}"  # noqa: E501
    print(f"device: {res['device']}  batch {res['batch']}  steps {res['steps']}  CFG 5.0")
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:
        print(
            f"{r['method']:>8} | {r['sampling_images_per_s']:12.3f} | {r['sampling_peak_gb']:9.2f} | "
            f"{r['train_samples_per_s']:12.3f} | {r['train_peak_gb']:8.2f} | {r['mfu']:6.3f}"
        )
    return res


if __name__ == "__main__":
    main()
