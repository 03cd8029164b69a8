"""Atomic file writing: a reader sees the old complete file or the new complete file, never a partial one.

Every writer of the project (checkpoints, the inference export, shard manifests, sample ``.npz`` files, the data
tool's shards) goes through :func:`atomic_write`: the data goes to a temporary file in the target's directory
(``.<name>.<pid>-<random>.tmp``: hidden, unique to the writing process and call, so two writers never share one, and
the pid tells a later run a dead writer's leftover from a live one's), is flushed and fsynced, renamed over the
target with ``os.replace`` (atomic on POSIX file systems) and the directory is fsynced so the rename survives a crash.
On any failure the temporary file is removed, the old file stays as it was, and the error propagates.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

# Temporary files this process is writing now (a worker that must exit at once removes them: ``open_temporaries``).
_OPEN_TEMPORARIES: set[Path] = set()
_TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]+\.tmp")


def temporary_path(target: str | os.PathLike) -> Path:
    """A hidden name beside ``target``, unique to this process and call: ``.<name>.<pid>-<random>.tmp``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def temporary_writer_pid(path: str | os.PathLike) -> int | None:
    """The pid of the process that wrote the temporary file ``path`` (a :func:`temporary_path` name), else None."""
    match = _TEMPORARY_NAME.fullmatch(Path(path).name)
    return int(match["pid"]) if match is not None else None


def open_temporaries() -> list[Path]:
    """The temporary files this process is writing now (for a process that must exit without unwinding)."""
    return list(_OPEN_TEMPORARIES)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (its entry list reaches the disk)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: Literal["wb", "w"] = "wb", *,
                 encoding: str | None = None) -> Iterator[IO]:  # fmt: skip
    """Open a temporary file beside ``path`` for writing; when the block ends normally it replaces ``path``.

    Usage: ``with atomic_write(path) as f: torch.save(obj, f)``; text with ``mode="w"``. The directory must exist.

    Raises:
        Whatever the block or the file system raises (``OSError`` for a full disk); the temporary file is removed
        first and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode={mode!r} must be 'wb' or 'w'")
    path = Path(path)
    tmp = temporary_path(path)
    _OPEN_TEMPORARIES.add(tmp)
    try:
        with open(tmp, "x" + mode[1:], encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _OPEN_TEMPORARIES.discard(tmp)
    fsync_directory(path.parent)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """``path`` holds exactly ``data`` afterwards, or (on failure) what it held before; returns ``path``."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


__all__ = [
    "atomic_write",
    "fsync_directory",
    "open_temporaries",
    "temporary_path",
    "temporary_writer_pid",
    "write_bytes_atomically",
]
