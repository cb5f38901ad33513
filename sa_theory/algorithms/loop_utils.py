"""Small pieces of the training loop: per-iteration generators, learning-rate multipliers, JSON-able metrics."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["iteration_generator", "lr_lambda", "jsonable", "read_jsonl"]


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
