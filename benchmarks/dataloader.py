"""Data-loading throughput of ``WebDataModule``: samples/s for 4x32x32 latent shards read from local files and over
HTTP, and for 256² JPEG shards.

Synthetic shards are written to a temporary directory (raw fp32 latents like upstream's ``img_feature256.npy``, with
the ``manifest.json`` that gives the sample counts; JPEGs of random smooth images at quality 95), then one rank's
training loader is iterated for whole epochs with the given number of workers (batching, shuffle buffer and decoding
included; no model). The HTTP row reads the same latent shards as ``http://127.0.0.1:<port>/train-{...}.tar`` from
``python -m http.server`` in its own process (loopback; webdataset opens them with ``curl``); local and HTTP epochs
are interleaved over ``--rounds`` rounds. Reported per row: samples/s of the second epoch of each round (the first
warms the page cache and workers; the best round and the median), and the CPU seconds that epoch cost the loader
(this process, its workers and their ``curl`` processes) and, for HTTP, the server.

    python benchmarks/dataloader.py                     # 2 workers, prints a table
    python benchmarks/dataloader.py --workers 4 --latent-samples 40000

Targets: >= 3,000 latent samples/s with 2 workers on a 2-core machine (issue 5); over loopback HTTP also >= 3,000
and within 20% of local files (issue 16).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import statistics
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


def write_counts_manifest(directory: Path, count: int, per_shard: int) -> None:
    """The ``manifest.json`` that gives the sample count of each latent shard (a shard URL needs it to be counted)."""
    from datamodules.manifest import write_manifest

    shards = [{"name": f"train-{i:06d}.tar", "count": min(per_shard, count - i * per_shard)}
              for i in range(-(-count // per_shard))]  # fmt: skip
    write_manifest(directory, {
        "format": "zigma-shards", "version": 1, "kind": "images", "resolution": 256, "keys": {}, "latents": "sample",
        "latent_shape": [4, 32, 32], "vae": None, "num_classes": 10, "label_names": [str(i) for i in range(10)],
        "caption_feature_shape": None,
        "splits": {"train": {"complete": True, "count": count, "bad": 0, "bad_paths": [], "shard_size": per_shard,
                             "shards": shards, "inputs": {}, "created": "", "command": ""}}})  # fmt: skip


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


def cpu_seconds(server_pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process and its reaped descendants (DataLoader workers, their curl
    processes), or of the process ``server_pid`` (from ``/proc``)."""
    if server_pid is not None:
        fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure(module, epochs: int = 2, server_pid: int | None = None) -> tuple[float, int, float, float]:
    """(samples/s, samples, loader CPU s, server CPU s) of the last of ``epochs`` epochs."""
    loader = module.train_dataloader()
    rate, seen, cpu, server_cpu = 0.0, 0, 0.0, 0.0
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        cpu_start, server_start = cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0
        for batch in loader:
            seen += next(iter(batch.values())).shape[0]
        rate = seen / (time.perf_counter() - start)
        cpu = cpu_seconds() - cpu_start
        server_cpu = cpu_seconds(server_pid) - server_start if server_pid else 0.0
    return rate, seen, cpu, server_cpu


def start_http_server(directory: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on 127.0.0.1 (a free port) serving ``directory``: (process, base URL)."""
    command = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(directory)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    return server, f"http://127.0.0.1:{line.split(' port ')[1].split()[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latent-samples", type=int, default=24000)
    parser.add_argument("--jpeg-samples", type=int, default=2400)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved local/HTTP rounds of 2 epochs each")
    parser.add_argument("--no-jpeg", action="store_true", help="skip the JPEG row")
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
        write_counts_manifest(latent_dir, args.latent_samples, args.per_shard)
        last = (args.latent_samples - 1) // args.per_shard
        server, base = start_http_server(latent_dir)
        try:
            specs = {"local": str(latent_dir), "http": f"{base}/train-{{000000..{last:06d}}}.tar"}
            runs: dict[str, list[tuple[float, int, float, float]]] = {name: [] for name in specs}
            for _ in range(args.rounds):
                for name, spec in specs.items():
                    module = WebDataModule(shards=spec, kind="latent", label_key="cls", num_classes=10,
                                           batch_size=args.batch_size, num_workers=args.workers)  # fmt: skip
                    runs[name].append(measure(module, server_pid=server.pid if name == "http" else None))
        finally:
            server.terminate()
            server.wait()
        for name, label in (("local", "latent 4x32x32 fp32 + cls, local files"),
                            ("http", "latent 4x32x32 fp32 + cls, loopback HTTP (curl)")):  # fmt: skip
            rates = [r[0] for r in runs[name]]
            best = max(runs[name])
            rows.append((label, best[1], max(rates), statistics.median(rates), best[2], best[3] if name == "http"
                         else None, 3000))  # fmt: skip
        if not args.no_jpeg:
            write_jpeg_shards(jpeg_dir, args.jpeg_samples, max(1, args.per_shard // 10))
            jpeg = WebDataModule(shards=str(jpeg_dir), kind="image", resolution=256, hflip=True,
                                 batch_size=args.batch_size, num_workers=args.workers)  # fmt: skip
            rate, seen, cpu, _ = measure(jpeg)
            rows.append(("JPEG 256² (resize+crop+flip), local files", seen, rate, rate, cpu, None, None))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"# WebDataModule train loader, {args.workers} workers, batch {args.batch_size}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, commit {commit.strip()}, "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    print(
        "| shards | samples per epoch | samples/s best | samples/s median | loader CPU s / epoch (best) | "
        "samples per loader CPU s | server CPU s | target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, seen, best, median, cpu, server_cpu, target in rows:
        verdict = "-" if target is None else f">= {target}: {'MET' if best >= target else 'NOT MET'}"
        server_text = "-" if server_cpu is None else f"{server_cpu:.2f}"
        print(f"| {name} | {seen} | {best:.0f} | {median:.0f} | {cpu:.2f} | {seen / cpu:.0f} | {server_text} | "
              f"{verdict} |")  # fmt: skip
    local, http = rows[0], rows[1]
    ratio = http[2] / local[2]
    print(
        f"\nHTTP / local (best rounds): {ratio:.2f} of the local rate (target >= 0.80: "
        f"{'MET' if ratio >= 0.8 else 'NOT MET'}); median rounds {http[3] / local[3]:.2f}; samples per loader CPU "
        f"second {http[1] / http[4] / (local[1] / local[4]):.2f} of local's"
    )


if __name__ == "__main__":
    main()
