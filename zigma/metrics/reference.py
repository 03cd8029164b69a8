"""Reference (real-image) statistics, computed once and cached.

Upstream recomputed the real statistics from the training loader at every evaluation (reference zigma-upstream §8).
Here they are computed once per key ``{dataset, resolution, count, extractor, antialias}`` and cached as
``<cache_dir>/<hash of key>.npz``; a different key recomputes, and :func:`load_reference` refuses a file whose metadata
does not match the run (another resolution, count, extractor or resize path gives incomparable FIDs).

Under ``torch.distributed`` (DDP) all ranks compute them together: each extracts the features of a disjoint share of
the real images (item i goes to rank i mod W, every item exactly once) and the float64 sums are added over the ranks
(``GaussianStats.all_reduce``), which gives the single-process statistics; rank 0 writes the cache file.

The command ``zigma reference-stats`` (``zigma_lightning.reference_stats``) builds them from an image folder or
image shards, read by ``datamodules.images``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zigma.metrics.frechet import GaussianStats, collective_device
from zigma.metrics.progress import progress_bar

log = logging.getLogger(__name__)

KEY_FIELDS = ("dataset", "resolution", "count", "extractor", "antialias")


def _check_key(key: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in KEY_FIELDS if k not in key]
    if missing:
        raise ValueError(f"reference key lacks {missing}; it needs {list(KEY_FIELDS)}, got {dict(key)}")
    key = dict(key)
    json.dumps(key)  # plain JSON only: raises TypeError otherwise
    return key


def key_hash(key: Mapping[str, Any]) -> str:
    """A short stable hash of the key (sorted JSON), the cache file's name."""
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]


