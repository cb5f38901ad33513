"""Reward statistics: DDPO's running per-prompt normalisation, Flow-GRPO's group normalisation, and a diversity
metric (mean pairwise feature distance within a prompt, with its standard error)."""

from __future__ import annotations

from typing import Any

import torch

from sa_theory.kl import mean_se

__all__ = ["PerPromptStatTracker", "group_normalize", "diversity"]


def group_normalize(prompts: list[str], rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Flow-GRPO's group advantages: ``(r - mean_g) / (std_g + eps)`` within each prompt's images of this batch
    (the group); a group of one image gets 0."""
    r = rewards.detach().double().cpu()
    out = torch.zeros_like(r)
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) > 1:
            g = r[idx]
            out[idx] = (g - g.mean()) / (g.std() + eps)
    return out.to(rewards.dtype).to(rewards.device)


# --------------------------------------------------------------------------- per-prompt normalisation
class PerPromptStatTracker:
    """Running per-prompt reward mean/std (DDPO): ``normalize`` returns ``(r - mean_p)/(std_p + 1e-6)``.

    Each prompt keeps its last ``buffer_size`` rewards; until it has ``min_count`` of them, the batch-wide
    mean/std is used instead. ``state_dict``/``load_state_dict`` make it resumable.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 8):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, list[float]] = {}

    def normalize(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.detach().double().cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std() if r.numel() > 1 else torch.tensor(1.0)
        for p in sorted(set(prompts)):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buf = self.stats.setdefault(p, [])
            buf.extend(r[idx].tolist())
            del buf[: max(0, len(buf) - self.buffer_size)]
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                t = torch.tensor(buf, dtype=torch.float64)
                mean, std = t.mean(), t.std()
            out[idx] = (r[idx] - mean) / (std + 1e-6)
        return out.to(rewards.dtype).to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {k: list(v) for k, v in self.stats.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = sd["buffer_size"], sd["min_count"]
        self.stats = {k: list(v) for k, v in sd["stats"].items()}


# --------------------------------------------------------------------------- diversity
def diversity(features: torch.Tensor, prompts: list[str]) -> tuple[float, float]:
    """Mean pairwise L2 distance between features (e.g. flattened pixels or CLIP embeddings) of images of
    the **same prompt**, averaged over prompts with >= 2 images. Returns ``(mean, standard error over
    prompts)`` (SE is NaN with fewer than 2 prompts)."""
    f = features.detach().float().reshape(features.shape[0], -1)
    per_prompt = []
    for p in sorted(set(prompts)):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) < 2:
            continue
        d = torch.cdist(f[idx], f[idx])
        n = len(idx)
        per_prompt.append(float(d.sum() / (n * (n - 1))))
    if not per_prompt:
        return float("nan"), float("nan")
    return mean_se(per_prompt)
