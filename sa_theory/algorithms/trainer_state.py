"""Checkpoints of the :class:`~.toy_task.ToyTask`: the state, atomic checksummed saves keeping the previous one,
resume with the settings check and the JSONL truncation, and the fresh-run guard against overwriting a run."""

from __future__ import annotations

import os
import sys

from .checkpoint import load_newest_intact, previous_path, rewrite_jsonl, rng_state, save_rotating, set_rng_state
from .config import RENAMED, resume_changes, to_dict

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """The :class:`~.toy_task.ToyTask`'s checkpoint methods (its module docstring: exact resume)."""

    def _check_fresh_outputs(self) -> None:
        """Before a fresh run's first iteration: refuse to append to / replace an existing log or checkpoint
        (naming the field and file) unless ``overwrite``; with it, remove them."""
        self._fresh_checked = True
        cfg = self.cfg
        files = [("log_path", cfg.log_path)]
        if cfg.checkpoint_path:
            files += [("checkpoint_path", cfg.checkpoint_path), ("checkpoint_path", previous_path(cfg.checkpoint_path))]
        for name, path in files:
            if not path:
                continue
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as err:
                raise ValueError(f"config field {name!r}: cannot create the folder of {path!r} ({err})") from err
            if os.path.exists(path) and (name != "log_path" or os.path.getsize(path) > 0):
                if not cfg.overwrite:
                    raise FileExistsError(f"config field {name!r}: {path!r} already holds a previous run's data; "
                                          f"resume that run, choose another path, or set overwrite=True to replace it")
                os.remove(path)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = {"config": to_dict(self.cfg), "iteration": self.iteration, "queries": self.queries,
                 "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "history": list(self.history), "rng": rng_state(),
                 "extra": self.extra_state(), "context": dict(self.context)}
        if self.value is not None:
            state["value"] = self.value.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.value is not None:
            self.value.load_state_dict(state["value"])
        self.iteration, self.queries = state["iteration"], state["queries"]
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        self.load_extra_state(state["extra"])

    def save(self, path: str | None = None) -> None:
        """Checksummed atomic checkpoint; the previous one is kept as :func:`~.checkpoint.previous_path`."""
        save_rotating(path or self.cfg.checkpoint_path, self.state_dict())

    def resume(self, path: str | None = None) -> bool:
        """Load the newest intact checkpoint at ``path`` (default ``cfg.checkpoint_path``) or its previous one
        (saying on stderr which file was damaged); drop JSONL records written after it. Returns ``False`` when
        there is no checkpoint. A checkpoint made with other settings (``algo``, problem, ``lr``, ...) raises
        ``ValueError`` naming the fields, before anything is loaded; changes of :data:`~.config.RESUME_MUTABLE`
        fields are applied and reported; ``num_epochs`` below the checkpoint's iteration raises."""
        path = path or self.cfg.checkpoint_path
        try:
            state, used, notes = load_newest_intact(path) if path else (None, None, [])
        except FileNotFoundError:
            return False
        if state is None:
            return False
        saved = {"config": {RENAMED.get(k, k): v for k, v in state["config"].items()},  # older names
                 **state.get("context", {})}
        changes = resume_changes(saved, {"config": to_dict(self.cfg), **self.context})
        if state["iteration"] > self.cfg.num_epochs:
            raise ValueError(f"config field 'num_epochs' ({self.cfg.num_epochs}) is below the checkpoint's epoch "
                             f"{state['iteration']} ({used!r})")
        self.load_state_dict(state)
        self._fresh_checked = True
        for note in notes:
            print(note, file=sys.stderr)
        for k, (old, new) in sorted(changes.items()):
            print(f"resume: {k} changed from {old!r} to {new!r} (applied)", file=sys.stderr)
        if self.cfg.log_path and os.path.exists(self.cfg.log_path):
            rewrite_jsonl(self.cfg.log_path, lambda r: r.get("epoch", r.get("iteration", 1) - 1) < self.iteration)
        return True
