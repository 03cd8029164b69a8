"""Reference (real-image) statistics, computed once and cached, and a command that builds them from an image folder.

Upstream recomputed the real statistics from the training loader at every evaluation (reference zigma-upstream §8).
Here they are computed once per key ``{dataset, resolution, count, extractor, antialias}`` and cached as
``<cache_dir>/<hash of key>.npz``; a different key recomputes, and :func:`load_reference` refuses a file whose metadata
does not match the run (another resolution, count, extractor or resize path gives incomparable FIDs).

Command (an image folder, or the images stored in webdataset shards under a key such as ``jpg``)::

    python -m zigma.metrics.reference --images DIR --resolution 256 --count 5000 --out stats.npz \\
        [--inception-weights PATH] [--dataset NAME] [--batch-size 64] [--device cuda] [--antialias] [--feature 2048]
    python -m zigma.metrics.reference --shards '/data/celeba/train-{000000..000099}.tar' --image-key jpg ...

Images are read like the data tool (``datamodules/prepare.py``): RGB, shorter side resized to the resolution (PIL
bicubic), centre square cropped.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from zigma.images import resize_center_crop
from zigma.metrics.frechet import GaussianStats

log = logging.getLogger(__name__)

KEY_FIELDS = ("dataset", "resolution", "count", "extractor", "antialias")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
            "comparable. Rebuild them with `python -m zigma.metrics.reference --images DIR --resolution R "
            "--count N --out FILE`."
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


# --- image folder -----------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: {folder} is not a directory")
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: _natural_key(str(p.relative_to(folder))))


def load_image(path: str | Path, resolution: int) -> Tensor:
    """An image file -> uint8 (3, S, S): RGB, shorter side resized to S (PIL bicubic), centre crop."""
    from PIL import Image

    with Image.open(path) as image:
        image = resize_center_crop(image, resolution)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


def folder_batches(files: Sequence[Path], resolution: int, batch_size: int) -> Iterator[Tensor]:
    """uint8 batches (B, 3, S, S) of the given files, in order."""
    return batches_of((load_image(f, resolution) for f in files), batch_size)


def expand_pattern(pattern: str | Sequence[str]) -> list[str]:
    """A shard list or brace pattern (``train-{000000..000099}.tar``) -> paths (braceexpand comes with webdataset)."""
    if not isinstance(pattern, str):
        return [str(p) for p in pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def shard_images(shards: Sequence[str], image_key: str, resolution: int) -> Iterator[Tensor]:
    """uint8 (3, S, S) images stored under suffix ``image_key`` (e.g. ``jpg``) in tar shards (webdataset layout:
    member ``<key>.<suffix>``), in shard and member order. A shard that does not exist raises; a member that does not
    decode raises with its name (reference statistics must not silently drop images)."""
    import io
    import tarfile

    from PIL import Image

    suffix = "." + image_key.lstrip(".")
    found = False
    for shard in shards:
        if not Path(shard).is_file():
            raise FileNotFoundError(f"reference shards: no file {shard}")
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                name = Path(member.name).name
                if not member.isfile() or "." not in name or name[name.index(".") :] != suffix:
                    continue
                found = True
                data = tar.extractfile(member).read()
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image = resize_center_crop(image, resolution)
                except Exception as err:
                    raise ValueError(f"reference shards: {shard}:{member.name} is not a readable image: {err}") from err
                yield torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    if not found:
        raise ValueError(f"reference shards {shards[0]}...: no member with suffix {suffix!r} (set the image key)")


def batches_of(items: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stacks consecutive tensors into batches of ``batch_size`` (the last one may be smaller)."""
    items = iter(items)
    while batch := list(itertools.islice(items, batch_size)):
        yield torch.stack(batch)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m zigma.metrics.reference", description="Inception reference statistics of an image folder."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (searched recursively)")
    source.add_argument("--shards", help="webdataset tar shards: a brace pattern such as 'train-{000000..000099}.tar'")
    parser.add_argument("--image-key", default="jpg", help="with --shards: the images' suffix (default jpg)")
    parser.add_argument("--resolution", type=int, required=True, help="shorter side resized to this, centre crop")
    parser.add_argument("--count", type=int, required=True, help="number of images (the first, in natural order)")
    parser.add_argument("--out", required=True, help="output .npz (mu, sigma, count, meta)")
    parser.add_argument("--inception-weights", default=None, help=".pth of torch-fidelity's Inception-v3")
    parser.add_argument("--dataset", default=None, help="dataset name for the metadata (default: the folder's name)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--antialias", action="store_true", help="antialiased resize to 299 (not TF-FID comparable)")
    parser.add_argument("--feature", type=int, default=2048, choices=(64, 192, 768, 2048), help="pool layer; FID: 2048")
    args = parser.parse_args(argv)
    if args.resolution < 1 or args.count < 2 or args.batch_size < 1:
        parser.error("--resolution and --batch-size must be positive and --count at least 2")

    from zigma.metrics.inception import load_inception

    if args.images is not None:
        files = list_images(args.images)
        if len(files) < args.count:
            parser.error(f"--count {args.count}: {args.images} holds only {len(files)} images")
        batches = folder_batches(files[: args.count], args.resolution, args.batch_size)
        dataset = Path(args.images).resolve().name
    else:
        shards = expand_pattern(args.shards)
        batches = batches_of(shard_images(shards, args.image_key, args.resolution), args.batch_size)
        dataset = f"shards:{shards[0]}..{shards[-1]}({len(shards)})"
    extractor = load_inception(args.inception_weights, antialias=args.antialias, feature=args.feature,
                               device=args.device)  # fmt: skip
    key = {
        "dataset": args.dataset or dataset,
        "resolution": args.resolution,
        "count": args.count,
        "extractor": extractor.name,
        "antialias": args.antialias,
    }
    stats = compute_stats(batches, extractor=extractor, count=args.count, meta=key)
    out = stats.save(args.out)
    print(f"saved statistics of {stats.count} images to {out}: {json.dumps(stats.meta, sort_keys=True)}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
