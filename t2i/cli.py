"""``sa-t2i`` command line: ``train``, ``sample``, ``evaluate``, ``presets``.

sa-t2i train --config sd15_sa_ac [--section.field value ...]
accelerate launch --num_processes 8 -m t2i.cli train --config sd15_sa_ac
sa-t2i sample --checkpoint runs/sd15_sa_ac --prompts "a cat" "a dog" --out samples/
sa-t2i evaluate --checkpoint runs/sd15_sa_ac [--section.field value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

__all__ = ["main", "parse_overrides", "evaluate", "sample"]


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``{"a.b": "1", "c.d": "x"}``; raises on a dangling token."""
    out, i = {}, 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}: overrides are --section.field value")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ValueError(f"override {tok!r} needs a value")
            val, i = rest[i + 1], i + 2
        out[key] = val
    return out


def _mean_se(x) -> tuple[float, float]:
    import torch

    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    return float(x.mean()), float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def evaluate(
    checkpoint: str | None, overrides: dict | None = None, device: str | None = None, cfg=None, pipe=None
) -> dict:
    """Reward, diversity and path KL to the pretrained sampler (means and standard errors) of a checkpoint,
    next to the same numbers for the pretrained model (adapters disabled). Uses the training kernel
    (stochastic, so the path KL is defined); with ``sample.eval_sampler`` != training sampler the reward under
    that sampler is reported too."""
    import torch
    import torch.nn.functional as F

    from .models import pretrained
    from .rewards import diversity, make_reward
    from .rollout import sample_images, sample_rollout
    from .scheduling import make_kernel
    from .trainer import load_policy_from_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if pipe is None:
        cfg, pipe = load_policy_from_checkpoint(checkpoint, device, overrides)
    reward = make_reward(cfg.reward.name, cfg.reward.clip_path, cfg.reward.weights_path).to(device)
    s = cfg.sample
    _, kernel = make_kernel(pipe.scheduler.config, s.sampler, s.eval_num_steps, s.eta)
    n = s.eval_num_images
    prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(n)]
    results = {}
    for label in ("policy", "pretrained"):
        gen = torch.Generator().manual_seed(12345)
        rs, kls, imgs = [], [], []
        for i in range(0, n, s.batch_size):
            ps = prompts[i : i + s.batch_size]
            if label == "policy":
                b = sample_rollout(pipe, kernel, ps, s.guidance_scale, gen, negative_prompt=s.negative_prompt)
            else:
                with pretrained(pipe.unet):
                    b = sample_rollout(
                        pipe,
                        kernel,
                        ps,
                        s.guidance_scale,
                        gen,
                        record_reference=False,
                        negative_prompt=s.negative_prompt,
                    )
                b.kl_steps = torch.zeros_like(b.log_probs)
            with torch.no_grad():
                rs.append(reward(b.images, ps).float().cpu())
            kls.append(b.path_kl.cpu())
            imgs.append(F.interpolate(b.images, size=(32, 32), mode="area").cpu())
        r, kl = torch.cat(rs), torch.cat(kls)
        d, d_se = diversity(torch.cat(imgs).flatten(1), prompts)
        res = {
            "reward_mean": _mean_se(r)[0],
            "reward_se": _mean_se(r)[1],
            "path_kl_mean": _mean_se(kl)[0],
            "path_kl_se": _mean_se(kl)[1],
            "diversity_pixels": d,
            "diversity_pixels_se": d_se,
            "n": n,
        }
        if s.eval_sampler != s.sampler:
            gen = torch.Generator().manual_seed(54321)
            ctx = pretrained(pipe.unet) if label == "pretrained" else _null()
            with ctx:
                rr = []
                for i in range(0, n, s.batch_size):
                    ps = prompts[i : i + s.batch_size]
                    im = sample_images(
                        pipe, ps, s.eval_sampler, s.eval_num_steps, s.guidance_scale, gen, s.eta
                    )
                    with torch.no_grad():
                        rr.append(reward(im, ps).float().cpu())
            m, se = _mean_se(torch.cat(rr))
            res[f"reward_{s.eval_sampler}_mean"], res[f"reward_{s.eval_sampler}_se"] = m, se
        results[label] = res
    return results


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def sample(
    checkpoint: str,
    prompts: list[str],
    out: str,
    num_per_prompt: int = 4,
    overrides: dict | None = None,
    seed: int = 0,
) -> list[str]:
    """Save PNGs (one per image, plus ``grid.png``) sampled with ``sample.eval_sampler``."""
    import torch

    from .logging_utils import image_grid, save_png
    from .rollout import sample_images
    from .trainer import load_policy_from_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, pipe = load_policy_from_checkpoint(checkpoint, device, overrides)
    s = cfg.sample
    gen = torch.Generator().manual_seed(seed)
    allp = [p for p in prompts for _ in range(num_per_prompt)]
    imgs = torch.cat(
        [
            sample_images(
                pipe,
                allp[i : i + s.batch_size],
                s.eval_sampler,
                s.eval_num_steps,
                s.guidance_scale,
                gen,
                s.eta,
                s.negative_prompt,
            )
            for i in range(0, len(allp), s.batch_size)
        ]
    )
    paths = []
    for i, im in enumerate(imgs):
        p = os.path.join(out, f"{i:04d}.png")
        save_png(im, p)
        paths.append(p)
    save_png(image_grid(imgs, num_per_prompt), os.path.join(out, "grid.png"))
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(allp, f)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="sa-t2i", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a LoRA policy")
    tr.add_argument("--config", default="sd15_sa_ac", help="preset name (sa-t2i presets)")
    sa = sub.add_parser("sample", help="sample images from a checkpoint")
    sa.add_argument("--checkpoint", required=True)
    sa.add_argument("--prompts", nargs="+", required=True)
    sa.add_argument("--out", default="samples")
    sa.add_argument("--num-per-prompt", type=int, default=4)
    sa.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("evaluate", help="reward, diversity, path KL (with standard errors)")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--out", default=None, help="write the results as JSON here")
    sub.add_parser("presets", help="list presets")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.cmd == "presets":
        from .config import PRESETS

        print("\n".join(sorted(PRESETS)))
        return 0
    if args.cmd == "train":
        from .config import apply_overrides, get_preset, validate
        from .trainer import Trainer

        cfg = apply_overrides(get_preset(args.config), overrides)
        validate(cfg)
        Trainer(cfg).train()
        return 0
    if args.cmd == "sample":
        paths = sample(args.checkpoint, args.prompts, args.out, args.num_per_prompt, overrides, args.seed)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")
        return 0
    if args.cmd == "evaluate":
        res = evaluate(args.checkpoint, overrides)
        for label, r in res.items():
            print(
                f"{label:>10}: reward {r['reward_mean']:.4g} +- {r['reward_se']:.2g} | path KL "
                f"{r['path_kl_mean']:.4g} +- {r['path_kl_se']:.2g} nats | diversity {r['diversity_pixels']:.4g}"  # noqa: E501
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
