"""Data-loading throughput of ``WebDataModule``: samples/s for 4x32x32 latent shards and for 256² JPEG shards.

Synthetic shards are written to a temporary directory (raw fp32 latents like upstream's ``img_feature256.npy``; JPEGs
of random smooth images at quality 95), then one rank's training loader is iterated for whole epochs with the given
number of workers (batching, shuffle buffer and decoding included; no model). Reported: samples/s of the second
epoch (the first warms the page cache and workers).

    python benchmarks/dataloader.py                     # 2 workers, prints a table
    python benchmarks/dataloader.py --workers 4 --latent-samples 40000

Target (issue 5): >= 3,000 latent samples/s with 2 workers on a 2-core machine.
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_latent_shards(directory: Path, count: int, per_shard: int) -> None:
    import webdataset as wds

    rng = np.random.default_rng(0)
    for shard in range(0, count, per_shard):
        with wds.TarWriter(str(directory / f"train-{shard // per_shard:06d}.tar")) as sink:
            for i in range(shard, min(count, shard + per_shard)):
                buffer = io.BytesIO()
                np.save(buffer, rng.standard_normal((4, 32, 32), dtype=np.float32))
                sink.write({"__key__": f"{i:08d}", "img_feature256.npy": buffer.getvalue(), "cls": str(i % 10)})


def write_jpeg_shards(directory: Path, count: int, per_shard: int) -> None:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for shard in range(0, count, per_shard):
        with wds.TarWriter(str(directory / f"train-{shard // per_shard:06d}.tar")) as sink:
            for i in range(shard, min(count, shard + per_shard)):
                small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # smooth content, like photos compress
                image = Image.fromarray(small).resize((288, 256), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=95)
                sink.write({"__key__": f"{i:08d}", "jpg": buffer.getvalue()})


def measure(module, epochs: int = 2) -> tuple[float, int]:
    loader = module.train_dataloader()
    rate, seen = 0.0, 0
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for batch in loader:
            seen += next(iter(batch.values())).shape[0]
        rate = seen / (time.perf_counter() - start)
    return rate, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latent-samples", type=int, default=24000)
    parser.add_argument("--jpeg-samples", type=int, default=2400)
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args()

    import torch

    from datamodules.webdataset import WebDataModule

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        latent_dir, jpeg_dir = Path(tmp, "latents"), Path(tmp, "jpegs")
        latent_dir.mkdir()
        jpeg_dir.mkdir()
        write_latent_shards(latent_dir, args.latent_samples, args.per_shard)
        write_jpeg_shards(jpeg_dir, args.jpeg_samples, max(1, args.per_shard // 10))
        latent = WebDataModule(shards=str(latent_dir), kind="latent", label_key="cls", num_classes=10,
                               batch_size=args.batch_size, num_workers=args.workers)  # fmt: skip
        rows.append(("latent 4x32x32 fp32 + cls", *measure(latent), 3000))
        jpeg = WebDataModule(shards=str(jpeg_dir), kind="image", resolution=256, hflip=True,
                             batch_size=args.batch_size, num_workers=args.workers)  # fmt: skip
        rows.append(("JPEG 256² (resize+crop+flip)", *measure(jpeg), None))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"# WebDataModule train loader, {args.workers} workers, batch {args.batch_size}, {platform.machine()}, "
          f"commit {commit.strip()}")  # fmt: skip
    print("| shards | samples per epoch | samples/s (2nd epoch) | target |")
    print("|---|---|---|---|")
    for name, rate, seen, target in rows:
        verdict = "-" if target is None else f">= {target}: {'MET' if rate >= target else 'NOT MET'}"
        print(f"| {name} | {seen} | {rate:.0f} | {verdict} |")


if __name__ == "__main__":
    main()
