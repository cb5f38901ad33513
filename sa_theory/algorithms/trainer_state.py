"""Checkpoints of the :class:`~.toy_task.ToyTask` in the one checkpoint layout (:mod:`.checkpoint`: ``checkpoint_dir``
holds ``checkpoint-EEEEEE`` folders and a ``latest`` pointer, as an image run's ``checkpoints/``), each with the state
(``state.pt``), ``trainer_state.json`` and ``config.json``; resume with the settings check, the fallback to the newest
intact checkpoint and the JSONL truncation; the fresh-run guard against overwriting a run."""

from __future__ import annotations

import os
import shutil
import sys

from .checkpoint import (
    atomic_write_json,
    checkpoint_folders,
    commit_checkpoint,
    has_checkpoint,
    load_checkpoint,
    new_checkpoint_folder,
    resolve_intact_checkpoint,
    rewrite_jsonl,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RENAMED, resume_changes, to_dict

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """The :class:`~.toy_task.ToyTask`'s checkpoint methods (its module docstring: exact resume)."""

    def _check_fresh_outputs(self) -> None:
        """Before a fresh run's first iteration: refuse to append to an existing log or to mix with existing
        checkpoints (naming the field and path) unless ``overwrite``; with it, remove them."""
        self._fresh_checked = True
        cfg = self.cfg
        for name, path in (("log_path", cfg.log_path), ("checkpoint_dir", cfg.checkpoint_dir)):
            if not path:
                continue
            folder = path if name == "checkpoint_dir" else os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                raise ValueError(f"config field {name!r}: cannot create the folder {folder!r} ({err})") from err
            used = has_checkpoint(path) if name == "checkpoint_dir" else \
                os.path.exists(path) and os.path.getsize(path) > 0
            if used:
                if not cfg.overwrite:
                    raise FileExistsError(f"config field {name!r}: {path!r} already holds a previous run's data; "
                                          f"resume that run, choose another path, or set overwrite=True to replace it")
                if name == "log_path":
                    os.remove(path)
                    continue
                for old in checkpoint_folders(path):
                    shutil.rmtree(old)
                if os.path.exists(os.path.join(path, "latest")):
                    os.remove(os.path.join(path, "latest"))

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

    def save(self, root: str | None = None) -> str:
        """Write the checkpoint of the epochs done into ``root`` (default ``checkpoint_dir``) and point ``latest`` at
        it, keeping the newest ``keep_last`` (:func:`~.checkpoint.commit_checkpoint`); returns its folder."""
        root = root or self.cfg.checkpoint_dir
        os.makedirs(root, exist_ok=True)
        tmp, name = new_checkpoint_folder(root, self.iteration)
        save_checkpoint(os.path.join(tmp, "state.pt"), self.state_dict())
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), {"epoch": self.iteration, "queries": self.queries})
        atomic_write_json(os.path.join(tmp, "config.json"), {"config": to_dict(self.cfg), **self.context}, indent=1)
        return commit_checkpoint(tmp, name, self.cfg.keep_last)

    def resume(self, path: str | None = None) -> bool:
        """Load the checkpoint at ``path`` (default ``checkpoint_dir``: its ``latest``, or the newest intact folder when
        that is damaged, saying on stderr which was skipped; a checkpoint folder; or a single checkpoint file of older
        versions); drop JSONL records written after it. Returns ``False`` when there is no checkpoint. A checkpoint
        made with other settings (``algo``, problem, ``learning_rate``, ...) raises ``ValueError`` naming the fields,
        before anything is loaded; changes of :data:`~.config.RESUME_MUTABLE` fields are applied and reported;
        ``num_epochs`` below the checkpoint's epoch raises."""
        path = path or self.cfg.checkpoint_dir
        if not path:
            return False
        if os.path.isfile(path):  # an older version's single checkpoint file
            used, notes = path, []
            state = load_checkpoint(path)
        else:
            if not (has_checkpoint(path) or os.path.isfile(os.path.join(path, "trainer_state.json"))):
                return False
            used, notes = resolve_intact_checkpoint(path, ("trainer_state.json", "state.pt"))
            state = load_checkpoint(os.path.join(used, "state.pt"))
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
