"""Small pieces of the training loop: per-iteration generators, learning-rate multipliers, JSON-able metrics."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["iteration_generator", "lr_lambda", "jsonable"]


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
