"""Preemption and crashes (issue 7): SLURM requeue simulated in subprocesses, crash-safe checkpoint files, and SIGKILL
fault injection.

SLURM is simulated with the variables ``srun`` sets for one task and a stand-in ``scontrol`` first on ``PATH`` that
records its arguments. The test plays slurmctld: SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``), SIGTERM once the job has
asked to be requeued, then the same command again as the requeued job. ``PauseAt`` holds the training loop at a known
point while a signal is sent, so every run takes the same path.

What happens on SIGUSR1 under ``SLURMEnvironment(auto_requeue=True)``: Lightning 2.6's handler
(``pytorch/trainer/connectors/signal_connector.py``) finalizes the loggers (the TensorBoard writer is closed and
reopens a second event file at its next point), saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, runs ``scontrol
requeue $SLURM_JOB_ID`` and carries on training. Run from the signal handler, the save lands wherever the step is; a
signal after the next batch was fetched records the loader and batch progress one batch ahead of the weights, and the
requeued job then skips that batch and logs every step one too high. cli.py's ``StepBoundaryRequeue``
(``callbacks/slurm.py``) runs the handler at the end of the step instead
(``test_sigusr1_inside_a_step_still_resumes_exactly`` fails without it). SIGTERM sets ``trainer.received_sigterm``;
the step in flight finishes (with its ``ModelCheckpoint`` save, if one is due) and ``SIGTERMException`` (a
``SystemExit``) ends the process with status 0.

TensorBoard: the steps the first job trained after the checkpoint the requeued job resumes from are written twice to
the event files, once by each job (with the same values: the resume is exact). cli.py opens the resumed run's
``SummaryWriter`` with ``purge_step`` = the checkpoint's step, so TensorBoard hides the first job's points from that
step on: as TensorBoard reads the run, every step 0..max_steps-1 appears exactly once, and the re-done steps show the
requeued job's values.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.e2e.faults import (
    FAULTS,
    MAX_STEPS,
    corrupt_in_place,
    fit_command,
    kill_at_random_moment,
    plain_env,
    probed_step,
    start,
)
from tests.e2e.helpers import main_in_process
from zigma_lightning import cli, resume
from zigma_lightning.checkpoint_io import (
    AtomicCheckpointIO,
    atomic_torch_save,
    remove_stale_temporaries,
    verify_checkpoint,
)

JOB = "4242"
FINISHED = "`Trainer.fit` stopped: `max_steps="


# --------------------------------------------------------------------------------------------------------- helpers
def slurm_env(job_id: str, bin_dir: Path, ntasks: int = 1, **extra: str) -> dict[str, str]:
    """What ``srun`` exports to one task of a one-node job (SLURMEnvironment reads these), and the fake scontrol."""
    return plain_env(
        SLURM_JOB_ID=job_id, SLURM_JOB_NAME="zigma",  # job names "bash"/"interactive" switch detection off
        SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1",
        SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SCONTROL_LOG=str(bin_dir / "scontrol.log"), **extra,
    )  # fmt: skip


def fake_scontrol(directory: Path) -> Path:
    """A ``scontrol`` that appends its arguments to $SCONTROL_LOG and succeeds; returns its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "scontrol"
    script.write_text('#!/bin/sh\nprintf \'%s\\n\' "$*" >> "$SCONTROL_LOG"\nexit 0\n')
    script.chmod(0o755)
    return directory


