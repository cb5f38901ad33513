"""Small pieces of the training loop: per-iteration generators, learning-rate multipliers, JSON-able metrics."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["iteration_generator", "lr_lambda", "jsonable", "read_jsonl", "rollout_metrics", "COUNTS"]

#: the update's counters, logged under their own names; its other diagnostics are logged under ``train/``
COUNTS = ("updates", "early_stopped", "logprob_parity_max")


def rollout_metrics(reward: torch.Tensor, path_kl: torch.Tensor | None, beta: float,
                    path_kl_ct: torch.Tensor | None = None) -> dict[str, float]:
    r"""The rollout part of every training record, one namespace for toys and images (pass every process's paths):
    ``reward_mean`` / ``reward_se`` (reward units, per path); ``path_kl_mean`` / ``path_kl_se``, the recorded KL of
    the sampled chain to the pretrained one (nats per path); ``objective_mean`` / ``objective_se``, the per-path
    :math:`r - eta\,KL` at the current ``beta``; ``path_kl_ct_*``, the continuous-time (Girsanov) KL where it is
    recorded apart. Standard errors: :func:`sa_theory.kl.mean_se` (NaN for one path); KL entries are left out when
    ``path_kl`` is None (not recorded)."""
    from ..kl import mean_se

    out: dict[str, float] = {}
    reward = reward.detach().to(torch.float64)
    out["reward_mean"], out["reward_se"] = mean_se(reward)
    if path_kl is not None:
        kl = path_kl.detach().to(torch.float64)
        out["path_kl_mean"], out["path_kl_se"] = mean_se(kl)
        out["objective_mean"], out["objective_se"] = mean_se(reward - beta * kl)
    if path_kl_ct is not None:
        out["path_kl_ct_mean"], out["path_kl_ct_se"] = mean_se(path_kl_ct.detach().to(torch.float64))
    return out


def iteration_generator(seed: int, iteration: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, iteration, stream)`` only."""
    s = int(np.random.SeedSequence([int(seed) % 2**63, int(iteration), int(stream)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s % 2**63)


def lr_lambda(schedule: str, iterations: int, warmup: int = 0, name: str = "lr_schedule") -> Callable[[int], float]:
    """Learning-rate multiplier per iteration for ``LambdaLR``: linear warm-up over ``warmup`` iterations times
    ``schedule`` ('constant' | 'linear' decay to 0 | 'cosine') over ``iterations``. An unknown schedule raises
    ``ValueError`` naming the config field ``name``."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"{name!r} must be 'constant', 'linear' or 'cosine', got {schedule!r}")

    def fn(it: int) -> float:
        w = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        frac = min(1.0, it / max(1, iterations))
        if schedule == "linear":
            return w * (1.0 - frac)
        if schedule == "cosine":
            return w * 0.5 * (1.0 + math.cos(math.pi * frac))
        return w

    return fn


def jsonable(v):
    """A metric value as a JSON-serialisable python scalar or list."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return float(v) if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL metrics log. A partial last line (a run killed while writing it) is dropped with a
    note on stderr naming the file; an unreadable line elsewhere raises ``ValueError`` naming file and line."""
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip()]
    recs = []
    for i, line in enumerate(lines):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise ValueError(f"metrics log {path!r} line {i + 1} is not JSON ({err})") from err
            print(f"metrics log {path!r}: dropping a partial last record (the run was killed while writing it)",
                  file=sys.stderr)
    return recs
