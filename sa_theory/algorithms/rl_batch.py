r"""The recorded rollout every method trains on (:class:`RolloutBatch`), for toy and image environments alike.

A batch holds, for ``K`` steps of a Gaussian step kernel (:mod:`sa_theory.kernels`) and ``B`` paths, **step-major**
tensors: the states ``latents`` ``(K+1, B, *event)`` (``latents[0]`` the initial state), the sampling policy's
actions ``actions`` ``(K, B, *event)`` in the kernel's units, ``log_probs`` ``(K, B)`` (:math:`\log N(x_{k+1};
m_k, \mathrm{std}_k^2 I)` summed over dimensions, nats per step, 0 on deterministic steps) and, when the
pretrained model was recorded, ``ref_actions``, ``ref_log_probs`` and the two per-step KLs ``kl_steps`` (exact
chain KL) and ``kl_steps_ct`` (continuous-time), ``(K, B)`` nats per step (:class:`~sa_theory.sampling.PathKLs`
gives their path sums). ``text`` is the environment's conditioning, a dict of tensors batched on dim 0 (prompts'
encodings on images; the toy condition under ``"cond"``), ``prompts`` one label per path. A method's
``prepare`` stores its per-step (``step_data``, ``(K, B, ...)``) and per-path (``path_data``, ``(B, ...)``) extras.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling import PathKLs

__all__ = ["RolloutBatch", "select_rows"]

_STEP_MAJOR = ("latents", "actions", "log_probs", "ref_actions", "kl_steps", "kl_steps_ct", "ref_log_probs")


def select_rows(text: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of every tensor of a conditioning dict (``None`` entries stay ``None``)."""
    return {k: None if v is None else v.index_select(0, idx.to(v.device)) for k, v in text.items()}


@dataclass
class RolloutBatch(PathKLs):
    """One batch of recorded sampler paths (module docstring)."""

    prompts: list[str]
    text: dict
    latents: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    ref_actions: torch.Tensor | None = None
    kl_steps: torch.Tensor | None = None
    kl_steps_ct: torch.Tensor | None = None
    images: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    step_data: dict[str, torch.Tensor] = field(default_factory=dict)  # per-step extras, (K, B, ...)
    path_data: dict[str, Any] = field(default_factory=dict)  # per-path extras, (B, ...)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[1]

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """Sub-batch of paths ``idx`` (step-major tensors indexed on dim 1)."""

        def sel(t, dim):
            return None if t is None else t.index_select(dim, idx.to(t.device))

        return RolloutBatch(
            prompts=[self.prompts[i] for i in idx.tolist()],
            text=select_rows(self.text, idx),
            **{n: sel(getattr(self, n), 0) for n in ("images", "rewards")},
            **{n: sel(getattr(self, n), 1) for n in _STEP_MAJOR},
            step_data={k: sel(v, 1) for k, v in self.step_data.items()},
            path_data={k: sel(v, 0) for k, v in self.path_data.items()},
        )

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        def cat(name, dim):
            ts = [getattr(b, name) for b in batches]
            return None if ts[0] is None else torch.cat(ts, dim)

        text = {k: None if v is None else torch.cat([b.text[k] for b in batches]) for k, v in batches[0].text.items()}
        return RolloutBatch(
            prompts=sum((b.prompts for b in batches), []),
            text=text,
            **{n: cat(n, 0) for n in ("images", "rewards")},
            **{n: cat(n, 1) for n in _STEP_MAJOR},
        )
