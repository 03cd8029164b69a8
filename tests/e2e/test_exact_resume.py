"""Exact resume through cli.py on CPU: a run interrupted mid-epoch (SIGKILL after a step checkpoint, or the SLURM
SIGUSR1 path) and resumed ends bit-for-bit where the uninterrupted run ends (raw and EMA weights, AdamW state), and
its training batches, step by step, are the uninterrupted run's (no batch repeated or skipped).

Runs that are neither killed nor under SLURM (the uninterrupted reference, the resume after SIGKILL) use ``cli.main``
in-process; the others are subprocesses.

Also: a resume on latent shards whose global batch ``data.keep_global_batch`` cannot keep stops with one line.

Setup: the tiny quickstart model, 100 faces in batches of 16 (6 batches per epoch, 4 faces dropped), N = 10 steps,
so every run crosses the epoch boundary after step 6; checkpoints after every step; validation every 4 steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import QUICKSTART, ROOT, main_in_process, run_cli
from tests.e2e.probes import by_step, load, loader_state, max_differences, read_batches

pytestmark = pytest.mark.slow

N_STEPS = 10
BATCHES_PER_EPOCH = 6
EXACT = """
trainer:
  max_steps: 10
  val_check_interval: 4
  limit_val_batches: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 1
        save_last: true
        save_top_k: -1
        filename: "step{step:06d}"
        auto_insert_metric_name: false
data:
  init_args:
    batch_size: 16
    repeats: 1
"""
STEP_CHECKPOINTS = """
trainer:
  callbacks:  # a checkpoint after every step, mid-epoch (Lightning's train-end save would close the epoch)
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 1
        save_last: true
"""
PROBE = "--trainer.callbacks+=tests.e2e.probes.BatchProbe"
SLURM_JOB = "4242"


def fit_args(tmp: Path) -> list[str]:
    config = tmp / "exact.yaml"
    config.write_text(EXACT)
    return ["fit", *QUICKSTART, "--config", str(config), PROBE]


def start_cli(args: list[str], runs: Path, env: dict, log: Path) -> subprocess.Popen:
    """``python cli.py <args>`` like ``run_cli``, but in the background (output to ``log``)."""
    cmd = [sys.executable, "cli.py", *args, "--trainer.logger.init_args.save_dir", str(runs)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared (rc={proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_batches_continue(before: list[dict], after: list[dict], reference: list[dict], resume_step: int) -> None:
    """The interrupted run's batches up to ``resume_step`` then the resumed run's equal the reference, step by step."""
    ref = by_step(reference)
    assert sorted(ref) == list(range(N_STEPS))
    first, second = by_step(before), by_step(after)
    assert sorted(second) == list(range(resume_step, N_STEPS)), "the resumed run must start at the resume step"
    union = {**{s: r for s, r in first.items() if s < resume_step}, **second}
    assert sorted(union) == list(range(N_STEPS))
    for step in range(N_STEPS):
        assert union[step] == ref[step], f"step {step}: batch differs from the uninterrupted run"
    for step, record in first.items():  # what the interrupted run saw (also past its last checkpoint) agrees too
        assert record == ref[step], f"interrupted run, step {step}"


def report(name: str, diffs: dict[str, float]) -> None:
    print(f"{name}: max |Δ| " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) <= 1e-6, diffs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(a) N steps in one go: (final last.ckpt, batch records)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    main_in_process(*fit_args(tmp), runs=tmp / "runs", env={"ZIGMA_BATCH_PROBE": str(tmp / "batches")})
    final = load(tmp / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == N_STEPS
    assert loader_state(final)["epoch"] == 1 and loader_state(final)["batches_done"] == N_STEPS - BATCHES_PER_EPOCH
    return final, read_batches(tmp / "batches")


def test_sigkill_after_a_mid_epoch_checkpoint_then_resume_last_is_exact(uninterrupted, tmp_path):
    """(b) Killed (SIGKILL) right after the step-4 checkpoint, inside step 5; ``--ckpt_path last`` finishes the run."""
    reference, reference_batches = uninterrupted
    k, runs = 4, tmp_path / "runs"
    env = {"ZIGMA_BATCH_PROBE": str(tmp_path / "first"), "ZIGMA_PROBE_PAUSE": f"start:{k}"}
    proc = start_cli(fit_args(tmp_path), runs, env, tmp_path / "first.log")
    wait_for(tmp_path / "first.paused", proc, tmp_path / "first.log")
    checkpoints = runs / "quickstart" / "version_0" / "checkpoints"
    assert (checkpoints / f"step{k:06d}.ckpt").is_file() and not (checkpoints / f"step{k + 1:06d}.ckpt").exists()
    kill(proc)
    saved = load(checkpoints / "last.ckpt")
    assert saved["global_step"] == k
    assert loader_state(saved)["epoch"] == 0 and loader_state(saved)["batches_done"] == k  # mid-epoch

    main_in_process(*fit_args(tmp_path), "--ckpt_path", "last", runs=runs,
                    env={"ZIGMA_BATCH_PROBE": str(tmp_path / "second")})  # fmt: skip
    final = load(checkpoints / "last.ckpt")
    assert final["global_step"] == N_STEPS
    assert loader_state(final) == loader_state(reference)
    assert_batches_continue(read_batches(tmp_path / "first"), read_batches(tmp_path / "second"), reference_batches, k)
    report("sigkill+resume", max_differences(final, reference))


def slurm_env(tmp: Path) -> dict[str, str]:
    """A simulated one-task SLURM allocation. The stand-in ``scontrol`` records its arguments and then kills its
    caller (SIGKILL), as SLURM ends a job it requeues; without that the run would go on writing newer step
    checkpoints."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{tmp}/scontrol.args"\nkill -KILL "$PPID"\nexit 0\n')
    scontrol.chmod(0o755)
    return {
        "SLURM_JOB_ID": SLURM_JOB, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "zigma",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODELIST": "localhost", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip


def slurm_preempt_and_requeue(tmp: Path, pause: str) -> tuple[dict, list[dict], list[dict], int]:
    """Run under simulated SLURM, pause at ``pause``, send SIGUSR1 and let the run go on until the requeue call
    kills it, then rerun with the same environment. Returns (final checkpoint, batches before, batches after,
    resume step)."""
    env = slurm_env(tmp)
    runs = tmp / "runs"
    run_dir = runs / "quickstart" / f"slurm_{SLURM_JOB}"
    proc = start_cli(fit_args(tmp), runs, {**env, "ZIGMA_BATCH_PROBE": str(tmp / "first"), "ZIGMA_PROBE_PAUSE": pause},
                     tmp / "first.log")  # fmt: skip
    wait_for(tmp / "first.paused", proc, tmp / "first.log")
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)  # Lightning's handler runs at once, inside the probe's pause
    (tmp / "first.release").touch()  # let the run go on, as a real one would (a deferring handler saves later)
    proc.wait(timeout=180)  # killed by scontrol, after the checkpoint was written
    assert proc.returncode == -signal.SIGKILL, (tmp / "first.log").read_text()[-4000:]
    assert (tmp / "scontrol.args").read_text().split() == ["requeue", SLURM_JOB]
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"]
    resume_step = load(hpc[0])["global_step"]

    second = run_cli(*fit_args(tmp), runs=runs, env={**env, "ZIGMA_BATCH_PROBE": str(tmp / "second")})
    assert f"resumes from {hpc[0]}" in second.stdout + second.stderr
    final = load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == N_STEPS
    return final, read_batches(tmp / "first"), read_batches(tmp / "second"), resume_step


