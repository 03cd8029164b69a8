"""ZigMa command line: ``python cli.py fit|validate|test|predict --config configs/...yaml [--key value ...]``.

A LightningCLI over :class:`zigma.flow_module.FlowMatchingModule` and the DataModules in ``datamodules``. Beyond
Lightning's defaults it (1) resolves ``--ckpt_path last`` to the newest intact checkpoint of the run (step
checkpoints, ``last.ckpt`` and SLURM preemption ``hpc_ckpt_*.ckpt`` alike, each checked against its CRC-32s; a
truncated or corrupt newest file is reported in one line and skipped; an explicit corrupt path is an error), and
keeps writing to that run's TensorBoard directory; (2) overwrites the saved
``config.yaml`` on resume instead of failing; (3) writes checkpoints atomically (``AtomicCheckpointIO``);
(4) under SLURM, enables ``SLURMEnvironment(auto_requeue=True)``, pins the run directory to the job id and resumes
by default, so a preempted job saves, requeues itself and continues the same run; (5) checks that the model fits the
data before any step; (6) reports configuration errors in one line (``ZIGMA_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from callbacks import SampleWriter
from callbacks.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError, CorruptCheckpointError, verify_checkpoint
from callbacks.evaluation import FIDEvaluation, FVDEvaluation
from callbacks.slurm import StepBoundaryRequeue
from datamodules import ZigMaDataModule
from zigma.flow_module import FlowMatchingModule

log = logging.getLogger("zigma.cli")

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "zigma"},
}


class ConfigError(ValueError):
    """A configuration that cannot work; reported in one line naming the key."""


def _loads(path: Path) -> bool:
    """Whether ``path`` is an intact Lightning checkpoint: every byte matches its recorded CRC-32, it loads with
    weights_only=True and has a step (``callbacks.checkpoint_io.verify_checkpoint``). Logs one line if not."""
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


def _logger_dirs(trainer_cfg: Any) -> tuple[Path, Any] | None:
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


class ZigMaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SampleWriter, "predict_writer")
        # FID/FVD at the end of each validation (fit, validate) and test; off until fid.num_samples / fvd.num_samples
        parser.add_lightning_class_args(FIDEvaluation, "fid")
        parser.add_lightning_class_args(FVDEvaluation, "fvd")

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub is None:
            return
        cfg = self.config[sub]
        if sub == "fit":
            self._setup_slurm_run(cfg)
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            self._resolve_last(cfg)
        elif ckpt_path and ckpt_path not in ("best", "hpc"):
            check_checkpoint_path(ckpt_path)

    def _setup_slurm_run(self, cfg) -> None:
        """Under SLURM: one run directory per job (stable across requeues) holding its hpc checkpoints, and a requeued
        job resumes from the newest good checkpoint of its own run (Lightning's ``ckpt_path="last"`` would ignore
        ``hpc_ckpt_*``). A new job starts a new run unless ``--ckpt_path last`` (newest run) or a path is given."""
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
        dirs = _logger_dirs(cfg["trainer"])
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
                self._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        """Adds the atomic checkpoint writer and, under SLURM, the auto-requeue environment to the plugins and
        ``StepBoundaryRequeue`` to the callbacks (preemption checkpoints at a step boundary)."""
        configured = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(configured) if isinstance(configured, list) else [configured]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        requeue = None
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            requeue = SLURMEnvironment(auto_requeue=True)
            plugins.append(requeue)
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        if requeue is not None:
            trainer.callbacks.append(StepBoundaryRequeue(requeue.requeue_signal))
        return trainer

    def _resolve_last(self, cfg) -> None:
        dirs = _logger_dirs(cfg["trainer"])
        root = dirs[0] if dirs else Path(cfg["trainer"].get("default_root_dir") or ".")
        found = find_resume_checkpoint(root)
        if found is None:
            log.warning("ckpt_path=last: no readable checkpoint under %s; starting from scratch", root)
            cfg["ckpt_path"] = None
            return
        cfg["ckpt_path"] = str(found)
        run_dir = found.parent.parent if found.parent.name == "checkpoints" else found.parent
        if dirs and run_dir != root:
            dirs[1]["version"] = run_dir.name  # continue the same TensorBoard run
            if cfg["trainer"].get("default_root_dir") and slurm_job_tag():
                cfg["trainer"]["default_root_dir"] = str(run_dir)
        log.info("ckpt_path=last -> %s", found)
        self._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Constructor errors (bad model/data arguments) become one-line configuration errors."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, ImportError, MisconfigurationException) as err:
            raise ConfigError(_first_useful_line(str(err))) from err

    def after_instantiate_classes(self) -> None:
        check_model_matches_data(self.model, self.datamodule)

    def before_fit(self) -> None:
        """A resumed run writes into the same TensorBoard run. Steps its previous process logged after the checkpoint
        (before a kill or requeue) are re-done now, so hide them with TensorBoard's ``purge_step``: every step then
        appears once in the curves. (TensorBoardLogger passes extra kwargs to its SummaryWriter, created lazily.)"""
        ckpt_path = self.config["fit"].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        step = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        for logger in self.trainer.loggers:
            if not isinstance(logger, TensorBoardLogger) or logger._experiment is not None:
                continue
            if logger._kwargs.get("purge_step") is None:  # the CLI fills the writer's defaults, so it is present
                logger._kwargs["purge_step"] = step


def _first_useful_line(message: str) -> str:
    """The informative line of an error: jsonargparse wraps constructor errors of subclass-typed arguments (the
    DataModule) in a "Does not validate against any of the Union subtypes" report whose "  - " items hold them."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    items = [line[2:] for line in lines if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line]
    return items[0] if items else (lines[0] if lines else "invalid configuration")


