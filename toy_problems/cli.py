"""``sa-toy``: train and evaluate on the toy problems from the command line.

    sa-toy train --algo sa_ac --problem gauss2d --iterations 50 --lr 3e-3 --out runs/ac
    sa-toy train --algo ddpo_is --problem gmm2d --set clip_range=0.05 --set sampler_steps=25
    sa-toy train --algo sa_ac --out runs/ac --resume          # continue a killed run exactly
    sa-toy config --algo sa_ac                                # every field, its default and meaning

Any field of the algorithm's config (``sa_theory.algorithms.config``) or of
:class:`toy_problems.train.ToyConfig` can be set as ``--field value`` or ``--set field=value``
(``--steps`` is an alias of ``--iterations``, training iterations; the sampler's step count is
``--sampler_steps``). Unknown fields are an error that names them. With ``--out DIR`` the run writes
``DIR/metrics.jsonl`` (one JSON record per logged iteration), ``DIR/checkpoint.pt`` and
``DIR/config.json``, and prints a final evaluation against the closed-form optimum.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sa_theory.algorithms import CONFIGS, describe, to_dict

__all__ = ["main", "parse_overrides"]

_ALIASES = {"steps": "iterations"}


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """``["--lr", "1e-3", "--set", "beta=2", "--progress=false"]`` -> ``{"lr": "1e-3", "beta": "2", ...}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--set":
            if i + 1 >= len(rest) or "=" not in rest[i + 1]:
                raise SystemExit("error: --set needs key=value")
            k, v = rest[i + 1].split("=", 1)
            i += 2
        elif tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                k, v = body.split("=", 1)
                i += 1
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                k, v = body, rest[i + 1]
                i += 2
            else:  # bare flag: boolean true
                k, v = body, "true"
                i += 1
        else:
            raise SystemExit(f"error: unexpected argument {tok!r} (use --field value or --set field=value)")
        k = k.replace("-", "_")
        out[_ALIASES.get(k, k)] = v
    return out


def _train(args, rest) -> int:
    import torch

    from .train import build

    overrides = parse_overrides(rest)
    if args.problem:
        overrides["problem"] = args.problem
    if args.out:
        overrides.setdefault("log_path", os.path.join(args.out, "metrics.jsonl"))
        overrides.setdefault("checkpoint_path", os.path.join(args.out, "checkpoint.pt"))
    try:
        setup = build(args.algo, overrides=overrides)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    cfg = setup.cfg
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as fh:
            json.dump({"train": to_dict(cfg), "toy": vars(setup.toy)}, fh, indent=1)
    if args.resume and cfg.checkpoint_path and setup.trainer.resume():
        print(f"resumed from {cfg.checkpoint_path} at iteration {setup.trainer.iteration}")
    elif cfg.log_path and os.path.exists(cfg.log_path):
        os.remove(cfg.log_path)
    setup.trainer.train()
    ev = setup.evaluate()
    ev = {k: v for k, v in ev.items() if not isinstance(v, torch.Tensor)}
    opt, pre = setup.optimum(), setup.pretrained_objective()
    print(f"algo={args.algo} problem={setup.toy.problem} iterations={setup.trainer.iteration} "
          f"queries={setup.trainer.queries}")
    print(f"  objective {ev['objective']:.4f}  reward {ev['reward']:.4f}  path KL {ev['path_kl']:.4f}")
    print(f"  closed-form optimum {opt:.4f}  pretrained {pre:.4f}  gap closed "
          f"{(ev['objective'] - pre) / (opt - pre):.1%}")
    if args.out:
        with open(os.path.join(args.out, "final.json"), "w") as fh:
            json.dump({**ev, "optimum": opt, "pretrained": pre}, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sa-toy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on a toy problem (any config field: --field value)")
    tr.add_argument("--algo", default="sa_ac", choices=sorted(CONFIGS))
    tr.add_argument("--problem", default=None, help="gauss2d | ou2d | gmm2d")
    tr.add_argument("--out", default=None, help="run directory (metrics.jsonl, checkpoint.pt, config.json)")
    tr.add_argument("--resume", action="store_true", help="resume from the run directory's checkpoint")
    cf = sub.add_parser("config", help="print every config field with its default and meaning")
    cf.add_argument("--algo", default="sa_ac", choices=sorted(CONFIGS))
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "config":
        from .train import ToyConfig

        print(describe(CONFIGS[args.algo]))
        print(describe(ToyConfig))
        return 0
    return _train(args, rest)


if __name__ == "__main__":
    raise SystemExit(main())
