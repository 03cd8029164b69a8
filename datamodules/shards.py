"""Shard handling for webdataset tar files, as plain functions and generators (testable on ``range(100)``).

Stages, in the order ``datamodules.webdataset`` chains them inside one DataLoader worker:

1. ``expand_shards``: a user's shard spec (brace pattern, list, comma/space-separated string, directory, URLs:
   ``pipe:`` commands, ``http(s)://``) -> sorted shard names (local paths or URLs, ``datamodules.tars``).
2. ``split_shards``: the fixed, disjoint part of the list one (rank, worker) reads. Node split first, then worker split
   (webdataset's ``split_by_node`` then ``split_by_worker``), so every rank gets a shard as soon as there are at least
   as many shards as ranks.
3. ``shuffle_shards``: that part in a new order every epoch, a function of (seed, epoch, pass) only; or, in resampled
   mode, ``resample_shards``: an endless draw with replacement from all shards.
4. ``read_shards``: raw samples ``{"__key__", "__url__", <suffix>: bytes}``; a damaged tar (truncated, cut short) is
   charged to a ``BadSampleBudget`` and the next shard is read; a shard that cannot be read at all (missing file,
   HTTP error, failing command) raises ``ShardUnreachable`` (one line).
5. ``shuffle_buffer``: a seeded sample shuffle over raw (still encoded, so small) samples.
6. ``skip_bad_samples``: decode each sample; failures are charged to the same budget.
7. ``batched`` + ``collate_samples``: full batches only.

How many batches each worker yields (so that every rank yields the same number) is decided by ``equal_batch_quotas``
(from sample counts: finite epochs) or ``spread_batches`` (from a fixed epoch length). Randomness never touches a
global RNG: every draw comes from ``numpy.random.default_rng`` keyed by (seed, epoch, ...) (``stream_rng``), or by
(seed, ..., sample key) for per-sample draws (``sample_rng``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from datamodules.errors import BadSampleBudgetExceeded
from datamodules.manifest import MANIFEST_NAME, load_manifest, manifest_location
from datamodules.tars import (
    ShardUnreachable,
    check_url,
    expand_pattern,
    is_url,
    local_path,
    reading_shard,
    shard_file_name,
    spec_parts,
    tar_samples,
)

log = logging.getLogger("zigma.data")

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (``__key__`` files), skipped when reading


# ---------------------------------------------------------------------------------------------------------- shard lists
def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Sorted, de-duplicated shard names (local paths or URLs) named by ``spec``.

    Args:
        spec: a brace pattern (``/data/train-{000000..000099}.tar``), a glob (``/data/train-*.tar``), a directory (all
            its ``*.tar``), a URL or brace pattern of URLs (``https://host/train-{000000..000099}.tar``,
            ``pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -``), a comma/space-separated string of any of
            these (``pipe:`` commands: joined by ``::``), or a list of them.

    Local files must exist; URLs are not checked here (they cannot be listed, and a check would read each one): one
    that cannot be read fails when it is opened, with one line naming it (``datamodules.tars.ShardUnreachable``).

    Raises:
        ValueError: ``spec`` is empty, a URL has a scheme webdataset cannot open, or a local pattern, glob or
            directory in it matches no existing file (the message names that part of ``spec``).
    """
    parts = spec_parts(spec)
    if not parts:
        raise ValueError(f"shards={spec!r}: no shard given; pass a brace pattern, a list of .tar files or a directory")
    paths: set[str] = set()
    for part in parts:
        if is_url(part):
            check_url(part, f"shards={spec!r}")
            found = expand_pattern(part)
        elif os.path.isdir(local_path(part)):
            found = glob.glob(os.path.join(local_path(part), "*.tar"))
            if not found:
                raise ValueError(f"shards={spec!r}: directory {part!r} holds no *.tar file")
        else:
            found = expand_pattern(part)
            missing = [p for p in found if not os.path.isfile(local_path(p))]
            if missing:
                raise ValueError(
                    f"shards={spec!r}: {part!r} names {len(missing)} file(s) that do not exist (first: {missing[0]!r})"
                )
        paths.update(found)
    return sorted(paths)


