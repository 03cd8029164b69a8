"""Quickstart benchmark: wall time of ``python cli.py fit --config configs/quickstart.yaml`` (the README's first
command after installation), mean training samples/s and the final validation loss, read back from TensorBoard.

    python benchmarks/quickstart.py                      # prints a table
    python benchmarks/quickstart.py --save-grid docs/quickstart_samples.png

Target (issue 4): <= 5 minutes on a 2-core CPU, with EMA samples that are recognisably faces.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-grid", type=Path, help="write the last EMA sample grid to this PNG")
    parser.add_argument("extra", nargs="*", help="extra cli.py arguments, e.g. --trainer.max_steps=100")
    args = parser.parse_args()

    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml"]
        cmd += ["--trainer.logger.init_args.save_dir", tmp, "--trainer.enable_progress_bar", "false", *args.extra]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        run = next(Path(tmp).glob("*/version_*"))
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        throughput = [e.value for e in acc.Scalars("train/device/samples_per_sec")]
        val = acc.Scalars("val/loss")
        steps = acc.Scalars("train/loss")[-1].step + 1
        grids = acc.Images("samples/ema")
        if args.save_grid and grids:
            args.save_grid.parent.mkdir(parents=True, exist_ok=True)
            args.save_grid.write_bytes(grids[-1].encoded_image_string)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"# quickstart fit, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {commit.strip()}")  # fmt: skip
    print("| steps | wall time (s) | train samples/s (mean) | final val/loss (EMA) | target <= 300 s |")
    print("|---|---|---|---|---|")
    mean_tp = sum(throughput) / len(throughput) if throughput else float("nan")
    print(f"| {steps} | {wall:.0f} | {mean_tp:.1f} | {val[-1].value:.4f} | {'MET' if wall <= 300 else 'NOT MET'} |")


if __name__ == "__main__":
    main()
