"""Fault injection, shared by ``tests/e2e/test_slurm_faults.py`` (a few seeded faults) and
``benchmarks/fault_injection.py`` (many trials): launch ``cli.py fit --ckpt_path last`` on the tiny fault config
(``tests/e2e/faults.yaml``: 12 steps, a checkpoint every step) and kill it at a moment drawn from a seeded RNG, or
overwrite bytes of a checkpoint in place (same size) in a chosen region of its zip archive.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from tests.e2e.helpers import QUICKSTART, ROOT

FAULTS = [*QUICKSTART, "--config", "tests/e2e/faults.yaml"]
MAX_STEPS = 12  # tests/e2e/faults.yaml
MOMENTS = ("startup", "steps", "write")
STEP_FILE = re.compile(r"^\.?step(\d+)\.ckpt")  # step000007.ckpt and its temporary .step000007.ckpt.<rand>.tmp
REGIONS = ("zip header", "pickle", "tensor data", "central directory", "end record")


def plain_env(**extra: str) -> dict[str, str]:
    """This environment without any SLURM variables (CI may itself run under SLURM), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def fit_command(runs: Path, *args: str) -> list[str]:
    return [sys.executable, "cli.py", "fit", *FAULTS, "--trainer.logger.init_args.save_dir", str(runs), *args]


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` from the repository root with stdout and stderr going to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_resume(runs: Path, log: Path, probe: Path) -> subprocess.Popen:
    """``fit --ckpt_path last``; ``tests.e2e.helpers.StateProbe`` saves the step it starts training at to ``probe``."""
    command = fit_command(runs, "--ckpt_path", "last", "--trainer.callbacks+=tests.e2e.helpers.StateProbe")
    return start(command, log, plain_env(ZIGMA_STATE_PROBE=str(probe)))


def checkpoint_names(runs: Path) -> set[str]:
    """Names in every run's checkpoints/ directory (cheap enough to poll every millisecond)."""
    names = set()
    for ckpts in runs.glob("*/*/checkpoints"):
        with contextlib.suppress(FileNotFoundError):  # a run directory being created
            names.update(f"{ckpts}/{entry.name}" for entry in os.scandir(ckpts))
    return names


def probed_step(probe: Path) -> int | None:
    """The step a launch started training from (StateProbe), or None if it was killed before writing it."""
    try:
        return int(torch.load(probe, weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def kill_at_random_moment(runs: Path, log: Path, probe: Path, moment: str, rng: random.Random) -> dict:
    """Start ``fit --ckpt_path last`` and SIGKILL it at a ``moment`` drawn from ``rng`` (``rc`` if it finished first).

    Moments: ``startup`` (0.2-5 s after launch: imports, config, model, first checkpoint), ``steps`` (0-1 s after the
    launch's first new checkpoint) and ``write`` (as soon as the n-th new checkpoint temporary appears, n in 1..4:
    inside ``torch.save``, fsync or rename). ``progress``: the highest step whose checkpoint write had begun;
    ``torn``: temporaries the kill left behind.
    """
    before = checkpoint_names(runs)
    proc = start_resume(runs, log, probe)
    launched = time.monotonic()
    if moment == "startup":
        deadline = launched + rng.uniform(0.2, 5.0)
    else:
        wanted, suffix = (rng.randint(1, 4), ".tmp") if moment == "write" else (1, ".ckpt")
        delay = rng.uniform(0.0, 1.0) if moment == "steps" else 0.0
        seen: set[str] = set()
        while proc.poll() is None and len(seen) < wanted:
            seen.update(n for n in checkpoint_names(runs) - before if n.endswith(suffix))
            time.sleep(0.001)
        deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    if proc.poll() is not None:
        return {"moment": moment, "rc": proc.returncode}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    new = [Path(n).name for n in checkpoint_names(runs) - before]
    steps = [int(m.group(1)) for n in new if (m := STEP_FILE.match(n))]
    return {"moment": moment, "at_s": round(time.monotonic() - launched, 2), "progress": max(steps, default=0),
            "torn": sorted(n for n in new if n.endswith(".tmp"))}  # fmt: skip


def _member_data_span(path: Path, info: zipfile.ZipInfo) -> tuple[int, int]:
    """[start, end) of a stored member's bytes: after its local header (30 bytes + name + extra field, which torch
    uses to pad tensor data to its alignment)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = struct.unpack("<4s5H3L2H", f.read(30))
    start = info.header_offset + 30 + header[9] + header[10]
    return start, start + info.compress_size


def region_span(path: Path, region: str) -> tuple[int, int]:
    """[start, end) of a ``region`` (one of ``REGIONS``) of a ``torch.save`` zip archive: the first local header,
    the pickle's bytes, the largest tensor storage's bytes, the central directory, the end-of-archive records."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        directory_start = archive.start_dir
    if region == "zip header":
        return 0, 30
    if region == "pickle":
        return _member_data_span(path, next(i for i in infos if i.filename.endswith("/data.pkl")))
    if region == "tensor data":
        return _member_data_span(path, max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size))
    size = path.stat().st_size
    records = size - 22  # end of central directory record (no archive comment), after any zip64 records
    with open(path, "rb") as f:
        f.seek(directory_start)
        while f.tell() < records and f.read(4) == b"PK\x01\x02":  # central directory entries
            f.seek(f.tell() + 24)
            name, extra, comment = struct.unpack("<3H", f.read(6))
            f.seek(f.tell() + 12 + name + extra + comment)
        directory_end = f.tell() - (0 if f.tell() >= records else 4)
    if region == "central directory":
        return directory_start, directory_end
    if region == "end record":
        return directory_end, size
    raise ValueError(f"region={region!r}: one of {REGIONS}")


def corrupt_in_place(path: Path, region: str, rng: random.Random, nbytes: int = 64) -> int:
    """Overwrite ``nbytes`` (fewer if the region is smaller) at a random place inside ``region`` of the checkpoint
    ``path`` with different bytes, keeping its size and everything else; returns the offset."""
    start, end = region_span(path, region)
    nbytes = min(nbytes, end - start)
    offset = rng.randrange(start, end - nbytes + 1)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(nbytes)
        f.seek(offset)
        f.write(bytes(b ^ rng.randrange(1, 256) for b in old))  # every byte changes
    return offset