def split_shards(shards: Sequence[str], rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> list[str]:
    """The shards that ``worker`` of ``rank`` reads: node split first, then worker split.

    Shard i goes to rank ``i % world_size`` and, within that rank, to worker ``(i // world_size) % num_workers``
    (``shards[rank + world_size * worker :: world_size * num_workers]``). Over all (rank, worker) pairs this is a
    partition of ``shards``: disjoint and complete.

    Policy when there are fewer shards than ``world_size * num_workers``: every rank still gets at least one shard
    (the rank split comes first), and the workers past a rank's shard count get none and yield nothing; the batch
    counts are equalised by the epoch plan (``equal_batch_quotas`` / ``spread_batches``), not here.

    Raises:
        ValueError: rank or worker out of range, or fewer shards than ranks (a rank would have no data and DDP would
            hang).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker={worker} must be in [0, num_workers={num_workers})")
    if len(shards) < world_size:
        raise ValueError(
            f"{len(shards)} shard(s) for {world_size} processes: every process needs at least one shard; write more, "
            "smaller shards, use fewer processes, or set resampled=true (every process draws from all shards)"
        )
    return list(shards[rank + world_size * worker :: world_size * num_workers])


def stream_rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator that is a function of ``(seed, *stream)`` only, e.g. ``stream_rng(seed, epoch)``."""
    return np.random.default_rng([seed, *stream])


def sample_rng(seed: int, key: str, *stream: int) -> np.random.Generator:
    """A per-sample generator: a function of ``(seed, *stream, key)``, whatever the worker or order that reads it."""
    return np.random.default_rng([seed, *stream, zlib.crc32(key.encode())])


def shuffle_shards(shards: Sequence[str], seed: int, epoch: int, repeat: int = 0) -> list[str]:
    """``shards`` in the order of ``epoch`` (a permutation drawn from ``default_rng([seed, epoch])``).

    Args:
        repeat: pass over the same shards within one epoch (when a worker wraps around); pass 0 uses
            ``default_rng([seed, epoch])``, pass p > 0 ``default_rng([seed, epoch, p])``.
    """
    rng = stream_rng(seed, epoch) if repeat == 0 else stream_rng(seed, epoch, repeat)
    return [shards[i] for i in rng.permutation(len(shards))]


def resample_shards(shards: Sequence[str], rng: np.random.Generator) -> Iterator[str]:
    """Endless draws with replacement from ``shards`` (resampled mode: no split, no epoch end)."""
    if not shards:
        raise ValueError("resample_shards: no shards to draw from")
    while True:
        yield shards[int(rng.integers(len(shards)))]


# ---------------------------------------------------------------------------------------------------- sample counts
def _read_header_keys(tar: tarfile.TarFile, keys: list[str]) -> tarfile.TarInfo | None:
    """Append the sample keys of the open ``tar`` to ``keys`` in order, from its member headers (metadata and non-file
    members skipped); returns the last member. ``keys`` holds the keys read before an error (a cut inside a member
    raises ``tarfile.ReadError``)."""
    last = None
    for last in tar:
        if not last.isreg() or _META.match(last.name):
            continue
        prefix, _ = base_plus_ext(last.name)
        if prefix is not None and (not keys or keys[-1] != prefix):
            keys.append(prefix)
    return last


def count_shard_samples(path: str) -> int:
    """Samples (distinct consecutive keys) in the local tar file ``path``, from its member headers only (no data read:
    ``tarfile``'s random access seeks over it).

    A truncated or unreadable tar counts the samples before the damage, with a warning.
    """
    keys: list[str] = []
    try:
        with tarfile.open(local_path(path), "r:") as tar:
            _read_header_keys(tar, keys)
    except (OSError, tarfile.TarError) as err:
        log.warning("counting samples of %s: stopped after %d samples: %s", path, len(keys), err)
    return len(keys)


def complete_shard_keys(url: str | os.PathLike) -> list[str]:
    """The sample keys, in order, of the shard ``url`` (a local path or a URL), which must be whole.

    Whole means: every member's data is there and the end-of-archive marker (two zero blocks) follows the last
    member. ``tarfile`` stops silently at a file cut exactly between two members; the missing marker catches it.
    A local file is scanned from its member headers only (seeking over the data); a URL is read once, as a stream.

    Raises:
        tarfile.ReadError: the shard is cut short (inside a member, or between members) or is not a tar.
        OSError: a local file cannot be read.
        datamodules.tars.ShardUnreachable: a URL cannot be read.
    """
    keys: list[str] = []
    url = str(url)
    if is_url(url):
        with reading_shard(url) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                _read_header_keys(tar, keys)
            if not stream.ends_whole():
                raise tarfile.ReadError("no end-of-archive marker at the end of the stream (it is cut short)")
        return keys
    with tarfile.open(local_path(url), "r:") as tar:  # raises ReadError for a cut inside a member's data
        last = _read_header_keys(tar, keys)
        fileobj = tar.fileobj
        blocks = 0 if last is None else -(-last.size // tarfile.BLOCKSIZE)  # data padded to whole blocks
        end = 0 if last is None else last.offset_data + blocks * tarfile.BLOCKSIZE
        fileobj.seek(end)
        marker = fileobj.read(2 * tarfile.BLOCKSIZE)
    if marker != bytes(2 * tarfile.BLOCKSIZE):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {end} (the file is cut short)")
    return keys


def manifest_counts(shards: Sequence[str], manifest: str | None = None) -> dict[str, int]:
    """Samples per shard recorded in a manifest: ``manifest`` (a ``manifest.json`` path or URL, or a directory) if
    given, else the ``manifest.json`` next to each shard (``datamodules.manifest.manifest_location``: for URLs the
    same URL or command with ``manifest.json`` in place of the shard's file name). A shard is looked up by its file
    name among the manifest's complete splits (an interrupted prepare run's records are provisional).

    Returns:
        {shard: count} for the shards of ``shards`` that a manifest lists; shards without a manifest contribute
        nothing (an invalid manifest is reported and ignored).

    Raises:
        FileNotFoundError, ValueError: the given ``manifest`` is missing or invalid.
    """
    groups: dict[str, list[str]] = {}
    for shard in shards:
        place = manifest if manifest is not None else manifest_location(shard)
        if place is not None:
            groups.setdefault(place, []).append(shard)
    counts: dict[str, int] = {}
    for place, members in groups.items():
        if manifest is not None and not is_url(place) and os.path.isdir(place):
            place = os.path.join(place, MANIFEST_NAME)
        try:
            found = load_manifest(place)
        except (FileNotFoundError, ValueError) as err:
            if manifest is not None:
                raise
            if isinstance(err, ValueError) or is_url(place):
                log.warning("no sample counts from %s (counting samples from the tar headers): %s", place, err)
            continue
        recorded = {entry["name"]: int(entry["count"]) for split in found["splits"].values() if split["complete"]
                    for entry in split["shards"]}  # fmt: skip
        for shard in members:
            name = shard_file_name(shard)
            if name in recorded:
                counts[shard] = recorded[name]
    return counts


def sample_counts(shards: Sequence[str], manifest: str | None = None) -> dict[str, int]:
    """Samples of every shard of ``shards``: from the manifest (``manifest_counts``) where it lists them, else for a
    local file from its tar headers (``count_shard_samples``).

    Raises:
        ValueError: a URL shard that no manifest lists (counting it would read it whole; one line naming it).
    """
    counts = manifest_counts(shards, manifest)
    remote = [s for s in shards if s not in counts and is_url(s)]
    if remote:
        where = manifest if manifest is not None else manifest_location(remote[0])
        raise ValueError(
            f"data.shards: {len(remote)} shard URL(s) have no sample count in a manifest (first: {remote[0]}; manifest "
            f"looked for: {where}); counting them would read them whole. Put the manifest.json that prepare wrote "
            "next to them or name it with data.manifest, or set data.epoch_length"
        )
    for shard in shards:
        if shard not in counts:
            counts[shard] = count_shard_samples(shard)
    return counts


def equal_batch_quotas(samples: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Batches each worker of each rank yields in a finite epoch, the same total for every rank.

    Worker w of rank r can make ``samples[r][w] // batch_size`` full batches; every rank yields N = the smallest
    rank total, so ranks with more data cap their workers' quotas (the largest first: water-filling) and leave the
    rest of their samples unread this epoch.

    Args:
        samples: (world_size, num_workers) samples in each worker's shards.

    Returns:
        (world_size, num_workers) batch quotas; every row sums to N.
    """
    quotas = [[n // batch_size for n in row] for row in samples]
    total = min(sum(row) for row in quotas)
    for r, row in enumerate(quotas):
        lo, hi = 0, max(row)  # water-filling: the smallest cap c with sum(min(q, c)) >= total
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if sum(min(q, mid) for q in row) >= total else (mid + 1, hi)
        capped = [min(q, lo) for q in row]
        excess = sum(capped) - total  # < the number of workers at the cap: take one batch from the last of them
        for w in reversed(range(len(row))):
            if excess > 0 and capped[w] == lo:
                capped[w] -= 1
                excess -= 1
        quotas[r] = capped
    return quotas


def spread_batches(total: int, eligible: Sequence[bool]) -> list[int]:
    """``total`` batches spread as evenly as possible over the eligible workers (the first ones get the remainder).

    Raises:
        ValueError: no worker is eligible while ``total > 0``.
    """
    ids = [w for w, ok in enumerate(eligible) if ok]
    if total > 0 and not ids:
        raise ValueError(f"cannot spread {total} batches: no worker has data")
    quotas = [0] * len(eligible)
    for j, w in enumerate(ids):
        quotas[w] = total // len(ids) + int(j < total % len(ids))
    return quotas


# ---------------------------------------------------------------------------------------------------- bad samples
class BadSampleBudget:
    """Counts unreadable shards and undecodable samples, logs each (shard and key), raises past ``max_bad``.

    One budget serves one reading process (a DataLoader worker) for one epoch.
    """

    def __init__(self, max_bad: int, where: str = ""):
        if max_bad < 0:
            raise ValueError(f"max_bad_samples must be >= 0; got {max_bad}")
        self.max_bad = max_bad
        self.where = where
        self.count = 0
        self.errors: list[tuple[str, str, str]] = []  # (shard, key, error), the first few

    def record(self, shard: str, key: str, error: BaseException) -> None:
        """Count one bad sample (or unreadable shard), log it, and raise once more than ``max_bad`` were seen.

        Raises:
            BadSampleBudgetExceeded: the budget is exceeded; one line naming ``max_bad_samples``, the count,
                ``shard``, ``key`` and the error.
        """
        self.count += 1
        text = str(error.args[0]) if error.args else str(error)  # webdataset appends (stream, url) to args
        first_line = text.strip().splitlines()[0].rstrip(".") if text.strip() else ""
        message = f"{type(error).__name__}: {first_line}"
        if len(self.errors) < 10:
            self.errors.append((shard, key, message))
        where = f" ({self.where})" if self.where else ""
        if self.count > self.max_bad:
            raise BadSampleBudgetExceeded(
                f"{self.count} bad sample{'s' if self.count > 1 else ''}, more than max_bad_samples={self.max_bad}"
                f"{where}; the last: shard {shard} "
                f"key {key}: {message}. Check or rewrite that shard, or raise data.max_bad_samples"
            ) from error
        log.warning("skipping bad sample %d/%d%s: shard %s key %s: %s", self.count, self.max_bad, where, shard, key,
                    message)  # fmt: skip


def read_shards(shards: Iterable[str], budget: BadSampleBudget) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__": str, "__url__": shard, <suffix>: bytes}`` of the shards ``shards`` (local paths or
    URLs, ``datamodules.tars``), in order.

    A shard that cannot be read to its end is charged once to ``budget`` (with the last key read before the damage)
    and reading goes on with the next shard. The samples before the damage are kept, except the last one: a sample is
    complete only once the next one starts. A shard cut exactly between two members (tar itself reads it as a
    shorter whole file) is damage too: it lacks the end-of-archive marker, local file or stream alike.

    Raises:
        datamodules.tars.ShardUnreachable: a shard cannot be opened or delivers no byte (a missing file, an HTTP
            error, a failing ``pipe:`` command): not damage but a broken shard list, one line naming the shard.
    """
    for url in shards:
        key, held, error = "<first sample>", None, None  # held: the latest sample, yielded once the next starts
        try:
            with reading_shard(url) as stream:
                for sample in tar_samples(url, stream):
                    if held is not None:
                        key = f"after {held['__key__']}"
                        yield held
                    held = sample
                if not stream.ends_whole():  # cut between members: the last sample may miss some
                    held, error = None, tarfile.ReadError("no end-of-archive marker: the file is cut short")
        except ShardUnreachable:
            raise
        except Exception as err:  # a truncated tar, an I/O error mid-stream (the sample being read is dropped)
            error = err
        if held is not None:
            key = f"after {held['__key__']}"
            yield held
        if error is not None:
            budget.record(url, key, error)


def skip_bad_samples(samples: Iterable[dict[str, Any]], decode: Callable[[dict[str, Any]], dict[str, Any]],
                     budget: BadSampleBudget) -> Iterator[dict[str, Any]]:  # fmt: skip
    """``decode(sample)`` for each raw sample; a sample whose decoding raises is charged to ``budget`` and skipped."""
    for sample in samples:
        try:
            decoded = decode(sample)
        except Exception as err:
            budget.record(str(sample.get("__url__")), str(sample.get("__key__")), err)
            continue
        yield decoded


# ------------------------------------------------------------------------------------------------ shuffle and batch
def shuffle_buffer(samples: Iterable[Any], bufsize: int, rng: np.random.Generator) -> Iterator[Any]:
    """``samples`` shuffled through a buffer of ``bufsize`` (webdataset's ``_shuffle`` with a given generator).

    The buffer fills before the first sample leaves; then each new sample replaces a uniformly drawn one, which is
    yielded; at the end the rest leaves in random order. ``bufsize <= 1`` keeps the order.
    """
    if bufsize <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        i = int(rng.integers(bufsize))
        yield buffer[i]
        buffer[i] = sample
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch dict: tensors stacked along a new dim 0, numbers made a tensor (B,), anything else a list."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], (int, float, np.integer, np.floating)):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def batched(samples: Iterable[Any], batch_size: int, collate: Callable[[list[Any]], Any] = list) -> Iterator[Any]:
    """``collate(batch)`` for each full batch of ``batch_size`` consecutive samples; a last partial batch is dropped."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    batch: list[Any] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
