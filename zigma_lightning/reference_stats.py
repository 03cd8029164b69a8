"""``zigma reference-stats``: Inception reference statistics of an image folder or of images stored in shards.

Usage (an image folder, or the images stored in webdataset shards under a key such as ``jpg``)::

    zigma reference-stats --images DIR --resolution 256 --count 5000 --out stats.npz \\
        [--inception-weights PATH] [--dataset NAME] [--batch-size 64] [--device cuda] [--antialias] [--feature 2048]
        [--quiet]
    zigma reference-stats --shards '/data/celeba/train-{000000..000099}.tar' --image-key jpg ...

(``python -m zigma_lightning.reference_stats`` is the same command.) Images are read like the data tool
(``datamodules.images``): RGB, shorter side resized to the resolution (PIL bicubic), centre square cropped; the first
``--count`` in natural path order (folders) or shard and member order (shards). A progress bar counts the images on
a terminal (never into a redirected log; ``--quiet``: never). The statistics library and its cache are
``zigma.metrics.reference``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from datamodules.errors import DataError
from datamodules.images import batches_of, folder_batches, list_images, shard_images
from datamodules.shards import expand_shards
from zigma.metrics.reference import compute_stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zigma reference-stats", description="Inception reference statistics of an image folder or image shards."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (searched recursively)")
    source.add_argument("--shards", help="webdataset tar shards: a brace pattern such as 'train-{000000..000099}.tar', "
                        "a pipe: command or an http(s):// URL")  # fmt: skip
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
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (there is none when stderr is no terminal)"
    )
    return parser


def reference_stats_from_argv(argv: Sequence[str] | None = None) -> Path:
    """Parse the command line (``sys.argv[1:]`` if None), compute the statistics; returns the written ``.npz``.

    Raises:
        ValueError, FileNotFoundError: an unreadable source (``main`` prints them in one line).
    """
    parser = build_parser()
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
        shards = expand_shards(args.shards)
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
    stats = compute_stats(
        batches, extractor=extractor, count=args.count, meta=key, progress=False if args.quiet else None
    )
    out = stats.save(args.out)
    print(f"saved statistics of {stats.count} images to {out}: {json.dumps(stats.meta, sort_keys=True)}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when the statistics are written; a bad source prints one line ``error: ...`` to stderr and
    gives 1 (argparse's usage errors exit with 2)."""
    try:
        reference_stats_from_argv(argv)
    except (ValueError, FileNotFoundError, DataError) as error:  # DataError: a shard that cannot be read
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
