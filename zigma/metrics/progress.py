"""Progress bars of the metric work (FID/FVD fakes, reference statistics): tqdm, on rank zero only, and only on a
terminal unless asked for, so the logs of batch jobs (SLURM, CI: stderr is not a TTY) get no bar lines.

tqdm (a dependency of Lightning) is imported when a bar is made, so ``import zigma`` still needs only torch.
"""

from __future__ import annotations

from typing import IO, Any


def progress_bar(total: int, desc: str, *, unit: str = "it", enabled: bool | None = None, rank: int = 0,
                 leave: bool = False, file: IO[str] | None = None) -> Any:  # fmt: skip
    """A tqdm bar counting to ``total``, or a disabled one (same methods, draws nothing).

    Args:
        total: the count the bar fills to (this rank's work).
        desc, unit: the bar's label and unit.
        enabled: True: draw; False: never; None: only when ``file`` (default stderr) is a terminal.
        rank: the caller's global rank; only rank 0 draws.
        leave: keep the finished bar on screen (default: erase it, e.g. beside Lightning's own bars).
        file: where the bar is drawn (default ``sys.stderr``).
    """
    from tqdm.auto import tqdm

    disable = True if rank != 0 else (None if enabled is None else not enabled)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=file, leave=leave, dynamic_ncols=True)
