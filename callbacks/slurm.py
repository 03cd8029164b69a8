"""SLURM preemption checkpoints taken at a step boundary.

Lightning 2.6 saves ``hpc_ckpt_<n>.ckpt`` inside its SIGUSR1 handler, i.e. wherever the step happens to be: usually
the batch has been fetched but the optimizer has not stepped, so the checkpoint counts a batch as read that the
weights never learnt from (a resumed run skips it), weights/EMA/scheduler can be torn, and under DDP the save's
barrier can meet another rank's gradient all-reduce. ``StepBoundaryRequeue`` only records the signal and runs
Lightning's handler (checkpoint + ``scontrol requeue``) at the end of the next training batch, on all ranks together.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning as L


class StepBoundaryRequeue(L.Callback):
    """Defers Lightning's SLURM requeue handler to the next step boundary.

    Args:
        signum: the requeue signal (``SLURMEnvironment.requeue_signal``, SIGUSR1 by default).
    """

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self._lightning_handler: Any = None
        self._pending = False

    def _record(self, signum, frame) -> None:
        self._pending = True

    def on_train_start(self, trainer, pl_module) -> None:
        handler = signal.getsignal(self.signum)  # registered by the Trainer before training starts
        if callable(handler):
            self._lightning_handler = handler
            signal.signal(self.signum, self._record)

    def _run_if_pending(self, trainer) -> None:
        if self._lightning_handler is None:
            return
        # a collective on every rank at every step: any rank that got the signal makes all of them save together
        if trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            self._pending = False
            self._lightning_handler(self.signum, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._run_if_pending(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run_if_pending(trainer)
        if self._lightning_handler is not None:
            signal.signal(self.signum, self._lightning_handler)
            self._lightning_handler = None
