"""Crash-safe checkpoint files.

Lightning's ``TorchCheckpointIO`` hands the bytes to an fsspec transaction but never fsyncs, so a node failure shortly
after a save can leave a truncated ``last.ckpt`` behind. ``AtomicCheckpointIO`` writes ``.<name>.<random>.tmp`` in the
target directory, flushes and fsyncs it, renames it over the target (atomic on POSIX file systems) and fsyncs the
directory: a reader sees the old complete file or the new complete file, never a partial one. Torn temporary files
from a killed writer are ignored by resume (they never end in ``.ckpt``) and removed at the next save.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

_STALE_TMP_SECONDS = 60.0


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a fsynced temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(directory: Path, older_than: float = _STALE_TMP_SECONDS) -> None:
    """Delete ``.*.tmp`` leftovers of killed writers (older than ``older_than`` seconds)."""
    now = time.time()
    for tmp in directory.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
        except FileNotFoundError:
            pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable (see the module docstring). Local paths only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        if "://" in str(path):  # remote file systems: keep Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path)
        remove_stale_temporaries(Path(path).parent)
        atomic_torch_save(checkpoint, path)
