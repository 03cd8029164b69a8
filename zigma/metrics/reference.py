"""Reference (real-image) statistics, computed once and cached.

Upstream recomputed the real statistics from the training loader at every evaluation (reference zigma-upstream §8).
Here they are computed once per key ``{dataset, resolution, count, extractor, antialias}`` and cached as
``<cache_dir>/<hash of key>.npz``; a different key recomputes, and :func:`load_reference` refuses a file whose metadata
does not match the run (another resolution, count, extractor or resize path gives incomparable FIDs).

The command ``zigma reference-stats`` (``zigma_lightning.reference_stats``) builds them from an image folder or
image shards, read by ``datamodules.images``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zigma.metrics.frechet import GaussianStats

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


def compute_stats(
    images: Iterable[Tensor], *, extractor: nn.Module, count: int, dim: int | None = None, meta: Mapping | None = None
) -> GaussianStats:
    """Feature statistics of exactly ``count`` images from uint8 batches (N, 3, H, W); extra images are ignored."""
    device = _extractor_device(extractor)
    dim = dim or int(getattr(extractor, "num_features", 2048))
    stats = GaussianStats(dim, meta=dict(meta or {}))
    with torch.inference_mode():
        for batch in images:
            batch = batch[: count - stats.count]
            if len(batch):
                stats.update(extractor(batch.to(device)).cpu())
            if stats.count >= count:
                break
    if stats.count < count:
        raise ValueError(f"reference statistics: asked for {count} images, the source gave only {stats.count}")
    return stats


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


def reference_stats(
    images: Iterable[Tensor], *, extractor: nn.Module, key: Mapping[str, Any], cache_dir: str | Path
) -> GaussianStats:
    """Statistics of ``key["count"]`` images, cached as ``cache_dir/<hash of key>.npz``; a second call loads them.

    Args:
        images: uint8 batches (N, 3, H, W); only consumed when the cache misses (a generator is never started then).
        extractor: images -> features (N, d), e.g. :func:`zigma.metrics.inception.load_inception`.
        key: ``{dataset, resolution, count, extractor, antialias}`` (plain JSON); further keys also enter the hash.
        cache_dir: folder of cached statistics.
    """
    key = _check_key(key)
    path = Path(cache_dir) / f"{key_hash(key)}.npz"
    if path.is_file():
        try:
            stats = load_reference(path, expect=key)
        except ValueError as err:  # a hash collision or a hand-edited file: recompute rather than trust it
            log.warning("ignoring cached reference statistics: %s", err)
        else:
            log.info("reference statistics loaded from %s (%d images)", path, stats.count)
            return stats
    stats = compute_stats(images, extractor=extractor, count=int(key["count"]), meta=key)
    stats.save(path)
    log.info("reference statistics of %d images saved to %s", stats.count, path)
    return stats
