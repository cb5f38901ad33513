"""scikit-learn's 8x8 handwritten digits as pixel-space diffusion data (no download: they ship in the wheel).

Pixels 0..16 are mapped to [-1, 1] (``x / 8 - 1``); ``resolution`` 8 keeps the native grid, 16 upsamples by
nearest neighbour. The train/test split is stratified, seeded and fixed (``TEST_FRACTION``), so every model
and classifier in :mod:`digits` sees the same held-out digits.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PROMPT", "prompt_for", "digit_of_prompt", "load_split", "ALL_PROMPTS", "TEST_FRACTION"]

PROMPT = "a handwritten digit {}"
ALL_PROMPTS = [PROMPT.format(k) for k in range(10)]
TEST_FRACTION = 0.25
_SPLIT_SEED = 0


def prompt_for(k: int) -> str:
    return PROMPT.format(int(k))


def digit_of_prompt(prompt: str) -> int:
    """The digit named by a prompt (the last digit character); ``ValueError`` if there is none."""
    m = re.findall(r"\d", prompt)
    if not m:
        raise ValueError(f"prompt {prompt!r} names no digit")
    return int(m[-1])


@lru_cache(maxsize=4)
def _split_numpy():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)  # (N, 8, 8), 0..16
    return train_test_split(x, d.target, test_size=TEST_FRACTION, random_state=_SPLIT_SEED, stratify=d.target)


def load_split(split: str = "train", resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, R, R)`` in [-1, 1] and labels ``(N,)`` of the fixed ``"train"`` or ``"test"`` split."""
    xtr, xte, ytr, yte = _split_numpy()
    x, y = (xtr, ytr) if split == "train" else (xte, yte) if split == "test" else (None, None)
    if x is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    t = torch.from_numpy(x)[:, None] / 8.0 - 1.0
    if resolution != 8:
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        t = F.interpolate(t, scale_factor=resolution // 8, mode="nearest")
    return t.contiguous(), torch.from_numpy(np.asarray(y)).long()
