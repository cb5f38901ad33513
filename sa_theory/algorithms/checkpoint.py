"""Checkpoints of the one trainer (toys and images alike), atomic writes, RNG state, and Ctrl-C handling.

**One layout.** A run's checkpoints are folders ``<root>/checkpoint-EEEEEE`` (``EEEEEE``: epochs done) next to a
``latest`` pointer file. A task writes its state into a temporary folder (:func:`new_checkpoint_folder`: the toys
one checksummed file ``state.pt``, the images accelerate's state and the LoRA files) plus ``trainer_state.json``
and ``config.json``; :func:`commit_checkpoint` writes ``checksums.sha256`` over every file, renames the folder into
place, replaces ``latest`` atomically and keeps the newest ``keep_last`` folders, so a run killed mid-write leaves
the previous checkpoints intact. :func:`resolve_intact_checkpoint` finds the checkpoint to resume from and falls back
to the newest intact folder when ``latest`` or its folder is damaged, saying which it skipped and which it used.

A checkpoint *file* (:func:`save_checkpoint`) is ``MAGIC + sha256(payload) + payload`` with ``payload`` a
``torch.save`` blob, written to a temporary file and moved into place with :func:`os.replace`; a truncated or
altered file is detected (:class:`CheckpointCorruptError` names it). :class:`GracefulInterrupt` turns
SIGINT/SIGTERM into a flag that the training loop checks at its next safe point (the end of an iteration), so it
can save and tell the user how to resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import threading
import time
from typing import Any

import numpy as np
import torch

from .loop_utils import read_jsonl

__all__ = ["atomic_write_text", "atomic_write_json", "rewrite_jsonl", "save_checkpoint", "load_checkpoint",
           "CheckpointCorruptError", "write_dir_checksums", "verify_dir_checksums", "checkpoint_folders",
           "has_checkpoint", "resolve_checkpoint", "verify_checkpoint", "resolve_intact_checkpoint",
           "new_checkpoint_folder", "commit_checkpoint", "GracefulInterrupt", "TrainingInterrupted", "rng_state",
           "set_rng_state", "seed_everything"]

MAGIC = b"SA-CKPT\x01"
DIR_CHECKSUMS = "checksums.sha256"


class CheckpointCorruptError(OSError):
    """A checkpoint file or folder that exists but cannot be trusted (truncated, altered, unreadable)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by a training loop after it saved a checkpoint on SIGINT/SIGTERM; ``str()`` says how to resume."""


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch's global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global torch (CPU and, if present, CUDA), numpy and python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_bytes(path: str, chunks: list[bytes]) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        for c in chunks:
            fh.write(c)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, fsync, :func:`os.replace`); creates the folder."""
    _atomic_write_bytes(path, [text.encode()])


