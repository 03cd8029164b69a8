"""Webdataset tar shards: naming them (shard specs -> names), telling local files from URLs, and reading their samples.

A shard is named by a local path (``/data/train-000000.tar``, ``file:/data/...``) or by any URL that webdataset's
``gopen`` opens: ``pipe:<shell command writing the tar to stdout>`` (``pipe:aws s3 cp s3://b/train-000000.tar -``,
``pipe:gsutil cat gs://b/train-000000.tar``), ``http(s)://`` (read with ``curl``), ``gs://`` (``gsutil cat``) and
the other schemes of ``webdataset.gopen.gopen_schemes``. Reading goes through ``gopen`` and webdataset's tar iteration
(``webdataset.tariterators``: members grouped into samples by key, metadata members skipped), so every reader of the
project (training and validation streams, reference statistics, prepare's resume check) sees a shard the same way.

Faults are told apart by what was read (``reading_shard``): a shard that delivers no byte because it cannot be
opened (a missing file, a 404, a refused connection, a failing ``pipe:`` command) is ``ShardUnreachable``, a
``DataError`` with one line naming the shard; a shard that delivers bytes that are not a whole tar is damage, which
the readers charge to their bad-sample budget.
"""

from __future__ import annotations

import contextlib
import glob
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
from webdataset.gopen import gopen, gopen_schemes, set_options
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from datamodules.errors import DataError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: ``C:\...`` stays a path
_CURL_EXITS = {6: "host not found", 7: "connection refused", 22: "HTTP error (e.g. 404 Not Found, 403 Forbidden)",
               28: "timed out", 35: "TLS handshake failed", 52: "empty reply"}  # fmt: skip


class ShardUnreachable(DataError):
    """A shard that cannot be opened or delivered no byte (missing file, HTTP error, failing ``pipe:`` command)."""


# ---------------------------------------------------------------------------------------------------------- names
def url_scheme(name: str) -> str:
    """The URL scheme of a shard name (``"pipe"``, ``"https"``, ...); ``""`` for a local path or a ``file:`` URL."""
    match = _SCHEME.match(name)
    scheme = match.group(1).lower() if match else ""
    return "" if scheme == "file" else scheme


def is_url(name: str) -> bool:
    """Whether ``name`` is a URL read through ``gopen`` (not a local path or ``file:`` URL, which can be listed)."""
    return url_scheme(name) != ""


def local_path(name: str) -> str:
    """The file path of a local shard name (``file:`` URLs as ``gopen`` opens them)."""
    return url2pathname(urlparse(name).path) if name.lower().startswith("file:") else name


def check_url(url: str, field: str = "shards") -> None:
    """Raise ``ValueError`` (one line naming ``field``) if ``gopen`` has no handler for the scheme of ``url``."""
    scheme = url_scheme(url)
    if scheme and scheme not in gopen_schemes:
        known = sorted(k + ":" for k in gopen_schemes if not k.startswith("_"))
        hint = " (for S3 use pipe:aws s3 cp s3://bucket/key.tar -)" if scheme == "s3" else ""
        raise ValueError(f"{field}: {url!r}: unknown URL scheme {scheme + ':'!r}; use a local path or one of {known}"
                         f"{hint}")  # fmt: skip


