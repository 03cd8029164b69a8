"""Helpers for CLI subprocess tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ["--config", "configs/quickstart.yaml", "--config", "tests/e2e/tiny.yaml"]


def tensorboard_scalars(runs: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the (single) TensorBoard run under ``runs`` -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = {p.parent for p in runs.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_cli(*args: str, runs: Path, check: bool = True, timeout: int = 600, env: dict | None = None):
    """``python cli.py <args>`` from the repository root, logging under ``runs``."""
    cmd = [sys.executable, "cli.py", *args]
    if args and args[0] in ("fit", "validate", "test", "predict") and "--print_config" not in args:
        cmd += ["--trainer.logger.init_args.save_dir", str(runs)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def main_in_process(*args: str, runs: Path, env: dict[str, str] | None = None):
    """``cli.main(args)`` in this process, logging under ``runs`` like :func:`run_cli`, meanwhile without SLURM
    variables (CI may itself run under SLURM) and with ``env`` set.

    For runs that only produce what a test reads afterwards (checkpoints, probes, TensorBoard files): it skips the
    interpreter start-up and imports a subprocess pays (~10 s on a loaded 2-core machine). Keep subprocesses for what
    a separate process proves (signals, kills, SLURM, DDP, exit statuses, console output)."""
    import cli

    with mock.patch.dict(os.environ):
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            del os.environ[key]
        os.environ.update(env or {})
        return cli.main([*args, "--trainer.logger.init_args.save_dir", str(runs)])


class StateProbe(L.Callback):
    """Saves what the trainer holds when training starts (after any resume) to $ZIGMA_STATE_PROBE."""

    def on_train_start(self, trainer, pl_module) -> None:
        path = os.environ.get("ZIGMA_STATE_PROBE")
        if path:
            torch.save({
                "global_step": trainer.global_step,
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            }, path)  # fmt: skip
