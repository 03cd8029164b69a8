"""SIGKILL fault injection: does every training run survive being killed at random moments?

    python benchmarks/fault_injection.py                      # 20 kill trials and 5 corruption trials, seed 0
    python benchmarks/fault_injection.py --trials 5 --keep runs_faults/
    python benchmarks/fault_injection.py --trials 0 --corruption-trials 10

Each trial trains ``python cli.py fit --config configs/quickstart.yaml --config tests/e2e/tiny.yaml --config
tests/e2e/faults.yaml --ckpt_path last`` (12 steps of a tiny model, a checkpoint every step) in a subprocess, SIGKILLs
it 1-3 times at moments drawn from ``random.Random(seed)`` and relaunches the same command after every kill (so later
kills hit resumed runs), then lets the last launch finish. Kill moments: ``startup`` (0.2-5 s after launch: imports,
config, model, first checkpoint), ``steps`` (0-1 s after the launch's first new checkpoint) and ``write`` (as soon as
the n-th new checkpoint temporary appears, n in 1..4: inside ``torch.save``, fsync or rename).

Per kill it records the progress (the highest step whose checkpoint write had begun: that step's update was done),
the highest step among the ``.ckpt`` files that load (what ``--ckpt_path last`` should resume from), every ``.ckpt``
file that fails ``torch.load(weights_only=True)``, and whether a torn ``.*.tmp`` was left (the kill hit a write). The
next launch records the step it actually started training from (``tests.e2e.helpers.StateProbe``), which must
equal that highest loadable step. A trial survives when its last launch exits 0 at max_steps with a
``last.ckpt`` at max_steps, no corrupt ``.ckpt`` was ever seen in its run directory and every resume started where it
should. Steps lost per kill = progress minus the step resumed from (updates that had to be trained again). "Loads"
means ``zigma_lightning.checkpoint_io.verify_checkpoint`` passes: every zip member matches its CRC-32.

In-place corruption trials (``--corruption-trials``, issue 13): one run trains ``CORRUPTION_STEPS`` steps, then each
trial copies it, overwrites 64 bytes in place (same size) in each of the 1-3 newest checkpoints, in a region of the
zip archive drawn from ``tests.e2e.faults.REGIONS`` (zip header, pickle, tensor data, central directory, end record),
and relaunches ``--ckpt_path last``. It passes when the launch names every damaged file it passed over in exactly one
log line, starts training at the step of the newest intact checkpoint and finishes at max_steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.faults import (  # noqa: E402
    MAX_STEPS,
    MOMENTS,
    REGIONS,
    corrupt_in_place,
    fit_command,
    kill_at_random_moment,
    plain_env,
    probed_step,
    start,
    start_resume,
)
from zigma_lightning.checkpoint_io import CorruptCheckpointError, verify_checkpoint  # noqa: E402

CORRUPTION_STEPS = 6  # the run that corruption trials damage: checkpoints at steps 1..6 and last.ckpt


def _load_step(path: Path) -> int | None:
    """Global step of a checkpoint, or None when it fails verify_checkpoint (CRC-32s, weights_only load)."""
    try:
        return int(verify_checkpoint(path)["global_step"])
    except (CorruptCheckpointError, OSError):
        return None


def _corrupt(runs: Path) -> set[Path]:
    return {p for p in runs.rglob("*.ckpt") if _load_step(p) is None}


def newest_step(runs: Path) -> int:
    """The step ``--ckpt_path last`` can resume from: the highest of the checkpoints that load (0: none)."""
    return max((s for p in runs.rglob("*.ckpt") if (s := _load_step(p)) is not None), default=0)


def trial(index: int, work: Path, rng: random.Random, max_kills: int) -> dict:
    """One trial: 1..max_kills kills with a relaunch after each, then a launch that runs to the end."""
    work.mkdir(parents=True)
    runs = work / "runs"
    launches, corrupt_seen = [], set()
    for i in range(rng.randint(1, max_kills)):
        outcome = kill_at_random_moment(runs, work / f"launch{i}.log", work / f"probe{i}.pt", rng.choice(MOMENTS), rng)
        outcome["killed"] = "rc" not in outcome
        launches.append(outcome)
        if not outcome["killed"]:
            break  # it ran to the end
        corrupt_seen |= _corrupt(runs)
        outcome["resumable"] = newest_step(runs)
        outcome["lost"] = max(0, outcome["progress"] - outcome["resumable"])
    if launches[-1]["killed"]:
        i = len(launches)
        proc = start_resume(runs, work / f"launch{i}.log", work / f"probe{i}.pt")
        launches.append({"moment": None, "killed": False, "rc": proc.wait()})
    # the launch after a kill must resume from the newest checkpoint that loads
    for i, outcome in enumerate(launches[:-1]):
        outcome["resumed"] = probed_step(work / f"probe{i + 1}.pt")
    kills = [o for o in launches if o["killed"]]
    wrong_resume = sum(k["resumed"] not in (None, k["resumable"]) for k in kills)
    corrupt_seen |= _corrupt(runs)
    lasts = [_load_step(p) for p in runs.rglob("last.ckpt")]
    final_log = (work / f"launch{len(launches) - 1}.log").read_text()
    finished = launches[-1]["rc"] == 0 and f"`max_steps={MAX_STEPS}` reached" in final_log
    survived = finished and MAX_STEPS in lasts and not corrupt_seen and not wrong_resume
    return {"trial": index, "kills": kills, "survived": survived, "corrupt": sorted(map(str, corrupt_seen)),
            "wrong_resume": wrong_resume, "leftover_tmp": len(list(runs.rglob(".*.tmp")))}  # fmt: skip


def corruption_trial(index: int, base: Path, work: Path, rng: random.Random) -> dict:
    """Copy the trained run ``base``, damage its 1..3 newest checkpoints in place, resume with ``--ckpt_path last``."""
    work.mkdir(parents=True)
    runs = work / "runs"
    shutil.copytree(base, runs)
    newest_first = sorted(runs.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    damaged = {}
    for path in newest_first[: rng.randint(1, 3)]:
        region = rng.choice(REGIONS)
        corrupt_in_place(path, region, rng)
        damaged[path] = region
    expected = next(_load_step(p) for p in newest_first if p not in damaged)
    proc = start_resume(runs, work / "launch.log", work / "probe.pt")
    rc = proc.wait()
    text = (work / "launch.log").read_text()
    lines = text.splitlines()
    named = {path: sum(f"skipping corrupt checkpoint {path}: " in line for line in lines) for path in damaged}
    resumed = probed_step(work / "probe.pt")
    finished = rc == 0 and f"`max_steps={MAX_STEPS}` reached" in text
    return {"trial": index, "damaged": {p.name: r for p, r in damaged.items()}, "expected": expected,
            "resumed": resumed, "named_once": all(n == 1 for n in named.values()), "finished": finished,
            "passed": finished and resumed == expected and all(n == 1 for n in named.values())}  # fmt: skip


def run_corruption_trials(count: int, work: Path, rng: random.Random) -> list[dict]:
    if count == 0:
        return []
    base = work / "corruption_base"
    proc = start(fit_command(base, "--trainer.max_steps", str(CORRUPTION_STEPS)), work / "corruption_base.log",
                 plain_env())  # fmt: skip
    if proc.wait() != 0:
        raise SystemExit(f"the run to corrupt failed: see {work / 'corruption_base.log'}")
    results = []
    for i in range(count):
        result = corruption_trial(i, base, work / f"corrupt{i:02d}", rng)
        results.append(result)
        damage = ", ".join(f"{name} ({region})" for name, region in result["damaged"].items())
        print(f"corruption trial {i:2d}: {'passed' if result['passed'] else 'FAILED'}; damaged {damage}; resumed at "
              f"step {result['resumed']} (newest intact: {result['expected']})", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kills", type=int, default=3, help="kills per trial are drawn from 1..max-kills")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs here (default: a deleted temp dir)")
    parser.add_argument("--corruption-trials", type=int, default=5, help="in-place corruption trials (issue 13)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        results = []
        for i in range(args.trials):
            result = trial(i, work / f"trial{i:02d}", rng, args.max_kills)
            results.append(result)
            detail = ", ".join(f"{k['moment']}@{k['at_s']:.1f}s step {k['progress']}->{k['resumable']}"
                               + (" (in a write)" if k["torn"] else "") for k in result["kills"])  # fmt: skip
            print(f"trial {i:2d}: {'survived' if result['survived'] else 'FAILED'}; {detail}", flush=True)
        elapsed = time.monotonic() - started
        corruption_started = time.monotonic()
        corruptions = run_corruption_trials(args.corruption_trials, work, rng)
        corruption_elapsed = time.monotonic() - corruption_started

    kills = [k for r in results for k in r["kills"]]
    lost = [k["lost"] for k in kills]
    by_moment = ", ".join(f"{m} {sum(k['moment'] == m for k in kills)}" for m in MOMENTS)
    print()
    print(f"SIGKILL fault injection: {platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"lightning {lightning.__version__}, commit {commit.stdout.strip() or '?'}, "
          f"{datetime.date.today().isoformat()}, seed {args.seed}, {MAX_STEPS} steps per trial, "
          "a checkpoint every step")  # fmt: skip
    print()
    checked = [k for k in kills if k["resumed"] is not None]
    print("| trials | kills | kills inside a checkpoint write | survived | corrupt checkpoints found "
          "| resumed at the newest loadable step | steps lost (total / mean / max per kill) | leftover .tmp files "
          "| wall time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(results)} | {len(kills)} ({by_moment}) | {sum(bool(k['torn']) for k in kills)} "
          f"| {sum(r['survived'] for r in results)}/{len(results)} | {sum(len(r['corrupt']) for r in results)} "
          f"| {sum(k['resumed'] == k['resumable'] for k in checked)}/{len(checked)} "
          f"| {sum(lost)} / {sum(lost) / max(1, len(lost)):.2f} / {max(lost, default=0)} "
          f"| {sum(r['leftover_tmp'] for r in results)} | {elapsed:.0f} s |")  # fmt: skip
    if corruptions:
        regions = [region for c in corruptions for region in c["damaged"].values()]
        print()
        print(f"In-place corruption ({CORRUPTION_STEPS}-step run, 64 bytes overwritten per damaged checkpoint):")
        print()
        print("| trials | damaged checkpoints (by region) | passed | each damaged file named in one line "
              "| resumed at the newest intact step | wall time |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        print(f"| {len(corruptions)} | {len(regions)} ({', '.join(f'{r} {regions.count(r)}' for r in REGIONS)}) "
              f"| {sum(c['passed'] for c in corruptions)}/{len(corruptions)} "
              f"| {sum(c['named_once'] for c in corruptions)}/{len(corruptions)} "
              f"| {sum(c['resumed'] == c['expected'] for c in corruptions)}/{len(corruptions)} "
              f"| {corruption_elapsed:.0f} s |")  # fmt: skip
    if not all(r["survived"] for r in results) or not all(c["passed"] for c in corruptions):
        sys.exit(1)


if __name__ == "__main__":
    main()
