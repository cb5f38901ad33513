"""``sa-toy``: train and evaluate on the toy problems from the command line.

    sa-toy train --algo sa_ac --problem gauss2d --train.num_epochs 50 --train.learning_rate 3e-3 --out runs/ac
    sa-toy train --algo ddpo_is --problem gmm2d --set clip_range=0.05 --set sample.num_steps=25
    sa-toy train --algo sa_ac --out runs/ac --resume          # continue a killed / interrupted run exactly
    sa-toy train --algo sa_ac --out runs/ac --overwrite       # replace the run in runs/ac
    sa-toy config --algo sa_ac                                # every field, its default and meaning

Any field of the algorithm's config (``sa_theory.algorithms.config``) or of
:class:`toy_problems.train.ToyConfig` can be set as ``--field value`` or ``--set field=value``, by its qualified
name (``--train.num_epochs``, ``--sample.num_steps``, ``--value.loss``: the image CLI's names wherever the quantity is
the same; ``sa-toy config`` lists them) or its Python name (``--num_epochs``; ``--steps`` is an alias of it).
Unknown fields are an error that names them. With ``--out DIR`` the run writes
``DIR/metrics.jsonl`` (one JSON record per logged epoch, the image runs' names), ``DIR/checkpoints/`` (every ~10%
of the epochs, the image runs' layout: ``checkpoint-EEEEEE`` folders, ``latest``), ``DIR/config.json`` and
``DIR/final.json``, and
prints a final evaluation against the closed-form optimum.

Run folders: a folder that is not empty is never written over without ``--overwrite`` (which removes only the
files above); ``--resume`` needs a checkpoint there and refuses one made with other settings (only
``num_epochs``, logging and evaluation fields may change; the change is reported). Ctrl-C (or SIGTERM) finishes
the current iteration, writes a checkpoint and prints the command that resumes. Errors are one ``error: ...``
line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from sa_theory.algorithms import CONFIGS, describe, to_dict
from sa_theory.algorithms.checkpoint import atomic_write_json, has_checkpoint
from sa_theory.algorithms.config import parse_overrides as _parse_overrides

__all__ = ["main", "parse_overrides", "check_out_dir", "RUN_FILES"]

_ALIASES = {"steps": "num_epochs"}
#: what a run writes into ``--out`` (all that ``--overwrite`` removes)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "final.json")


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """``["--learning_rate", "1e-3", "--set", "beta=2", "--progress=false"]``
    -> ``{"learning_rate": "1e-3", "beta": "2", ...}``."""
    return _parse_overrides(rest, aliases=_ALIASES)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_out_dir(out: str, resume: bool, overwrite: bool) -> None:
    """Validate ``--out`` before any expensive work: a folder (or creatable one) that we may write, empty
    unless ``resume`` (then it must hold a checkpoint) or ``overwrite``. ``ValueError`` names ``--out``."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    parent = _nearest_existing(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r}: {parent!r} is not a writable folder")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if resume:
        if not has_checkpoint(os.path.join(out, "checkpoints")):
            found = entries or "an empty or missing folder"
            raise ValueError(f"--resume: no checkpoint in --out {out!r} (looked for checkpoints/latest and "
                             f"checkpoints/checkpoint-*; found {found}); nothing was changed")
    elif entries and not overwrite:
        raise ValueError(f"--out {out!r} is not empty ({', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''})"
                         f": pass --resume to continue that run, --overwrite to replace it, or choose another --out")


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["sa-toy", *args, "--resume"])


def _train(args, rest, argv) -> int:
    import torch

    from sa_theory.algorithms import TrainingInterrupted

    from .train import build

    overrides = parse_overrides(rest)
    if args.problem:
        overrides["problem"] = args.problem
    if args.overwrite:
        overrides["overwrite"] = "true"
    if args.out:
        check_out_dir(args.out, args.resume, args.overwrite)
        overrides.setdefault("log_path", os.path.join(args.out, "metrics.jsonl"))
        overrides.setdefault("checkpoint_dir", os.path.join(args.out, "checkpoints"))
    elif args.resume and not {"checkpoint_dir", "log.checkpoint_dir"} & set(overrides):
        raise ValueError("--resume needs --out DIR (or --log.checkpoint_dir DIR) to find the checkpoint")
    setup = build(args.algo, overrides=overrides)
    cfg, trainer = setup.cfg, setup.trainer
    trainer.resume_hint = _resume_command(argv) if cfg.checkpoint_dir else "re-run with --out DIR to be able to resume"
    if args.resume:
        if not trainer.resume():
            raise ValueError(f"--resume: no checkpoint in {cfg.checkpoint_dir!r}; nothing was changed")
        print(f"resumed from {cfg.checkpoint_dir} at epoch {trainer.iteration}")
    elif args.out and args.overwrite:
        for f in RUN_FILES:
            p = os.path.join(args.out, f)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    if args.out:  # only now: the config was valid and (on resume) the checkpoint accepted it
        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, "config.json"), {"train": to_dict(cfg), "toy": vars(setup.toy)})
    try:
        trainer.train()
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    ev = {k: v for k, v in setup.evaluate().items() if not isinstance(v, torch.Tensor)}
    gap = setup.gap_closed()
    print(f"algo={args.algo} problem={setup.toy.problem} epochs={trainer.iteration} queries={trainer.queries}")
    se = lambda k: f" +- {ev[k + '_se']:.4f}" if k + "_se" in ev else ""
    print(f"  objective {ev['objective']:.4f}{se('objective')}  reward {ev['reward']:.4f}{se('reward')}  "
          f"path KL {ev['path_kl']:.4f}{se('path_kl')}")
    if gap["kind"] == "exact":
        how = "exact J of policy, pretrained and optimum"
    else:
        how = (f"Monte Carlo: policy J {gap['objective']:.4f} vs pretrained J {gap['pretrained']:.4f} on the same "
               f"{setup.toy.eval_paths} paths, {cfg.num_steps} steps; over the exact J* - J_pre")
    print(f"  closed-form optimum {gap['optimum']:.4f}  pretrained {setup.pretrained_objective():.4f}  gap closed "
          f"{gap['fraction']:.1%} +- {gap['fraction_se']:.1%} ({how})")
    if args.out:
        atomic_write_json(os.path.join(args.out, "final.json"),
                    {**ev, "optimum": gap["optimum"], "pretrained": setup.pretrained_objective(),
                     "gap_closed": gap})
        written = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
        print(f"  outputs in {args.out}: {', '.join(written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="sa-toy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on a toy problem (any config field: --field value)")
    tr.add_argument("--algo", default="sa_ac", choices=sorted(CONFIGS))
    tr.add_argument("--problem", default=None, help="gauss2d | ou2d | gmm2d")
    tr.add_argument("--out", default=None, help="run directory (metrics.jsonl, checkpoints/, config.json)")
    tr.add_argument("--resume", action="store_true", help="resume from the run directory's checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    cf = sub.add_parser("config", help="print every config field with its default and meaning")
    cf.add_argument("--algo", default="sa_ac", choices=sorted(CONFIGS))
    for p in (parser, tr, cf):
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.cmd == "config":
            from .train import ToyConfig

            if rest:
                raise ValueError(f"unexpected arguments {rest}")
            print(describe(CONFIGS[args.algo]))
            print(describe(ToyConfig))
            return 0
        return _train(args, rest, argv)
    except Exception as err:  # one line for the user; --debug for the traceback
        if debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
