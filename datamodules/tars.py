"""Webdataset tar shards: naming them (shard patterns -> paths) and reading their samples.

Reading goes through webdataset's own URL opening (``webdataset.gopen``: local paths, ``file:``, ``pipe:``, ``http``,
...) and tar iteration (``webdataset.tariterators``: members grouped into samples by key, metadata members skipped),
so every reader of the project (training streams, reference statistics) sees a shard the same way. Header-only
scans that must not read member data (sample counts, resume checks) are in ``datamodules.shards``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from typing import IO, Any

import braceexpand
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander


def spec_parts(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The parts of a shard spec: a comma/space-separated string, or a list of such strings, split into items."""
    parts = [str(spec)] if isinstance(spec, (str, os.PathLike)) else [str(s) for s in spec]
    return [p for part in parts for p in re.split(r"[,\s]+", part.strip()) if p]


def expand_pattern(pattern: str) -> list[str]:
    """The paths a brace pattern (``train-{000000..000099}.tar``) and glob (``train-*.tar``) name, in pattern order;
    a name that matches no file is kept as it is (the caller decides whether a missing file is an error)."""
    return [path for name in braceexpand.braceexpand(pattern) for path in (sorted(glob.glob(name)) or [name])]


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of the shard ``url`` (a local path or any URL ``webdataset.gopen`` opens)."""
    return gopen(url, "rb")


def tar_samples(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The samples ``{"__key__", "__url__", <suffix>: bytes}`` of the tar ``stream`` of shard ``url``, in order
    (webdataset's grouping: consecutive members with the same key before the first dot form one sample; suffixes
    lower-cased). Any read error (a truncated tar, a duplicate member) is raised."""
    files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
    return group_by_keys(files, handler=reraise_exception)


__all__ = ["expand_pattern", "open_shard", "spec_parts", "tar_samples"]