def spec_parts(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The parts of a shard spec: a comma/space-separated string, or a list of such strings, split into items.

    A string that starts with ``pipe:`` is a shell command, spaces included: it is one part, or several joined by
    ``::`` (webdataset's separator). Commas inside braces (``train-{a,b}.tar``) belong to the pattern.
    """
    parts = [str(spec)] if isinstance(spec, (str, os.PathLike)) else [str(s) for s in spec]
    items: list[str] = []
    for part in parts:
        part = part.strip()
        if part.startswith("pipe:"):
            items.extend(p.strip() for p in part.split("::") if p.strip())
        else:
            items.extend(p for p in re.split(r"[,\s]+(?![^{]*})", part) if p)
    return items


def expand_pattern(pattern: str) -> list[str]:
    """The names a brace pattern (``train-{000000..000099}.tar``) and, for local paths, a glob (``train-*.tar``)
    name, in pattern order; a name that matches no file is kept as it is (the caller decides whether a missing file
    is an error). URLs are brace-expanded only: they cannot be listed."""
    names = braceexpand.braceexpand(pattern)
    if is_url(pattern):
        return list(names)
    return [path for name in names for path in (sorted(glob.glob(local_path(name))) or [name])]


def shard_file_name(url: str) -> str | None:
    """The file name of the shard ``url`` names (``train-000003.tar``): the last path component of a local path or
    URL, or for a ``pipe:`` command the last word that names a ``.tar`` file; None if the command names none."""
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url[5:].split()]
        tars = [w for w in words if re.search(r"\.tar($|[?#])", w)]
        return posixpath.basename(urlparse(tars[-1]).path) if tars else None
    if is_url(url):
        return posixpath.basename(urlparse(url).path) or None
    return os.path.basename(local_path(url)) or None


# ---------------------------------------------------------------------------------------------------------- reading
class TrackedStream:
    """A read-only binary stream that counts the bytes read and keeps the last ``2 * tarfile.BLOCKSIZE`` of them.

    ``ends_whole()`` drains the rest and tells whether the stream ended with the two zero blocks that close every
    whole tar: a file cut exactly between two members ends with a member's data instead (unless that data ends with
    1024 zero bytes: then the cut goes unnoticed, as tar's own reading would). It works on any stream, seekable or
    not (a ``pipe:`` or ``http`` URL), reading only what follows the archive's last member (its padding).
    """

    _TAIL = 2 * tarfile.BLOCKSIZE

    def __init__(self, url: str, raw: IO[bytes]):
        self.url, self.raw = url, raw
        self.bytes_read = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes_read += len(data)
        self.tail = (self.tail + data)[-self._TAIL :] if len(data) < self._TAIL else data[-self._TAIL :]
        return data

    def ends_whole(self) -> bool:
        while self.read(1 << 16):
            pass
        return self.tail == bytes(self._TAIL)

    def close(self) -> None:
        self.raw.close()

    def __str__(self) -> str:  # webdataset appends it to the messages of read errors
        return self.url


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of the shard ``url`` (a local path or any URL ``webdataset.gopen`` opens)."""
    return gopen(local_path(url) if not is_url(url) else url, "rb")


def failure_reason(url: str, raw: Any, error: BaseException | None) -> str:
    """Why ``url`` delivered nothing, in a few words: the exit status of its ``curl`` or ``pipe:`` command (``raw``
    is webdataset's ``Pipe``), else ``error``."""
    status = getattr(raw, "status", None)
    if status not in (None, 0):
        if url_scheme(url) in ("http", "https"):
            reason = _CURL_EXITS.get(status)
            return f"curl exited with status {status}" + (f": {reason}" if reason else "")
        return f"the command exited with status {status}"
    if error is None:
        return "no data"
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    text = str(error.args[0]) if error.args else str(error)
    return f"{type(error).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


def _unreachable(url: str, raw: Any, error: BaseException | None) -> ShardUnreachable:
    return ShardUnreachable(f"cannot read shard {url}: {failure_reason(url, raw, error)}. Check that it exists and is "
                            "reachable from this machine (or remove it from the shard list)")  # fmt: skip


@contextlib.contextmanager
def reading_shard(url: str) -> Iterator[TrackedStream]:
    """The shard ``url`` opened for reading (a ``TrackedStream``), closed on exit.

    A consumer that stops early (``GeneratorExit``) closes it without raising: a ``pipe:`` command may then exit
    with a broken pipe. Otherwise an error on the way out (a ``pipe:`` or ``curl`` exit status) is raised.

    Raises:
        ShardUnreachable: the shard cannot be opened, or it delivered no byte and its reading or closing failed
            with an ``OSError`` (a missing file, an HTTP error, a failing command): one line naming ``url``.
    """
    try:
        raw = open_shard(url)
    except OSError as err:
        raise _unreachable(url, None, err) from None
    stream = TrackedStream(url, raw)
    try:
        yield stream
    except GeneratorExit:
        set_options(raw, ignore_errors=True)
        with contextlib.suppress(Exception):
            raw.close()
        raise
    except Exception as err:
        close_error = None
        try:
            raw.close()  # a Pipe raises its exit status here: often the real cause (tar saw an empty stream)
        except OSError as closing:
            close_error = closing
        if stream.bytes_read == 0 and (close_error is not None or isinstance(err, OSError)):
            raise _unreachable(url, raw, close_error or err) from None
        raise  # damage: the read error says more than an exit status would
    try:
        raw.close()
    except OSError as err:
        if stream.bytes_read == 0:
            raise _unreachable(url, raw, err) from None
        raise


def tar_samples(url: str, stream: IO[bytes] | TrackedStream) -> Iterator[dict[str, Any]]:
    """The samples ``{"__key__", "__url__", <suffix>: bytes}`` of the tar ``stream`` of shard ``url``, in order
    (webdataset's grouping: consecutive members with the same key before the first dot form one sample; suffixes
    lower-cased). Any read error (a truncated tar, a duplicate member) is raised."""
    files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
    return group_by_keys(files, handler=reraise_exception)


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of the whole shard ``url`` (``tar_samples`` within ``reading_shard``), for readers that stop at
    the first fault (reference statistics).

    Raises:
        ShardUnreachable: as ``reading_shard``.
        tarfile.ReadError: the shard is damaged, or cut short exactly between two members (no end-of-archive marker).
    """
    with reading_shard(url) as stream:
        yield from tar_samples(url, stream)
        if not stream.ends_whole():
            raise tarfile.ReadError(f"{url}: no end-of-archive marker: the file is cut short")


__all__ = [
    "ShardUnreachable",
    "TrackedStream",
    "check_url",
    "expand_pattern",
    "failure_reason",
    "is_url",
    "local_path",
    "open_shard",
    "reading_shard",
    "shard_file_name",
    "shard_samples",
    "spec_parts",
    "tar_samples",
    "url_scheme",
]
