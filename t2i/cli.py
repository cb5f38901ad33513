"""``sa-t2i`` command line: ``train``, ``sample``, ``evaluate``, ``presets``, ``config``.

sa-t2i train --config sd15_sa_ac [--section.field value ...]
sa-t2i train --config sd15_sa_ac --resume_from auto      # continue the run in log.output_dir
sa-t2i train --config sd15_sa_ac --log.overwrite true    # replace the run in log.output_dir
accelerate launch --num_processes 8 -m t2i.cli train --config sd15_sa_ac
sa-t2i sample --checkpoint runs/sd15_sa_ac --prompts "a cat" "a dog" --out samples/
sa-t2i evaluate --checkpoint runs/sd15_sa_ac [--section.field value ...]
sa-t2i config --config tiny_cpu                          # every field: type, value, meaning

A run folder that already holds a run is never written over without --log.overwrite; a resume with settings
that differ from the checkpoint's is refused naming them. Ctrl-C finishes the epoch, saves and prints the resume
command. Errors are one "error: ..." line; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sa_theory.kl import mean_se

__all__ = ["main", "parse_overrides", "evaluate", "sample"]


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``{"a.b": "1", "c.d": "x"}`` (the shared parser of both CLIs,
    :func:`sa_theory.algorithms.config.parse_overrides`); a stray token raises ``ValueError``."""
    from sa_theory.algorithms.config import parse_overrides as _parse

    return _parse(rest)


def evaluate(
    checkpoint: str | None, overrides: dict | None = None, device: str | None = None, cfg=None, pipe=None
) -> dict:
    """Reward, diversity and path KL to the pretrained sampler (means and standard errors) of a checkpoint,
    next to the same numbers for the pretrained model (adapters disabled). Uses the training kernel
    (stochastic, so the path KL is defined); with ``sample.eval_sampler`` != training sampler the reward under
    that sampler is reported too."""
    import torch
    import torch.nn.functional as F

    from .environments import make_environment
    from .models import denoiser, pretrained
    from .reward_stats import diversity
    from .rewards import make_reward
    from .rollout import sample_images, sample_rollout
    from .trainer import load_policy_from_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if pipe is None:
        cfg, pipe = load_policy_from_checkpoint(checkpoint, device, overrides)
    reward = make_reward(cfg.reward.name, cfg.reward.clip_path, cfg.reward.weights_path).to(device)
    s = cfg.sample
    env = make_environment(pipe, s, s.eval_num_steps, cfg.model.lora_uncond)
    n = s.eval_num_images
    prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(n)]
    results = {}
    for label in ("policy", "pretrained"):
        gen = torch.Generator().manual_seed(12345)
        rs, kls, imgs = [], [], []
        for i in range(0, n, s.batch_size):
            ps = prompts[i : i + s.batch_size]
            if label == "policy":
                b = sample_rollout(env, ps, gen)
            else:
                with pretrained(denoiser(pipe)):
                    b = sample_rollout(env, ps, gen, record_reference=False)
                b.kl_steps = torch.zeros_like(b.log_probs)
            with torch.no_grad():
                rs.append(reward(b.images, ps).float().cpu())
            kls.append(b.path_kl.cpu())
            imgs.append(F.interpolate(b.images, size=(32, 32), mode="area").cpu())
        r, kl = torch.cat(rs), torch.cat(kls)
        d, d_se = diversity(torch.cat(imgs).flatten(1), prompts)
        res = {
            "reward_mean": mean_se(r)[0],
            "reward_se": mean_se(r)[1],
            "path_kl_mean": mean_se(kl)[0],
            "path_kl_se": mean_se(kl)[1],
            "diversity_pixels": d,
            "diversity_pixels_se": d_se,
            "n": n,
        }
        if s.eval_sampler != s.sampler:
            gen = torch.Generator().manual_seed(54321)
            ctx = pretrained(denoiser(pipe)) if label == "pretrained" else _null()
            with ctx:
                rr = []
                for i in range(0, n, s.batch_size):
                    ps = prompts[i : i + s.batch_size]
                    im = sample_images(
                        pipe, ps, s.eval_sampler, s.eval_num_steps, s.guidance_scale, gen, s.eta,
                        s.negative_prompt, s.resolution, cfg.model.lora_uncond,
                    )
                    with torch.no_grad():
                        rr.append(reward(im, ps).float().cpu())
            m, se = mean_se(torch.cat(rr))
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
                s.resolution,
                cfg.model.lora_uncond,
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


