"""ZigMa command line: ``python cli.py fit|validate|test|predict --config configs/...yaml [--key value ...]``.

A LightningCLI over :class:`zigma.flow_module.FlowMatchingModule` and the DataModules in ``datamodules``. Beyond
Lightning's defaults it (1) resolves ``--ckpt_path last`` to the newest checkpoint of the run that loads, and keeps
writing to that run's TensorBoard directory; (2) overwrites the saved ``config.yaml`` on resume instead of failing;
(3) checks that the model fits the data before any step; (4) reports configuration errors in one line
(set ``ZIGMA_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from callbacks import SampleWriter
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
    """Whether ``path`` is a complete Lightning checkpoint (loads with weights_only=True and has a step)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, pickle error, ...
        log.warning("skipping unreadable checkpoint %s: %s", path, str(err).splitlines()[0])
        return False
    return isinstance(ckpt, dict) and "state_dict" in ckpt and "global_step" in ckpt


def find_resume_checkpoint(run_root: Path) -> Path | None:
    """Newest checkpoint under ``run_root/*/checkpoints`` (or ``run_root/checkpoints``) that loads, by mtime."""
    candidates = sorted(
        [
            *run_root.glob("*/checkpoints/*.ckpt"),
            *run_root.glob("checkpoints/*.ckpt"),
            *run_root.glob("hpc_ckpt_*.ckpt"),
        ],
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return next((path for path in candidates if _loads(path)), None)


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

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub is None:
            return
        cfg = self.config[sub]
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            self._resolve_last(cfg)
        elif ckpt_path and ckpt_path not in ("best", "hpc") and not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path!r}: file not found (or use 'last' to resume the newest run)")

    def _resolve_last(self, cfg) -> None:
        dirs = _logger_dirs(cfg["trainer"])
        root = dirs[0] if dirs else Path(cfg["trainer"].get("default_root_dir") or ".")
        found = find_resume_checkpoint(root)
        if found is None:
            log.warning("ckpt_path=last: no readable checkpoint under %s; starting from scratch", root)
            cfg["ckpt_path"] = None
            return
        cfg["ckpt_path"] = str(found)
        if dirs and found.parent.name == "checkpoints" and found.parent.parent != root:
            dirs[1]["version"] = found.parent.parent.name  # continue the same TensorBoard run
        log.info("ckpt_path=last -> %s", found)
        self._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Constructor errors (bad model/data arguments) become one-line configuration errors."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err).strip().splitlines()[0]) from err

    def after_instantiate_classes(self) -> None:
        check_model_matches_data(self.model, self.datamodule)


def check_model_matches_data(model: FlowMatchingModule, data: ZigMaDataModule | None) -> None:
    """Fail before training when the backbone cannot consume the data's samples or conditions."""
    if data is None:
        return
    net = model.model
    want = tuple(getattr(data, "sample_shape", ()) or ())
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
    if data.context_dim > 0 and not net.has_text:
        raise ConfigError("the data carries caption features: set model.net.has_text=true and model.net.d_context")
    if net.has_text and data.context_dim == 0:
        raise ConfigError("model.net.has_text=true but the data has no caption features (data.caption_key)")
    if net.has_text and net.config["d_context"] != data.context_dim:
        raise ConfigError(f"model.net.d_context={net.config['d_context']} but captions have width {data.context_dim}")


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


if __name__ == "__main__":
    main()