def run(cmd: list[str], log: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run ``cmd`` to completion; returns its output, fails the test on a non-zero status."""
    proc = start(cmd, log, env)
    rc = proc.wait(timeout=timeout)
    text = log.read_text()
    assert rc == 0, f"{' '.join(cmd)} failed ({rc}):\n{text[-4000:]}"
    return text


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180, what: str = "", kill: bool = True) -> None:
    """Poll ``condition()`` while ``proc`` runs; fail if it exits first or ``timeout`` passes (killing it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            if kill:
                proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def global_step(path: Path) -> int:
    """``global_step`` of a checkpoint that must be intact (CRC-32s) and load with ``weights_only=True``."""
    return int(verify_checkpoint(path)["global_step"])


def checkpoint_steps(root: Path) -> dict[Path, int]:
    """Every ``*.ckpt`` under ``root`` -> its global step (all of them must load)."""
    return {path: global_step(path) for path in sorted(root.rglob("*.ckpt"))}


def loss_points_by_process(run_dir: Path) -> dict[int, list[tuple[float, int, float]]]:
    """``train/loss`` points (wall_time, step, value) of each writing process, read per event file.

    Event files are named ``events.out.tfevents.<time>.<host>.<pid>.<n>``; one process writes several when its writer
    is closed and reopened (Lightning finalizes the loggers on SIGUSR1).
    """
    points: dict[int, list[tuple[float, int, float]]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        pid = int(path.name.rsplit(".", 2)[1])
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            points.setdefault(pid, []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars("train/loss"))
    return {pid: sorted(p) for pid, p in points.items()}


# ----------------------------------------------------------------------------------- crash-safe checkpoint files
def test_atomic_save_failure_keeps_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.arange(4)}, target)
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # a torn write ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"global_step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    previous = torch.load(target, weights_only=True)
    assert previous["global_step"] == 1 and torch.equal(previous["w"], torch.arange(4))


def test_atomic_checkpoint_io_failure_in_fsync_or_rename_keeps_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "step000001.ckpt"
    io.save_checkpoint({"global_step": 1}, target)
    for name in ("fsync", "replace"):

        def fail(*args, _name=name):
            raise OSError(f"{_name} failed")

        with monkeypatch.context() as patch:
            patch.setattr(os, name, fail)
            with pytest.raises(OSError, match=f"{name} failed"):
                io.save_checkpoint({"global_step": 2}, target)
        assert sorted(p.name for p in target.parent.iterdir()) == ["step000001.ckpt"]
        assert global_step(target) == 1
    io.save_checkpoint({"global_step": 3}, target)
    assert global_step(target) == 3 and sorted(p.name for p in target.parent.iterdir()) == ["step000001.ckpt"]


def test_stale_temporaries_are_removed_at_the_next_save_and_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / ".last.ckpt.abc123.tmp", tmp_path / ".last.ckpt.def456.tmp"
    stale.write_bytes(b"torn write of a killed process")
    fresh.write_bytes(b"possibly another writer, in progress")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    AtomicCheckpointIO().save_checkpoint({"global_step": 5}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.def456.tmp", "last.ckpt"]
    remove_stale_temporaries(tmp_path, older_than=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_find_resume_checkpoint_prefers_newest_loadable_of_hpc_and_last(tmp_path, caplog):
    run_dir = tmp_path / "slurm_7"
    files = {"checkpoints/step000002.ckpt": 2, "checkpoints/last.ckpt": 2, "hpc_ckpt_1.ckpt": 3}
    for i, (name, step) in enumerate(files.items()):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {}, "global_step": step}, run_dir / name)
        os.utime(run_dir / name, (1000 + i, 1000 + i))
    assert resume.find_resume_checkpoint(tmp_path) == run_dir / "hpc_ckpt_1.ckpt"  # newer than last.ckpt: hpc wins
    newest = run_dir / "hpc_ckpt_2.ckpt"
    newest.write_bytes(b"\x00" * 100)  # a torn or garbage newest file
    with caplog.at_level("WARNING", logger="zigma.cli"):
        assert resume.find_resume_checkpoint(tmp_path) == run_dir / "hpc_ckpt_1.ckpt"
    assert [r.getMessage().startswith(f"skipping corrupt checkpoint {newest}: ") for r in caplog.records] == [True]


@pytest.mark.slow
def test_corrupt_newest_checkpoints_are_reported_and_resume_uses_previous_good(tmp_path):
    """last.ckpt overwritten in place inside tensor data (same size; torch.load reads it without complaint), step 4
    overwritten in its pickle, step 3 truncated mid-write, step 2 garbage (all newer than step 1 now): the resume names
    each once with the reason and starts from step 1, the newest intact checkpoint."""
    runs = tmp_path / "runs"
    main_in_process("fit", *FAULTS, "--trainer.max_steps", "4", runs=runs)
    ckpts = runs / "quickstart" / "version_0" / "checkpoints"
    last, step4, step3, step2 = (ckpts / n for n in ("last.ckpt", "step000004.ckpt", "step000003.ckpt",
                                                     "step000002.ckpt"))  # fmt: skip
    rng = random.Random(0)
    corrupt_in_place(last, "tensor data", rng)
    assert torch.load(last, weights_only=True)["global_step"] == 4  # the old "does it load" check trusted this
    corrupt_in_place(step4, "pickle", rng)
    step3.write_bytes(step3.read_bytes()[: step3.stat().st_size // 2])  # truncated mid-write
    step2.write_bytes(os.urandom(4096))  # garbage
    probe = tmp_path / "probe.pt"
    out = run(fit_command(runs, "--ckpt_path", "last", "--trainer.max_steps", "6",
                          "--trainer.callbacks+=tests.e2e.helpers.StateProbe"),
              tmp_path / "resume.log", plain_env(ZIGMA_STATE_PROBE=str(probe)))  # fmt: skip
    reasons = {last: "CRC-32 mismatch in archive/data/", step4: "CRC-32 mismatch in archive/data.pkl",
               step3: "not a readable zip archive", step2: "not a readable zip archive"}  # fmt: skip
    for bad, reason in reasons.items():
        lines = [line for line in out.splitlines() if str(bad) in line]
        assert len(lines) == 1 and lines[0].startswith(f"WARNING zigma.cli: skipping corrupt checkpoint {bad}: "
                                                       f"{reason}"), lines  # fmt: skip
    assert f"ckpt_path=last -> {ckpts / 'step000001.ckpt'}" in out
    assert torch.load(probe, weights_only=True)["global_step"] == 1
    # Lightning's ModelCheckpoint does not overwrite a last.ckpt that the checkpoint it resumed from did not know
    # (step 1 was saved before the first last.ckpt): it writes last-v1.ckpt and leaves the damaged file in place
    newest_last = max(ckpts.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert global_step(newest_last) == 6


# ------------------------------------------------------------------------------------------ SLURM requeue, simulated
class PauseAt(L.Callback):
    """Test probe: holds the training loop at known points so signals land there, not at a random instruction.

    $ZIGMA_PAUSE is a comma-separated list of ``end:<step>`` (``on_train_batch_end`` once step ``step`` is done,
    before ``ModelCheckpoint``, which Lightning runs last) and ``start:<step>`` (``on_train_batch_start`` while
    ``global_step == step``: the next batch is fetched, its step not yet taken). At each it writes
    ``$ZIGMA_PAUSE_DIR/paused-<point>`` and sleeps until ``go-<point>`` exists or SIGTERM was received (signal
    handlers run during the sleep).
    """

    def _pause(self, trainer, point: str) -> None:
        if point not in os.environ.get("ZIGMA_PAUSE", "").split(","):
            return
        directory = Path(os.environ["ZIGMA_PAUSE_DIR"])
        (directory / f"paused-{point}").touch()
        deadline = time.monotonic() + 120
        while not (directory / f"go-{point}").exists() and not trainer.received_sigterm:
            assert time.monotonic() < deadline, f"PauseAt: nobody released {point}"
            time.sleep(0.02)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._pause(trainer, f"start:{trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._pause(trainer, f"end:{trainer.global_step}")


def requeue_cycle(tmp: Path, job: str, usr1_at: str, term_at: str, every_n_steps: int) -> dict:
    """Job ``job`` gets SIGUSR1 at ``usr1_at`` (a PauseAt point) and, once it asked scontrol to requeue it, SIGTERM
    at ``term_at``; then the requeued job (same command and job id) runs to the end. Returns what both left."""
    runs, bin_dir = tmp / "runs", fake_scontrol(tmp / "bin")
    run_dir = runs / "quickstart" / f"slurm_{job}"
    scontrol_log = bin_dir / "scontrol.log"
    cmd = fit_command(runs, "--trainer.callbacks.init_args.every_n_train_steps", str(every_n_steps),
                      "--trainer.callbacks+=tests.e2e.test_slurm_faults.PauseAt",
                      "--trainer.callbacks+=tests.e2e.helpers.StateProbe")  # fmt: skip
    pause = {"ZIGMA_PAUSE": f"{usr1_at},{term_at}", "ZIGMA_PAUSE_DIR": str(tmp)}
    first = start(cmd, tmp / "job1.log", slurm_env(job, bin_dir, **pause))
    wait_until((tmp / f"paused-{usr1_at}").is_file, first, what=usr1_at)
    first.send_signal(signal.SIGUSR1)  # SLURM: --signal=SIGUSR1@90
    # Lightning's own handler requeues at once (during the pause); cli.py's StepBoundaryRequeue at the step's end
    with contextlib.suppress(AssertionError):
        wait_until(scontrol_log.is_file, first, timeout=1, what="", kill=False)
    (tmp / f"go-{usr1_at}").touch()
    wait_until(scontrol_log.is_file, first, timeout=60, what="scontrol requeue")
    wait_until((tmp / f"paused-{term_at}").is_file, first, what=term_at)
    first.send_signal(signal.SIGTERM)  # slurmctld stops the job it requeued
    first_rc = first.wait(timeout=120)
    candidates = checkpoint_steps(run_dir)  # what the requeued job may resume from; all must load

    probe = tmp / "probe.pt"
    started = time.time()
    second = start(cmd, tmp / "job2.log", slurm_env(job, bin_dir, ZIGMA_STATE_PROBE=str(probe)))
    second_rc = second.wait(timeout=300)
    return {
        "runs": runs, "run_dir": run_dir, "bin_dir": bin_dir, "first_rc": first_rc, "second_rc": second_rc,
        "first_pid": first.pid, "second_pid": second.pid, "candidates": candidates, "started": started,
        "log1": (tmp / "job1.log").read_text(), "log2": (tmp / "job2.log").read_text(),
        "resumed_step": int(torch.load(probe, weights_only=True)["global_step"]) if probe.is_file() else None,
        "versions": sorted(p.name for p in (runs / "quickstart").iterdir()),
    }  # fmt: skip


@pytest.fixture(scope="module")
def requeued(tmp_path_factory):
    """SIGUSR1 after step 5 (hpc_ckpt_1 at step 5, newer than step000004/last), SIGTERM after step 7 (no checkpoint
    due), so the requeued job resumes from the hpc checkpoint and re-does steps 5 and 6."""
    return requeue_cycle(tmp_path_factory.mktemp("slurm"), JOB, usr1_at="end:5", term_at="end:7", every_n_steps=4)


@pytest.mark.slow
def test_sigusr1_saves_hpc_checkpoint_requeues_and_exits(requeued):
    r = requeued
    assert r["first_rc"] == 0, r["log1"][-3000:]  # SIGTERMException is a SystemExit: the job ends cleanly
    assert "Handling auto-requeue signal" in r["log1"] and "Bypassing SIGTERM" in r["log1"]
    hpc = {p.name: s for p, s in r["candidates"].items() if p.parent == r["run_dir"] and "hpc" in p.name}
    assert hpc == {"hpc_ckpt_1.ckpt": 5}
    assert (r["bin_dir"] / "scontrol.log").read_text().splitlines() == [f"requeue {JOB}"]


@pytest.mark.slow
def test_requeued_job_resumes_from_newest_good_checkpoint_and_finishes(requeued):
    r = requeued
    assert r["second_rc"] == 0, r["log2"][-3000:]
    found = re.search(rf"SLURM job slurm_{JOB} resumes from (\S+)", r["log2"])
    assert found, r["log2"][-3000:]
    assert Path(found.group(1)) == r["run_dir"] / "hpc_ckpt_1.ckpt"  # newer than last.ckpt (step 4)
    assert r["resumed_step"] == 5 == max(r["candidates"].values())
    assert FINISHED + f"{MAX_STEPS}` reached" in r["log2"]
    assert global_step(r["run_dir"] / "checkpoints" / "last.ckpt") == MAX_STEPS


@pytest.mark.slow
def test_requeued_job_writes_same_tensorboard_run_and_rewrites_config(requeued):
    r = requeued
    assert r["versions"] == [f"slurm_{JOB}"]  # no version_0 / second directory
    assert r["second_pid"] in loss_points_by_process(r["run_dir"])
    config = r["run_dir"] / "config.yaml"
    assert config.stat().st_mtime >= r["started"] and "already exists" not in r["log2"]


@pytest.mark.slow
def test_tensorboard_loss_covers_every_step_once_per_job(requeued):
    r = requeued
    by_pid = loss_points_by_process(r["run_dir"])
    assert sorted(by_pid) == sorted([r["first_pid"], r["second_pid"]])
    first = [step for _, step, _ in by_pid[r["first_pid"]]]
    second = [step for _, step, _ in by_pid[r["second_pid"]]]
    assert first == list(range(7))  # each step once, in order, until SIGTERM ended step 7 (logged as 6)
    assert second == list(range(5, MAX_STEPS))  # from the hpc checkpoint at step 5
    first_values = {step: value for _, step, value in by_pid[r["first_pid"]]}
    second_values = {step: value for _, step, value in by_pid[r["second_pid"]]}
    redone = sorted(set(first_values) & set(second_values))
    assert redone == [5, 6]  # logged by both jobs, with the same values: the resume is exact
    assert [first_values[step] for step in redone] == [second_values[step] for step in redone]
    # the directory as TensorBoard reads it: purge_step hides the first job's points from the resume step on, so
    # every step appears exactly once and the re-done ones carry the requeued job's values
    acc = EventAccumulator(str(r["run_dir"]), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert sorted(e.step for e in events) == list(range(MAX_STEPS))
    shown = {e.step: e.value for e in events}
    assert all(shown[step] == value for step, value in second_values.items())


@pytest.mark.slow
def test_sigusr1_inside_a_step_still_resumes_exactly(tmp_path):
    """SIGUSR1 after step 6's batch was fetched, before its update. Lightning's handler alone would save step 5's
    weights with the loader and batch progress at 6, and the requeued job would skip that batch and log every step
    one too high; the checkpoint must be taken at a step boundary instead, so the resume is exact."""
    r = requeue_cycle(tmp_path, "4244", usr1_at="start:5", term_at="end:7", every_n_steps=4)
    assert r["first_rc"] == r["second_rc"] == 0, r["log2"][-3000:]
    hpc = r["run_dir"] / "hpc_ckpt_1.ckpt"
    assert r["resumed_step"] == r["candidates"][hpc] == max(r["candidates"].values())
    by_pid = loss_points_by_process(r["run_dir"])
    first = {step: value for _, step, value in by_pid[r["first_pid"]]}
    second = {step: value for _, step, value in by_pid[r["second_pid"]]}
    assert sorted(first) == list(range(7)) and sorted(second) == list(range(r["resumed_step"], MAX_STEPS))
    redone = sorted(set(first) & set(second))
    assert redone and [first[step] for step in redone] == [second[step] for step in redone]


@pytest.mark.slow
def test_new_job_id_starts_a_fresh_run(requeued, tmp_path):
    r = requeued
    probe = tmp_path / "probe.pt"
    out = run(fit_command(r["runs"], "--trainer.max_steps", "2", "--trainer.callbacks+=tests.e2e.helpers.StateProbe"),
              tmp_path / "job3.log", slurm_env("4243", r["bin_dir"], ZIGMA_STATE_PROBE=str(probe)))  # fmt: skip
    assert "resumes from" not in out and "Restoring states" not in out
    assert torch.load(probe, weights_only=True)["global_step"] == 0
    fresh = r["runs"] / "quickstart" / "slurm_4243"
    assert global_step(fresh / "checkpoints" / "last.ckpt") == 2
    assert global_step(r["run_dir"] / "checkpoints" / "last.ckpt") == MAX_STEPS  # the other job's run is untouched


@pytest.mark.slow
def test_devices_times_nodes_must_equal_slurm_ntasks(tmp_path, monkeypatch, capsys):
    """In-process (``cli.main`` under the same SLURM variables): nothing here needs a separate process."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm_env("99", fake_scontrol(tmp_path / "bin"), ntasks=2).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(fit_command(tmp_path / "runs")[2:])  # the arguments after ``python cli.py``
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trainer.devices=1" in errors[0] and "trainer.num_nodes=1" in errors[0], stderr
    assert "SLURM_NTASKS=2" in errors[0] and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # nothing started


# ------------------------------------------------------------------------------------------- SIGKILL fault injection
KILLS_PER_TRIAL = 5


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_corrupt_checkpoint(tmp_path):
    """>= 10 SIGKILLs (seeded) in start-up, steps and checkpoint writes, resumed runs killed too. After every kill all
    ``.ckpt`` files load with ``weights_only=True`` and the next launch resumes from the furthest of them; every trial
    ends at max_steps with a loadable last.ckpt at max_steps. Up to 5 kills per trial (launches 2-5 are resumed
    runs), so 10 kills usually take 2 trials, and the launch that finishes a trial runs in-process: 10 subprocesses
    instead of 14 (3 kills per trial, each trial finished by a subprocess)."""
    rng = random.Random(0)
    moments = ("startup", "steps", "write")
    kills: list[dict] = []
    trial = 0
    while len(kills) < 10:
        assert trial < 6, kills
        work = tmp_path / f"trial{trial}"
        work.mkdir()
        runs = work / "runs"
        launch = 0
        for _ in range(KILLS_PER_TRIAL):  # the 2nd and later kills of a trial hit resumed runs
            killed = kill_at_random_moment(runs, work / f"{launch}.log", work / f"{launch}.pt",
                                           moments[len(kills) % 3], rng)  # fmt: skip
            launch += 1
            if "rc" in killed:  # it ran to the end before the kill
                final_log = (work / f"{launch - 1}.log").read_text()
                assert killed["rc"] == 0, final_log[-3000:]
                assert FINISHED + f"{MAX_STEPS}` reached" in final_log, final_log[-3000:]
                break
            steps = checkpoint_steps(runs) if runs.exists() else {}  # every .ckpt left behind loads
            killed["resumable"] = max(steps.values(), default=0)
            kills.append({"trial": trial, "launch": launch - 1, **killed})
        else:  # the launch that finishes the trial is not killed: in-process (its last.ckpt is checked below)
            main_in_process("fit", *FAULTS, "--ckpt_path", "last", "--trainer.callbacks+=tests.e2e.helpers.StateProbe",
                            runs=runs, env={"ZIGMA_STATE_PROBE": str(work / f"{launch}.pt")})  # fmt: skip
            launch += 1
        for k in (k for k in kills if k["trial"] == trial):  # the next launch started from the furthest checkpoint
            started = probed_step(work / f"{k['launch'] + 1}.pt")
            assert started in (None, k["resumable"]), k  # None: that launch was killed before training started
        steps = checkpoint_steps(runs)
        assert any(p.name == "last.ckpt" and s == MAX_STEPS for p, s in steps.items()), steps
        trial += 1
    assert {k["moment"] for k in kills} == set(moments), kills
    print(f"{len(kills)} kills in {trial} trials:", *kills, sep="\n  ")
