"""Cost of resuming a webdataset epoch mid-way: the same configuration (fast-forward, the baseline) against another
world size (elastic resume: the old ranks' streams replayed undecoded, the rest dealt to the new ranks).

Synthetic latent shards (4x32x32 fp32, 16 KiB a sample) are written to a temporary directory; rank 0 of a
4-process configuration reads ``--fraction`` of its epoch, its state is saved, and rank 0 of each resuming
configuration restores it and fetches its first batch (``num_workers=0``: everything in this process). Reported:
wall and process CPU seconds (``time.process_time``, less sensitive to other load) for restore + first batch, and
the samples each had to read again. Runs alternate (baseline, elastic, baseline, ...) and the median is shown.

    python benchmarks/elastic_resume.py
    python benchmarks/elastic_resume.py --samples 40000 --fraction 0.9
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402

from datamodules.webdataset import WebDataModule  # noqa: E402


def write_shards(directory: Path, counts: list[int], latent_shape: tuple[int, ...]) -> list[str]:
    """Shards ``train-<k>.tar`` of ``counts[k]`` samples, each an fp32 ``latent.npy`` of ``latent_shape``."""
    paths, index, rng = [], 0, np.random.default_rng(0)
    for shard, count in enumerate(counts):
        path = directory / f"train-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(count):
                buffer = io.BytesIO()
                np.save(buffer, rng.standard_normal(latent_shape).astype(np.float32))
                sink.write({"__key__": f"{index:08d}", "latent.npy": buffer.getvalue()})
                index += 1
        paths.append(str(path))
    return paths


def loader(shards: list[str], rank: int, world_size: int, batch_size: int):
    data = WebDataModule(shards, batch_size=batch_size, num_workers=0, latent_scale=1, shuffle_buffer=1000)
    data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what rank_and_world reads
    return data.train_dataloader()


def time_restore(shards: list[str], state: dict, world_size: int, batch_size: int) -> tuple[float, float]:
    resumed = loader(shards, 0, world_size, batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    resumed.load_state_dict(state)
    next(iter(resumed))
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.75, help="of the epoch read before the checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counts = [args.shard_size] * (args.samples // args.shard_size)
        shards = write_shards(Path(tmp), counts, latent_shape=(4, 32, 32))
        first = loader(shards, 0, 4, args.batch_size)
        batches = int(len(first) * args.fraction)
        iterator = iter(first)
        for _ in range(batches):
            next(iterator)
        state = first.state_dict()
        read = 4 * batches * args.batch_size
        rows = {"same 4 processes (fast-forward, baseline)": (4, read // 4),
                "4 -> 2 processes (elastic: replay of 4 ranks)": (2, read)}  # fmt: skip
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, (world, _) in rows.items():
                times[name].append(time_restore(shards, state, world, args.batch_size))
    print(f"{sum(counts)} latent samples in {len(counts)} shards, batch {args.batch_size}, checkpoint after {read} "
          f"samples ({args.fraction:.0%} of the epoch), median of {args.repeats}")  # fmt: skip
    print("| resume | samples re-read | wall s | CPU s |\n|---|---|---|---|")
    for name, (_, again) in rows.items():
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        print(f"| {name} | {again} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
