"""Checksummed atomic checkpoints, fallback to the newest intact one, RNG state, and Ctrl-C handling.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` with ``payload`` a ``torch.save`` blob, written to a
temporary file and moved over ``path`` with :func:`os.replace`, so a run killed mid-write leaves the previous
checkpoint intact and a truncated or altered file is detected (:class:`CheckpointCorruptError` names it).
:func:`save_rotating` keeps the previous checkpoint as ``<stem>.prev<ext>``; :func:`load_newest_intact` falls
back to it when the latest is damaged, saying which file it skipped and which it used. Checkpoint *folders*
(the image trainer's) carry a ``checksums.sha256`` sidecar (:func:`write_dir_checksums`,
:func:`verify_dir_checksums`). :class:`GracefulInterrupt` turns SIGINT/SIGTERM into a flag that a training loop
checks at its next safe point (the end of an iteration), so it can save and tell the user how to resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np
import torch

from .loop_utils import read_jsonl

__all__ = ["atomic_write_text", "atomic_write_json", "rewrite_jsonl", "save_checkpoint", "load_checkpoint",
           "save_rotating", "load_newest_intact", "previous_path",
           "CheckpointCorruptError", "write_dir_checksums", "verify_dir_checksums", "GracefulInterrupt",
           "TrainingInterrupted", "rng_state", "set_rng_state", "seed_everything"]

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


def previous_path(path: str | os.PathLike) -> str:
    """Where :func:`save_rotating` keeps the previous checkpoint: ``ck.pt`` -> ``ck.prev.pt``."""
    stem, ext = os.path.splitext(os.fspath(path))
    return f"{stem}.prev{ext}"


def _intact(path: str) -> bool:
    try:
        load_checkpoint(path)
        return True
    except (OSError, CheckpointCorruptError):
        return False


def save_rotating(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """:func:`save_checkpoint`, first moving an intact existing checkpoint to :func:`previous_path` (a damaged
    one is overwritten, so the previous intact one survives). Returns the digest."""
    path = os.fspath(path)
    if os.path.exists(path) and _intact(path):
        os.replace(path, previous_path(path))
    return save_checkpoint(path, state)


def load_newest_intact(path: str | os.PathLike) -> tuple[dict[str, Any], str, list[str]]:
    """``(state, used_path, notes)`` from ``path``, or from :func:`previous_path` if ``path`` is missing or
    damaged; ``notes`` names the skipped file and the one used. ``FileNotFoundError`` if neither exists,
    :class:`CheckpointCorruptError` naming both if neither is intact."""
    path = os.fspath(path)
    cands = [path, previous_path(path)]
    errors = []
    for cand in cands:
        if not os.path.exists(cand):
            continue
        try:
            state = load_checkpoint(cand)
        except CheckpointCorruptError as err:
            errors.append(str(err))
            continue
        notes = [f"{e}; falling back to the previous intact checkpoint {cand!r}" for e in errors]
        return state, cand, notes
    if errors:
        raise CheckpointCorruptError("no intact checkpoint: " + " | ".join(errors))
    raise FileNotFoundError(f"no checkpoint at {path!r} (nor {cands[1]!r})")


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
