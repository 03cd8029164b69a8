"""Verified checkpoints and a full disk on save (issue 13, deliverables 2 and 4).

``verify_checkpoint`` must reject a checkpoint overwritten in place (same size) in every region of its zip archive,
including tensor data that ``torch.load`` reads without complaint; an explicit corrupt ``--ckpt_path`` fails in one
line. A save that meets a full disk (a real tmpfs where this machine lets the test mount one, otherwise a writer that
raises ENOSPC) stops with one line naming the file and the newest checkpoint, which stays intact, and leaves no
temporary behind.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from tests.e2e.faults import FAULTS, REGIONS, corrupt_in_place, region_span
from zigma_lightning import cli, resume
from zigma_lightning.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    CorruptCheckpointError,
    atomic_torch_save,
    verify_checkpoint,
)

CHECKPOINT_SIZE = 264_000  # bytes of a tiny-model checkpoint (tests/e2e/tiny.yaml), to size the small disk


def lightning_like(step: int = 3) -> dict:
    torch.manual_seed(step)
    return {"state_dict": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "global_step": step,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}]}  # fmt: skip


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "last.ckpt"
    checkpoint = lightning_like()
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path, checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of about 2.5 checkpoints (mounted under tmp_path, unmounted after), or a skip saying why not."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    size = f"{int(2.5 * CHECKPOINT_SIZE) // 1024}k"
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"zigma-{uuid.uuid4().hex[:8]}",
                               str(mount_point)], capture_output=True, text=True, timeout=30)  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the ENOSPC writer "
                    "tests cover the same path")  # fmt: skip
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=30)


# -------------------------------------------------------------------------------------------------------- verifying
def test_intact_checkpoint_verifies_and_returns_its_content(saved):
    path, checkpoint = saved
    loaded = verify_checkpoint(path)
    assert loaded["global_step"] == 3
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in checkpoint["state_dict"].items())


@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("seed", range(3))
def test_in_place_corruption_in_every_region_is_rejected(saved, region, seed):
    path, _ = saved
    size, (start, end) = path.stat().st_size, region_span(path, region)
    offset = corrupt_in_place(path, region, random.Random(seed))
    assert path.stat().st_size == size and start <= offset < end
    with pytest.raises(CorruptCheckpointError) as info:
        verify_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    expected = {
        "zip header": "Bad magic number for file header in archive/data.pkl",
        "pickle": "CRC-32 mismatch in archive/data.pkl",
        "tensor data": "CRC-32 mismatch in archive/data/0",
        "central directory": "not a readable zip archive (",
        "end record": "not a readable zip archive (",
    }
    assert message.startswith(expected[region]), message


def test_damaged_tensor_data_loads_silently_with_torch_but_not_here(saved):
    """The hole this closes: 64 bytes overwritten inside a tensor load with torch.load (even without mmap) and give
    different weights (NaN where the bytes make one)."""
    path, checkpoint = saved
    corrupt_in_place(path, "tensor data", random.Random(0))
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    assert not torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    with pytest.raises(CorruptCheckpointError, match="CRC-32 mismatch in archive/data/0"):
        verify_checkpoint(path)


def test_truncated_and_garbage_files_are_rejected(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"^not a readable zip archive \(File is not a zip file\)"):
        verify_checkpoint(path)
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CorruptCheckpointError, match="not a readable zip archive"):
        verify_checkpoint(path)


needs_crc_option = pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"),
                                      reason="torch < 2.6 always records CRC-32s")  # fmt: skip


@pytest.fixture
def crc32_off():
    torch.serialization.set_crc32_options(False)
    yield
    torch.serialization.set_crc32_options(True)


@needs_crc_option
def test_archive_without_crcs_is_accepted_after_a_full_load_with_a_warning(tmp_path, crc32_off, caplog):
    path = tmp_path / "old.ckpt"
    torch.save(lightning_like(), path)  # a writer that skipped the CRCs
    with caplog.at_level("WARNING", logger="zigma_lightning.checkpoint_io"):
        assert verify_checkpoint(path)["global_step"] == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} records no CRC-32s (saved with torch.serialization.set_crc32_options(False)): checked by a full "
        "load only"
    ]


@needs_crc_option
def test_our_writer_records_crcs_even_when_they_are_turned_off(tmp_path, crc32_off):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(lightning_like(), path)
    assert not torch.serialization.get_crc32_options()  # the global setting is restored
    corrupt_in_place(path, "tensor data", random.Random(0))
    with pytest.raises(CorruptCheckpointError, match="CRC-32 mismatch"):
        verify_checkpoint(path)


def test_find_resume_checkpoint_skips_in_place_corruption_with_one_line_each(tmp_path, caplog):
    """Newest first: an hpc checkpoint and last.ckpt damaged in place (same size) are skipped, each named once with
    the reason, and the newest intact step checkpoint is chosen."""
    run_dir = tmp_path / "version_0"
    names = ["checkpoints/step000002.ckpt", "checkpoints/step000003.ckpt", "checkpoints/last.ckpt", "hpc_ckpt_1.ckpt"]
    for name in names:
        atomic_torch_save(lightning_like(step=2 + names.index(name)), run_dir / name)
    rng = random.Random(0)
    corrupt_in_place(run_dir / "hpc_ckpt_1.ckpt", "pickle", rng)
    corrupt_in_place(run_dir / "checkpoints/last.ckpt", "tensor data", rng)
    for i, name in enumerate(names):
        os.utime(run_dir / name, (1000 + i, 1000 + i))  # newest last
    with caplog.at_level("WARNING", logger="zigma.cli"):
        assert resume.find_resume_checkpoint(tmp_path) == run_dir / "checkpoints/step000003.ckpt"
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping corrupt checkpoint {run_dir / 'hpc_ckpt_1.ckpt'}: CRC-32 mismatch in archive/data.pkl (the "
        "file changed after it was written)",
        f"skipping corrupt checkpoint {run_dir / 'checkpoints/last.ckpt'}: CRC-32 mismatch in archive/data/0 (the file "
        "changed after it was written)",
    ]


def test_a_last_ckpt_older_than_the_resumed_checkpoint_becomes_its_copy_and_a_newer_one_is_kept(tmp_path):
    """A kill between step000003.ckpt and the last.ckpt write after it leaves last.ckpt at step 2: resuming from
    step 3 replaces it by a copy of step 3 (a fit resumed at max_steps saves nothing more); a damaged newer last.ckpt,
    skipped by the search, is left alone, and without a last.ckpt (no save_last) none is made."""
    ckpts = tmp_path / "version_0/checkpoints"
    for step, name in ((2, "last.ckpt"), (3, "step000003.ckpt")):
        atomic_torch_save(lightning_like(step=step), ckpts / name)
        os.utime(ckpts / name, (1000 + step, 1000 + step))
    resume.refresh_stale_last(ckpts / "step000003.ckpt")
    assert (ckpts / "last.ckpt").read_bytes() == (ckpts / "step000003.ckpt").read_bytes()
    os.utime(ckpts / "last.ckpt", (2000, 2000))
    corrupt_in_place(ckpts / "last.ckpt", "pickle", random.Random(0))
    damaged = (ckpts / "last.ckpt").read_bytes()
    resume.refresh_stale_last(ckpts / "step000003.ckpt")
    assert (ckpts / "last.ckpt").read_bytes() == damaged
    (ckpts / "last.ckpt").unlink()
    resume.refresh_stale_last(ckpts / "step000003.ckpt")
    assert not (ckpts / "last.ckpt").exists()


def test_a_checkpoint_that_cannot_be_read_is_called_unreadable(tmp_path, monkeypatch, caplog):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save(lightning_like(), path)

    def denied(p):
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    monkeypatch.setattr(resume, "verify_checkpoint", denied)
    with caplog.at_level("WARNING", logger="zigma.cli"):
        assert resume.find_resume_checkpoint(tmp_path) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping unreadable checkpoint {path}: [Errno 13] Permission denied: '{path}'"
    ]
    with pytest.raises(cli.ConfigError, match=r"unreadable checkpoint: \[Errno 13\] Permission denied"):
        resume.check_checkpoint_path(str(path))


@pytest.mark.slow
def test_explicit_corrupt_ckpt_path_fails_in_one_line(saved, tmp_path, capsys, monkeypatch):
    path, _ = saved
    corrupt_in_place(path, "tensor data", random.Random(0))
    args = ["fit", *FAULTS, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--ckpt_path", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: ckpt_path={str(path)!r}: corrupt checkpoint: CRC-32 mismatch in archive/data/0 (the file changed "
        "after it was written); --ckpt_path last resumes from the newest intact one"
    ], err
    monkeypatch.setenv("ZIGMA_DEBUG", "1")  # the traceback, for developers
    with pytest.raises(cli.ConfigError) as info:
        cli.main(args)
    assert isinstance(info.value.__cause__, CorruptCheckpointError)


# --------------------------------------------------------------------------------------------------------- disk full
def _disk_full_message(path: Path, intact: Path | None) -> str:
    kept = f"{intact} is intact" if intact else f"no earlier checkpoint in {path.parent}"
    return (f"no space left on device while saving checkpoint {path} (nothing was written; {kept}): free space, then "
            "resume with --ckpt_path last")  # fmt: skip


def test_disk_full_names_the_file_and_the_intact_previous_checkpoint(tmp_path, monkeypatch):
    """A writer that raises ENOSPC half way, as a full disk does (torch then reports its own RuntimeError)."""
    ckpts = tmp_path / "checkpoints"
    atomic_torch_save(lightning_like(step=1), ckpts / "step000001.ckpt")
    atomic_torch_save(lightning_like(step=1), ckpts / "last.ckpt")
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    for name in ("step000002.ckpt", "last.ckpt"):  # a new file, and the replacement of an existing one
        with pytest.raises(CheckpointWriteError) as info:
            AtomicCheckpointIO().save_checkpoint(lightning_like(step=2), ckpts / name)
        assert str(info.value) == _disk_full_message(ckpts / name, ckpts / "last.ckpt")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step000001.ckpt"]  # no temporary
    assert verify_checkpoint(ckpts / "last.ckpt")["global_step"] == 1


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    def fail(obj, f, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_torch_save(lightning_like(), tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_on_a_real_small_tmpfs(small_disk):
    """torch's zip writer turns the ENOSPC of its write into ``RuntimeError: [enforce fail at inline_container.cc]
    ... unexpected pos``; the ENOSPC is found in the exception's context."""
    big = {"state_dict": {"w": torch.zeros(CHECKPOINT_SIZE // 4)}, "global_step": 1}  # one checkpoint's bytes
    atomic_torch_save(big, small_disk / "step000001.ckpt")
    atomic_torch_save(big, small_disk / "last.ckpt")
    with pytest.raises(CheckpointWriteError) as info:
        atomic_torch_save({**big, "global_step": 2}, small_disk / "step000002.ckpt")
    assert str(info.value) == _disk_full_message(small_disk / "step000002.ckpt", small_disk / "last.ckpt")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.ckpt", "step000001.ckpt"]
    assert verify_checkpoint(small_disk / "last.ckpt")["global_step"] == 1


@pytest.mark.slow
def test_disk_full_during_fit_stops_with_one_line_and_keeps_the_previous_checkpoint(small_disk, tmp_path, capsys):
    """The CLI (in-process) with ModelCheckpoint writing every step to a disk with room for about 2.5 checkpoints."""
    args = ["fit", *FAULTS, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.callbacks.init_args.dirpath", str(small_disk), "--trainer.max_steps", "6"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    intact = max(small_disk.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    steps = {p.name: verify_checkpoint(p)["global_step"] for p in small_disk.iterdir()}  # all intact, no temporary
    failed = next(small_disk / f"step{s:06d}.ckpt" for s in range(1, 7) if f"step{s:06d}.ckpt" not in steps)
    assert errors[0] == "error: " + _disk_full_message(failed, intact)
    assert steps[intact.name] == max(steps.values()) > 0


def test_main_prints_a_save_failure_in_one_line_and_zigma_debug_shows_the_traceback(monkeypatch, capsys):
    failure = CheckpointWriteError("no space left on device while saving checkpoint x.ckpt (...)")

    def run_that_fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cli, "ZigMaCLI", run_that_fails)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: {failure}\n"
    monkeypatch.setenv("ZIGMA_DEBUG", "1")
    with pytest.raises(CheckpointWriteError) as info:
        cli.main(["fit"])
    assert info.value is failure


def test_fault_helpers_keep_size_and_stay_in_region(saved, tmp_path):
    path, _ = saved
    for region in REGIONS:
        copy = tmp_path / f"{region.replace(' ', '_')}.ckpt"
        shutil.copy(path, copy)
        offset = corrupt_in_place(copy, region, random.Random(1), nbytes=8)
        original, damaged = path.read_bytes(), copy.read_bytes()
        changed = [i for i in range(len(original)) if original[i] != damaged[i]]
        start, end = region_span(path, region)
        assert len(damaged) == len(original) and changed == list(range(offset, offset + 8))
        assert start <= offset and offset + 8 <= end
