"""GPU benchmark of the t2i training loop on the real Stable Diffusion v1.5 architecture (random weights).

No download: the SD v1.5 UNet / VAE / CLIP text-encoder configs are hard-coded and the models are built
from them with random weights (speed and memory do not depend on the weight values). Measures, at
512x512, ``--steps`` (50) DDIM steps, CFG, bf16 frozen weights with fp32 LoRA:

* sampling: images/s and peak memory (policy + pretrained reference UNet calls, as in training);
* one full training iteration of ``sa_ac`` (sampling + actor + critic) and of ``ddpo_is``: samples/s,
peak memory;
* model FLOPs utilisation (MFU): UNet FLOPs counted with ``torch.utils.flop_counter`` on one forward,
  x3 for forward+backward, divided by time and the device's peak bf16 dense FLOP/s (``--peak-tflops``).

Prints one table and writes JSON (``--out``). ``--tiny`` runs the same code on the tiny CPU pipeline in
seconds (smoke mode, used by the default test suite so this script does not rot).

    python benchmarks/t2i_gpu.py --batch 8 --out bench.json
    python benchmarks/t2i_gpu.py --tiny
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from t2i.models import SD15_SCHEDULER_CONFIG

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=512,
    act_fn="silu",
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHED = SD15_SCHEDULER_CONFIG


def build_sd15_random(device, dtype):
    """SD v1.5 pipeline architecture with random weights (character-level tokenizer: text length is what
    matters for cost, all prompts are padded to 77 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i.models import build_tiny_pipeline

    tok = build_tiny_pipeline(0).tokenizer
    cfg = CLIPTextConfig(
        **{**SD15_TEXT, "vocab_size": max(len(tok), 100)},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(cfg),
        tokenizer=tok,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(**SD15_SCHED),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).to(device, dtype=dtype)
    return pipe


def unet_flops(unet, batch, device, dtype) -> float:
    """FLOPs of one UNet forward on ``batch`` latents (torch.utils.flop_counter; counts
    matmul/conv/attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    C, h = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(batch, C, h, h, device=device, dtype=dtype)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, 500, encoder_hidden_states=e)
    return float(fc.get_total_flops())


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
    from t2i.trainer import Trainer

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        torch.set_num_threads(1)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "batch": args.batch,
        "steps": args.steps,
        "guidance": 5.0,
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
            },
        )
        if not args.tiny:
            import t2i.trainer as trmod

            trmod.build_pipeline = lambda cfg, dev, wd: build_sd15_random(dev, torch.bfloat16)
        tr = Trainer(cfg)
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
        m = tr.train_epoch()
        _sync(device)
        t_iter = time.time() - t0
        mem_iter = _peak_gb(device)
        fl = unet_flops(tr.pipe.unet, 2 * args.batch, device, tr.weight_dtype)  # CFG doubles the batch
        # rollout: policy + reference forward per step; training: forward + backward (~3x forward) per step
        flops_iter = fl * args.steps * 2 + fl * args.steps * 3
        mfu = flops_iter / t_iter / (args.peak_tflops * 1e12) if device.type == "cuda" else float("nan")
        results["rows"].append(
            {
                "method": method,
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
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode on the tiny pipeline")
    ap.add_argument("--batch", type=int, default=8, help="images per sampling batch")
    ap.add_argument("--train-batch", type=int, default=4, help="paths per backward pass")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--methods", nargs="+", default=["sa_ac", "ddpo_is"])
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s (H100 SXM: 989)"
    )
    ap.add_argument("--workdir", default="/tmp/sa_t2i_bench")
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args(argv)
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
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
