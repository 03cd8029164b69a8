"""What does verifying a checkpoint before trusting it cost? (issue 13, deliverable 2)

    python benchmarks/checkpoint_verify.py                  # a 1 GiB checkpoint in a temp dir, 3 repeats
    python benchmarks/checkpoint_verify.py --gib 0.25 --dir /scratch

Writes a Lightning-like checkpoint (``state_dict`` of float32 tensors, 4-64 MiB each, plus a step) with
``AtomicCheckpointIO`` and times, per method, the median of ``--repeats`` runs with the page cache warm (file read
once before) and cold (``echo 3 > /proc/sys/vm/drop_caches`` before each run; skipped with a note where that is not
permitted):

- ``torch.load mmap`` (baseline: the check before issue 13; parses the pickle, reads no tensor data),
- ``verify_checkpoint`` (what cli.py runs now: every zip member's CRC-32 via ``zipfile``, then the mmap load),
- ``sha256 file`` / ``blake2b file`` (the alternative: a content hash of the whole file, as a hash written beside
  each checkpoint would need at verification),
- ``torch.load full`` (what Lightning does anyway when it resumes: reads every tensor into memory).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zigma_lightning.checkpoint_io import AtomicCheckpointIO, verify_checkpoint  # noqa: E402

CHUNK = 1 << 24


def write_checkpoint(path: Path, gib: float) -> None:
    """~``gib`` GiB of float32 tensors of 4..64 MiB (a model's mix of large and small weights), seeded."""
    generator = torch.Generator().manual_seed(0)
    budget, sizes, mib = int(gib * (1 << 30)) // 4, [], (1, 2, 4, 8, 16)
    while sum(sizes) < budget:
        sizes.append(min(mib[len(sizes) % len(mib)] * (1 << 20), budget - sum(sizes)))
    state = {f"layer{i}.weight": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "global_step": 1000, "epoch": 3}, path)


def hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


METHODS = {
    "torch.load mmap (before)": lambda p: torch.load(p, map_location="cpu", weights_only=True, mmap=True),
    "verify_checkpoint (now)": verify_checkpoint,
    "sha256 file": lambda p: hash_file(p, "sha256"),
    "blake2b file": lambda p: hash_file(p, "blake2b"),
    "torch.load full": lambda p: torch.load(p, map_location="cpu", weights_only=True),
}


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(method, path: Path, cold: bool) -> float:
    if cold:
        drop_caches()
    else:
        hash_file(path, "md5")  # the whole file in the page cache
    started = time.perf_counter()
    result = method(path)
    elapsed = time.perf_counter() - started
    del result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    can_drop = drop_caches()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "last.ckpt"
        write_checkpoint(path, args.gib)
        size = path.stat().st_size
        rows = []
        for name, method in METHODS.items():
            warm = statistics.median(timed(method, path, cold=False) for _ in range(args.repeats))
            cold = statistics.median(timed(method, path, cold=True) for _ in range(args.repeats)) if can_drop else None
            rows.append((name, warm, cold))
        fs = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True).stdout
    print(f"checkpoint verification: {size / 1e9:.2f} GB checkpoint ({size / (1 << 30):.2f} GiB) on "
          f"{' '.join(fs.split()[2:]) or '?'}, {platform.machine()} {os.cpu_count()} CPU cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}, commit {commit.stdout.strip() or '?'}, "
          f"{datetime.date.today().isoformat()}, median of {args.repeats}")  # fmt: skip
    if not can_drop:
        print("(cold cache not measured: /proc/sys/vm/drop_caches is not writable here)")
    print()
    baseline = rows[0]
    print("| method | warm cache s | warm GB/s | cold cache s | cold GB/s | warm vs torch.load mmap |")
    print("|---|---|---|---|---|---|")
    for name, warm, cold in rows:
        cold_cells = f"{cold:.3f} | {size / 1e9 / cold:.2f}" if cold is not None else "- | -"
        print(f"| {name} | {warm:.3f} | {size / 1e9 / warm:.2f} | {cold_cells} | +{warm - baseline[1]:.3f} s |")


if __name__ == "__main__":
    main()