def _extractor_device(extractor: nn.Module) -> torch.device:
    param = next(iter(extractor.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default ``torch.distributed`` group, (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_size(count: int, rank: int, world_size: int) -> int:
    """How many of items 0 .. count-1 rank ``rank`` of ``world_size`` takes (those with i mod W = rank)."""
    return len(range(rank, count, world_size))


def rank_share(batches: Iterable[Tensor], count: int, rank: int, world_size: int) -> Iterator[Tensor]:
    """This rank's rows of the first ``count`` items of a stream of batches (N, ...): item i (in stream order) goes to
    rank i mod W. Over the W ranks every item is taken exactly once: no padding, no item twice (unlike
    ``DistributedSampler``), whatever the batch sizes. Every rank reads the whole stream; only what it yields is
    this rank's."""
    seen = 0
    for batch in batches:
        batch = batch[: count - seen]
        mine = batch[(rank - seen) % world_size :: world_size]  # rows j with (seen + j) mod W = rank
        seen += len(batch)
        if len(mine):
            yield mine
        if seen >= count:
            return


def _accumulate(images: Iterable[Tensor], extractor: nn.Module, count: int, stats: GaussianStats, bar) -> GaussianStats:
    """Adds the features of at most ``count`` images of uint8 batches (N, 3, H, W) to ``stats``; returns it."""
    device = _extractor_device(extractor)
    with torch.inference_mode():
        for batch in images:
            batch = batch[: count - stats.count]
            if len(batch):
                stats.update(extractor(batch.to(device)).cpu())
                bar.update(len(batch))
            if stats.count >= count:
                break
    return stats


def _check_count(stats: GaussianStats, count: int) -> GaussianStats:
    if stats.count < count:
        raise ValueError(f"reference statistics: asked for {count} images, the source gave only {stats.count}")
    return stats


def compute_stats(
    images: Iterable[Tensor], *, extractor: nn.Module, count: int, dim: int | None = None, meta: Mapping | None = None,
    progress: bool | None = None, desc: str = "reference statistics"
) -> GaussianStats:  # fmt: skip
    """Feature statistics of exactly ``count`` images from uint8 batches (N, 3, H, W); extra images are ignored.
    ``progress``: a bar on rank 0 (None: only on a terminal, see ``zigma.metrics.progress``)."""
    dim = dim or int(getattr(extractor, "num_features", 2048))
    with progress_bar(count, desc, unit="img", enabled=progress, rank=_rank_and_world()[0]) as bar:
        stats = _accumulate(images, extractor, count, GaussianStats(dim, meta=dict(meta or {})), bar)
    return _check_count(stats, count)


def load_reference(path: str | Path, *, expect: Mapping[str, Any]) -> GaussianStats:
    """Loads reference statistics, refusing a file whose metadata differs from ``expect`` on any given key."""
    stats = GaussianStats.load(path)
    wrong = {k: (stats.meta.get(k), v) for k, v in expect.items() if stats.meta.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: file has {have!r}, this run needs {want!r}" for k, (have, want) in wrong.items())
        raise ValueError(
            f"reference statistics {path} do not match this evaluation ({detail}); FIDs against them would not be "
            "comparable. Rebuild them with `zigma reference-stats --images DIR --resolution R --count N "
            "--out FILE`."
        )
    return stats


def _cached(path: Path, key: Mapping[str, Any]) -> GaussianStats | None:
    """The cached statistics at ``path`` if they exist and match ``key``, else None."""
    if not path.is_file():
        return None
    try:
        stats = load_reference(path, expect=key)
    except ValueError as err:  # a hash collision or a hand-edited file: recompute rather than trust it
        log.warning("ignoring cached reference statistics: %s", err)
        return None
    log.info("reference statistics loaded from %s (%d images)", path, stats.count)
    return stats


def _collective_flag(flag: bool, op: str) -> bool:
    """``"broadcast"``: rank 0's flag on every rank; ``"any"``: whether any rank's flag is set. Every rank calls."""
    value = torch.tensor([float(flag)], device=collective_device())
    if op == "broadcast":
        dist.broadcast(value, src=0)
    else:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


Images = Iterable[Tensor] | Callable[[int, int], Iterable[Tensor]]


def reference_stats(
    images: Images, *, extractor: nn.Module, key: Mapping[str, Any], cache_dir: str | Path,
    progress: bool | None = None, desc: str = "reference statistics"
) -> GaussianStats | None:  # fmt: skip
    """Statistics of ``key["count"]`` images, cached as ``cache_dir/<hash of key>.npz``; a second call loads them.

    Under ``torch.distributed`` (initialised, W > 1 ranks) every rank must call it, with the same arguments: rank 0
    looks the cache up and tells the others; on a miss every rank extracts the features of its share of the images
    (item i goes to rank i mod W) and the shares are summed over the ranks (:meth:`GaussianStats.all_reduce`), so
    the result equals one process's up to float64 rounding and no rank idles through the whole computation. Rank 0
    then writes the file (atomically). An error on one rank (an unreadable image) stops every rank, with its own
    message there, instead of leaving the others waiting in the sum.

    Args:
        images: uint8 batches (N, 3, H, W) of the whole real set in a fixed order (under DDP each rank keeps its
            rows, :func:`rank_share`), or a function ``(rank, world_size) -> batches`` of that rank's share only (so
            that a rank decodes only its own images; it must give items i = rank, rank + W, ... of the first
            ``count``). Only used on a cache miss (a generator is never started otherwise).
        extractor: images -> features (N, d), e.g. :func:`zigma.metrics.inception.load_inception`.
        key: ``{dataset, resolution, count, extractor, antialias}`` (plain JSON); further keys also enter the hash.
        cache_dir: folder of cached statistics.
        progress: a bar of rank 0's share on rank 0 (None: only on a terminal).
        desc: the bar's label.

    Returns:
        The statistics on rank 0 (and without ``torch.distributed``); None on the other ranks.
    """
    key = _check_key(key)
    path = Path(cache_dir) / f"{key_hash(key)}.npz"
    rank, world = _rank_and_world()
    cached = _cached(path, key) if rank == 0 else None
    hit = cached is not None
    if world > 1:
        hit = _collective_flag(hit, "broadcast")  # rank 0 decides for all: they compute together or not at all
    if hit:
        return cached
    count = int(key["count"])
    mine = share_size(count, rank, world)
    stats = GaussianStats(int(key.get("dim") or getattr(extractor, "num_features", 2048)), meta=key)
    error = None
    try:
        shares = images(rank, world) if callable(images) else rank_share(images, count, rank, world)
        with progress_bar(mine, desc, unit="img", enabled=progress, rank=rank) as bar:
            _accumulate(shares, extractor, mine, stats, bar)
    except Exception as err:  # re-raised below; under DDP first told to the other ranks, so none waits forever
        if world == 1:
            raise
        error = err
    if world > 1:
        if _collective_flag(error is not None, "any"):
            if error is not None:
                raise error
            raise RuntimeError("reference statistics failed on another rank (its log has the error)")
        stats.all_reduce()
    _check_count(stats, count)
    if rank != 0:
        return None
    stats.save(path)
    log.info("reference statistics of %d images saved to %s", stats.count, path)
    return stats
