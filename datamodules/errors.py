"""Data faults that end a run with one line (``cli.main`` prints ``error: <message>``, no traceback).

A ``DataError`` message is one line that names what failed and what to do. It is a ``RuntimeError``, so code that
caught the budget's ``RuntimeError`` before keeps working. This module imports nothing heavy: ``cli`` may import it
before torch.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """A fault in the data (not a bug in the code) that stops the run; ``str(err)`` is one line for people."""


class BadSampleBudgetExceeded(DataError):
    """More unreadable samples or shards than ``max_bad_samples`` in one reading process (worker) and epoch.

    Raised in the process that reads; from a DataLoader worker it reaches the main process unchanged (type and
    message: ``datamodules.streams.ShardLoader`` carries it over, not torch's traceback wrapper).
    """


class ResumeSettingsError(DataError, ValueError):
    """Data settings that cannot continue a checkpoint's training as asked (``data.keep_global_batch`` with a process
    count and batch size whose product divides no whole number of the checkpoint's global batch). Raised when the
    resumed fit builds its training loader, before any step; a ``ValueError`` too, as other bad settings."""


__all__ = ["BadSampleBudgetExceeded", "DataError", "ResumeSettingsError"]