def atomic_write_json(path: str, obj: Any, **dump_kw) -> None:
    """``json.dumps(obj, indent=1, **dump_kw)`` written atomically (:func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, **{"indent": 1, **dump_kw}))


def rewrite_jsonl(path: str, keep) -> None:
    """Atomically keep the records of the JSONL file ``path`` for which ``keep(record)`` is true (a resume drops
    the records written after its checkpoint)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write ``state`` atomically with its SHA-256 (see the module docstring); returns the hex digest."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).digest()
    _atomic_write_bytes(os.fspath(path), [MAGIC, digest, payload])
    return digest.hex()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint` (files without the checksum header,
    from older versions, are read unverified). ``FileNotFoundError`` / :class:`CheckpointCorruptError` name
    the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with open(path, "rb") as fh:
        data = fh.read()
    payload = data
    if data.startswith(MAGIC):
        n = len(MAGIC)
        digest, payload = data[n:n + 32], data[n + 32:]
        if hashlib.sha256(payload).digest() != digest:
            raise CheckpointCorruptError(f"checkpoint {path!r} is corrupt: its SHA-256 does not match the one "
                                         f"stored in it (truncated or altered; {len(data)} bytes)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/... on damaged files
        raise CheckpointCorruptError(f"checkpoint {path!r} cannot be read ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------------------------- folders
def sha256_file(path: str) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_dir_checksums(folder: str) -> None:
    """Write ``folder/checksums.sha256`` (``sha256sum`` format) over every file below ``folder``."""
    lines = []
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            p = os.path.join(root, f)
            rel = os.path.relpath(p, folder)
            if rel != DIR_CHECKSUMS and ".tmp" not in f:
                lines.append(f"{sha256_file(p)}  {rel}\n")
    _atomic_write_bytes(os.path.join(folder, DIR_CHECKSUMS), ["".join(sorted(lines, key=lambda s: s[66:])).encode()])


def verify_dir_checksums(folder: str) -> None:
    """Raise :class:`CheckpointCorruptError` naming ``folder`` and the first bad file if a file listed in its
    ``checksums.sha256`` is missing or differs (a folder without the sidecar, from older versions, passes)."""
    sums = os.path.join(folder, DIR_CHECKSUMS)
    if not os.path.isfile(sums):
        return
    with open(sums) as fh:
        for line in fh:
            if not line.strip():
                continue
            digest, rel = line.rstrip("\n").split("  ", 1)
            p = os.path.join(folder, rel)
            if not os.path.isfile(p):
                raise CheckpointCorruptError(f"checkpoint {folder!r} is incomplete: {rel!r} is missing")
            if sha256_file(p) != digest:
                raise CheckpointCorruptError(f"checkpoint {folder!r} is corrupt: {rel!r} does not match its "
                                             f"SHA-256 in {DIR_CHECKSUMS} (truncated or altered)")


def checkpoint_folders(root: str) -> list[str]:
    """The ``checkpoint-*`` folders in ``root``, newest first (empty if ``root`` is not a folder)."""
    if not os.path.isdir(root):
        return []
    return sorted((os.path.join(root, d) for d in os.listdir(root) if d.startswith("checkpoint-")), reverse=True)


def has_checkpoint(root: str) -> bool:
    """Whether the checkpoints folder ``root`` holds a ``latest`` pointer or any checkpoint folder."""
    return os.path.isfile(os.path.join(root, "latest")) or bool(checkpoint_folders(root))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder: ``path`` itself (it holds ``trainer_state.json``), or what the ``latest`` pointer in
    ``path`` or in ``path/checkpoints`` names."""
    for cand in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(cand, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                return os.path.join(cand, f.read().strip())
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    raise FileNotFoundError(f"no checkpoint at {path!r} (expected a checkpoint folder or a 'latest' pointer)")


def verify_checkpoint(folder: str, required: tuple[str, ...] = ("trainer_state.json",)) -> None:
    """:class:`CheckpointCorruptError` naming ``folder`` if a ``required`` file is missing or a file differs from its
    ``checksums.sha256``."""
    for f in required:
        if not os.path.isfile(os.path.join(folder, f)):
            raise CheckpointCorruptError(f"checkpoint {folder!r} is incomplete: {f!r} is missing")
    verify_dir_checksums(folder)


def resolve_intact_checkpoint(path: str, required: tuple[str, ...] = ("trainer_state.json",)
                              ) -> tuple[str, list[str]]:
    """``(folder, notes)``: the checkpoint ``path`` names (a folder, or a run / checkpoints folder via ``latest``),
    verified (:func:`verify_checkpoint`). Via ``latest``, a damaged or missing latest falls back to the newest intact
    checkpoint folder next to it (``notes`` names both); an explicitly named damaged folder raises
    :class:`CheckpointCorruptError` naming it; no checkpoint at all raises ``FileNotFoundError``."""
    root = next((c for c in (path, os.path.join(path, "checkpoints")) if os.path.isdir(c) and has_checkpoint(c)), None)
    if root is None or os.path.isfile(os.path.join(path, "trainer_state.json")):
        folder = resolve_checkpoint(path)
        verify_checkpoint(folder, required)
        return folder, []
    errors = []
    try:
        first = resolve_checkpoint(root)
    except FileNotFoundError:
        first = None
    if first is not None and not os.path.basename(os.path.normpath(first)).startswith("checkpoint-"):
        errors.append(f"the pointer {os.path.join(root, 'latest')!r} is damaged")
        first = None
    cands = ([first] if first else []) + [c for c in checkpoint_folders(root) if c != first]
    for c in cands:
        try:
            if not os.path.isdir(c):
                raise CheckpointCorruptError(f"checkpoint {c!r} (named by {os.path.join(root, 'latest')!r}) is missing")
            verify_checkpoint(c, required)
        except CheckpointCorruptError as err:
            errors.append(str(err))
            continue
        return c, [f"{e}; falling back to the newest intact checkpoint {c!r}" for e in errors]
    raise CheckpointCorruptError(f"no intact checkpoint in {root!r}: " + " | ".join(errors))


def new_checkpoint_folder(root: str, epoch: int) -> tuple[str, str]:
    """``(tmp, name)`` for the checkpoint after ``epoch`` epochs: an empty temporary folder in ``root`` to write into
    (then :func:`commit_checkpoint`) and the final name ``checkpoint-EEEEEE``."""
    name = f"checkpoint-{epoch:06d}"
    tmp = os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp, name


def commit_checkpoint(tmp: str, name: str, keep_last: int) -> str:
    """Checksum the written folder ``tmp`` (``checksums.sha256``), rename it to ``name`` next to it, point ``latest``
    at it (atomically) and remove all but the newest ``keep_last`` checkpoint folders; returns the final folder. A run
    killed before the rename leaves the previous checkpoints and ``latest`` as they were."""
    root = os.path.dirname(tmp)
    final = os.path.join(root, name)
    write_dir_checksums(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), name)
    kept = sorted(d for d in os.listdir(root) if d.startswith("checkpoint-"))
    for old in kept[: max(0, len(kept) - max(1, keep_last))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- signals
class GracefulInterrupt:
    """``with GracefulInterrupt() as stop:`` -- SIGINT/SIGTERM set ``stop.requested`` (and ``stop.signame``)
    instead of raising. A second Ctrl-C (SIGINT) more than a second after the first restores the default
    behaviour and raises ``KeyboardInterrupt`` at once; other repeats (a launcher forwarding the signal as SIGTERM
    to its workers) are ignored. Outside the main thread it installs nothing (``requested`` stays False)."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals, self.requested, self.signame, self._old, self._t = signals, False, None, {}, 0.0

    def _handler(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._t > 1.0:  # impatient user: stop now
                self.__exit__()
                raise KeyboardInterrupt
            return
        self.requested, self.signame, self._t = True, signal.Signals(signum).name, time.monotonic()

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False
