"""The image trainer: the one :class:`sa_theory.algorithms.Trainer` on an image pipeline
(:class:`~t2i.task.ImageTask`).

>>> tr = make_trainer(cfg)   # builds the pipeline, LoRA, value model, accelerator; resumes when asked
>>> tr.train()               # the metric records; tr.pipe, tr.method, tr.state, ... are the task's
"""

from __future__ import annotations

from sa_theory.algorithms.trainer import Trainer

from .checkpointing import load_policy_from_checkpoint, lora_hash, resolve_checkpoint
from .config import Config
from .task import ImageTask, TrainerState

__all__ = ["make_trainer", "Trainer", "ImageTask", "TrainerState", "resolve_checkpoint", "lora_hash",
           "load_policy_from_checkpoint"]


def make_trainer(cfg: Config, accelerator=None) -> Trainer:
    """The one trainer on the pipeline ``cfg`` describes (``accelerator``: an ``accelerate.Accelerator`` to use,
    e.g. in tests; default: one made from ``cfg``)."""
    return Trainer(ImageTask(cfg, accelerator))
