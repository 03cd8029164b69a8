"""Which checkpoint a run resumes from, and where a SLURM job's run lives.

``--ckpt_path last`` resolves to the newest intact checkpoint of the runs under the logger's directory (step
checkpoints, ``last.ckpt`` and SLURM preemption ``hpc_ckpt_*.ckpt`` alike, each checked against its CRC-32s: a
truncated or corrupt newest file is reported in one line and skipped). Under SLURM one run directory per job, named
by :func:`slurm_job_tag`, survives requeues.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.environments import SLURMEnvironment

from zigma.files import atomic_write
from zigma_lightning.checkpoint_io import CorruptCheckpointError, verify_checkpoint
from zigma_lightning.errors import ConfigError

log = logging.getLogger("zigma.cli")  # the command's log name, which users grep for


def _loads(path: Path) -> bool:
    """Whether ``path`` is an intact Lightning checkpoint: every byte matches its recorded CRC-32, it loads with
    weights_only=True and has a step (``zigma_lightning.checkpoint_io.verify_checkpoint``). Logs one line if not."""
    try:
        ckpt = verify_checkpoint(path)
    except (CorruptCheckpointError, OSError) as err:
        log.warning("skipping %s checkpoint %s: %s", _damage(err), path, err)
        return False
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "global_step" in ckpt):
        log.warning("skipping %s: not a Lightning checkpoint (no state_dict or global_step)", path)
        return False
    return True


def find_resume_checkpoint(run_root: Path) -> Path | None:
    """Newest intact checkpoint of the runs under ``run_root`` (see ``_loads``), by modification time.

    Candidates: ``<run>/checkpoints/*.ckpt`` (step checkpoints and ``last.ckpt``) and ``<run>/hpc_ckpt_*.ckpt``
    (SLURM preemption), for every run directory under ``run_root``, plus ``run_root`` itself as a run directory.
    """
    patterns = ("*/checkpoints/*.ckpt", "*/hpc_ckpt_*.ckpt", "checkpoints/*.ckpt", "hpc_ckpt_*.ckpt")
    candidates = {p for pattern in patterns for p in run_root.glob(pattern) if p.is_file()}
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if _loads(path):
            return path
    return None


def check_checkpoint_path(ckpt_path: str) -> None:
    """An explicit ``--ckpt_path`` must exist and be intact (``verify_checkpoint``), or a one-line ConfigError."""
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: file not found (or use 'last' to resume the newest run)")
    try:
        verify_checkpoint(ckpt_path)
    except (CorruptCheckpointError, OSError) as err:
        raise ConfigError(f"ckpt_path={ckpt_path!r}: {_damage(err)} checkpoint: {err}; --ckpt_path last resumes from "
                          "the newest intact one") from err  # fmt: skip


def _damage(err: Exception) -> str:
    return "corrupt" if isinstance(err, CorruptCheckpointError) else "unreadable"


def slurm_job_tag() -> str | None:
    """A run-directory name stable across requeues of one SLURM job (array jobs: job_task), or None off SLURM."""
    if not SLURMEnvironment.detect():
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]
    return f"slurm_{job}"


def logger_dirs(trainer_cfg: Any) -> tuple[Path, Any] | None:
    """(save_dir/name, init_args namespace) of a configured TensorBoard/CSV logger, or None."""
    logger = trainer_cfg.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if not logger or logger is True or not hasattr(logger, "get") or logger.get("init_args") is None:
        return None
    args = logger["init_args"]
    save_dir = args.get("save_dir") or "."
    name = args.get("name") or ""
    return Path(save_dir) / name, args


def setup_slurm_run(cfg: Any) -> None:
    """Under SLURM: one run directory per job (stable across requeues) holding its hpc checkpoints, and a requeued
    job resumes from the newest good checkpoint of its own run (Lightning's ``ckpt_path="last"`` would ignore
    ``hpc_ckpt_*``). A new job starts a new run unless ``--ckpt_path last`` (newest run) or a path is given.
    ``cfg`` is the subcommand's parsed configuration; it is updated in place."""
    tag = slurm_job_tag()
    if tag is None:
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    devices, nodes = cfg["trainer"].get("devices"), cfg["trainer"].get("num_nodes") or 1
    if isinstance(devices, int) and devices * nodes != ntasks:
        raise ConfigError(
            f"trainer.devices={devices} x trainer.num_nodes={nodes} != SLURM_NTASKS={ntasks}: set "
            "--ntasks-per-node to trainer.devices and --nodes to trainer.num_nodes"
        )
    dirs = logger_dirs(cfg["trainer"])
    if dirs is not None:
        if dirs[1].get("version") is None:
            dirs[1]["version"] = tag
        run_dir = dirs[0] / str(dirs[1]["version"])
    else:
        run_dir = Path(cfg["trainer"].get("default_root_dir") or ".") / tag
    if not cfg["trainer"].get("default_root_dir"):
        cfg["trainer"]["default_root_dir"] = str(run_dir)  # where Lightning writes hpc_ckpt_<n>.ckpt
    if cfg.get("ckpt_path") is None:
        found = find_resume_checkpoint(run_dir)
        if found is not None:
            log.info("SLURM job %s resumes from %s", tag, found)
            cfg["ckpt_path"] = str(found)


def refresh_stale_last(found: Path) -> None:
    """Make ``last.ckpt`` beside ``found`` a copy of it (atomically) when it is older than ``found``.

    A kill between a step checkpoint and the ``last.ckpt`` write after it (``ModelCheckpoint(save_last=True)``
    writes them in that order) leaves ``last.ckpt`` one save behind. The resumed fit starts from ``found``, the newer
    file; when ``found`` is already at ``max_steps`` the fit ends without saving again, and ``last.ckpt`` would stay
    behind the run's final weights for good. Only an existing ``last.ckpt`` (``save_last`` in use) is replaced."""
    last = found.parent / "last.ckpt"
    if found.name == last.name or not last.is_file() or last.stat().st_mtime >= found.stat().st_mtime:
        return
    with open(found, "rb") as src, atomic_write(last) as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    log.info("ckpt_path=last: %s was older than %s; replaced by a copy of it", last, found.name)


def resolve_last(sub: str, cfg: Any) -> None:
    """``ckpt_path=last`` -> the newest intact checkpoint under the logger's directory, continuing its TensorBoard run
    (``fit`` without one starts from scratch; the other subcommands refuse). ``cfg`` is updated in place."""
    dirs = logger_dirs(cfg["trainer"])
    root = dirs[0] if dirs else Path(cfg["trainer"].get("default_root_dir") or ".")
    found = find_resume_checkpoint(root)
    if found is None and sub != "fit":  # never predict or evaluate with random weights
        raise ConfigError(f"ckpt_path=last: no readable checkpoint under {root} to {sub} with; train first "
                          "(python cli.py fit ...) or pass a checkpoint file")  # fmt: skip
    if found is None:
        log.warning("ckpt_path=last: no readable checkpoint under %s; starting from scratch", root)
        cfg["ckpt_path"] = None
        return
    cfg["ckpt_path"] = str(found)
    if sub == "fit":
        refresh_stale_last(found)
    run_dir = found.parent.parent if found.parent.name == "checkpoints" else found.parent
    if dirs and run_dir != root:
        dirs[1]["version"] = run_dir.name  # continue the same TensorBoard run
        if cfg["trainer"].get("default_root_dir") and slurm_job_tag():
            cfg["trainer"]["default_root_dir"] = str(run_dir)
    log.info("ckpt_path=last -> %s", found)