def _check_out(path: str | None, kind: str) -> None:
    """``--out`` before any model is built: ``kind='dir'`` must not be a file, ``'file'`` must not be a folder;
    the nearest existing parent must be a writable folder."""
    if path is None:
        return
    if kind == "dir" and os.path.isfile(path):
        raise ValueError(f"--out {path!r} is a file, not a folder")
    if kind == "file" and os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a folder; give a file name for the JSON results")
    parent = os.path.abspath(path if kind == "dir" else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path!r}: {parent!r} is not a writable folder")


def _train(args, overrides: dict, argv: list[str]) -> int:
    import shlex

    from sa_theory.algorithms import TrainingInterrupted

    from .config import apply_overrides, get_preset, validate

    cfg = apply_overrides(get_preset(args.config), overrides)
    validate(cfg)  # every field and log.output_dir, before the (expensive) trainer import and model build
    from .trainer import make_trainer

    tr = make_trainer(cfg)
    cmd, i = [], 0
    while i < len(argv):  # the same command with --resume_from auto (the run folder's newest checkpoint)
        if argv[i].startswith("--resume_from"):
            i += 1 if "=" in argv[i] else 2
            continue
        cmd.append(argv[i])
        i += 1
    tr.resume_hint = shlex.join(["sa-t2i", *cmd, "--resume_from", "auto"])
    try:
        tr.train()
    except TrainingInterrupted as err:
        tr.acc.print(f"interrupted: {err}")
        tr.acc.end_training()
        return 130
    s = tr.summary()
    tr.acc.end_training()  # trackers closed, process group destroyed on every rank (a clean exit under DDP/FSDP)
    if tr.acc.is_main_process:
        pm = lambda k: f"{s[k + '_mean']:.4g} +- {s.get(k + '_se', float('nan')):.2g}" if k + "_mean" in s else "n/a"
        print(f"done: {s['epochs']} epochs | final epoch reward {pm('reward')} | path KL {pm('path_kl')} nats"
              + (f" (continuous-time {pm('path_kl_ct')})" if "path_kl_ct_mean" in s else ""))
        print(f"outputs in {s['output_dir']}: metrics {s['metrics']}, checkpoint {s['checkpoint']}"
              + (f", images {s['images']}" if s["images"] else "") + f", summary {s['output_dir']}/summary.json")
    return 0


def _run(args, rest: list[str], argv: list[str]) -> int:
    overrides = parse_overrides(rest)
    if args.cmd == "presets":
        from .config import PRESETS

        print("\n".join(sorted(PRESETS)))
        return 0
    if args.cmd == "config":
        from .config import apply_overrides, describe_config, get_preset

        print(describe_config(apply_overrides(get_preset(args.config), overrides)))
        return 0
    if args.cmd == "train":
        return _train(args, overrides, argv)
    if args.cmd == "sample":
        if args.num_per_prompt < 1:
            raise ValueError(f"--num-per-prompt must be >= 1, got {args.num_per_prompt}")
        _check_out(args.out, "dir")
        paths = sample(args.checkpoint, args.prompts, args.out, args.num_per_prompt, overrides, args.seed)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")
        return 0
    if args.cmd == "evaluate":
        _check_out(args.out, "file")
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
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
    cf = sub.add_parser("config", help="every config field with its type, value and meaning")
    cf.add_argument("--config", default="sd15_sa_ac", help="preset name (sa-t2i presets)")
    for p in (ap, tr, sa, ev, cf):
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args, rest = ap.parse_known_args(argv)
    try:
        return _run(args, rest, argv)
    except Exception as err:  # one line for the user; --debug for the traceback
        if debug:
            raise
        print(f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