def test_slurm_sigusr1_between_steps_then_requeued_run_is_exact(uninterrupted, tmp_path):
    """(c) SIGUSR1 arrives between steps 3 and 4 (the probe holds the process in on_train_batch_end of step 3):
    Lightning writes hpc_ckpt_1.ckpt and calls ``scontrol requeue``; the rerun resumes from it by itself."""
    reference, reference_batches = uninterrupted
    final, before, after, resume_step = slurm_preempt_and_requeue(tmp_path, pause="end:3")
    assert resume_step == 3
    assert_batches_continue(before, after, reference_batches, resume_step)
    report("slurm sigusr1 between steps", max_differences(final, reference))


def test_slurm_sigusr1_inside_a_step_then_requeued_run_is_exact(uninterrupted, tmp_path):
    """(c') The usual case on a cluster: SIGUSR1 lands inside a step (here after step 4's batch was fetched).
    Lightning alone would save mid-step and skip a batch on resume; callbacks.slurm.StepBoundaryRequeue defers the
    save to the step boundary."""
    reference, reference_batches = uninterrupted
    final, before, after, resume_step = slurm_preempt_and_requeue(tmp_path, pause="start:4")
    assert_batches_continue(before, after, reference_batches, resume_step)
    report("slurm sigusr1 inside a step", max_differences(final, reference))


def test_shards_resume_that_cannot_keep_the_global_batch_stops_with_one_line(tmp_path, capsys):
    """Through ``cli.main`` (in-process) on latent shards: 2 steps of batch 4, then a resume with ``data.batch_size=3``
    and ``data.keep_global_batch``: no whole accumulation turns 3 into 4, so one ``error:`` line naming the fields
    and exit 1, before any step. (Kept global batches: ``tests/e2e/test_ddp.py`` resumes a 2-process checkpoint on 1
    process; ``tests/datamodules/test_webdataset_resume.py``.)"""
    from tests.datamodules.conftest import write_shards
    from tests.e2e.helpers import main_in_process

    shards = write_shards(tmp_path / "shards", [8, 8, 8, 8], latent_shape=(4, 8, 8))
    every_step = tmp_path / "every_step.yaml"
    every_step.write_text(STEP_CHECKPOINTS)

    def fit(runs: Path, batch: int, steps: int, *extra: str):
        return main_in_process("fit", "--config", "tests/e2e/shards.yaml", "--config", str(every_step),
                               "--data", "datamodules.WebDataModule",
                               "--data.init_args.shards", str(Path(shards[0]).parent), "--data.init_args.latent_scale",
                               "1", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", str(batch),
                               "--trainer.max_steps", str(steps), *extra, runs=runs)  # fmt: skip

    fit(tmp_path / "runs", 4, 2)
    checkpoint = tmp_path / "runs" / "shards" / "version_0" / "checkpoints" / "last.ckpt"
    assert loader_state(load(checkpoint))["batches_done"] == 2  # mid-epoch
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path / "refused", 3, 3, "--data.init_args.keep_global_batch", "true", "--ckpt_path", str(checkpoint))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 1 and "Traceback" not in err
    assert errors == [
        "error: data.keep_global_batch=true: the checkpoint's global batch 1 processes x data.batch_size 4 x "
        "trainer.accumulate_grad_batches 1 = 4 is not a multiple of 1 processes x data.batch_size 3 = 3; choose a "
        "data.batch_size (or process count) whose product divides it, or set data.keep_global_batch=false"
    ]
    assert not (tmp_path / "refused" / "shards" / "version_0" / "checkpoints").exists()  # no step ran