def check_model_matches_data(model: FlowMatchingModule, data: ZigMaDataModule | None) -> None:
    """Fail before training when the backbone cannot consume the data's samples or conditions."""
    if data is None:
        return
    net = model.model
    want = tuple(getattr(data, "sample_shape", ()) or ())
    pixel_shape = getattr(data, "pixel_shape", None)
    if pixel_shape is not None and not want:  # images that the module encodes with its VAE
        if model.vae is None:
            raise ConfigError(f"the data yields pixels of shape {tuple(pixel_shape)} to encode: set model.vae "
                              "(a diffusers AutoencoderKL directory or hub id)")  # fmt: skip
        factor = model.vae.downsample_factor
        latent = (model.vae.latent_channels, pixel_shape[-2] // factor, pixel_shape[-1] // factor)
        want = (pixel_shape[0], *latent) if len(pixel_shape) == 4 else latent  # video frames (T, 3, S, S)
    if want and len(want) != len(model.sample_shape):
        kind = "video clips (T, C, H, W)" if len(want) == 4 else "images (C, H, W)"
        raise ConfigError(
            f"model.net.video_frames={net.video_frames} does not match the data: {type(data).__name__} yields {kind} "
            f"of shape {want}; set model.net.video_frames={want[0] if len(want) == 4 else 0}"
        )
    if want and tuple(model.sample_shape) != want:
        names = ("video_frames", "in_channels", "img_dim", "img_dim")[-len(want) :]
        have = dict(zip(names, model.sample_shape))
        expected = dict(zip(names, want))
        key = next(k for k in names if have[k] != expected[k])
        raise ConfigError(
            f"model.net.{key}={have[key]} does not match the data: {type(data).__name__} yields samples of shape "
            f"{want}; set model.net.{key}={expected[key]}"
        )
    if data.num_classes > 0 and net.num_classes != data.num_classes:
        raise ConfigError(f"model.net.num_classes={net.num_classes} but the data has {data.num_classes} classes")
    if net.num_classes > 0 and data.num_classes == 0:
        raise ConfigError(f"model.net.num_classes={net.num_classes} but {type(data).__name__} has no class labels; "
                          "set model.net.num_classes=-1")  # fmt: skip
    if data.context_dim > 0 and not net.has_text:
        raise ConfigError("the data carries caption features: set model.net.has_text=true and model.net.d_context")
    if net.has_text and data.context_dim == 0:
        raise ConfigError("model.net.has_text=true but the data has no caption features (data.caption_key)")
    if net.has_text and net.config["d_context"] != data.context_dim:
        raise ConfigError(f"model.net.d_context={net.config['d_context']} but captions have width {data.context_dim}")
    check_manifest_matches(model, getattr(data, "shards", None))


def check_manifest_matches(model: FlowMatchingModule, shards) -> None:
    """Shards made by ``datamodules.prepare`` carry a manifest: reject a model whose sample shape, VAE scaling,
    classes or caption width differ from it (shards without a manifest, e.g. upstream's, are not checked)."""
    if not shards:
        return
    from datamodules.manifest import check_manifest, read_manifest

    try:
        manifest = read_manifest(shards)
    except FileNotFoundError:
        return
    net = model.model
    try:
        check_manifest(
            manifest,
            sample_shape=model.sample_shape,
            vae_config=model.vae.config() if model.vae is not None else None,
            num_classes=net.num_classes if net.num_classes > 0 else None,
            context_dim=net.config["d_context"] if net.has_text else None,
            ignore_vae_keys=("name_or_path", "subfolder"),  # the same VAE may live elsewhere on this machine
        )
    except ValueError as err:
        raise ConfigError(f"the model does not match the data's manifest: {err}") from err


def main(args: list[str] | None = None) -> ZigMaCLI | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return ZigMaCLI(
            FlowMatchingModule,
            ZigMaDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"logger": DEFAULT_LOGGER, "log_every_n_steps": 10},
            args=args,
        )
    except ConfigError as err:  # raised only while parsing/instantiating; errors during a run keep their traceback
        if os.environ.get("ZIGMA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointWriteError as err:  # disk full during a save in fit: the run stops, the last checkpoint is kept
        if os.environ.get("ZIGMA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
