"""``zigma.files.atomic_write``: the target holds the old or the new complete content, never a partial one, and no
temporary file is left behind."""

import os

import numpy as np
import pytest

from zigma.files import atomic_write, open_temporaries, temporary_writer_pid, write_bytes_atomically


def test_bytes_replace_the_old_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    assert write_bytes_atomically(target, b"new content") == target
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_streaming_writer_writes_through_a_temporary_beside_the_target(tmp_path):
    target = tmp_path / "arrays.npz"
    with atomic_write(target) as f:
        np.savez(f, x=np.arange(5))
        (temporary,) = open_temporaries()  # registered while it is written, in the target's directory
        assert temporary.parent == tmp_path and temporary.name.startswith(".arrays.npz.")
        assert temporary_writer_pid(temporary) == os.getpid() and not target.exists()
    assert open_temporaries() == []
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(5))
    with atomic_write(tmp_path / "t.json", "w", encoding="utf-8") as f:
        f.write('{"ok": true}\n')
    assert (tmp_path / "t.json").read_text(encoding="utf-8") == '{"ok": true}\n'


def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old and complete")
    with pytest.raises(OSError, match="disk full"), atomic_write(target, "w") as f:
        f.write("new but ")
        f.flush()
        raise OSError(28, "disk full")  # as a write that hits ENOSPC would
    assert target.read_text() == "old and complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] and open_temporaries() == []
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "new.bin") as f:  # no old file: none appears
        f.write(b"partial")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_only_write_modes_and_temporary_names_are_recognised(tmp_path):
    with pytest.raises(ValueError, match="mode='ab' must be 'wb' or 'w'"), atomic_write(tmp_path / "x", "ab"):
        pass
    assert temporary_writer_pid(tmp_path / ".train-000001.tar.123-0a1b2c3d.tmp") == 123
    assert temporary_writer_pid(tmp_path / "train-000001.tar.tmp") is None
